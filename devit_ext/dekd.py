"""DEKD: decomposition-and-ensemble knowledge distillation (stages 3 and 4 of METHOD.md).

Losses (pure functions, tested against hand-computed values) and the staged
trainer `train_dekd`:

- stage "distill" (per device): each sub-model learns its class group from the
  teacher restricted to that group (or a fine-tuned copy per group):
  (1-a) CE(z_cls, y) + a * CE(z_dist, argmax z_T) + sum_X g_X KL(R_T^X || R_S^X)
  with X in Q, K, V of the middle block pair (relations make any widths comparable);
- stage "ensemble": fused logits on the full data:
  w * MSE(linear_map(tokens), teacher token) + (1-a) CE(z, y) + a * CE(z, argmax z_T),
  tokens passed through int8 quantise/dequantise (straight-through) when
  `quant_aware`, and optionally a random device dropped per sample
  (`device_dropout`) so answers with a missing device (zeros) stay useful.

Checkpoints (every epoch, under `out_dir/checkpoint/`): `weights.safetensors`
(model, best model, optimizer tensors, RNG) + `state.json` (stage, epoch,
history, optimizer hyper-parameters, settings), written by `devit_ext.checkpoint`.
Never pickle. All randomness of an epoch comes from generators seeded by
(seed, stage, epoch), so a resumed run reproduces an uninterrupted one bit for
bit (on the same machine).
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _trainutil as U
from .checkpoint import CKPT_DIR, check_settings, load_checkpoint, optimizer_from_flat, prefixed, save_checkpoint
from .teacher import train_teacher

STAGES = ("distill", "ensemble")
DEFAULT_EPOCHS = {"distill": 10, "ensemble": 10}
DEFAULT_LR = {"distill": 1e-3, "ensemble": 1e-3}
SUBTEACHERS_FILE = "subtask_teachers.safetensors"

# ---------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------


def hard_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """CE(student, argmax teacher): DeiT's hard distillation."""
    return F.cross_entropy(student_logits.float(), teacher_logits.argmax(-1))


def soft_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(z_T / T) || softmax(z_S / T)), mean over the batch."""
    T = float(temperature)
    log_s = F.log_softmax(student_logits.float() / T, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / T, dim=-1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * (T * T)


def distillation_loss(student_logits, teacher_logits, kind: str = "hard", temperature: float = 1.0) -> torch.Tensor:
    if kind == "hard":
        return hard_distillation(student_logits, teacher_logits)
    if kind == "soft":
        return soft_distillation(student_logits, teacher_logits, temperature)
    raise ValueError(f"distill_kind: expected 'hard' or 'soft', got {kind!r}")


def relation_log_matrix(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """log row-softmax(X X^T / sqrt(d_h)) for X (B, N, width): (B, N, N), fp32."""
    x = x.float()
    return F.log_softmax(x @ x.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)


def relation_loss(x_teacher: torch.Tensor, x_student: torch.Tensor, head_dim_teacher: int, head_dim_student: int | None = None) -> torch.Tensor:
    """KL(R_T || R_S), summed over each row's N entries, mean over batch and rows.

    Widths may differ (that is the point); token counts must agree.
    """
    if x_teacher.shape[:2] != x_student.shape[:2]:
        raise ValueError(
            f"relation_loss: teacher features {tuple(x_teacher.shape)} and student features "
            f"{tuple(x_student.shape)} differ in batch or token count (same image and patch size needed)"
        )
    log_t = relation_log_matrix(x_teacher.detach(), head_dim_teacher)
    log_s = relation_log_matrix(x_student, head_dim_student or head_dim_teacher)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean()


def split_qkv(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The output of `attn.qkv` (B, N, 3*H*D) -> Q, K, V each (B, N, H*D) (heads concatenated)."""
    return qkv.chunk(3, dim=-1)


def qkv_relation_loss(qkv_teacher, qkv_student, head_dim_teacher, head_dim_student, weights=(0.2, 0.1, 0.3)) -> torch.Tensor:
    """g_Q L_Q + g_K L_K + g_V L_V for one block pair."""
    total = qkv_student.new_zeros((), dtype=torch.float32)
    for w, xt, xs in zip(weights, split_qkv(qkv_teacher), split_qkv(qkv_student)):
        if w:
            total = total + w * relation_loss(xt, xs, head_dim_teacher, head_dim_student)
    return total


