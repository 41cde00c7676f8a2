"""devit ops: torch.library custom ops in the `devit` namespace.

Each op has a pure-torch reference in `reference.py` (the oracle and the
fallback), a fake kernel for torch.compile/export, a C++ CPU path and a CUDA
(native or Triton) GPU path. See ARCHITECTURE in the README for the table.
"""
from . import reference
from .quant import dequantize_int8, layernorm_quantize_int8, quantize_int8
from .attention import subvit_attention
from .fusion import ensemble_fusion

__all__ = [
    "reference",
    "op_paths",
    "quantize_int8",
    "dequantize_int8",
    "layernorm_quantize_int8",
    "subvit_attention",
    "ensemble_fusion",
]


OP_NAMES = ("quantize_int8", "dequantize_int8", "layernorm_quantize_int8", "subvit_attention", "ensemble_fusion")


def op_paths(device="cpu", names=OP_NAMES) -> dict:
    """{op: implementation} for tensors on `device`: which kernel runs, or why the reference does.

    Engines put this in their stats and `build_info()` reports it, so a
    fallback is never silent.
    """
    import torch

    from .. import _build
    from . import quant

    device = torch.device(device)
    quant_path = {"cpp": "native C++", "cuda": "native CUDA"}.get(quant._path(device))
    if quant_path is None:
        why = f"native module missing: {_build.native_error()}" if _build.native() is None else f"no native kernel for {device.type}"
        quant_path = f"reference ({why})"
    if device.type == "cuda":
        from ..kernels import _launch

        triton_path = "triton" if _launch.triton_version() is not None else "unavailable (triton missing)"
        fused = {"subvit_attention": triton_path, "ensemble_fusion": triton_path}
    else:
        fused = {
            "subvit_attention": "reference (torch SDPA: the op's CPU path)",
            "ensemble_fusion": f"{quant_path} dequantise + torch matmul",
        }
    return {name: fused.get(name, quant_path) for name in names}
