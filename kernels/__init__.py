"""Triton kernels of devit_ext (installed as devit_ext.kernels).

Launchers, callable directly with the op's arguments (that is how the
interpreter tests and the benchmarks reach the Triton path; devit_ext.ops
dispatches CUDA tensors here):

- subvit_attention(qkv, scale=None, *, out=None, ...)   see subvit_attention.py
- ensemble_fusion(q, scales, widths, map_weight, map_bias, cls_weight, cls_bias, *, out=None, ...)

Both check their arguments (devit_ext.checks) and then call the launch itself,
`launch_subvit_attention(qkv, shape, scale)` / `launch_ensemble_fusion(q, scales,
shape, ...)`, which trusts its inputs; devit_ext.ops, having checked already,
calls those directly (and, for the stacked attention form, caches
`stacked_attention_launch(shape, strides, scale)`: the launch with its layout decided once).

They run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set
before this package was imported (how CI tests them). `available()` says
whether Triton imports; `info()` gives the version, the interpreter flag and
the import error if any. Without Triton the launchers raise a clear error.
"""
from __future__ import annotations

from . import _launch

_IMPORT_ERROR: str | None = None
if _launch.triton_version() is not None:
    try:
        from .ensemble_fusion import ensemble_fusion
        from .ensemble_fusion import launch as launch_ensemble_fusion
        from .subvit_attention import launch as launch_subvit_attention
        from .subvit_attention import stacked_launch as stacked_attention_launch
        from .subvit_attention import subvit_attention
    except Exception as e:  # noqa: BLE001 - a broken triton install must not break `import devit_ext`
        _IMPORT_ERROR = f"{type(e).__name__}: {e}"

if _launch.triton_version() is None or _IMPORT_ERROR is not None:

    def subvit_attention(*args, **kwargs):  # type: ignore[no-redef]
        _unavailable()

    def ensemble_fusion(*args, **kwargs):  # type: ignore[no-redef]
        _unavailable()

    launch_subvit_attention = stacked_attention_launch = subvit_attention
    launch_ensemble_fusion = ensemble_fusion


def _unavailable():
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"devit_ext.kernels: the Triton kernels failed to load: {_IMPORT_ERROR}")
    _launch.require_triton()


def available() -> bool:
    """Triton imports and the kernels are defined (they may still need a GPU or the interpreter)."""
    return _launch.triton_version() is not None and _IMPORT_ERROR is None


def interpreting() -> bool:
    """The kernels were decorated under TRITON_INTERPRET=1 (they run CPU tensors, slowly)."""
    return _launch.INTERPRET


def info() -> dict:
    return {
        "triton": _launch.triton_version(),
        "available": available(),
        "interpret": _launch.INTERPRET,
        "error": _IMPORT_ERROR if _launch.triton_version() is not None else _launch.triton_error(),
    }


__all__ = ["subvit_attention", "ensemble_fusion", "launch_subvit_attention", "stacked_attention_launch", "launch_ensemble_fusion", "available", "interpreting", "info"]
