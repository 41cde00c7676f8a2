"""devit_ext.decompose: partitions, importance, physical pruning, budgets, save/load (CPU, tiny timm ViTs)."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn

timm = pytest.importorskip("timm")

import devit_ext
from devit_ext import importance as imp
from devit_ext import partition as part
from devit_ext.budgets import search_shape
from devit_ext.decomposition import decompose
from devit_ext.model import CheckpointError, SubViT, load
from devit_ext.shapes import describe_shape, summary_table, teacher_config, uniform_config, vit_flops, vit_params

C = 10


def _tiny(name="vit_base_patch16_224", **kw):
    args = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=C)
    args.update(kw)
    torch.manual_seed(0)
    m = timm.create_model(name, **args).eval()
    # timm's default init leaves biases/pos-embeds at zero and LayerNorms at one; randomise them so
    # exact-reproduction tests would catch an error in any tensor
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias") or "norm" in n or "gamma" in n or n in ("pos_embed", "cls_token", "dist_token"):
                p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def vit():
    return _tiny()


@pytest.fixture(scope="module")
def deit():
    return _tiny("deit_tiny_distilled_patch16_224", depth=3)


@pytest.fixture(scope="module")
def deit3():
    return _tiny("deit3_small_patch16_224", depth=2, embed_dim=64, num_heads=4)


@pytest.fixture(scope="module")
def vitx():
    # CLIP-style variant: norm_pre, no qkv bias, class token without position embedding
    return _tiny(depth=2, pre_norm=True, qkv_bias=False, no_embed_class=True, embed_dim=32, num_heads=2)


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)


def _data(n=40, bs=20, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.arange(n) % C
    return [(x[i : i + bs], y[i : i + bs]) for i in range(0, n, bs)]


# ---------------------------------------------------------------------------
# Exactness of the slicing
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["vit", "deit", "deit3", "vitx"])
def test_pruning_nothing_reproduces_teacher(which, request, images):
    t = request.getfixturevalue(which)
    m = decompose(t, 1, budgets=[1.0]).eval()
    sub = m.submodels[0]
    assert sub.cfg == dict(teacher_config(t), num_classes=C)
    with torch.no_grad():
        ref = t.forward_features(images)
        tok = m.forward_tokens(images)[0]
        want = ref[:, :2] if getattr(t, "dist_token", None) is not None else ref[:, 0]
        assert torch.equal(tok, want)
        # local head = teacher head (all classes, identity group order after sorting) and fusion = teacher
        assert torch.allclose(m(images), t(images), atol=1e-6, rtol=0)
        g = m.class_groups[0]
        assert torch.allclose(sub(images), t(images)[:, g], atol=1e-6, rtol=0)


# Keep-sets known by construction: every unit of the teacher is put in a tier by scaling all the weights
# that read or write it (1, 0.1 or 0.001; a tier is 10x the next, far more than the spread of the random
# weights' magnitudes). A sub-model allowed k units must keep the first tier(s) that hold k, whatever the
# exact score formula; nothing here calls choose_units or reads the model's meta.
TIER = (1.0, 0.1, 1e-3)
KEEP_EMBED = (24, 16)  # sub-model 0 keeps tiers 0+1 (16 + 8 channels), sub-model 1 tier 0 only
KEEP_HEADS = (2, 1)
KEEP_NEURONS = (40, 20)


def _tiered_teacher():
    t = _tiny()
    g = torch.Generator().manual_seed(7)
    emb = torch.randperm(48, generator=g)
    tiers = {"embed": [emb[:16], emb[16:24], emb[24:]]}
    for k in range(4):
        h = torch.randperm(3, generator=g)
        tiers[("heads", k)] = [h[:1], h[1:2], h[2:]]
        n = torch.randperm(192, generator=g)
        tiers[("neurons", k)] = [n[:20], n[20:40], n[40:]]
    D = 16
    with torch.no_grad():
        for name, p in t.named_parameters():
            for axis, kind in imp.param_axes(name).items():
                key = "embed" if kind == ("embed",) else (("heads", kind[1]) if kind[0] in ("qkv", "heads") else kind)
                if key not in tiers:
                    continue  # classifier rows: every class stays
                for f, idx in zip(TIER, tiers[key]):
                    if kind[0] == "qkv":  # rows (3, H, D): the head's D rows in each of q, k and v
                        idx = torch.cat([s * 48 + h * D + torch.arange(D) for s in range(3) for h in idx.tolist()])
                    elif kind[0] == "heads":  # proj columns (H, D)
                        idx = torch.cat([h * D + torch.arange(D) for h in idx.tolist()])
                    p.index_copy_(axis, idx, p.index_select(axis, idx) * f)
    expect = []
    for i in range(2):
        def top(key, k):
            return sorted(torch.cat(tiers[key])[:k].tolist())  # tiers in order, then ascending index

        expect.append({
            "embed": top("embed", KEEP_EMBED[i]),
            "heads": [top(("heads", k), KEEP_HEADS[i]) for k in range(3)],
            "neurons": [top(("neurons", k), KEEP_NEURONS[i]) for k in range(3)],
        })
    return t, expect


def test_inherited_weights_are_exact_slices():
    """Each sub-model holds exact slices of the teacher at the keep-sets fixed by the construction (magnitude
    criterion, the default; depth 3 of 4 keeps the first three blocks, the rule for criteria that do not
    score blocks)."""
    t, expect = _tiered_teacher()
    groups = [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]
    budgets = [{"embed_dim": e, "depth": 3, "num_heads": h, "mlp_hidden": n}
               for e, h, n in zip(KEEP_EMBED, KEEP_HEADS, KEEP_NEURONS)]
    m = decompose(t, 2, budgets=budgets, partition=groups)
    H, D, d = 3, 16, 48
    ts = t.state_dict()
    for i, sub in enumerate(m.submodels):
        ex = expect[i]
        e, g = torch.tensor(ex["embed"]), torch.tensor(groups[i])
        ss = sub.state_dict()
        assert set(k for k in ss if k.startswith("blocks.")) == {
            k for k in ts if k.startswith(("blocks.0.", "blocks.1.", "blocks.2."))}
        assert torch.equal(ss["patch_embed.proj.weight"], ts["patch_embed.proj.weight"][e])
        assert torch.equal(ss["pos_embed"], ts["pos_embed"][:, :, e])
        assert torch.equal(ss["cls_token"], ts["cls_token"][:, :, e])
        assert torch.equal(ss["norm.weight"], ts["norm.weight"][e])
        assert torch.equal(ss["norm.bias"], ts["norm.bias"][e])
        assert torch.equal(ss["head.weight"], ts["head.weight"][g][:, e])
        assert torch.equal(ss["head.bias"], ts["head.bias"][g])
        for k in range(3):
            hk, nk = torch.tensor(ex["heads"][k]), torch.tensor(ex["neurons"][k])
            p = f"blocks.{k}."
            qkv = ts[p + "attn.qkv.weight"].reshape(3, H, D, d)[:, hk][..., e].reshape(-1, len(e))
            assert torch.equal(ss[p + "attn.qkv.weight"], qkv)
            assert torch.equal(ss[p + "attn.qkv.bias"], ts[p + "attn.qkv.bias"].reshape(3, H, D)[:, hk].reshape(-1))
            proj = ts[p + "attn.proj.weight"].reshape(d, H, D)[e][:, hk].reshape(len(e), -1)
            assert torch.equal(ss[p + "attn.proj.weight"], proj)
            assert torch.equal(ss[p + "attn.proj.bias"], ts[p + "attn.proj.bias"][e])
            assert torch.equal(ss[p + "mlp.fc1.weight"], ts[p + "mlp.fc1.weight"][nk][:, e])
            assert torch.equal(ss[p + "mlp.fc1.bias"], ts[p + "mlp.fc1.bias"][nk])
            assert torch.equal(ss[p + "mlp.fc2.weight"], ts[p + "mlp.fc2.weight"][e][:, nk])
            assert torch.equal(ss[p + "mlp.fc2.bias"], ts[p + "mlp.fc2.bias"][e])
            for nm in ("norm1", "norm2"):
                for w in ("weight", "bias"):
                    assert torch.equal(ss[p + f"{nm}.{w}"], ts[p + f"{nm}.{w}"][e])


def test_tiered_teacher_keep_sets_differ_from_the_untiered_choice(vit):
    """The construction decides the keep-sets: the plain random teacher keeps other units, so a decompose
    that ignored the importance scores could not pass the test above."""
    budgets = [{"embed_dim": 16, "depth": 3, "num_heads": 1, "mlp_hidden": 20}] * 2
    _, expect = _tiered_teacher()
    plain = decompose(vit, 2, budgets=budgets, partition=[[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]])
    w = plain.submodels[1].patch_embed.proj.weight
    kept = [i for i in range(48) if any(torch.equal(w[j], vit.patch_embed.proj.weight[i]) for j in range(len(w)))]
    assert kept != expect[1]["embed"]


def test_variant_teacher_prunes(vitx, images):
    m = decompose(vitx, 2, budgets=[0.3, {"embed_dim": 16, "depth": 1, "num_heads": 1, "mlp_hidden": 24}])
    assert m.submodels[0].cfg["pre_norm"] and not m.submodels[0].cfg["qkv_bias"]
    assert m.submodels[1].norm_pre.weight.shape == (16,)
    assert m(images).shape == (3, C)


def test_explicit_shape_honoured_and_timm_names(deit3):
    shape = {"embed_dim": 40, "depth": 2, "num_heads": 2, "mlp_hidden": 72}
    m = decompose(deit3, 2, budgets=[shape, shape])
    for sub in m.submodels:
        c = sub.cfg
        assert (c["embed_dim"], len(c["blocks"])) == (40, 2)
        assert all(b == {"num_heads": 2, "mlp_hidden": 72} for b in c["blocks"])
        assert set(sub.state_dict()) <= set(deit3.state_dict())
        assert sub.blocks[1].ls2.gamma.shape == (40,)


def test_distilled_tokens_and_fusion_branches(deit, images):
    m = decompose(deit, 3)
    toks = m.forward_tokens(images)
    assert [tuple(t.shape) for t in toks] == [(3, 2, w) for w in m.widths]
    assert m.distilled and m.fusion.head_dist is not None
    assert torch.equal(m.fusion.head_dist.weight, deit.head_dist.weight)
    assert torch.equal(m.fusion.head.weight, deit.head.weight)
    assert m(images).shape == (3, C)


def _kept_channels(sub, teacher) -> list[int]:
    """The teacher channels a sub-model holds, read back from its patch-embedding rows (exact matches)."""
    tw, sw = teacher.patch_embed.proj.weight.detach().flatten(1), sub.patch_embed.proj.weight.detach().flatten(1)
    out = []
    for r in sw:
        hit = [i for i, t in enumerate(tw) if torch.equal(r, t)]
        assert len(hit) == 1, hit
        out.append(hit[0])
    return out


def test_fusion_map_init():
    """Scatter-average map on keep-sets known by construction: sub-model 1's 16 channels are inside
    sub-model 0's 24, so those 16 get weight 1/2 in both blocks, the other 8 weight 1, the rest 0."""
    t, expect = _tiered_teacher()
    budgets = [{"embed_dim": e, "depth": 2, "num_heads": 2, "mlp_hidden": 64} for e in KEEP_EMBED]
    m = decompose(t, 2, budgets=budgets)
    e0, e1 = (torch.tensor(ex["embed"]) for ex in expect)
    assert [_kept_channels(s, t) for s in m.submodels] == [ex["embed"] for ex in expect]
    W, b = m.fusion.map.weight, m.fusion.map.bias
    both = torch.isin(e0, e1)
    assert torch.equal(W[e0, torch.arange(24)], torch.where(both, 0.5, 1.0))
    assert torch.equal(W[e1, 24 + torch.arange(16)], torch.full((16,), 0.5))
    assert int((W != 0).sum()) == 40
    cover = torch.zeros(48, dtype=torch.bool)
    cover[e0] = True
    assert torch.equal(b[~cover], t.norm.bias[~cover])


