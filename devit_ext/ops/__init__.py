"""devit ops: torch.library custom ops in the `devit` namespace.

Each op has a pure-torch reference in `reference.py` (the oracle and the
fallback), a fake kernel for torch.compile/export, a C++ CPU path and a CUDA
(native or Triton) GPU path; `dispatch.py` is the one place that picks which
runs (`op_paths`, `build_info`), and `devit_ext.checks` holds every argument
check. docs/architecture.md has the table.
"""
from . import reference
from .quant import dequantize_int8, layernorm_quantize_int8, quantize_int8
from .attention import subvit_attention
from .fusion import ensemble_fusion
from .dispatch import OP_NAMES, op_paths

__all__ = [
    "reference",
    "op_paths",
    "quantize_int8",
    "dequantize_int8",
    "layernorm_quantize_int8",
    "subvit_attention",
    "ensemble_fusion",
]

