"""What was built and what runs: the native module, CUDA kernels, Triton.

`native()` loads devit_ext._C once (after torch, so that torch's bundled
libgomp is the one OpenMP runtime in the process) and remembers why it failed
if it did; the ops layer uses it to pick its paths. `build_info()` reports it.
Nothing here imports torch or triton at `import devit_ext` time.
"""
from __future__ import annotations

import importlib
import os
from typing import Any

from ._version import __version__

_NATIVE: tuple[Any, str | None] | None = None
_TRITON: tuple[bool, str | None] | None = None


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


def _triton_status() -> tuple[bool, str | None]:
    global _TRITON
    if _TRITON is None:
        try:
            import triton  # noqa: F401

            _TRITON = (True, None)
        except Exception as e:  # noqa: BLE001 - any failure means "not usable"
            _TRITON = (False, f"{type(e).__name__}: {e}")
    return _TRITON


def build_info() -> dict[str, Any]:
    """A dict describing the build and the paths the ops take on this machine.

    Keys: version, torch, cpp (native module loaded), cuda_compiled (CUDA kernels
    in it), cuda_archs (list of str), cuda_available (a GPU is usable now), triton
    (importable), triton_interpret (interpreter on), openmp, native_error, and one
    key per op family naming the path it takes (quant_cpu, quant_cuda), and
    ops_cpu / ops_cuda: every op's implementation for CPU / CUDA tensors
    (`devit_ext.ops.op_paths`), so a fallback to the reference is never silent.
    """
    from .ops import op_paths

    import torch

    mod, err = _load_native()
    cfg = mod.build_config() if mod is not None else {}
    cuda_compiled = bool(mod is not None and mod.cuda_compiled())
    triton_ok, triton_err = _triton_status()
    if mod is None:
        quant_cpu = quant_cuda = "reference (native module missing)"
    else:
        quant_cpu = "cpp"
        quant_cuda = "cuda" if cuda_compiled else "reference (CUDA kernels not compiled)"
    return {
        "version": __version__,
        "torch": torch.__version__,
        "cpp": mod is not None,
        "cuda_compiled": cuda_compiled,
        "cuda_archs": list(cfg.get("cuda_archs", [])),
        "cuda_available": bool(torch.cuda.is_available()),
        "triton": triton_ok,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        "openmp": int(cfg.get("openmp", 0)),
        "cuda_build_mode": cfg.get("cuda_mode"),
        "cuda_compiler": cfg.get("cuda_compiler") or None,
        "cxx_compiler": cfg.get("cxx_compiler") or None,
        "native_error": err,
        "triton_error": triton_err,
        "quant_cpu": quant_cpu,
        "quant_cuda": quant_cuda,
        "ops_cpu": op_paths("cpu"),
        "ops_cuda": op_paths("cuda"),
    }
