"""Where the trainers' images come from: in-memory tensors, or any map-style Dataset streamed by a DataLoader.

A `Source` turns an epoch plan (a list of index batches, see `sampling.py`)
into (images, labels) batches:

- `TensorSource`: the whole set is already two tensors ((images, labels),
  `devit_ext.data` sets, a plain `TensorDataset`); a batch is an index into
  them, as fast as training gets.
- `DatasetSource`: anything else. A `torch.utils.data.DataLoader` reads the
  plan's batches through the dataset's own `__getitem__` (so random
  transforms are drawn afresh every epoch) with the caller's loader settings;
  nothing holds the data set in memory. Its workers are seeded per epoch
  (through the loader's generator), so an epoch replays on resume unless
  `persistent_workers` keeps workers (and their RNG) alive across epochs.

Labels are read without decoding images where the data set has them
(`targets`, `labels`, `Subset`, `ConcatDataset`), otherwise in one pass that is
cached in the run directory. Errors name the argument (`train_data`, ...).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterator, Sequence

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, TensorDataset

# DataLoader settings taken from a loader the caller passes (batching and order are the trainer's).
LOADER_KEYS = ("num_workers", "pin_memory", "collate_fn", "persistent_workers", "prefetch_factor",
               "worker_init_fn", "timeout", "multiprocessing_context", "pin_memory_device", "in_order")


class TensorSource:
    """All images (N, C, H, W) float and labels (N,) long in memory."""

    kind = "tensors"

    def __init__(self, name: str, images: torch.Tensor, labels: torch.Tensor):
        self.name, self.images, self.labels = name, images, labels
        self.item_shape = tuple(images.shape[1:])

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(self, plan: Sequence[torch.Tensor], seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in plan:
            yield self.images[idx], self.labels[idx]

    def subset(self, indices: torch.Tensor, label_map: torch.Tensor) -> "TensorSource":
        return TensorSource(self.name, self.images[indices], label_map[self.labels[indices]])


class _PlanSampler(torch.utils.data.Sampler):
    """A batch sampler that yields whatever plan the trainer set for this epoch."""

    def __init__(self):
        self.plan: Sequence[torch.Tensor] = []

    def __iter__(self):
        for idx in self.plan:
            yield idx.tolist()

    def __len__(self) -> int:
        return len(self.plan)


class _Relabeled(Dataset):
    """`dataset` restricted to `indices`, labels mapped through `label_map` (a group's local classes)."""

    def __init__(self, dataset, indices: torch.Tensor, label_map: torch.Tensor, labels: torch.Tensor):
        self.dataset, self.indices, self.label_map = dataset, indices.tolist(), label_map
        self.targets = labels  # already mapped: lets read_labels skip a pass

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        x, y = self.dataset[self.indices[i]][:2]
        return x, int(self.label_map[int(y)])


class DatasetSource:
    """A map-style Dataset of (image tensor, int label), read in the plan's batches by one DataLoader."""

    kind = "dataset"

    def __init__(self, name: str, dataset, labels: torch.Tensor, loader_opts: dict, item_shape: tuple):
        self.name, self.dataset, self.labels, self.opts = name, dataset, labels, dict(loader_opts)
        self.item_shape = tuple(item_shape)  # of the first item, checked when the source was made
        self._sampler = _PlanSampler()
        self._gen = torch.Generator()
        self.loader = DataLoader(dataset, batch_sampler=self._sampler, generator=self._gen, **self.opts)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(self, plan: Sequence[torch.Tensor], seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._sampler.plan = plan
        self._gen.manual_seed(int(seed))  # each epoch's worker seeds (and so their augmentations)
        k = 0
        for batch in self.loader:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise TypeError(f"{self.name}: batch {k}: the loader must give (images, labels), got "
                                f"{type(batch).__name__}")
            k += 1
            yield batch[0], batch[1]

    def subset(self, indices: torch.Tensor, label_map: torch.Tensor) -> "DatasetSource":
        labels = label_map[self.labels[indices]]
        return DatasetSource(self.name, _Relabeled(self.dataset, indices, label_map, labels), labels, self.opts,
                             self.item_shape)


def default_loader_opts(device: torch.device, local_world: int = 1) -> dict:
    """Workers from the CPU count (shared by the processes on this machine), pinned memory on CUDA."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(8, max(0, cpus // max(1, local_world) - 1))
    opts = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers:
        opts["prefetch_factor"] = 4
    return opts


def _in_memory(data):
    """(images, labels) when `data` is exactly two tensors with nothing applied per item, else None."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[0], data[1]
    from ..data import ImageDataset

    if isinstance(data, ImageDataset) and type(data).__getitem__ is ImageDataset.__getitem__:
        return data.images, data.labels
    if type(data) is TensorDataset and len(data.tensors) >= 2:
        return data.tensors[0], data.tensors[1]
    return None


def as_source(name: str, data, *, device: torch.device, loader_opts: dict | None = None, cache_dir=None,
              local_world: int = 1):
    """The Source for `data` (Dataset, DataLoader over one, or an (images, labels) pair); errors name `name`."""
    if data is None:
        raise ValueError(f"{name}: is None; expected a Dataset of (image, label) or a DataLoader over one")
    if isinstance(data, (TensorSource, DatasetSource)):  # a trainer handing a subset to another trainer
        return data
    opts = default_loader_opts(device, local_world)
    if isinstance(data, DataLoader):
        opts = {k: getattr(data, k) for k in LOADER_KEYS if hasattr(data, k)}
        data = data.dataset
    elif (pair := _in_memory(data)) is not None and not loader_opts:
        return _tensor_source(name, *pair)
    opts.update(loader_opts or {})
    if not opts.get("num_workers"):  # DataLoader refuses these without workers
        opts.pop("prefetch_factor", None)
        opts.pop("persistent_workers", None)
    if not isinstance(data, Dataset) and not hasattr(data, "__getitem__"):
        raise TypeError(f"{name}: expected a Dataset of (image, label), a DataLoader or (images, labels), "
                        f"got {type(data).__name__}")
    try:
        n = len(data)
    except TypeError:
        raise TypeError(f"{name}: expected a map-style Dataset with a length, got {type(data).__name__}") from None
    if n == 0:
        raise ValueError(f"{name}: the data set is empty")
    first = _check_item(name, data[0])
    return DatasetSource(name, data, read_labels(name, data, opts, cache_dir), opts, first.shape)


def _tensor_source(name: str, x, y) -> TensorSource:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"{name}: images and labels must be tensors")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: the data set is empty")
    if x.dim() != 4:
        raise ValueError(f"{name}: images must be (C, H, W) each, got a batch of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: images must be float (normalised), got {x.dtype}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: {x.shape[0]} images but labels of shape {tuple(y.shape)}")
    if y.is_floating_point():
        raise TypeError(f"{name}: labels must be integers, got {y.dtype}")
    return TensorSource(name, x.float(), y.long())


def _check_item(name: str, item) -> torch.Tensor:
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise TypeError(f"{name}: items must be (image tensor, int label), got {type(item).__name__}")
    if not isinstance(item[0], torch.Tensor):
        raise TypeError(f"{name}: images must be tensors (C, H, W), got {type(item[0]).__name__}; "
                        "add a transform that ends in ToTensor (and Normalize)")
    if item[0].dim() != 3:
        raise ValueError(f"{name}: images must be (C, H, W) tensors, got shape {tuple(item[0].shape)}")
    return item[0]


# ---------------------------------------------------------------------------
# labels without decoding images
# ---------------------------------------------------------------------------


def _known_labels(data):
    """The labels of `data` from its attributes, or None when they are not known without reading items."""
    if isinstance(data, Subset):
        parent = _known_labels(data.dataset)
        return None if parent is None else parent[torch.as_tensor(list(data.indices), dtype=torch.long)]
    if isinstance(data, ConcatDataset):
        parts = [_known_labels(d) for d in data.datasets]
        return None if any(p is None for p in parts) else torch.cat(parts)
    if getattr(data, "target_transform", None) is not None:  # items' labels are not the stored ones
        return None
    for attr in ("targets", "labels"):
        v = getattr(data, attr, None)
        if v is not None and not callable(v):
            t = torch.as_tensor(v if not isinstance(v, torch.Tensor) else v.detach().cpu())
            if t.dim() == 1 and len(t) == len(data) and not t.is_floating_point():
                return t.long()
    return None


def _labels_pass(name: str, data, opts: dict) -> torch.Tensor:
    from tqdm.auto import tqdm

    keep = {k: opts[k] for k in ("num_workers", "collate_fn", "worker_init_fn", "multiprocessing_context")
            if k in opts and opts[k] is not None}
    loader = DataLoader(data, batch_size=256, shuffle=False, **keep)
    out = []
    for k, batch in enumerate(tqdm(loader, desc=f"{name}: reading labels", leave=False)):
        y = torch.as_tensor(batch[1])
        if y.is_floating_point() or y.dim() != 1:
            raise TypeError(f"{name}: batch {k}: labels must be ints, got {y.dtype} of shape {tuple(y.shape)}")
        out.append(y.long())
    return torch.cat(out)


def read_labels(name: str, data, opts: dict, cache_dir=None) -> torch.Tensor:
    """Labels of every item: from attributes when possible, else one pass (cached under `cache_dir`)."""
    known = _known_labels(data)
    if known is not None:
        return known
    key = hashlib.sha256(f"{type(data).__module__}.{type(data).__qualname__}:{len(data)}".encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"labels-{name}-{key}.json") if cache_dir else None
    if path and os.path.isfile(path):
        with open(path) as f:
            cached = json.load(f)
        if len(cached) == len(data):
            return torch.tensor(cached, dtype=torch.long)
    labels = _labels_pass(name, data, opts)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(labels.tolist(), f)
        os.replace(tmp, path)
    return labels


# ---------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------


def check_labels(name: str, labels: torch.Tensor, num_classes: int, who: str) -> None:
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name}: label {bad} out of range [0, {num_classes}) ({who} has {num_classes} classes)")


def check_shape(name: str, shape: Sequence[int], image_shape: Sequence[int], who: str) -> None:
    want, got = tuple(int(v) for v in image_shape), tuple(int(v) for v in shape)
    if got != want:
        raise ValueError(
            f"{name}: images are {'x'.join(map(str, got))} but {who} expects {'x'.join(map(str, want))} (C x H x W)"
        )


def check_batch(name: str, k: int, x, y, *, image_shape, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch as it arrives: tensors, float images of the right shape, finite, int labels."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"{name}: batch {k}: expected (image tensor, label tensor), got "
                        f"({type(x).__name__}, {type(y).__name__})")
    if x.dim() != 4:
        raise ValueError(f"{name}: batch {k}: images must be (B, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: batch {k}: images must be float (normalised), got {x.dtype}")
    if y.is_floating_point() or y.dim() != 1:
        raise TypeError(f"{name}: batch {k}: labels must be ints of shape (B,), got {y.dtype} {tuple(y.shape)}")
    check_shape(f"{name}: batch {k}", x.shape[1:], image_shape, who)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: batch {k} contains NaN or Inf images")
    return x, y