# ---------------------------------------------------------------------------
# Budgets
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["vit", "deit"])
@pytest.mark.parametrize("frac", [0.05, 0.1, 0.25, 0.5, 0.8])
def test_flops_within_10_percent(which, frac, request):
    t = request.getfixturevalue(which)
    m = decompose(t, 2, budgets=[frac, frac])
    tf = m.meta["teacher_flops"]
    assert tf == vit_flops(teacher_config(t), include_head=True)
    for f in m.flops():
        assert abs(f / (frac * tf) - 1) <= 0.10


def test_flops_and_params_dict_budgets(vit, deit):
    for t in (vit, deit):
        tf = vit_flops(teacher_config(t), include_head=True)
        m = decompose(t, 2, budgets=[{"flops": int(0.2 * tf)}, {"params": 15000}])
        assert abs(m.flops()[0] / int(0.2 * tf) - 1) <= 0.10
        assert abs(m.num_params()[1] / 15000 - 1) <= 0.10


def test_vit_params_matches_module(vit, deit, deit3):
    for t in (vit, deit, deit3):
        tc = teacher_config(t)
        for shape in [(8, 1, 1, 8), (24, 3, 2, 40), (tc["embed_dim"], 2, 3, 100)]:
            cfg = uniform_config(tc, *shape, num_classes=4)
            assert vit_params(cfg) == SubViT(cfg).num_params()
        assert vit_params(tc) == sum(p.numel() for n, p in t.named_parameters() if not n.startswith("head"))


