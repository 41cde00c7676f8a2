"""Fixture material for the CLI tests: a tiny PNG ImageFolder and a tiny timm teacher saved as safetensors."""
from __future__ import annotations

import os

import numpy as np
import torch

CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox"]  # sorted, as ImageFolder orders them
TEACHER = "vit_tiny_patch16_224"
TEACHER_KWARGS = dict(img_size=16, patch_size=4, in_chans=1, num_classes=6, depth=2, embed_dim=32, num_heads=2)
# the smallest published CCT (2 blocks, width 128, two 3x3 convs) on the same 16x16 grey images: 4x4 tokens
CCT_TEACHER = "cct_2_3x2_32"
CCT_KWARGS = dict(img_size=16, in_chans=1, num_classes=6)


def kwargs_flags(*, base: dict | None = None, **over) -> list[str]:
    kw = dict(TEACHER_KWARGS if base is None else base, **over)
    return [f"{k}={v}" for k, v in kw.items()]


def write_imagefolder(root: str, per_split=(("train", 8), ("val", 3)), classes=CLASSES, size=16, seed=0) -> str:
    """ROOT/<split>/<class>/<i>.png: per class a smooth random grey prototype plus noise."""
    from PIL import Image

    g = np.random.default_rng(seed)
    protos = g.random((len(classes), 4, 4))
    protos = np.kron(protos, np.ones((size // 4, size // 4)))
    for split, n in per_split:
        for c, name in enumerate(classes):
            d = os.path.join(root, split, name)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                img = np.clip(protos[c] + 0.15 * g.standard_normal((size, size)), 0, 1)
                Image.fromarray((img * 255).astype(np.uint8), mode="L").save(os.path.join(d, f"{i}.png"))
    return root


def train_teacher_file(path: str, data_root: str, steps: int = 30, *, name: str = TEACHER, base: dict | None = None,
                       **over) -> str:
    """A timm teacher (`name`, kwargs `base` + `over`) fitted for a few AdamW steps on the folder's train split,
    saved with safetensors."""
    import timm
    import timm.data
    from safetensors.torch import save_file

    import devit_ext.cct  # noqa: F401 - registers the CCT variants with timm

    from devit_ext.imagefolder import as_tensors, load_split
    from devit_ext.run_dir import data_config

    torch.manual_seed(0)
    t = timm.create_model(name, pretrained=False, **dict(TEACHER_KWARGS if base is None else base, **over))
    ds = load_split(data_root, "train", data_config(t))
    x, y = as_tensors(ds)
    opt = torch.optim.AdamW(t.parameters(), lr=3e-3)
    t.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(t(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_file({k: v.contiguous() for k, v in t.state_dict().items()}, path)
    return path
