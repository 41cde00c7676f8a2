"""The plain-torch collaborative path used by training and validation: tokens, int8 round trip, fusion."""
from __future__ import annotations

from typing import Sequence

import torch


def int8_roundtrip(tokens: torch.Tensor) -> torch.Tensor:
    """dequantize(quantize(tokens)) with the int8 transfer ops (per-vector symmetric scale)."""
    from .. import ops

    q, s = ops.quantize_int8(tokens)
    return ops.dequantize_int8(q, s, dtype=tokens.dtype)


def fake_quant_int8(tokens: torch.Tensor) -> torch.Tensor:
    """int8 quantise/dequantise in the forward pass, identity gradient (straight-through)."""
    return tokens + (int8_roundtrip(tokens.detach()) - tokens).detach()


def fused_logits(fusion, mapped: Sequence[torch.Tensor]) -> torch.Tensor:
    """Logits from the fusion head's mapped tokens: one branch, or the mean of the cls and dist branches."""
    logits = [cls(h) for h, (_, cls) in zip(mapped, fusion.branches())]
    return logits[0] if len(logits) == 1 else (logits[0] + logits[1]) / 2


def fused_forward(model, images: torch.Tensor, *, transfer: str = "fp32", missing: Sequence[int] = ()) -> torch.Tensor:
    """The plain-torch collaborative path: tokens (fp32 or int8 round trip), zeros for `missing` devices, fusion."""
    if transfer not in ("fp32", "int8"):
        raise ValueError(f"transfer: expected 'fp32' or 'int8', got {transfer!r}")
    tokens = [t.float() for t in model.forward_tokens(images)]
    if transfer == "int8":
        tokens = [int8_roundtrip(t) for t in tokens]
    for i in missing:
        tokens[i] = torch.zeros_like(tokens[i])
    return model.fusion(tokens)
