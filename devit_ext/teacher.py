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
import torch.nn.functional as F

from . import _trainutil as U
from .checkpoint import CKPT_DIR, check_settings, load_checkpoint, optimizer_from_flat, prefixed, save_checkpoint

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
    label_smoothing: float = 0.0,
    seed: int = 0,
    device=None,
    progress: bool = True,
    out_dir=None,
    resume: bool = False,
    callback: Callable[[int, dict], Any] | None = None,
    **arch,
):
    """Train `teacher` (or a new `build_teacher(**arch)`) with CE. Returns (teacher, history).

    `history` is a list of per-epoch dicts (loss, train_acc, val_acc, lr, seconds);
    the epoch with the best validation accuracy is restored at the end.

    With `out_dir`, a checkpoint (model, best model, optimizer, RNG, epoch,
    history) is written to `out_dir/checkpoint/` after every epoch.
    `resume=True` continues from it exactly (same settings required; without a
    checkpoint it starts from the beginning). `callback(epoch, record)` runs
    after each epoch's checkpoint.
    """
    from tqdm.auto import tqdm

    dev = U.resolve_device(device)
    x, y = U.as_tensors("train_data", train_data)
    if teacher is None:
        arch.setdefault("img_size", int(x.shape[-1]))
        arch.setdefault("in_chans", int(x.shape[1]))
        arch.setdefault("num_classes", int(y.max()) + 1)
        teacher = build_teacher(seed=seed, **arch)
    elif arch:
        raise TypeError(f"train_teacher: architecture arguments {sorted(arch)} given together with teacher=")
    C = int(teacher.num_classes)
    U.check_data("train_data", x, y, num_classes=C, image_shape=_images_shape(teacher), who="teacher")
    if val_data is not None:
        xv, yv = U.as_tensors("val_data", val_data)
        U.check_data("val_data", xv, yv, num_classes=C, image_shape=_images_shape(teacher), who="teacher")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"epochs/batch_size/lr: expected positive values, got {epochs}/{batch_size}/{lr}")
    if resume and out_dir is None:
        raise ValueError("resume: needs out_dir (where the checkpoints are)")
    ckdir = os.path.join(out_dir, CKPT_DIR) if out_dir is not None else None
    settings = {  # what makes a run this run: resuming with anything else would not continue it
        "epochs": int(epochs), "batch_size": int(batch_size), "lr": float(lr), "weight_decay": float(weight_decay),
        "shift": int(shift), "clip": float(clip), "label_smoothing": float(label_smoothing), "seed": int(seed),
        "num_train": int(x.shape[0]), "num_val": 0 if val_data is None else int(xv.shape[0]),
        "architecture": getattr(teacher, "devit_teacher_kwargs", None),
    }

    torch.manual_seed(seed)
    teacher.to(dev).train()
    opt = torch.optim.AdamW(U.param_groups([teacher], weight_decay), lr=lr, betas=(0.9, 0.999))
    steps_per_epoch = -(-x.shape[0] // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.2, div_factor=25, final_div_factor=1e3
    )
    history, best, best_state, start = [], -1.0, None, 0
    loaded = load_checkpoint(ckdir) if resume else None
    if loaded is not None:
        start, best, best_state, history = _restore(loaded, ckdir, settings, teacher, opt, sched, steps_per_epoch)
        if progress:
            tqdm.write(f"teacher: resumed from {ckdir} after epoch {start}/{epochs}")
    for epoch in range(start, epochs):
        t0 = time.time()
        g = U.generator(seed, 7, epoch)
        perm = torch.randperm(x.shape[0], generator=g)
        teacher.train()
        tot_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"teacher {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for s in bar:
            idx = perm[s * batch_size : (s + 1) * batch_size]
            xb = U.random_shift(x[idx], shift, g).to(dev)
            yb = y[idx].to(dev)
            with U.autocast(dev):
                logits = teacher(xb)
                if isinstance(logits, tuple):  # distilled teacher in distillation-training mode
                    logits = (logits[0] + logits[1]) / 2
                loss = F.cross_entropy(logits.float(), yb, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(teacher.parameters(), clip)
            opt.step()
            sched.step()
            tot_loss += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(-1) == yb).sum())
            seen += len(idx)
            bar.set_postfix(loss=f"{tot_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
        rec = {"epoch": epoch + 1, "loss": tot_loss / seen, "train_acc": correct / seen,
               "lr": opt.param_groups[0]["lr"]}
        if val_data is not None:
            rec["val_acc"] = accuracy(teacher, xv, yv, device=dev)
            if rec["val_acc"] > best:
                best = rec["val_acc"]
                best_state = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
        rec["seconds"] = time.time() - t0
        history.append(rec)
        if progress:
            msg = f"teacher epoch {epoch + 1}/{epochs}: loss {rec['loss']:.4f} train {rec['train_acc']:.4f}"
            if "val_acc" in rec:
                msg += f" val {rec['val_acc']:.4f}"
            tqdm.write(msg)
        if ckdir is not None:
            state = {"version": 1, "settings": settings, "epoch": epoch + 1, "best_val": best, "history": history}
            save_checkpoint(ckdir, model=teacher, best_state=best_state, opt=opt, state=state)
        if callback is not None:
            callback(epoch + 1, rec)
    if best_state is not None:
        teacher.load_state_dict(best_state)
    teacher.eval()
    return teacher, history


def _restore(loaded, ckdir, settings, teacher, opt, sched, steps_per_epoch):
    """Load a checkpoint into teacher/opt/sched; (next epoch, best val acc, best state or None, history)."""
    st, tensors = loaded
    check_settings(st, settings, ckdir)
    teacher.load_state_dict(prefixed(tensors, "model"))
    optimizer_from_flat(opt, "opt", tensors, st["optimizer"])  # lr and betas as the schedule left them
    torch.set_rng_state(tensors["rng.torch"])
    start = int(st["epoch"])
    # OneCycleLR computes each lr from its step count alone (plus the groups' initial/max/min lr,
    # restored above), so setting the count is the whole of its state
    sched.last_epoch = start * steps_per_epoch
    return start, float(st["best_val"]), prefixed(tensors, "best") or None, list(st["history"])


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, device=None, batch_size: int = 500) -> float:
    dev = U.resolve_device(device) if device is not None else next(model.parameters()).device
    was = model.training
    model.eval()
    logits = U.predict(model, x, batch_size, dev)
    model.train(was)
    return float((logits.argmax(-1) == y).float().mean())


