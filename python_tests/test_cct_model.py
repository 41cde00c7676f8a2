"""The CCT backbone against the published architecture, re-implemented here in plain torch from the paper and
SHI-Labs/Compact-Transformers' structure (never through devit_ext.cct's modules), and its public names.

    tokens = flatten(maxpool_3/2/1(relu(conv_k(x, no bias))))  (once per conv layer)  + positional embedding
    block:  x = x + proj(attn(qkv(pre_norm(x))));  x = norm1(x);  x = x + linear2(gelu(linear1(x)))
    logits = fc(softmax_over_tokens(attention_pool(norm(x)))^T norm(x))
"""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import devit_ext.cct  # registers the variants
from devit_ext.cct import CCT, make_config

# name -> (blocks, width, heads, MLP ratio, kernel, convs, image size, classes, position embedding), from the paper
PUBLISHED = {
    "cct_2_3x2_32": (2, 128, 2, 1, 3, 2, 32, 10, "learnable"), "cct_2_3x2_32_sine": (2, 128, 2, 1, 3, 2, 32, 10, "sine"),
    "cct_4_3x2_32": (4, 128, 2, 1, 3, 2, 32, 10, "learnable"), "cct_4_3x2_32_sine": (4, 128, 2, 1, 3, 2, 32, 10, "sine"),
    "cct_6_3x1_32": (6, 256, 4, 2, 3, 1, 32, 10, "learnable"), "cct_6_3x1_32_sine": (6, 256, 4, 2, 3, 1, 32, 10, "sine"),
    "cct_6_3x2_32": (6, 256, 4, 2, 3, 2, 32, 10, "learnable"), "cct_6_3x2_32_sine": (6, 256, 4, 2, 3, 2, 32, 10, "sine"),
    "cct_7_3x1_32": (7, 256, 4, 2, 3, 1, 32, 10, "learnable"), "cct_7_3x1_32_sine": (7, 256, 4, 2, 3, 1, 32, 10, "sine"),
    "cct_7_3x1_32_c100": (7, 256, 4, 2, 3, 1, 32, 100, "learnable"),
    "cct_7_3x1_32_sine_c100": (7, 256, 4, 2, 3, 1, 32, 100, "sine"),
    "cct_7_3x2_32": (7, 256, 4, 2, 3, 2, 32, 10, "learnable"), "cct_7_3x2_32_sine": (7, 256, 4, 2, 3, 2, 32, 10, "sine"),
    "cct_7_7x2_224": (7, 256, 4, 2, 7, 2, 224, 102, "learnable"),
    "cct_7_7x2_224_sine": (7, 256, 4, 2, 7, 2, 224, 102, "sine"),
    "cct_14_7x2_224": (14, 384, 6, 3, 7, 2, 224, 1000, "learnable"),
    "cct_14_7x2_384": (14, 384, 6, 3, 7, 2, 384, 1000, "learnable"),
    "cct_14_7x2_384_fl": (14, 384, 6, 3, 7, 2, 384, 102, "learnable"),
}