def test_default_budget_is_40_percent_split_equally(vit):
    m = decompose(vit, 4)
    tf = m.meta["teacher_flops"]
    assert m.meta["budgets"] is None
    assert len({describe_shape(s.cfg) for s in m.submodels}) == 1
    assert abs(sum(m.flops()) / (0.4 * tf) - 1) <= 0.10


def test_heterogeneous_budgets(vit):
    m = decompose(vit, 3, budgets=[0.5, 0.2, 0.05])
    shapes = [describe_shape(s.cfg) for s in m.submodels]
    assert len(set(shapes)) == 3
    f = m.flops()
    assert f[0] > f[1] > f[2]
    assert [len(g) for g in m.class_groups] == [3, 3, 4]
    m2 = decompose(vit, 3, budgets=[0.5, 0.2, 0.05], class_share="budget")
    sizes = [len(g) for g in m2.class_groups]
    assert sum(sizes) == C and sizes[0] > sizes[1] >= sizes[2] >= 1
    assert sorted(c for g in m2.class_groups for c in g) == list(range(C))


def test_numpy_numbers_accepted(vit):
    np = pytest.importorskip("numpy")
    m = decompose(vit, np.int64(2), budgets=[np.float32(0.2), {"embed_dim": np.int64(16), "depth": 2, "num_heads": 1,
                                                               "mlp_hidden": 32}])
    assert describe_shape(m.submodels[1].cfg) == "d16 L2 h1 m32"
    json.dumps(m.meta)


