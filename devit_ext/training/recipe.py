"""Training recipes by name: "light" (small data, the demo) and "deit" (the paper's: DeiT's recipe).

The batch-level parts of a recipe live here and are timm's own:
`timm.data.Mixup` (mixup, cutmix, label smoothing in the soft targets),
`timm.loss.SoftTargetCrossEntropy` for the terms that take labels,
`timm.utils.ModelEmaV3` for the weight average, plus gradient accumulation and
DeiT's lr rule (lr per 512 images of global batch). The image-level parts
(RandAugment `rand-m9-mstd0.5-inc1`, random erasing 0.25, the teacher's
mean/std and interpolation) are the data set's transform:
`timm.data.create_transform(**resolve_model_data_config(teacher), is_training=True,
auto_augment=..., re_prob=0.25)`, which `devit-ext train --recipe deit` builds.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Recipe:
    name: str
    mixup: float = 0.0  # Beta(a, a) mixup; 0 = off
    cutmix: float = 0.0  # Beta(a, a) cutmix; 0 = off
    label_smoothing: float = 0.0
    ema_decay: float = 0.0  # 0 = no weight EMA
    accum_steps: int = 1
    lr_per_512: bool = False  # lr is given for a global batch of 512 and scaled linearly (DeiT)

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def lr(self, base: float, global_batch: int) -> float:
        return base * global_batch / 512 if self.lr_per_512 else base

    def settings(self) -> dict:
        return dataclasses.asdict(self)


RECIPES = {
    "light": Recipe("light"),
    "deit": Recipe("deit", mixup=0.8, cutmix=1.0, label_smoothing=0.1, ema_decay=0.99996, lr_per_512=True),
}


def resolve(recipe, **overrides) -> Recipe:
    """A Recipe from a name or a Recipe, with the fields in `overrides` that are not None replaced."""
    if isinstance(recipe, Recipe):
        base = recipe
    elif recipe in RECIPES:
        base = RECIPES[recipe]
    else:
        raise ValueError(f"recipe: expected one of {sorted(RECIPES)} or a devit_ext Recipe, got {recipe!r}")
    base = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    for k in ("mixup", "cutmix", "ema_decay"):
        v = getattr(base, k)
        if not (0.0 <= float(v) < (1.0 if k == "ema_decay" else float("inf"))):
            raise ValueError(f"{k}: expected {'[0, 1)' if k == 'ema_decay' else '>= 0'}, got {v!r}")
    if not 0.0 <= base.label_smoothing < 1.0:
        raise ValueError(f"label_smoothing: expected [0, 1), got {base.label_smoothing!r}")
    if int(base.accum_steps) < 1:
        raise ValueError(f"accum_steps: expected >= 1, got {base.accum_steps!r}")
    return base


def make_mixup(recipe: Recipe, num_classes: int):
    """timm's Mixup for `num_classes` soft targets, or None when the recipe does not mix."""
    if not recipe.mixes:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, label_smoothing=recipe.label_smoothing,
                 num_classes=int(num_classes))


def label_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """CE against int labels (with smoothing) or against soft targets (B, C) from Mixup."""
    if target.dim() == 2:
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()(logits.float(), target.float())
    return F.cross_entropy(logits.float(), target, label_smoothing=float(label_smoothing))


def make_ema(recipe: Recipe, module: torch.nn.Module):
    """timm's ModelEmaV3 of `module` (decay warm-up on, so short runs average sensibly), or None."""
    if not recipe.ema_decay:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(module, decay=float(recipe.ema_decay), use_warmup=True)
