"""The CCT variants registered with timm whenever devit_ext and timm are both imported, in either order.

`import devit_ext` stays light (no torch, no timm: test_build's rule), so it cannot
import `devit_ext.cct` itself. Instead `install()` registers the variants at once
when timm is already imported, or else puts a finder first on `sys.meta_path`
that lets timm import as usual and then imports `devit_ext.cct` (whose
`register_model` calls do the registering). After that,
`timm.create_model("cct_7_3x1_32", num_classes=100)` works in a program that
imported devit_ext, as for timm's own models.

A registration that fails (a timm too old for the registry's API, say) must not
break `import timm`: it warns, naming the error, and `import devit_ext.cct`
raises it again where the user asks for the variants directly.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

_CCT = "devit_ext.cct"


def _register() -> None:
    try:
        importlib.import_module(_CCT)
    except Exception as e:  # noqa: BLE001 - any failure: say so, keep timm usable
        warnings.warn(f"devit_ext: the CCT variants were not registered with timm ({type(e).__name__}: {e}); "
                      f"`import {_CCT}` shows the error", RuntimeWarning, stacklevel=3)


class _ThenRegister(importlib.abc.Loader):
    """timm's own loader, then the registration."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _register()


class _AfterTimm(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for "timm" it asks the other finders and wraps the loader they return."""

    def find_spec(self, name, path=None, target=None):
        if name != "timm":
            return None
        sys.meta_path.remove(self)  # once: the other finders answer, and no later import sees this one
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenRegister(spec.loader)
        return spec


def install() -> None:
    """Register now if timm is imported, else when it is (idempotent)."""
    if _CCT in sys.modules:
        return
    if "timm" in sys.modules:
        _register()
    elif not any(isinstance(f, _AfterTimm) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTimm())