def test_search_shape_full_budget_is_teacher():
    t = _tiny(depth=2)
    tc = teacher_config(t)
    s = search_shape(tc, vit_flops(tc, include_head=True))
    assert (s["embed_dim"], s["depth"], s["num_heads"], s["mlp_hidden"]) == (48, 2, 3, 192)


# ---------------------------------------------------------------------------
# Partitions
# ---------------------------------------------------------------------------


def test_random_partition_is_the_papers(vit):
    m = decompose(vit, 3, seed=7)
    perm = torch.randperm(C, generator=torch.Generator().manual_seed(7)).tolist()
    assert m.class_groups == [perm[0:3], perm[3:6], perm[6:10]]
    assert part.group_sizes(100, 4) == [25] * 4
    assert part.group_sizes(10, 4) == [2, 2, 2, 4]
    assert part.group_sizes(10, 2, [3.0, 1.0]) == [7, 3]


def test_explicit_partition(vit):
    groups = [[9, 0, 3], [1, 2], [4, 5, 6, 7, 8]]
    m = decompose(vit, 3, partition=groups)
    assert m.class_groups == groups
    assert m.meta["partition"] == "explicit"
    assert [s.cfg["num_classes"] for s in m.submodels] == [3, 2, 5]
    assert torch.equal(m.submodels[0].head.weight, vit.head.weight[[9, 0, 3]][:, _kept_channels(m.submodels[0], vit)])