def token_mse(mapped: Sequence[torch.Tensor], teacher_tokens: Sequence[torch.Tensor]) -> torch.Tensor:
    """MSE between the fusion head's linear map and the teacher's final token(s), averaged over branches."""
    losses = [F.mse_loss(m.float(), t.float()) for m, t in zip(mapped, teacher_tokens)]
    return sum(losses) / len(losses)


def int8_roundtrip(tokens: torch.Tensor) -> torch.Tensor:
    """dequantize(quantize(tokens)) with the int8 transfer ops (per-vector symmetric scale)."""
    from . import ops

    q, s = ops.quantize_int8(tokens)
    return ops.dequantize_int8(q, s, dtype=tokens.dtype)


def fake_quant_int8(tokens: torch.Tensor) -> torch.Tensor:
    """int8 quantise/dequantise in the forward pass, identity gradient (straight-through)."""
    return tokens + (int8_roundtrip(tokens.detach()) - tokens).detach()


# ---------------------------------------------------------------------------
# Capturing Q/K/V
# ---------------------------------------------------------------------------


class QKVCapture:
    """Forward hooks on `module.blocks[k].attn.qkv` for k in `layers`; `.out[k]` is (B, N, 3*H*D)."""

    def __init__(self, module: nn.Module, layers: Sequence[int]):
        self.out: dict[int, torch.Tensor] = {}
        self.handles = []
        for k in sorted(set(layers)):
            self.handles.append(module.blocks[k].attn.qkv.register_forward_hook(self._hook(k)))

    def _hook(self, k):
        def fn(_mod, _inp, out):
            self.out[k] = out

        return fn

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles = []
        self.out = {}


def _head_dim(module: nn.Module, k: int) -> int:
    return int(module.blocks[k].attn.head_dim)


def middle_block(depth: int) -> int:
    """Block L/2 - 1 (0-based), as in the paper; 0 for a one-block model."""
    return max(0, depth // 2 - 1)


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------


def _per_stage(name: str, value, default: dict, cast) -> dict:
    if value is None:
        return dict(default)
    if isinstance(value, dict):
        unknown = set(value) - set(STAGES)
        if unknown:
            raise ValueError(f"{name}: unknown stage(s) {sorted(unknown)}; stages are {list(STAGES)}")
        out = dict(default)
        out.update({k: cast(v) for k, v in value.items()})
        return out
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name}: expected one value or (distill, ensemble), got {value!r}")
        return {"distill": cast(value[0]), "ensemble": cast(value[1])}
    return {s: cast(value) for s in STAGES}


