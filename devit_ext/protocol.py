"""What a device sends and how the aggregator fuses it: the token message, in one place.

A device's message per image is its class token (and, for a distilled DeiT,
its distillation token: `tokens_per_image`), after the sub-model's final
LayerNorm, sent as one of `TRANSFERS`:

    int8   q int8 (B, T, d) + one float32 scale per token (B, T)   d + 4 bytes per token
    fp16   tokens float16 (B, T, d)                                 2d bytes per token
    fp32   tokens float32 (B, T, d)                                 4d bytes per token

- Sender: `encode(pre_norm_tokens, weight, bias, eps, transfer)` -> `TokenMessage`
  (the LayerNorm fused with int8 quantisation, `ops.layernorm_quantize_int8`, or
  a LayerNorm in fp32 and a cast).
- Aggregator: `fuse(messages, branches, widths)` -> logits: per fusion branch
  (class token; distillation token) the tokens of all devices side by side,
  dequantised, mapped and classified (`ops.ensemble_fusion` for int8, two
  linears otherwise), zeros for a missing device (None), branches averaged.
- In one process, for training and evaluation: `fused_forward(model, images,
  transfer=..., missing=...)` (tokens through `roundtrip`, zeros for missing
  devices, the fusion head), `fused_logits(fusion, mapped)`, and for
  quantisation-aware training `fake_quant_int8` (straight-through).

The bytes of a message between processes (header, validation) are
`devit_ext.wire`'s; the sizes here are the payload's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import ops

TRANSFERS = ("int8", "fp16", "fp32")
FLOAT_TRANSFER_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}

# (map weight, map bias, classifier weight, classifier bias) of one fusion branch
Branch = tuple


def check_transfer(transfer, accepted: Sequence[str] = TRANSFERS) -> str:
    if transfer not in accepted:
        raise ValueError(f"transfer: expected one of {tuple(accepted)}, got {transfer!r}")
    return transfer


def tokens_per_image(model) -> int:
    """Tokens a device sends per image: the class token, plus the distillation token for DeiT."""
    distilled = model if isinstance(model, bool) else model.distilled
    return 2 if distilled else 1


def bytes_per_token(width: int, transfer: str) -> int:
    """int8: d int8 values + one fp32 scale (d + 4); fp16: 2d; fp32: 4d."""
    check_transfer(transfer)
    d = int(width)
    return {"int8": d + 4, "fp16": 2 * d, "fp32": 4 * d}[transfer]


def message_bytes(width: int, transfer: str, tokens: int = 1) -> int:
    """Payload bytes per image of one device's message (a wire header excluded)."""
    return bytes_per_token(width, transfer) * int(tokens)


@dataclass
class TokenMessage:
    """One device's tokens for a micro-batch, as they travel.

    int8: `q` int8 (B, T, d) and `scales` float32 (B, T); fp16/fp32: `tokens` (B, T, d).
    """

    transfer: str
    q: Optional[torch.Tensor] = None
    scales: Optional[torch.Tensor] = None
    tokens: Optional[torch.Tensor] = None

    @property
    def _values(self) -> torch.Tensor:
        return self.q if self.transfer == "int8" else self.tokens

    @property
    def batch_size(self) -> int:
        return int(self._values.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self._values.shape[1])

    @property
    def width(self) -> int:
        return int(self._values.shape[2])

    def dequantized(self) -> torch.Tensor:
        """Tokens as float32 (B, T, d) whatever the transfer."""
        if self.transfer == "int8":
            return self.q.float() * self.scales.float().unsqueeze(-1)
        return self.tokens.float()

    def to(self, device) -> "TokenMessage":
        def mv(t):
            return None if t is None else t.to(device, non_blocking=True)

        return TokenMessage(self.transfer, mv(self.q), mv(self.scales), mv(self.tokens))


# ---------------------------------------------------------------------------
# Sender
# ---------------------------------------------------------------------------


