"""devit_ext.export: per-device programs equal the PyTorch path; the int8 message without torch; ExecuTorch."""
from __future__ import annotations

import json
import os

import pytest
import torch

from devit_ext.export import DeviceTokens, ExportError, FusionFromTokens, check_parity, export_model, token_message


def _model(distilled=False, n=2):
    from devit_ext.decomposition import decompose
    from devit_ext.teacher import build_teacher

    t = build_teacher(img_size=8, patch_size=4, in_chans=1, num_classes=4, embed_dim=16, depth=1, num_heads=2,
                      distilled=distilled)
    return decompose(t.eval(), n).eval()


def test_wrappers_are_the_device_token_and_the_fusion():
    m = _model(distilled=True)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        toks = [DeviceTokens(s)(x) for s in m.submodels]
        assert toks[0].shape == (3, 2, m.widths[0])  # cls + distillation token after the final norm
        assert torch.equal(FusionFromTokens(m.fusion)(torch.cat(toks, -1)), m(x))


def test_token_message_is_quantize_int8_byte_for_byte():
    from devit_ext.ops import quantize_int8

    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 33, generator=g) * torch.logspace(-3, 2, 7)[:, None]
    x[3] = 0.0
    x[4, 5] = 127.5 * x[4].abs().max() / 127  # a value on a rounding edge
    q, s = quantize_int8(x)
    s2, q2 = token_message(x.numpy())
    assert s2.dtype.name == "float32" and q2.dtype.name == "int8"
    assert s.numpy().tobytes() == s2.tobytes() and q.numpy().tobytes() == q2.tobytes()


def test_device_message_is_what_the_aggregator_decodes():
    from devit_ext import wire
    from devit_ext.export import device_message, wire_spec
    from devit_ext.ops import quantize_int8

    m = _model(distilled=True)
    spec = wire_spec(m.content_hash())
    with torch.no_grad():
        tok = m.submodels[1].forward_tokens(torch.randn(3, 1, 8, 8))  # (3, 2, d)
    msg = device_message(spec, tok.numpy(), device=1, batch_id=7)
    q, s = quantize_int8(tok)
    ref = wire.encode(m.content_hash(), 1, 7, q=q, scales=s)
    assert msg == ref.numpy().tobytes()
    dec = wire.decode(torch.frombuffer(bytearray(msg), dtype=torch.uint8), expected_hash=m.content_hash(), device=1)
    assert dec.batch_id == 7 and torch.allclose(dec.dequantized(), tok, atol=float(s.max()))


@pytest.mark.slow
def test_onnx_export_of_a_distilled_model_passes_parity(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    m = _model(distilled=True, n=1)
    man = export_model(m, str(tmp_path), "onnx")
    assert man["devices"][0]["output_shape"] == ["batch", 2, m.widths[0]]
    rep = check_parity(m, str(tmp_path), man, torch.randn(4, 1, 8, 8))
    assert rep["fusion"]["top1_agreement"] == 1.0 and rep["devices"][0]["max_abs_diff"] < 1e-4
    # a file that is not the model's is caught
    with torch.no_grad():
        m.fusion.head.bias.add_(1.0)
    with pytest.raises(ExportError, match="parity"):
        check_parity(m, str(tmp_path), man, torch.randn(4, 1, 8, 8))


def test_unknown_format_is_named():
    with pytest.raises(ExportError, match="--format"):
        export_model(_model(), "/nonexistent", "tflite")


@pytest.mark.slow
def test_executorch_export_runs_in_its_runtime(tmp_path):
    pytest.importorskip("executorch")
    from devit_ext.cli import main

    m = _model(n=2)
    run = tmp_path / "run"
    # a RUN by hand: the decomposed model plus run.json, as decompose writes them
    from devit_ext.run_dir import RUN_FORMAT, write_json

    m.save(run / "decomposed")
    write_json(str(run / "run.json"), {"format": RUN_FORMAT, "num_classes": 4, "classes": None,
                                       "teacher": {"name": "x", "kwargs": {}, "checkpoint": None, "sha256": None},
                                       "data_config": {"input_size": [1, 8, 8], "mean": [0.5], "std": [0.5],
                                                       "interpolation": "bicubic", "crop_pct": 1.0,
                                                       "crop_mode": "center"}})
    out = tmp_path / "et"
    assert main(["export", str(run), "--model", "decomposed", "--format", "executorch", "--out", str(out)]) == 0
    man = json.load(open(out / "manifest.json"))
    assert [d["path"] for d in man["devices"]] == ["device0.pte", "device1.pte"] and man["backend"] == "xnnpack"
    assert man["parity"]["fusion"]["top1_agreement"] == 1.0
    assert all(os.path.getsize(out / d["path"]) > 0 for d in man["devices"])


def test_onnx_export_of_a_cct_devit_agrees_with_torch_and_sends_the_workers_message(tmp_path):
    """Each device's CCT program (tokenizer convs .. sequence pooling) in onnxruntime: its pooled vector equals
    torch's, and the message built from it without torch is the one the torch worker sends, up to rounding."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import numpy as np

    from _agreement import assert_int8_agree
    from devit_ext import protocol, wire
    from devit_ext.engines import common
    from devit_ext.export import device_message
    from test_cct_engines import cct_devit, uint8_images

    m = cct_devit(2)
    man = export_model(m, str(tmp_path), "onnx")
    assert [d["output_shape"] for d in man["devices"]] == [["batch", w] for w in m.widths]
    assert man["devices"][0]["input_shape"] == ["batch", 3, 16, 16] and man["tokens_per_device"] == 1
    x = common.normalise_images(m, uint8_images(5))  # a batch size the export never saw
    rep = check_parity(m, str(tmp_path), man, x)
    assert rep["fusion"]["top1_agreement"] == 1.0
    tokens = []
    for d, sub in zip(man["devices"], m.submodels):
        s = ort.InferenceSession(str(tmp_path / d["path"]), providers=["CPUExecutionProvider"])
        tok = s.run(None, {d["input"]: x.numpy()})[0]
        with torch.no_grad():
            ref = sub.sender_tokens(x)  # (B, 1, d): what the torch worker quantises
        torch.testing.assert_close(torch.from_numpy(tok), ref[:, 0], rtol=1e-5, atol=1e-5)
        got = wire.decode(torch.frombuffer(bytearray(device_message(man["wire"], tok, d["device"], 3)),
                                           dtype=torch.uint8), expected_hash=m.content_hash(), device=d["device"])
        want = protocol.encode(ref, *sub.sender_norm(), "int8")
        assert got.batch_id == 3 and got.q.shape == (5, 1, d["width"])
        assert_int8_agree(want.q, want.scales, got.q, got.scales, ref, None)
        tokens.append(tok)
    s = ort.InferenceSession(str(tmp_path / man["fusion"]["path"]), providers=["CPUExecutionProvider"])
    logits = s.run(None, {"tokens": np.concatenate(tokens, axis=-1)})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), m(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_executorch_export_of_a_cct_devit_runs_in_its_runtime(tmp_path):
    pytest.importorskip("executorch")
    from devit_ext.engines import common
    from test_cct_engines import cct_devit, uint8_images

    m = cct_devit(1, "sine")
    man = export_model(m, str(tmp_path), "executorch")
    assert [d["path"] for d in man["devices"]] == ["device0.pte", "device1.pte", "device2.pte"]
    rep = check_parity(m, str(tmp_path), man, common.normalise_images(m, uint8_images(5)))
    assert rep["fusion"]["top1_agreement"] == 1.0 and max(d["max_abs_diff"] for d in rep["devices"]) < 1e-4
