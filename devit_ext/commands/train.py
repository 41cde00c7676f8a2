"""`devit-ext train RUN`: DEKD on an ImageFolder; `torchrun -m devit_ext train` for data-parallel.

The teacher is rebuilt from RUN/run.json (its checkpoint verified by sha256),
the student is RUN/decomposed, and train_dekd(out_dir=RUN) leaves the trained
model in RUN/model and its checkpoint in RUN/checkpoints (for --resume).
Image-level augmentation is chosen here: recipe "light" trains on timm's eval
transform (train_dekd adds its seeded pixel shifts), recipe "deit" on timm's
DeiT training transform (RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25);
the batch-level parts of that recipe are train_dekd's.
"""
from __future__ import annotations

import argparse
import os

from .. import run_dir as R
from ..run_dir import RunError
from . import add_config_flag, positive, require, settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run directory made by devit-ext decompose")
    p.add_argument("--data", default=None, metavar="ROOT", help="ImageFolder root (ROOT/<split>/<class>/*.png|jpg)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val", help="split that picks each stage's best epoch; 'none' for no validation")
    p.add_argument("--select", choices=("best", "last"), default="best",
                   help="which epoch each stage keeps: the best validated (default) or the last")
    p.add_argument("--recipe", choices=("light", "deit"), default="light")
    p.add_argument("--epochs", nargs="+", type=int, default=None, metavar="E",
                   help="epochs of stage 3 (distill) and stage 4 (ensemble): two numbers, or one for both")
    p.add_argument("--lr", nargs="+", type=float, default=None, metavar="LR", help="one value, or one per stage")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes per training process (default: from the CPU count)")
    p.add_argument("--seed", type=int, default=0)
    # recipe overrides, named as in timm's train.py (None: the recipe's value)
    p.add_argument("--mixup", type=float, default=None, help="mixup alpha (deit: 0.8)")
    p.add_argument("--cutmix", type=float, default=None, help="cutmix alpha (deit: 1.0)")
    p.add_argument("--smoothing", type=float, default=None, help="label smoothing (deit: 0.1)")
    p.add_argument("--model-ema-decay", type=float, default=None, help="weight EMA decay (0: off)")
    p.add_argument("--accum-steps", type=int, default=None, help="gradient accumulation steps")
    p.add_argument("--device-dropout", type=float, default=0.0,
                   help="probability of zeroing a device's token in stage 4 (robustness to missing devices)")
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoints (same settings required)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_flag(p)


def _per_stage(name: str, values):
    if values is None:
        return None
    if len(values) not in (1, 2):
        raise RunError(f"--{name}: expected one value or two (distill, ensemble), got {len(values)}")
    return values[0] if len(values) == 1 else tuple(values)


def _loader_opts(workers):
    if workers is None:
        return None  # train_dekd's default: workers from the CPU count
    # prefetch_factor only exists with workers; the trainer's defaults may carry one
    return {"num_workers": workers} if workers else {"num_workers": 0, "prefetch_factor": None}


def run(args) -> int:
    from ..dekd import train_dekd
    from ..imagefolder import load_split

    require(args, "data")
    positive("batch_size", args.batch_size)
    epochs = _per_stage("epochs", args.epochs)
    lr = _per_stage("lr", args.lr)
    if args.workers is not None and args.workers < 0:
        raise RunError(f"--workers: expected >= 0, got {args.workers}")

    rec = R.read_run(args.run)
    model = R.load_model(args.run, "decomposed")
    dcfg = rec["data_config"]
    train_ds = load_split(args.data, args.train_split, dcfg, training=True, recipe=args.recipe, flag="--train-split")
    R.check_classes(rec, train_ds.classes, "--train-split")
    val_ds = None
    if str(args.val_split).lower() != "none":
        val_ds = load_split(args.data, args.val_split, dcfg, flag="--val-split")
        R.check_classes(rec, val_ds.classes, "--val-split")
    teacher = R.teacher_from_record(rec["teacher"])

    if int(os.environ.get("RANK", "0")) == 0:
        R.write_args(args.run, "train", settings(args))
    # under torchrun (WORLD_SIZE > 1) train_dekd joins the process group and trains data-parallel; rank 0 writes RUN
    hist = train_dekd(model, teacher, train_ds, val_ds, epochs=epochs, lr=lr, batch_size=args.batch_size,
                      device=args.device, out_dir=args.run, resume=args.resume, seed=args.seed,
                      recipe=args.recipe, mixup=args.mixup, cutmix=args.cutmix, label_smoothing=args.smoothing,
                      ema_decay=args.model_ema_decay, accum_steps=args.accum_steps,
                      device_dropout=args.device_dropout, select=args.select,
                      loader_opts=_loader_opts(args.workers), progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    best = {s: v for s, v in hist.get("best", {}).items()}
    print(f"train: wrote {os.path.join(args.run, R.MODEL_DIR)}" + (f" (best val: {best})" if best else ""))
    return 0
