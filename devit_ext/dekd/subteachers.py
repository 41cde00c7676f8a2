"""Sub-task teachers for stage "distill": the teacher restricted to a group's classes, or a fine-tuned copy."""
from __future__ import annotations

import copy
import os

import torch
import torch.nn as nn

from ..checkpoint import prefixed

SUBTEACHERS_FILE = "subtask_teachers.safetensors"


def restrict_head(teacher: nn.Module, classes: list[int]) -> nn.Module:
    """A copy of `teacher` whose head(s) give only `classes`' logits, in that order."""
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


def _finetune(teacher, groups, source, *, epochs, lr, batch_size, shift, seed, device, progress):
    """Per group: the teacher with its head restricted to the group, fine-tuned (CE) on the group's images."""
    from ..teacher import train_teacher

    out = []
    for i, g in enumerate(groups):
        t = restrict_head(teacher, g)
        lut = torch.full((int(source.labels.max()) + 1,), -1, dtype=torch.long)
        lut[torch.as_tensor(g)] = torch.arange(len(g))
        idx = torch.nonzero(lut[source.labels] >= 0, as_tuple=True)[0]
        if epochs > 0:
            t, _ = train_teacher(source.subset(idx, lut), None, teacher=t, epochs=epochs, batch_size=batch_size,
                                 lr=lr, shift=shift, seed=seed + 101 * (i + 1), device=device, progress=progress)
        out.append(t.eval())
    return out


def get_subteachers(ctx, teacher, groups, source, ckdir, *, epochs, lr, batch_size, shift, seed, progress):
    """Fine-tuned sub-task teachers, from `ckdir` when an earlier run saved them.

    Under torchrun every process fine-tunes data-parallel (train_teacher joins
    the same process group), so all hold the same teachers; rank 0 saves them.
    """
    from safetensors.torch import load_file, save_file

    path = os.path.join(ckdir, SUBTEACHERS_FILE) if ckdir else None
    # every process must take the same branch (fine-tuning is collective): load only if all see the file
    saved = bool(path) and ctx.sum({"saved": float(os.path.isfile(path))})["saved"] == ctx.world
    if saved:
        tensors = load_file(path)
        subs = []
        for i, g in enumerate(groups):
            t = restrict_head(teacher, g)
            t.load_state_dict(prefixed(tensors, f"t{i}"))
            subs.append(t.to(ctx.device).eval())
    else:
        subs = _finetune(teacher, groups, source, epochs=epochs, lr=lr, batch_size=batch_size, shift=shift,
                         seed=seed, device=ctx.device, progress=progress)
        if path and ctx.is_main:
            _save(save_file, subs, ckdir, path)
    for t in subs:
        for p in t.parameters():
            p.requires_grad_(False)
    return subs


def _save(save_file, subs, ckdir, path) -> None:
    os.makedirs(ckdir, exist_ok=True)
    tmp = path + ".tmp"
    save_file({f"t{i}.{k}": v.detach().contiguous().cpu() for i, t in enumerate(subs)
               for k, v in t.state_dict().items()}, tmp)
    os.replace(tmp, path)
