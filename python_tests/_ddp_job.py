"""A DEKD run on sklearn's digits, started by the torchrun tests (one process or several).

    python _ddp_job.py TEACHER_DIR OUT_DIR RESULT_JSON [--resume] [--stop-after-distill] [--die-rank R] [--batch B]

Trains DEKD from the teacher saved in TEACHER_DIR, writes the test accuracy
and the history summary to RESULT_JSON (rank 0). `--stop-after-distill` exits
with code 3 after the last distill epoch (its checkpoint written);
`--die-rank R` makes rank R kill itself in the second distill epoch; `--batch B` sets the
per-process batch (default: a global batch of 64 over the processes).
"""
import json
import os
import signal
import sys

import torch

import devit_ext
from devit_ext import data as D
from devit_ext.evaluate import accuracy
from devit_ext.teacher import load_teacher

EPOCHS = (4, 6)
GLOBAL_BATCH = 64


def main(argv):
    teacher_dir, out_dir, result = argv[:3]
    flags = argv[3:]
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    die_rank = int(flags[flags.index("--die-rank") + 1]) if "--die-rank" in flags else -1
    per_process = int(flags[flags.index("--batch") + 1]) if "--batch" in flags else GLOBAL_BATCH // world
    splits = D.digits(seed=0)
    teacher, _ = load_teacher(teacher_dir)
    model = devit_ext.decompose(teacher, 2, budgets=[0.3, 0.3], seed=0)

    def callback(stage, epoch, rec):
        if stage == "distill" and epoch == 1 and rank == die_rank:
            os.kill(os.getpid(), signal.SIGKILL)
        if "--stop-after-distill" in flags and stage == "distill" and epoch == EPOCHS[0]:
            sys.exit(3)

    hist = devit_ext.train_dekd(model, teacher, splits.train, splits.val, epochs=EPOCHS,
                                batch_size=per_process, lr=3e-3, device="cpu", shift=1,
                                out_dir=out_dir, resume="--resume" in flags, progress=False, callback=callback,
                                dist_timeout=60)
    if rank == 0:
        acc = accuracy(model, splits.test, transfer="int8")
        with open(result, "w") as f:
            json.dump({"acc": acc, "world_size": hist["settings"]["world_size"],
                       "epochs": {s: len(hist[s]) for s in ("distill", "ensemble")}}, f)


if __name__ == "__main__":
    main(sys.argv[1:])
