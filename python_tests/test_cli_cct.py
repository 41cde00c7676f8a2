"""The user's path with a CCT teacher: `devit-ext decompose --teacher cct_2_3x2_32` (a timm name registered by
devit_ext, weights from a local safetensors file) -> train -> evaluate -> export, in process.

The ViT path is test_cli_pipeline.py; this file checks what differs for a CCT: the run records the CCT,
the sub-models are SubCCTs, a device sends its pooled vector (d + 4 bytes in int8), and the exported
device files compute that vector.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _cli_data import CCT_KWARGS, CCT_TEACHER, kwargs_flags, train_teacher_file, write_imagefolder  # noqa: E402

from devit_ext.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli_cct")
    data = write_imagefolder(str(base / "data"))
    ckpt = train_teacher_file(str(base / "cct.safetensors"), data, steps=10, name=CCT_TEACHER, base=CCT_KWARGS)
    out = str(base / "run")
    assert main(["decompose", "--teacher", CCT_TEACHER, "--teacher-checkpoint", ckpt, "--model-kwargs",
                 *kwargs_flags(base=CCT_KWARGS), "--devices", "2", "--data", data, "--out", out]) == 0
    assert main(["train", out, "--data", data, "--epochs", "1", "1", "--batch-size", "16", "--no-progress"]) == 0
    return {"base": base, "data": data, "run": out}


def test_decompose_and_train_a_cct_teacher(run):
    import devit_ext
    from devit_ext.cct import SubCCT

    rec = json.load(open(os.path.join(run["run"], "run.json")))
    assert rec["teacher"]["name"] == CCT_TEACHER and rec["data_config"]["input_size"] == [1, 16, 16]
    trained = devit_ext.load(os.path.join(run["run"], "model"))
    before = devit_ext.load(os.path.join(run["run"], "decomposed"))
    assert all(isinstance(s, SubCCT) for s in trained.submodels) and trained.meta["backbone"] == "cct"
    assert trained.content_hash() != before.content_hash()  # training changed the weights
    assert trained.meta["mean"] == [0.4914] and trained.meta["std"] == [0.247]  # the variant's, one channel


def test_evaluate_a_cct_run(run, capsys):
    js = str(run["base"] / "eval.json")
    assert main(["evaluate", run["run"], "--data", run["data"], "--json", js, "--latency-repeats", "1"]) == 0
    assert "DeViT int8 tokens" in capsys.readouterr().out
    out = json.load(open(js))
    import devit_ext

    model = devit_ext.load(os.path.join(run["run"], "model"))
    assert out["num_images"] == 18 and out["teacher"]["name"] == CCT_TEACHER
    assert [d["bytes_per_image"]["int8"] for d in out["devices"]] == [w + 4 for w in model.widths]
    assert out["teacher"]["flops"] == model.meta["teacher_flops"] > sum(model.flops())


def test_export_a_cct_run_to_onnx(run, capsys):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import devit_ext
    from devit_ext.imagefolder import as_tensors, load_split
    from devit_ext.run_dir import read_run

    out = str(run["base"] / "onnx")
    assert main(["export", run["run"], "--format", "onnx", "--out", out, "--data", run["data"]]) == 0
    assert "top-1 agreement 100.0%" in capsys.readouterr().out
    man = json.load(open(os.path.join(out, "manifest.json")))
    model = devit_ext.load(os.path.join(run["run"], "model"))
    assert [d["output_shape"] for d in man["devices"]] == [["batch", w] for w in model.widths]
    x, _ = as_tensors(load_split(run["data"], "val", read_run(run["run"])["data_config"]))
    s = ort.InferenceSession(os.path.join(out, man["devices"][1]["path"]), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = model.submodels[1].forward_tokens(x[:3])
    torch.testing.assert_close(torch.from_numpy(s.run(None, {"images": x[:3].numpy()})[0]), want,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs,words", [
    (["embed_dim=64"], ["--model-kwargs", "embed_dim"]),  # not a CCT variant's argument
    (["img_size=0"], ["--model-kwargs", "img_size", "too small for the CCT tokenizer"]),  # no tokens left
])
def test_bad_cct_teacher_arguments_are_named(tmp_path, capsys, kwargs, words):
    from test_cli_errors import _fails

    _fails(["decompose", "--teacher", CCT_TEACHER, "--model-kwargs", *kwargs, "--devices", "2",
            "--out", str(tmp_path / "r")], capsys, *words)
    assert not (tmp_path / "r").exists()
