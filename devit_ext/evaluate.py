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

from . import protocol
from .model import DeViT
from .training import common as U
from .training.sampling import sequential
from .training.source import as_source


def batches(data, batch_size: int, loader_opts: dict | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches of `data` in order, streamed as the trainers stream (`training.source`)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    src = as_source("data", data, device=torch.device("cpu"), loader_opts=loader_opts)
    yield from src.batches(sequential(len(src), batch_size).batches, seed=0)


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
            if isinstance(x, torch.Tensor) and x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)
