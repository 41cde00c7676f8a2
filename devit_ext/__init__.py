"""devit_ext: DeViT (arXiv 2309.05015) as real, fast software.

A large timm ViT (the teacher) is decomposed into N small class-specialised
ViTs, one per edge device; DEKD trains them; at inference every device sends
one int8 class token to an aggregator whose fusion head gives the logits.

Public API: decompose, train_dekd, collaborate, load, DeViT, ops, build_info.
Heavy modules (timm, the engines) load on first use so `import devit_ext`
stays fast; the CCT variants join timm's registry as soon as timm is imported.
"""
from __future__ import annotations

import importlib

from . import _timm_hook
from ._version import __version__

_timm_hook.install()  # the CCT variants in timm's registry once timm is imported (see _timm_hook)

_LAZY = {
    "build_info": ("devit_ext.ops.dispatch", "build_info"),
    "ops": ("devit_ext.ops", None),
    "DeViT": ("devit_ext.model", "DeViT"),
    "load": ("devit_ext.model", "load"),
    "decompose": ("devit_ext.decomposition", "decompose"),
    "train_dekd": ("devit_ext.dekd", "train_dekd"),
    "train_teacher": ("devit_ext.teacher", "train_teacher"),
    "collaborate": ("devit_ext.engines", "collaborate"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'devit_ext' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value
    return value
