"""`devit-ext bench train`: training throughput of DEKD's two stages, by data path, against a plain loop.

Rows (images per second of one training epoch, the second of two so warm-up
is excluded; every row measured in this run, interleaved by repeat):

- trainer, in-memory tensors (the fast path the demo takes);
- trainer, the same images as a map-style Dataset through a DataLoader with
  0 and with 2 workers (streaming; with workers, loading overlaps compute);
- baseline: a plain timm-style loop over the same students (their own
  forward, CE, AdamW, no teacher, no relations): what training the sub-models
  costs before DEKD adds the teacher's forward and the loss terms.

The shape is the demo's (28x28x1 digits, a 4-block 128-wide teacher, 4
devices); `--quick` uses fewer images and one repeat.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch.utils.data import Dataset

from .timing import Table


class _AsDataset(Dataset):
    """In-memory images served item by item, as a user's Dataset would (no fast path)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels
        self.targets = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def _setup(n: int):
    from .. import data as D
    from ..decomposition import decompose
    from ..teacher import build_teacher

    splits = D.synthetic(num_classes=10, per_class=max(3, n * 10 // 6 // 10), img_size=28, channels=1, seed=0)
    x, y = splits.train.images[:n], splits.train.labels[:n]
    teacher = build_teacher(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=128, depth=4,
                            num_heads=4, mlp_ratio=4.0).eval()
    return teacher, decompose(teacher, 4, seed=0), x, y


def _trainer_rates(teacher, model, data, stage: str, loader_opts) -> float:
    from ..dekd import train_dekd

    hist = train_dekd(model, teacher, data, stages=(stage,), epochs=2, batch_size=64, device="cpu", progress=False,
                      quant_aware=True, loader_opts=loader_opts)
    return hist["settings"]["num_train"] / hist[stage][-1]["seconds"]


def _plain_rate(model, x, y) -> float:
    """Each step: every student on its share of a 64-image batch, CE on its head, one AdamW step."""
    subs = list(model.submodels)
    opt = torch.optim.AdamW([p for m in subs for p in m.parameters()], lr=1e-3)
    secs = []
    for _ in range(2):
        t0 = time.perf_counter()
        perm = torch.randperm(len(y))
        for s in range(0, len(y), 64 * len(subs)):
            idx = perm[s : s + 64 * len(subs)]
            loss = 0.0
            for i, m in enumerate(subs):
                part = idx[i :: len(subs)]
                if len(part):
                    z, _ = m.forward_head(m.forward_tokens(x[part]))
                    loss = loss + torch.nn.functional.cross_entropy(z, y[part] % z.shape[-1])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        secs.append(time.perf_counter() - t0)
    return len(y) / secs[-1]


def run(device: str, quick: bool) -> list[Table]:
    if device != "cpu":
        print("bench train: measured on the CPU only in this version (the GPU pass adds CUDA rows)")
    n = 256 if quick else 1000
    repeats = 1 if quick else 3
    teacher, model, x, y = _setup(n)
    ds = _AsDataset(x, y)
    rows = {("plain", "-"): []}
    for stage in ("distill", "ensemble"):
        for path in ("tensors", "dataset, 0 workers", "dataset, 2 workers"):
            rows[(stage, path)] = []
    for _ in range(repeats):  # interleaved: every row once per repeat
        rows[("plain", "-")].append(_plain_rate(model, x, y))
        for stage in ("distill", "ensemble"):
            rows[(stage, "tensors")].append(_trainer_rates(teacher, model, (x, y), stage, None))
            for w in (0, 2):
                rows[(stage, f"dataset, {w} workers")].append(
                    _trainer_rates(teacher, model, ds, stage, {"num_workers": w}))
    plain = statistics.median(rows[("plain", "-")])
    table = Table(f"train: DEKD stage throughput, {n} images 28x28, 4 devices, batch 64, cpu "
                  f"({torch.get_num_threads()} threads)")
    table.add(stage="baseline", data="plain loop over the students (CE only)", images_per_s=round(plain, 1),
              vs_plain=1.0, repeats=repeats)
    for (stage, path), vals in rows.items():
        if stage == "plain":
            continue
        r = statistics.median(vals)
        table.add(stage=stage, data=path, images_per_s=round(r, 1), vs_plain=round(r / plain, 3), repeats=repeats)
    return [table]
