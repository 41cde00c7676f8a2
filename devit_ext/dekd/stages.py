"""One epoch of each DEKD stage, and validation, over a streamed Source on this process.

Each epoch reads its plan (`training.sampling`) batch by batch; augmentation
(pixel shifts, device dropout) draws from the epoch's generator `g`, timm's
Mixup from numpy's RNG seeded per epoch, so an epoch replays exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..training import common as U
from ..training.source import check_batch
from ..protocol import fused_forward
from .losses import QKVCapture, head_dim
from .steps import distill_loss, drop_mask, ensemble_loss, teacher_targets


@dataclass
class EpochIO:
    """What every epoch needs besides the models: where batches come from and how they are checked."""

    source: Any
    plan: Any
    seed: int  # the loader's generator seed for this epoch (its workers' augmentations)
    g: torch.Generator
    dev: torch.device
    image_shape: tuple
    bar: Any
    label: str = ""  # where we are, for errors: "train_dekd: stage 'distill' epoch 3"

    def batches(self):
        for k, (x, y) in enumerate(self.source.batches(self.plan.batches, self.seed)):
            x, y = check_batch(self.source.name, k, x, y, image_shape=self.image_shape, who="the model")
            yield k, x.to(self.dev, non_blocking=True), y.to(self.dev, non_blocking=True)


def _zero_loss(params) -> torch.Tensor:
    """A zero that back-propagates to every parameter: a process with no image still joins the step."""
    return sum((p * 0).sum() for p in params)


def distill_epoch(io: EpochIO, model, teacher, subteachers, groups, lut, pairs, stepper, *, alpha, kind,
                  temperature, rweights, shift, mixups, label_smoothing) -> dict:
    """One pass over every device's images; each step trains all students on a batch of their own classes."""
    model.train()
    N = len(groups)
    teachers = subteachers if subteachers is not None else [teacher]
    t_layers = sorted({b for ps in pairs for _, b in ps})
    t_caps = [QKVCapture(t, t_layers) for t in teachers]
    lut = lut.to(io.dev)
    sums = {"loss": 0.0, "ce": 0.0, "kd": 0.0, "rel": 0.0, "correct": 0.0, "seen": 0.0}
    trainable = [p for m in model.submodels for p in m.parameters() if p.requires_grad]
    try:
        for k, xb, yb in io.batches():
            sizes = io.plan.sizes[k]
            xb = U.random_shift(xb, shift, io.g)
            xs, ys = list(xb.split(sizes)), [lut[c] for c in yb.split(sizes)]
            targets = list(ys)
            if mixups is not None:  # mix within each group (its own local classes); the teacher sees the mix
                for i in range(N):
                    if sizes[i]:
                        xs[i], targets[i] = mixups[i](xs[i].clone(), ys[i])
                xb = torch.cat(xs)
            with torch.no_grad(), U.autocast(io.dev):
                if subteachers is None:
                    t_all = teacher(xb).float().split(sizes)
                    t_qkv = {b: v.split(sizes) for b, v in t_caps[0].out.items()}
                    t_logits = [t_all[i][:, groups[i]] for i in range(N)]
                    t_feats = [{b: v[i] for b, v in t_qkv.items()} for i in range(N)]
                else:
                    t_logits, t_feats = [None] * N, [None] * N
                    for i in range(N):
                        if sizes[i]:
                            t_logits[i] = subteachers[i](xs[i]).float()
                            t_feats[i] = dict(t_caps[i].out)
            total = None
            for i, m in enumerate(model.submodels):
                if not sizes[i]:
                    continue
                tmod = teachers[i] if subteachers is not None else teacher
                with U.autocast(io.dev):
                    out = distill_loss(m, xs[i], targets[i], t_logits[i], t_feats[i], pairs=pairs[i],
                                       teacher_head_dims={b: head_dim(tmod, b) for _, b in pairs[i]}, alpha=alpha,
                                       kind=kind, temperature=temperature, relation_weights=rweights,
                                       label_smoothing=label_smoothing)
                total = out["loss"] if total is None else total + out["loss"]
                n = sizes[i]
                for key in ("loss", "ce", "kd", "rel"):
                    sums[key] += float(out[key].detach()) * n
                sums["correct"] += int((out["logits"].argmax(-1) == ys[i]).sum())
                sums["seen"] += n
            stepper.backward(total if total is not None else _zero_loss(trainable), last=k == len(io.plan) - 1,
                             where=f"{io.label} batch {k}")
            io.bar.update(1)
            if sums["seen"]:
                io.bar.set_postfix(loss=f"{sums['loss'] / sums['seen']:.3f}", acc=f"{sums['correct'] / sums['seen']:.3f}")
    finally:
        for c in t_caps:
            c.close()
    return sums


