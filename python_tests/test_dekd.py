"""DEKD: losses against hand-computed values, a smoke run of both stages, exact resume, bad input."""
import math

import pytest
import torch

import devit_ext
from devit_ext import data as D
from devit_ext import dekd, protocol
from devit_ext.evaluate import accuracy
from devit_ext.teacher import build_teacher

torch.set_num_threads(1)


# ---------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------


def test_hard_distillation_uses_teacher_argmax():
    s = torch.tensor([[1.0, 2.0, 0.0]])
    t = torch.tensor([[0.0, 0.0, 5.0]])  # argmax 2
    want = math.log(math.e + math.e**2 + 1.0) - 0.0
    assert dekd.hard_distillation(s, t).item() == pytest.approx(want, rel=1e-6)
    assert dekd.distillation_loss(s, t * 100, "hard").item() == pytest.approx(want, rel=1e-6)  # scale-free


def test_soft_distillation_with_temperature():
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 2.0]])
    T = 2.0
    ps = torch.softmax(s / T, -1)[0]
    pt = torch.softmax(t / T, -1)[0]
    want = float((pt * (pt.log() - ps.log())).sum()) * T * T
    assert dekd.soft_distillation(s, t, T).item() == pytest.approx(want, rel=1e-5)
    assert dekd.soft_distillation(t, t, T).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="distill_kind"):
        dekd.distillation_loss(s, t, "medium")


def test_relation_loss_hand_computed():
    xt = torch.tensor([[[1.0], [0.0]]])  # (B=1, N=2, width 1): X X^T = [[1, 0], [0, 0]]
    xs = torch.zeros(1, 2, 1)  # R_S = 0.5 everywhere
    p = torch.tensor([math.e, 1.0]) / (math.e + 1)
    kl_row0 = float((p * (p / 0.5).log()).sum())
    assert dekd.relation_loss(xt, xs, 1).item() == pytest.approx(kl_row0 / 2, rel=1e-5)  # row 1 is uniform: 0


def test_relation_loss_zero_for_identical_positive_otherwise_any_width():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=g)
    assert dekd.relation_loss(x, x.clone(), 4, 4).item() == pytest.approx(0.0, abs=1e-6)
    y = torch.randn(2, 5, 3, generator=g)  # a narrower student
    assert dekd.relation_loss(x, y, 4, 1).item() > 1e-4
    with pytest.raises(ValueError, match="token count"):
        dekd.relation_loss(x, torch.randn(2, 4, 8), 4)


def test_qkv_relation_weights_and_gradients():
    g = torch.Generator().manual_seed(1)
    qt = torch.randn(2, 5, 3 * 8, generator=g)
    qs = torch.randn(2, 5, 3 * 4, generator=g, requires_grad=True)
    total = dekd.qkv_relation_loss(qt, qs, 4, 4, (0.2, 0.1, 0.3))
    parts = [dekd.relation_loss(a, b, 4, 4) for a, b in zip(qt.chunk(3, -1), qs.chunk(3, -1))]
    assert total.item() == pytest.approx(0.2 * parts[0].item() + 0.1 * parts[1].item() + 0.3 * parts[2].item(), rel=1e-5)
    total.backward()
    assert qs.grad is not None and torch.isfinite(qs.grad).all()


def test_token_mse_and_fake_quant_straight_through():
    a, b = torch.ones(2, 3), torch.zeros(2, 3)
    assert dekd.token_mse([a], [b]).item() == pytest.approx(1.0)
    assert dekd.token_mse([a, a], [b, a]).item() == pytest.approx(0.5)
    x = torch.randn(4, 16, requires_grad=True)
    y = protocol.fake_quant_int8(x)
    scale = x.detach().abs().amax(-1, keepdim=True) / 127
    assert torch.allclose(y, protocol.int8_roundtrip(x.detach()))
    assert ((y - x).abs() <= scale / 2 + 1e-7).all()
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # identity gradient


def test_device_dropout_zeroes_one_device_per_dropped_sample():
    toks = [torch.ones(200, 3), torch.ones(200, 2, 4), torch.ones(200, 5)]
    out = dekd.apply_drop(toks, dekd.drop_mask(200, 3, 0.5, torch.Generator().manual_seed(0)))
    zeroed = torch.stack([(t.flatten(1) == 0).all(1) for t in out], 1)  # (B, devices)
    assert zeroed.sum(1).max() == 1  # never more than one device per sample
    assert 60 < int(zeroed.any(1).sum()) < 140  # about half the samples


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return D.synthetic(num_classes=6, per_class=8, img_size=16, channels=1, seed=0)


def _setup(distilled=False, devices=2, seed=0):
    t = build_teacher(img_size=16, patch_size=4, in_chans=1, num_classes=6, embed_dim=32, depth=2, num_heads=2,
                      mlp_ratio=2.0, distilled=distilled, seed=seed).eval()
    return t, devit_ext.decompose(t, devices, seed=seed)