def _check_setup(model, teacher, stages, subtask_teachers, device_dropout, alpha, relation_weights):
    from .model import DeViT, teacher_config

    if not isinstance(model, DeViT):
        raise TypeError(f"model: expected a devit_ext.DeViT (from devit_ext.decompose), got {type(model).__name__}")
    tcfg = teacher_config(teacher)  # clear error for a non-ViT teacher
    if tcfg["num_classes"] != model.num_classes:
        raise ValueError(
            f"teacher: has {tcfg['num_classes']} classes but model has {model.num_classes}; "
            "decompose this teacher, or pass the teacher the model was decomposed from"
        )
    scfg = model.submodels[0].cfg
    if list(tcfg["img_size"]) != list(scfg["img_size"]) or tcfg["in_chans"] != scfg["in_chans"]:
        raise ValueError(
            f"teacher: takes {tcfg['in_chans']}x{tcfg['img_size'][0]}x{tcfg['img_size'][1]} images but the "
            f"model takes {scfg['in_chans']}x{scfg['img_size'][0]}x{scfg['img_size'][1]}"
        )
    if bool(tcfg["distilled"]) != bool(model.distilled):
        raise ValueError(
            f"teacher: distilled={tcfg['distilled']} but model.distilled={model.distilled}; "
            "a DeiT-distilled teacher needs a model decomposed from it (two tokens per device)"
        )
    groups = model.class_groups
    flat = sorted(c for g in groups for c in g)
    if flat != list(range(model.num_classes)) or any(len(g) == 0 for g in groups):
        raise ValueError("model: class_groups must be non-empty, disjoint and cover 0..num_classes-1")
    stages = tuple(stages)
    if not stages or any(s not in STAGES for s in stages) or len(set(stages)) != len(stages):
        raise ValueError(f"stages: expected a non-empty subset of {STAGES} in that order, got {stages!r}")
    if list(stages) != [s for s in STAGES if s in stages]:
        raise ValueError(f"stages: must run in the order {STAGES}, got {stages!r}")
    if subtask_teachers not in ("restricted", "finetune"):
        raise ValueError(f"subtask_teachers: expected 'restricted' or 'finetune', got {subtask_teachers!r}")
    if not 0.0 <= float(device_dropout) < 1.0:
        raise ValueError(f"device_dropout: expected a probability in [0, 1), got {device_dropout!r}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha: expected a weight in [0, 1], got {alpha!r}")
    if len(tuple(relation_weights)) != 3:
        raise ValueError(f"relation_weights: expected (g_Q, g_K, g_V), got {relation_weights!r}")
    return tcfg, stages


def _relation_pairs(relation_layers, model, teacher) -> list[list[tuple[int, int]]]:
    """Per device, the (student block, teacher block) pairs to match."""
    lt_depth = len(teacher.blocks)
    out = []
    for i, m in enumerate(model.submodels):
        ls_depth = len(m.blocks)
        if relation_layers in (None, "none", ()):
            pairs = []
        elif relation_layers == "middle":
            pairs = [(middle_block(ls_depth), middle_block(lt_depth))]
        else:
            try:
                pairs = [(int(a), int(b)) for a, b in relation_layers]
            except (TypeError, ValueError):
                raise ValueError(
                    f"relation_layers: expected 'middle', None or a list of (student_block, teacher_block), "
                    f"got {relation_layers!r}"
                ) from None
            pairs = [(a % ls_depth if a < 0 else a, b % lt_depth if b < 0 else b) for a, b in pairs]
            for a, b in pairs:
                if not (0 <= a < ls_depth and 0 <= b < lt_depth):
                    raise ValueError(
                        f"relation_layers: pair ({a}, {b}) out of range for device {i} "
                        f"({ls_depth} blocks) and the teacher ({lt_depth} blocks)"
                    )
        out.append(pairs)
    return out


# ---------------------------------------------------------------------------
# Sub-task teachers
# ---------------------------------------------------------------------------


def _restrict_head(teacher: nn.Module, classes: list[int]) -> nn.Module:
    t = copy.deepcopy(teacher)
    idx = torch.as_tensor(classes)
    for name in ("head", "head_dist"):
        old = getattr(t, name, None)
        if isinstance(old, nn.Linear):
            new = nn.Linear(old.in_features, len(classes), bias=old.bias is not None).to(old.weight.device)
            with torch.no_grad():
                new.weight.copy_(old.weight[idx])
                if old.bias is not None:
                    new.bias.copy_(old.bias[idx])
            setattr(t, name, new)
    t.num_classes = len(classes)
    return t


def _finetune_subteachers(teacher, groups, x, y, *, epochs, lr, batch_size, shift, seed, dev, progress):
    """A copy of the teacher per group with the head restricted to the group, fine-tuned on its images (CE)."""
    out = []
    for i, g in enumerate(groups):
        t = _restrict_head(teacher, g)
        lut = torch.full((int(y.max()) + 1,), -1, dtype=torch.long)
        lut[torch.as_tensor(g)] = torch.arange(len(g))
        keep = lut[y] >= 0
        xs, ys = x[keep], lut[y[keep]]
        if epochs > 0:
            t, _ = train_teacher((xs, ys), None, teacher=t, epochs=epochs, batch_size=batch_size, lr=lr,
                                 shift=shift, seed=seed + 101 * (i + 1), device=dev, progress=progress)
        out.append(t.eval())
    return out


