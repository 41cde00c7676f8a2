"""`devit-ext evaluate RUN`: teacher vs DeViT on an ImageFolder split; table, JSON, plot.

Accuracies of DeViT go through `collaborate` (fp32 and int8 tokens); accuracy
with devices missing through `devit_ext.dekd.evaluate(missing=...)` (zeros in
place of a missing device's token, as in training with device dropout). Both
calls sit in `_devit_logits` / `_missing_accuracy` so the evaluation module
they move to is one edit away.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import random
import statistics
import time

import torch

from .. import run_dir as R
from ..run_dir import RunError
from . import add_config_flag, positive, require, settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run directory (after devit-ext train, or --model decomposed)")
    p.add_argument("--data", default=None, metavar="ROOT", help="ImageFolder root")
    p.add_argument("--split", default="val")
    p.add_argument("--model", default="trained", choices=("trained", "decomposed"), help="RUN/model or RUN/decomposed")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="accuracy vs FLOPs and vs missing devices")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--max-subsets", type=int, default=20,
                   help="missing-device subsets per k averaged (all when fewer; else a seeded sample)")
    p.add_argument("--latency-batch", type=int, default=1, help="images per timed call (default 1)")
    p.add_argument("--latency-repeats", type=int, default=10)
    p.add_argument("--workers", type=int, default=0)
    add_config_flag(p)


# -- the evaluation backend (one place) ------------------------------------------------


def _devit_logits(model, x, transfer: str, batch_size: int, device) -> torch.Tensor:
    from ..engines import collaborate

    return collaborate(model, x, transfer=transfer, batch_size=batch_size, device=device).float().cpu()


def _missing_accuracy(model, x, y, missing, batch_size: int, device) -> float:
    from ..dekd import evaluate

    return evaluate(model, (x, y), transfer="int8", missing=list(missing), batch_size=batch_size, device=device)


# -- helpers ---------------------------------------------------------------------------


@torch.inference_mode()
def _predict(fn, x, batch_size, device) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])


def topk(logits: torch.Tensor, y: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[-1])
    return int((logits.topk(k, dim=-1).indices == y[:, None]).any(-1).sum()) / len(y)


@torch.inference_mode()
def _latency_ms(fn, x, repeats: int) -> float:
    fn(x)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _subsets(n: int, k: int, cap: int, seed: int = 0) -> list[tuple[int, ...]]:
    if math.comb(n, k) <= cap:
        return list(itertools.combinations(range(n), k))
    rng, seen = random.Random(seed + k), set()
    while len(seen) < cap:
        seen.add(tuple(sorted(rng.sample(range(n), k))))
    return sorted(seen)


def run(args) -> int:
    from tqdm.auto import tqdm

    from ..engines.common import message_bytes
    from ..imagefolder import as_tensors, load_split

    require(args, "data")
    bs = positive("batch_size", args.batch_size)
    positive("max_subsets", args.max_subsets)
    positive("latency_repeats", args.latency_repeats)
    positive("latency_batch", args.latency_batch)
    from ..training.common import resolve_device

    dev = resolve_device(args.device)
    rec = R.read_run(args.run)
    model = R.load_model(args.run, args.model)
    ds = load_split(args.data, args.split, rec["data_config"], flag="--split")
    R.check_classes(rec, ds.classes, "--split")
    teacher = R.teacher_from_record(rec["teacher"])
    x, y = as_tensors(ds, bs, args.workers, desc=f"evaluate: reading {args.split}")
    model.to(dev).eval()
    teacher.to(dev).eval()

    out = {"run": os.path.abspath(args.run), "model": args.model, "model_hash": model.content_hash(),
           "split": args.split, "num_images": len(y), "classes": ds.classes}
    N = model.num_devices
    bar = tqdm(total=4 + 2 * N, desc="evaluate", leave=False)  # teacher, fp32, int8, devices, missing k, latency
    tl = _predict(teacher, x, bs, dev)
    bar.update()
    out["teacher"] = {"name": rec["teacher"]["name"], "top1": topk(tl, y, 1), "top5": topk(tl, y, 5),
                      "params": int(sum(p.numel() for p in teacher.parameters())),
                      "flops": int(model.meta["teacher_flops"])}
    out["devit"] = {}
    for transfer in ("fp32", "int8"):
        lg = _devit_logits(model, x, transfer, bs, dev)
        out["devit"][transfer] = {"top1": topk(lg, y, 1), "top5": topk(lg, y, 5)}
        bar.update()
    fusion_params = int(sum(p.numel() for p in model.fusion.parameters()))
    out["devit"].update(flops=int(sum(model.flops()) + model.fusion_flops()),
                        params=int(sum(model.num_params()) + fusion_params))
    T = 2 if model.distilled else 1
    devices = []
    for i, (sub, g) in enumerate(zip(model.submodels, model.class_groups)):
        lut = torch.full((model.num_classes,), -1, dtype=torch.long)
        lut[torch.as_tensor(g)] = torch.arange(len(g))
        keep = lut[y] >= 0
        acc = None
        if bool(keep.any()):
            acc = int((_predict(sub, x[keep], bs, dev).argmax(-1) == lut[y[keep]]).sum()) / int(keep.sum())
        devices.append({"device": i, "classes": g, "class_names": [ds.classes[c] for c in g],
                        "own_classes_top1": acc, "own_classes_images": int(keep.sum()),
                        "params": int(sub.num_params()), "flops": int(sub.flops()),
                        "bytes_per_image": {t: message_bytes(sub.embed_dim, t, T) for t in ("int8", "fp16", "fp32")}})
        bar.update()
    missing = []
    for k in range(N):
        accs = [_missing_accuracy(model, x, y, s, bs, dev) for s in _subsets(N, k, args.max_subsets)]
        missing.append({"k": k, "mean_top1": statistics.fmean(accs), "min_top1": min(accs), "max_top1": max(accs),
                        "subsets": len(accs)})
        if k == 1:
            for i, d in enumerate(devices):
                d["top1_without_this_device"] = _missing_accuracy(model, x, y, [i], bs, dev)
        bar.update()
    out["missing"] = missing
    xl = x[: args.latency_batch].to(dev)
    if len(xl) < args.latency_batch:
        xl = xl.repeat((args.latency_batch + len(xl) - 1) // len(xl), 1, 1, 1)[: args.latency_batch]
    reps = args.latency_repeats
    out["teacher"]["latency_ms"] = _latency_ms(teacher, xl, reps)
    toks = []
    for d, sub in zip(devices, model.submodels):
        d["latency_ms"] = _latency_ms(sub.forward_tokens, xl, reps)
        toks.append(sub.forward_tokens(xl).detach())
    out["fusion"] = {"params": fusion_params, "flops": int(model.fusion_flops()),
                     "latency_ms": _latency_ms(lambda _: model.fusion(toks), xl, reps)}
    bar.update()
    bar.close()
    out["devices"] = devices
    out["latency"] = {"batch_size": args.latency_batch, "repeats": reps, "statistic": "median",
                      "device": str(dev), "threads": torch.get_num_threads(), "load_avg_1min": os.getloadavg()[0]}

    print(table(out))
    if args.json:
        R.write_json(args.json, out)
        print(f"evaluate: wrote {args.json}")
    if args.plot:
        from .plot import plot_evaluation

        plot_evaluation(out, args.plot)
        print(f"evaluate: wrote {args.plot}")
    if os.path.isdir(args.run):
        R.write_args(args.run, "evaluate", settings(args))
    return 0


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def table(out: dict) -> str:
    from ..decomposition import _fmt_count

    rows = [("model", "top-1 %", "top-5 %", "params", "FLOPs", "bytes/img int8", "latency ms")]
    t = out["teacher"]
    rows.append((f"teacher {t['name']}", _pct(t["top1"]), _pct(t["top5"]), _fmt_count(t["params"]),
                 _fmt_count(t["flops"]), "-", f"{t['latency_ms']:.3f}"))
    for tr in ("fp32", "int8"):
        d = out["devit"][tr]
        rows.append((f"DeViT {tr} tokens", _pct(d["top1"]), _pct(d["top5"]), _fmt_count(out["devit"]["params"]),
                     _fmt_count(out["devit"]["flops"]),
                     str(sum(x["bytes_per_image"][tr] for x in out["devices"])), "-"))
    for d in out["devices"]:
        rows.append((f"device {d['device']} (own {len(d['classes'])} classes)", _pct(d["own_classes_top1"]), "-",
                     _fmt_count(d["params"]), _fmt_count(d["flops"]), str(d["bytes_per_image"]["int8"]),
                     f"{d['latency_ms']:.3f}"))
    f = out["fusion"]
    rows.append(("fusion head", "-", "-", _fmt_count(f["params"]), _fmt_count(f["flops"]), "-", f"{f['latency_ms']:.3f}"))
    w = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(r[0].ljust(w[0]) if c == 0 else r[c].rjust(w[c]) for c, _ in enumerate(r)) for r in rows]
    lines.insert(1, "  ".join("-" * v for v in w))
    miss = "  ".join(f"k={m['k']}: {_pct(m['mean_top1'])}" for m in out["missing"])
    single = "  ".join(f"-{d['device']}: {_pct(d.get('top1_without_this_device'))}" for d in out["devices"])
    lat = out["latency"]
    return "\n".join([f"{out['split']}: {out['num_images']} images, {len(out['classes'])} classes", *lines,
                      f"top-1 % with k devices missing (int8, mean over subsets): {miss}",
                      f"top-1 % without one device: {single}" if len(out["devices"]) > 1 else "",
                      f"latency: median of {lat['repeats']} calls of batch {lat['batch_size']} on {lat['device']}, "
                      f"{lat['threads']} threads, load {lat['load_avg_1min']:.2f}"]).rstrip()