def ensemble_epoch(io: EpochIO, model, teacher, stepper, *, alpha, kind, temperature, token_weight, quant_aware,
                   device_dropout, freeze, shift, mixup, label_smoothing) -> dict:
    model.train()
    if freeze:
        model.submodels.eval()
    sums = {"loss": 0.0, "mse": 0.0, "ce": 0.0, "kd": 0.0, "correct": 0.0, "seen": 0.0}
    for k, xb, yb in io.batches():
        xb = U.random_shift(xb, shift, io.g)
        target = yb
        if mixup is not None:
            xb, target = mixup(xb.clone(), yb)
        t_logits, t_tokens = teacher_targets_autocast(teacher, xb, model.distilled, io.dev)
        drop = drop_mask(xb.shape[0], model.num_devices, device_dropout, io.g) if device_dropout > 0 else None
        with U.autocast(io.dev):
            out = ensemble_loss(model, xb, target, t_logits, t_tokens, alpha=alpha, kind=kind,
                                temperature=temperature, token_weight=token_weight, quant_aware=quant_aware,
                                drop=drop, freeze=freeze, label_smoothing=label_smoothing)
        stepper.backward(out["loss"], last=k == len(io.plan) - 1, where=f"{io.label} batch {k}")
        n = xb.shape[0]
        for key in ("loss", "mse", "ce", "kd"):
            sums[key] += float(out[key].detach()) * n
        sums["correct"] += int((out["logits"].argmax(-1) == yb).sum())
        sums["seen"] += n
        io.bar.update(1)
        io.bar.set_postfix(loss=f"{sums['loss'] / sums['seen']:.3f}", acc=f"{sums['correct'] / sums['seen']:.3f}")
    return sums


def teacher_targets_autocast(teacher, images, distilled, dev):
    with U.autocast(dev):
        return teacher_targets(teacher, images, distilled)


def epoch_record(ctx, sums: dict) -> dict:
    """Per-sample means of an epoch's sums over all processes, and the training accuracy."""
    tot = ctx.sum(sums)
    seen = max(tot.pop("seen"), 1.0)
    correct = tot.pop("correct")
    rec = {k: v / seen for k, v in tot.items()}
    rec["train_acc"] = correct / seen
    return rec


@torch.no_grad()
def validate(ctx, module, stage, io: EpochIO, lut, owner, quant_aware) -> dict:
    """Stage "distill": mean over devices of each sub-model's accuracy on its own classes; "ensemble": fused."""
    was = module.training
    module.eval()
    N = module.num_devices
    counts = {f"c{i}": 0.0 for i in range(N)} | {f"n{i}": 0.0 for i in range(N)}
    lut, owner = lut.to(io.dev), owner.to(io.dev)
    for _, xb, yb in io.batches():
        with U.autocast(io.dev):
            if stage == "distill":
                for i, m in enumerate(module.submodels):
                    keep = owner[yb] == i
                    if bool(keep.any()):
                        z = m(xb[keep]).float()
                        counts[f"c{i}"] += int((z.argmax(-1) == lut[yb[keep]]).sum())
                        counts[f"n{i}"] += int(keep.sum())
            else:
                z = fused_forward(module, xb, transfer="int8" if quant_aware else "fp32").float()
                counts["c0"] += int((z.argmax(-1) == yb).sum())
                counts["n0"] += xb.shape[0]
    module.train(was)
    tot = ctx.sum(counts)
    if stage == "distill":
        accs = [tot[f"c{i}"] / tot[f"n{i}"] for i in range(N) if tot[f"n{i}"]]
        return {"val_acc": sum(accs) / len(accs), "val_acc_local": accs}
    return {"val_acc": tot["c0"] / max(tot["n0"], 1.0)}
