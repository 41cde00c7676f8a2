"""Train a small timm ViT (or DeiT-distilled ViT) teacher from scratch, and cache it.

No pretrained weights can be downloaded, so the demo trains its own teacher:
AdamW, one-cycle learning rate, +-2 pixel random shifts, gradient clipping,
model selection on the validation split. `save_teacher`/`load_teacher` keep it
as safetensors + a JSON config (the timm constructor arguments); no pickle.
With `out_dir`, a checkpoint (`devit_ext.checkpoint`) is written every epoch and
`resume=True` continues from it exactly: each epoch's shuffling and shifts come
from a generator seeded by (seed, epoch), and the one-cycle schedule is a
function of the step count, so weights + optimizer + epoch are the whole state.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import torch
import torch.nn as nn

from .checkpoint import CKPT_DIR, check_settings, load_checkpoint, optimizer_from_flat, prefixed, save_checkpoint
from .training import common as U
from .training import dist as D
from .training import recipe as R
from .training import sampling as S
from .training.source import as_source, check_batch, check_labels, check_shape
from .training.stepper import Stepper, steps_per_epoch

TEACHER_CONFIG = "teacher.json"
TEACHER_WEIGHTS = "teacher.safetensors"


def build_teacher(
    *,
    img_size: int = 28,
    patch_size: int = 7,
    in_chans: int = 1,
    num_classes: int = 10,
    embed_dim: int = 128,
    depth: int = 4,
    num_heads: int = 4,
    mlp_ratio: float = 4.0,
    distilled: bool = False,
    mean=None,
    std=None,
    seed: int = 0,
) -> nn.Module:
    """A timm VisionTransformer (class token, token pooling), or VisionTransformerDistilled when `distilled`."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    for name, v, lo in (("img_size", img_size, 1), ("patch_size", patch_size, 1), ("in_chans", in_chans, 1),
                        ("num_classes", num_classes, 1), ("embed_dim", embed_dim, 1), ("depth", depth, 1),
                        ("num_heads", num_heads, 1), ("seed", seed, 0)):
        U.count(name, v, lo=lo)  # floats are refused, not truncated
    U.real("mlp_ratio", mlp_ratio, lo=0, lo_open=True)
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim: {embed_dim} is not a multiple of num_heads {num_heads}")
    if img_size % patch_size:
        raise ValueError(f"img_size: {img_size} is not a multiple of patch_size {patch_size}")
    kwargs = dict(
        img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
        embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
        class_token=True, global_pool="token",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (VisionTransformerDistilled if distilled else VisionTransformer)(**kwargs)
    mean = list(mean) if mean is not None else [0.5] * in_chans
    std = list(std) if std is not None else [0.5] * in_chans
    model.pretrained_cfg = {"mean": tuple(mean), "std": tuple(std), "input_size": (in_chans, img_size, img_size),
                            "num_classes": num_classes}
    model.devit_teacher_kwargs = dict(kwargs, distilled=distilled, mean=mean, std=std)
    return model


def _images_shape(teacher) -> tuple[int, int, int]:
    cfg = getattr(teacher, "cfg", None)
    if isinstance(cfg, dict) and cfg.get("backbone") == "cct":  # a devit_ext CCT: no patch embedding
        return (int(cfg["in_chans"]), *map(int, cfg["img_size"]))
    pe = teacher.patch_embed
    h, w = pe.img_size if isinstance(pe.img_size, (tuple, list)) else (pe.img_size, pe.img_size)
    return (pe.proj.in_channels, int(h), int(w))


def train_teacher(
    train_data,
    val_data=None,
    *,
    teacher: nn.Module | None = None,
    epochs: int = 30,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    shift: int = 2,
    clip: float = 1.0,
    label_smoothing: float | None = None,
    seed: int = 0,
    device=None,
    progress: bool = True,
    out_dir=None,
    resume: bool = False,
    recipe="light",
    mixup: float | None = None,
    cutmix: float | None = None,
    ema_decay: float | None = None,
    accum_steps: int | None = None,
    warmup_epochs: float | None = None,
    loader_opts: dict | None = None,
    dist_timeout: float = 1800.0,
    callback: Callable[[int, dict], Any] | None = None,
    **arch,
):
    """Train `teacher` (or a new `build_teacher(**arch)`) with CE. Returns (teacher, history).

    Data as in `train_dekd`: a Dataset, a DataLoader over one (streamed every
    epoch) or (images, labels) tensors; `recipe` ("light" or "deit") and its
    overrides as there; `batch_size` per process; under torchrun the processes
    train data-parallel. `history` is a list of per-epoch dicts (loss,
    train_acc, val_acc, lr, seconds); the epoch with the best validation
    accuracy (model or EMA) is restored at the end.

    With `out_dir`, a checkpoint (model, best model, optimizer, epoch,
    history) is written to `out_dir/checkpoint/` after every epoch.
    `resume=True` continues from it exactly (same settings required; without a
    checkpoint it starts from the beginning). `callback(epoch, record)` runs
    after each epoch's checkpoint. The lr follows a one-cycle schedule whose
    warm-up is the first 20% of the epochs, or the first `warmup_epochs`
    (a fixed length, so longer runs do not also warm up for longer).
    """
    return D.run(_train, dict(locals()))


def _train(ctx, tqdm, *, train_data, val_data, teacher, epochs, batch_size, lr, weight_decay, shift, clip,
           label_smoothing, seed, progress, out_dir, resume, recipe, mixup, cutmix, ema_decay, accum_steps,
           warmup_epochs, loader_opts, dist_timeout, callback, arch):
    dev = ctx.device
    progress = progress and ctx.is_main
    rcp = R.resolve(recipe, mixup=mixup, cutmix=cutmix, label_smoothing=label_smoothing, ema_decay=ema_decay,
                    accum_steps=accum_steps)
    ckdir = os.path.join(out_dir, CKPT_DIR) if out_dir is not None else None
    src_kw = dict(device=dev, loader_opts=loader_opts, cache_dir=ckdir, local_world=ctx.local_world)
    train = as_source("train_data", train_data, **src_kw)
    if teacher is None:
        arch.setdefault("img_size", int(train.item_shape[-1]))
        arch.setdefault("in_chans", int(train.item_shape[0]))
        arch.setdefault("num_classes", int(train.labels.max()) + 1)
        teacher = build_teacher(seed=seed, **arch)
    elif arch:
        raise TypeError(f"train_teacher: architecture arguments {sorted(arch)} given together with teacher=")
    C = int(teacher.num_classes)
    shape = _images_shape(teacher)
    val = as_source("val_data", val_data, **src_kw) if val_data is not None else None
    for src in (train, val):
        if src is not None:
            check_labels(src.name, src.labels, C, "teacher")
            check_shape(src.name, src.item_shape, shape, "teacher")
    epochs, batch_size = U.count("epochs", epochs, lo=1), U.count("batch_size", batch_size, lo=1)
    lr = U.real("lr", lr, lo=0, lo_open=True)
    weight_decay, clip = U.real("weight_decay", weight_decay, lo=0), U.real("clip", clip, lo=0)
    shift, seed = U.count("shift", shift), U.count("seed", seed)
    U.real("dist_timeout", dist_timeout, lo=0, lo_open=True)
    if warmup_epochs is None:
        pct_start = 0.2
    else:
        warmup_epochs = U.real("warmup_epochs", warmup_epochs, lo=0, lo_open=True)
        if warmup_epochs >= epochs:
            raise ValueError(f"warmup_epochs: expected fewer than epochs={epochs}, got {warmup_epochs}")
        pct_start = warmup_epochs / epochs
    if resume and out_dir is None:
        raise ValueError("resume: needs out_dir (where the checkpoints are)")
    settings = {  # what makes a run this run: resuming with anything else would not continue it
        "epochs": int(epochs), "batch_size": int(batch_size), "lr": float(lr), "weight_decay": float(weight_decay),
        "shift": int(shift), "clip": float(clip), "seed": int(seed), "num_train": len(train),
        "num_val": 0 if val is None else len(val), "recipe": rcp.settings(),
        "architecture": _architecture(teacher),
    }
    if warmup_epochs is not None:  # absent when unset, so older checkpoints still resume
        settings["warmup_epochs"] = float(warmup_epochs)

    torch.manual_seed(seed)
    teacher.to(dev).train()
    opt = torch.optim.AdamW(U.param_groups([teacher], weight_decay), lr=lr, betas=(0.9, 0.999))
    global_batch = batch_size * ctx.world
    steps = steps_per_epoch(-(-len(train) // global_batch), rcp.accum_steps)
    max_lr = rcp.lr(lr, global_batch * rcp.accum_steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=max_lr, total_steps=epochs * steps, pct_start=pct_start, div_factor=25, final_div_factor=1e3
    )
    ema = R.make_ema(rcp, teacher)
    mix = R.make_mixup(rcp, C)
    history, best, best_state, start = [], -1.0, None, 0
    loaded = load_checkpoint(ckdir) if resume else None
    if loaded is not None:
        start, best, best_state, history = _restore(loaded, ckdir, settings, teacher, opt, sched, steps, ema)
        if progress:
            tqdm.write(f"teacher: resumed from {ckdir} after epoch {start}/{epochs}")
    stepper = Stepper(opt, ctx=ctx, lr_at=None, sched=sched, clip=clip, clip_groups=[list(teacher.parameters())],
                      accum_steps=rcp.accum_steps, ema=ema, ema_source=teacher, step=start * steps)
    ls = 0.0 if rcp.mixes else rcp.label_smoothing
    for epoch in range(start, epochs):
        t0 = time.time()
        U.seed_everything(seed, 7, epoch, ctx.rank)
        g = U.generator(seed, 7, epoch)
        plan = S.shuffled(len(train), global_batch, g, rank=ctx.rank, world=ctx.world, even=rcp.mixes)
        g_aug = U.generator(seed, 7, epoch, ctx.rank) if ctx.active else g
        teacher.train()
        sums = {"loss": 0.0, "correct": 0.0, "seen": 0.0}
        bar = tqdm(total=len(plan), desc=f"teacher {epoch + 1}/{epochs}", disable=not progress, leave=False)
        batches = train.batches(plan.batches, int(U.generator(seed, 7, epoch, 7, ctx.rank).initial_seed()))
        for k, (xb, yb) in enumerate(batches):
            xb, yb = check_batch(train.name, k, xb, yb, image_shape=shape, who="teacher")
            xb = U.random_shift(xb.to(dev, non_blocking=True), shift, g_aug)
            yb = yb.to(dev, non_blocking=True)
            target = yb
            if mix is not None:
                xb, target = mix(xb.clone(), yb)
            with U.autocast(dev):
                logits = teacher(xb)
                if isinstance(logits, tuple):  # distilled teacher in distillation-training mode
                    logits = (logits[0] + logits[1]) / 2
                loss = R.label_loss(logits, target, ls)
            stepper.backward(loss, last=k == len(plan) - 1, where=f"train_teacher: epoch {epoch + 1} batch {k}")
            sums["loss"] += float(loss.detach()) * len(yb)
            sums["correct"] += int((logits.argmax(-1) == yb).sum())
            sums["seen"] += len(yb)
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss'] / sums['seen']:.3f}", acc=f"{sums['correct'] / sums['seen']:.3f}")
        bar.close()
        tot = ctx.sum(sums)
        rec = {"epoch": epoch + 1, "loss": tot["loss"] / tot["seen"], "train_acc": tot["correct"] / tot["seen"],
               "lr": opt.param_groups[0]["lr"], "mixup": rcp.mixes}
        if val is not None:
            rec["val_acc"] = _val_acc(ctx, teacher, val, batch_size, dev, shape)
            cands = [(rec["val_acc"], teacher)]
            if ema is not None:
                rec["ema_val_acc"] = _val_acc(ctx, ema.module, val, batch_size, dev, shape)
                cands.append((rec["ema_val_acc"], ema.module))
            acc, winner = max(cands, key=lambda c: c[0])
            if acc > best:
                best = acc
                best_state = {k: v.detach().clone() for k, v in winner.state_dict().items()}
        rec["seconds"] = time.time() - t0
        history.append(rec)
        if progress:
            msg = f"teacher epoch {epoch + 1}/{epochs}: loss {rec['loss']:.4f} train {rec['train_acc']:.4f}"
            if "val_acc" in rec:
                msg += f" val {rec['val_acc']:.4f}"
            tqdm.write(msg)
        if ckdir is not None and ctx.is_main:
            state = {"version": 2, "settings": settings, "epoch": epoch + 1, "best_val": best, "history": history}
            extra = {f"ema.{k}": v for k, v in ema.module.state_dict().items()} if ema is not None else None
            save_checkpoint(ckdir, model=teacher, best_state=best_state, opt=opt, state=state, extra=extra)
        if callback is not None:
            callback(epoch + 1, rec)
    if best_state is not None:
        teacher.load_state_dict(best_state)
    teacher.eval()
    ctx.barrier()
    return teacher, history


@torch.no_grad()
def _val_acc(ctx, model, val, batch_size, dev, shape) -> float:
    was = model.training
    model.eval()
    correct = seen = 0
    plan = S.sequential(len(val), max(batch_size, 256), rank=ctx.rank, world=ctx.world)
    for k, (x, y) in enumerate(val.batches(plan.batches, 0)):
        x, y = check_batch(val.name, k, x, y, image_shape=shape, who="teacher")
        with U.autocast(dev):
            z = model(x.to(dev)).float()
        correct += int((z.argmax(-1).cpu() == y).sum())
        seen += len(y)
    model.train(was)
    tot = ctx.sum({"c": correct, "n": seen})
    return tot["c"] / max(tot["n"], 1.0)


def _restore(loaded, ckdir, settings, teacher, opt, sched, steps_per_epoch, ema):
    """Load a checkpoint into teacher/opt/sched; (next epoch, best val acc, best state or None, history)."""
    st, tensors = loaded
    check_settings(st, settings, ckdir)
    teacher.load_state_dict(prefixed(tensors, "model"))
    optimizer_from_flat(opt, "opt", tensors, st["optimizer"])  # lr and betas as the schedule left them
    if ema is not None:
        ema.module.load_state_dict(prefixed(tensors, "ema"))
    start = int(st["epoch"])
    # OneCycleLR computes each lr from its step count alone (plus the groups' initial/max/min lr,
    # restored above), so setting the count is the whole of its state
    sched.last_epoch = start * steps_per_epoch
    return start, float(st["best_val"]), prefixed(tensors, "best") or None, list(st["history"])


def _architecture(teacher: nn.Module) -> dict | None:
    """What rebuilds `teacher`: `build_teacher`'s kwargs, or a CCT's whole config (`{"cct": cfg}`)."""
    from .cct import CCT, teacher_config

    if isinstance(teacher, CCT):
        return {"cct": teacher_config(teacher)}
    return getattr(teacher, "devit_teacher_kwargs", None)


def save_teacher(teacher: nn.Module, path, extra: dict | None = None) -> None:
    """`path/teacher.safetensors` + `path/teacher.json` (plus `extra`): `{"kwargs": build_teacher's kwargs}` for a
    ViT built by `build_teacher`, `{"cct": config}` for a devit_ext CCT (any variant, e.g. from timm.create_model)."""
    from safetensors.torch import save_file

    arch = _architecture(teacher)
    if arch is None:
        raise ValueError(f"teacher: a {type(teacher).__name__} not built by devit_ext.teacher.build_teacher nor a "
                         "devit_ext CCT; save it with timm instead")
    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in teacher.state_dict().items()}
    save_file(state, os.path.join(path, TEACHER_WEIGHTS))
    tmp = os.path.join(path, TEACHER_CONFIG + ".tmp")
    with open(tmp, "w") as f:
        json.dump({**(arch if "cct" in arch else {"kwargs": arch}), "extra": extra or {}}, f, indent=1)
    os.replace(tmp, os.path.join(path, TEACHER_CONFIG))


def _cct_from_config(cfg: dict) -> nn.Module:
    """A CCT teacher from its saved config, with the data config timm readers expect (mean/std/input size)."""
    from .cct import CCT

    if not isinstance(cfg, dict) or cfg.get("backbone") != "cct":
        raise ValueError(f"{TEACHER_CONFIG}: 'cct' must hold a CCT config (backbone 'cct'), got {type(cfg).__name__}")
    teacher = CCT(cfg)
    teacher.pretrained_cfg = {"mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]),
                              "input_size": (cfg["in_chans"], *cfg["img_size"]), "num_classes": cfg["num_classes"]}
    return teacher


def load_teacher(path) -> tuple[nn.Module, dict]:
    """Inverse of `save_teacher`: (teacher in eval mode, extra)."""
    from safetensors.torch import load_file

    with open(os.path.join(path, TEACHER_CONFIG)) as f:
        cfg = json.load(f)
    if "cct" in cfg:
        teacher = _cct_from_config(cfg["cct"])
    else:
        kw = dict(cfg["kwargs"])
        kw.pop("class_token", None)
        kw.pop("global_pool", None)
        teacher = build_teacher(**kw)
    teacher.load_state_dict(load_file(os.path.join(path, TEACHER_WEIGHTS)))
    return teacher.eval(), cfg.get("extra", {})