# ---------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------


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
    progress: bool = True,
    callback: Callable[[str, int, dict], Any] | None = None,
) -> dict:
    """Train `model` (a DeViT from `decompose(teacher, ...)`) by DEKD; returns the history.

    Data: `train_data`/`val_data` are Datasets of (image, int label) or
    DataLoaders over them (only their dataset is used: batching, shuffling and
    the +-`shift` pixel augmentation are done here, seeded). `val_data` (never
    the test split) selects the best epoch of each stage, which is restored at
    the end of the stage; without it the last epoch is kept.

    `epochs`, `lr`: one value for both stages, a pair (distill, ensemble) or a
    dict by stage name. AdamW (no decay on norms, biases, tokens), linear
    warm-up for `warmup_epochs` then cosine decay, gradient clipping at `clip`
    (per sub-model in stage "distill"), bf16 autocast on CUDA.

    With `out_dir`, a checkpoint is written after every epoch and the final
    model is saved to `out_dir/model` (`devit_ext.load`). `resume=True`
    continues from the checkpoint exactly (same settings and class groups
    required; without a checkpoint it starts from the beginning). `callback(stage,
    epoch, record)` runs after each epoch's checkpoint.

    Returns {"distill": [per-epoch dict], "ensemble": [...], "best": {stage:
    {"epoch", "val_acc"}}, "settings": {...}}.
    """
    from tqdm.auto import tqdm

    dev = U.resolve_device(device)
    tcfg, stages = _check_setup(model, teacher, stages, subtask_teachers, device_dropout, alpha, relation_weights)
    if isinstance(train_data, torch.utils.data.DataLoader) and batch_size is None:
        batch_size = train_data.batch_size
    batch_size = int(batch_size or 64)
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    epochs_by = _per_stage("epochs", epochs, DEFAULT_EPOCHS, int)
    lr_by = _per_stage("lr", lr, DEFAULT_LR, float)
    for s in stages:
        if epochs_by[s] < 1:
            raise ValueError(f"epochs: stage {s!r} needs at least 1 epoch, got {epochs_by[s]}")
        if lr_by[s] <= 0:
            raise ValueError(f"lr: stage {s!r} needs a positive learning rate, got {lr_by[s]}")
    if resume and out_dir is None:
        raise ValueError("resume: needs out_dir (where the checkpoints are)")

    C = model.num_classes
    shape = (tcfg["in_chans"], *tcfg["img_size"])
    x, y = U.as_tensors("train_data", train_data)
    U.check_data("train_data", x, y, num_classes=C, image_shape=shape, who="the model")
    xv = yv = None
    if val_data is not None:
        xv, yv = U.as_tensors("val_data", val_data)
        U.check_data("val_data", xv, yv, num_classes=C, image_shape=shape, who="the model")
    groups = model.class_groups
    lut = torch.full((C,), -1, dtype=torch.long)  # global class -> local index within its group
    owner = torch.full((C,), -1, dtype=torch.long)  # global class -> device
    for i, g in enumerate(groups):
        lut[torch.as_tensor(g)] = torch.arange(len(g))
        owner[torch.as_tensor(g)] = i
    if "distill" in stages:
        for i, g in enumerate(groups):
            if not bool(torch.isin(y, torch.as_tensor(g)).any()):
                raise ValueError(f"train_data: has no images of device {i}'s classes {g}; stage 'distill' needs some")
    pairs = _relation_pairs(relation_layers, model, teacher)

    settings = {
        "stages": list(stages), "epochs": epochs_by, "lr": lr_by, "batch_size": batch_size,
        "weight_decay": weight_decay, "warmup_epochs": warmup_epochs, "clip": clip,
        "quant_aware": bool(quant_aware), "freeze_backbones": bool(freeze_backbones),
        "subtask_teachers": subtask_teachers, "finetune_epochs": finetune_epochs, "finetune_lr": finetune_lr,
        "device_dropout": float(device_dropout), "alpha": float(alpha), "distill_kind": distill_kind,
        "temperature": float(temperature), "relation_weights": [float(w) for w in relation_weights],
        "relation_pairs": [[list(p) for p in ps] for ps in pairs], "token_weight": float(token_weight),
        "shift": int(shift), "seed": int(seed), "num_train": int(x.shape[0]),
        "num_val": 0 if xv is None else int(xv.shape[0]),
        "class_groups": model.class_groups, "widths": model.widths,
    }
    history: dict[str, Any] = {s: [] for s in stages}
    history["best"] = {}
    history["settings"] = settings

    model.to(dev)
    teacher.to(dev).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    ckdir = os.path.join(out_dir, CKPT_DIR) if out_dir is not None else None

    # -- resume -----------------------------------------------------------------
    start_stage, start_epoch, ck_opt, ck_tensors, best_state, best_val = 0, 0, None, None, None, None
    if resume:
        loaded = load_checkpoint(ckdir)
        if loaded is not None:
            st, ck_tensors = loaded
            check_settings(st, settings, ckdir)
            model.load_state_dict(prefixed(ck_tensors, "model"))
            torch.set_rng_state(ck_tensors["rng.torch"])
            start_stage, start_epoch = int(st["stage"]), int(st["epoch"])
            history.update({k: v for k, v in st["history"].items() if k != "settings"})
            ck_opt = st.get("optimizer")
            best_val = st.get("best_val")
            b = prefixed(ck_tensors, "best")
            best_state = b or None

    # -- sub-task teachers -----------------------------------------------------------
    subteachers = None
    if "distill" in stages and subtask_teachers == "finetune" and start_stage == 0:
        subteachers = _get_subteachers(teacher, groups, x, y, ckdir, finetune_epochs, finetune_lr, batch_size,
                                       shift, seed, dev, progress)

    torch.manual_seed(seed)
    for si in range(start_stage, len(stages)):
        stage = stages[si]
        n_epochs = epochs_by[stage]
        first = start_epoch if si == start_stage else 0
        if si != start_stage:
            ck_opt, best_state, best_val = None, None, None
        _set_trainable(model, stage, freeze_backbones)
        modules = [model] if stage == "ensemble" else list(model.submodels)
        opt = torch.optim.AdamW(U.param_groups(modules, weight_decay), lr=lr_by[stage])
        if ck_opt is not None and si == start_stage:
            optimizer_from_flat(opt, "opt", ck_tensors, ck_opt)
        steps = _steps_per_epoch(stage, x.shape[0], y, groups, batch_size)
        total = steps * n_epochs
        warm = int(round(warmup_epochs * steps)) if total > 1 else 0
        warm = min(warm, max(0, total - 1))
        for epoch in range(first, n_epochs):
            t0 = time.time()
            g = U.generator(seed, si + 1, epoch)
            bar = tqdm(total=steps, desc=f"DEKD {stage} {epoch + 1}/{n_epochs}", disable=not progress, leave=False)
            lr_at = lambda k: U.cosine_lr(epoch * steps + k, total, warm, lr_by[stage])  # noqa: E731
            if stage == "distill":
                rec = _distill_epoch(model, teacher, subteachers, x, y, groups, lut, pairs, opt, lr_at, g, bar,
                                     batch_size=batch_size, steps=steps, dev=dev, alpha=alpha, kind=distill_kind,
                                     temperature=temperature, rweights=relation_weights, shift=shift, clip=clip)
            else:
                rec = _ensemble_epoch(model, teacher, x, y, opt, lr_at, g, bar, batch_size=batch_size, steps=steps,
                                      dev=dev, alpha=alpha, kind=distill_kind, temperature=temperature,
                                      token_weight=token_weight, quant_aware=quant_aware,
                                      device_dropout=device_dropout, freeze=freeze_backbones, shift=shift, clip=clip)
            bar.close()
            rec["epoch"] = epoch + 1
            rec["lr"] = opt.param_groups[0]["lr"]
            if xv is not None:
                rec.update(_validate(model, stage, xv, yv, lut, owner, dev, quant_aware, batch_size))
                if best_val is None or rec["val_acc"] > best_val:
                    best_val = rec["val_acc"]
                    best_state = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
                    history["best"][stage] = {"epoch": epoch + 1, "val_acc": best_val}
            rec["seconds"] = round(time.time() - t0, 3)
            history[stage].append(rec)
            if progress:
                msg = " ".join(f"{k} {v:.4f}" for k, v in rec.items() if isinstance(v, float) and k not in ("lr", "seconds"))
                tqdm.write(f"DEKD {stage} epoch {epoch + 1}/{n_epochs}: {msg} ({rec['seconds']:.1f} s)")
            done = epoch + 1 == n_epochs
            if done and best_state is not None:
                model.load_state_dict(best_state)
            if ckdir is not None:
                state = {"version": 1, "settings": settings, "history": history, "best_val": best_val}
                if done:
                    state.update(stage=si + 1, epoch=0, best_val=None)
                    save_checkpoint(ckdir, model=model, best_state=None, opt=None, state=state)
                else:
                    state.update(stage=si, epoch=epoch + 1)
                    save_checkpoint(ckdir, model=model, best_state=best_state, opt=opt, state=state)
            if callback is not None:
                callback(stage, epoch + 1, rec)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    if out_dir is not None:
        model.save(os.path.join(out_dir, "model"))
        with open(os.path.join(out_dir, "history.json"), "w") as f:
            json.dump(history, f, indent=1)
    return history


