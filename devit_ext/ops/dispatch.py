"""Which implementation of each devit op runs: the one place that picks a path.

- `quant_path(device)`: "cuda" (native CUDA kernels), "cpp" (native C++/OpenMP)
  or "reference" (pure torch) for the int8 transfer ops on `device`.
- `fused_path(device)`: "triton" for subvit_attention / ensemble_fusion on CUDA
  tensors (or CPU tensors under TRITON_INTERPRET=1 when the kernels are called
  directly), "cpu" otherwise (the reference attention; C++ dequantise + torch
  matmul for the fusion).
- `eager_ok(*tensors)`: whether a public op may call its implementation
  directly instead of going through `torch.ops.devit.*` (see ops/quant.py).
- `op_paths(device, names)` and `build_info()` report all of it in words, so a
  fallback to the reference is never silent.

`devit_ext._build` only loads the native module; the kernels package only
launches Triton. This module reads both.
"""
from __future__ import annotations

import importlib
import os
from typing import Any

import torch

from .. import _build
from .._version import __version__

OP_NAMES = ("quantize_int8", "dequantize_int8", "layernorm_quantize_int8", "subvit_attention", "ensemble_fusion")


def quant_path(device: torch.device) -> str:
    """'cuda', 'cpp' or 'reference' for the int8 transfer ops on tensors on `device`."""
    mod = _build.native()
    if mod is None:
        return "reference"
    if device.type == "cpu":
        return "cpp"
    if device.type == "cuda" and mod.cuda_compiled():
        return "cuda"
    return "reference"


def fused_path(device: torch.device) -> str:
    """'triton' (CUDA tensors) or 'cpu' for subvit_attention and ensemble_fusion."""
    return "triton" if device.type == "cuda" else "cpu"


def eager_ok(*tensors) -> bool:
    """True when calling an op's implementation directly is indistinguishable from the op.

    A Python custom op costs ~15-30 us of dispatch per call, as much as a CPU
    kernel on a token batch; nothing can observe the difference for plain
    tensors that need no grad, outside compiling / tracing / dispatch or function
    modes / functorch transforms / the profiler.
    """
    if (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack() != 0
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._functorch.peek_interpreter_stack() is not None
        or torch._C._autograd._profiler_enabled()
    ):
        return False
    for t in tensors:
        if t is not None and (type(t) is not torch.Tensor or t.requires_grad):
            return False
    return True


def op_paths(device="cpu", names=OP_NAMES) -> dict:
    """{op: implementation} for tensors on `device`: which kernel runs, or why the reference does.

    Engines put this in their stats and `build_info()` reports it, so a
    fallback is never silent.
    """
    device = torch.device(device)
    quant = {"cpp": "native C++", "cuda": "native CUDA"}.get(quant_path(device))
    if quant is None:
        why = f"native module missing: {_build.native_error()}" if _build.native() is None else f"no native kernel for {device.type}"
        quant = f"reference ({why})"
    if fused_path(device) == "triton":
        from ..kernels import _launch

        triton = "triton" if _launch.triton_version() is not None else "unavailable (triton missing)"
        fused = {"subvit_attention": triton, "ensemble_fusion": triton}
    else:
        fused = {
            "subvit_attention": "reference (torch SDPA: the op's CPU path)",
            "ensemble_fusion": f"{quant} dequantise + torch matmul",
        }
    return {name: fused.get(name, quant) for name in names}


# what the onnxruntime paths import: the runtime, and onnx + onnxscript for torch's dynamo ONNX exporter
ORT_MODULES = ("onnxruntime", "onnx", "onnxscript")


def onnxruntime_status() -> tuple[bool, str]:
    """(True, onnxruntime version) when onnxruntime, onnx and onnxscript import here, else (False, why).

    Not cached: a test (or a user) that hides a module sees the answer change.
    """
    for name in ORT_MODULES:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any import failure means the runtime is unavailable
            return False, f"{name}: {type(e).__name__}: {e}"
    return True, str(importlib.import_module("onnxruntime").__version__)


AUTO_WHY = "auto: torch, measured faster than the onnxruntime sender on CPU (docs/perf-notes.md)"


