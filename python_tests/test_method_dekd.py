"""DEKD's per-step losses (stages 3 and 4) against hand computations on a fixed tiny batch, and the
trainer's use of them.

Everything here is recomputed from the paper's formulas with plain torch ops
and our own forward hooks (never the package's loss helpers):

    stage 3: (1-a) CE(z_cls, y) + a KD(z_dist, z_T) + sum over block pairs of
             g_Q KL(R_T^Q || R_S^Q) + g_K KL(R_T^K || R_S^K) + g_V KL(R_T^V || R_S^V),
             R^X = row-softmax(X X^T / sqrt(d_h)), (g_Q, g_K, g_V) = (0.2, 0.1, 0.3);
    stage 4: w MSE(map(tokens), teacher class (and distillation) token) + (1-a) CE + a KD
             on the fused logits, tokens int8 round-tripped (straight-through) and dropped ones zero.

Values and gradients are compared, so a term that is computed and logged but
left out of the back-propagated loss (or detached) fails.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import devit_ext
from devit_ext import dekd
from devit_ext.ops import reference as R
from devit_ext.teacher import build_teacher

PAPER_WEIGHTS = (0.2, 0.1, 0.3)
SHAPE = {"embed_dim": 24, "depth": 2, "num_heads": 2, "mlp_hidden": 48}


def make(distilled=False, seed=0):
    t = build_teacher(img_size=16, patch_size=4, in_chans=1, num_classes=6, embed_dim=32, depth=4, num_heads=2,
                      mlp_ratio=2.0, distilled=distilled, seed=seed).eval()
    with torch.no_grad():  # informative biases / norms / tokens (the builder may zero-init them)
        g = torch.Generator().manual_seed(seed + 1)
        for n, p in t.named_parameters():
            if n.endswith("bias") or "norm" in n or n in ("pos_embed", "cls_token", "dist_token"):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    model = devit_ext.decompose(t, 2, budgets=[SHAPE] * 2, partition=[[0, 2, 4], [1, 3, 5]], seed=seed)
    with torch.no_grad():  # students that differ from the teacher: relation terms well above rounding
        for m in model.submodels:
            for blk in m.blocks:
                w = blk.attn.qkv.weight
                w.mul_(2.0).add_(0.3 * torch.randn(w.shape, generator=g))
    return t, model


def batch(n=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g)


class Grab:
    """Forward hooks: outputs of `blocks[k].attn.qkv` for the given k."""

    def __init__(self, module, layers):
        self.out, self.h = {}, []
        for k in layers:
            self.h.append(module.blocks[k].attn.qkv.register_forward_hook(self._f(k)))

    def _f(self, k):
        def f(mod, inp, out):
            self.out[k] = out
        return f

    def close(self):
        for h in self.h:
            h.remove()


# ---------------------------------------------------------------------------
# hand formulas
# ---------------------------------------------------------------------------


def ce(z, y):
    return -torch.log_softmax(z.float(), -1).gather(1, y[:, None]).mean()


def kd(z, zt, kind="hard", T=1.0):
    if kind == "hard":
        return ce(z, zt.argmax(-1))
    p = torch.softmax(zt.float() / T, -1)
    return T * T * (p * (p.log() - torch.log_softmax(z.float() / T, -1))).sum(-1).mean()


def relation_kl(xt, xs, dt, ds):
    lt = torch.log_softmax(xt.float() @ xt.float().transpose(1, 2) / math.sqrt(dt), -1)
    ls = torch.log_softmax(xs.float() @ xs.float().transpose(1, 2) / math.sqrt(ds), -1)
    return (lt.exp() * (lt - ls)).sum(-1).mean()


def qkv_terms(qkv_t, qkv_s, dt, ds):
    """[L_Q, L_K, L_V]: the qkv output is (B, N, 3 * W) with Q, K, V in that order."""
    Wt, Ws = qkv_t.shape[-1] // 3, qkv_s.shape[-1] // 3
    return [relation_kl(qkv_t[..., i * Wt : (i + 1) * Wt], qkv_s[..., i * Ws : (i + 1) * Ws], dt, ds) for i in range(3)]


def teacher_qkv(teacher, x, layers):
    g = Grab(teacher, layers)
    try:
        with torch.no_grad():
            logits = teacher(x)
    finally:
        g.close()
    return logits, {k: v.detach() for k, v in g.out.items()}


def stage3_by_hand(student, x, y, t_logits, t_qkv, pairs, dt, alpha, kind, T, weights):
    g = Grab(student, [a for a, _ in pairs])
    try:
        tok = student.forward_features(x)
    finally:
        g.close()
    if student.distilled:
        z_cls, z_dist = student.head(tok[:, 0]), student.head_dist(tok[:, 1])
    else:
        z_cls = z_dist = student.head(tok[:, 0])
    ds = student.cfg["head_dim"]
    terms = [qkv_terms(t_qkv[b], g.out[a], dt, ds) for a, b in pairs]
    rel = sum(w * L for ts in terms for w, L in zip(weights, ts))
    c, k = ce(z_cls, y), kd(z_dist, t_logits, kind, T)
    return {"loss": (1 - alpha) * c + alpha * k + rel, "ce": c, "kd": k, "rel": rel, "terms": terms}


# ---------------------------------------------------------------------------
# stage 3
# ---------------------------------------------------------------------------

PAIRS = [(0, 1), (1, 3)]  # (student block, teacher block): two pairs, neither the default middle one


@pytest.mark.parametrize("distilled", [False, True], ids=["vit", "deit"])
@pytest.mark.parametrize("kind,T,alpha", [("hard", 1.0, 0.5), ("soft", 2.0, 0.3)])
def test_distill_loss_equals_hand_computation(distilled, kind, T, alpha):
    teacher, model = make(distilled)
    x = batch()
    gi = 1
    group = model.class_groups[gi]
    student = model.submodels[gi]
    y = torch.tensor([0, 1, 2, 2, 1, 0])  # local labels
    logits, t_qkv = teacher_qkv(teacher, x, [b for _, b in PAIRS])
    t_logits = logits[:, group]
    dt = teacher.blocks[0].attn.head_dim
    dims = {b: dt for _, b in PAIRS}

    out = dekd.distill_loss(student, x, y, t_logits, t_qkv, pairs=PAIRS, teacher_head_dims=dims, alpha=alpha,
                            kind=kind, temperature=T, relation_weights=PAPER_WEIGHTS)
    want = stage3_by_hand(student, x, y, t_logits, t_qkv, PAIRS, dt, alpha, kind, T, PAPER_WEIGHTS)
    for key in ("ce", "kd", "rel", "loss"):
        torch.testing.assert_close(out[key].float(), want[key].float().detach(), rtol=2e-5, atol=1e-6, msg=key)

    # the check has power: the three terms differ, so permuted weights or a dropped term change the total
    tol = 2e-5 * abs(float(want["loss"])) + 1e-6  # what assert_close above allows on the total
    for ts in want["terms"]:
        LQ, LK, LV = (float(v) for v in ts)
        assert min(LQ, LK, LV) > 100 * tol, ts
        assert min(abs(LQ - LK), abs(LK - LV), abs(LQ - LV)) > 100 * tol, ts
    for perm_w in [(0.3, 0.1, 0.2), (0.1, 0.2, 0.3), (0.2, 0.3, 0.1)]:
        perm = stage3_by_hand(student, x, y, t_logits, t_qkv, PAIRS, dt, alpha, kind, T, perm_w)
        assert abs(float(perm["loss"]) - float(want["loss"])) > 10 * tol, perm_w

    # gradients: the back-propagated loss is the whole hand loss, relation terms included
    params = [p for p in student.parameters() if p.requires_grad]
    g_out = torch.autograd.grad(out["loss"], params, allow_unused=True)
    g_want = torch.autograd.grad(want["loss"], params, allow_unused=True)
    for p, a, b in zip(params, g_out, g_want):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_relation_gradient_reaches_q_k_and_v_projections():
    teacher, model = make()
    x = batch()
    student = model.submodels[0]
    _, t_qkv = teacher_qkv(teacher, x, [b for _, b in PAIRS])
    t_logits = torch.randn(6, len(model.class_groups[0]))
    dims = {b: teacher.blocks[b].attn.head_dim for _, b in PAIRS}
    out = dekd.distill_loss(student, x, torch.zeros(6, dtype=torch.long), t_logits, t_qkv, pairs=PAIRS,
                            teacher_head_dims=dims, relation_weights=PAPER_WEIGHTS)
    for a, _ in PAIRS:
        w = student.blocks[a].attn.qkv.weight
        (gw,) = torch.autograd.grad(out["rel"], [w], retain_graph=True)
        W = w.shape[0] // 3
        for i, name in enumerate("QKV"):
            assert float(gw[i * W : (i + 1) * W].abs().sum()) > 0, f"no relation gradient on block {a}'s {name}"
        (gl,) = torch.autograd.grad(out["loss"], [w], retain_graph=True)
        assert float((gl - gw).abs().sum()) > 0  # and CE/KD reach it too, through the tokens


def test_relation_weights_follow_the_argument():
    """Each weight scales its own term: (1,0,0), (0,1,0), (0,0,1) give L_Q, L_K, L_V."""
    teacher, model = make()
    x = batch()
    student = model.submodels[0]
    pairs = [(1, 2)]
    _, t_qkv = teacher_qkv(teacher, x, [2])
    dt = teacher.blocks[2].attn.head_dim
    t_logits = torch.randn(6, len(model.class_groups[0]))
    want = stage3_by_hand(student, x, torch.zeros(6, dtype=torch.long), t_logits, t_qkv, pairs, dt, 0.5, "hard", 1.0,
                          PAPER_WEIGHTS)["terms"][0]
    for i in range(3):
        w = [0.0, 0.0, 0.0]
        w[i] = 1.0
        out = dekd.distill_loss(student, x, torch.zeros(6, dtype=torch.long), t_logits, t_qkv, pairs=pairs,
                                teacher_head_dims={2: dt}, relation_weights=tuple(w))
        torch.testing.assert_close(out["rel"].float(), want[i].float().detach(), rtol=2e-5, atol=1e-7)


def test_paper_relation_weights_are_the_default():
    import inspect

    sig = inspect.signature(dekd.distill_loss)
    assert tuple(sig.parameters["relation_weights"].default) == PAPER_WEIGHTS
    assert tuple(inspect.signature(devit_ext.train_dekd).parameters["relation_weights"].default) == PAPER_WEIGHTS


# ---------------------------------------------------------------------------
# stage 4
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("distilled", [False, True], ids=["vit", "deit"])
def test_teacher_targets_are_the_class_and_distillation_tokens(distilled):
    teacher, _ = make(distilled)
    x = batch()
    with torch.no_grad():
        feats = teacher.forward_features(x)  # timm's own forward, after the final norm
        want_logits = teacher(x)
    logits, tokens = dekd.teacher_targets(teacher, x, distilled)
    torch.testing.assert_close(logits, want_logits.float(), rtol=1e-5, atol=1e-6)
    assert logits.dtype == torch.float32 and all(t.dtype == torch.float32 for t in tokens)
    assert len(tokens) == (2 if distilled else 1)
    assert torch.equal(tokens[0], feats[:, 0].float())  # the class token ...
    if distilled:
        assert torch.equal(tokens[1], feats[:, 1].float())  # ... and the distillation token
    P = 2 if distilled else 1
    for j in range(P, feats.shape[1]):  # never a patch token
        assert not torch.allclose(tokens[0], feats[:, j].float())


def stage4_by_hand(model, x, y, t_logits, t_tokens, alpha, kind, T, w, quant, drop):
    toks = []
    for i, m in enumerate(model.submodels):
        t = m.forward_tokens(x).float()
        if quant:  # int8 forward, identity gradient
            q, s = R.quantize_int8(t.detach())
            t = t + (R.dequantize_int8(q, s) - t).detach()
        if drop is not None:
            keep = (~drop[:, i]).float().view(-1, *([1] * (t.dim() - 1)))
            t = t * keep
        toks.append(t)
    cat = torch.cat(toks, -1)
    f = model.fusion
    if model.distilled:
        mapped = [F.linear(cat[:, 0], f.map.weight, f.map.bias), F.linear(cat[:, 1], f.map_dist.weight, f.map_dist.bias)]
        z = (F.linear(mapped[0], f.head.weight, f.head.bias) + F.linear(mapped[1], f.head_dist.weight, f.head_dist.bias)) / 2
    else:
        mapped = [F.linear(cat, f.map.weight, f.map.bias)]
        z = F.linear(mapped[0], f.head.weight, f.head.bias)
    mse = sum(((m - t) ** 2).mean() for m, t in zip(mapped, t_tokens)) / len(mapped)
    c, k = ce(z, y), kd(z, t_logits, kind, T)
    return {"loss": w * mse + (1 - alpha) * c + alpha * k, "mse": mse, "ce": c, "kd": k, "logits": z}


@pytest.mark.parametrize("distilled", [False, True], ids=["vit", "deit"])
@pytest.mark.parametrize("quant", [True, False], ids=["int8", "fp32"])
def test_ensemble_loss_equals_hand_computation(distilled, quant):
    teacher, model = make(distilled, seed=1)
    x = batch(seed=4)
    y = torch.tensor([0, 5, 2, 3, 1, 4])
    with torch.no_grad():
        feats = teacher.forward_features(x)
        t_logits = teacher(x).float()
    t_tokens = [feats[:, 0]] + ([feats[:, 1]] if distilled else [])
    drop = torch.tensor([[True, False], [False, False], [False, True], [False, False], [True, False], [False, False]])
    kw = dict(alpha=0.3, kind="soft", temperature=2.0, token_weight=0.7)
    out = dekd.ensemble_loss(model, x, y, t_logits, t_tokens, quant_aware=quant, drop=drop, **kw)
    want = stage4_by_hand(model, x, y, t_logits, t_tokens, 0.3, "soft", 2.0, 0.7, quant, drop)
    for key in ("mse", "ce", "kd", "loss", "logits"):
        torch.testing.assert_close(out[key].float(), want[key].float().detach(), rtol=2e-5, atol=1e-5, msg=key)
    params = [p for p in model.parameters() if p.requires_grad]
    g_out = torch.autograd.grad(out["loss"], params, allow_unused=True)
    g_want = torch.autograd.grad(want["loss"], params, allow_unused=True)
    for p, a, b in zip(params, g_out, g_want):
        torch.testing.assert_close(torch.zeros_like(p) if a is None else a, torch.zeros_like(p) if b is None else b,
                                   rtol=1e-4, atol=1e-6)
    # the check has power: the drop mask and the choice of teacher token both change the loss
    nodrop = stage4_by_hand(model, x, y, t_logits, t_tokens, 0.3, "soft", 2.0, 0.7, quant, None)
    assert abs(float(nodrop["loss"]) - float(want["loss"])) > 1e-4
    patch = stage4_by_hand(model, x, y, t_logits, [feats[:, -1]] * len(t_tokens), 0.3, "soft", 2.0, 0.7, quant, drop)
    assert abs(float(patch["mse"]) - float(want["mse"])) > 1e-3


@pytest.mark.parametrize("distilled", [False, True], ids=["vit", "deit"])
def test_stage4_matches_the_teacher_class_token(distilled):
    """teacher_targets feeding ensemble_loss: the token MSE is against feats[:, 0] (and feats[:, 1])."""
    teacher, model = make(distilled, seed=2)
    x = batch(seed=5)
    y = torch.arange(6)
    t_logits, t_tokens = dekd.teacher_targets(teacher, x, distilled)
    out = dekd.ensemble_loss(model, x, y, t_logits, t_tokens, quant_aware=False)
    with torch.no_grad():
        feats = teacher.forward_features(x)
        mapped = model.fusion.mapped([m.forward_tokens(x).float() for m in model.submodels])
    want = [F.mse_loss(mapped[0], feats[:, 0])] + ([F.mse_loss(mapped[1], feats[:, 1])] if distilled else [])
    torch.testing.assert_close(float(out["mse"]), float(sum(want) / len(want)), rtol=1e-5, atol=1e-7)
