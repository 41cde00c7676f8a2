"""Argument checks shared by the ops: each error names the argument and what was expected.

They run before any kernel launch, so bad input never reaches native code.
"""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