def test_similarity_partition_groups_alike_classes():
    # classes 0-4 are noisy copies of one pattern, 5-9 of another: the teacher's tokens separate them
    t = _tiny(depth=2)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(3, 32, 32, generator=g), torch.randn(3, 32, 32, generator=g)
    y = torch.arange(60) % C
    x = torch.stack([(a if int(c) < 5 else b) + 0.05 * torch.randn(3, 32, 32, generator=g) for c in y])
    data = [(x[i : i + 20], y[i : i + 20]) for i in range(0, 60, 20)]
    m = decompose(t, 2, partition="similarity", data=data)
    assert sorted(sorted(gr) for gr in m.class_groups) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    m3 = decompose(t, 3, partition="similarity", data=data)
    assert sorted(len(gr) for gr in m3.class_groups) == [3, 3, 4]


def test_balanced_kmeans_sizes_and_classes_missing_from_data():
    x = torch.randn(11, 5, dtype=torch.float64)
    groups = part.balanced_kmeans(x, [2, 4, 5], seed=0)
    assert [len(gr) for gr in groups] == [2, 4, 5]
    assert sorted(sum(groups, [])) == list(range(11))
    # a class absent from the data falls back to its head row
    v = part.class_vectors(torch.randn(4, 6), torch.tensor([0, 0, 1, 1]), torch.randn(3, 6))
    assert torch.allclose(v.norm(dim=1), torch.ones(3, dtype=torch.float64))


# ---------------------------------------------------------------------------
# Importance criteria
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("crit", ["magnitude", "taylor", "hsic"])
def test_importance_is_per_group(vit, crit):
    groups = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    s = imp.CRITERIA[crit](vit, teacher_config(vit), groups, images=_data()[0][0].repeat(3, 1, 1, 1),
                           labels=torch.arange(48) % C)
    assert len(s) == 2
    for si in s:
        assert si["embed"].shape == (48,) and len(si["heads"]) == 4 and si["neurons"][0].shape == (192,)
        assert all(torch.isfinite(v).all() for v in [si["embed"], *si["heads"], *si["neurons"]])
    assert not torch.equal(s[0]["embed"], s[1]["embed"])
    if crit != "magnitude":
        assert s[0]["blocks"].shape == (4,)


@pytest.mark.parametrize("crit", ["taylor", "hsic"])
@pytest.mark.parametrize("which", ["vit", "deit"])
def test_data_driven_decompose(crit, which, request, images):
    t = request.getfixturevalue(which)
    m = decompose(t, 2, budgets=[0.2, 0.1], importance=crit, data=_data(), block_select="importance")
    tf = m.meta["teacher_flops"]
    for f, b in zip(m.flops(), [0.2, 0.1]):
        assert abs(f / (b * tf) - 1) <= 0.10
    assert m.meta["importance"] == crit
    assert m(images).shape == (3, C)
    assert all(kb == sorted(kb) for kb in m.meta["kept_blocks"])


