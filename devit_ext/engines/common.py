"""Shared by every engine: argument and image checks, image normalisation, message sizes, stats.

Contract between `collaborate` (engines/__init__.py) and an engine:

- `collaborate` runs `resolve_request(...)` (model, arguments, images, device,
  dtype) before anything else and hands the `Request` to the engine, which
  trusts it; every engine thus receives validated, *raw* images (uint8 or
  float exactly as the caller gave them; a distributed engine can send uint8 on
  the wire as is). `engines.distributed.run`, also callable on its own, builds
  the same `Request` when it is not given one.
- An engine turns raw images into the model's input with
  `normalise_images(model, images, dtype=..., device=...)` (uint8 -> /255 ->
  (x - mean) / std; float is taken as already normalised).
- An engine returns `(logits float32 (B, C), Stats)`; `collaborate` drops the
  stats unless `return_stats=True`.
- What a device sends, its size (`message_bytes`, re-exported here for the
  engines' stats) and how it is fused are `devit_ext.protocol`'s.
- `devit_ext.ops.op_paths(device, ...)` says which implementation of each devit op
  runs (native C++/CUDA, Triton, or the pure-torch reference): no silent fallbacks.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch

from ..protocol import TRANSFERS, check_transfer, message_bytes, tokens_per_image  # noqa: F401 - re-exported for the engines

ENGINES = ("local", "distributed")
FLOAT_IMAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------


def check_model(model) -> None:
    from ..model import DeViT

    if not isinstance(model, DeViT):
        raise TypeError(
            f"model: expected a devit_ext.DeViT (from devit_ext.decompose or devit_ext.load), got {type(model).__name__}"
        )
    if model.num_devices < 1:
        raise ValueError("model: has no sub-models")


def check_args(*, engine, transfer, batch_size, timeout, degrade) -> None:
    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {ENGINES}, got {engine!r}")
    check_transfer(transfer)
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected None or a positive int, got {batch_size!r}")
    try:
        t = float(timeout)
    except (TypeError, ValueError):
        raise TypeError(f"timeout: expected a positive number of seconds, got {timeout!r}") from None
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"timeout: expected a positive finite number of seconds, got {timeout!r}")
    if not isinstance(degrade, bool):
        raise TypeError(f"degrade: expected a bool, got {type(degrade).__name__}")


@dataclasses.dataclass(frozen=True)
class Request:
    """A `collaborate` call's arguments, checked and resolved once; engines trust it."""

    engine: str
    transfer: str
    batch_size: int | None
    timeout: float
    degrade: bool
    device: torch.device  # where the sub-models (local) or the fusion (distributed) run
    dtype: torch.dtype  # compute dtype on `device`
    dtype_arg: Any  # the caller's dtype (checked), for engines that compute on other devices
    image_kind: str  # "uint8" (raw pixels: normalised by the engine) or "float" (normalised)


def resolve_request(model, images, *, engine: str, transfer, batch_size, timeout, degrade, device=None,
                    dtype=None) -> Request:
    """Every check of a call, before any work: model, arguments, images, device and dtype."""
    check_model(model)
    check_args(engine=engine, transfer=transfer, batch_size=batch_size, timeout=timeout, degrade=degrade)
    kind = check_images(model, images)
    dev = compute_device(model, images, device)
    dt = resolve_dtype(dtype, dev)
    if kind == "float":
        check_images_fit(images, dt)
    return Request(engine, transfer, batch_size, float(timeout), degrade, dev, dt, dtype, kind)


def check_images_fit(images: torch.Tensor, dtype: torch.dtype) -> None:
    """Float images must be finite in the compute dtype: 1e30 in fp16 (or 1e39 in fp64 for fp32)
    would become Inf on the cast and NaN logits, so refuse them before any work."""
    big = float(torch.finfo(dtype).max)
    if float(torch.finfo(images.dtype).max) <= big:
        return  # the cast cannot overflow (same dtype, fp16 into bf16 / fp32, bf16 into fp32)
    amax = float(images.abs().amax())
    if amax > big:
        raise ValueError(
            f"images: values up to {amax:.3g} overflow the compute dtype {str(dtype).replace('torch.', '')} "
            f"(largest finite {big:.3g}); normalise the images or compute in float32"
        )


