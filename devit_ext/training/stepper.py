"""One optimizer step, the same for every trainer: accumulation, gradient averaging, clipping, lr, EMA.

`Stepper.backward(loss)` is called once per micro-batch; every `accum_steps`
micro-batches (and at the end of an epoch) it averages the gradients over the
processes, clips each clip group, sets the learning rate of the step from
`lr_at(step)` (or steps a torch scheduler), steps the optimizer and updates the weight EMA.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .dist import Context


class Stepper:
    def __init__(self, opt: torch.optim.Optimizer, *, ctx: Context, lr_at: Callable[[int], float] | None,
                 clip: float, clip_groups: Sequence[Sequence[torch.nn.Parameter]], accum_steps: int = 1,
                 ema=None, ema_source: torch.nn.Module | None = None, sched=None, step: int = 0):
        self.opt, self.ctx, self.lr_at, self.clip = opt, ctx, lr_at, float(clip or 0.0)
        self.clip_groups = [list(g) for g in clip_groups]
        self.params = [p for grp in opt.param_groups for p in grp["params"]]
        self.accum = int(accum_steps)
        self.ema, self.ema_source, self.sched = ema, ema_source, sched
        self.step = int(step)  # optimizer steps taken so far in this stage
        self._micro = 0

    def backward(self, loss: torch.Tensor, *, last: bool = False, where: str = "") -> bool:
        """Back-propagate one micro-batch; step when the accumulation is full or at `last`. True if stepped.

        A non-finite loss stops the run (FloatingPointError naming `where`) before any update: the
        weights and the last checkpoint (end of the previous epoch) stay as they were.
        """
        if not bool(torch.isfinite(loss.detach())):
            raise FloatingPointError(
                f"{where}: the loss is {float(loss.detach())}; training stopped before this update (the last "
                "checkpoint, from the end of the previous epoch, is kept). Lower the lr, check the data, or "
                "use clip")
        (loss / self.accum).backward()
        self._micro += 1
        if self._micro < self.accum and not last:
            return False
        self._micro = 0
        self.ctx.average_grads(self.params)
        if self.clip:
            for grp in self.clip_groups:
                torch.nn.utils.clip_grad_norm_([p for p in grp if p.grad is not None], self.clip)
        if self.lr_at is not None:
            lr = self.lr_at(self.step)
            for g in self.opt.param_groups:
                g["lr"] = lr
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.ema_source, step=self.step)
        return True


def steps_per_epoch(micro_batches: int, accum_steps: int) -> int:
    return max(1, -(-int(micro_batches) // int(accum_steps)))
