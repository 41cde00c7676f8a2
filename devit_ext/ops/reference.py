"""Pure-torch reference of every devit op: the one oracle.

Tests compare each kernel (C++, CUDA, Triton) against these functions, never
against another kernel; benchmarks time them as the baseline; the ops layer
falls back to them when the native module or Triton is missing (and
`devit_ext.build_info()` says so).

Numerics are defined here:
- int8 quantisation is per-row symmetric over the last dimension:
  scale = max|row| / 127 (fp32), q = round_half_even(x / scale) clamped to
  [-127, 127]. A row whose scale is 0 (all zeros, or so tiny that the scale
  underflows) gives q = 0 and scale = 0: no NaN, no Inf. Kernels do the same
  fp32 division so that they match bit for bit on fp32 inputs.
- Non-finite rows propagate, they are never hidden: a row holding a NaN has
  scale NaN, a row holding an Inf (and no NaN) has scale Inf, and both have
  q = 0, so that dequantisation gives NaN (0 * NaN, 0 * Inf) for the whole row.
  A kernel that skipped NaN in its max would turn such a row into a finite
  wrong token.
- Everything is computed in fp32 whatever the input dtype.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

Q_MAX = 127.0


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) float -> q int8 (..., D), scale float32 (...)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / Q_MAX  # amax propagates NaN
    ok = (scale > 0) & torch.isfinite(scale)  # zero, NaN and Inf rows get q = 0
    safe = torch.where(ok, scale, torch.ones_like(scale))
    q = torch.round(xf / safe.unsqueeze(-1)).clamp_(-Q_MAX, Q_MAX)
    q = torch.where(ok.unsqueeze(-1), q, torch.zeros_like(q))
    return q.to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q int8 (..., D), scale float32 (...) -> x_hat (..., D) in `dtype`."""
    return (q.float() * scale.float().unsqueeze(-1)).to(dtype)


def layernorm_quantize_int8(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dimension (fp32 math), then quantize_int8."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    y = F.layer_norm(x.float(), (x.shape[-1],), w, b, eps)
    return quantize_int8(y)


def subvit_attention(qkv: torch.Tensor | Sequence[torch.Tensor], scale: float | None = None):
    """softmax(Q K^T * scale) V for every (sub-model, image, head).

    Stacked form: qkv (M, B, N, 3, H, D) -> (M, B, N, H*D).
    List form: M tensors (B, N, 3, H_m, D) -> list of (B, N, H_m*D).
    Computed with torch SDPA in the input's dtype (pass fp32 for the oracle).
    """
    if isinstance(qkv, (list, tuple)):
        return [subvit_attention(t.unsqueeze(0), scale)[0] for t in qkv]
    M, B, N, three, H, D = qkv.shape
    # Views, not copies: (M, B, N, 3, H, D) -> 3 x (M*B, H, N, D) strided; SDPA reads strides.
    x = qkv.reshape(M * B, N, 3, H, D)
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
    o = F.scaled_dot_product_attention(q, k, v, scale=scale)
    # (M*B, H, N, D) -> (M, B, N, H*D)
    return o.transpose(1, 2).reshape(M, B, N, H * D)


def ensemble_fusion(
    q: torch.Tensor,
    scales: torch.Tensor,
    widths: Sequence[int],
    map_weight: torch.Tensor,
    map_bias: torch.Tensor | None,
    cls_weight: torch.Tensor,
    cls_bias: torch.Tensor | None,
) -> torch.Tensor:
    """Aggregator head: dequantise M int8 tokens laid side by side, linear map, classifier.

    q int8 (B, sum widths), scales float32 (B, M) -> logits float32 (B, C), fp32 math.
    """
    w = torch.as_tensor(list(widths), device=q.device)
    x = q.float() * scales.float().repeat_interleave(w, dim=1)
    h = F.linear(x, map_weight.float(), None if map_bias is None else map_bias.float())
    return F.linear(h, cls_weight.float(), None if cls_bias is None else cls_bias.float())
