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
    "quantize_int8",
    "dequantize_int8",
    "layernorm_quantize_int8",
    "subvit_attention",
    "ensemble_fusion",
]
