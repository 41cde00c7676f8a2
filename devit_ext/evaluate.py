"""The one evaluation path: accuracies and latency, for the demo, the CLI and the tests.

- `accuracy(model, data, ...)`: top-1 accuracy of a DeViT (the fused path with
  tokens sent as `transfer`, devices in `missing` replaced by zeros, or an
  engine through `collaborate`) or of any classifier (a teacher, one
  sub-model).
- `local_accuracy(model, data, ...)`: each device's sub-model on the images of
  its own classes, labels mapped to its local class index.
- `latency_ms(fn, x, repeats)`: median wall time of fn(x).

`data` is a torch Dataset of (image, label), iterated through a DataLoader
(shuffle off) so a data set never has to fit in memory, or tensors already in
memory: an (images, labels) pair or an object with `.images` and `.labels`
(devit_ext.data sets), sliced in batches. Accepted transfers are
`protocol.TRANSFERS` on every path. The trainers keep their own validation in
the training layer; nothing below this module imports it.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn

from . import _trainutil as U
from . import protocol
from .model import DeViT


def batches(data, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches of `data` in order (see the module docstring)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    x = y = None
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
    elif isinstance(getattr(data, "images", None), torch.Tensor) and isinstance(getattr(data, "labels", None), torch.Tensor):
        x, y = data.images, data.labels
    if x is not None:
        if x.dim() != 4 or y.dim() != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"data: expected images (N, C, H, W) and labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.shape[0] == 0:
            raise ValueError("data: the data set is empty")
        for i in range(0, x.shape[0], batch_size):
            yield x[i : i + batch_size], y[i : i + batch_size]
        return
    if not isinstance(data, torch.utils.data.Dataset):
        raise TypeError(f"data: expected a torch Dataset of (image, label), an (images, labels) pair or a "
                        f"devit_ext.data set, got {type(data).__name__}")
    seen = 0
    for xb, yb in torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False):
        seen += len(yb)
        yield xb, torch.as_tensor(yb)
    if seen == 0:
        raise ValueError("data: the data set is empty")


def _device(model: nn.Module, device) -> torch.device:
    if device is not None:
        return U.resolve_device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _forward(model, *, transfer, missing, engine) -> Callable[[torch.Tensor], torch.Tensor]:
    if not isinstance(model, DeViT):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a devit_ext.DeViT or a torch classifier, got {type(model).__name__}")
        if transfer is not None or missing or engine is not None:
            raise ValueError("transfer/missing/engine: only for a devit_ext.DeViT, got a "
                             f"{type(model).__name__}")
        return model
    transfer = protocol.check_transfer("fp32" if transfer is None else transfer)
    bad = [i for i in missing if not (isinstance(i, int) and 0 <= i < model.num_devices)]
    if bad:
        raise ValueError(f"missing: device indices in 0..{model.num_devices - 1} expected, got {list(missing)}")
    if engine is None:
        return lambda x: protocol.fused_forward(model, x, transfer=transfer, missing=missing)
    if missing:
        raise ValueError("missing: not with an engine (engines answer without a device only when it fails, "
                         "with degrade=True)")
    from .engines import collaborate

    return lambda x: collaborate(model, x, engine=engine, transfer=transfer)


@torch.no_grad()
def accuracy(model: nn.Module, data, *, transfer: str | None = None, missing: Sequence[int] = (),
             engine: str | None = None, batch_size: int = 500, device=None) -> float:
    """Top-1 accuracy of `model` on `data`.

    model: a DeViT (fused path; `transfer` "int8" | "fp16" | "fp32", default
    "fp32"; `missing` device indices sent as zeros; `engine` "local" |
    "distributed" to go through `collaborate` instead) or any classifier
    module (then transfer, missing and engine stay unset). device: where the
    batches go (default: the model's device); the model is not moved.
    """
    fn = _forward(model, transfer=transfer, missing=tuple(missing), engine=engine)
    dev = _device(model, device)
    was = model.training
    model.eval()
    correct = seen = 0
    try:
        for xb, yb in batches(data, batch_size):
            with U.autocast(dev):
                logits = fn(xb.to(dev))
            if isinstance(logits, tuple):  # a distilled timm teacher in training mode answers (cls, dist)
                logits = (logits[0] + logits[1]) / 2
            correct += int((logits.float().argmax(-1).cpu() == yb.long()).sum())
            seen += len(yb)
    finally:
        model.train(was)
    return correct / seen


@torch.no_grad()
def local_accuracy(model: DeViT, data, *, batch_size: int = 500, device=None) -> list[float]:
    """Each device's sub-model on the images of its own class group (local labels); one pass over `data`."""
    if not isinstance(model, DeViT):
        raise TypeError(f"model: expected a devit_ext.DeViT, got {type(model).__name__}")
    dev = _device(model, device)
    owner = torch.full((model.num_classes,), -1, dtype=torch.long)
    local = torch.zeros(model.num_classes, dtype=torch.long)
    for i, g in enumerate(model.class_groups):
        owner[g] = i
        local[g] = torch.arange(len(g))
    correct = [0] * model.num_devices
    seen = [0] * model.num_devices
    was = model.training
    model.eval()
    try:
        for xb, yb in batches(data, batch_size):
            yb = yb.long()
            for i, m in enumerate(model.submodels):
                keep = owner[yb] == i
                if not bool(keep.any()):
                    continue
                with U.autocast(dev):
                    z = m(xb[keep].to(dev))
                correct[i] += int((z.float().argmax(-1).cpu() == local[yb[keep]]).sum())
                seen[i] += int(keep.sum())
    finally:
        model.train(was)
    return [c / s if s else float("nan") for c, s in zip(correct, seen)]


def latency_ms(fn: Callable, x, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of fn(x) over `repeats` timed calls after `warmup` untimed ones, no grad."""
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)