def save_teacher(teacher: nn.Module, path, extra: dict | None = None) -> None:
    """`path/teacher.safetensors` + `path/teacher.json` (constructor kwargs of `build_teacher`, plus `extra`)."""
    from safetensors.torch import save_file

    kwargs = getattr(teacher, "devit_teacher_kwargs", None)
    if kwargs is None:
        raise ValueError("teacher: was not built by devit_ext.teacher.build_teacher; save it with timm instead")
    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in teacher.state_dict().items()}
    save_file(state, os.path.join(path, TEACHER_WEIGHTS))
    tmp = os.path.join(path, TEACHER_CONFIG + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"kwargs": kwargs, "extra": extra or {}}, f, indent=1)
    os.replace(tmp, os.path.join(path, TEACHER_CONFIG))


def load_teacher(path) -> tuple[nn.Module, dict]:
    """Inverse of `save_teacher`: (teacher in eval mode, extra)."""
    from safetensors.torch import load_file

    with open(os.path.join(path, TEACHER_CONFIG)) as f:
        cfg = json.load(f)
    kw = dict(cfg["kwargs"])
    kw.pop("class_token", None)
    kw.pop("global_pool", None)
    teacher = build_teacher(**kw)
    teacher.load_state_dict(load_file(os.path.join(path, TEACHER_WEIGHTS)))
    return teacher.eval(), cfg.get("extra", {})
