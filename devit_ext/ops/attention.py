"""devit::subvit_attention: attention of all sub-models in one call.

- `subvit_attention(qkv, scale=None)`: qkv (M, B, N, 3, H, D) -> (M, B, N, H*D)
  (stacked homogeneous sub-models; a strided view of the QKV linear output is
  read without a copy), or a list of M tensors (B, N, 3, H_m, D) -> list of
  (B, N, H_m*D) (heterogeneous). scale defaults to 1/sqrt(D).
- CUDA tensors: the Triton kernel (devit_ext.kernels), one launch for all
  sub-models. CPU tensors: the reference (torch SDPA). `dispatch.fused_path`
  picks; `devit_ext.checks.check_attention` checks, once per call on the eager
  path, and the kernel's launch trusts it.
- Gradients: the op is a forward kernel; its registered backward recomputes the
  reference (torch SDPA) with autograd and differentiates that. Training thus
  uses the reference path's numerics for gradients (documented, not hidden).
- Two custom ops, `devit::subvit_attention` (Tensor) and
  `devit::subvit_attention_list` (Tensor[]), both with fake kernels, so
  torch.compile and torch.export see them as single nodes.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..checks import check_attention
from . import reference
from .dispatch import eager_ok, fused_path


# Stacked-form layouts already checked and planned for the Triton path: (shape, strides, dtype, device,
# scale) -> the kernel's StackedLaunch. The key holds everything check_attention and the dispatch read,
# so a hit skips both (the batch-1 host path, issue 12). `clear_plans()` empties it.
_LAUNCHES: dict = {}


def clear_plans() -> None:
    """Forget the cached stacked-form launches (after changing what the dispatch answers, as the host bench does)."""
    _LAUNCHES.clear()


def _run(qkv, scale: Optional[float]):
    """Checks (`devit_ext.checks`, once) and device dispatch, shared by both ops and the eager path."""
    key = None
    if type(qkv) is torch.Tensor:  # plain tensors only: a subclass may carry what the key does not see
        key = (qkv.shape, qkv.stride(), qkv.dtype, qkv.device, scale)
        hit = _LAUNCHES.get(key)
        if hit is not None:
            return hit(qkv)
    shape, s = check_attention(qkv, scale)
    if fused_path(shape.device) == "triton":
        from devit_ext import kernels

        if key is not None and qkv.stride(-1) == 1:
            plan = _LAUNCHES[key] = kernels.stacked_attention_launch(shape, qkv.stride(), s)
            if len(_LAUNCHES) > 256:
                _LAUNCHES.pop(next(iter(_LAUNCHES)))
            return plan(qkv)
        return kernels.launch_subvit_attention(qkv, shape, s)  # trusts its (checked) inputs
    scale = None if scale is None else s
    if isinstance(qkv, torch.Tensor):
        return reference.subvit_attention(qkv, scale).contiguous()
    return [o.contiguous() for o in reference.subvit_attention(list(qkv), scale)]


@torch.library.custom_op("devit::subvit_attention", mutates_args=())
def _subvit_attention_op(qkv: torch.Tensor, scale: Optional[float]) -> torch.Tensor:
    return _run(qkv, scale)


@_subvit_attention_op.register_fake
def _(qkv, scale):
    M, B, N, _, H, D = qkv.shape
    return qkv.new_empty((M, B, N, H * D))


@torch.library.custom_op("devit::subvit_attention_list", mutates_args=())
def _subvit_attention_list_op(qkv: list[torch.Tensor], scale: Optional[float]) -> list[torch.Tensor]:
    return _run(list(qkv), scale)


@_subvit_attention_list_op.register_fake
def _(qkv, scale):
    return [t.new_empty((t.shape[0], t.shape[1], t.shape[3] * t.shape[4])) for t in qkv]


# Autograd: recompute the reference with autograd and differentiate it.
def _setup(ctx, inputs, output):
    qkv, scale = inputs
    ctx.scale = scale
    if isinstance(qkv, torch.Tensor):
        ctx.save_for_backward(qkv)
    else:
        ctx.save_for_backward(*qkv)


def _backward(ctx, grad):
    with torch.enable_grad():
        xs = [t.detach().requires_grad_(True) for t in ctx.saved_tensors]
        if len(xs) == 1 and not isinstance(grad, (list, tuple)):
            ys, gs = [reference.subvit_attention(xs[0], ctx.scale)], [grad]
        else:
            ys, gs = reference.subvit_attention(xs, ctx.scale), list(grad)
        pairs = [(y, g) for y, g in zip(ys, gs) if g is not None]
        grads = torch.autograd.grad([y for y, _ in pairs], xs, [g for _, g in pairs], allow_unused=True)
    if len(xs) == 1 and not isinstance(grad, (list, tuple)):
        return grads[0], None
    return list(grads), None


_subvit_attention_op.register_autograd(_backward, setup_context=_setup)
_subvit_attention_list_op.register_autograd(_backward, setup_context=_setup)


def subvit_attention(qkv: torch.Tensor | Sequence[torch.Tensor], scale: float | None = None):
    """softmax(Q K^T * scale) V for all sub-models at once (see the module docstring).

    Raises ValueError/TypeError naming the argument on bad input (wrong rank or dtype,
    N < 1, D not in (16, 32, 64, 128), mismatched sub-models, non-positive scale).
    """
    tensors = [qkv] if isinstance(qkv, torch.Tensor) else list(qkv) if isinstance(qkv, (list, tuple)) else [qkv]
    if eager_ok(*tensors):
        return _run(qkv if isinstance(qkv, torch.Tensor) else list(qkv), scale)  # checks once
    # through torch.ops (compile, export, autograd): check here so the error names the argument
    # before tracing; the op body checks again for callers of torch.ops.devit.* itself
    _, s = check_attention(qkv, scale)
    scale = None if scale is None else s
    if isinstance(qkv, torch.Tensor):
        return _subvit_attention_op(qkv, scale)
    return _subvit_attention_list_op(list(qkv), scale)
