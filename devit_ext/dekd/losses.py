"""DEKD's loss terms as pure functions (tested against hand-computed values), and Q/K/V capture hooks.

- hard / soft distillation (DeiT's CE on the teacher's argmax; T^2-scaled KL),
- relation losses: KL between the row-softmax of X X^T / sqrt(d_h) of teacher and
  student for X in Q, K, V (relations make any widths comparable),
- token MSE between the fusion head's linear map and the teacher's token(s).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


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


def head_dim(module: nn.Module, k: int) -> int:
    return int(module.blocks[k].attn.head_dim)


def middle_block(depth: int) -> int:
    """Block L/2 - 1 (0-based), as in the paper; 0 for a one-block model."""
    return max(0, depth // 2 - 1)
