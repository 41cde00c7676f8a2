"""`devit-ext demo --tiny`: the whole pipeline in seconds, its --json and --plot output, the teacher cache."""
import json

import pytest

from devit_ext import cli
from devit_ext.demo import TINY_DEVICE_SHAPES


def test_demo_tiny_json_plot_and_cache(tmp_path, capsys):
    js, png, cache = tmp_path / "r.json", tmp_path / "r.png", tmp_path / "cache"
    argv = ["demo", "--tiny", "--quiet", "--threads", "1", "--json", str(js), "--plot", str(png),
            "--cache-dir", str(cache)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "teacher" in out and "DeViT int8" in out and "device 0 missing" in out
    r = json.loads(js.read_text())
    for k in ("teacher_acc", "devit_acc_fp32", "devit_acc_int8", "acc_one_device_missing"):
        assert 0.0 <= r[k] <= 1.0, k
    assert r["num_devices"] == 4 and len(r["device_flops"]) == 4
    assert sum(r["device_flops"]) <= 0.4 * r["teacher_flops"]
    assert r["bytes_per_image"] == [w + 4 for w in r["widths"]]  # int8 token + fp32 scale
    assert r["bytes_per_image_fp32"] == [4 * w for w in r["widths"]]
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert r["seconds"]["teacher_cached"] is False
    assert r["recipe"]["teacher"]["backbone"] == "cct"  # the default teacher: a CCT (convolutional tokenizer)
    assert r["recipe"]["devices"] == {"shape": TINY_DEVICE_SHAPES["cct"]}  # 4 devices: the demo's explicit shape

    # the second run loads the cached teacher (same accuracy, no training)
    assert cli.main(argv[:-4] + ["--json", str(js), "--cache-dir", str(cache), "--devices", "2"]) == 0
    r2 = json.loads(js.read_text())
    assert r2["seconds"]["teacher_cached"] is True and r2["teacher_acc"] == r["teacher_acc"]
    assert r2["num_devices"] == 2 and len(r2["bytes_per_image"]) == 2
    assert r2["recipe"]["devices"] == {"budget": 0.4}  # another device count: shapes searched for 40%
    assert sum(r2["device_flops"]) <= 0.4 * r2["teacher_flops"]


def test_demo_device_shape_fits_the_budget_on_the_demo_teacher():
    """The full demo's 4 devices (explicit shape, exact slices of the CCT teacher): the shape asked for, and
    together at most 40% of the teacher's FLOPs (issue 4's target); built untrained, nothing is run."""
    import devit_ext
    from devit_ext import data as D
    from devit_ext.demo import DEVICE_SHAPES, TEACHERS, cct_teacher

    teacher = cct_teacher(TEACHERS["cct"], D.mnist5k(seed=0), seed=0)
    shape = DEVICE_SHAPES["cct"]
    model = devit_ext.decompose(teacher, 4, budgets=[dict(shape)] * 4, seed=0)
    tf = model.meta["teacher_flops"]
    assert 0.35 * tf < sum(model.flops()) <= 0.4 * tf
    for m in model.submodels:
        assert m.cfg["embed_dim"] == shape["embed_dim"] and len(m.cfg["blocks"]) == shape["depth"]
        assert m.cfg["conv_channels"] == shape["conv_channels"]
        assert m.cfg["blocks"][0] == {"num_heads": shape["num_heads"], "mlp_hidden": shape["mlp_hidden"]}


def test_demo_vit_backbone(tmp_path, capsys):
    js = tmp_path / "r.json"
    argv = ["demo", "--tiny", "--quiet", "--threads", "1", "--no-cache", "--backbone", "vit", "--json", str(js)]
    assert cli.main(argv) == 0
    r = json.loads(js.read_text())
    assert r["recipe"]["teacher"]["patch_size"] == 7 and "backbone" not in r["recipe"]["teacher"]
    assert sum(r["device_flops"]) <= 0.4 * r["teacher_flops"] and "DeViT int8" in capsys.readouterr().out


def test_demo_rejects_bad_arguments(capsys):
    assert cli.main(["demo", "--tiny", "--devices", "0", "--no-cache"]) == 2
    assert "--devices" in capsys.readouterr().err
    assert cli.main(["demo", "--tiny", "--budget", "1.5", "--no-cache"]) == 2
    assert "--budget" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["demo", "--device", "tpu"])
    with pytest.raises(SystemExit):
        cli.main(["demo", "--backbone", "resnet"])


def test_affine_dataset_draws_fresh_images_and_keeps_labels():
    import torch

    from devit_ext.data import ImageDataset
    from devit_ext.demo import AffineDataset

    g = torch.Generator().manual_seed(0)
    base = ImageDataset(torch.rand(6, 1, 28, 28, generator=g), torch.arange(6) % 3, 3)
    aug = AffineDataset(base, degrees=10, translate=0.1, scale=[0.9, 1.1])
    assert len(aug) == 6 and torch.equal(aug.labels, base.labels)
    torch.manual_seed(1)
    x1, y1 = aug[4]
    x2, _ = aug[4]
    torch.manual_seed(1)
    x1_again, _ = aug[4]
    assert x1.shape == (1, 28, 28) and y1 == 1
    assert not torch.equal(x1, base.images[4]) and not torch.equal(x1, x2)  # a new draw every call
    assert torch.equal(x1, x1_again)  # from torch's RNG, which train_teacher seeds per epoch


def _tiny_teacher_run(tmp_path=None, **kw):
    import torch

    from devit_ext.teacher import train_teacher

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 1, 14, 14, generator=g), torch.arange(64) % 4
    return train_teacher((x, y), None, img_size=14, in_chans=1, num_classes=4, embed_dim=16, depth=1, num_heads=2,
                         mlp_ratio=2.0, patch_size=7, batch_size=32, progress=False,
                         out_dir=tmp_path, **kw)[1]


def test_teacher_fixed_warmup_epochs(tmp_path):
    # default: the one-cycle peak is 20% in (end of epoch 1 of 5); warmup_epochs=2 moves it to epoch 2
    default = [h["lr"] for h in _tiny_teacher_run(epochs=5)]
    fixed = [h["lr"] for h in _tiny_teacher_run(tmp_path, epochs=5, warmup_epochs=2)]
    assert default[0] == max(default) and default[1] < default[0]
    assert fixed[0] < fixed[1] == max(fixed)
    with pytest.raises(ValueError, match="warmup_epochs"):
        _tiny_teacher_run(epochs=2, warmup_epochs=2)
    with pytest.raises(ValueError, match="warmup_epochs"):  # part of what a resumed run must match
        _tiny_teacher_run(tmp_path, epochs=5, warmup_epochs=1, resume=True)
