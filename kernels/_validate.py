"""Argument checks of subvit_attention and ensemble_fusion (no triton needed).

Shared by the Triton launchers and the ops in devit_ext.ops so that every path
rejects the same bad input, with an error naming the argument, before any launch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from devit_ext.ops._checks import FLOAT_DTYPES, check_finite_scalar, check_same_device, check_shape, check_tensor

HEAD_DIMS = (16, 32, 64, 128)


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
        w = tuple(int(x) for x in widths)
    except TypeError:
        raise TypeError(f"widths: expected a sequence of ints (one token width per device), got {widths!r}") from None
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


def wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(
        t is not None and isinstance(t, torch.Tensor) and t.requires_grad for t in tensors
    )


def flat(xs: Sequence) -> list:
    out = []
    for x in xs:
        out.extend(x if isinstance(x, (list, tuple)) else [x])
    return out
