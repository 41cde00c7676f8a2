"""DEKD step details the loss-value tests do not reach: defaults, label smoothing, a student with
another head width, `freeze`, the returned logits, the drop mask, the middle block, dtypes, errors."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch

from devit_ext import dekd, protocol
from devit_ext.dekd.losses import QKVCapture, middle_block
from devit_ext.model import SubViT

from test_method_dekd import batch, make, stage3_by_hand, teacher_qkv


def _defaults(fn):
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not inspect._empty}


def test_documented_defaults():
    d = _defaults(dekd.distill_loss)
    assert (d["alpha"], d["kind"], d["temperature"], tuple(d["relation_weights"]), d["label_smoothing"]) == (
        0.5, "hard", 1.0, (0.2, 0.1, 0.3), 0.0)
    e = _defaults(dekd.ensemble_loss)
    assert (e["alpha"], e["kind"], e["temperature"], e["token_weight"], e["quant_aware"], e["drop"], e["freeze"]) == (
        0.5, "hard", 1.0, 1.0, True, None, False)
    assert _defaults(dekd.distillation_loss) == {"kind": "hard", "temperature": 1.0}
    assert _defaults(dekd.soft_distillation) == {"temperature": 1.0}
    assert _defaults(protocol.fused_forward) == {"transfer": "fp32", "missing": ()}


def test_default_calls_equal_explicit_ones():
    teacher, model = make()
    x = batch()
    with torch.no_grad():
        a = protocol.fused_forward(model, x)
        b = protocol.fused_forward(model, x, transfer="fp32")
    assert torch.equal(a, b)
    z, t = torch.randn(5, 4), torch.randn(5, 4)
    assert torch.equal(dekd.distillation_loss(z, t), dekd.hard_distillation(z, t))
    assert torch.equal(dekd.soft_distillation(z, t), dekd.soft_distillation(z, t, 1.0))


@pytest.mark.parametrize("distilled", [False, True], ids=["vit", "deit"])
def test_distill_logits_and_label_smoothing(distilled):
    teacher, model = make(distilled)
    x = batch()
    student = model.submodels[0]
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    logits, t_qkv = teacher_qkv(teacher, x, [1])
    t_logits = logits[:, model.class_groups[0]]
    out = dekd.distill_loss(student, x, y, t_logits, t_qkv, pairs=[(0, 1)], teacher_head_dims={1: 16},
                            label_smoothing=0.2)
    with torch.no_grad():
        tok = student.forward_features(x)
        zc = student.head(tok[:, 0])
        zd = student.head_dist(tok[:, 1]) if distilled else zc
    want_logits = (zc + zd) / 2 if distilled else zc
    torch.testing.assert_close(out["logits"], want_logits, rtol=1e-5, atol=1e-6)
    logp = torch.log_softmax(zc, -1)
    smooth = -(0.8 * logp.gather(1, y[:, None]).squeeze(1) + 0.2 * logp.mean(-1)).mean()
    torch.testing.assert_close(out["ce"], smooth, rtol=1e-5, atol=1e-6)


def test_student_with_another_head_width():
    """Relations scale by each model's own sqrt(d_h): a student with head_dim 8 against a teacher's 16."""
    teacher, model = make()
    cfg = copy.deepcopy(model.submodels[0].cfg)
    cfg["head_dim"] = 8
    cfg["blocks"] = [dict(b, num_heads=3) for b in cfg["blocks"]]
    torch.manual_seed(5)
    student = SubViT(cfg)
    x = batch()
    _, t_qkv = teacher_qkv(teacher, x, [1])
    out = dekd.distill_loss(student, x, torch.zeros(6, dtype=torch.long), torch.randn(6, cfg["num_classes"]), t_qkv,
                            pairs=[(0, 1)], teacher_head_dims={1: 16}, relation_weights=(1.0, 0.0, 0.0))
    want = stage3_by_hand(student, x, torch.zeros(6, dtype=torch.long), torch.randn(6, cfg["num_classes"]), t_qkv,
                          [(0, 1)], 16, 0.5, "hard", 1.0, (1.0, 0.0, 0.0))
    torch.testing.assert_close(out["rel"], want["rel"].detach(), rtol=2e-5, atol=1e-7)


def test_ensemble_freeze_and_label_smoothing():
    teacher, model = make(seed=1)
    x = batch(seed=4)
    y = torch.tensor([0, 5, 2, 3, 1, 4])
    t_logits, t_tokens = dekd.teacher_targets(teacher, x, False)
    out = dekd.ensemble_loss(model, x, y, t_logits, t_tokens, freeze=True, quant_aware=False)
    out["loss"].backward()
    assert all(p.grad is None for p in model.submodels.parameters())  # frozen backbones get no gradient
    assert model.fusion.map.weight.grad is not None
    a = dekd.ensemble_loss(model, x, y, t_logits, t_tokens, quant_aware=False, label_smoothing=0.2)
    z = a["logits"].detach()
    logp = torch.log_softmax(z, -1)
    want = -(0.8 * logp.gather(1, y[:, None]).squeeze(1) + 0.2 * logp.mean(-1)).mean()
    torch.testing.assert_close(a["ce"].detach(), want, rtol=1e-5, atol=1e-6)
    assert set(a) == {"loss", "mse", "ce", "kd", "logits"}


def test_drop_mask_drops_one_device_per_chosen_sample():
    g = torch.Generator().manual_seed(0)
    m = dekd.drop_mask(4000, 3, 0.3, g)
    assert m.dtype == torch.bool and m.shape == (4000, 3)
    per = m.sum(1)
    assert int(per.max()) == 1  # never more than one device per sample
    assert abs(float((per == 1).float().mean()) - 0.3) < 0.03  # with probability p
    share = m[per == 1].float().mean(0)
    assert float((share - 1 / 3).abs().max()) < 0.04  # the device uniformly
    assert not dekd.drop_mask(100, 3, 0.0, torch.Generator().manual_seed(0)).any()
    a = dekd.drop_mask(50, 2, 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(a, dekd.drop_mask(50, 2, 0.5, torch.Generator().manual_seed(7)))  # seeded


def test_middle_block_is_the_papers():
    assert [middle_block(L) for L in (1, 2, 3, 4, 12, 24)] == [0, 0, 0, 1, 5, 11]


def test_int8_roundtrip_keeps_dtype_and_capture_closes():
    t = torch.randn(4, 8, dtype=torch.float16)
    r = protocol.int8_roundtrip(t)
    assert r.dtype == torch.float16 and (r.float() - t.float()).abs().max() <= t.float().abs().max() / 127
    _, model = make()
    cap = QKVCapture(model.submodels[0], [0])
    model.submodels[0](batch())
    assert 0 in cap.out
    cap.close()
    assert cap.out == {} and cap.handles == []
    cap.close()  # closing twice is harmless
    model.submodels[0](batch())
    assert cap.out == {}


def test_errors_name_the_argument():
    _, model = make()
    with pytest.raises(ValueError, match=r"^transfer: .*got 'bf16'"):
        protocol.fused_forward(model, batch(), transfer="bf16")
    with pytest.raises(ValueError, match=r"^distill_kind: expected 'hard' or 'soft', got 'kl'$"):
        dekd.distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), kind="kl")
    with pytest.raises(ValueError, match=r"^relation_loss: teacher features \(2, 5, 4\) and student features "
                                         r"\(2, 6, 4\) differ in batch or token count"):
        dekd.relation_loss(torch.zeros(2, 5, 4), torch.zeros(2, 6, 4), 4)


def test_loss_defaults_are_used_when_not_given():
    teacher, model = make()
    x = batch()
    student = model.submodels[0]
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    logits, t_qkv = teacher_qkv(teacher, x, [1])
    t_logits = logits[:, model.class_groups[0]]
    common = dict(pairs=[(0, 1)], teacher_head_dims={1: 16})
    a = dekd.distill_loss(student, x, y, t_logits, t_qkv, **common)
    b = dekd.distill_loss(student, x, y, t_logits, t_qkv, alpha=0.5, kind="hard", temperature=1.0,
                          relation_weights=(0.2, 0.1, 0.3), **common)
    assert torch.equal(a["loss"], b["loss"])
    s1 = dekd.distill_loss(student, x, y, t_logits, t_qkv, kind="soft", **common)
    s2 = dekd.distill_loss(student, x, y, t_logits, t_qkv, kind="soft", temperature=1.0, **common)
    assert torch.equal(s1["kd"], s2["kd"])
    z, t = torch.randn(5, 4), torch.randn(5, 4)
    assert torch.equal(dekd.distillation_loss(z, t, "soft"), dekd.soft_distillation(z, t, 1.0))
    t_logits, t_tokens = dekd.teacher_targets(teacher, x, False)
    yy = torch.arange(6)
    e1 = dekd.ensemble_loss(model, x, yy, t_logits, t_tokens)
    e2 = dekd.ensemble_loss(model, x, yy, t_logits, t_tokens, alpha=0.5, kind="hard", temperature=1.0,
                            token_weight=1.0, quant_aware=True)
    assert torch.equal(e1["loss"], e2["loss"])
    s1 = dekd.ensemble_loss(model, x, yy, t_logits, t_tokens, kind="soft")
    s2 = dekd.ensemble_loss(model, x, yy, t_logits, t_tokens, kind="soft", temperature=1.0)
    assert torch.equal(s1["kd"], s2["kd"])
