"""Collaborative inference: `collaborate(model, images, engine=...)`.

Engines: "local" (all sub-models in this process, engines/local.py) and
"distributed" (one process per device plus this process as the aggregator,
engines/distributed.py). Every argument and the images are checked and resolved
here, once (`common.resolve_request`), before any engine does work; the engines
trust the resulting request and share the helpers of engines/common.py.
"""
from __future__ import annotations

import importlib

from .common import Stats

__all__ = ["collaborate", "Stats"]


def collaborate(
    model,
    images,
    *,
    engine: str = "local",
    transfer: str = "int8",
    batch_size: int | None = None,
    return_stats: bool = False,
    timeout: float = 30.0,
    degrade: bool = False,
    device=None,
    dtype=None,
    **engine_opts,
):
    """Logits (float32, (B, num_classes)) of a DeViT for `images`, computed collaboratively.

    model: a `devit_ext.DeViT`. images: (B, C, H, W) of the model's input size,
    uint8 (raw pixels; /255 then the model's mean/std) or float (already
    normalised, finite).
    engine: "local" | "distributed". transfer: how each device's token crosses
    to the aggregator: "int8" (d + 4 bytes per token: int8 values and one fp32
    scale), "fp16" (2d) or "fp32" (4d, exact to fp32 rounding).
    batch_size: micro-batches of at most this many images. timeout: seconds
    (distributed: every rendezvous and receive). degrade: distributed only,
    answer from the devices still alive. device/dtype: where and in what
    precision the sub-models run (default: the model's device; bf16 on CUDA,
    fp32 on CPU). engine_opts: local: cuda_graphs (bool, default True), max_bucket
    (int, default 256), compile (bool, default False: torch.compile the sender side);
    distributed: see devit_ext.engines.distributed.

    Returns logits, or (logits, Stats) with return_stats=True. The result equals
    `model(images)` up to the transfer's rounding (and the compute dtype's).
    """
    from . import common

    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats: expected a bool, got {type(return_stats).__name__}")
    req = common.resolve_request(model, images, engine=engine, transfer=transfer, batch_size=batch_size,
                                 timeout=timeout, degrade=degrade, device=device, dtype=dtype)
    if engine == "local":
        from . import local

        logits, stats = local.run(model, images, req, return_stats=return_stats, **engine_opts)
    else:
        # looked up in sys.modules at call time (not a module attribute), and only when asked for:
        # the distributed engine pulls in torch.distributed
        dist = importlib.import_module("devit_ext.engines.distributed")
        logits, stats = dist.run(model, images, request=req, transfer=transfer, batch_size=batch_size,
                                 timeout=req.timeout, degrade=degrade, device=device, dtype=dtype, **engine_opts)
    return (logits, stats) if return_stats else logits
