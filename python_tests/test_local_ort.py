"""The local engine's onnxruntime sender (engines/ort_sender.py) against its torch sender.

One tiny DeViT (the export takes a few seconds per engine); int8 tokens equal
except on rounding boundaries, logits within fp32 tolerance, the path reported,
and a visible fallback when onnxruntime does not import.
"""
from __future__ import annotations

import sys

import pytest
import torch

from devit_ext.bench.e2e import build_devit, make_teacher
from _agreement import assert_int8_agree
from devit_ext import build_info
from devit_ext.engines import collaborate, local, ort_sender

ORT = pytest.importorskip("onnxruntime", reason="the onnxruntime sender needs onnxruntime (extras: export)")


@pytest.fixture(scope="module")
def model():
    teacher = make_teacher("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=8)
    # two shapes: the torch sender runs two stacked groups, onnxruntime one graph
    shapes = [{"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_hidden": 64}] * 2 + \
             [{"embed_dim": 48, "depth": 3, "num_heads": 3, "mlp_hidden": 96}]
    torch.manual_seed(0)
    return build_devit(teacher, shapes, seed=1)


@pytest.fixture(scope="module")
def images(model):
    g = torch.Generator().manual_seed(3)
    return torch.randn(5, 3, 32, 32, generator=g)


def _engines(model, transfer="int8"):
    dev = torch.device("cpu")
    ref = local.get_engine(model, dev, torch.float32, transfer, {"backend": "torch"})
    ort = local.get_engine(model, dev, torch.float32, transfer, {"backend": "onnxruntime"})
    return ref, ort


def test_int8_tokens_equal_except_on_rounding_boundaries(model, images):
    ref, ort = _engines(model)
    assert ref is not ort and ort.backend == "onnxruntime" and ref.backend == "torch"
    with torch.inference_mode():
        pre_ref, pre_ort = ref._sender(images), ort._sender(images)
        m_ref, m_ort = ref.send(images), ort.send(images)
    for a, b, x, sub in zip(m_ref, m_ort, pre_ref, model.submodels):
        assert_int8_agree(a.q, a.scales, b.q, b.scales, x, sub.norm)
    for x, y in zip(pre_ref, pre_ort):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)


def test_logits_match_the_torch_path_and_the_model(model, images):
    a = collaborate(model, images, backend="onnxruntime")
    b = collaborate(model, images, backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    # the graph's pre-norm tokens are the model's own (fp32 rounding apart)
    _, ort = _engines(model)
    with torch.inference_mode():
        got = ort._sender(images)
        for sub, g in zip(model.submodels, got):
            want = sub.forward_features(images, final_norm=False)[:, : sub.num_prefix_tokens]
            torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5)


def test_uint8_images_and_micro_batches(model):
    raw = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    a = collaborate(model, raw, backend="onnxruntime", batch_size=2)
    b = collaborate(model, raw, backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_the_path_is_reported(model, images):
    _, st = collaborate(model, images, backend="onnxruntime", return_stats=True)
    assert st.extra["sender_backend"] == "onnxruntime"
    assert any(f"onnxruntime {ORT.__version__}" in n for n in st.notes)
    assert "subvit_attention" not in st.op_paths and "layernorm_quantize_int8" in st.op_paths
    _, st = collaborate(model, images, return_stats=True)
    assert st.extra["sender_backend"] == "torch" and "subvit_attention" in st.op_paths


def test_falls_back_visibly_without_onnxruntime(model, images, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    local.clear_cache()
    ok, why = ort_sender.available()
    assert not ok and "onnxruntime" in why
    out, st = collaborate(model, images, backend="auto", return_stats=True)
    assert st.extra["sender_backend"] == "torch"
    assert any("auto: torch, measured faster" in n for n in st.notes)
    torch.testing.assert_close(out, collaborate(model, images, backend="torch"))
    with pytest.raises(RuntimeError, match="onnxruntime"):
        collaborate(model, images, backend="onnxruntime")
    info = build_info()  # build_info says the same: no onnxruntime, and auto runs on torch
    assert info["onnxruntime"] is None and "onnxruntime" in info["onnxruntime_error"]
    assert info["local_backend_cpu"].startswith("torch (auto: torch, measured faster")
    local.clear_cache()


def test_build_info_names_onnxruntime_and_the_auto_backend():
    info = build_info()
    assert info["onnxruntime"] == ORT.__version__ and info["onnxruntime_error"] is None
    # onnxruntime imports here, and auto still takes torch: the faster sender on this CPU (docs/perf-notes.md)
    assert info["local_backend_cpu"].startswith("torch (auto: torch, measured faster")


def test_bad_backend_requests(model, images):
    with pytest.raises(ValueError, match="backend"):
        collaborate(model, images, backend="tensorrt")
    with pytest.raises(ValueError, match="compile"):
        collaborate(model, images, backend="onnxruntime", compile=True)
    with pytest.raises(ValueError, match="float32"):
        collaborate(model, images, backend="onnxruntime", dtype=torch.float64)
