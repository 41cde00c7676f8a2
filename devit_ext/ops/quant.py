"""int8 feature transfer: quantize_int8, dequantize_int8, layernorm_quantize_int8.

Each is a `torch.library` custom op in the `devit` namespace with a fake
kernel (so torch.compile / torch.export trace through it). The real kernel picks
its path by device:

- CUDA tensors: the CUDA kernels of devit_ext._C, launched on the current
  stream (one launch for all rows);
- CPU tensors: the C++ / OpenMP kernels of devit_ext._C, with torch's
  intra-op thread count;
- anything else, or when the native module (or its CUDA part) is missing: the
  pure-torch reference (`devit_ext.build_info()` says which path is taken).

Numerics are those of `reference.py`: quantize matches it bit for bit,
layernorm_quantize up to the rounding of the LayerNorm itself.
Inputs: fp32 / fp16 / bf16, any leading dims, last dim >= 1, any strides (a
view is passed with its strides when the leading dims collapse, else copied).

Eager fast path: a Python custom op costs ~15-30 us of dispatch per call, as
much as the CPU kernel itself on a 1,024 x 192 token batch. The public
functions therefore call the op's implementation directly when nothing could
observe the difference: plain tensors, no grad required, not compiling or
tracing, no dispatch / function mode, no functorch transform, profiler off.
Otherwise (torch.compile, export, opcheck, FakeTensor, profiling, autograd)
they go through `torch.ops.devit.*`. Both run the same function.
"""
# No `from __future__ import annotations`: torch.library infers op schemas from
# real annotation objects.
from typing import Optional, Tuple

import torch

from .. import _build
from ..checks import DTYPE_CODES as _CODES
from ..checks import check_dequantize, check_layernorm, check_quantize
from . import reference
from .dispatch import eager_ok as _eager_ok
from .dispatch import quant_path as _path

__all__ = ["quantize_int8", "dequantize_int8", "layernorm_quantize_int8"]

# ---------------------------------------------------------------- helpers
def _rows(t: torch.Tensor) -> torch.Tensor:
    """t (..., D) as a 2-d (R, D) tensor: a view when possible, else a contiguous copy."""
    d = t.shape[-1]
    try:
        return t.view(-1, d)
    except RuntimeError:
        return t.reshape(-1, d)


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _param(t: Optional[torch.Tensor]) -> Tuple[int, int, int]:
    """(pointer, dtype code, stride) of an optional 1-d parameter; (0, 0, 0) when absent."""
    if t is None:
        return 0, 0, 0
    return t.data_ptr(), _CODES[t.dtype], t.stride(0)


