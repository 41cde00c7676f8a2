"""collaborate(engine="local"): agreement with model(images), image checks, stats, caching, GPU path."""
from __future__ import annotations

import sys
import types

import pytest
import torch

import devit_ext
from devit_ext.engines import common, local
from devit_ext.model import DeViT, FusionHead, SubViT, teacher_config

from _agreement import check_int8, reference

IMG, PATCH = 32, 8


def _teacher_cfg(distilled: bool = False) -> dict:
    import timm

    name = "deit_tiny_distilled_patch16_224" if distilled else "vit_tiny_patch16_224"
    t = timm.create_model(name, pretrained=False, img_size=IMG, patch_size=PATCH, embed_dim=64, depth=2, num_heads=2,
                          num_classes=10)
    return teacher_config(t)


def _sub(tcfg: dict, d: int, blocks: list[tuple[int, int]], **flags) -> SubViT:
    c = dict(tcfg)
    c.update(embed_dim=d, blocks=[{"num_heads": h, "mlp_hidden": m} for h, m in blocks], num_classes=3, **flags)
    s = SubViT(c)
    g = torch.Generator().manual_seed(1000 + d + 7 * len(blocks) + sum(h * 13 + m for h, m in blocks))
    with torch.no_grad():
        for p in s.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for name, p in s.named_parameters():
            if name.endswith("norm.weight") or ".norm1.weight" in name or ".norm2.weight" in name or "gamma" in name:
                p.add_(1.0)
    return s


