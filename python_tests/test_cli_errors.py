"""Bad input to the commands: a clear error naming the flag, exit status 2, nothing written half."""
from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _cli_data import TEACHER, TEACHER_KWARGS, kwargs_flags, write_imagefolder  # noqa: E402

from devit_ext.cli import main  # noqa: E402


def _teacher_file(path, **over):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    t = timm.create_model(TEACHER, pretrained=False, **dict(TEACHER_KWARGS, **over))
    save_file({k: v.contiguous() for k, v in t.state_dict().items()}, path)
    return t


@pytest.fixture
def setup(tmp_path):
    data = write_imagefolder(str(tmp_path / "data"), per_split=(("train", 2), ("val", 1)))
    ckpt = str(tmp_path / "t.safetensors")
    _teacher_file(ckpt)
    return tmp_path, data, ckpt


def _decompose(ckpt, out, *extra, kwargs=None):
    return ["decompose", "--teacher", TEACHER, "--teacher-checkpoint", ckpt, "--model-kwargs",
            *(kwargs or kwargs_flags()), "--devices", "2", "--out", str(out), *extra]


def _fails(argv, capsys, *words):
    assert main(argv) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, err
    return err


def test_data_problems_are_named_before_any_work(setup, capsys):
    tmp, data, ckpt = setup
    out = tmp / "run"
    _fails(_decompose(ckpt, out, "--data", data, "--split", "test"), capsys, "--data", "test", "does not exist")
    empty = tmp / "d_empty"
    shutil.copytree(data, empty)
    for f in os.listdir(empty / "train" / "cat"):
        os.unlink(empty / "train" / "cat" / f)
    _fails(_decompose(ckpt, out, "--data", str(empty)), capsys, "--data", "cat", "has no images")
    junk = tmp / "d_junk"
    shutil.copytree(data, junk)
    (junk / "train" / "dog" / "notes.txt").write_text("not a picture")
    _fails(_decompose(ckpt, out, "--data", str(junk)), capsys, "--data", "notes.txt", "not an image file")
    five = write_imagefolder(str(tmp / "d5"), per_split=(("train", 1),), classes=["a", "b", "c", "d", "e"])
    _fails(_decompose(ckpt, out, "--data", five), capsys, "--data", "5 class folders", "num_classes=6")
    assert not out.exists()


def test_teacher_problems_name_their_flag(setup, capsys):
    tmp, data, ckpt = setup
    out = tmp / "run"
    _fails(_decompose(ckpt, out, kwargs=kwargs_flags(not_a_kwarg=1)), capsys, "--model-kwargs", "not_a_kwarg")
    _fails(_decompose(ckpt, out, kwargs=kwargs_flags(embed_dim=48, num_heads=3)), capsys,
           "--teacher-checkpoint", "does not fit", "embed_dim=48")
    _fails(["decompose", "--teacher", "vit_nonexistent_model", "--devices", "2", "--out", str(out)], capsys,
           "--teacher", "not a timm model name")
    pickled = tmp / "whole_model.pth"
    torch.save(_teacher_file(str(tmp / "other.safetensors")), pickled)  # a pickled nn.Module, not a state dict
    _fails(_decompose(str(pickled), out), capsys, "--teacher-checkpoint", "weights_only=True", "never unpickled")
    _fails(_decompose(ckpt, out, "--budgets", "0.2"), capsys, "--budgets", "one per device")
    _fails(_decompose(ckpt, out, "--budgets", "0.2", "speed=3"), capsys, "--budgets", "latency_ms=X", "'speed=3'")
    _fails(_decompose(ckpt, out, "--budgets", "0.2", "latency=fast"), capsys, "--budgets", "'latency=fast'")
    _fails(_decompose(ckpt, out, "--budgets", "0.2", "latency=2"), capsys, "budgets[1]", "latency is a fraction")
    assert not out.exists()
    # a torch file of plain tensors loads with weights_only=True
    from safetensors.torch import load_file

    pth = tmp / "state.pth"
    torch.save(load_file(ckpt), pth)
    assert main(_decompose(str(pth), out)) == 0 and (out / "decomposed").is_dir()
    _fails(_decompose(ckpt, out), capsys, "--out", "--overwrite")


def test_changed_checkpoint_is_refused_by_its_hash(setup, capsys):
    tmp, data, ckpt = setup
    out = tmp / "run"
    assert main(_decompose(ckpt, out, "--data", data)) == 0
    capsys.readouterr()
    _teacher_file(ckpt, embed_dim=32)  # same architecture, other init seed -> other bytes
    from safetensors.torch import load_file, save_file

    st = load_file(ckpt)
    st["head.bias"] = st["head.bias"] + 1.0
    save_file(st, ckpt)
    _fails(["train", str(out), "--data", data, "--epochs", "1", "1", "--no-progress"], capsys,
           "--teacher-checkpoint", "changed since decompose", "sha256")
    _fails(["evaluate", str(out), "--data", data, "--model", "decomposed"], capsys, "changed since decompose")
    assert not (out / "model").exists() and not (out / "checkpoints").exists()


def test_run_and_split_problems(setup, capsys):
    tmp, data, ckpt = setup
    out = tmp / "run"
    _fails(["train", str(tmp / "nowhere"), "--data", data], capsys, "not a devit-ext run directory")
    assert main(_decompose(ckpt, out, "--data", data)) == 0
    capsys.readouterr()
    _fails(["train", str(out), "--data", data, "--val-split", "holdout"], capsys, "--val-split", "holdout")
    _fails(["train", str(out)], capsys, "--data", "required")
    _fails(["evaluate", str(out), "--data", data], capsys, "model", "devit-ext train RUN first")
    renamed = write_imagefolder(str(tmp / "d_other"), per_split=(("val", 1),), classes=list("abcdef"))
    _fails(["evaluate", str(out), "--data", renamed, "--model", "decomposed"], capsys,
           "--split", "differ from the ones decompose recorded")
    _fails(["export", str(out), "--format", "onnx", "--out", str(tmp / "x"), "--check-images", "0"], capsys,
           "--check-images")
    assert not (tmp / "x").exists()