def _quant_outputs(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty q (int8, x's shape) and scale (fp32, x.shape[:-1]), and x as 2-d rows for the kernels."""
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    return q, scale, _rows(x)


# ---------------------------------------------------------------- quantize_int8
def _quantize_run(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    path = _path(x.device)
    if path == "reference":
        return reference.quantize_int8(x)
    q, scale, x2 = _quant_outputs(x)
    rows, cols = x2.shape
    if rows == 0:
        return q, scale
    mod = _build.native()
    if path == "cuda":
        mod.quantize_int8_cuda(
            x2.data_ptr(), _CODES[x.dtype], rows, cols, x2.stride(0), x2.stride(1),
            q.data_ptr(), scale.data_ptr(), x.device.index, _stream(x.device),
        )
    else:
        mod.quantize_int8_cpu(
            x2.data_ptr(), _CODES[x.dtype], rows, cols, x2.stride(0), x2.stride(1),
            q.data_ptr(), scale.data_ptr(), torch.get_num_threads(),
        )
    return q, scale


@torch.library.custom_op("devit::quantize_int8", mutates_args=())
def _quantize_op(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    check_quantize(x)
    return _quantize_run(x)


@_quantize_op.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


# ---------------------------------------------------------------- dequantize_int8
def _dequantize_run(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    path = _path(q.device)
    if path == "reference":
        return reference.dequantize_int8(q, scale, dtype)
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    q2 = _rows(q)
    rows, cols = q2.shape
    if rows == 0:
        return out
    s1 = scale.reshape(-1)  # a view unless scale's dims don't collapse (then a tiny copy)
    mod = _build.native()
    if path == "cuda":
        mod.dequantize_int8_cuda(
            q2.data_ptr(), rows, cols, q2.stride(0), q2.stride(1), s1.data_ptr(), s1.stride(0),
            out.data_ptr(), _CODES[dtype], q.device.index, _stream(q.device),
        )
    else:
        mod.dequantize_int8_cpu(
            q2.data_ptr(), rows, cols, q2.stride(0), q2.stride(1), s1.data_ptr(), s1.stride(0),
            out.data_ptr(), _CODES[dtype], torch.get_num_threads(),
        )
    return out


@torch.library.custom_op("devit::dequantize_int8", mutates_args=())
def _dequantize_op(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    check_dequantize(q, scale, dtype)
    return _dequantize_run(q, scale, dtype)


@_dequantize_op.register_fake
def _(q, scale, dtype):
    return q.new_empty(q.shape, dtype=dtype)


def _dequantize_setup(ctx, inputs, output):
    q, scale, dtype = inputs
    ctx.save_for_backward(q)
    ctx.scale_dtype = scale.dtype


def _dequantize_backward(ctx, grad):
    # x_hat = q * scale[..., None]: d/d scale = sum(grad * q, -1); q is integer (no grad).
    (q,) = ctx.saved_tensors
    grad_scale = None
    if ctx.needs_input_grad[1]:
        grad_scale = (grad.float() * q.float()).sum(-1).to(ctx.scale_dtype)
    return None, grad_scale, None


_dequantize_op.register_autograd(_dequantize_backward, setup_context=_dequantize_setup)


# ---------------------------------------------------------------- layernorm_quantize_int8
def _layernorm_quantize_run(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    path = _path(x.device)
    if path == "reference":
        return reference.layernorm_quantize_int8(x, weight, bias, eps)
    q, scale, x2 = _quant_outputs(x)
    rows, cols = x2.shape
    if rows == 0:
        return q, scale
    wp, wd, ws = _param(weight)
    bp, bd, bs = _param(bias)
    mod = _build.native()
    if path == "cuda":
        mod.layernorm_quantize_int8_cuda(
            x2.data_ptr(), _CODES[x.dtype], rows, cols, x2.stride(0), x2.stride(1),
            wp, wd, ws, bp, bd, bs, eps, q.data_ptr(), scale.data_ptr(), x.device.index, _stream(x.device),
        )
    else:
        mod.layernorm_quantize_int8_cpu(
            x2.data_ptr(), _CODES[x.dtype], rows, cols, x2.stride(0), x2.stride(1),
            wp, wd, ws, bp, bd, bs, eps, q.data_ptr(), scale.data_ptr(), torch.get_num_threads(),
        )
    return q, scale


@torch.library.custom_op("devit::layernorm_quantize_int8", mutates_args=())
def _layernorm_quantize_op(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    eps = check_layernorm(x, weight, bias, eps)
    return _layernorm_quantize_run(x, weight, bias, eps)


@_layernorm_quantize_op.register_fake
def _(x, weight, bias, eps):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


# ---------------------------------------------------------------- public, typed API
def quantize_int8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 over the last dimension.

    x (..., D) float32/float16/bfloat16 -> (q int8 (..., D) in [-127, 127],
    scale float32 (...) = max|row| / 127). An all-zero row gives scale 0, q 0.
    """
    check_quantize(x)
    if _eager_ok(x):
        return _quantize_run(x)
    return torch.ops.devit.quantize_int8(x)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q int8 (..., D), scale float32 (...) -> q * scale[..., None] (fp32 math) in `dtype`."""
    check_dequantize(q, scale, dtype)
    if _eager_ok(q, scale):
        return _dequantize_run(q, scale, dtype)
    return torch.ops.devit.dequantize_int8(q, scale, dtype)


def layernorm_quantize_int8(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dimension (fp32 math) fused with quantize_int8, one pass over memory.

    The sender side of a device: final norm of the class token, then int8.
    weight / bias: (D,) float tensors or None (then 1 / 0).
    """
    eps = check_layernorm(x, weight, bias, eps)
    if _eager_ok(x, weight, bias):
        return _layernorm_quantize_run(x, weight, bias, eps)
    return torch.ops.devit.layernorm_quantize_int8(x, weight, bias, eps)

