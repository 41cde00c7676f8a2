"""The DEKD trainer uses its method settings and learns: relation weights reach the loss, and
training a small learnable set beats chance and the untrained model."""
from __future__ import annotations

import pytest
import torch

import devit_ext
from devit_ext import data as D
from devit_ext import dekd
from devit_ext.evaluate import accuracy
from devit_ext.teacher import build_teacher, train_teacher

PAPER_WEIGHTS = (0.2, 0.1, 0.3)


@pytest.fixture(scope="module")
def tiny():
    return D.synthetic(num_classes=6, per_class=8, img_size=16, channels=1, seed=0)


def _setup(seed=0):
    t = build_teacher(img_size=16, patch_size=4, in_chans=1, num_classes=6, embed_dim=32, depth=2, num_heads=2,
                      mlp_ratio=2.0, seed=seed).eval()
    return t, devit_ext.decompose(t, 2, seed=seed)


def _students(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith("submodels.")}


def _distill_once(tiny, **kw):
    teacher, model = _setup()
    devit_ext.train_dekd(model, teacher, tiny.train, stages=("distill",), epochs=1, batch_size=16, device="cpu",
                         progress=False, seed=0, **kw)
    return _students(model)


def test_relation_weights_change_the_trained_students(tiny):
    off = _distill_once(tiny, relation_weights=(0.0, 0.0, 0.0))
    paper = _distill_once(tiny, relation_weights=PAPER_WEIGHTS)
    default = _distill_once(tiny)
    assert all(torch.equal(paper[k], default[k]) for k in paper)  # the default is the paper's
    moved = [k for k in paper if "attn.qkv" in k and not torch.equal(paper[k], off[k])]
    assert moved, "relation weights (0.2, 0.1, 0.3) and (0, 0, 0) trained the same Q/K/V weights"


def test_trainer_passes_the_weights_in_order(tiny, monkeypatch):
    """Whatever the trainer does, each step's stage-3 loss gets (g_Q, g_K, g_V) as given."""
    seen = []
    real = dekd.distill_loss

    def spy(*a, **kw):
        seen.append(tuple(kw["relation_weights"]))
        return real(*a, **kw)

    import devit_ext.dekd.stages as stages

    monkeypatch.setattr(stages, "distill_loss", spy)
    _distill_once(tiny, relation_weights=(0.3, 0.5, 0.7))
    assert seen and set(seen) == {(0.3, 0.5, 0.7)}


@pytest.mark.slow
def test_training_beats_chance_and_the_untrained_model():
    """6 learnable classes: a trained teacher, decompose, both DEKD stages; the fused int8 model on the
    test split must beat chance (1/6) by a wide margin and beat itself before training."""
    data = D.synthetic(num_classes=6, per_class=30, img_size=16, channels=1, noise=0.1, shift=0, seed=1)
    teacher = build_teacher(img_size=16, patch_size=4, in_chans=1, num_classes=6, embed_dim=32, depth=2, num_heads=2,
                            mlp_ratio=2.0, seed=0)
    teacher, _ = train_teacher(data.train, data.val, teacher=teacher, epochs=10, batch_size=16, lr=3e-3, shift=0,
                               seed=0, device="cpu", progress=False)
    teacher.eval()
    x, y = data.test.images, data.test.labels
    with torch.no_grad():
        t_acc = float((teacher(x).argmax(-1) == y).float().mean())
    assert t_acc > 0.8, f"the teacher did not learn the set ({t_acc:.2f}): the test below would be meaningless"
    model = devit_ext.decompose(teacher, 2, budgets=[0.3, 0.3], seed=0)
    with torch.no_grad():  # an untrained fusion map: re-initialised, so the start is not the teacher's init
        for p in model.fusion.parameters():
            p.normal_(std=0.05)
    before = accuracy(model, data.test, transfer="int8")
    devit_ext.train_dekd(model, teacher, data.train, data.val, epochs=(4, 4), batch_size=16, device="cpu",
                         progress=False, seed=0)
    after = accuracy(model, data.test, transfer="int8")
    chance = 1 / 6
    assert after >= chance + 0.4, (before, after)
    assert after >= before + 0.2, (before, after)
