"""Importance criteria and unit choice against a hand-made teacher whose unit importances are known.

The teacher is a tiny timm ViT with some units switched off by zeroing every
weight that reads or writes them: attention heads (their Q/K/V rows and output
projection columns), MLP neurons (fc1 rows and bias, fc2 columns), embedding
channels (every tensor on that channel: the residual stream there is exactly
0) and one whole block (output projection and fc2 zero: the block is the
identity). Such a unit contributes nothing, so every criterion must score it
lowest and `decompose` must prune it first. What a sub-model kept is read back
from its weights (matched against the teacher's), never from `choose_units`.
"""
from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

from devit_ext import decompose
from devit_ext import importance as imp
from devit_ext.decomposition import top_units
from devit_ext.model import teacher_config

C, D, H, DIM, MLP, DEPTH = 4, 16, 3, 48, 96, 3
ZERO_HEADS = {0: [1], 2: [0]}  # teacher block -> heads switched off
ZERO_NEURONS = {0: [3, 50, 77], 2: [0, 95]}
ZERO_CHANNELS = [5, 31]
IDENTITY_BLOCK = 1
SCALED = (0, 0, 2)  # block 0: head 2 = head 0 / 3, so magnitude must rank head 0 above head 2
GROUPS = [[0, 1], [2, 3]]
SHAPE = {"embed_dim": 46, "depth": 2, "num_heads": 2, "mlp_hidden": 93}  # block 0: exactly its live units


def _head_rows(h):
    return torch.cat([s * H * D + torch.arange(h * D, (h + 1) * D) for s in range(3)])


def hand_made_teacher():
    torch.manual_seed(0)
    t = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=DIM,
                          depth=DEPTH, num_heads=H, mlp_ratio=MLP / DIM, num_classes=C).eval()
    with torch.no_grad():
        for n, p in t.named_parameters():  # timm zero-inits biases and tokens: make every tensor informative
            if n.endswith("bias") or "norm" in n or n in ("pos_embed", "cls_token"):
                p.add_(0.1 * torch.randn_like(p))
        for k, heads in ZERO_HEADS.items():
            a = t.blocks[k].attn
            for h in heads:
                a.qkv.weight[_head_rows(h)] = 0
                a.qkv.bias[_head_rows(h)] = 0
                a.proj.weight[:, h * D : (h + 1) * D] = 0
        k, src, dst = SCALED
        a = t.blocks[k].attn
        a.qkv.weight[_head_rows(dst)] = a.qkv.weight[_head_rows(src)] / 3
        a.qkv.bias[_head_rows(dst)] = a.qkv.bias[_head_rows(src)] / 3
        a.proj.weight[:, dst * D : (dst + 1) * D] = a.proj.weight[:, src * D : (src + 1) * D] / 3
        for k, neurons in ZERO_NEURONS.items():
            m = t.blocks[k].mlp
            m.fc1.weight[neurons] = 0
            m.fc1.bias[neurons] = 0
            m.fc2.weight[:, neurons] = 0
        b = t.blocks[IDENTITY_BLOCK]
        for lin in (b.attn.proj, b.mlp.fc2):
            lin.weight.zero_()
            lin.bias.zero_()
        ch = ZERO_CHANNELS
        for n, p in t.named_parameters():
            for axis, kind in imp.param_axes(n).items():
                if kind == ("embed",):
                    p.index_fill_(axis, torch.tensor(ch), 0.0)
    return t


@pytest.fixture(scope="module")
def teacher():
    return hand_made_teacher()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 3, 32, 32, generator=g)
    y = torch.arange(32) % C
    return [(x[:16], y[:16]), (x[16:], y[16:])]


def test_the_switched_off_units_are_really_off(teacher, data):
    """The construction itself: zero channels stay zero, the identity block changes nothing."""
    x = data[0][0]
    seen = {}

    def hook(mod, inp, out):
        seen["d"] = (out - inp[0]).abs().max()

    handle = teacher.blocks[IDENTITY_BLOCK].register_forward_hook(hook)
    with torch.no_grad():
        f = teacher.forward_features(x)
    handle.remove()
    assert float(seen["d"]) == 0.0
    assert float(f[..., ZERO_CHANNELS].abs().max()) == 0.0


# ---------------------------------------------------------------------------
# Scores: every criterion puts the switched-off units strictly last
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def all_scores(teacher, data):
    tcfg = teacher_config(teacher)
    x, y = imp.collect_data(data, 64)
    return {name: fn(teacher, tcfg, GROUPS, images=x, labels=y, batch_size=16) for name, fn in imp.CRITERIA.items()}


def _strictly_lowest(scores: torch.Tensor, off: list[int], what: str):
    on = [i for i in range(len(scores)) if i not in off]
    assert float(scores[off].max()) < float(scores[on].min()), f"{what}: switched-off {off} not strictly lowest: {scores}"