def local_backend(backend: str, device: torch.device, dtype: torch.dtype, compiled: bool) -> tuple[str, str]:
    """(sender backend of the local engine, why) for `backend` in torch | onnxruntime | auto; why is the
    onnxruntime version, or the reason torch was taken.

    "auto" takes torch: on this project's CPU the stacked torch sender beat the onnxruntime sender at
    batches 1, 8 and 32 (1.1-1.8x, quiet runs), and onnxruntime ran the teacher itself at 0.78-1.33x
    eager under every session setting tried (threads, spinning, exporter, transformer fusion;
    docs/perf-notes.md, "onnxruntime session settings"). An explicit "onnxruntime" that cannot run
    raises (no silent fallback).
    """
    cpu32 = device.type == "cpu" and dtype == torch.float32
    if backend == "torch":
        return "torch", "asked for"
    if backend == "auto":
        return "torch", AUTO_WHY
    if backend != "onnxruntime":
        raise ValueError(f"backend: expected one of torch, onnxruntime, auto, got {backend!r}")
    ok, why = onnxruntime_status()
    if not cpu32:
        raise ValueError(f"backend: 'onnxruntime' runs the sender side on the CPU in float32, "
                         f"got device={device}, dtype={dtype}")
    if compiled:
        raise ValueError("backend: 'onnxruntime' and compile=True exclude each other")
    if not ok:
        raise RuntimeError(f"backend='onnxruntime': onnxruntime does not import here ({why}); "
                           "pip install \"devit-ext[export]\" or use backend='torch'")
    return "onnxruntime", f"onnxruntime {why}"


def build_info() -> dict[str, Any]:
    """A dict describing the build and the paths the ops take on this machine.

    Keys: version, torch, cpp (native module loaded), cuda_compiled (CUDA kernels
    in it), cuda_archs (list of str), cuda_available (a GPU is usable now), triton
    (importable), triton_interpret (interpreter on), openmp, native_error, and one
    key per op family naming the path it takes (quant_cpu, quant_cuda), and
    ops_cpu / ops_cuda: every op's implementation for CPU / CUDA tensors
    (`op_paths`), so a fallback to the reference is never silent; onnxruntime
    (its version, or None) with onnxruntime_error (why it does not import), and
    local_backend_cpu: what the local engine's `backend="auto"` runs on for CPU
    float32 ("onnxruntime" or "torch (why)"); backend="onnxruntime" asks for
    onnxruntime explicitly.
    """
    from ..kernels import _launch

    mod, err = _build.native(), _build.native_error()
    cfg = mod.build_config() if mod is not None else {}
    cuda_compiled = _build.cuda_kernels()
    if mod is None:
        quant_cpu = quant_cuda = "reference (native module missing)"
    else:
        quant_cpu = "cpp"
        quant_cuda = "cuda" if cuda_compiled else "reference (CUDA kernels not compiled)"
    ort_ok, ort = onnxruntime_status()
    auto, auto_why = local_backend("auto", torch.device("cpu"), torch.float32, False)
    return {
        "version": __version__,
        "torch": torch.__version__,
        "cpp": mod is not None,
        "cuda_compiled": cuda_compiled,
        "cuda_archs": list(cfg.get("cuda_archs", [])),
        "cuda_available": bool(torch.cuda.is_available()),
        "triton": _launch.triton_version() is not None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        "openmp": int(cfg.get("openmp", 0)),
        "cuda_build_mode": cfg.get("cuda_mode"),
        "cuda_compiler": cfg.get("cuda_compiler") or None,
        "cxx_compiler": cfg.get("cxx_compiler") or None,
        "native_error": err,
        "triton_error": _launch.triton_error(),
        "quant_cpu": quant_cpu,
        "quant_cuda": quant_cuda,
        "ops_cpu": op_paths("cpu"),
        "ops_cuda": op_paths("cuda"),
        "onnxruntime": ort if ort_ok else None,
        "onnxruntime_error": None if ort_ok else ort,
        "local_backend_cpu": auto if auto == "onnxruntime" else f"{auto} ({auto_why})",
    }
