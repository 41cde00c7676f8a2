"""Top-1 accuracy of the fused model on a data set, streamed in batches."""
from __future__ import annotations

from typing import Sequence

import torch

from ..training import common as U
from ..training import sampling as S
from ..training.source import as_source
from .fused import fused_forward


@torch.no_grad()
def evaluate(model, data, *, transfer: str = "fp32", missing: Sequence[int] = (), batch_size: int = 500,
             device=None, loader_opts: dict | None = None) -> float:
    """Top-1 accuracy of the fused model on `data` (Dataset, DataLoader or (images, labels))."""
    dev = U.resolve_device(device) if device is not None else next(model.parameters()).device
    src = as_source("data", data, device=dev, loader_opts=loader_opts)
    was = model.training
    model.eval()
    correct = 0
    try:
        for x, y in src.batches(S.sequential(len(src), batch_size).batches, 0):
            with U.autocast(dev):
                z = fused_forward(model, x.to(dev), transfer=transfer, missing=missing)
            correct += int((z.float().argmax(-1).cpu() == y).sum())
    finally:
        model.train(was)
    return correct / len(src)
