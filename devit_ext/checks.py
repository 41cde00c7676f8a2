"""Argument checks of every devit op, in one place below both the ops and the kernels.

Each error names the argument and what was expected. The public ops
(devit_ext.ops) and the public Triton launchers (devit_ext.kernels) run these
once, before any launch, so bad input never reaches native code or a kernel;
the kernels' inner launch functions and the C++/CUDA code trust their inputs.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# the dtype codes of csrc/dtype.h (the native module exports the same table as _C.DTYPE_CODES)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
HEAD_DIMS = (16, 32, 64, 128)  # head widths the attention kernel is built for


def is_number(x) -> bool:
    """A real number that is not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def is_int(x) -> bool:
    """An integer that is not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_tensor(name: str, t, *, dtypes=None, min_dim: int = 0, dim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-d tensor, got shape {tuple(t.shape)}")
    if t.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dimension(s), got shape {tuple(t.shape)}")


def check_float(name: str, t, *, min_dim: int = 1) -> None:
    check_tensor(name, t, dtypes=FLOAT_DTYPES, min_dim=min_dim)


def check_same_device(**tensors) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for n, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{n}: expected device {first.device} (the device of {first_name}), got {t.device}")


def check_shape(name: str, t: torch.Tensor, expected: tuple) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)}, got {tuple(t.shape)}")


def check_finite_scalar(name: str, v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a finite float, got {v!r}") from None
    if not math.isfinite(f):
        raise ValueError(f"{name}: expected a finite float, got {f}")
    return f


# ---------------------------------------------------------------- int8 transfer ops
def check_quantize(x) -> None:
    check_float("x", x, min_dim=1)
    if x.shape[-1] < 1:
        raise ValueError(f"x: expected a last dimension of size >= 1, got shape {tuple(x.shape)}")


def check_dequantize(q, scale, dtype) -> None:
    check_tensor("q", q, dtypes=(torch.int8,), min_dim=1)
    if q.shape[-1] < 1:
        raise ValueError(f"q: expected a last dimension of size >= 1, got shape {tuple(q.shape)}")
    check_tensor("scale", scale, dtypes=(torch.float32,))
    check_same_device(q=q, scale=scale)
    check_shape("scale", scale, tuple(q.shape[:-1]))
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")


def check_layernorm(x, weight, bias, eps) -> float:
    """Checks layernorm_quantize_int8's arguments; returns eps as a float."""
    check_quantize(x)
    d = x.shape[-1]
    if weight is not None:
        check_float("weight", weight, min_dim=1)
        check_shape("weight", weight, (d,))
    if bias is not None:
        check_float("bias", bias, min_dim=1)
        check_shape("bias", bias, (d,))
    check_same_device(x=x, weight=weight, bias=bias)
    eps = check_finite_scalar("eps", eps)
    if eps < 0:
        raise ValueError(f"eps: expected a finite float >= 0, got {eps}")
    return eps


# ---------------------------------------------------------------- subvit_attention, ensemble_fusion
@dataclass(frozen=True)
class AttnShape:
    stacked: bool
    B: int
    N: int
    D: int
    heads: tuple[int, ...]  # heads per sub-model
    dtype: torch.dtype
    device: torch.device


