"""Small helpers shared by the trainers (DEKD, teacher): data as tensors, checks, augmentation, schedule.

All randomness of a training run comes from generators seeded by
(seed, stage, epoch), so an epoch replays exactly, which is what makes resume
exact without saving iterator state.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

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


def as_tensors(name: str, data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A Dataset of (image, int label), a DataLoader over one, or an (images, labels) pair -> two tensors.

    Uses `.images`/`.labels` (devit_ext.data) or `.tensors` (TensorDataset) when
    present; otherwise iterates the dataset once. Errors name `name`.
    """
    if data is None:
        raise ValueError(f"{name}: is None; expected a Dataset of (image, label) or a DataLoader over one")
    if isinstance(data, torch.utils.data.DataLoader):
        data = data.dataset
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
    elif hasattr(data, "images") and hasattr(data, "labels"):
        x, y = data.images, data.labels
    elif isinstance(data, torch.utils.data.TensorDataset) and len(data.tensors) >= 2:
        x, y = data.tensors[0], data.tensors[1]
    else:
        try:
            n = len(data)
        except TypeError:
            raise TypeError(f"{name}: expected a Dataset with a length, got {type(data).__name__}") from None
        if n == 0:
            raise ValueError(f"{name}: the data set is empty")
        xs, ys = [], []
        for i in range(n):
            item = data[i]
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise TypeError(f"{name}: items must be (image tensor, int label), got {type(item).__name__}")
            xs.append(torch.as_tensor(item[0]))
            ys.append(int(item[1]))
        x, y = torch.stack(xs), torch.tensor(ys)
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"{name}: images and labels must be tensors")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: the data set is empty")
    if x.dim() != 4:
        raise ValueError(f"{name}: images must be (C, H, W) each, got a batch of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: images must be float (normalised), got {x.dtype}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: {x.shape[0]} images but labels of shape {tuple(y.shape)}")
    if y.is_floating_point():
        raise TypeError(f"{name}: labels must be integers, got {y.dtype}")
    return x.float(), y.long()


def check_data(name: str, x: torch.Tensor, y: torch.Tensor, *, num_classes: int, image_shape, who: str) -> None:
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name}: label {bad} out of range [0, {num_classes}) ({who} has {num_classes} classes)")
    want = tuple(int(v) for v in image_shape)
    got = tuple(x.shape[1:])
    if got != want:
        raise ValueError(
            f"{name}: images are {'x'.join(map(str, got))} but {who} expects {'x'.join(map(str, want))} (C x H x W)"
        )
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: images contain NaN or Inf")


def generator(seed: int, *salt: int) -> torch.Generator:
    """A CPU generator seeded from (seed, salt...) deterministically."""
    s = int(seed) & 0xFFFFFFFF
    for v in salt:
        s = (s * 1_000_003 + int(v) + 1) & 0x7FFFFFFFFFFFFFFF
    return torch.Generator().manual_seed(s)


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
