"""devit_ext.evaluate: one accuracy path over tensors and Datasets, equal to the trainers' own numbers."""
from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from devit_ext import protocol
from devit_ext.bench.e2e import build_devit
from devit_ext.data import ImageDataset
from devit_ext.evaluate import accuracy, batches, local_accuracy

C = 4


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    t = VisionTransformer(img_size=16, patch_size=8, in_chans=1, num_classes=C, embed_dim=32, depth=1,
                          num_heads=2).eval()
    m = build_devit(t, [{"embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_hidden": 32}] * 2).eval()
    x = torch.randn(37, 1, 16, 16)
    y = torch.randint(0, C, (37,))
    return t, m, x, y


def test_tensors_dataset_and_devit_sets_agree(setup):
    t, m, x, y = setup
    ds = ImageDataset(x, y, C)

    class Items(torch.utils.data.Dataset):  # only __getitem__/__len__: streamed through a DataLoader
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return x[i], int(y[i])

    for kw in ({}, {"transfer": "int8"}, {"transfer": "fp16", "missing": [1]}):
        a = accuracy(m, (x, y), batch_size=8, **kw)
        assert a == accuracy(m, ds, batch_size=5, **kw) == accuracy(m, Items(), batch_size=16, **kw)
        want = (protocol.fused_forward(m, x, **kw).argmax(-1) == y).float().mean().item()
        assert a == pytest.approx(want)
    with torch.no_grad():
        assert accuracy(t, ds) == pytest.approx((t(x).argmax(-1) == y).float().mean().item())
        want = protocol.fused_forward(m, x, transfer="int8", missing=[0]).argmax(-1)
    assert accuracy(m, ds, transfer="int8", missing=[0]) == pytest.approx((want == y).float().mean().item())


def test_engine_path_and_local_accuracy(setup):
    _, m, x, y = setup
    logits = protocol.fused_forward(m, x, transfer="fp32")
    engine = accuracy(m, (x, y), engine="local", transfer="fp32")
    assert engine == pytest.approx((logits.argmax(-1) == y).float().mean().item(), abs=1 / len(y))
    accs = local_accuracy(m, (x, y), batch_size=7)
    for i, (sub, g) in enumerate(zip(m.submodels, m.class_groups)):
        keep = torch.isin(y, torch.tensor(g))
        lut = {c: j for j, c in enumerate(g)}
        want = (sub(x[keep]).argmax(-1) == torch.tensor([lut[int(c)] for c in y[keep]])).float().mean().item()
        assert accs[i] == pytest.approx(want)


def test_bad_input_names_the_argument(setup):
    t, m, x, y = setup
    with pytest.raises(TypeError, match="data"):
        accuracy(m, [1, 2, 3])
    with pytest.raises(ValueError, match="data"):
        accuracy(m, (x, y[:3]))
    with pytest.raises(ValueError, match="transfer"):
        accuracy(m, (x, y), transfer="int4")
    with pytest.raises(ValueError, match="missing"):
        accuracy(m, (x, y), missing=[5])
    with pytest.raises(ValueError, match="transfer"):
        accuracy(t, (x, y), transfer="int8")
    with pytest.raises(ValueError, match="batch_size"):
        list(batches((x, y), 0))