def test_lstsq_fusion_init_fits_teacher_tokens(deit):
    data = _data(n=64)
    x = torch.cat([b[0] for b in data])
    base = decompose(deit, 2, budgets=[0.2, 0.2])
    fit = decompose(deit, 2, budgets=[0.2, 0.2], data=data, fusion_init="lstsq")
    assert fit.meta["fusion_init"] == "lstsq"
    with torch.no_grad():
        ref = deit.forward_features(x)[:, :2]
        err = [sum(float((h - ref[:, b]).pow(2).mean()) for b, h in enumerate(m.fusion.mapped(m.forward_tokens(x))))
               for m in (base, fit)]
    assert err[1] < err[0]
    with pytest.raises(ValueError, match="data"):
        decompose(deit, 2, fusion_init="lstsq")
    with pytest.raises(ValueError, match="fusion_init"):
        decompose(deit, 2, fusion_init="pca")


def test_taylor_does_not_touch_teacher(vit):
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    flags = [p.requires_grad for p in vit.parameters()]
    vit.requires_grad_(False)
    decompose(vit, 2, importance="taylor", data=_data())
    assert all(not p.requires_grad and p.grad is None for p in vit.parameters())
    vit.requires_grad_(True)
    assert [p.requires_grad for p in vit.parameters()] == flags
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())
    assert not vit.training


# ---------------------------------------------------------------------------
# Determinism, metadata, save/load
# ---------------------------------------------------------------------------


def test_same_seed_same_result(vit, images):
    kw = dict(budgets=[0.2, 0.1, 0.1], partition="similarity", importance="hsic")
    a = decompose(vit, 3, data=_data(), seed=5, **kw)
    b = decompose(vit, 3, data=_data(), seed=5, **kw)
    assert a.class_groups == b.class_groups
    assert a.content_hash() == b.content_hash()
    assert torch.equal(a(images), b(images))
    assert decompose(vit, 3, seed=1).class_groups != decompose(vit, 3, seed=2).class_groups


def test_meta_contract(deit):
    m = decompose(deit, 2, budgets=[0.2, {"flops": 300000}])
    meta = m.meta
    tc = teacher_config(deit)
    assert meta["teacher_name"] == "deit_tiny_distilled_patch16_224"
    assert meta["img_size"] == [32, 32] and meta["patch_size"] == [8, 8] and meta["in_chans"] == 3
    assert meta["mean"] == tc["mean"] and meta["std"] == tc["std"]
    assert meta["num_classes"] == C and meta["teacher_dim"] == 48 and meta["distilled"] is True
    assert meta["teacher_flops"] == vit_flops(tc, include_head=True)
    assert (meta["seed"], meta["partition"], meta["importance"]) == (0, "random", "magnitude")
    assert meta["budgets"] == [0.2, {"flops": 300000}]
    json.dumps(meta)
    plain = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=1,
                                                             num_heads=1, num_classes=3)
    assert decompose(plain, 1).meta["teacher_name"] == "VisionTransformer"


def test_save_load_round_trip(deit, images, tmp_path):
    m = decompose(deit, 2, budgets=[0.3, 0.1]).eval()
    m.save(tmp_path / "m")
    r = devit_ext.load(tmp_path / "m").eval()
    assert r.class_groups == m.class_groups and r.meta == m.meta
    with torch.no_grad():
        assert torch.equal(r(images), m(images))
        for a, b in zip(r.forward_tokens(images), m.forward_tokens(images)):
            assert torch.equal(a, b)


