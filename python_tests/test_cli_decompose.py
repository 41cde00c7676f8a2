"""`devit-ext decompose`: the data-driven options read the ImageFolder; timm train.py checkpoints load."""
from __future__ import annotations

import argparse
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _cli_data import TEACHER, TEACHER_KWARGS, kwargs_flags, write_imagefolder  # noqa: E402

from devit_ext.cli import main  # noqa: E402


def _teacher_state():
    import timm

    torch.manual_seed(0)
    return timm.create_model(TEACHER, pretrained=False, **TEACHER_KWARGS).state_dict()


def test_data_driven_decompose_and_a_timm_train_checkpoint(tmp_path):
    import devit_ext

    data = write_imagefolder(str(tmp_path / "data"), per_split=(("train", 3),))
    # what timm's train.py saves: arch, epoch, state_dict (maybe with "module." from DDP), its args Namespace
    state = {f"module.{k}": v for k, v in _teacher_state().items()}
    ckpt = tmp_path / "checkpoint-9.pth.tar"
    torch.save({"epoch": 9, "arch": TEACHER, "state_dict": state, "version": 2,
                "args": argparse.Namespace(model=TEACHER, lr=1e-3, num_classes=6)}, ckpt)
    run = tmp_path / "run"
    assert main(["decompose", "--teacher", TEACHER, "--teacher-checkpoint", str(ckpt), "--model-kwargs",
                 *kwargs_flags(), "--devices", "2", "--budgets", "0.1", "0.3", "--partition", "similarity",
                 "--importance", "taylor", "--fusion-init", "lstsq", "--data", data, "--max-samples", "12",
                 "--out", str(run)]) == 0
    model = devit_ext.load(run / "decomposed")
    assert model.meta["partition"] == "similarity" and model.meta["importance"] == "taylor"
    assert model.meta["fusion_init"] == "lstsq"
    assert sorted(c for g in model.class_groups for c in g) == list(range(6))
    assert model.flops()[0] < model.flops()[1]  # the budgets 0.1 vs 0.3 of the teacher's FLOPs
    assert json.load(open(run / "run.json"))["teacher"]["checkpoint"] == str(ckpt)


def test_latency_budgets_from_the_command_line(tmp_path, monkeypatch):
    """--budgets latency=F / latency_ms=X with --runtime reach decompose's latency budgets (profile faked)."""
    from safetensors.torch import save_file
    from test_latency_decompose import _fake_measure

    import devit_ext
    from devit_ext.latency import cache as lcache

    calls = []
    monkeypatch.setattr(lcache, "measure_components", _fake_measure(calls))
    monkeypatch.setattr(lcache, "measure_teacher", lambda t, r, b, n: 1e-3)  # the teacher: 1 ms
    monkeypatch.setattr(lcache, "measure_probes", lambda c, r, b, n: [])
    monkeypatch.setenv("DEVIT_CACHE_DIR", str(tmp_path / "cache"))
    ckpt = tmp_path / "t.safetensors"
    save_file({k: v.contiguous() for k, v in _teacher_state().items()}, ckpt)
    run = tmp_path / "run"
    assert main(["decompose", "--teacher", TEACHER, "--teacher-checkpoint", str(ckpt), "--model-kwargs",
                 *kwargs_flags(), "--devices", "3", "--budgets", "latency=0.5", "latency_ms=0.3", "0.2",
                 "--runtime", "onnxruntime", "--out", str(run)]) == 0
    model = devit_ext.load(run / "decomposed")
    assert calls == ["onnxruntime"]
    assert [t["kind"] for t in model.meta["budget_targets"]] == ["latency", "latency", "flops"]
    assert [t["value"] for t in model.meta["budget_targets"][:2]] == pytest.approx([0.5e-3, 0.3e-3])
    lat = model.meta["latency"]
    assert lat["runtime"] == "onnxruntime" and all(p <= c + 1e-9 for p, c in zip(lat["predicted_ms"], (0.5, 0.3)))
