"""Small helpers shared by the trainers (DEKD, teacher): device, autocast, seeding, shifts, schedule.

All randomness of a training run comes from generators seeded by
(seed, stage, epoch), so an epoch replays exactly, which is what makes resume
exact without saving iterator state.
"""
from __future__ import annotations

import contextlib
import math
import random

import numpy as np
import torch
import torch.nn.functional as F

from ..checks import is_int, is_number


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available")
    return dev


def autocast(device: torch.device):
    """bf16 autocast on GPU, nothing on CPU (fp32 keeps CPU runs exact and fast enough)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def generator(seed: int, *salt: int) -> torch.Generator:
    """A CPU generator seeded from (seed, salt...) deterministically."""
    s = int(seed) & 0xFFFFFFFF
    for v in salt:
        s = (s * 1_000_003 + int(v) + 1) & 0x7FFFFFFFFFFFFFFF
    return torch.Generator().manual_seed(s)


def seed_everything(seed: int, *salt: int) -> None:
    """Seed torch, numpy and `random` from (seed, salt...): the RNGs that transforms, timm's Mixup and
    RandomErasing draw from in the main process, so an epoch replays the same on resume."""
    s = int(generator(seed, *salt).initial_seed())
    torch.manual_seed(s)
    np.random.seed(s & 0xFFFFFFFF)
    random.seed(s)


def random_shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Shift each image by up to +-max_shift pixels in x and y (edge pixels replicated)."""
    if max_shift <= 0:
        return x
    B, C, H, W = x.shape
    off = torch.randint(0, 2 * max_shift + 1, (2, B), generator=g).to(x.device)
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    rows = off[0][:, None] + torch.arange(H, device=x.device)[None]  # (B, H)
    cols = off[1][:, None] + torch.arange(W, device=x.device)[None]  # (B, W)
    b = torch.arange(B, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def cosine_lr(step: int, total: int, warmup: int, base: float, min_ratio: float = 0.01) -> float:
    """Linear warm-up for `warmup` steps, then cosine decay to base * min_ratio at `total`."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def param_groups(modules, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms, tokens and position embeddings."""
    decay, no_decay, seen = [], [], set()
    for m in modules:
        for n, p in m.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if p.dim() <= 1 or n.endswith(("cls_token", "dist_token", "pos_embed")) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def real(name: str, v, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
         hi_open: bool = False) -> float:
    """`v` as a float, refused (naming `name`) unless finite and within [lo, hi] (open ends when asked)."""
    if not is_number(v) or not math.isfinite(float(v)):
        raise ValueError(f"{name}: expected a finite number, got {v!r}")
    v = float(v)
    if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and (v > hi or (hi_open and v == hi))):
        lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
        hi_s = "" if hi is None else f"{'<' if hi_open else '<='} {hi}"
        raise ValueError(f"{name}: expected a number {' and '.join(x for x in (lo_s, hi_s) if x)}, got {v!r}")
    return v


def count(name: str, v, *, lo: int = 0) -> int:
    """`v` as an int >= lo, refused (naming `name`) otherwise; bools and floats are not counts."""
    if not is_int(v) or int(v) < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    return int(v)
