"""A missing device changes the answer exactly as zeroing its tokens does.

Checked on the plain-torch collaborative path (`protocol.fused_forward`, which
`evaluate.accuracy(missing=...)` and the demo's missing-device row use) and on the
distributed aggregator's fusion of decoded wire messages (`_fuse`, what a
degraded run answers with). The oracle is the fusion head applied by hand to
the sub-models' tokens with the missing ones replaced by zeros.
"""
from __future__ import annotations

import pytest
import torch

from devit_ext import ops, protocol, wire
from devit_ext.evaluate import accuracy
from devit_ext.engines import distributed as D
from devit_ext.model import DeViT, FusionHead, SubViT

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def make_model(distilled=False, widths=(16, 24, 32), classes=6, seed=0) -> DeViT:
    torch.manual_seed(seed)
    n = len(widths)
    groups = [list(range(i, classes, n)) for i in range(n)]
    subs = []
    for w, grp in zip(widths, groups):
        cfg = dict(img_size=[16, 16], patch_size=[8, 8], in_chans=3, embed_dim=w, head_dim=8,
                   blocks=[dict(num_heads=w // 8, mlp_hidden=2 * w)], num_classes=len(grp),
                   distilled=distilled, num_prefix_tokens=2 if distilled else 1, no_embed_class=False,
                   layer_scale=False, qkv_bias=True, patch_bias=True, pre_norm=False, norm_eps=1e-6,
                   mean=MEAN, std=STD)
        m = SubViT(cfg)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if p.dim() == 3 or name.endswith("bias"):
                    p.copy_(0.3 * torch.randn_like(p))
        subs.append(m)
    fusion = FusionHead(widths, 20, classes, distilled)
    with torch.no_grad():
        for name, p in fusion.named_parameters():  # small biases: the answer depends on the tokens
            p.copy_(torch.randn_like(p) * (0.05 if name.endswith("bias") else 1.0))
    meta = dict(img_size=[16, 16], in_chans=3, mean=MEAN, std=STD, patch_size=[8, 8])
    return DeViT(subs, groups, fusion, meta).eval()


def by_hand(model, x, missing, int8):
    """Fusion head on the sub-models' tokens, missing ones zero (int8: quantised per token vector)."""
    toks = []
    for i, m in enumerate(model.submodels):
        t = m.forward_tokens(x).float()
        if int8:
            q, s = ops.reference.quantize_int8(t)
            t = ops.reference.dequantize_int8(q, s)
        toks.append(torch.zeros_like(t) if i in missing else t)
    cat = torch.cat(toks, -1)
    f = model.fusion
    if model.distilled:
        z1 = f.head(f.map(cat[:, 0]))
        z2 = f.head_dist(f.map_dist(cat[:, 1]))
        return (z1 + z2) / 2
    return f.head(f.map(cat))


@pytest.mark.parametrize("distilled", [False, True], ids=["vit", "deit"])
@pytest.mark.parametrize("transfer", ["fp32", "int8"])
@pytest.mark.parametrize("missing", [(0,), (2,), (0, 1)])
def test_fused_forward_missing_equals_zeroed_tokens(distilled, transfer, missing):
    model = make_model(distilled)
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        got = protocol.fused_forward(model, x, transfer=transfer, missing=missing)
        want = by_hand(model, x, set(missing), transfer == "int8")
        full = by_hand(model, x, set(), transfer == "int8")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - full).abs().max() > 1e-2  # the device's tokens mattered: leaving them in is not the same


def test_evaluate_counts_with_the_missing_device_zeroed():
    model = make_model(seed=1)
    x = torch.randn(60, 3, 16, 16)
    with torch.no_grad():  # centre the logits on this batch, so that the predicted class varies by image
        model.fusion.head.bias -= by_hand(model, x, set(), int8=False).mean(0)
        z_missing = by_hand(model, x, {1}, int8=True)
        z_full = by_hand(model, x, set(), int8=True)
    y = (z_missing - z_full).argmax(-1)  # labels on which the two answers score differently
    acc_missing = float((z_missing.argmax(-1) == y).float().mean())
    acc_full = float((z_full.argmax(-1) == y).float().mean())
    assert acc_missing != acc_full
    assert accuracy(model, (x, y), transfer="int8", missing=[1]) == pytest.approx(acc_missing, abs=1e-6)
    assert accuracy(model, (x, y), transfer="int8") == pytest.approx(acc_full, abs=1e-6)


def _messages(model, x, transfer, missing):
    msgs = {}
    for i, m in enumerate(model.submodels):
        if i in missing:
            continue
        t = m.forward_tokens(x).float()
        t = t if t.dim() == 3 else t.unsqueeze(1)
        if transfer == "int8":
            q, s = ops.quantize_int8(t)
            buf = wire.encode("ab" * 32, i, 1, q=q, scales=s)
        else:
            buf = wire.encode("ab" * 32, i, 1, tokens=t)
        msgs[i] = wire.decode(buf, device=i)
    return msgs


@pytest.mark.parametrize("distilled", [False, True], ids=["vit", "deit"])
@pytest.mark.parametrize("transfer", ["fp32", "int8"])
def test_distributed_fusion_of_a_degraded_batch_equals_zeroed_tokens(distilled, transfer):
    model = make_model(distilled, seed=2)
    x = torch.randn(4, 3, 16, 16)
    widths = model.widths
    with torch.no_grad():
        for missing in ({1}, {0, 2}):
            got = D._fuse(model, _messages(model, x, transfer, missing), widths, "cpu")
            want = by_hand(model, x, missing, transfer == "int8")
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            assert (got - by_hand(model, x, set(), transfer == "int8")).abs().max() > 1e-2
