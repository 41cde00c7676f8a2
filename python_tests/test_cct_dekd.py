"""DEKD with a CCT teacher and CCT students: stage 3's Q/K/V relations, stage 4's pooled-vector token, and a
short run on sklearn's digits that keeps the DeViT within 3 points of its teacher."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import devit_ext
from devit_ext import protocol
from devit_ext.cct import CCT, make_config
from devit_ext.dekd.config import relation_pairs
from devit_ext.dekd.steps import distill_loss, ensemble_loss, teacher_targets

from test_cct_decompose import random_cct


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models: with two threads on a loaded 2-core machine, thread hand-offs cost 10x the arithmetic
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny(seed=0):
    cfg = make_config(embed_dim=32, depth=4, num_heads=2, mlp_ratio=2, kernel_size=3, n_conv_layers=1, img_size=8,
                      in_chans=1, num_classes=6, drop_path_rate=0.0, attn_drop_rate=0.0)
    t = random_cct(cfg, seed)
    model = devit_ext.decompose(t, 2, budgets=[{"embed_dim": 16, "depth": 2, "num_heads": 1, "mlp_hidden": 24}] * 2,
                                partition=[[0, 2, 4], [1, 3, 5]])
    return t, model


def x_batch(n=4, seed=2):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def pooled(t, x):
    """The teacher's sequence-pooled vector, from its final tokens and its attention_pool weights (by hand)."""
    f = t.forward_features(x)
    s = f @ t.classifier.attention_pool.weight[0] + t.classifier.attention_pool.bias[0]  # (B, N)
    return (s.softmax(1)[:, :, None] * f).sum(1)


def relation(x, d):
    return F.log_softmax(x @ x.transpose(-1, -2) / math.sqrt(d), -1)


def test_stage_3_relations_read_qkv_of_teacher_and_student_blocks():
    t, model = tiny()
    pairs = relation_pairs("middle", model, t)
    assert pairs == [[(0, 1)], [(0, 1)]]  # block L/2 - 1 of each
    x = x_batch()
    grabbed = {}
    h = t.classifier.blocks[1].self_attn.qkv.register_forward_hook(lambda m, i, o: grabbed.__setitem__("t", o))
    with torch.no_grad():
        z_t = t(x)
    h.remove()
    sub = model.submodels[0]
    h = sub.classifier.blocks[0].self_attn.qkv.register_forward_hook(lambda m, i, o: grabbed.__setitem__("s", o))
    out = distill_loss(sub, x, torch.tensor([0, 1, 2, 0]), z_t[:, [0, 2, 4]], {1: grabbed["t"]}, pairs=pairs[0],
                       teacher_head_dims={1: 16}, alpha=0.5, relation_weights=(0.2, 0.1, 0.3))
    h.remove()
    want = 0.0
    for w, xt, xs in zip((0.2, 0.1, 0.3), grabbed["t"].chunk(3, -1), grabbed["s"].chunk(3, -1)):
        lt, ls = relation(xt, 16), relation(xs, 16)
        want = want + w * (lt.exp() * (lt - ls)).sum(-1).mean()
    assert float(out["rel"].detach()) > 0 and torch.allclose(out["rel"], want, atol=1e-6)
    out["loss"].backward()
    assert sub.classifier.blocks[0].self_attn.qkv.weight.grad.abs().sum() > 0


def test_stage_4_matches_the_fused_map_to_the_teachers_pooled_vector():
    t, model = tiny()
    x = x_batch()
    logits, tokens = teacher_targets(t, x, distilled=False)
    with torch.no_grad():
        assert len(tokens) == 1 and torch.allclose(tokens[0], pooled(t, x), atol=1e-6)
        assert torch.allclose(logits, t(x), atol=1e-6)
    out = ensemble_loss(model, x, torch.tensor([0, 1, 2, 3]), logits, tokens, quant_aware=True)
    toks = [protocol.fake_quant_int8(m.forward_tokens(x)) for m in model.submodels]
    mapped = model.fusion.map(torch.cat(toks, -1))
    assert torch.allclose(out["mse"], F.mse_loss(mapped, pooled(t, x).detach()), atol=1e-6)
    # what crosses the wire per image and device: the pooled vector in int8 and its scale
    assert protocol.tokens_per_image(model) == 1
    assert [protocol.message_bytes(w, "int8", 1) for w in model.widths] == [16 + 4, 16 + 4]


@pytest.mark.slow
def test_dekd_on_digits_keeps_a_cct_devit_within_3_points_of_its_teacher():
    from devit_ext import data as D
    from devit_ext.evaluate import accuracy
    from devit_ext.teacher import train_teacher

    s = D.digits(img_size=8, seed=0)
    cfg = make_config(embed_dim=48, depth=2, num_heads=2, mlp_ratio=2, kernel_size=3, n_conv_layers=1, img_size=8,
                      in_chans=1, num_classes=10, drop_path_rate=0.0, attn_drop_rate=0.0, mean=s.mean, std=s.std)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        t = CCT(cfg)
    t, _ = train_teacher(s.train, s.val, teacher=t, epochs=15, batch_size=64, lr=3e-3, shift=1, progress=False,
                         device="cpu")
    teacher_acc = accuracy(t.eval(), s.test)
    assert teacher_acc > 0.9
    model = devit_ext.decompose(t, 2, budgets=[0.3, 0.3], seed=0)
    hist = devit_ext.train_dekd(model, t, s.train, s.val, epochs=(6, 6), batch_size=64, lr=3e-3, device="cpu",
                                shift=1, progress=False)
    assert all(r["rel"] > 0 for r in hist["distill"]) and all(r["mse"] > 0 for r in hist["ensemble"])
    devit_acc = accuracy(model.eval(), s.test, transfer="int8")
    assert devit_acc >= teacher_acc - 0.03, (teacher_acc, devit_acc)
