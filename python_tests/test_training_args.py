"""Training refuses what can only fail, and a loss that turns non-finite stops the run naming the step."""
import math

import pytest
import torch

import devit_ext
from devit_ext import checkpoint as ckpt
from devit_ext import data as D
from devit_ext.teacher import build_teacher, train_teacher

torch.set_num_threads(1)
ARCH = dict(img_size=16, patch_size=4, in_chans=1, num_classes=6, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0)


@pytest.fixture(scope="module")
def tiny():
    return D.synthetic(num_classes=6, per_class=8, img_size=16, channels=1, seed=0)


def _setup():
    t = build_teacher(img_size=16, patch_size=4, in_chans=1, num_classes=6, embed_dim=32, depth=2, num_heads=2,
                      mlp_ratio=2.0, seed=0).eval()
    return t, devit_ext.decompose(t, 2, seed=0)


class StopRun(Exception):
    """Raised by a `stop_at` callback: ends a train_dekd run the way a kill would, checkpoints written."""


def stop_at(stage: str, epoch: int | None = None):
    """A train_dekd callback that raises StopRun after `epoch` of `stage` (after its first epoch when None)."""

    def callback(s, e, rec):
        if s == stage and (epoch is None or e == epoch):
            raise StopRun

    return callback


BAD_DEKD = [
    ("lr", math.inf), ("lr", 0.0), ("lr", (1e-3, -1.0)), ("temperature", 0.0), ("temperature", -1.0),
    ("token_weight", math.nan), ("clip", -1.0), ("batch_size", 0), ("weight_decay", -1.0), ("epochs", "abc"),
    ("epochs", 0), ("seed", "abc"), ("shift", -1), ("alpha", math.nan), ("device_dropout", 1.0),
    ("relation_weights", (0.2, math.inf, 0.3)), ("warmup_epochs", -1.0), ("finetune_lr", 0.0),
    ("mixup", -0.5), ("label_smoothing", 1.0), ("dist_timeout", 0), ("token_weight", -0.5),
    ("relation_weights", (0.2, -0.1, 0.3)), ("epochs", {"distil": 1}), ("lr", (1e-3, 1e-3, 1e-3)),
    ("finetune_epochs", -1), ("cutmix", -1.0), ("ema_decay", 1.0), ("accum_steps", 0),
]


@pytest.mark.parametrize("name,value", BAD_DEKD, ids=[f"{n}={v!r}" for n, v in BAD_DEKD])
def test_train_dekd_refuses_bad_settings_naming_them(tiny, name, value):
    teacher, model = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(epochs=1, batch_size=8, device="cpu", progress=False)
    kw[name] = value
    with pytest.raises(ValueError, match=f"^{name}: "):  # the message starts with the argument's name
        devit_ext.train_dekd(model, teacher, tiny.train, **kw)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing trained


@pytest.mark.parametrize("name,value", [("lr", math.inf), ("batch_size", 0), ("clip", -1.0), ("epochs", 1.5),
                                        ("weight_decay", -1.0), ("seed", "abc"), ("embed_dim", 16.7)])
def test_train_teacher_refuses_bad_settings_naming_them(tiny, name, value):
    kw = dict(epochs=1, batch_size=8, lr=1e-3, device="cpu", progress=False, **ARCH)
    kw[name] = value
    with pytest.raises(ValueError, match=name):
        train_teacher(tiny.train, **kw)


@pytest.mark.parametrize("name,value", [("embed_dim", 16.7), ("depth", 1.0), ("num_heads", 0), ("seed", "abc"),
                                        ("img_size", 16.0), ("mlp_ratio", math.nan), ("embed_dim", 17)])
def test_build_teacher_refuses_bad_shapes_naming_them(name, value):
    """Floats are refused, not truncated (embed_dim 16.7 gave a raw conv error, seed 'abc' a raw int() one)."""
    with pytest.raises(ValueError, match=name):
        build_teacher(**dict(ARCH, **{name: value}))


def test_a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tiny, tmp_path):
    teacher, model = _setup()
    out = tmp_path / "run"
    devit_ext.train_dekd(model, teacher, tiny.train, stages=("ensemble",), epochs=1, batch_size=8, device="cpu",
                         out_dir=out, progress=False)
    good = ckpt.load_checkpoint(out / ckpt.CKPT_DIR)
    with torch.no_grad():  # weights that overflow: the loss of the first batch is not finite
        model.fusion.head.weight.fill_(3e38)
    map_before = model.fusion.map.weight.detach().clone()
    with pytest.raises(FloatingPointError, match=r"train_dekd: stage 'ensemble' epoch 1 batch 0: the loss is"):
        devit_ext.train_dekd(model, teacher, tiny.train, stages=("ensemble",), epochs=2, batch_size=8,
                             device="cpu", out_dir=out, progress=False)
    state, tensors = ckpt.load_checkpoint(out / ckpt.CKPT_DIR)
    assert state["token"] == good[0]["token"]  # the last good save is untouched
    assert torch.equal(model.fusion.map.weight, map_before)  # no update was applied
