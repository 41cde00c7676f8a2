"""Launch helper shared by the Triton kernels of devit_ext.

Nothing here imports triton at module level, so `devit_ext.kernels.available()`
can report why Triton is missing instead of failing on import.

- `require_triton()`: the triton module, or a clear error naming what is missing.
- `check_launchable(device)`: Triton runs on CUDA tensors, or on CPU tensors under
  the interpreter (TRITON_INTERPRET=1, set before `devit_ext.kernels` is imported,
  because `triton.jit` picks compiled vs interpreted when it decorates a kernel).
- `device_table(rows, device)`: a small int64 table (per-head / per-tile
  metadata) on the kernel's device, cached by content so repeated calls with the
  same layout do no host-to-device copy (and CUDA-graph capture after a warm-up
  call finds the table already there).
- `align_elems(...)`: the largest power-of-two element alignment (up to 16 bytes)
  shared by a set of offsets/strides, passed to kernels as a constexpr so they can
  hint `tl.multiple_of` and keep 16-byte vector loads on runtime-loaded strides.
"""
from __future__ import annotations

import functools
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

_TRITON_ERROR: str | None = None
try:  # noqa: SIM105 - record the reason, do not hide it
    import triton  # noqa: F401

    _TRITON_VERSION: str | None = triton.__version__
except Exception as e:  # noqa: BLE001 - any import failure means "no triton"
    _TRITON_VERSION = None
    _TRITON_ERROR = f"{type(e).__name__}: {e}"

# Read once, like triton.jit does: flipping the variable later does not
# change kernels that were already decorated.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_version() -> str | None:
    return _TRITON_VERSION


def triton_error() -> str | None:
    """Why `import triton` failed (None when it imports)."""
    return _TRITON_ERROR


def require_triton():
    if _TRITON_VERSION is None:
        raise RuntimeError(
            "devit_ext.kernels needs the `triton` package (pip install triton; Linux only), "
            f"which failed to import: {_TRITON_ERROR}. The ops in devit_ext.ops fall back to "
            "the pure-torch reference on CPU tensors."
        )
    import triton as _triton

    return _triton


def check_launchable(name: str, device: torch.device) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors with the interpreter on."""
    require_triton()
    if device.type == "cuda":
        if INTERPRET:
            raise RuntimeError(
                f"{name}: TRITON_INTERPRET=1 is set but the tensors are on {device}; the interpreter "
                "runs CPU tensors only here. Unset TRITON_INTERPRET to compile the kernels for the GPU."
            )
        return
    if device.type == "cpu":
        if not INTERPRET:
            raise RuntimeError(
                f"{name}: the Triton kernels need CUDA tensors, got CPU tensors. To run them on the CPU, "
                "set TRITON_INTERPRET=1 before importing devit_ext.kernels; for a CPU result use "
                "devit_ext.ops (which runs the CPU path)."
            )
        return
    raise RuntimeError(f"{name}: expected CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device}")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def align_elems(element_size: int, values: Iterable[int]) -> int:
    """Largest power of two <= 16 bytes (in elements) dividing every value (1 if none)."""
    a = max(1, 16 // element_size)
    for v in values:
        while a > 1 and v % a:
            a //= 2
    return a


@dataclass(frozen=True)
class Target:
    """What a launcher's tile choice depends on: the SM count and the arch (80, 90, ...).
    arch None is the interpreter: small tiles (cheap in numpy), the SM count of an H100 so that the
    grid splitting matches the GPU's."""

    sms: int
    arch: int | None


INTERPRETER = Target(132, None)


@functools.lru_cache(maxsize=None)
def _cuda_target(device_index: int) -> Target:
    p = torch.cuda.get_device_properties(device_index)
    return Target(p.multi_processor_count, 10 * p.major + p.minor)


def target(device: torch.device) -> Target:
    """The Target of the device the tensors are on (the interpreter's for CPU tensors)."""
    if device.type == "cuda":
        return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER


_TABLES: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_TABLES_MAX = 256


def device_table(rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """rows (R x W python ints) as a contiguous int64 tensor on `device`, cached by content."""
    key = (str(device), tuple(tuple(r) for r in rows))
    t = _TABLES.get(key)
    if t is not None:
        _TABLES.move_to_end(key)
        return t
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "devit_ext.kernels: a new tensor layout appeared during CUDA-graph capture; call the op once "
            "with the same tensors before capturing (its metadata table is then cached on the device)."
        )
    t = torch.tensor(key[1], dtype=torch.int64)
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    _TABLES[key] = t
    if len(_TABLES) > _TABLES_MAX:
        _TABLES.popitem(last=False)
    return t


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands use exact fp32 products ("ieee"), not TF32, to meet the fp32 tolerance."""
    return "ieee" if dtype == torch.float32 else "tf32"