def _devit(shapes, distilled=False, **flags) -> DeViT:
    torch.manual_seed(0)
    tcfg = _teacher_cfg(distilled)
    subs = [_sub(tcfg, d, blocks, **flags) for d, blocks in shapes]
    fusion = FusionHead([s.embed_dim for s in subs], 64, 10, distilled=distilled)
    groups = [list(range(i, 10, len(subs))) for i in range(len(subs))]
    meta = {"img_size": tcfg["img_size"], "in_chans": tcfg["in_chans"], "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225]}
    return DeViT(subs, groups, fusion, meta).eval()


HOMO = [(32, [(1, 64)] * 2)] * 3
# different widths, heads, MLP, depths, and per-block uneven pruning; two models share a shape
HETERO = [(32, [(1, 64)] * 2), (48, [(2, 96), (1, 40)]), (32, [(1, 64)] * 2), (24, [(1, 32)] * 3)]


@pytest.fixture(scope="module")
def models():
    return {
        "vit-homo": _devit(HOMO),
        "vit-hetero": _devit(HETERO),
        "deit-homo": _devit(HOMO, distilled=True),
        "deit-hetero": _devit(HETERO, distilled=True),
        # layer scale, pre-norm, no qkv bias: exercises the weight folding
        "vit-ls": _devit(HOMO, layer_scale=True, pre_norm=True, qkv_bias=False),
    }


def _images(n=64, seed=0):
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["vit-homo", "vit-hetero", "deit-homo", "deit-hetero", "vit-ls"])
def test_fp32_transfer_exact(models, name):
    m = models[name]
    x = _images()
    out = devit_ext.collaborate(m, x, transfer="fp32")
    assert out.dtype == torch.float32 and out.shape == (64, 10)
    torch.testing.assert_close(out, reference(m, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["vit-homo", "vit-hetero", "deit-homo", "deit-hetero"])
def test_int8_transfer_agrees(models, name):
    m = models[name]
    x = _images(256, seed=1)
    ref = reference(m, x)
    out = devit_ext.collaborate(m, x)  # int8 by default
    err = check_int8(out, m, x, min_overall=0.98)
    # fp16 transfer is closer still
    out16 = devit_ext.collaborate(m, x, transfer="fp16")
    assert (out16 - ref).abs().max().item() <= err


@pytest.mark.parametrize("name", ["vit-homo", "deit-hetero"])
def test_uint8_images(models, name):
    m = models[name]
    x = torch.randint(0, 256, (16, 3, IMG, IMG), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    mean = torch.tensor(m.meta["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(m.meta["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = m((x.float() / 255 - mean) / std)
    out = devit_ext.collaborate(m, x, transfer="fp32")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_micro_batches(models):
    m = models["vit-hetero"]
    x = _images(13)
    full, st_full = devit_ext.collaborate(m, x, transfer="fp32", batch_size=13, return_stats=True)
    mb, st = devit_ext.collaborate(m, x, transfer="fp32", batch_size=5, return_stats=True)
    assert st.micro_batches == 3 and st_full.micro_batches == 1
    torch.testing.assert_close(mb, full, rtol=1e-5, atol=1e-5)
    # no batch_size on the CPU: micro-batches of local.CPU_CHUNK, said in the notes, same logits
    auto, st_auto = devit_ext.collaborate(m, x, transfer="fp32", return_stats=True)
    assert st_auto.micro_batches == -(-13 // local.CPU_CHUNK) > 1
    assert any(f"micro-batches of {local.CPU_CHUNK}" in n for n in st_auto.notes)
    assert not any("micro-batches of" in n for n in st_full.notes)
    torch.testing.assert_close(auto, full, rtol=1e-5, atol=1e-5)
    _, st_small = devit_ext.collaborate(m, x[: local.CPU_CHUNK], return_stats=True)
    assert st_small.micro_batches == 1
    q_full = devit_ext.collaborate(m, x)
    q_mb = devit_ext.collaborate(m, x, batch_size=4)
    torch.testing.assert_close(q_mb, q_full, rtol=1e-5, atol=1e-5)  # int8 quantises per token: batch-independent


def test_half_precision_float_images(models):
    m = models["vit-homo"]
    x = _images(8).to(torch.bfloat16)
    out = devit_ext.collaborate(m, x, transfer="fp32")
    torch.testing.assert_close(out, reference(m, x.float()), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Bad input: refused with an error naming `images`, before any engine work
# ---------------------------------------------------------------------------

BAD = {
    "size": (torch.zeros(2, 3, IMG + 8, IMG), ValueError, "input size"),
    "channels": (torch.zeros(2, 1, IMG, IMG), ValueError, "channels"),
    "dtype-int32": (torch.zeros(2, 3, IMG, IMG, dtype=torch.int32), TypeError, "dtype"),
    "dtype-bool": (torch.zeros(2, 3, IMG, IMG, dtype=torch.bool), TypeError, "dtype"),
    "nan": (torch.zeros(2, 3, IMG, IMG).index_fill_(0, torch.tensor([1]), float("nan")), ValueError, "NaN"),
    "inf": (torch.full((2, 3, IMG, IMG), float("inf")), ValueError, "Inf"),
    "3d": (torch.zeros(3, IMG, IMG), ValueError, "4-d"),
    "empty": (torch.zeros(0, 3, IMG, IMG), ValueError, "empty"),
    "not-a-tensor": ([[0.0]], TypeError, "torch.Tensor"),
}


@pytest.fixture
def no_work(monkeypatch):
    """Any engine work fails the test: local.run, the local engine, and a fake distributed engine."""
    calls = []

    def boom(*a, **k):
        calls.append(a)
        raise AssertionError("engine work started before the images were checked")

    monkeypatch.setattr(local, "run", boom)
    monkeypatch.setattr(local.LocalEngine, "__init__", boom)
    fake = types.ModuleType("devit_ext.engines.distributed")
    fake.run = boom
    monkeypatch.setitem(sys.modules, "devit_ext.engines.distributed", fake)
    return calls


@pytest.mark.parametrize("engine", ["local", "distributed"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_images_refused_before_work(models, no_work, engine, case):
    images, exc, words = BAD[case]
    with pytest.raises(exc) as e:
        devit_ext.collaborate(models["vit-homo"], images, engine=engine)
    assert "images" in str(e.value) and words in str(e.value), str(e.value)
    assert not no_work


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"engine": "cloud"}, ValueError, "engine"),
        ({"transfer": "int4"}, ValueError, "transfer"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"timeout": -1}, ValueError, "timeout"),
        ({"dtype": torch.int8}, ValueError, "dtype"),
        ({"degrade": "yes"}, TypeError, "degrade"),
    ],
)
def test_bad_arguments_refused_before_work(models, no_work, kwargs, exc, words):
    with pytest.raises(exc, match=words):
        devit_ext.collaborate(models["vit-homo"], _images(2), **kwargs)
    assert not no_work


def test_not_a_devit():
    with pytest.raises(TypeError, match="model"):
        devit_ext.collaborate(torch.nn.Linear(2, 2), _images(2))


def test_unknown_local_option(models):
    with pytest.raises(TypeError, match="unknown option"):
        devit_ext.collaborate(models["vit-homo"], _images(2), spawn=True)


def test_distributed_dispatch(models, monkeypatch):
    """engine="distributed" hands validated raw images and every option to engines.distributed.run."""
    seen = {}

    def fake_run(model, images, **opts):
        seen.update(opts, images=images)
        return torch.zeros(images.shape[0], model.num_classes), common.Stats("distributed", "cpu", "float32", "int8", 2, 3)

    fake = types.ModuleType("devit_ext.engines.distributed")
    fake.run = fake_run
    monkeypatch.setitem(sys.modules, "devit_ext.engines.distributed", fake)
    x = torch.randint(0, 256, (2, 3, IMG, IMG), dtype=torch.uint8)
    out, st = devit_ext.collaborate(models["vit-homo"], x, engine="distributed", world_size=4, timeout=5,
                                    return_stats=True)
    assert out.shape == (2, 10) and st.engine == "distributed"
    assert seen["images"] is x and seen["world_size"] == 4 and seen["timeout"] == 5.0 and seen["transfer"] == "int8"
    assert devit_ext.collaborate(models["vit-homo"], x, engine="distributed").shape == (2, 10)


# ---------------------------------------------------------------------------
# Stats and caching
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("transfer, per", [("int8", lambda d: d + 4), ("fp16", lambda d: 2 * d), ("fp32", lambda d: 4 * d)])
def test_stats(models, transfer, per):
    m = models["vit-hetero"]
    out, st = devit_ext.collaborate(m, _images(8), transfer=transfer, return_stats=True)
    assert isinstance(st, common.Stats)
    assert st.engine == "local" and st.transfer == transfer and st.num_images == 8 and st.num_devices == 4
    assert st.transfer_bytes_per_image == [per(d) for d in m.widths]
    assert st.latency_s > 0 and st.compute_s > 0 and st.fusion_s > 0
    assert st.compute_s + st.fusion_s <= st.latency_s
    assert st.throughput == pytest.approx(8 / st.latency_s)
    assert "subvit_attention" in st.op_paths and all(st.op_paths.values())
    if transfer == "int8":
        assert {"layernorm_quantize_int8", "ensemble_fusion"} <= set(st.op_paths)
    assert st.dtype == "float32" and st.device == "cpu" and st.missing_devices == [] and not st.degraded
    assert st.extra["homogeneous"] is False
    d = st.as_dict()
    assert d["total_transfer_bytes_per_image"] == sum(st.transfer_bytes_per_image)


def test_stats_distilled_two_tokens(models):
    m = models["deit-homo"]
    _, st = devit_ext.collaborate(m, _images(2), return_stats=True)
    assert st.transfer_bytes_per_image == [2 * (d + 4) for d in m.widths]
    assert st.extra["homogeneous"] is True


def test_engine_cache_and_invalidation():
    m = _devit(HOMO)
    x = _images(4)
    a = devit_ext.collaborate(m, x, transfer="fp32")
    eng = local.get_engine(m, torch.device("cpu"), torch.float32, "fp32", {})
    assert local.get_engine(m, torch.device("cpu"), torch.float32, "fp32", {}) is eng
    with torch.no_grad():
        m.fusion.head.bias.add_(1.0)  # in-place change: the cached engine must not be reused
    assert local.get_engine(m, torch.device("cpu"), torch.float32, "fp32", {}) is not eng
    b = devit_ext.collaborate(m, x, transfer="fp32")
    torch.testing.assert_close(b, a + 1.0, rtol=1e-5, atol=1e-5)


def test_message_bytes():
    assert common.message_bytes(192, "int8") == 196
    assert common.message_bytes(192, "fp16") == 384
    assert common.message_bytes(192, "fp32") == 768
    assert common.message_bytes(192, "int8", tokens=2) == 392


# ---------------------------------------------------------------------------
# GPU: bf16, CUDA graphs per batch bucket
# ---------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["vit-homo", "deit-hetero"])
def test_cuda_graphs_bf16(models, name):
    m = models[name]
    mg = _devit(HOMO if name == "vit-homo" else HETERO, distilled=name.startswith("deit")).cuda()
    x = _images(256, seed=5).cuda()
    with torch.no_grad():
        ref = m(common.normalise_images(m, x.cpu())).cuda()
        torch_bf16 = mg.to(torch.bfloat16)(x.to(torch.bfloat16)).float()
        mg.float()
    err_torch = (torch_bf16 - ref).abs().max().item()
    agree_torch = (torch_bf16.argmax(1) == ref.argmax(1)).float().mean().item()

    out, st = devit_ext.collaborate(mg, x, transfer="fp32", return_stats=True)
    assert st.dtype == "bfloat16" and st.extra["cuda_graphs"] and st.extra["buckets"] == [256]
    assert out.is_cuda and out.dtype == torch.float32
    # bf16 rule (ARCHITECTURE.md): at most 2x the error of torch doing the same in bf16
    assert (out - ref).abs().max().item() <= 2 * err_torch + 1e-6
    q = devit_ext.collaborate(mg, x)  # int8
    agree = (q.argmax(1) == ref.argmax(1)).float().mean().item()
    assert agree >= min(0.995, agree_torch - 0.005), (agree, agree_torch)

    # padded bucket: 3 images run in the bucket-4 graph and equal the first rows of a larger batch
    small, st3 = devit_ext.collaborate(mg, x[:3], transfer="fp32", return_stats=True)
    assert 4 in st3.extra["buckets"]
    eng = local.get_engine(mg, x.device, torch.bfloat16, "fp32", {})
    graph4 = eng._graphs[4]["send"]
    devit_ext.collaborate(mg, x[3:6], transfer="fp32")  # reuses the bucket-4 graph
    assert eng._graphs[4]["send"] is graph4
    eager = devit_ext.collaborate(mg, x[:3], transfer="fp32", cuda_graphs=False)
    torch.testing.assert_close(small, eager, rtol=2e-2, atol=2e-2)
    # uint8 input through the graph's static buffer
    xu = torch.randint(0, 256, (8, 3, IMG, IMG), dtype=torch.uint8, device="cuda")
    u = devit_ext.collaborate(mg, xu, transfer="fp32")
    u_eager = devit_ext.collaborate(mg, xu, transfer="fp32", cuda_graphs=False)
    torch.testing.assert_close(u, u_eager, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------
# The bench's plain-torch stacked baseline computes the same function
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("distilled", [False, True])
def test_bench_plain_stacked_baseline(distilled):
    from devit_ext.bench.e2e import PlainStacked

    m = _devit(HOMO, distilled=distilled)
    x = _images(4)
    with torch.no_grad():
        torch.testing.assert_close(PlainStacked(m)(x), m(x), rtol=1e-5, atol=1e-5)


def test_bench_build_devit_shapes():
    import timm

    from devit_ext.bench.e2e import build_devit

    t = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, patch_size=PATCH, num_classes=12,
                          embed_dim=64, depth=2, num_heads=2)
    m = build_devit(t, [{"embed_dim": 32, "depth": 2, "num_heads": 1, "mlp_hidden": 64}] * 4)
    assert m.num_devices == 4 and m.widths == [32] * 4 and m.num_classes == 12
    out = devit_ext.collaborate(m, _images(2), transfer="fp32")
    with torch.no_grad():
        torch.testing.assert_close(out, m(_images(2)), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_sender_cpu():
    m = _devit(HETERO)
    x = _images(4)
    out, st = devit_ext.collaborate(m, x, transfer="fp32", compile=True, return_stats=True)
    assert st.extra["compiled"]
    torch.testing.assert_close(out, reference(m, x), rtol=1e-4, atol=1e-5)