def test_bad_checkpoints(vit, tmp_path):
    m = decompose(vit, 2)
    good = tmp_path / "good"
    m.save(good)
    w = good / "model.safetensors"
    raw = w.read_bytes()
    cfg = json.loads((good / "config.json").read_text())

    def variant(name, weights=raw, config=cfg):
        p = tmp_path / name
        p.mkdir()
        (p / "model.safetensors").write_bytes(weights)
        (p / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        return p

    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load(variant("trunc", weights=raw[: len(raw) // 2]))
    flipped = bytearray(raw)
    flipped[-5] ^= 0xFF
    with pytest.raises(CheckpointError, match="hash"):
        load(variant("edited", weights=bytes(flipped)))
    other = tmp_path / "other"
    decompose(vit, 2, seed=3).save(other)
    with pytest.raises(CheckpointError, match="hash"):
        load(variant("mixed", weights=(other / "model.safetensors").read_bytes()))
    shape = json.loads(json.dumps(cfg))
    shape["submodels"][0]["embed_dim"] += 8
    with pytest.raises(CheckpointError, match="shape"):
        load(variant("mismatch", config=shape))
    with pytest.raises(CheckpointError, match="JSON"):
        load(variant("badjson", config="{not json"))
    with pytest.raises(CheckpointError, match="missing"):
        load(tmp_path / "nowhere")
    ver = dict(cfg, format_version=99)
    with pytest.raises(CheckpointError, match="format_version"):
        load(variant("version", config=ver))


def test_summary_table(vit):
    m = decompose(vit, 4)
    s = summary_table(m)
    assert m.summary() == s
    lines = s.splitlines()
    assert "device" in lines[1] and "FLOPs" in lines[1]
    assert len(lines) == 1 + 2 + 4 + 2
    assert describe_shape(m.submodels[0].cfg) in s


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(num_devices=0), "num_devices"),
        (dict(num_devices=-2), "num_devices"),
        (dict(num_devices=C + 1), "num_devices"),
        (dict(num_devices=2, budgets=[0.1]), "budgets"),
        (dict(num_devices=2, budgets=0.1), "budgets"),
        (dict(num_devices=2, budgets=[0.1, 0.0]), r"budgets\[1\]"),
        (dict(num_devices=2, budgets=[1.5, 0.1]), r"budgets\[0\]"),
        (dict(num_devices=2, budgets=[-0.1, 0.1]), r"budgets\[0\]"),
        (dict(num_devices=2, budgets=[True, 0.1]), r"budgets\[0\]"),
        (dict(num_devices=1, budgets=[{"flops": -5}]), r"budgets\[0\]"),
        (dict(num_devices=1, budgets=[{"flops": 10**12}]), r"budgets\[0\]"),
        (dict(num_devices=1, budgets=[{"params": 0}]), r"budgets\[0\]"),
        (dict(num_devices=1, budgets=[{"flops": 10, "params": 10}]), r"budgets\[0\]"),
        (dict(num_devices=1, budgets=[{"flops": 10}]), r"budgets\[0\].*raise the budget"),
        (dict(num_devices=1, budgets=[{"embed_dim": 0, "depth": 1, "num_heads": 1, "mlp_hidden": 8}]), "embed_dim"),
        (dict(num_devices=1, budgets=[{"embed_dim": 96, "depth": 1, "num_heads": 1, "mlp_hidden": 8}]), "embed_dim"),
        (dict(num_devices=1, budgets=[{"embed_dim": 8, "depth": 5, "num_heads": 1, "mlp_hidden": 8}]), "depth"),
        (dict(num_devices=1, budgets=[{"embed_dim": 8, "depth": 1, "num_heads": 4, "mlp_hidden": 8}]), "num_heads"),
        (dict(num_devices=1, budgets=[{"embed_dim": 8, "depth": 1, "num_heads": 1, "mlp_hidden": 193}]), "mlp_hidden"),
        (dict(num_devices=1, budgets=[{"embed_dim": 8, "depth": 1, "num_heads": -1, "mlp_hidden": 8}]), "num_heads"),
        (dict(num_devices=1, budgets=[{"embed_dim": 8, "depth": 1.5, "num_heads": 1, "mlp_hidden": 8}]), "depth"),
        (dict(num_devices=1, budgets=[{"embed_dim": 8, "depth": 1, "num_heads": 1}]), r"budgets\[0\]"),
        (dict(num_devices=2, partition="kmeans"), "partition"),
        (dict(num_devices=2, partition=[[0, 1, 2, 3, 4], [5, 6, 7, 8]]), "partition.*no group"),
        (dict(num_devices=2, partition=[[0, 1, 2, 3, 4], [4, 5, 6, 7, 8, 9]]), "partition.*disjoint"),
        (dict(num_devices=2, partition=[list(range(C)), []]), "partition.*empty"),
        (dict(num_devices=2, partition=[[0, 1, 2, 3, 4], [5, 6, 7, 8, 10]]), "partition"),
        (dict(num_devices=2, partition=[[0, 1, 2, 3, 4.0], [5, 6, 7, 8, 9]]), "partition"),
        (dict(num_devices=3, partition=[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]), "partition"),
        (dict(num_devices=2, importance="fisher"), "importance"),
        (dict(num_devices=2, importance="taylor"), "data"),
        (dict(num_devices=2, importance="hsic"), "data"),
        (dict(num_devices=2, partition="similarity"), "data"),
        (dict(num_devices=2, class_share="magic"), "class_share"),
        (dict(num_devices=2, block_select="importance"), "block_select"),
        (dict(num_devices=2, partition=[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], class_share="budget"), "class_share"),
        (dict(num_devices=2, importance="taylor", data=[(torch.randn(2, 3, 32, 32), torch.tensor([0, 11]))]), "data"),
        (dict(num_devices=2, importance="taylor", data=[(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))]), "data"),
        (dict(num_devices=2, importance="taylor", data=[]), "data"),
        (dict(num_devices=2, importance="taylor", data=[torch.randn(2, 3, 32, 32)]), "data"),
        (dict(num_devices=2, seed="abc"), "seed"),  # issue 17: raw int() errors before
        (dict(num_devices=2, seed=1.5), "seed"),
        (dict(num_devices=2, importance="taylor", data=[(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))], max_samples=0), "max_samples"),
        (dict(num_devices=2, importance="taylor", data=[(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))], max_samples="x"), "max_samples"),
        (dict(num_devices=2, partition="similarity", data=[(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))], batch_size=0), "batch_size"),
    ],
)
def test_bad_input(vit, kwargs, arg):
    n = kwargs.pop("num_devices")
    with pytest.raises((ValueError, TypeError), match=arg):
        decompose(vit, n, **kwargs)


def test_bad_num_devices_type(vit):
    with pytest.raises(TypeError, match="num_devices"):
        decompose(vit, 2.0)


def test_bad_teachers():
    with pytest.raises(ValueError, match="teacher.*class token"):
        decompose(_tiny(class_token=False, global_pool="avg"), 2)
    with pytest.raises(TypeError, match="teacher.*VisionTransformer"):
        decompose(timm.create_model("resnet18", pretrained=False, num_classes=C), 2)
    with pytest.raises(TypeError, match="teacher"):
        decompose(nn.Linear(3, 3), 2)
    with pytest.raises(ValueError, match="teacher"):
        decompose(_tiny(global_pool="avg"), 2)


@pytest.mark.slow
def test_vit_large_to_vit_tiny_shapes():
    t = timm.create_model("vit_large_patch16_224", pretrained=False).eval()
    shape = {"embed_dim": 192, "depth": 12, "num_heads": 3, "mlp_hidden": 768}
    m = decompose(t, 4, budgets=[shape] * 4)
    assert all(describe_shape(s.cfg) == "d192 L12 h3 m768" for s in m.submodels)
    assert m.widths == [192] * 4 and m.fusion.map.in_features == 768
    assert sum(len(g) for g in m.class_groups) == 1000
