"""`devit-ext bench`: kernel and end-to-end benchmark suites.

Each suite module exposes `run(device: str, quick: bool) -> list[Table]`;
every row holds a time and a ratio against a baseline measured in the same
run, on the same tensors. Tables are printed and written as CSV + JSON with
the machine, versions and commit (see timing.py).

`static` is different: it times nothing; it compiles every GPU kernel for the
archs given (no GPU needed) and reports registers, spills, shared memory,
tensor-core use and occupancy (see static.py).
"""
from __future__ import annotations

import argparse
import importlib
import os

import torch

from .timing import Table, machine_info

SUITES = {
    "kernels": ["devit_ext.bench.quant", "devit_ext.bench.triton_ops", "devit_ext.bench.auth"],
    "e2e": ["devit_ext.bench.e2e"],
    "train": ["devit_ext.bench.train"],
    "host": ["devit_ext.bench.host_overhead"],
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("suite", choices=sorted([*SUITES, "static"]),
                   help="kernels: op microbenchmarks; e2e: whole models; train: DEKD training throughput; "
                        "static: compile for the GPU and read the result; host: each op's host time up to the launch "
                        "and the sender side's per block (no GPU needed)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--quick", action="store_true", help="fewer sizes and iterations (smoke run)")
    p.add_argument("--out", default="bench-results", help="folder for the CSV/JSON files")
    p.add_argument("--arch", default="80,90", help="static: CUDA archs to compile for (default 80,90)")
    p.add_argument("--json", default=None, help="static: write {rows, picks, checks, ...} to this file")


def run(args: argparse.Namespace) -> int:
    if args.suite == "static":
        from . import static

        return static.main(args)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is available on this machine")
    info = machine_info()
    print("machine:", info)
    tables: list[Table] = []
    for name in SUITES[args.suite]:
        tables += importlib.import_module(name).run(device=device, quick=args.quick)
    for t in tables:
        print()
        print(t.format())
        slug = t.title.split(":")[0].strip().lower().replace(" ", "_")
        paths = t.write(os.path.join(args.out, f"{args.suite}_{slug}_{device}"), info)
        print("written:", ", ".join(paths))
    return 0
