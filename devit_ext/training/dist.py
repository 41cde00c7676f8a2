"""Data-parallel training under torchrun: the process group, gradient averaging, reduced metrics.

`setup()` joins the process group torchrun describes in the environment
(env:// rendezvous: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): Gloo on the
CPU, NCCL on CUDA, one GPU per process. Gradients are averaged with one
flattened all-reduce per optimizer step (`average_grads`) instead of wrapping
the models in DistributedDataParallel: the DEKD stages call the sub-models
through `forward_tokens`/`forward_head` and hooks, and a device whose group has
no image on a process still has to take part, which a flat all-reduce of every
trainable parameter (zeros where there is no gradient) gets right by
construction. Every collective turns a lost peer into `DistributedError`
naming this rank, so a process whose peer died stops with a clear error
within the process-group timeout instead of hanging.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


class DistributedError(RuntimeError):
    """A collective failed: another training process died, hung or was stopped."""


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def _collective(self, what: str, fn):
        try:
            return fn()
        except (RuntimeError, dist.DistError) as e:  # noqa: B014 - DistError is a RuntimeError in new torch
            raise DistributedError(
                f"rank {self.rank}/{self.world}: {what} failed; another training process died, hung or was "
                f"stopped (see its log) ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from e

    def average_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Mean of every parameter's gradient over the processes (None counts as zeros)."""
        if not self.active or not params:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                          for p in params])
        self._collective("gradient all-reduce", lambda: dist.all_reduce(flat))
        flat /= self.world
        off = 0
        for p in params:
            n = p.numel()
            g = flat[off : off + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            off += n

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Each value summed over the processes (metrics: loss sums, correct counts, sample counts)."""
        if not self.active:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self._comm_device())
        self._collective("metric all-reduce", lambda: dist.all_reduce(t))
        return {k: float(v) for k, v in zip(keys, t.cpu())}

    def barrier(self) -> None:
        if self.active:
            self._collective("barrier", dist.barrier)

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup(device, timeout_s: float = 1800.0) -> Context:
    """This process's place in the run: joins torchrun's process group when WORLD_SIZE > 1.

    `device` None picks CUDA when available; under torchrun a CUDA process uses
    the GPU LOCAL_RANK.
    """
    from .common import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return Context(device=resolve_device(device))
    dev = resolve_device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(timeout_s)))
        owns = True
    return Context(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank,
                   local_world=local_world, device=dev, owns_group=owns)


def run(train, args: dict):
    """`train(ctx, tqdm, **args)` in this process's place in the run (from args' "device" and
    "dist_timeout"), closing the process group if it was opened here: the trainers' entry point."""
    from tqdm.auto import tqdm

    args = dict(args)
    ctx = setup(args.pop("device"), args["dist_timeout"])
    try:
        return train(ctx, tqdm, **args)
    finally:
        ctx.close()
