"""The data-free `magnitude` criterion, recomputed from its definition on a tiny timm ViT.

Definition (importance.py): every tensor that reads or writes a unit adds the
L1 norm of that unit's slice, each tensor's per-unit vector normalised to mean
1; embedding channels are normalised to mean 1 once more and blended 75/25 with
the group's classifier columns (L1 over the group's rows, normalised to mean 1,
summed over head and head_dist). The unit table below is written out by hand
from timm's parameter names, independently of `importance.param_axes`.
"""
from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

from devit_ext import importance as imp
from devit_ext.model import teacher_config

H, D, DIM, MLP, DEPTH, C = 2, 8, 16, 24, 2, 5


def teacher(distilled):
    torch.manual_seed(0)
    name = "deit_tiny_distilled_patch16_224" if distilled else "vit_base_patch16_224"
    t = timm.create_model(name, pretrained=False, img_size=16, patch_size=8, embed_dim=DIM, depth=DEPTH,
                          num_heads=H, mlp_ratio=MLP / DIM, num_classes=C).eval()
    with torch.no_grad():
        for p in t.parameters():
            p.copy_(torch.randn_like(p))  # every tensor distinct and non-zero
    return t


def l1(t, keep_axis):
    return t.abs().sum([a for a in range(t.dim()) if a != keep_axis]) if t.dim() > 1 else t.abs()


def by_hand(t, group):
    e = torch.zeros(DIM, dtype=torch.float64)
    heads = [torch.zeros(H, dtype=torch.float64) for _ in range(DEPTH)]
    neurons = [torch.zeros(MLP, dtype=torch.float64) for _ in range(DEPTH)]

    def add_e(v):
        e.add_(v.double() / v.double().mean())

    def add_h(k, v):  # v over the H*D (or 3*H*D) rows/columns of block k
        v = v.double().reshape(-1, H, D).sum((0, 2))
        heads[k].add_(v / v.mean())

    def add_n(k, v):
        neurons[k].add_(v.double() / v.double().mean())

    sd = t.state_dict()
    for name in ("cls_token", "pos_embed") + (("dist_token",) if "dist_token" in sd else ()):
        add_e(l1(sd[name], 2))
    for name in ("patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"):
        add_e(l1(sd[name], 0))
    for k in range(DEPTH):
        b = f"blocks.{k}."
        for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.proj.bias", "mlp.fc2.bias"):
            add_e(l1(sd[b + n], 0))
        w = sd[b + "attn.qkv.weight"]
        add_h(k, l1(w, 0)), add_e(l1(w, 1)), add_h(k, l1(sd[b + "attn.qkv.bias"], 0))
        w = sd[b + "attn.proj.weight"]
        add_e(l1(w, 0)), add_h(k, l1(w, 1))
        w = sd[b + "mlp.fc1.weight"]
        add_n(k, l1(w, 0)), add_e(l1(w, 1)), add_n(k, l1(sd[b + "mlp.fc1.bias"], 0))
        w = sd[b + "mlp.fc2.weight"]
        add_e(l1(w, 0)), add_n(k, l1(w, 1))
    e = e / e.mean()
    hv = torch.zeros(DIM, dtype=torch.float64)
    for name in ("head.weight", "head_dist.weight"):
        if name in sd:
            v = sd[name][group].abs().sum(0).double()
            hv += v / v.mean()
    return {"embed": 0.75 * e + 0.25 * hv / hv.mean(), "heads": heads, "neurons": neurons}


@pytest.mark.parametrize("distilled", [False, True], ids=["vit", "deit"])
def test_magnitude_equals_its_definition(distilled):
    t = teacher(distilled)
    groups = [[0, 3], [1, 2, 4]]
    got = imp.magnitude(t, teacher_config(t), groups)
    assert len(got) == 2
    for g, s in zip(groups, got):
        want = by_hand(t, g)
        torch.testing.assert_close(s["embed"], want["embed"], rtol=1e-6, atol=1e-9)
        for k in range(DEPTH):
            torch.testing.assert_close(s["heads"][k], want["heads"][k], rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(s["neurons"][k], want["neurons"][k], rtol=1e-6, atol=1e-9)
        assert s["blocks"] is None
    assert not torch.equal(got[0]["embed"], got[1]["embed"])  # the group's classifier columns matter
    assert got[0]["heads"][0] is not got[1]["heads"][0]  # groups do not share (and mutate) one tensor
