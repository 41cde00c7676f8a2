"""Print the short table of a bench run: every table's label, time and ratio columns.

Usage: python scripts/summarize_bench.py DIR   (DIR holds the JSON files of `devit-ext bench --out DIR`)
"""
import glob
import json
import os
import sys

from devit_ext.bench.timing import Table

KEEP = ("op", "impl", "config", "batch", "size", "shape", "name", "ms", "us", "ratio", "speedup", "target", "img_s", "gb_s", "tflop")


def main(folder: str) -> int:
    files = sorted(glob.glob(os.path.join(folder, "*.json")))
    if not files:
        print(f"no bench results in {folder}")
        return 1
    for path in files:
        with open(path) as f:
            data = json.load(f)
        t = Table(data["title"])
        for row in data["rows"]:
            t.add(**{k: v for k, v in row.items() if any(s in k.lower() for s in KEEP)})
        print(t.format())
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "bench-results"))
