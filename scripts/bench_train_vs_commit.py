#!/usr/bin/env python
"""Training throughput of this checkout's DEKD trainer against another commit's, interleaved.

    git worktree add /tmp/old <commit> && cp devit_ext/_C*.so /tmp/old/devit_ext/
    python scripts/bench_train_vs_commit.py /tmp/old [--repeats 3] [--images 2000]

Each repeat runs one subprocess per tree (old, new, old, new, ...), each
training the demo-shaped model (28x28x1, a 4-block 128-wide teacher, 4
devices, batch 64) for 2 epochs per stage on in-memory tensors and reporting
the images/s of the second epoch of each stage. Prints the medians and the
ratio new / old per stage.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
import devit_ext
from devit_ext import data as D
from devit_ext.teacher import build_teacher
torch.set_num_threads(int(sys.argv[2]))
n = int(sys.argv[1])
s = D.synthetic(num_classes=10, per_class=n * 10 // 6 // 10, img_size=28, channels=1, seed=0)
x, y = s.train.images[:n], s.train.labels[:n]
t = build_teacher(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=128, depth=4, num_heads=4).eval()
out = {"file": devit_ext.__file__}
for stage in ("distill", "ensemble"):
    m = devit_ext.decompose(t, 4, seed=0)
    marks = []
    h = devit_ext.train_dekd(m, t, (x, y), stages=(stage,), epochs=2, batch_size=64, device="cpu", progress=False,
                             callback=lambda *a: marks.append(time.process_time()))
    out[stage] = n / h[stage][-1]["seconds"]
    out[stage + "_cpu"] = n / (marks[1] - marks[0])  # images per CPU-second: steady under other load
print("RESULT", json.dumps(out))
"""


def _run(tree: str, images: int, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=tree)
    p = subprocess.run([sys.executable, "-c", CHILD, str(images), str(threads)], capture_output=True, text=True,
                       env=env, cwd="/")
    if p.returncode:
        raise SystemExit(f"{tree}: {p.stderr[-2000:]}")
    return json.loads(p.stdout.split("RESULT", 1)[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", help="a checkout of the other commit (with its native module built or copied in)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    new = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = {"old": [], "new": []}
    for _ in range(a.repeats):
        for name, tree in (("old", a.old), ("new", new)):
            res[name].append(_run(tree, a.images, a.threads))
            print(name, res[name][-1], flush=True)
    for stage in ("distill", "ensemble", "distill_cpu", "ensemble_cpu"):
        o = statistics.median(r[stage] for r in res["old"])
        n = statistics.median(r[stage] for r in res["new"])
        unit = "img/CPU-s" if stage.endswith("_cpu") else "img/s"
        print(f"{stage}: old {o:.1f} {unit}, new {n:.1f} {unit}, new/old {n / o:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
