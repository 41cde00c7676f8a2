"""The loss of one DEKD step, per stage, from the teacher's outputs on the same (possibly mixed) images.

- stage "distill", one student on a batch of its own classes:
  (1-a) CE(z_cls, y) + a * KD(z_dist, z_T) + sum over block pairs of g_Q L_Q + g_K L_K + g_V L_V;
- stage "ensemble", the fused model on the full data:
  w * MSE(linear map(tokens), teacher token(s)) + (1-a) CE(z, y) + a * KD(z, z_T),
  the tokens int8 round-tripped (straight-through) when quant-aware, and the
  tokens of the devices in `drop` zeroed (trained to answer with a device missing).

`y` is int labels or Mixup's soft targets (B, C); KD always uses the teacher's
logits on the images the student sees.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..model import teacher_tokens
from ..training.recipe import label_loss
from ..protocol import fake_quant_int8, fused_logits
from .losses import QKVCapture, distillation_loss, head_dim, qkv_relation_loss, token_mse


@torch.no_grad()
def teacher_targets(teacher, images: torch.Tensor, distilled: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits fp32 (B, C), the token(s) the fused map is matched to: [class token] or [class, distillation];
    a CCT teacher's [sequence-pooled vector])."""
    feats = teacher.forward_features(images)
    logits = teacher.forward_head(feats).float()
    return logits, [t.float() for t in teacher_tokens(teacher, feats, distilled)]


def distill_loss(student, images, labels, teacher_logits, teacher_qkv: dict, *, pairs: Sequence[tuple[int, int]],
                 teacher_head_dims: dict, alpha: float = 0.5, kind: str = "hard", temperature: float = 1.0,
                 relation_weights: Sequence[float] = (0.2, 0.1, 0.3), label_smoothing: float = 0.0) -> dict:
    """Stage-3 loss of one student (a SubViT or SubCCT) on a batch of its group; labels are local class indices."""
    cap = QKVCapture(student, [a for a, _ in pairs])
    try:
        z_cls, z_dist = student.forward_head(student.forward_tokens(images))
        ce = label_loss(z_cls, labels, label_smoothing)
        kd = distillation_loss(z_dist, teacher_logits, kind, temperature)
        rel = z_cls.new_zeros((), dtype=torch.float32)
        for a, b in pairs:
            rel = rel + qkv_relation_loss(teacher_qkv[b], cap.out[a], int(teacher_head_dims[b]),
                                          head_dim(student, a), relation_weights)
    finally:
        cap.close()
    loss = (1 - alpha) * ce + alpha * kd + rel
    z = z_cls if not student.distilled else (z_cls + z_dist) / 2
    return {"loss": loss, "ce": ce, "kd": kd, "rel": rel, "logits": z}


def drop_mask(batch: int, devices: int, p: float, g: torch.Generator) -> torch.Tensor:
    """(B, N) bool: per sample, with probability p, one device chosen uniformly is dropped."""
    drop = torch.rand(batch, generator=g) < p
    which = torch.randint(0, devices, (batch,), generator=g)
    return drop[:, None] & (which[:, None] == torch.arange(devices)[None])


def apply_drop(tokens: Sequence[torch.Tensor], drop: torch.Tensor | None) -> list[torch.Tensor]:
    """Zero device i's token(s) for the samples where drop[:, i]."""
    if drop is None:
        return list(tokens)
    out = []
    for i, t in enumerate(tokens):
        keep = (~drop[:, i]).to(device=t.device, dtype=t.dtype)
        out.append(t * keep.view(-1, *([1] * (t.dim() - 1))))
    return out


def ensemble_loss(model, images, labels, teacher_logits, teacher_tokens, *, alpha: float = 0.5, kind: str = "hard",
                  temperature: float = 1.0, token_weight: float = 1.0, quant_aware: bool = True,
                  drop: torch.Tensor | None = None, freeze: bool = False, label_smoothing: float = 0.0) -> dict:
    """Stage-4 loss of the fused model (a DeViT) on a batch of the full data."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and not freeze):
        tokens = [t.float() for t in model.forward_tokens(images)]
    if quant_aware:
        tokens = [fake_quant_int8(t) for t in tokens]
    tokens = apply_drop(tokens, drop)
    mapped = model.fusion.mapped(tokens)
    z = fused_logits(model.fusion, mapped).float()
    mse = token_mse(mapped, teacher_tokens)
    ce = label_loss(z, labels, label_smoothing)
    kd = distillation_loss(z, teacher_logits, kind, temperature)
    loss = token_weight * mse + (1 - alpha) * ce + alpha * kd
    return {"loss": loss, "mse": mse, "ce": ce, "kd": kd, "logits": z}