def public_keys(L, d, heads, ratio, k, convs, img, classes, pos) -> dict[str, tuple]:
    """The public state dict's names and shapes, written out from the repository's module tree."""
    stride, pad = max(1, k // 2 - 1), max(1, k // 2)
    chans = [3] + [64] * (convs - 1) + [d]
    keys, n = {}, img
    for i in range(convs):
        keys[f"tokenizer.conv_layers.{i}.0.weight"] = (chans[i + 1], chans[i], k, k)
        n = (n + 2 * pad - k) // stride + 1
        n = (n + 2 - 3) // 2 + 1
    keys["classifier.attention_pool.weight"] = (1, d)
    keys["classifier.attention_pool.bias"] = (1,)
    keys["classifier.positional_emb"] = (1, n * n, d)
    m = int(d * ratio)
    for b in range(L):
        p = f"classifier.blocks.{b}."
        keys |= {p + "pre_norm.weight": (d,), p + "pre_norm.bias": (d,), p + "self_attn.qkv.weight": (3 * d, d),
                 p + "self_attn.proj.weight": (d, d), p + "self_attn.proj.bias": (d,), p + "linear1.weight": (m, d),
                 p + "linear1.bias": (m,), p + "norm1.weight": (d,), p + "norm1.bias": (d,),
                 p + "linear2.weight": (d, m), p + "linear2.bias": (d,)}
    keys |= {"classifier.norm.weight": (d,), "classifier.norm.bias": (d,), "classifier.fc.weight": (classes, d),
             "classifier.fc.bias": (classes,)}
    return keys


def published_sine(n, dim):
    """The repository's table, as its list comprehension writes it."""
    pe = torch.FloatTensor([[p / (10000 ** (2 * (i // 2) / dim)) for i in range(dim)] for p in range(n)])
    pe[:, 0::2] = torch.sin(pe[:, 0::2])
    pe[:, 1::2] = torch.cos(pe[:, 1::2])
    return pe.unsqueeze(0)


def reference_forward(sd: dict, x: torch.Tensor, *, heads: int, k: int, convs: int) -> torch.Tensor:
    stride, pad = max(1, k // 2 - 1), max(1, k // 2)
    for i in range(convs):
        x = F.max_pool2d(F.relu(F.conv2d(x, sd[f"tokenizer.conv_layers.{i}.0.weight"], None, stride, pad)), 3, 2, 1)
    x = x.flatten(2).transpose(-2, -1)
    x = x + sd["classifier.positional_emb"]
    L = len({key.split(".")[2] for key in sd if key.startswith("classifier.blocks.")})
    d = x.shape[-1]

    def ln(t, name):
        return F.layer_norm(t, (d,), sd[name + ".weight"], sd[name + ".bias"], 1e-5)

    for b in range(L):
        p = f"classifier.blocks.{b}."
        h = ln(x, p + "pre_norm")
        B, N, C = h.shape
        qkv = (h @ sd[p + "self_attn.qkv.weight"].T).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        q, kk, v = qkv[0], qkv[1], qkv[2]
        a = ((q @ kk.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(-1)
        o = (a @ v).transpose(1, 2).reshape(B, N, C) @ sd[p + "self_attn.proj.weight"].T + sd[p + "self_attn.proj.bias"]
        x = ln(x + o, p + "norm1")
        y = F.gelu(x @ sd[p + "linear1.weight"].T + sd[p + "linear1.bias"]) @ sd[p + "linear2.weight"].T
        x = x + y + sd[p + "linear2.bias"]
    x = ln(x, "classifier.norm")
    w = F.softmax(x @ sd["classifier.attention_pool.weight"].T + sd["classifier.attention_pool.bias"], dim=1)
    x = torch.matmul(w.transpose(-1, -2), x).squeeze(-2)
    return x @ sd["classifier.fc.weight"].T + sd["classifier.fc.bias"]


def random_state(keys: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in keys.items():
        scale = 1.0 / math.sqrt(shape[1]) if len(shape) == 2 and shape[0] > 1 else 0.3
        if name.endswith("0.weight") and len(shape) == 4:
            scale = math.sqrt(2.0 / (shape[1] * shape[2] * shape[3]))
        t = torch.randn(shape, generator=g) * scale
        if name.endswith("norm.weight") or name.endswith("norm1.weight"):
            t = 1 + 0.2 * t
        sd[name] = t
    return sd


def test_every_published_variant_is_registered_with_the_published_names_and_shapes():
    assert set(PUBLISHED) <= set(timm.list_models("cct_*"))
    for name in ("cct_2_3x2_32", "cct_7_3x1_32_sine", "cct_14_7x2_224", "cct_7_7x2_224"):
        with torch.device("meta"):  # names and shapes only: no time spent on initialising big tensors
            m = timm.create_model(name)
        got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
        assert got == public_keys(*PUBLISHED[name]), name
        c, h, w = m.pretrained_cfg["input_size"]
        assert (c, h, w) == (3, PUBLISHED[name][6], PUBLISHED[name][6])
        assert m.pretrained_cfg["num_classes"] == m.num_classes == PUBLISHED[name][7]


def test_create_model_overrides_and_the_published_sizes():
    m = timm.create_model("cct_7_3x1_32", num_classes=100)
    assert m.classifier.fc.out_features == 100 and m.pretrained_cfg["num_classes"] == 100
    assert m.pretrained_cfg["mean"] == pytest.approx((0.4914, 0.4822, 0.4465), abs=1e-4)
    # the paper's table: CCT-7/3x1 (CIFAR-10) 3.76M parameters, CCT-14/7x2 (ImageNet) 22.36M and 5.53 GMACs
    assert sum(p.numel() for p in timm.create_model("cct_7_3x1_32").parameters()) / 1e6 == pytest.approx(3.76, abs=0.01)
    with torch.device("meta"):
        big = timm.create_model("cct_14_7x2_224")
    assert sum(p.numel() for p in big.parameters()) / 1e6 == pytest.approx(22.36, abs=0.01)
    assert devit_ext.cct.flops(big.cfg, include_head=True) / 2e9 == pytest.approx(5.53, rel=0.01)
    with pytest.raises(TypeError, match="unknown keyword"):
        timm.create_model("cct_7_3x1_32", patch_size=4)
    with pytest.raises(ValueError, match="pretrained"):
        timm.create_model("cct_7_3x1_32", pretrained=True)


@pytest.mark.parametrize("name", ["cct_7_3x1_32", "cct_2_3x2_32", "cct_2_3x2_32_sine"])
def test_forward_equals_the_published_architecture_on_random_weights(name):
    spec = PUBLISHED[name]
    sd = random_state(public_keys(*spec), seed=len(name))
    if spec[-1] == "sine":
        sd["classifier.positional_emb"] = published_sine(sd["classifier.positional_emb"].shape[1], spec[1])
    m = timm.create_model(name).eval()
    m.load_state_dict(sd, strict=True)  # the public names load as they are
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = reference_forward(sd, x, heads=spec[2], k=spec[4], convs=spec[5])
        got = m(x)
        feats = m.forward_features(x)
        assert torch.allclose(m.forward_head(feats), got)
        assert m.forward_head(feats, pre_logits=True).shape == (2, spec[1])
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()


def test_sine_table_is_the_published_one_and_not_trained():
    m = timm.create_model("cct_7_3x1_32_sine")
    assert torch.allclose(m.classifier.positional_emb, published_sine(256, 256), atol=1e-5)
    assert "classifier.positional_emb" not in dict(m.named_parameters())


def test_a_mlp_residual_from_the_normalised_stream():
    # one block, fed a stream far from normalised: norm1 must sit between the two residuals
    cfg = make_config(embed_dim=8, depth=1, num_heads=2, mlp_ratio=2, kernel_size=3, n_conv_layers=1, img_size=4,
                      in_chans=1, num_classes=3, drop_path_rate=0.0, attn_drop_rate=0.0)
    blk = CCT(cfg).eval().classifier.blocks[0]
    x = 5 + 3 * torch.randn(1, 4, 8)
    with torch.no_grad():
        h = blk.norm1(x + blk.self_attn(blk.pre_norm(x)))
        want = h + blk.linear2(F.gelu(blk.linear1(h)))
        assert torch.allclose(blk(x), want, atol=1e-6)


def test_bad_images_and_sizes_get_clear_errors():
    m = timm.create_model("cct_2_3x2_32").eval()
    with pytest.raises(ValueError, match="position embedding"):
        m(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="img_size: .* too small for the CCT tokenizer"):
        make_config(embed_dim=8, depth=1, num_heads=2, mlp_ratio=2, kernel_size=7, n_conv_layers=2, img_size=8,
                    padding=0)
    with pytest.raises(ValueError, match="positional_embedding"):
        timm.create_model("cct_2_3x2_32", positional_embedding="rope")
    for chans in ([16], [16, 0], [16, 2.0]):  # n_conv_layers=3 takes two inner widths, positive ints
        with pytest.raises(ValueError, match="conv_channels: expected 2 positive ints"):
            make_config(embed_dim=8, depth=1, num_heads=2, mlp_ratio=2, kernel_size=3, n_conv_layers=3, img_size=28,
                        conv_channels=chans)
    bad = public_keys(*PUBLISHED["cct_2_3x2_32"])
    bad["classifier.positional_emb"] = (1, 100, 128)
    with pytest.raises(RuntimeError, match="positional_emb"):
        m.load_state_dict(random_state(bad, 0))
