"""The user's path end to end: decompose (as a subprocess of `python -m devit_ext`) -> train -> evaluate -> export.

One module-scoped run (tiny PNG ImageFolder, timm teacher fitted for a few steps
and saved as safetensors) feeds every test here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _child import child_env  # noqa: E402
from _cli_data import CLASSES, TEACHER, kwargs_flags, train_teacher_file, write_imagefolder  # noqa: E402

from devit_ext.cli import main  # noqa: E402

TRAIN = ["--epochs", "1", "1", "--batch-size", "16", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    data = write_imagefolder(str(base / "data"))
    ckpt = train_teacher_file(str(base / "teacher.safetensors"), data, steps=15)
    out = str(base / "run")
    env = child_env()
    proc = subprocess.run(
        [sys.executable, "-m", "devit_ext", "decompose", "--teacher", TEACHER, "--teacher-checkpoint", ckpt,
         "--model-kwargs", *kwargs_flags(), "--devices", "2", "--data", data, "--out", out],
        capture_output=True, text=True, env=env, timeout=300, cwd=str(base))
    assert proc.returncode == 0, proc.stderr
    assert "decompose: wrote" in proc.stdout
    assert main(["train", out, "--data", data, *TRAIN]) == 0
    return {"base": base, "data": data, "ckpt": ckpt, "run": out}


def _val(run):
    from devit_ext.imagefolder import as_tensors, load_split
    from devit_ext.run_dir import read_run

    ds = load_split(run["data"], "val", read_run(run["run"])["data_config"])
    return as_tensors(ds)


def test_decompose_and_train_write_the_run(run):
    import yaml

    import devit_ext

    r = run["run"]
    rec = json.load(open(os.path.join(r, "run.json")))
    assert rec["classes"] == CLASSES and rec["num_classes"] == 6
    assert rec["teacher"]["name"] == TEACHER and rec["teacher"]["kwargs"]["embed_dim"] == 32
    assert len(rec["teacher"]["sha256"]) == 64 and rec["data_config"]["input_size"] == [1, 16, 16]
    trained = devit_ext.load(os.path.join(r, "model"))
    before = devit_ext.load(os.path.join(r, "decomposed"))
    assert trained.num_devices == 2 and trained.class_groups == before.class_groups
    assert trained.content_hash() != before.content_hash()  # training changed the weights
    assert trained.meta["mean"] == [0.5] and trained.meta["std"] == [0.5]  # 1-channel preprocessing recorded
    args = yaml.safe_load(open(os.path.join(r, "args.yaml")))
    assert args["decompose"]["devices"] == 2 and args["train"]["epochs"] == [1, 1]
    hist = json.load(open(os.path.join(r, "history.json")))
    assert len(hist["distill"]) == 1 and len(hist["ensemble"]) == 1


def test_train_resume_continues_the_same_run(run):
    import devit_ext

    path = os.path.join(run["run"], "model")
    h0 = devit_ext.load(path).content_hash()
    assert main(["train", run["run"], "--data", run["data"], *TRAIN, "--resume"]) == 0
    assert devit_ext.load(path).content_hash() == h0  # the finished run has nothing left to do
    # other settings are another run: refused, the model untouched
    assert main(["train", run["run"], "--data", run["data"], "--epochs", "1", "2", "--batch-size", "16",
                 "--no-progress", "--resume"]) == 2
    assert devit_ext.load(path).content_hash() == h0


def test_evaluate_json_matches_collaborate(run, capsys):
    import devit_ext

    js, png = str(run["base"] / "eval.json"), str(run["base"] / "eval.png")
    assert main(["evaluate", run["run"], "--data", run["data"], "--json", js, "--plot", png,
                 "--latency-repeats", "2"]) == 0
    table = capsys.readouterr().out
    assert "DeViT int8 tokens" in table and "teacher" in table
    out = json.load(open(js))
    x, y = _val(run)
    model = devit_ext.load(os.path.join(run["run"], "model"))
    for transfer in ("fp32", "int8"):
        acc = int((devit_ext.collaborate(model, x, transfer=transfer).argmax(-1) == y).sum()) / len(y)
        assert out["devit"][transfer]["top1"] == pytest.approx(acc, abs=1e-9)
    assert out["num_images"] == len(y) == 18
    assert [m["k"] for m in out["missing"]] == [0, 1] and out["missing"][1]["subsets"] == 2
    from devit_ext.evaluate import accuracy

    for k, sub in ((0, []), (1, [0]), (1, [1])):
        assert accuracy(model, (x, y), transfer="int8", missing=sub) == pytest.approx(
            out["devices"][sub[0]]["top1_without_this_device"] if sub else out["missing"][0]["mean_top1"], abs=1e-9)
    assert out["missing"][1]["mean_top1"] == pytest.approx(
        sum(d["top1_without_this_device"] for d in out["devices"]) / 2, abs=1e-9)
    d0 = out["devices"][0]
    assert d0["bytes_per_image"]["int8"] == model.widths[0] + 4 and d0["latency_ms"] > 0
    assert 0 <= d0["own_classes_top1"] <= 1 and d0["class_names"] == [CLASSES[c] for c in d0["classes"]]
    assert out["teacher"]["top1"] > 1 / 6 and out["teacher"]["top5"] >= out["teacher"]["top1"]  # fitted: above chance
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_export_onnx_runs_in_onnxruntime_and_matches_pytorch(run, capsys):
    ort = pytest.importorskip("onnxruntime")
    import devit_ext

    out = str(run["base"] / "onnx")
    assert main(["export", run["run"], "--format", "onnx", "--out", out, "--data", run["data"]]) == 0
    assert "top-1 agreement 100.0%" in capsys.readouterr().out
    man = json.load(open(os.path.join(out, "manifest.json")))
    model = devit_ext.load(os.path.join(run["run"], "model"))
    assert man["content_hash"] == model.content_hash() and man["opset"] >= 17
    assert man["preprocess"]["img_size"] == [16, 16] and man["preprocess"]["mean"] == [0.5]
    assert [d["width"] for d in man["devices"]] == model.widths
    x, _ = _val(run)
    x = x[:5]  # a batch size the export never saw: the batch axis is dynamic
    tokens = []
    for d in man["devices"]:
        s = ort.InferenceSession(os.path.join(out, d["path"]), providers=["CPUExecutionProvider"])
        assert [i.name for i in s.get_inputs()] == [d["input"]] and [o.name for o in s.get_outputs()] == [d["output"]]
        tokens.append(s.run(None, {d["input"]: x.numpy()})[0])
    f = man["fusion"]
    s = ort.InferenceSession(os.path.join(out, f["path"]), providers=["CPUExecutionProvider"])
    import numpy as np

    logits = torch.from_numpy(s.run(None, {f["input"]: np.concatenate(tokens, axis=-1)})[0])
    with torch.no_grad():
        ref = model(x)
    assert logits.shape == ref.shape
    assert float((logits - ref).abs().max()) <= 1e-4
    # the check that export runs catches files that are not the model's
    from devit_ext.export import ExportError, check_parity

    with torch.no_grad():
        model.submodels[1].norm.bias.add_(0.01)
    with pytest.raises(ExportError, match="device1.onnx"):
        check_parity(model, out, man, x)