@pytest.mark.parametrize("criterion", sorted(imp.CRITERIA))
def test_switched_off_units_score_lowest(all_scores, criterion):
    for gi, s in enumerate(all_scores[criterion]):
        _strictly_lowest(s["embed"], ZERO_CHANNELS, f"{criterion} group {gi} channels")
        for k, heads in ZERO_HEADS.items():
            _strictly_lowest(s["heads"][k], heads, f"{criterion} group {gi} block {k} heads")
        for k, neurons in ZERO_NEURONS.items():
            _strictly_lowest(s["neurons"][k], neurons, f"{criterion} group {gi} block {k} neurons")
        if s["blocks"] is not None:
            _strictly_lowest(s["blocks"], [IDENTITY_BLOCK], f"{criterion} group {gi} blocks")


def test_magnitude_ranks_a_head_by_its_weights(all_scores):
    for s in all_scores["magnitude"]:
        h = s["heads"][0]
        assert float(h[1]) == 0.0
        torch.testing.assert_close(float(h[0]), 3 * float(h[2]), rtol=1e-9, atol=0)


def test_top_units_keeps_the_largest():
    s = torch.tensor([0.3, 5.0, -1.0, 2.0, 2.0, 0.0])
    assert top_units(s, 1).tolist() == [1]
    assert top_units(s, 3).tolist() == [1, 3, 4]  # ascending index order
    assert top_units(s, 2).tolist() == [1, 3]  # a tie goes to the lower index
    assert top_units(s, 6).tolist() == list(range(6))


# ---------------------------------------------------------------------------
# decompose: what each sub-model kept, read back from its weights
# ---------------------------------------------------------------------------


def _match(rows_sub: torch.Tensor, rows_teacher: torch.Tensor) -> list[int]:
    """For each row of rows_sub, the index of the identical row of rows_teacher."""
    out = []
    for r in rows_sub:
        hit = [i for i, t in enumerate(rows_teacher) if torch.equal(r, t)]
        assert len(hit) == 1, f"sub-model row matches teacher rows {hit}"
        out.append(hit[0])
    return out


def kept_units(sub, teacher):
    """(channels, blocks, heads per block, neurons per block) a sub-model holds, from its weights."""
    tw = teacher.patch_embed.proj.weight.detach().flatten(1)
    emb = _match(sub.patch_embed.proj.weight.detach().flatten(1), tw)
    e = torch.tensor(emb)
    blocks, heads, neurons = [], [], []
    for sb in sub.blocks:
        # the block: its norm1 weight equals the teacher block's on the kept channels
        cand = [k for k, tb in enumerate(teacher.blocks) if torch.equal(sb.norm1.weight, tb.norm1.weight[e])]
        assert len(cand) == 1
        k = cand[0]
        tb = teacher.blocks[k]
        blocks.append(k)
        # heads: the query rows (D each) on the kept channels, against the teacher's per head
        tq = tb.attn.qkv.weight.detach()[: H * D][:, e].reshape(H, D * len(emb))
        sq = sb.attn.qkv.weight.detach()[: sb.attn.qkv.weight.shape[0] // 3][:, :]
        heads.append(_match(sq.reshape(-1, D * len(emb)), tq))
        neurons.append(_match(sb.mlp.fc1.weight.detach(), tb.mlp.fc1.weight.detach()[:, e]))
    return emb, blocks, heads, neurons


@pytest.mark.parametrize("criterion", sorted(imp.CRITERIA))
def test_decompose_prunes_switched_off_units_first(teacher, data, criterion):
    model = decompose(teacher, 2, budgets=[SHAPE] * 2, partition=GROUPS, importance=criterion,
                      data=data if criterion in imp.DATA_DRIVEN else None)
    for i, sub in enumerate(model.submodels):
        emb, blocks, heads, neurons = kept_units(sub, teacher)
        assert sorted(emb) == [c for c in range(DIM) if c not in ZERO_CHANNELS], (criterion, i)
        if criterion in ("taylor", "hsic"):  # they score blocks: the identity block goes
            assert blocks == [0, 2], (criterion, i, blocks)
        else:
            assert blocks == [0, 1]
        for k, hs, ns in zip(blocks, heads, neurons):
            if k in ZERO_HEADS:
                assert sorted(hs) == [h for h in range(H) if h not in ZERO_HEADS[k]], (criterion, i, k, hs)
            if k in ZERO_NEURONS:
                assert not set(ns) & set(ZERO_NEURONS[k]), (criterion, i, k)
                assert len(ns) == SHAPE["mlp_hidden"]


def test_decompose_keeps_the_stronger_of_two_heads(teacher):
    """One head per block: magnitude keeps head 0 of block 0 (three times head 2, head 1 is off)."""
    shape = dict(SHAPE, num_heads=1)
    model = decompose(teacher, 2, budgets=[shape] * 2, partition=GROUPS, importance="magnitude")
    for sub in model.submodels:
        _, blocks, heads, _ = kept_units(sub, teacher)
        assert blocks[0] == 0 and heads[0] == [0]
