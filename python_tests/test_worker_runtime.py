"""`devit-ext worker --runtime`: the device's sub-model on onnxruntime / ExecuTorch sends the torch path's message.

A tiny saved DeViT; the worker's own `compute` (what it runs per micro-batch) on each runtime:
same header fields, int8 values exactly equal except a one-step difference on rounding boundaries.
"""
from __future__ import annotations

import argparse

import pytest
import torch

from _agreement import assert_int8_agree
from devit_ext import wire
from devit_ext.bench.e2e import build_devit, make_teacher
from devit_ext.engines import common, runtime, worker


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    teacher = make_teacher("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=6)
    shapes = [{"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_hidden": 64},
              {"embed_dim": 48, "depth": 3, "num_heads": 3, "mlp_hidden": 96}]
    model = build_devit(teacher, shapes, seed=2)
    with torch.no_grad():  # a non-trivial final norm, so the agreement covers its affine part
        for s in model.submodels:
            s.norm.weight.uniform_(0.5, 1.5)
            s.norm.bias.normal_(std=0.1)
    path = tmp_path_factory.mktemp("w") / "devit"
    model.save(path)
    return str(path), model


@pytest.fixture(scope="module")
def raw():
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g)


def _message(w, images, transfer="int8", dtype=torch.float32):
    buf, dt = w.compute(images, transfer, dtype, 9)
    assert dt > 0
    return wire.decode(buf, expected_hash=w.hash, device=w.index, batch_id=9, batch_size=images.shape[0],
                       num_tokens=w.tokens, width=w.width, transfer=transfer)


def _agree(path, model, raw, name):
    world = model.num_devices + 1
    for rank in (1, 2):
        ref = worker._Worker(path, rank, world, "cpu", 10.0)
        got = worker._Worker(path, rank, world, "cpu", 10.0, runtime=name)
        assert ref.runner.runtime == "torch" and got.runner.runtime == name
        a, b = _message(ref, raw), _message(got, raw)
        with torch.inference_mode():
            x = common.normalise_images(ref.model, raw)
            pre = ref.sub.sender_tokens(x)  # ViT: pre-norm prefix tokens; CCT: the pooled vector
        eps = ref.sub.sender_norm()[2]
        assert_int8_agree(a.q, a.scales, b.q, b.scales, pre, None if eps is None else ref.sub.norm)
        # fp32 transfer: the float tokens agree to fp32 rounding
        torch.testing.assert_close(_message(got, raw, "fp32").tokens, _message(ref, raw, "fp32").tokens,
                                   rtol=1e-4, atol=1e-4)


def test_onnxruntime_worker_sends_the_torch_message(saved, raw):
    pytest.importorskip("onnxruntime", reason="--runtime onnxruntime needs onnxruntime (extras: export)")
    _agree(*saved, raw, "onnxruntime")


def test_executorch_worker_sends_the_torch_message(saved, raw):
    ok, why = runtime.status("executorch")
    if not ok:
        pytest.skip(f"--runtime executorch needs executorch, not in the test extra: {why}")
    _agree(*saved, raw, "executorch")


@pytest.fixture(scope="module")
def saved_cct(tmp_path_factory):
    """A saved DeViT of 3 CCTs (two-conv tokenizer, two shapes) and uint8 images it takes."""
    from test_cct_engines import cct_devit, uint8_images

    model = cct_devit(2)
    path = tmp_path_factory.mktemp("wcct") / "devit"
    model.save(path)
    return str(path), model, uint8_images(6)


def test_onnxruntime_worker_sends_the_torch_message_for_a_cct(saved_cct):
    pytest.importorskip("onnxruntime", reason="--runtime onnxruntime needs onnxruntime (extras: export)")
    path, model, images = saved_cct
    _agree(path, model, images, "onnxruntime")
    w = worker._Worker(path, 3, 4, "cpu", 10.0, runtime="onnxruntime")
    m = _message(w, images)
    assert m.q.shape == (6, 1, model.widths[2])  # one pooled vector per image: d int8 values + a scale


def test_executorch_worker_sends_the_torch_message_for_a_cct(saved_cct):
    ok, why = runtime.status("executorch")
    if not ok:
        pytest.skip(f"--runtime executorch needs executorch, not in the test extra: {why}")
    path, model, images = saved_cct
    _agree(path, model, images, "executorch")


def test_runner_matches_the_model(saved, raw):
    pytest.importorskip("onnxruntime", reason="needs onnxruntime (extras: export)")
    _, model = saved
    x = common.normalise_images(model, raw)
    sub = model.submodels[1]
    with torch.inference_mode():
        want = sub.forward_features(x, final_norm=False)[:, :1]
        torch.testing.assert_close(runtime.SubModelRunner(sub, "torch")(x), want)
        torch.testing.assert_close(runtime.SubModelRunner(sub, "onnxruntime")(x), want, rtol=1e-5, atol=1e-5)


def test_bad_requests_say_what_is_wrong(saved, raw, monkeypatch):
    path, model = saved
    pytest.importorskip("onnxruntime", reason="needs onnxruntime (extras: export)")
    w = worker._Worker(path, 1, 3, "cpu", 10.0, runtime="onnxruntime")
    with pytest.raises(ValueError, match="float32"):
        w.compute(raw, "int8", torch.bfloat16, 0)  # the aggregator asked for bf16 compute
    with pytest.raises(ValueError, match="runtime"):
        runtime.status("tensorrt")
    with pytest.raises(ValueError, match="CPU"):
        runtime.SubModelRunner(model.submodels[0], "onnxruntime", device="meta")
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # onnxruntime no longer imports
    with pytest.raises(RuntimeError, match="onnxruntime"):
        worker._Worker(path, 1, 3, "cpu", 10.0, runtime="onnxruntime")


def test_the_flag():
    p = argparse.ArgumentParser()
    worker.add_arguments(p)
    assert p.parse_args(["--model", "m"]).runtime == "torch"
    assert p.parse_args(["--model", "m", "--runtime", "onnxruntime"]).runtime == "onnxruntime"
    with pytest.raises(SystemExit):
        p.parse_args(["--model", "m", "--runtime", "tvm"])
