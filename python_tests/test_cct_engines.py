"""A DeViT of CCTs through the engines: the local engine's stacks (grouped tokenizer convs, batched blocks,
stacked pooling) and the distributed workers agree with the plain float path and the int8 semantics."""
from __future__ import annotations

import faulthandler

import pytest
import torch

import devit_ext
from devit_ext.cct import make_config
from devit_ext.engines import common

from _agreement import check_int8, reference
from test_cct_decompose import random_cct


@pytest.fixture(autouse=True)
def _watchdog():
    faulthandler.dump_traceback_later(240, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def cct_devit(convs=2, pos="learnable", seed=0):
    cfg = make_config(embed_dim=32, depth=3, num_heads=2, mlp_ratio=2, kernel_size=3, n_conv_layers=convs,
                      img_size=16, in_chans=3, num_classes=9, positional_embedding=pos)
    t = random_cct(cfg, seed)
    small = {"embed_dim": 16, "depth": 2, "num_heads": 1, "mlp_hidden": 24}
    if convs > 1:
        small["conv_channels"] = [24]
    # devices 0 and 1 share a shape (one stacked group), device 2 is smaller (its own group)
    return devit_ext.decompose(t, 3, budgets=[0.4, 0.4, small]).eval()


def uint8_images(n, seed=1):
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("convs,pos", [(2, "learnable"), (1, "sine")])
def test_local_engine_stacks_cct_sub_models_and_agrees(convs, pos):
    m = cct_devit(convs, pos)
    x = uint8_images(64)
    out, st = devit_ext.collaborate(m, x, transfer="fp32", return_stats=True)
    torch.testing.assert_close(out, reference(m, x), rtol=1e-5, atol=1e-5)
    assert st.extra["homogeneous"] is False and "2 stacked shape group(s): [[0, 1], [2]]" in st.notes
    assert any("CCT: stacked grouped convs" in n for n in st.notes)
    out, st = devit_ext.collaborate(m, x, transfer="int8", return_stats=True)
    check_int8(out, m, x)
    assert st.transfer_bytes_per_image == [w + 4 for w in m.widths]
    assert "quantize_int8" in st.op_paths and "layernorm_quantize_int8" not in st.op_paths


def test_local_engine_onnxruntime_sender_runs_ccts_and_auto_keeps_them_on_torch():
    pytest.importorskip("onnxruntime", reason="the onnxruntime sender needs onnxruntime (extras: export)")
    m = cct_devit(2)
    x = uint8_images(24)
    out, st = devit_ext.collaborate(m, x, transfer="int8", backend="onnxruntime", return_stats=True)
    check_int8(out, m, x)  # each session gives the pooled vector; int8 quantisation alone is left
    assert st.extra["sender_backend"] == "onnxruntime" and "one onnxruntime session per sub-model" in st.notes
    assert st.transfer_bytes_per_image == [w + 4 for w in m.widths]
    # (fp32 agreement of these programs with torch: test_worker_runtime.py, the same ort_sender.sender_module)
    _, st = devit_ext.collaborate(m, x[:2], backend="auto", return_stats=True)
    assert st.extra["sender_backend"] == "torch" and any("CCT: stacked grouped convs" in n and "auto: torch" in n
                                                         for n in st.notes)


def test_local_engine_refuses_bad_images_for_ccts():
    m = cct_devit(1)
    with pytest.raises(ValueError, match="images"):
        devit_ext.collaborate(m, torch.zeros(2, 3, 24, 24, dtype=torch.uint8))


def test_evaluate_accuracy_runs_the_cct_devit_through_each_engine():
    from devit_ext.evaluate import accuracy

    m = cct_devit(1)
    x, y = common.normalise_images(m, uint8_images(40)), torch.arange(40) % 9
    a_float = accuracy(m, (x, y))
    a_local = accuracy(m, (x, y), engine="local", transfer="fp32")
    assert a_float == a_local


@pytest.mark.slow
def test_distributed_workers_agree_with_the_local_engine():
    from devit_ext.engines import distributed as D

    m = cct_devit(2)
    x = uint8_images(60)
    try:
        out, st = D.run(m, x, spawn=True, transfer="int8", batch_size=30, timeout=60)
        check_int8(out, m, x)
        local = devit_ext.collaborate(m, x, transfer="int8")
        assert (out.argmax(1) == local.argmax(1)).float().mean() >= 0.98
        torch.testing.assert_close(out, local, rtol=1e-3, atol=1e-3)
        assert st.transfer_bytes_per_image == [w + 4 for w in m.widths]
        out, _ = D.run(m, x[:20], spawn=True, transfer="fp32", timeout=60)
        torch.testing.assert_close(out, reference(m, x[:20]), rtol=1e-5, atol=1e-5)
    finally:
        D.shutdown()
