"""Stage 1 of DeViT: split the C classes into N disjoint groups, one per device.

- `random_groups`: the paper's partition. Class indices are shuffled with a
  seeded `torch.Generator` and cut into contiguous chunks (with equal shares:
  N chunks of C // N, the last takes the remainder).
- `similarity_groups` (beyond the paper): classes whose mean teacher class
  tokens are alike go to the same device, so each specialist sees its hard
  negatives. Balanced k-means on centred, unit-norm class vectors.
- `check_groups`: validates explicit groups.
- `group_sizes`: equal shares, or shares in proportion to per-device weights
  (heterogeneous budgets, `class_share="budget"`).
"""
from __future__ import annotations

from typing import Sequence

import torch


def group_sizes(num_classes: int, num_devices: int, weights: Sequence[float] | None = None) -> list[int]:
    """Group sizes summing to `num_classes`, each >= 1.

    Without weights: N - 1 groups of C // N and the last takes the remainder
    (the paper's chunking). With weights: proportional shares, rounded by the
    largest-remainder method, every device getting at least one class.
    """
    C, N = int(num_classes), int(num_devices)
    if weights is None:
        base = C // N
        return [base] * (N - 1) + [C - base * (N - 1)]
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if len(w) != N or not bool(torch.all(w > 0)):
        raise ValueError(f"class shares: need {N} positive weights, got {list(weights)}")
    # one class each first, then the rest proportionally
    ideal = (C - N) * w / w.sum()
    sizes = torch.floor(ideal).long()
    rest = (C - N) - int(sizes.sum())
    order = torch.argsort(-(ideal - sizes), stable=True)
    sizes[order[:rest]] += 1
    return [int(s) + 1 for s in sizes]


def random_groups(num_classes: int, sizes: Sequence[int], seed: int) -> list[list[int]]:
    """Seeded shuffle of 0..C-1 cut into contiguous chunks of the given sizes."""
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(int(num_classes), generator=g).tolist()
    out, start = [], 0
    for s in sizes:
        out.append(perm[start : start + s])
        start += s
    return out


def check_groups(groups, num_classes: int, num_devices: int) -> list[list[int]]:
    """Validate explicit class groups: N non-empty, disjoint lists of ints covering 0..C-1."""
    if isinstance(groups, (str, bytes)) or not isinstance(groups, (list, tuple)):
        raise ValueError(f"partition: expected 'random', 'similarity' or a list of class groups, got {groups!r}")
    if len(groups) != num_devices:
        raise ValueError(f"partition: {len(groups)} class groups given for num_devices={num_devices}")
    out, seen = [], {}
    for i, g in enumerate(groups):
        if isinstance(g, (str, bytes)) or not isinstance(g, (list, tuple, range)) and not torch.is_tensor(g):
            raise ValueError(f"partition: group {i} is not a list of class indices ({g!r})")
        g = g.tolist() if torch.is_tensor(g) else list(g)
        if not g:
            raise ValueError(f"partition: group {i} is empty")
        for c in g:
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_classes:
                raise ValueError(f"partition: group {i} has {c!r}, not a class index in [0, {num_classes})")
            if c in seen:
                raise ValueError(f"partition: class {c} is in group {seen[c]} and group {i} (groups must be disjoint)")
            seen[c] = i
        out.append([int(c) for c in g])
    missing = sorted(set(range(num_classes)) - set(seen))
    if missing:
        raise ValueError(f"partition: classes {missing[:10]}{'...' if len(missing) > 10 else ''} are in no group")
    return out


def class_vectors(tokens: torch.Tensor, labels: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
    """(C, d) centred unit vectors: per-class mean teacher class token.

    Classes absent from the data fall back to their row of the teacher's head
    (the direction in token space that scores the class), centred the same way.
    """
    C, d = head_weight.shape
    tokens = tokens.double()
    sums = torch.zeros(C, d, dtype=torch.float64).index_add_(0, labels, tokens)
    counts = torch.bincount(labels, minlength=C).double()
    seen = counts > 0
    vec = torch.zeros(C, d, dtype=torch.float64)
    vec[seen] = sums[seen] / counts[seen, None]
    vec[seen] -= tokens.mean(0)
    if not bool(seen.all()):
        hw = head_weight.double()
        vec[~seen] = (hw - hw.mean(0))[~seen]
    return vec / vec.norm(dim=1, keepdim=True).clamp_min(1e-12)


def balanced_kmeans(x: torch.Tensor, sizes: Sequence[int], seed: int, iters: int = 30) -> list[list[int]]:
    """Cluster rows of `x` into len(sizes) clusters of exactly the given sizes.

    k-means++ initialisation (seeded), then alternate a capacity-constrained
    assignment (greedy over all (point, cluster) pairs by distance: a point
    goes to its nearest cluster that still has room) with centroid updates.
    """
    g = torch.Generator().manual_seed(int(seed))
    n, k = x.shape[0], len(sizes)
    cent = [x[int(torch.randint(n, (1,), generator=g))]]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(cent)).min(1).values.pow(2)
        p = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full((n,), 1.0 / n, dtype=x.dtype)
        cent.append(x[int(torch.multinomial(p.float(), 1, generator=g))])
    cent = torch.stack(cent)
    assign = None
    for _ in range(iters):
        dist = torch.cdist(x, cent)  # (n, k)
        order = torch.argsort(dist.flatten(), stable=True).tolist()
        room = list(sizes)
        new = [-1] * n
        left = n
        for idx in order:
            i, c = divmod(idx, k)
            if new[i] < 0 and room[c] > 0:
                new[i], room[c] = c, room[c] - 1
                left -= 1
                if left == 0:
                    break
        if new == assign:
            break
        assign = new
        a = torch.tensor(assign)
        cent = torch.stack([x[a == c].mean(0) for c in range(k)])
    return [[i for i in range(n) if assign[i] == c] for c in range(k)]


def similarity_groups(tokens, labels, head_weight, sizes, seed) -> list[list[int]]:
    """Classes with similar mean teacher class tokens on the same device; group sizes as given."""
    for what, t in (("the teacher's class tokens of the data", tokens), ("the teacher's head weight", head_weight)):
        bad = int((~torch.isfinite(t)).sum())
        if bad:  # NaN would make every distance NaN and the groups arbitrary
            raise ValueError(f"partition='similarity': {what} hold {bad} NaN or infinite value(s) (non-finite data "
                             "or teacher weights); clean the data, or use partition='random'")
    vec = class_vectors(tokens, labels, head_weight)
    return balanced_kmeans(vec, sizes, seed)
