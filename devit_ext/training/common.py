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


@torch.no_grad()
def predict(fn, x: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Concatenated fn(batch) over x in batches, on CPU, fp32."""
    outs = []
    for i in range(0, x.shape[0], batch_size):
        with autocast(device):
            outs.append(fn(x[i : i + batch_size].to(device)).float().cpu())
    return torch.cat(outs)