def _get_subteachers(teacher, groups, x, y, ckdir, epochs, lr, batch_size, shift, seed, dev, progress):
    from safetensors.torch import load_file, save_file

    path = os.path.join(ckdir, SUBTEACHERS_FILE) if ckdir else None
    if path and os.path.isfile(path):
        tensors = load_file(path)
        subs = []
        for i, g in enumerate(groups):
            t = _restrict_head(teacher, g)
            t.load_state_dict(prefixed(tensors, f"t{i}"))
            subs.append(t.to(dev).eval())
    else:
        subs = _finetune_subteachers(teacher, groups, x, y, epochs=epochs, lr=lr, batch_size=batch_size,
                                     shift=shift, seed=seed, dev=dev, progress=progress)
        if path:
            os.makedirs(ckdir, exist_ok=True)
            save_file({f"t{i}.{k}": v.detach().contiguous().cpu() for i, t in enumerate(subs)
                       for k, v in t.state_dict().items()}, path)
    for t in subs:
        for p in t.parameters():
            p.requires_grad_(False)
    return subs


def _set_trainable(model, stage: str, freeze: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(True)
    if stage == "distill":
        for p in model.fusion.parameters():
            p.requires_grad_(False)
    elif freeze:
        for p in model.submodels.parameters():
            p.requires_grad_(False)
    if stage == "ensemble":  # local heads are not on the fused path
        for m in model.submodels:
            for head in (m.head, m.head_dist):
                if head is not None:
                    for p in head.parameters():
                        p.requires_grad_(False)


def _steps_per_epoch(stage: str, n: int, y, groups, batch_size: int) -> int:
    if stage == "ensemble":
        return -(-n // batch_size)
    sizes = [int(torch.isin(y, torch.as_tensor(g)).sum()) for g in groups]
    return -(-max(sizes) // batch_size)


def _set_lr(opt, lr: float) -> None:
    for grp in opt.param_groups:
        grp["lr"] = lr


def _distill_epoch(model, teacher, subteachers, x, y, groups, lut, pairs, opt, lr_at, g, bar, *, batch_size, steps,
                   dev, alpha, kind, temperature, rweights, shift, clip):
    """One pass over every device's images; each step trains all students on a batch of their own classes."""
    model.train()
    N = len(groups)
    idx_g = [torch.nonzero(torch.isin(y, torch.as_tensor(gr)), as_tuple=True)[0] for gr in groups]
    perms = [ix[torch.randperm(len(ix), generator=g)] for ix in idx_g]
    bss = [-(-len(ix) // steps) for ix in idx_g]  # every device sees each of its images once per epoch
    t_layers = sorted({b for ps in pairs for _, b in ps})
    s_caps = [QKVCapture(m, [a for a, _ in pairs[i]]) for i, m in enumerate(model.submodels)]
    teachers = subteachers if subteachers is not None else [teacher]
    t_caps = [QKVCapture(t, t_layers) for t in teachers]
    sums = {"loss": 0.0, "ce": 0.0, "kd": 0.0, "rel": 0.0}
    correct = seen = 0
    try:
        for s in range(steps):
            _set_lr(opt, lr_at(s))
            batches = [p[s * b : (s + 1) * b] for p, b in zip(perms, bss)]
            sizes = [len(b) for b in batches]
            xb = U.random_shift(x[torch.cat(batches)], shift, g).to(dev)
            yb = y[torch.cat(batches)].to(dev)
            chunks_x, chunks_y = xb.split(sizes), yb.split(sizes)
            with torch.no_grad(), U.autocast(dev):
                if subteachers is None:
                    t_all = teacher(xb).float()
                    t_qkv = {k: v.split(sizes) for k, v in t_caps[0].out.items()}
                    t_logits = [t_all.split(sizes)[i][:, groups[i]] for i in range(N)]
                    t_feats = [{k: v[i] for k, v in t_qkv.items()} for i in range(N)]
                else:
                    t_logits, t_feats = [], []
                    for i in range(N):
                        t_logits.append(subteachers[i](chunks_x[i]).float() if sizes[i] else None)
                        t_feats.append(dict(t_caps[i].out))
            total = 0.0
            for i, m in enumerate(model.submodels):
                if not sizes[i]:
                    continue
                yl = lut.to(dev)[chunks_y[i]]
                with U.autocast(dev):
                    z_cls, z_dist = m.forward_head(m.forward_tokens(chunks_x[i]))
                    ce = F.cross_entropy(z_cls.float(), yl)
                    kd = distillation_loss(z_dist, t_logits[i], kind, temperature)
                    rel = z_cls.new_zeros((), dtype=torch.float32)
                    tmod = teachers[i] if subteachers is not None else teacher
                    for a, b in pairs[i]:
                        rel = rel + qkv_relation_loss(t_feats[i][b], s_caps[i].out[a], _head_dim(tmod, b),
                                                      _head_dim(m, a), rweights)
                    loss = (1 - alpha) * ce + alpha * kd + rel
                total = total + loss
                n = sizes[i]
                sums["loss"] += float(loss.detach()) * n
                sums["ce"] += float(ce.detach()) * n
                sums["kd"] += float(kd.detach()) * n
                sums["rel"] += float(rel.detach()) * n
                z = z_cls if not m.distilled else (z_cls + z_dist) / 2
                correct += int((z.argmax(-1) == yl).sum())
                seen += n
            opt.zero_grad(set_to_none=True)
            total.backward()
            if clip:
                for m in model.submodels:
                    torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.grad is not None], clip)
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss'] / seen:.3f}", acc=f"{correct / seen:.3f}")
    finally:
        for c in s_caps + t_caps:
            c.close()
    out = {k: v / seen for k, v in sums.items()}
    out["train_acc"] = correct / seen
    return out


def _drop_devices(tokens: list[torch.Tensor], p: float, g: torch.Generator) -> list[torch.Tensor]:
    """Per sample, with probability p, zero the tokens of one device chosen uniformly."""
    B, N = tokens[0].shape[0], len(tokens)
    drop = torch.rand(B, generator=g) < p
    which = torch.randint(0, N, (B,), generator=g)
    out = []
    for i, t in enumerate(tokens):
        keep = (~(drop & (which == i))).to(t.dtype).to(t.device)
        out.append(t * keep.view(B, *([1] * (t.dim() - 1))))
    return out


def _fused_logits(fusion, mapped: list[torch.Tensor]) -> torch.Tensor:
    logits = [cls(h) for h, (_, cls) in zip(mapped, fusion.branches())]
    return logits[0] if len(logits) == 1 else (logits[0] + logits[1]) / 2


def _ensemble_epoch(model, teacher, x, y, opt, lr_at, g, bar, *, batch_size, steps, dev, alpha, kind, temperature,
                    token_weight, quant_aware, device_dropout, freeze, shift, clip):
    model.train()
    if freeze:
        model.submodels.eval()
    perm = torch.randperm(x.shape[0], generator=g)
    sums = {"loss": 0.0, "mse": 0.0, "ce": 0.0, "kd": 0.0}
    correct = seen = 0
    params = [p for p in model.parameters() if p.requires_grad]
    for s in range(steps):
        _set_lr(opt, lr_at(s))
        idx = perm[s * batch_size : (s + 1) * batch_size]
        xb = U.random_shift(x[idx], shift, g).to(dev)
        yb = y[idx].to(dev)
        with torch.no_grad(), U.autocast(dev):
            feats = teacher.forward_features(xb)
            t_logits = teacher.forward_head(feats).float()
            t_tokens = [feats[:, 0].float()] + ([feats[:, 1].float()] if model.distilled else [])
        with U.autocast(dev):
            if freeze:
                with torch.no_grad():
                    tokens = model.forward_tokens(xb)
            else:
                tokens = model.forward_tokens(xb)
            tokens = [t.float() for t in tokens]
            if quant_aware:
                tokens = [fake_quant_int8(t) for t in tokens]
            if device_dropout > 0:
                tokens = _drop_devices(tokens, device_dropout, g)
            mapped = model.fusion.mapped(tokens)
            z = _fused_logits(model.fusion, mapped).float()
            mse = token_mse(mapped, t_tokens)
            ce = F.cross_entropy(z, yb)
            kd = distillation_loss(z, t_logits, kind, temperature)
            loss = token_weight * mse + (1 - alpha) * ce + alpha * kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        n = len(idx)
        for k, v in (("loss", loss), ("mse", mse), ("ce", ce), ("kd", kd)):
            sums[k] += float(v.detach()) * n
        correct += int((z.argmax(-1) == yb).sum())
        seen += n
        bar.update(1)
        bar.set_postfix(loss=f"{sums['loss'] / seen:.3f}", acc=f"{correct / seen:.3f}")
    out = {k: v / seen for k, v in sums.items()}
    out["train_acc"] = correct / seen
    return out


@torch.no_grad()
def _validate(model, stage, xv, yv, lut, owner, dev, quant_aware, batch_size) -> dict:
    model.eval()
    if stage == "distill":
        accs = []
        for i, m in enumerate(model.submodels):
            keep = owner[yv] == i
            if not bool(keep.any()):
                continue
            logits = U.predict(m, xv[keep], max(batch_size, 256), dev)
            accs.append(float((logits.argmax(-1) == lut[yv[keep]]).float().mean()))
        model.train()
        return {"val_acc": sum(accs) / len(accs), "val_acc_local": accs}
    logits = U.predict(lambda b: fused_forward(model, b, transfer="int8" if quant_aware else "fp32"),
                       xv, max(batch_size, 256), dev)
    model.train()
    return {"val_acc": float((logits.argmax(-1) == yv).float().mean())}


def fused_forward(model, images: torch.Tensor, *, transfer: str = "fp32", missing: Sequence[int] = ()) -> torch.Tensor:
    """The plain-torch collaborative path: tokens (fp32 or int8 round trip), zeros for `missing` devices, fusion."""
    if transfer not in ("fp32", "int8"):
        raise ValueError(f"transfer: expected 'fp32' or 'int8', got {transfer!r}")
    tokens = [t.float() for t in model.forward_tokens(images)]
    if transfer == "int8":
        tokens = [int8_roundtrip(t) for t in tokens]
    for i in missing:
        tokens[i] = torch.zeros_like(tokens[i])
    return model.fusion(tokens)


@torch.no_grad()
def evaluate(model, data, *, transfer: str = "fp32", missing: Sequence[int] = (), batch_size: int = 500, device=None) -> float:
    """Top-1 accuracy of the fused model on `data` (Dataset or (images, labels))."""
    x, y = U.as_tensors("data", data)
    dev = U.resolve_device(device) if device is not None else next(model.parameters()).device
    was = model.training
    model.eval()
    logits = U.predict(lambda b: fused_forward(model, b, transfer=transfer, missing=missing), x, batch_size, dev)
    model.train(was)
    return float((logits.argmax(-1) == y).float().mean())
