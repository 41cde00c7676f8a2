"""Loading the native module devit_ext._C, and nothing else.

`native()` loads it once (after torch, so that torch's bundled libgomp is the
one OpenMP runtime in the process) and remembers why it failed if it did;
`devit_ext.ops.dispatch` uses it to pick the ops' paths and `build_info()`
(also there) reports it. Nothing here runs at `import devit_ext` time.
"""
from __future__ import annotations

import importlib
import os
from typing import Any

_NATIVE: tuple[Any, str | None] | None = None


def native():
    """The devit_ext._C module, or None when it is missing or fails to load."""
    return _load_native()[0]


def native_error() -> str | None:
    return _load_native()[1]


def _load_native():
    global _NATIVE
    if _NATIVE is None:
        if os.environ.get("DEVIT_DISABLE_NATIVE", "0") not in ("", "0"):
            _NATIVE = (None, "disabled by DEVIT_DISABLE_NATIVE")
        else:
            try:
                import torch  # noqa: F401  - load torch (and its libgomp) first

                _NATIVE = (importlib.import_module("devit_ext._C"), None)
            except ImportError as e:
                _NATIVE = (None, f"{type(e).__name__}: {e}")
    return _NATIVE


def cuda_kernels() -> bool:
    mod = native()
    return bool(mod is not None and mod.cuda_compiled())

