"""How `train_dekd` reads its inputs and reports: batch size from a DataLoader or the default, data-loader
options, the label cache, errors that name `val_data` / `train_data`, and the per-epoch progress lines
(epochs replaced by the spies of test_trainer_wiring, so nothing trains)."""
from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import devit_ext
from devit_ext import checkpoint as ckpt
from test_trainer_wiring import SUMS, _setup, _spy, tiny  # noqa: F401 - tiny is a fixture

torch.set_num_threads(1)
KW = dict(device="cpu", progress=False)


class _Items(Dataset):  # no label attribute: the trainer reads the labels once (and caches them)
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def _run(monkeypatch, data, **kw):
    calls = _spy(monkeypatch)
    teacher, model = _setup()
    hist = devit_ext.train_dekd(model, teacher, data, **{"epochs": 1, **KW, **kw})
    return calls, hist


def test_batch_size_from_the_loader_the_argument_or_the_default(tiny, monkeypatch):
    x, y = tiny.train.images, tiny.train.labels
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    assert _run(monkeypatch, loader)[1]["settings"]["batch_size"] == 5
    assert _run(monkeypatch, loader, batch_size=3)[1]["settings"]["batch_size"] == 3
    calls, hist = _run(monkeypatch, (x, y))
    assert hist["settings"]["batch_size"] == 64 and len(calls[1]["io"].plan) == -(-len(y) // 64)
    assert _run(monkeypatch, (x, y), batch_size=1)[1]["settings"]["batch_size"] == 1
    assert _run(monkeypatch, (x, y), dist_timeout=0.5)[1]["settings"]["num_train"] == len(y)  # > 0 is enough


def test_loader_options_and_the_label_cache_reach_the_source(tiny, monkeypatch, tmp_path):
    x, y = tiny.train.images, tiny.train.labels
    calls, _ = _run(monkeypatch, tiny.train, loader_opts={"num_workers": 0, "timeout": 7})
    src = calls[0]["io"].source
    assert src.kind == "dataset" and src.opts["timeout"] == 7  # options make even tensors a loaded Dataset
    _run(monkeypatch, _Items(x, y), out_dir=tmp_path, loader_opts={"num_workers": 0})
    cached = [f for f in os.listdir(tmp_path / ckpt.CKPT_DIR) if f.startswith("labels-train_data-")]
    assert len(cached) == 1, os.listdir(tmp_path / ckpt.CKPT_DIR)


def test_cutmix_reaches_the_mixup_of_each_group(tiny, monkeypatch):
    calls, _ = _run(monkeypatch, tiny.train, mixup=0.5, cutmix=0.25, stages=("distill",))
    assert [(m.mixup_alpha, m.cutmix_alpha) for m in calls[0]["kw"]["mixups"]] == [(0.5, 0.25)] * 2


def test_data_errors_name_the_argument_and_the_model(tiny, monkeypatch):
    x, y = tiny.train.images, tiny.train.labels
    bad = y.clone()
    bad[3] = 9
    for kw, msg in [(dict(val_data=(x, bad)), "val_data: label 9 out of range [0, 6) (the model has 6 classes)"),
                    (dict(train_data=(x[:, :, :8, :8], y)),
                     "train_data: images are 1x8x8 but the model expects 1x16x16 (C x H x W)"),
                    (dict(resume=True), "resume: needs out_dir (where the checkpoints are)")]:
        teacher, model = _setup()
        args = dict(train_data=(x, y)) | kw
        with pytest.raises(ValueError) as e:
            devit_ext.train_dekd(model, teacher, epochs=1, **KW, **args)
        assert str(e.value) == msg


def test_each_epoch_prints_one_line_of_its_means_only_when_asked(tiny, monkeypatch, capsys):
    _run(monkeypatch, tiny.train, epochs=(2, 1))
    assert capsys.readouterr() == ("", "")  # progress=False: silent
    _run(monkeypatch, tiny.train, epochs=(2, 1), progress=True)
    out = capsys.readouterr().out.splitlines()
    lines = [ln[: ln.rindex(" (")] for ln in out if ln.startswith("DEKD ")]

    def means(stage):
        s = SUMS[stage]
        keys = [k for k in s if k not in ("correct", "seen")]
        return " ".join(f"{k} {s[k] / s['seen']:.4f}" for k in keys) + f" train_acc {s['correct'] / s['seen']:.4f}"

    assert lines == [f"DEKD distill epoch 1/2: {means('distill')}", f"DEKD distill epoch 2/2: {means('distill')}",
                     f"DEKD ensemble epoch 1/1: {means('ensemble')}"]
    assert all(ln.endswith(" s)") for ln in out if ln.startswith("DEKD "))


def test_a_device_without_images_is_refused_for_distill_only(tiny, monkeypatch):
    teacher, model = _setup()
    x, y = tiny.train.images, tiny.train.labels
    g0, g1 = model.class_groups
    keep = torch.tensor([int(v) in g0 for v in y]) | (y == g1[0])  # device 1 keeps a single image
    keep[torch.nonzero(y == g1[0])[1:]] = False
    one = (x[keep], y[keep])
    _run(monkeypatch, one, stages=("distill",))  # one image is enough
    none = (x[torch.tensor([int(v) in g0 for v in y])], y[torch.tensor([int(v) in g0 for v in y])])
    with pytest.raises(ValueError) as e:
        _run(monkeypatch, none)
    assert str(e.value) == f"train_data: has no images of device 1's classes {g1}; stage 'distill' needs some"
    calls, hist = _run(monkeypatch, none, stages=("ensemble",))  # the ensemble stage reads every image
    assert [c["stage"] for c in calls] == ["ensemble"] and hist["settings"]["num_train"] == len(none[1])
    calls, hist = _run(monkeypatch, _Items(x, y), loader_opts={"num_workers": 0}, stages=("ensemble",))
    assert hist["settings"]["data"] == "dataset"