def encode(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: Optional[float],
           transfer: str) -> TokenMessage:
    """Pre-norm tokens (B, T, d) -> the message: final LayerNorm, then int8 (fused) or a cast.

    The LayerNorm runs in fp32 whatever x's dtype (bf16/fp16 compute on the
    device), so the message depends on the compute dtype only through x.
    `eps=None` (and no weight / bias): the tokens are final already (a CCT's
    sequence-pooled vector follows its final norm): no LayerNorm, int8 or a cast.
    """
    if eps is None:
        if weight is not None or bias is not None:
            raise ValueError("eps: None (no final norm) takes no weight or bias")
        check_transfer(transfer)
        if transfer == "int8":
            q, s = ops.quantize_int8(x.float())
            return TokenMessage("int8", q=q, scales=s)
        return TokenMessage(transfer, tokens=x.float().to(FLOAT_TRANSFER_DTYPES[transfer]))
    if transfer == "int8":
        q, s = ops.layernorm_quantize_int8(x, weight, bias, eps)
        return TokenMessage("int8", q=q, scales=s)
    check_transfer(transfer)
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    y = F.layer_norm(x.float(), (x.shape[-1],), w, b, eps)
    return TokenMessage(transfer, tokens=y.to(FLOAT_TRANSFER_DTYPES[transfer]))


def int8_roundtrip(tokens: torch.Tensor) -> torch.Tensor:
    """dequantize(quantize(tokens)) with the int8 transfer ops (per-token symmetric scale)."""
    q, s = ops.quantize_int8(tokens)
    return ops.dequantize_int8(q, s, dtype=tokens.dtype)


def fake_quant_int8(tokens: torch.Tensor) -> torch.Tensor:
    """int8 quantise/dequantise in the forward pass, identity gradient (straight-through)."""
    return tokens + (int8_roundtrip(tokens.detach()) - tokens).detach()


def roundtrip(tokens: torch.Tensor, transfer: str) -> torch.Tensor:
    """Normalised tokens as the aggregator sees them after `transfer`, in fp32."""
    check_transfer(transfer)
    if transfer == "int8":
        return int8_roundtrip(tokens.float())
    if transfer == "fp16":
        return tokens.to(torch.float16).float()
    return tokens.float()


# ---------------------------------------------------------------------------
# Aggregator
# ---------------------------------------------------------------------------


def branches(fusion) -> list[Branch]:
    """A FusionHead's (map weight, map bias, classifier weight, classifier bias) per token kind."""
    return [(mp.weight, mp.bias, cls.weight, cls.bias) for mp, cls in fusion.branches()]


def _average(logits: list[torch.Tensor]) -> torch.Tensor:
    return logits[0] if len(logits) == 1 else (logits[0] + logits[1]) / 2


def fused_logits(fusion, mapped: Sequence[torch.Tensor]) -> torch.Tensor:
    """Logits from the fusion head's mapped tokens (one per branch): each branch's classifier, averaged."""
    return _average([cls(h) for h, (_, cls) in zip(mapped, fusion.branches())])


def fuse(messages: Sequence[Optional[TokenMessage]], branch_weights: Sequence[Branch],
         widths: Sequence[int]) -> torch.Tensor:
    """Messages of all devices (None for a missing one) -> logits float32 (B, C).

    Zeros stand in for a missing device's tokens (q = 0 and scale = 0 for int8),
    as if it had sent nothing. All messages share a transfer and a device.
    """
    present = [m for m in messages if m is not None]
    if not present:
        raise ValueError("messages: every device is missing")
    ref = present[0]
    B, dev = ref.batch_size, ref._values.device
    out = []
    for t, (mw, mb, cw, cb) in enumerate(branch_weights):
        if ref.transfer == "int8":
            q = torch.cat([m.q[:, t] if m is not None else torch.zeros(B, w, dtype=torch.int8, device=dev)
                           for m, w in zip(messages, widths)], dim=1)
            s = torch.stack([m.scales[:, t].float() if m is not None else torch.zeros(B, device=dev)
                             for m in messages], dim=1)
            out.append(ops.ensemble_fusion(q, s, list(widths), mw, mb, cw, cb))
        else:
            h = torch.cat([m.tokens[:, t].float() if m is not None else torch.zeros(B, w, device=dev)
                           for m, w in zip(messages, widths)], dim=1)
            z = F.linear(F.linear(h, mw.float(), None if mb is None else mb.float()), cw.float(),
                         None if cb is None else cb.float())
            out.append(z)
    return _average(out).float()


def fused_forward(model, images: torch.Tensor, *, transfer: str = "fp32", missing: Sequence[int] = ()) -> torch.Tensor:
    """The plain-torch collaborative path of a DeViT: every device's tokens through `transfer`
    (`roundtrip`), zeros for the devices in `missing`, the fusion head. Differentiable for fp32."""
    check_transfer(transfer)
    tokens = [roundtrip(t, transfer) for t in model.forward_tokens(images)]
    for i in missing:
        tokens[i] = torch.zeros_like(tokens[i])
    return model.fusion(tokens)