def compute_device(model, images: torch.Tensor, device) -> torch.device:
    """`device` if given, else the model's parameter device (images are moved there)."""
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} asked for but no CUDA GPU is available")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        return dev
    p = next(model.parameters(), None)
    return p.device if p is not None else images.device


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """Compute dtype: bf16 on CUDA, fp32 on CPU unless asked for."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                 "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
        if dtype not in names:
            raise ValueError(f"dtype: expected one of {sorted(names)} or a torch float dtype, got {dtype!r}")
        dtype = names[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype: expected torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
    return dtype


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------


def check_images(model, images) -> str:
    """Validate images for `model` before any work; returns "uint8" or "float".

    Expected: a (B, C, H, W) tensor with B >= 1, C = model.in_chans, (H, W) =
    model.img_size; dtype uint8 (raw pixels) or float (already normalised,
    finite).
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images: expected a torch.Tensor (B, C, H, W), got {type(images).__name__}")
    c, (h, w) = model.in_chans, model.img_size
    if images.dim() != 4:
        raise ValueError(f"images: expected a 4-d tensor (B, {c}, {h}, {w}), got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8 and images.dtype not in FLOAT_IMAGE_DTYPES:
        raise TypeError(
            f"images: expected dtype uint8 (raw pixels 0..255) or a float dtype (normalised), got "
            f"{str(images.dtype).replace('torch.', '')}"
        )
    b = images.shape[0]
    if b < 1:
        raise ValueError(f"images: empty batch (shape {tuple(images.shape)})")
    if images.shape[1] != c:
        raise ValueError(f"images: expected {c} channels (B, {c}, {h}, {w}), got shape {tuple(images.shape)}")
    if tuple(images.shape[2:]) != (h, w):
        raise ValueError(
            f"images: expected the model's input size {h}x{w} (B, {c}, {h}, {w}), got shape {tuple(images.shape)}"
        )
    if images.device.type == "meta":
        raise ValueError("images: on the meta device (shape only, no values); pass images with data (cpu or cuda)")
    if images.dtype == torch.uint8:
        return "uint8"
    # one reduction pass: any NaN/Inf makes the fp32 sum non-finite; only then (or on overflow of
    # huge finite values) look closer
    if not math.isfinite(float(images.sum(dtype=torch.float32))) and not bool(torch.isfinite(images).all()):
        nan = int(torch.isnan(images).sum())
        inf = int(torch.isinf(images).sum())
        raise ValueError(f"images: contain non-finite values ({nan} NaN, {inf} Inf)")
    return "float"


def normalise_images(model, images: torch.Tensor, *, dtype: torch.dtype | None = None, device=None, out=None) -> torch.Tensor:
    """Raw (validated) images -> the model's input: uint8 -> /255 -> (x - mean)/std; float as given.

    The arithmetic is fp32, then cast to `dtype` (default fp32). With `out`
    the result is written there (e.g. a CUDA graph's static input buffer).
    """
    dtype = torch.float32 if dtype is None else dtype
    device = images.device if device is None else torch.device(device)
    x = images.to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        mean, std = _mean_std(model, device)
        x = (x.float() * (1.0 / 255.0) - mean) / std
    if out is not None:
        out.copy_(x)
        return out
    return x.to(dtype)


_MEAN_STD: dict = {}


def _mean_std(model, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = tuple(float(v) for v in model.meta.get("mean", (0.5,) * model.in_chans))
    std = tuple(float(v) for v in model.meta.get("std", (0.5,) * model.in_chans))
    if len(mean) != model.in_chans or len(std) != model.in_chans:
        raise ValueError(f"model: meta mean/std have {len(mean)}/{len(std)} entries for {model.in_chans} channels")
    key = (mean, std, str(device))
    if key not in _MEAN_STD:
        _MEAN_STD[key] = (
            torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1),
            torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1),
        )
    return _MEAN_STD[key]


def micro_batches(n: int, batch_size: int | None) -> list[tuple[int, int]]:
    """[(start, stop)] covering range(n) in chunks of batch_size (one chunk when None)."""
    if batch_size is None or batch_size >= n:
        return [(0, n)]
    return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


# ---------------------------------------------------------------------------
# Stats
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Stats:
    """What one `collaborate` call did and how long it took (seconds, bytes)."""

    engine: str
    device: str
    dtype: str
    transfer: str
    num_images: int
    num_devices: int
    micro_batches: int = 1
    # sender side: all devices' sub-models up to the quantised token
    compute_s: float = 0.0
    # per device; None where devices ran fused in one pass and cannot be timed apart
    device_compute_s: list[float | None] = dataclasses.field(default_factory=list)
    transfer_bytes_per_image: list[int] = dataclasses.field(default_factory=list)
    # per device time on the wire; None where nothing crossed a wire (local engine)
    transfer_s: list[float | None] = dataclasses.field(default_factory=list)
    fusion_s: float = 0.0
    latency_s: float = 0.0
    throughput: float = 0.0  # images per second, end to end
    op_paths: dict[str, str] = dataclasses.field(default_factory=dict)
    missing_devices: list[int] = dataclasses.field(default_factory=list)
    degraded: bool = False
    notes: list[str] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def total_transfer_bytes_per_image(self) -> int:
        return int(sum(self.transfer_bytes_per_image))

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["total_transfer_bytes_per_image"] = self.total_transfer_bytes_per_image
        return d

    def finish(self, latency_s: float) -> "Stats":
        self.latency_s = float(latency_s)
        self.throughput = self.num_images / latency_s if latency_s > 0 else float("inf")
        return self


