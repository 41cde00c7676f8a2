"""The user-path commands of `devit-ext`: decompose, train, evaluate, export.

Each module has add_arguments(parser) and run(args) -> int like demo/bench/worker;
they are thin: the work is in devit_ext's Python API (decompose, train_dekd,
collaborate, load, devit_ext.export). Shared flag helpers live here.
"""
from __future__ import annotations

import argparse

from ..run_dir import RunError

# flags that are not settings (not written to args.yaml)
NOT_SETTINGS = {"command", "config", "version"}


def add_config_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", default=None, metavar="FILE.yaml",
                   help="YAML defaults for any long flag (flag names with - or _); flags on the command line win. "
                        "RUN/args.yaml works too (its section for this command is used)")


def require(args, name: str) -> None:
    """Flags that may come from -c FILE are checked here instead of by argparse."""
    if getattr(args, name, None) in (None, "", []):
        raise RunError(f"--{name.replace('_', '-')}: required (on the command line or in -c FILE)")


def settings(args) -> dict:
    return {k: v for k, v in sorted(vars(args).items()) if k not in NOT_SETTINGS}


def positive(name: str, value, minimum: int = 1) -> int:
    if value is None or int(value) < minimum:
        raise RunError(f"--{name.replace('_', '-')}: expected an integer >= {minimum}, got {value!r}")
    return int(value)
