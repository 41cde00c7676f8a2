"""`train_dekd`: the staged DEKD trainer (stage "distill" per device, then stage "ensemble").

Data is streamed (`training.source`): any map-style Dataset of (image, label)
or a DataLoader over one is read batch by batch every epoch; in-memory tensor
sets are indexed directly. Under torchrun every process trains data-parallel
(`training.dist`); rank 0 alone writes the checkpoint and the model.

Checkpoints are written at the end of every epoch under `out_dir/checkpoint/`
(`devit_ext.checkpoint`: safetensors + JSON, never pickle); `resume=True`
restarts at the start of the epoch after the last completed one. Each epoch's
randomness (its plan, shifts, device dropout, Mixup, the loader workers'
seeds) comes from (seed, stage, epoch, rank), so a resumed run reproduces an
uninterrupted one (on the same machine and number of processes; with another
number of processes the global batches stay the same, their split changes).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Sequence

import torch

from ..checkpoint import CKPT_DIR, check_settings, load_checkpoint, optimizer_from_flat, prefixed, save_checkpoint
from ..training import common as U
from ..training import dist as D
from ..training import recipe as R
from ..training import sampling as S
from ..training.source import as_source, check_labels, check_shape
from ..training.stepper import Stepper, steps_per_epoch
from .config import DEFAULT_EPOCHS, DEFAULT_LR, STAGES, check_setup, per_stage, relation_pairs, set_trainable
from .stages import EpochIO, distill_epoch, ensemble_epoch, epoch_record, validate
from .subteachers import get_subteachers


def train_dekd(
    model,
    teacher,
    train_data,
    val_data=None,
    *,
    stages: Sequence[str] = STAGES,
    epochs=None,
    batch_size: int | None = None,
    lr=None,
    weight_decay: float = 0.05,
    warmup_epochs: float = 1.0,
    clip: float = 1.0,
    device=None,
    out_dir=None,
    resume: bool = False,
    quant_aware: bool = True,
    freeze_backbones: bool = False,
    subtask_teachers: str = "restricted",
    finetune_epochs: int = 2,
    finetune_lr: float = 5e-4,
    device_dropout: float = 0.0,
    alpha: float = 0.5,
    distill_kind: str = "hard",
    temperature: float = 1.0,
    relation_weights: Sequence[float] = (0.2, 0.1, 0.3),
    relation_layers="middle",
    token_weight: float = 1.0,
    shift: int = 0,
    seed: int = 0,
    select: str = "best",
    recipe="light",
    mixup: float | None = None,
    cutmix: float | None = None,
    label_smoothing: float | None = None,
    ema_decay: float | None = None,
    accum_steps: int | None = None,
    loader_opts: dict | None = None,
    dist_timeout: float = 1800.0,
    progress: bool = True,
    callback: Callable[[str, int, dict], Any] | None = None,
) -> dict:
    """Train `model` (a DeViT from `decompose(teacher, ...)`) by DEKD; returns the history.

    Data: `train_data`/`val_data` are map-style Datasets of (image tensor,
    int label), DataLoaders over them (their workers, pinning, collate and
    prefetch settings are used; batching and order are the trainer's), or
    (images, labels) tensors. `loader_opts` sets DataLoader options for a bare
    Dataset (default: workers from the CPU count, pinned memory on CUDA).
    `val_data` (never the test split) selects the best epoch of each stage
    (model or its EMA), restored at the end of the stage; without it the last
    epoch is kept. `select="last"` keeps each stage's last epoch (still
    validated every epoch; of the model and its EMA, the better at that epoch):
    for a schedule that anneals to zero and a validation split too small to
    rank epochs (the demo's 500 images: one image is 0.2 points).

    `recipe`: "light" (default: small data, the demo) or "deit" (the paper's:
    timm Mixup 0.8 / CutMix 1.0 with label smoothing 0.1, weight EMA, lr given
    per 512 images of global batch); `mixup`, `cutmix`, `label_smoothing`,
    `ema_decay`, `accum_steps` override its fields. The image transform
    (RandAugment, random erasing) is the data set's (see docs/training.md).

    `batch_size` is per process (global batch = batch_size x processes x
    accum_steps). `epochs`, `lr`: one value for both stages, a pair (distill,
    ensemble) or a dict by stage name. AdamW (no decay on norms, biases,
    tokens), linear warm-up for `warmup_epochs` then cosine decay, gradient
    clipping at `clip` (per sub-model in stage "distill"), bf16 autocast on CUDA.

    Under torchrun (WORLD_SIZE > 1) the processes train data-parallel (Gloo on
    CPU, NCCL on CUDA; `dist_timeout` seconds for a lost peer to be reported).
    With `out_dir`, a checkpoint is written after every epoch and the final
    model is saved to `out_dir/model` (`devit_ext.load`). `resume=True`
    continues from the checkpoint (same settings and class groups required;
    any number of processes). `callback(stage, epoch, record)` runs after each
    epoch's checkpoint.

    Returns {"distill": [per-epoch dict], "ensemble": [...], "best": {stage:
    {"epoch", "val_acc", "ema"}}, "settings": {...}}.
    """
    return D.run(_train, dict(locals()))


def _train(ctx, tqdm, *, model, teacher, train_data, val_data, stages, epochs, batch_size, lr, weight_decay,
           warmup_epochs, clip, out_dir, resume, quant_aware, freeze_backbones, subtask_teachers, finetune_epochs,
           finetune_lr, device_dropout, alpha, distill_kind, temperature, relation_weights, relation_layers,
           token_weight, shift, seed, select, recipe, mixup, cutmix, label_smoothing, ema_decay, accum_steps,
           loader_opts, dist_timeout, progress, callback) -> dict:
    dev = ctx.device
    progress = progress and ctx.is_main
    tcfg, stages = check_setup(model, teacher, stages, subtask_teachers, device_dropout, alpha, relation_weights)
    rcp = R.resolve(recipe, mixup=mixup, cutmix=cutmix, label_smoothing=label_smoothing, ema_decay=ema_decay,
                    accum_steps=accum_steps)
    if isinstance(train_data, torch.utils.data.DataLoader) and batch_size is None:
        batch_size = train_data.batch_size
    batch_size = U.count("batch_size", 64 if batch_size is None else batch_size, lo=1)
    epochs_by = per_stage("epochs", epochs, DEFAULT_EPOCHS, lambda v: U.count("epochs", v, lo=1))
    lr_by = per_stage("lr", lr, DEFAULT_LR, lambda v: U.real("lr", v, lo=0, lo_open=True))
    weight_decay = U.real("weight_decay", weight_decay, lo=0)
    warmup_epochs = U.real("warmup_epochs", warmup_epochs, lo=0)
    clip = U.real("clip", clip, lo=0)  # 0: no clipping
    finetune_epochs = U.count("finetune_epochs", finetune_epochs)
    finetune_lr = U.real("finetune_lr", finetune_lr, lo=0, lo_open=True)
    temperature = U.real("temperature", temperature, lo=0, lo_open=True)
    token_weight = U.real("token_weight", token_weight, lo=0)
    relation_weights = [U.real("relation_weights", w, lo=0) for w in relation_weights]
    shift = U.count("shift", shift)
    seed = U.count("seed", seed)
    if select not in ("best", "last"):
        raise ValueError(f"select: expected 'best' (the best validated epoch) or 'last', got {select!r}")
    U.real("dist_timeout", dist_timeout, lo=0, lo_open=True)
    if resume and out_dir is None:
        raise ValueError("resume: needs out_dir (where the checkpoints are)")

    C = model.num_classes
    shape = (tcfg["in_chans"], *tcfg["img_size"])
    ckdir = os.path.join(out_dir, CKPT_DIR) if out_dir is not None else None
    src_kw = dict(device=dev, loader_opts=loader_opts, cache_dir=ckdir, local_world=ctx.local_world)
    train = as_source("train_data", train_data, **src_kw)
    val = as_source("val_data", val_data, **src_kw) if val_data is not None else None
    for src in (train, val):
        if src is not None:
            check_labels(src.name, src.labels, C, "the model")
            check_shape(src.name, src.item_shape, shape, "the model")
    groups = model.class_groups
    lut = torch.full((C,), -1, dtype=torch.long)  # global class -> local index within its group
    owner = torch.full((C,), -1, dtype=torch.long)  # global class -> device
    for i, g in enumerate(groups):
        lut[torch.as_tensor(g)] = torch.arange(len(g))
        owner[torch.as_tensor(g)] = i
    group_idx = [torch.nonzero(owner[train.labels] == i, as_tuple=True)[0] for i in range(len(groups))]
    if "distill" in stages:
        for i, g in enumerate(groups):
            if len(group_idx[i]) == 0:
                raise ValueError(f"train_data: has no images of device {i}'s classes {g}; stage 'distill' needs some")
    pairs = relation_pairs(relation_layers, model, teacher)

    settings = {
        "stages": list(stages), "epochs": epochs_by, "lr": lr_by, "batch_size": batch_size,
        "weight_decay": weight_decay, "warmup_epochs": warmup_epochs, "clip": clip,
        "quant_aware": bool(quant_aware), "freeze_backbones": bool(freeze_backbones),
        "subtask_teachers": subtask_teachers, "finetune_epochs": finetune_epochs, "finetune_lr": finetune_lr,
        "device_dropout": float(device_dropout), "alpha": float(alpha), "distill_kind": distill_kind,
        "temperature": float(temperature), "relation_weights": [float(w) for w in relation_weights],
        "relation_pairs": [[list(p) for p in ps] for ps in pairs], "token_weight": float(token_weight),
        "shift": int(shift), "seed": int(seed), "select": select, "num_train": len(train),
        "num_val": 0 if val is None else len(val),
        "class_groups": model.class_groups, "widths": model.widths, "recipe": rcp.settings(),
    }
    history: dict[str, Any] = {s: [] for s in stages}
    history["best"] = {}
    history["settings"] = dict(settings, world_size=ctx.world, data=train.kind)

    model.to(dev)
    teacher.to(dev).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    # -- resume -----------------------------------------------------------------
    start_stage, start_epoch, ck, best_state, best_val = 0, 0, None, None, None
    loaded = load_checkpoint(ckdir) if resume else None
    if loaded is not None:
        st, tensors = loaded
        check_settings(st, settings, ckdir)
        model.load_state_dict(prefixed(tensors, "model"))
        start_stage, start_epoch = int(st["stage"]), int(st["epoch"])
        history.update({k: v for k, v in st["history"].items() if k != "settings"})
        ck = (st, tensors)
        best_val = st.get("best_val")
        best_state = prefixed(tensors, "best") or None
        if progress:
            tqdm.write(f"DEKD: resumed from {ckdir} at stage {start_stage + 1}, epoch {start_epoch + 1}")

    subteachers = None
    if "distill" in stages and subtask_teachers == "finetune" and start_stage == 0:
        subteachers = get_subteachers(ctx, teacher, groups, train, ckdir, epochs=finetune_epochs, lr=finetune_lr,
                                      batch_size=batch_size, shift=shift, seed=seed, progress=progress)

    for si in range(start_stage, len(stages)):
        stage = stages[si]
        n_epochs = epochs_by[stage]
        first = start_epoch if si == start_stage else 0
        if si != start_stage:
            ck, best_state, best_val = None, None, None
        set_trainable(model, stage, freeze_backbones)
        modules = [model] if stage == "ensemble" else list(model.submodels)
        opt = torch.optim.AdamW(U.param_groups(modules, weight_decay), lr=lr_by[stage])
        ema = R.make_ema(rcp, model)
        if ck is not None:
            if ck[0].get("optimizer") is not None:
                optimizer_from_flat(opt, "opt", ck[1], ck[0]["optimizer"])
            if ema is not None and prefixed(ck[1], "ema"):
                ema.module.load_state_dict(prefixed(ck[1], "ema"))
        even = rcp.mixes
        global_batch = batch_size * ctx.world
        if stage == "distill":
            micro = S.group_steps([len(ix) for ix in group_idx], global_batch)
            mixups = [R.make_mixup(rcp, len(g)) for g in groups] if rcp.mixes else None
        else:
            micro = -(-len(train) // global_batch)
            mixups = R.make_mixup(rcp, C)
        steps = steps_per_epoch(micro, rcp.accum_steps)
        total = steps * n_epochs
        warm = min(int(round(warmup_epochs * steps)) if total > 1 else 0, max(0, total - 1))
        base_lr = rcp.lr(lr_by[stage], global_batch * rcp.accum_steps)
        clip_groups = [list(m.parameters()) for m in model.submodels] if stage == "distill" else \
            [[p for p in model.parameters() if p.requires_grad]]
        for epoch in range(first, n_epochs):
            t0 = time.time()
            U.seed_everything(seed, si + 1, epoch, ctx.rank)
            g_plan = U.generator(seed, si + 1, epoch)  # the same on every process
            if stage == "distill":
                plan = S.grouped(group_idx, global_batch, g_plan, rank=ctx.rank, world=ctx.world, even=even)
            else:
                plan = S.shuffled(len(train), global_batch, g_plan, rank=ctx.rank, world=ctx.world, even=even)
            io = EpochIO(train, plan, seed=int(U.generator(seed, si + 1, epoch, 7, ctx.rank).initial_seed()),
                         g=U.generator(seed, si + 1, epoch, ctx.rank) if ctx.active else g_plan, dev=dev,
                         image_shape=shape,
                         bar=tqdm(total=len(plan), desc=f"DEKD {stage} {epoch + 1}/{n_epochs}", disable=not progress,
                                  leave=False), label=f"train_dekd: stage {stage!r} epoch {epoch + 1}")
            stepper = Stepper(opt, ctx=ctx, lr_at=lambda k: U.cosine_lr(epoch * steps + k, total, warm, base_lr),
                              clip=clip, clip_groups=clip_groups, accum_steps=rcp.accum_steps, ema=ema,
                              ema_source=model, step=0)
            common = dict(alpha=alpha, kind=distill_kind, temperature=temperature,
                          label_smoothing=0.0 if rcp.mixes else rcp.label_smoothing)
            if stage == "distill":
                sums = distill_epoch(io, model, teacher, subteachers, groups, lut, pairs, stepper,
                                     rweights=relation_weights, shift=shift, mixups=mixups, **common)
            else:
                sums = ensemble_epoch(io, model, teacher, stepper, token_weight=token_weight, quant_aware=quant_aware,
                                      device_dropout=device_dropout, freeze=freeze_backbones, shift=shift,
                                      mixup=mixups, **common)
            io.bar.close()
            rec = epoch_record(ctx, sums)
            rec["epoch"] = epoch + 1
            rec["lr"] = opt.param_groups[0]["lr"]
            rec["mixup"] = rcp.mixes
            if val is not None:
                vio = EpochIO(val, S.sequential(len(val), max(batch_size, 256), rank=ctx.rank, world=ctx.world),
                              seed=0, g=g_plan, dev=dev, image_shape=shape, bar=None)
                rec.update(validate(ctx, model, stage, vio, lut, owner, quant_aware))
                cands = [(rec["val_acc"], False, model)]
                if ema is not None:
                    rec["ema_val_acc"] = validate(ctx, ema.module, stage, vio, lut, owner, quant_aware)["val_acc"]
                    cands.append((rec["ema_val_acc"], True, ema.module))
                acc, is_ema, winner = max(cands, key=lambda c: c[0])
                last = epoch + 1 == n_epochs
                if (select == "last" and last) or (select == "best" and (best_val is None or acc > best_val)):
                    best_val = acc
                    best_state = {k: v.detach().clone().cpu() for k, v in winner.state_dict().items()}
                    history["best"][stage] = {"epoch": epoch + 1, "val_acc": best_val, "ema": is_ema}
            rec["seconds"] = round(time.time() - t0, 3)
            history[stage].append(rec)
            if progress:
                msg = " ".join(f"{k} {v:.4f}" for k, v in rec.items() if isinstance(v, float) and k not in ("lr", "seconds"))
                tqdm.write(f"DEKD {stage} epoch {epoch + 1}/{n_epochs}: {msg} ({rec['seconds']:.1f} s)")
            done = epoch + 1 == n_epochs
            if done and best_state is not None:
                model.load_state_dict(best_state)
            if ckdir is not None and ctx.is_main:
                state = {"version": 2, "settings": settings, "history": history, "best_val": best_val}
                if done:
                    state.update(stage=si + 1, epoch=0, best_val=None)
                    save_checkpoint(ckdir, model=model, best_state=None, opt=None, state=state)
                else:
                    state.update(stage=si, epoch=epoch + 1)
                    extra = {f"ema.{k}": v for k, v in ema.module.state_dict().items()} if ema is not None else None
                    save_checkpoint(ckdir, model=model, best_state=best_state, opt=opt, state=state, extra=extra)
            if callback is not None:
                callback(stage, epoch + 1, rec)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    if out_dir is not None and ctx.is_main:
        model.save(os.path.join(out_dir, "model"))
        tmp = os.path.join(out_dir, "history.json.tmp")
        with open(tmp, "w") as f:
            json.dump(history, f, indent=1)
        os.replace(tmp, os.path.join(out_dir, "history.json"))
    ctx.barrier()  # no process leaves (and tears the group down) before rank 0 has saved
    return history
