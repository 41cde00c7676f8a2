"""The "deit" recipe: timm's Mixup/CutMix with soft targets, weight EMA, DeiT's lr rule, accumulation; resumable."""
import pytest
import torch

import devit_ext
from devit_ext import data as D
from devit_ext.teacher import build_teacher, train_teacher
from devit_ext.training import recipe as R
from test_training_args import StopRun, stop_at

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    return D.synthetic(num_classes=6, per_class=8, img_size=16, channels=1, seed=0)


def _setup():
    t = build_teacher(img_size=16, patch_size=4, in_chans=1, num_classes=6, embed_dim=32, depth=2, num_heads=2,
                      mlp_ratio=2.0, seed=0).eval()
    return t, devit_ext.decompose(t, 2, seed=0)


def test_recipes_by_name_and_overrides():
    deit = R.resolve("deit")
    assert (deit.mixup, deit.cutmix, deit.label_smoothing) == (0.8, 1.0, 0.1) and deit.ema_decay > 0.999
    assert deit.lr(5e-4, 1024) == pytest.approx(1e-3)  # per 512 images of global batch
    assert R.resolve("light").lr(5e-4, 1024) == 5e-4 and not R.resolve("light").mixes
    assert R.resolve("deit", mixup=0.0, cutmix=0.0).mixes is False
    with pytest.raises(ValueError, match="recipe"):
        R.resolve("imagenet")
    with pytest.raises(ValueError, match="ema_decay"):
        R.resolve("light", ema_decay=1.5)
    with pytest.raises(ValueError, match="accum_steps"):
        R.resolve("light", accum_steps=0)


def test_soft_target_loss_is_timms():
    z = torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 3])
    soft = torch.nn.functional.one_hot(y, 5).float() * 0.9 + 0.02
    want = (-soft * z.log_softmax(-1)).sum(-1).mean()
    assert R.label_loss(z, soft).item() == pytest.approx(want.item(), rel=1e-6)
    assert R.label_loss(z, y).item() == pytest.approx(torch.nn.functional.cross_entropy(z, y).item(), rel=1e-6)


def test_mixup_mixes_images_and_targets():
    mix = R.make_mixup(R.resolve("deit"), 3)
    x = torch.stack([torch.full((1, 4, 4), float(i)) for i in range(4)])
    y = torch.tensor([0, 1, 2, 0])
    torch.manual_seed(0)
    import numpy as np

    np.random.seed(0)
    xm, ym = mix(x.clone(), y)
    assert ym.shape == (4, 3) and torch.allclose(ym.sum(-1), torch.ones(4))
    assert not torch.equal(xm, x)  # seeded: mixed (lam < 1)


def test_deit_recipe_runs_with_mixup_and_ema_and_resumes_exactly(tiny, tmp_path):
    kw = dict(epochs=2, batch_size=8, device="cpu", recipe="deit", lr=5e-3, ema_decay=0.9, accum_steps=2,
              progress=False)
    teacher, model_a = _setup()
    hist_a = devit_ext.train_dekd(model_a, teacher, tiny.train, tiny.val, **kw)
    for stage in ("distill", "ensemble"):
        for rec in hist_a[stage]:
            assert rec["mixup"] is True and 0 <= rec["ema_val_acc"] <= 1 and rec["loss"] > 0
        assert "ema" in hist_a["best"][stage]
    rset = hist_a["settings"]["recipe"]
    assert rset["name"] == "deit" and rset["accum_steps"] == 2 and rset["ema_decay"] == 0.9

    stop = stop_at("ensemble", 1)
    _, model_b = _setup()
    with pytest.raises(StopRun):
        devit_ext.train_dekd(model_b, teacher, tiny.train, tiny.val, out_dir=tmp_path, callback=stop, **kw)
    _, model_b = _setup()
    hist_b = devit_ext.train_dekd(model_b, teacher, tiny.train, tiny.val, out_dir=tmp_path, resume=True, **kw)
    for k, v in model_a.state_dict().items():
        assert torch.equal(v, model_b.state_dict()[k]), k
    assert [r["ema_val_acc"] for r in hist_a["ensemble"]] == [r["ema_val_acc"] for r in hist_b["ensemble"]]


def test_teacher_trains_with_the_deit_recipe(tiny):
    t, hist = train_teacher(tiny.train, tiny.val, epochs=2, batch_size=8, lr=5e-3, recipe="deit", ema_decay=0.9,
                            device="cpu", progress=False, img_size=16, patch_size=4, in_chans=1, num_classes=6,
                            embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0)
    assert all(r["mixup"] and "ema_val_acc" in r for r in hist)
