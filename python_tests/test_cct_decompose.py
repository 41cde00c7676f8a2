"""Decomposing a CCT teacher: sub-models hold exact slices of its weights (tokenizer convs, inner conv channels,
heads, neurons, blocks, sequence pooling), costs count the conv tokenizer, saved models round-trip."""
from __future__ import annotations

import json
import os

import pytest
import torch

import devit_ext
from devit_ext.cct import CCT, SubCCT, make_config
from devit_ext.model import ModelFileError


def teacher(convs=2, pos="learnable", seed=0):
    cfg = make_config(embed_dim=32, depth=3, num_heads=2, mlp_ratio=2, kernel_size=3, n_conv_layers=convs, img_size=8,
                      in_chans=1, num_classes=6, positional_embedding=pos)
    return random_cct(cfg, seed)


def random_cct(cfg: dict, seed: int) -> CCT:
    """A CCT in eval mode from `seed`, with informative norms and biases (the init zeroes them); global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        t = CCT(cfg).eval()
        with torch.no_grad():
            for n, p in t.named_parameters():
                if n.endswith("bias") or "norm" in n:
                    p.add_(0.2 * torch.randn(p.shape))
    return t


def images(n=5, seed=1):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def rows_subset(sub: torch.Tensor, full: torch.Tensor) -> list[int]:
    """The ascending rows of `full` that `sub` is made of, exactly (fails if there are none)."""
    idx, j = [], 0
    for r in sub:
        while j < len(full) and not torch.equal(full[j], r):
            j += 1
        assert j < len(full), "a row of the sub-model is not a row of the teacher"
        idx.append(j)
        j += 1
    return idx


def test_sub_models_are_exact_slices_of_the_teacher():
    t = teacher()
    shape = {"embed_dim": 16, "depth": 2, "num_heads": 1, "mlp_hidden": 24, "conv_channels": [40]}
    model = devit_ext.decompose(t, 2, budgets=[shape, 0.3], partition=[[0, 2, 4], [1, 3, 5]])
    T = t.state_dict()
    for i, sub in enumerate(model.submodels):
        assert isinstance(sub, SubCCT)
        S = sub.state_dict()
        E = torch.tensor(model.meta["kept_embed"][i])
        blocks = model.meta["kept_blocks"][i]
        # tokenizer: conv 0's output rows pick the inner channels, conv 1 reads exactly those
        inner = rows_subset(S["tokenizer.conv_layers.0.0.weight"], T["tokenizer.conv_layers.0.0.weight"])
        # the explicit shape's 40, or the searched shape's: the teacher's 64 scaled with the width
        assert len(inner) == (40 if i == 0 else round(64 * sub.cfg["embed_dim"] / 32))
        assert torch.equal(S["tokenizer.conv_layers.1.0.weight"], T["tokenizer.conv_layers.1.0.weight"][E][:, inner])
        assert torch.equal(S["classifier.positional_emb"], T["classifier.positional_emb"][:, :, E])
        assert torch.equal(S["classifier.attention_pool.weight"], T["classifier.attention_pool.weight"][:, E])
        assert torch.equal(S["classifier.attention_pool.bias"], T["classifier.attention_pool.bias"])
        for name in ("classifier.norm.weight", "classifier.norm.bias"):
            assert torch.equal(S[name], T[name][E])
        g = torch.tensor(model.class_groups[i])
        assert torch.equal(S["classifier.fc.weight"], T["classifier.fc.weight"][g][:, E])
        for j, k in enumerate(blocks):
            s, p = f"classifier.blocks.{j}.", f"classifier.blocks.{k}."
            qkv = rows_subset(S[s + "self_attn.qkv.weight"], T[p + "self_attn.qkv.weight"][:, E])
            D, H = 16, len(qkv) // 48
            heads = sorted({r % 32 // D for r in qkv})
            assert len(heads) == H and qkv == [part * 32 + h * D + e for part in range(3) for h in heads for e in range(D)]
            cols = [h * D + e for h in heads for e in range(D)]
            assert torch.equal(S[s + "self_attn.proj.weight"], T[p + "self_attn.proj.weight"][E][:, cols])
            neurons = rows_subset(S[s + "linear1.weight"], T[p + "linear1.weight"][:, E])
            assert torch.equal(S[s + "linear1.bias"], T[p + "linear1.bias"][neurons])
            assert torch.equal(S[s + "linear2.weight"], T[p + "linear2.weight"][E][:, neurons])
            for n in ("pre_norm.weight", "norm1.bias", "self_attn.proj.bias", "linear2.bias"):
                assert torch.equal(S[s + n], T[p + n][E])
    assert model.submodels[0].cfg["conv_channels"] == [40]
    assert model.submodels[0].cfg["drop_path_rate"] == 0.0  # students train without stochastic depth


def test_budgeted_inner_tokenizer_channels_scale_with_the_width():
    # a tokenizer whose inner convs cost ~9% of the teacher: kept whole, a 10% device would be d8 L1 m1
    cfg = make_config(embed_dim=128, depth=4, num_heads=4, mlp_ratio=2, kernel_size=3, n_conv_layers=3, img_size=28,
                      in_chans=1, num_classes=10, conv_channels=[16, 32])
    t = random_cct(cfg, 0)
    model = devit_ext.decompose(t, 4, budgets=[0.1] * 4)
    tf = model.meta["teacher_flops"]
    for sub, f in zip(model.submodels, model.flops()):
        d = sub.cfg["embed_dim"]
        assert sub.cfg["conv_channels"] == [max(1, round(c * d / 128)) for c in (16, 32)]
        assert abs(f / (0.1 * tf) - 1) <= 0.10  # the search counts the scaled tokenizer
        assert d >= 32 and len(sub.cfg["blocks"]) >= 2
    full = devit_ext.decompose(t, 1, budgets=[1.0])
    assert full.submodels[0].cfg["conv_channels"] == [16, 32]  # the whole budget keeps the teacher's


def test_one_unpruned_device_reproduces_the_teacher():
    t = teacher(pos="sine")
    model = devit_ext.decompose(t, 1, budgets=[1.0]).eval()
    x = images()
    with torch.no_grad():
        assert torch.allclose(model(x), t(x), atol=1e-5)
        assert torch.allclose(model.forward_tokens(x)[0], t.forward_head(t.forward_features(x), pre_logits=True), atol=1e-6)


def test_flops_count_the_conv_tokenizer_and_budgets_are_met():
    t = teacher()
    cfg = t.cfg
    # by hand: conv 8x8 -> 8x8 (pool 4x4) -> 4x4 (pool 2x2): 4 tokens of 32
    conv = 2 * 64 * 1 * 64 * 9 + 2 * 16 * 64 * 32 * 9
    blocks = 3 * (2 * 4 * 32 * 96 + 2 * 2 * 4 * 4 * 32 + 2 * 4 * 32 * 32 + 2 * 2 * 4 * 32 * 64)
    pool = 2 * 2 * 4 * 32
    assert devit_ext.cct.flops(cfg) == conv + blocks + pool
    assert devit_ext.cct.flops(cfg, include_head=True) == conv + blocks + pool + 2 * 32 * 6
    sub = SubCCT(cfg)
    assert sub.num_params() == devit_ext.cct.params(cfg) == sum(p.numel() for p in t.parameters()) - (32 * 6 + 6)
    model = devit_ext.decompose(t, 3, budgets=[0.5, {"params": 0.4 * devit_ext.cct.params(cfg)}, 0.35])
    tf = model.meta["teacher_flops"]
    assert tf == devit_ext.cct.flops(cfg, include_head=True)
    assert abs(model.flops()[0] / (0.5 * tf) - 1) <= 0.10
    assert abs(model.num_params()[1] / (0.4 * devit_ext.cct.params(cfg)) - 1) <= 0.10
    assert "d" in model.summary() and model.meta["backbone"] == "cct"


def test_taylor_and_similarity_run_and_hsic_and_bad_conv_channels_are_refused():
    t = teacher(convs=1)
    x, y = images(24), torch.arange(24) % 6
    m = devit_ext.decompose(t, 2, budgets=[0.3, 0.3], importance="taylor", partition="similarity", data=[(x, y)],
                            block_select="importance")
    assert len(m.submodels) == 2 and sorted(c for g in m.class_groups for c in g) == list(range(6))
    with pytest.raises(ValueError, match="hsic.*CCT"):
        devit_ext.decompose(t, 2, importance="hsic", data=[(x, y)])
    shape = {"embed_dim": 16, "depth": 2, "num_heads": 1, "mlp_hidden": 24, "conv_channels": [8]}
    with pytest.raises(ValueError, match="conv_channels applies to a CCT teacher with a tokenizer of two"):
        devit_ext.decompose(t, 1, budgets=[shape])
    with pytest.raises(ValueError, match=r"budgets\[0\]: conv_channels .* exceed"):
        devit_ext.decompose(teacher(), 1, budgets=[shape | {"conv_channels": [65]}])


def test_save_load_round_trip_and_an_edited_config_is_refused(tmp_path):
    model = devit_ext.decompose(teacher(), 2, budgets=[0.3, 0.25]).eval()
    digest = model.save(tmp_path / "m")
    back = devit_ext.load(tmp_path / "m").eval()
    assert back.content_hash() == digest and all(isinstance(s, SubCCT) for s in back.submodels)
    x = images()
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    path = os.path.join(tmp_path, "m", "config.json")
    cfg = json.load(open(path))
    cfg["submodels"][0]["conv_channels"] = [63]
    json.dump(cfg, open(path, "w"))
    with pytest.raises(ModelFileError, match="tokenizer conv 0"):
        devit_ext.load(tmp_path / "m")


def test_save_teacher_keeps_a_cct_teacher(tmp_path):
    """The teacher file (teacher.json + safetensors) holds a CCT: its config, its weights and the data config."""
    import timm

    from devit_ext.teacher import load_teacher, save_teacher

    t = timm.create_model("cct_2_3x2_32_sine", img_size=16, in_chans=1, num_classes=6).eval()
    with torch.no_grad():
        t.classifier.fc.bias.normal_()  # not the init, so the weights are what is compared
    save_teacher(t, tmp_path / "t", extra={"val_acc": 0.5})
    back, extra = load_teacher(tmp_path / "t")
    assert isinstance(back, CCT) and extra == {"val_acc": 0.5} and not back.training
    assert back.cfg["positional_embedding"] == "sine" and back.pretrained_cfg["mean"] == t.pretrained_cfg["mean"]
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(back(x), t(x))
    with pytest.raises(ValueError, match="not built by devit_ext.teacher.build_teacher nor a devit_ext CCT"):
        save_teacher(torch.nn.Linear(2, 2), tmp_path / "u")
