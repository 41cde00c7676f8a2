"""devit::ensemble_fusion: the aggregator's head (dequantise + concat + map + classifier).

    ensemble_fusion(q, scales, widths, map_weight, map_bias, cls_weight, cls_bias) -> logits fp32 (B, C)

q int8 (B, sum widths): the M device tokens side by side; scales fp32 (B, M);
widths: the M token widths; weights as nn.Linear stores them (bf16/fp16/fp32).

- CUDA tensors: one Triton kernel (devit_ext.kernels.ensemble_fusion).
- CPU tensors: dequantise each device's slice with the dequantize_int8 kernel
  (the C++ kernel when built; the reference otherwise, as `dispatch` says),
  concatenate, two fp32 matmuls (torch). Same numerics as the reference.
- Arguments are checked once by `devit_ext.checks.check_fusion`; the Triton
  launch and the dequantise run trust them.
- Gradients (for the float inputs: weights, biases, scales): the registered
  backward recomputes the reference with autograd; q (int8) has no gradient.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..checks import check_fusion
from . import reference
from .dispatch import eager_ok, fused_path
from .quant import _dequantize_run


def _cpu(q, scales, widths, map_weight, map_bias, cls_weight, cls_bias):
    B, M = scales.shape
    if len(set(widths)) == 1:  # homogeneous: one call over (B, M, w)
        x = _dequantize_run(q.reshape(B, M, widths[0]), scales, torch.float32).reshape(B, -1)
    else:
        parts = torch.split(q, list(widths), dim=1)
        x = torch.cat([_dequantize_run(p, scales[:, m], torch.float32) for m, p in enumerate(parts)], dim=1)
    h = F.linear(x, map_weight.float(), None if map_bias is None else map_bias.float())
    return F.linear(h, cls_weight.float(), None if cls_bias is None else cls_bias.float())


def _run(q, scales, widths, map_weight, map_bias, cls_weight, cls_bias):
    """Checks (`devit_ext.checks`, once) and device dispatch, shared by the op and the eager path."""
    shp = check_fusion(q, scales, widths, map_weight, map_bias, cls_weight, cls_bias)
    if fused_path(q.device) == "triton":
        from devit_ext import kernels

        return kernels.launch_ensemble_fusion(q, scales, shp, map_weight, map_bias, cls_weight, cls_bias)
    return _cpu(q, scales, shp.widths, map_weight, map_bias, cls_weight, cls_bias)


@torch.library.custom_op("devit::ensemble_fusion", mutates_args=())
def _ensemble_fusion_op(
    q: torch.Tensor,
    scales: torch.Tensor,
    widths: list[int],
    map_weight: torch.Tensor,
    map_bias: Optional[torch.Tensor],
    cls_weight: torch.Tensor,
    cls_bias: Optional[torch.Tensor],
) -> torch.Tensor:
    return _run(q, scales, list(widths), map_weight, map_bias, cls_weight, cls_bias)


@_ensemble_fusion_op.register_fake
def _(q, scales, widths, map_weight, map_bias, cls_weight, cls_bias):
    return q.new_empty((q.shape[0], cls_weight.shape[0]), dtype=torch.float32)


def _setup(ctx, inputs, output):
    q, scales, widths, map_weight, map_bias, cls_weight, cls_bias = inputs
    ctx.widths = list(widths)
    ctx.has = (map_bias is not None, cls_bias is not None)
    ctx.save_for_backward(q, scales, map_weight, map_bias, cls_weight, cls_bias)


def _backward(ctx, grad):
    q, scales, w1, b1, w2, b2 = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_(True) for t in (scales, w1, b1, w2, b2)]
        y = reference.ensemble_fusion(q, leaves[0], ctx.widths, *leaves[1:])
        live = [t for t in leaves if t is not None]
        gs = iter(torch.autograd.grad(y, live, grad, allow_unused=True))
        out = [None if t is None else next(gs) for t in leaves]
    return None, out[0], None, out[1], out[2], out[3], out[4]


_ensemble_fusion_op.register_autograd(_backward, setup_context=_setup)


def ensemble_fusion(
    q: torch.Tensor,
    scales: torch.Tensor,
    widths: Sequence[int],
    map_weight: torch.Tensor,
    map_bias: torch.Tensor | None,
    cls_weight: torch.Tensor,
    cls_bias: torch.Tensor | None,
) -> torch.Tensor:
    """Aggregator head in one op (see the module docstring). Bad input (q not int8, widths not
    summing to q's width, scales not (B, M) fp32, mismatched weight shapes or dtypes, mixed
    devices) raises ValueError/TypeError naming the argument, before any launch."""
    if eager_ok(q, scales, map_weight, map_bias, cls_weight, cls_bias):
        return _run(q, scales, widths, map_weight, map_bias, cls_weight, cls_bias)  # checks once
    # through torch.ops (compile, export, autograd, nn.Parameter weights): check here so the error
    # names the argument and widths is a list of ints for the schema; the op body checks again
    # for callers of torch.ops.devit.* itself
    shp = check_fusion(q, scales, widths, map_weight, map_bias, cls_weight, cls_bias)
    return _ensemble_fusion_op(q, scales, list(shp.widths), map_weight, map_bias, cls_weight, cls_bias)