def check_attention(qkv, scale) -> tuple[AttnShape, float]:
    """Validate subvit_attention's arguments; returns the shape summary and the scale to use."""
    if isinstance(qkv, torch.Tensor):
        check_tensor("qkv", qkv, dtypes=FLOAT_DTYPES, dim=6)
        M, B, N, three, H, D = qkv.shape
        if three != 3:
            raise ValueError(f"qkv: expected shape (M, B, N, 3, H, D) with 3 at dim 3, got {tuple(qkv.shape)}")
        shape = AttnShape(True, B, N, D, (H,) * M, qkv.dtype, qkv.device)
    elif isinstance(qkv, (list, tuple)):
        if len(qkv) == 0:
            raise ValueError("qkv: expected a non-empty list of (B, N, 3, H_m, D) tensors, got an empty list")
        for i, t in enumerate(qkv):
            check_tensor(f"qkv[{i}]", t, dtypes=FLOAT_DTYPES, dim=5)
            if t.shape[2] != 3:
                raise ValueError(f"qkv[{i}]: expected shape (B, N, 3, H, D) with 3 at dim 2, got {tuple(t.shape)}")
        B, N, _, _, D = qkv[0].shape
        for i, t in enumerate(qkv[1:], 1):
            if (t.shape[0], t.shape[1], t.shape[4]) != (B, N, D):
                raise ValueError(
                    f"qkv[{i}]: expected B, N, D = {(B, N, D)} like qkv[0] (sub-models share batch, tokens and "
                    f"head width), got shape {tuple(t.shape)}"
                )
            if t.dtype != qkv[0].dtype:
                raise TypeError(f"qkv[{i}]: expected dtype {qkv[0].dtype} like qkv[0], got {t.dtype}")
        check_same_device(**{f"qkv[{i}]": t for i, t in enumerate(qkv)})
        shape = AttnShape(False, B, N, D, tuple(t.shape[3] for t in qkv), qkv[0].dtype, qkv[0].device)
    else:
        raise TypeError(f"qkv: expected a tensor (M, B, N, 3, H, D) or a list of (B, N, 3, H_m, D), got {type(qkv).__name__}")
    if shape.N < 1:
        raise ValueError(f"qkv: expected N (tokens) >= 1, got N = {shape.N}")
    if shape.D not in HEAD_DIMS:
        raise ValueError(f"qkv: expected head width D in {HEAD_DIMS}, got D = {shape.D}")
    if any(h < 1 for h in shape.heads):
        raise ValueError(f"qkv: expected at least one head per sub-model, got heads {list(shape.heads)}")
    if scale is None:
        s = 1.0 / math.sqrt(shape.D)
    else:
        s = check_finite_scalar("scale", scale)
        if s <= 0:
            raise ValueError(f"scale: expected a positive float, got {s}")
    return shape, s


@dataclass(frozen=True)
class FusionShape:
    B: int
    K: int
    T: int
    C: int
    widths: tuple[int, ...]


def check_fusion(q, scales, widths, map_weight, map_bias, cls_weight, cls_bias) -> FusionShape:
    """Validate ensemble_fusion's arguments (see devit_ext.ops.reference.ensemble_fusion)."""
    check_tensor("q", q, dtypes=(torch.int8,), dim=2)
    B, K = q.shape
    if isinstance(widths, torch.Tensor):
        widths = widths.tolist()
    try:
        w = tuple(widths)
    except TypeError:
        raise TypeError(f"widths: expected a sequence of ints (one token width per device), got {widths!r}") from None
    if not all(is_int(x) for x in w):  # never truncate 1.5 to 1
        raise TypeError(f"widths: expected a sequence of ints (one token width per device), got {list(w)!r}")
    w = tuple(int(x) for x in w)
    if B < 1:
        raise ValueError(f"q: expected a batch of at least one image (B, sum widths), got shape {tuple(q.shape)}")
    if len(w) == 0 or any(x < 1 for x in w):
        raise ValueError(f"widths: expected one or more positive token widths, got {list(w)}")
    if sum(w) != K:
        raise ValueError(f"widths: expected widths summing to q.shape[1] = {K}, got {list(w)} (sum {sum(w)})")
    check_tensor("scales", scales, dtypes=(torch.float32,), dim=2)
    check_shape("scales", scales, (B, len(w)))
    check_tensor("map_weight", map_weight, dtypes=FLOAT_DTYPES, dim=2)
    T = map_weight.shape[0]
    check_shape("map_weight", map_weight, (T, K))
    check_tensor("cls_weight", cls_weight, dtypes=(map_weight.dtype,), dim=2)
    C = cls_weight.shape[0]
    check_shape("cls_weight", cls_weight, (C, T))
    if T < 1 or C < 1:
        raise ValueError(f"map_weight/cls_weight: expected d_T >= 1 and C >= 1, got d_T = {T}, C = {C}")
    if map_bias is not None:
        check_tensor("map_bias", map_bias, dtypes=FLOAT_DTYPES, dim=1)
        check_shape("map_bias", map_bias, (T,))
    if cls_bias is not None:
        check_tensor("cls_bias", cls_bias, dtypes=FLOAT_DTYPES, dim=1)
        check_shape("cls_bias", cls_bias, (C,))
    check_same_device(q=q, scales=scales, map_weight=map_weight, map_bias=map_bias, cls_weight=cls_weight, cls_bias=cls_bias)
    return FusionShape(B, K, T, C, w)
