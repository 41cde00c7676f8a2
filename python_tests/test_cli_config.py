"""-c CONFIG.yaml: defaults for any long flag, flags win, RUN/args.yaml records what ran and can be fed back."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import yaml

sys.path.insert(0, os.path.dirname(__file__))
from _cli_data import TEACHER, TEACHER_KWARGS, kwargs_flags, write_imagefolder  # noqa: E402

from devit_ext.cli import main  # noqa: E402


@pytest.fixture
def ckpt(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    t = timm.create_model(TEACHER, pretrained=False, **TEACHER_KWARGS)
    path = str(tmp_path / "t.safetensors")
    save_file({k: v.contiguous() for k, v in t.state_dict().items()}, path)
    return path


def test_config_supplies_defaults_and_flags_win(tmp_path, ckpt):
    import devit_ext

    data = write_imagefolder(str(tmp_path / "data"), per_split=(("train", 1),))
    cfg = tmp_path / "decompose.yaml"
    cfg.write_text(yaml.safe_dump({"teacher": TEACHER, "teacher-checkpoint": ckpt, "model_kwargs": kwargs_flags(),
                                   "devices": 3, "partition": "random", "seed": 5, "data": data}))
    run = tmp_path / "run"
    assert main(["decompose", "-c", str(cfg), "--devices", "2", "--out", str(run)]) == 0
    model = devit_ext.load(run / "decomposed")
    assert model.num_devices == 2  # the flag beat the file's 3
    assert model.meta["seed"] == 5  # the file's value where no flag was given
    rec = yaml.safe_load(open(run / "args.yaml"))["decompose"]
    assert rec["devices"] == 2 and rec["seed"] == 5 and rec["teacher_checkpoint"] == ckpt
    # RUN/args.yaml reproduces the run: its decompose section is picked from the file
    again = tmp_path / "again"
    assert main(["decompose", "-c", str(run / "args.yaml"), "--out", str(again)]) == 0
    assert devit_ext.load(again / "decomposed").content_hash() == model.content_hash()


def test_config_errors(tmp_path, ckpt, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("devices: 2\nnot_a_flag: 1\n")
    assert main(["decompose", "-c", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "-c/--config" in err and "not_a_flag" in err
    assert main(["decompose", "-c", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    bad.write_text("- a list\n- not a mapping\n")
    assert main(["decompose", "-c", str(bad)]) == 2
    assert "mapping" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_model_kwargs_parse_like_timm():
    from devit_ext.run_dir import RunError, parse_kwargs

    assert parse_kwargs(["img_size=32", "drop_rate=0.1", "class_token=True", "act_layer=gelu", "x=(1, 2)"]) == {
        "img_size": 32, "drop_rate": 0.1, "class_token": True, "act_layer": "gelu", "x": (1, 2)}
    with pytest.raises(RunError, match="--model-kwargs"):
        parse_kwargs(["img_size"])
