"""`devit-ext decompose`: a timm teacher (name + local weights) -> N sub-models in a new RUN directory."""
from __future__ import annotations

import argparse
import os

from .. import run_dir as R
from ..run_dir import RunError
from . import add_config_flag, positive, require, settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", default=None, metavar="NAME", help="timm model name, e.g. vit_base_patch16_224")
    p.add_argument("--teacher-checkpoint", default=None, metavar="FILE",
                   help="the teacher's weights: .safetensors, or a torch file loadable with weights_only=True")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="K=V",
                   help="timm.create_model keyword arguments, parsed as timm's train.py does (num_classes=10 img_size=32)")
    p.add_argument("--devices", type=int, default=None, metavar="N", help="number of devices (sub-models)")
    p.add_argument("--budgets", nargs="+", default=None, metavar="B",
                   help="one per device: F (a share of the teacher's FLOPs), flops=N, params=N, latency=F (a share "
                        "of the teacher's measured latency on --runtime) or latency_ms=X (default 0.4/N each)")
    p.add_argument("--runtime", choices=("torch", "onnxruntime"), default=None,
                   help="where latency budgets are measured (a short profile, cached; default torch), and where "
                        "FLOPs / params budgets prefer the faster shapes when given")
    p.add_argument("--partition", choices=("random", "similarity"), default="random",
                   help="class split: the paper's seeded random split, or clustering on --data")
    p.add_argument("--importance", choices=("magnitude", "taylor", "hsic"), default="magnitude",
                   help="which channels/heads to keep: weight norms (data-free) or on --data")
    p.add_argument("--fusion-init", choices=("scatter", "lstsq"), default="scatter")
    p.add_argument("--data", default=None, metavar="ROOT",
                   help="ImageFolder root; records the class names and feeds similarity/taylor/hsic/lstsq")
    p.add_argument("--split", default="train", help="split folder of --data to read (default: train)")
    p.add_argument("--max-samples", type=int, default=256, help="images of --data used (default 256)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, metavar="RUN", help="the run directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing RUN directory")
    add_config_flag(p)


def parse_budget(text) -> float | dict:
    """One --budgets entry: "0.1" (or a number from -c FILE) -> 0.1, "latency=0.1" -> {"latency": 0.1},
    and so on for each of budgets.COST_KEYS; the values' ranges are checked by `decompose`, naming budgets[i]."""
    from ..budgets import COST_KEYS

    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    kind, sep, value = str(text).partition("=")
    try:
        if not sep:
            return float(kind)
        if kind in COST_KEYS:
            return {kind: float(value)}
    except ValueError:
        pass
    raise RunError(f"--budgets: expected F or one of {', '.join(k + '=X' for k in COST_KEYS)}, got {text!r}")


def run(args) -> int:
    import torch

    from ..decomposition import decompose
    from ..imagefolder import as_batches, load_split, scan

    for name in ("teacher", "devices", "out"):
        require(args, name)
    n = positive("devices", args.devices)
    positive("max_samples", args.max_samples)
    positive("batch_size", args.batch_size)
    if args.budgets is not None and len(args.budgets) != n:
        raise RunError(f"--budgets: {len(args.budgets)} values for --devices {n}; give one per device")
    budgets = None if args.budgets is None else [parse_budget(b) for b in args.budgets]
    out = os.path.abspath(args.out)
    if os.path.exists(out) and os.listdir(out) and not args.overwrite:
        raise RunError(f"--out: {out} exists and is not empty (pass --overwrite to replace it)")
    needs_data = args.partition == "similarity" or args.importance != "magnitude" or args.fusion_init == "lstsq"
    if needs_data and not args.data:
        raise RunError("--data: needed by --partition similarity / --importance taylor|hsic / --fusion-init lstsq")

    kwargs = R.parse_kwargs(args.model_kwargs)
    folder = scan(args.data, args.split) if args.data else None  # data errors before building anything
    teacher = R.build_teacher(args.teacher, kwargs, args.teacher_checkpoint, seed=args.seed)
    if folder is not None and len(folder.classes) != teacher.num_classes:
        raise RunError(f"--data: {folder.root} has {len(folder.classes)} class folders, --teacher {args.teacher} "
                       f"has num_classes={teacher.num_classes} (set num_classes in --model-kwargs to match)")
    if n > teacher.num_classes:
        raise RunError(f"--devices: {n} devices but the teacher has {teacher.num_classes} classes")
    if args.teacher_checkpoint is None:
        print(f"decompose: no --teacher-checkpoint: the teacher is {args.teacher}'s random init (seed {args.seed})")
    dcfg = R.data_config(teacher)

    data = None
    if needs_data:
        ds = load_split(args.data, args.split, dcfg)
        g = torch.Generator().manual_seed(args.seed)
        idx = torch.randperm(len(ds), generator=g)[: args.max_samples].tolist()  # all classes, not the first few
        data = as_batches(torch.utils.data.Subset(ds, idx), args.batch_size, args.workers, desc="decompose: reading data")
    model = decompose(teacher, n, budgets=budgets, partition=args.partition, importance=args.importance,
                      data=data, seed=args.seed, fusion_init=args.fusion_init, max_samples=args.max_samples,
                      batch_size=args.batch_size, runtime=args.runtime)  # taylor needs gradients: no no_grad here

    rec = {
        "format": R.RUN_FORMAT,
        "teacher": R.teacher_record(args.teacher, kwargs, args.teacher_checkpoint, args.seed),
        "num_classes": int(teacher.num_classes),
        "classes": folder.classes if folder is not None else None,
        "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dcfg.items()},
    }
    def fill(tmp):
        model.save(os.path.join(tmp, R.DECOMPOSED_DIR))
        R.write_json(os.path.join(tmp, R.RUN_FILE), rec)
        R.write_args(tmp, "decompose", settings(args))

    R.build_beside(out, fill)  # never half a RUN
    print(model.summary())
    print(f"decompose: wrote {out} (model {os.path.join(out, R.DECOMPOSED_DIR)}, hash {model.content_hash()[:12]})")
    return 0
