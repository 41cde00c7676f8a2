"""The environment of a child process that must import the same devit_ext as this test process.

Under CI the package is installed (site-packages, with its native module and
kernels); in a checkout it may be the source tree on PYTHONPATH or an editable
install. A child must not pick the bare source tree by accident (it has no
built `_C` and no `devit_ext/kernels`), so its PYTHONPATH starts with the folder
this process imported devit_ext from, and children are not started with the
checkout as their working directory.
"""
from __future__ import annotations

import os

import devit_ext

TESTS = os.path.dirname(os.path.abspath(__file__))
IMPORT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(devit_ext.__file__)))


def child_env(*paths: str, drop: tuple[str, ...] = (), **extra: str) -> dict:
    """os.environ with PYTHONPATH = IMPORT_ROOT, then `paths`, then the caller's PYTHONPATH; `drop` keys removed."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    parts = [IMPORT_ROOT, *paths] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.update(extra)
    return env
