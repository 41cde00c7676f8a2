"""An ImageFolder split (`ROOT/<split>/<class>/*.png|jpg`) with timm's transforms.

Classes are the sub-folder names in sorted order (as torchvision's ImageFolder
does), so label i is the i-th name. The folder is checked before any work: a
missing split, a split without class folders, an empty class folder or a file
that is not an image (by extension) is a clear error naming the flag and path.
An image file that PIL cannot read is an error naming that file when it is read.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from .run_dir import RunError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class FolderScan:
    root: str
    classes: list[str]
    samples: list[tuple[str, int]]


def scan(root: str, split: str, flag: str = "--data") -> FolderScan:
    """List `root/split/<class>/<image>` files, or raise RunError naming `flag`."""
    if not root:
        raise RunError(f"{flag}: required (an ImageFolder root: ROOT/<split>/<class>/*.png|jpg)")
    if not os.path.isdir(root):
        raise RunError(f"{flag}: {root!r} is not a directory")
    d = os.path.join(root, split)
    if not os.path.isdir(d):
        have = sorted(e for e in os.listdir(root) if os.path.isdir(os.path.join(root, e)))
        raise RunError(f"{flag}: split folder {d!r} does not exist (folders in {root!r}: {have or 'none'})")
    classes = sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise RunError(f"{flag}: {d!r} has no class folders (expected {d}/<class>/*.png|jpg)")
    samples = []
    for i, c in enumerate(classes):
        cdir = os.path.join(d, c)
        files = []
        for dirpath, dirnames, names in os.walk(cdir, followlinks=True):
            dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
            for n in sorted(names):
                if n.startswith("."):
                    continue
                p = os.path.join(dirpath, n)
                if not n.lower().endswith(IMG_EXTENSIONS):
                    raise RunError(f"{flag}: {p!r} is not an image file (expected one of {', '.join(IMG_EXTENSIONS)})")
                files.append(p)
        if not files:
            raise RunError(f"{flag}: class folder {cdir!r} has no images")
        samples.extend((p, i) for p in files)
    return FolderScan(d, classes, samples)


def make_transform(data_cfg: dict, *, training: bool, recipe: str = "light"):
    """timm's eval transform, or for recipe 'deit' timm's DeiT training transform (RandAugment,
    random erasing) on the model's data config."""
    import timm.data

    cfg = {k: data_cfg[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode") if k in data_cfg}
    if training and recipe == "deit":
        return timm.data.create_transform(**cfg, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                                          re_prob=0.25, re_mode="pixel", re_count=1)
    return timm.data.create_transform(**cfg, is_training=False)


class ImageFolderData(Dataset):
    """(transform(image), label) for each file of a `scan`; images open in L or RGB to match the model."""

    def __init__(self, folder: FolderScan, transform, in_chans: int):
        self.folder = folder
        self.classes = folder.classes
        self.samples = folder.samples
        self.targets = [label for _, label in folder.samples]  # as torchvision: labels without decoding images
        self.transform = transform
        self.mode = "L" if in_chans == 1 else "RGB"
        if in_chans not in (1, 3):
            raise RunError(f"--data: image files give 1 or 3 channels, the model takes in_chans={in_chans}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                img = im.convert(self.mode)
        except (UnidentifiedImageError, OSError) as e:
            raise RunError(f"--data: {path!r} is not a readable image ({e})") from None
        return self.transform(img), label


def load_split(root: str, split: str, data_cfg: dict, *, training: bool = False, recipe: str = "light",
               flag: str = "--data") -> ImageFolderData:
    folder = scan(root, split, flag)
    return ImageFolderData(folder, make_transform(data_cfg, training=training, recipe=recipe), data_cfg["input_size"][0])


def as_batches(ds: Dataset, batch_size: int, workers: int = 0, desc: str | None = None):
    """Iterate (images, labels) batches in file order, with a progress bar when `desc` is given."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
    return tqdm(loader, desc=desc, disable=desc is None, leave=False)


def as_tensors(ds: Dataset, batch_size: int = 64, workers: int = 0, desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split as (images, labels) tensors (evaluation and export checks)."""
    xs, ys = [], []
    for x, y in as_batches(ds, batch_size, workers, desc):
        xs.append(x)
        ys.append(torch.as_tensor(y))
    return torch.cat(xs), torch.cat(ys).long()