@pytest.mark.parametrize("distilled", [False, True], ids=["vit", "deit-distilled"])
def test_smoke_both_stages(tiny, distilled, tmp_path):
    teacher, model = _setup(distilled)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    extra = {"subtask_teachers": "finetune", "finetune_epochs": 1} if distilled else {"distill_kind": "soft"}
    hist = devit_ext.train_dekd(model, teacher, tiny.train, tiny.val, epochs=1, batch_size=8, device="cpu",
                                device_dropout=0.3, shift=1, progress=False, out_dir=tmp_path, **extra)
    assert len(hist["distill"]) == 1 and len(hist["ensemble"]) == 1
    for rec in hist["distill"] + hist["ensemble"]:
        assert math.isfinite(rec["loss"]) and 0 <= rec["val_acc"] <= 1
    assert hist["distill"][0]["rel"] > 0  # the relation loss is active
    assert hist["ensemble"][0]["mse"] > 0
    after = model.state_dict()
    assert not torch.equal(before["fusion.map.weight"], after["fusion.map.weight"])
    assert not torch.equal(before["submodels.0.blocks.0.attn.qkv.weight"], after["submodels.0.blocks.0.attn.qkv.weight"])
    loaded = devit_ext.load(tmp_path / "model")
    x = tiny.test.images[:4]
    assert torch.allclose(loaded(x), model(x), atol=1e-6)
    acc = accuracy(model, tiny.test, transfer="int8", missing=[0])
    assert 0 <= acc <= 1


def test_freeze_backbones_trains_only_the_fusion(tiny):
    teacher, model = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    devit_ext.train_dekd(model, teacher, tiny.train, stages=("ensemble",), epochs=1, batch_size=16,
                         freeze_backbones=True, quant_aware=False, progress=False)
    after = model.state_dict()
    for k in before:
        if k.startswith("submodels."):
            assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["fusion.head.weight"], after["fusion.head.weight"])


class _Stop(Exception):
    pass


def _strip(h):
    return {s: [{k: v for k, v in r.items() if k != "seconds"} for r in h[s]] for s in ("distill", "ensemble")}


def _scramble(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))


def test_resume_equals_uninterrupted(tiny, tmp_path):
    kw = dict(epochs=2, batch_size=8, device="cpu", shift=1, device_dropout=0.2, progress=False)
    teacher, model_a = _setup()
    hist_a = devit_ext.train_dekd(model_a, teacher, tiny.train, tiny.val, **kw)

    _, model_b = _setup()
    out = tmp_path / "run"
    stops = [("distill", 1), ("ensemble", 1)]

    def cb(stage, epoch, rec):
        if stops and (stage, epoch) == stops[0]:
            stops.pop(0)
            raise _Stop

    with pytest.raises(_Stop):  # interrupted after distill epoch 1
        devit_ext.train_dekd(model_b, teacher, tiny.train, tiny.val, out_dir=out, callback=cb, **kw)
    _, model_b = _setup()
    _scramble(model_b)  # a fresh process may start from other weights; resume must overwrite them
    with pytest.raises(_Stop):  # resumed, interrupted again in the middle of the ensemble stage
        devit_ext.train_dekd(model_b, teacher, tiny.train, tiny.val, out_dir=out, resume=True, callback=cb, **kw)
    _, model_b = _setup()
    _scramble(model_b)
    hist_b = devit_ext.train_dekd(model_b, teacher, tiny.train, tiny.val, out_dir=out, resume=True, callback=cb, **kw)

    sa, sb = model_a.state_dict(), model_b.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert _strip(hist_a) == _strip(hist_b)
    assert hist_a["best"] == hist_b["best"]

    with pytest.raises(ValueError, match="resume"):  # other settings than the checkpoint's
        devit_ext.train_dekd(model_b, teacher, tiny.train, tiny.val, out_dir=out, resume=True, **dict(kw, lr=0.5))


def test_bad_input_names_the_argument(tiny):
    teacher, model = _setup()
    kw = dict(epochs=1, batch_size=8, progress=False)
    empty = D.ImageDataset(torch.zeros(0, 1, 16, 16), torch.zeros(0, dtype=torch.long), 6)
    with pytest.raises(ValueError, match="train_data.*empty"):
        devit_ext.train_dekd(model, teacher, empty, **kw)
    with pytest.raises(ValueError, match="val_data.*empty"):
        devit_ext.train_dekd(model, teacher, tiny.train, empty, **kw)
    bad = D.ImageDataset(tiny.train.images[:4], torch.tensor([0, 1, 2, 9]), 10)
    with pytest.raises(ValueError, match=r"train_data: label 9 out of range \[0, 6\)"):
        devit_ext.train_dekd(model, teacher, bad, **kw)
    small = D.ImageDataset(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), 6)
    with pytest.raises(ValueError, match="train_data: images are 1x8x8 .* expects 1x16x16"):
        devit_ext.train_dekd(model, teacher, small, **kw)
    other = build_teacher(img_size=16, patch_size=4, in_chans=1, num_classes=7, embed_dim=32, depth=2, num_heads=2)
    with pytest.raises(ValueError, match="teacher: has 7 classes but model has 6"):
        devit_ext.train_dekd(model, other, tiny.train, **kw)
    with pytest.raises(ValueError, match="device_dropout"):
        devit_ext.train_dekd(model, teacher, tiny.train, device_dropout=1.5, **kw)
    with pytest.raises(ValueError, match="stages"):
        devit_ext.train_dekd(model, teacher, tiny.train, stages=("ensemble", "distill"), **kw)
    with pytest.raises(ValueError, match="subtask_teachers"):
        devit_ext.train_dekd(model, teacher, tiny.train, subtask_teachers="oracle", **kw)
    with pytest.raises(ValueError, match="resume"):
        devit_ext.train_dekd(model, teacher, tiny.train, resume=True, **kw)
    with pytest.raises(TypeError, match="model"):
        devit_ext.train_dekd(teacher, teacher, tiny.train, **kw)
