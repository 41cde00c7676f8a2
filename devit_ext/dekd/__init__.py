"""DEKD: decomposition-and-ensemble knowledge distillation (stages 3 and 4 of the method).

- `losses`: the loss terms (distillation, Q/K/V relations, token MSE), pure functions;
- `steps`: the loss of one step of each stage (`distill_loss`, `ensemble_loss`) and
  the teacher's targets (`teacher_targets`);
- `stages`: one epoch of each stage and validation over streamed data;
- `trainer`: `train_dekd`, the staged trainer (settings, resume, checkpoints, torchrun);
- `config`, `subteachers`: its settings and checks, sub-task teachers.

The token a device sends and the fused forward (int8 round trip, straight-through
fake quantisation) are `devit_ext.protocol`'s; accuracy is `devit_ext.evaluate`'s.
"""
from .config import STAGES
from .losses import (distillation_loss, hard_distillation, qkv_relation_loss, relation_loss, soft_distillation,
                     token_mse)
from .steps import apply_drop, distill_loss, drop_mask, ensemble_loss, teacher_targets
from .trainer import train_dekd

__all__ = ["STAGES", "train_dekd", "distill_loss", "ensemble_loss", "teacher_targets", "drop_mask", "apply_drop",
           "distillation_loss", "hard_distillation",
           "soft_distillation", "relation_loss", "qkv_relation_loss", "token_mse"]
