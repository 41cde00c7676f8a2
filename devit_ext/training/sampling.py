"""Epoch plans: which indices each step of an epoch reads, on this process.

A plan is computed the same on every process from a generator seeded by
(seed, stage, epoch): the global batches do not depend on the number of
processes, each process takes every `world`-th index of each global batch
(`shard`). So an epoch replays exactly on resume, and a run resumed with
another number of processes sees the same global batches (only their split
over the processes changes).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


def shard(idx: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return idx[rank::world]


def _even(idx: torch.Tensor) -> torch.Tensor:
    """Drop one index of an odd batch (timm's Mixup mixes a batch with its reverse: it needs pairs)."""
    return idx[: len(idx) - (len(idx) % 2)]


@dataclass
class Plan:
    """Per step: this process's indices (`batches`) and, for grouped plans, how many belong to each group."""

    batches: list[torch.Tensor] = field(default_factory=list)
    sizes: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.batches)


def shuffled(n: int, global_batch: int, g: torch.Generator, *, rank: int = 0, world: int = 1,
             even: bool = False) -> Plan:
    """All n indices in a random order, `global_batch` per step, this process's share of each.

    A last global batch with fewer than `world` indices is dropped (some process
    would get none); with `even`, every process's batch has an even size.
    """
    perm = torch.randperm(n, generator=g)
    plan = Plan()
    for s in range(0, n, global_batch):
        chunk = perm[s : s + global_batch]
        if len(chunk) < world:
            break
        b = shard(chunk, rank, world)
        b = _even(b) if even else b
        if len(b):
            plan.batches.append(b)
            plan.sizes.append([len(b)])
    return plan


def group_steps(group_sizes: list[int], global_batch: int) -> int:
    """Steps of a grouped epoch: the largest group read `global_batch` at a time."""
    return max(1, -(-max(group_sizes) // global_batch))


def grouped(group_indices: list[torch.Tensor], global_batch: int, g: torch.Generator, *, rank: int = 0,
            world: int = 1, even: bool = False) -> Plan:
    """Stage "distill": every step holds a batch of each group's own images, concatenated in group order.

    Each group is spread over the same number of steps (set by the largest
    group), so every device sees each of its images once per epoch.
    """
    steps = group_steps([len(ix) for ix in group_indices], global_batch)
    perms = [ix[torch.randperm(len(ix), generator=g)] for ix in group_indices]
    per_step = [-(-len(ix) // steps) for ix in group_indices]
    plan = Plan()
    for s in range(steps):
        parts = []
        for p, b in zip(perms, per_step):
            part = shard(p[s * b : (s + 1) * b], rank, world)
            parts.append(_even(part) if even else part)
        plan.batches.append(torch.cat(parts))
        plan.sizes.append([len(p) for p in parts])
    return plan


def sequential(n: int, batch_size: int, *, rank: int = 0, world: int = 1) -> Plan:
    """Validation: every index once, in order, this process's contiguous share of the n indices."""
    lo, hi = n * rank // world, n * (rank + 1) // world
    idx = torch.arange(lo, hi)
    plan = Plan()
    for s in range(0, len(idx), batch_size):
        b = idx[s : s + batch_size]
        plan.batches.append(b)
        plan.sizes.append([len(b)])
    return plan
