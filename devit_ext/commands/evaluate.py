"""`devit-ext evaluate RUN`: teacher vs DeViT on an ImageFolder split; table, JSON, plot.

One pass over the split, batch by batch (memory holds logits, never the
images). Accuracies of DeViT go through `collaborate` (fp32 and int8 tokens);
accuracy with devices missing is the path of `devit_ext.protocol.fused_forward(
transfer="int8", missing=...)` (zeros in place of a missing device's token, as
in training with device dropout), with each batch's tokens computed once for
all subsets. These calls sit in the "evaluation backend" functions below, so
the evaluation module they move to is one edit away.
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
    """DeViT's logits on the deployment path."""
    from ..engines import collaborate

    return collaborate(model, x, transfer=transfer, batch_size=batch_size, device=device).float().cpu()


def _int8_tokens(model, x) -> list[torch.Tensor]:
    """Each device's token after the int8 round trip: computed once per batch, reused for every missing subset."""
    from ..protocol import int8_roundtrip

    return [int8_roundtrip(t.float()) for t in model.forward_tokens(x)]


def _missing_logits(model, tokens: list[torch.Tensor], missing) -> torch.Tensor:
    """Fusion with zeros for the `missing` devices: devit_ext.protocol.fused_forward(transfer="int8", missing=...)."""
    tokens = [torch.zeros_like(t) if i in missing else t for i, t in enumerate(tokens)]
    return model.fusion(tokens).float().cpu()


def _local_logits(sub, token: torch.Tensor) -> torch.Tensor:
    z, zd = sub.forward_head(token)
    return (z if not sub.distilled else (z + zd) / 2).float().cpu()


# -- helpers ---------------------------------------------------------------------------


def topk(logits: torch.Tensor, y: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[-1])
    return int((logits.topk(k, dim=-1).indices == y[:, None]).any(-1).sum()) / len(y)


def _subsets(n: int, k: int, cap: int, seed: int = 0) -> list[tuple[int, ...]]:
    if math.comb(n, k) <= cap:
        return list(itertools.combinations(range(n), k))
    rng, seen = random.Random(seed + k), set()
    while len(seen) < cap:
        seen.add(tuple(sorted(rng.sample(range(n), k))))
    return sorted(seen)


def run(args) -> int:
    from ..evaluate import latency_ms
    from ..imagefolder import as_batches, load_split
    from ..protocol import message_bytes

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
    model.to(dev).eval()
    teacher.to(dev).eval()
    N, C = model.num_devices, model.num_classes
    subsets = {k: _subsets(N, k, args.max_subsets) for k in range(N)}
    every = sorted({s for ss in subsets.values() for s in ss} | {(i,) for i in range(N)})
    luts = []
    for g in model.class_groups:
        lut = torch.full((C,), -1, dtype=torch.long)
        lut[torch.as_tensor(g)] = torch.arange(len(g))
        luts.append(lut)
    logits = {"teacher": [], "fp32": [], "int8": []}
    ys, first = [], None
    own_correct, own_count = [0] * N, [0] * N
    missing_correct = dict.fromkeys(every, 0)
    # one pass over the split, batch by batch: memory holds logits, never the images
    with torch.inference_mode():
        for x, y in as_batches(ds, bs, args.workers, desc=f"evaluate {args.split}"):
            y = torch.as_tensor(y).long()
            x = x.to(dev)
            if first is None:
                first = x[: args.latency_batch]
            ys.append(y)
            logits["teacher"].append(teacher(x).float().cpu())
            for transfer in ("fp32", "int8"):
                logits[transfer].append(_devit_logits(model, x, transfer, bs, dev))
            for i, (sub, tok) in enumerate(zip(model.submodels, model.forward_tokens(x))):
                keep = luts[i][y] >= 0
                own_count[i] += int(keep.sum())
                own_correct[i] += int((_local_logits(sub, tok).argmax(-1)[keep] == luts[i][y][keep]).sum())
            q = _int8_tokens(model, x)
            for sset in every:
                missing_correct[sset] += int((_missing_logits(model, q, sset).argmax(-1) == y).sum())
    if not ys:
        raise RunError(f"--split: {ds.folder.root} has no images")
    y = torch.cat(ys)
    n = len(y)
    lg = {k: torch.cat(v) for k, v in logits.items()}

    out = {"run": os.path.abspath(args.run), "model": args.model, "model_hash": model.content_hash(),
           "split": args.split, "num_images": n, "classes": ds.classes}
    out["teacher"] = {"name": rec["teacher"]["name"], "top1": topk(lg["teacher"], y, 1),
                      "top5": topk(lg["teacher"], y, 5), "params": int(sum(p.numel() for p in teacher.parameters())),
                      "flops": int(model.meta["teacher_flops"])}
    fusion_params = int(sum(p.numel() for p in model.fusion.parameters()))
    out["devit"] = {t: {"top1": topk(lg[t], y, 1), "top5": topk(lg[t], y, 5)} for t in ("fp32", "int8")}
    out["devit"].update(flops=int(sum(model.flops()) + model.fusion_flops()),
                        params=int(sum(model.num_params()) + fusion_params))
    T = 2 if model.distilled else 1
    devices = []
    for i, (sub, g) in enumerate(zip(model.submodels, model.class_groups)):
        devices.append({"device": i, "classes": g, "class_names": [ds.classes[c] for c in g],
                        "own_classes_top1": own_correct[i] / own_count[i] if own_count[i] else None,
                        "own_classes_images": own_count[i],
                        "top1_without_this_device": missing_correct[(i,)] / n if N > 1 else None,
                        "params": int(sub.num_params()), "flops": int(sub.flops()),
                        "bytes_per_image": {t: message_bytes(sub.embed_dim, t, T) for t in ("int8", "fp16", "fp32")}})
    out["missing"] = []
    for k, ss in subsets.items():
        accs = [missing_correct[sset] / n for sset in ss]
        out["missing"].append({"k": k, "mean_top1": statistics.fmean(accs), "min_top1": min(accs),
                               "max_top1": max(accs), "subsets": len(accs)})
    xl = first
    if len(xl) < args.latency_batch:
        xl = xl.repeat((args.latency_batch + len(xl) - 1) // len(xl), 1, 1, 1)[: args.latency_batch]
    reps = args.latency_repeats
    out["teacher"]["latency_ms"] = latency_ms(teacher, xl, reps)
    with torch.inference_mode():
        toks = model.forward_tokens(xl)
    for d, sub in zip(devices, model.submodels):
        d["latency_ms"] = latency_ms(sub.forward_tokens, xl, reps)
    out["fusion"] = {"params": fusion_params, "flops": int(model.fusion_flops()),
                     "latency_ms": latency_ms(lambda _: model.fusion(toks), xl, reps)}
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
    from ..shapes import fmt_count as _fmt_count

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
