"""What `train_dekd` does around its epochs: validation and the best (or, `select="last"`, the last) epoch
(model or weight average) restored at the end of a stage, checkpoints and resume (where it restarts, the
optimizer's and EMA's state, a finished stage), sub-task teachers, the history file, the callback, progress
bars, a second process's validation share.
The epochs are the spies of test_trainer_wiring.py, so nothing trains."""
from __future__ import annotations

import os

import pytest
import torch

import devit_ext
import devit_ext.dekd.trainer as T
from devit_ext import checkpoint as ckpt
from test_trainer_wiring import KW, SUMS, _Items, _run, _spy
from test_training_args import StopRun, _setup, stop_at, tiny  # noqa: F401 - tiny is a fixture

torch.set_num_threads(1)


def test_finetuned_subtask_teachers_are_made_once_and_handed_to_stage_distill(tiny, monkeypatch, tmp_path):
    calls = _spy(monkeypatch)
    made = []

    def fake(ctx, teacher, groups, train, ckdir, **kw):
        made.append(dict(teacher=teacher, groups=groups, n=len(train), ckdir=ckdir, kw=kw))
        return ["sub0", "sub1"]

    monkeypatch.setattr(T, "get_subteachers", fake)
    teacher, model = _setup()
    devit_ext.train_dekd(model, teacher, tiny.train, subtask_teachers="finetune", finetune_epochs=3, finetune_lr=0.002,
                         batch_size=8, shift=1, seed=4, epochs=1, out_dir=tmp_path, **KW)
    (m,) = made
    assert m["teacher"] is teacher and m["groups"] == model.class_groups and m["n"] == len(tiny.train.labels)
    assert m["ckdir"] == os.path.join(tmp_path, ckpt.CKPT_DIR)
    assert m["kw"] == dict(epochs=3, lr=0.002, batch_size=8, shift=1, seed=4, progress=False)
    assert calls[0]["args"][1] == ["sub0", "sub1"]
    _, model = _setup()
    devit_ext.train_dekd(model, teacher, tiny.train, subtask_teachers="finetune", stages=("ensemble",), epochs=1, **KW)
    assert len(made) == 1  # no distill stage: no sub-task teachers


def test_resume_says_where_it_restarts_and_keeps_this_runs_settings(tiny, monkeypatch, tmp_path, capsys):
    stop = stop_at("distill", 1)
    teacher, model = _setup()
    _spy(monkeypatch)
    with pytest.raises(StopRun):
        devit_ext.train_dekd(model, teacher, tiny.train, epochs=2, out_dir=tmp_path, callback=stop, **KW)
    capsys.readouterr()
    calls = _spy(monkeypatch)
    _, model = _setup()
    x, y = tiny.train.images, tiny.train.labels
    hist = devit_ext.train_dekd(model, teacher, _Items(x, y), epochs=2, out_dir=tmp_path, resume=True,
                                loader_opts={"num_workers": 0}, device="cpu", progress=True)
    ckdir = os.path.join(tmp_path, ckpt.CKPT_DIR)
    assert f"DEKD: resumed from {ckdir} at stage 1, epoch 2" in capsys.readouterr().out.splitlines()
    assert [(c["stage"], c["io"].label) for c in calls] == [
        ("distill", "train_dekd: stage 'distill' epoch 2"), ("ensemble", "train_dekd: stage 'ensemble' epoch 1"),
        ("ensemble", "train_dekd: stage 'ensemble' epoch 2")]
    assert hist["settings"]["data"] == "dataset" and [r["epoch"] for r in hist["distill"]] == [1, 2]
    _, model = _setup()
    with pytest.raises(ValueError) as e:
        devit_ext.train_dekd(model, teacher, tiny.train, epochs=3, out_dir=tmp_path, resume=True, **KW)
    assert str(e.value) == f"resume: the checkpoint in {ckdir} was written with different settings (['epochs'])"


def _one_class_epochs(monkeypatch, seen):
    def epoch(io, model, *args, **kw):  # sets the fused head so that validation predicts one class for all
        k = len(seen)
        with torch.no_grad():
            head = model.fusion.head
            head.weight.zero_()
            head.bias.zero_()
            head.bias[(0, 0, 1)[k]] = (1e3, 2e3, 1e3)[k]  # epochs 1 and 2 validate the same, epoch 3 worse
        seen.append(head.bias.detach().clone())
        return dict(SUMS["ensemble"])

    monkeypatch.setattr(T, "ensemble_epoch", epoch)


def test_select_last_keeps_the_last_epoch_though_an_earlier_one_validated_better(tiny, monkeypatch):
    seen = []
    _one_class_epochs(monkeypatch, seen)
    teacher, model = _setup()
    val = (tiny.train.images[:8], torch.tensor([0] * 6 + [1] * 2))
    hist = devit_ext.train_dekd(model, teacher, tiny.train, val, stages=("ensemble",), epochs=3, select="last", **KW)
    assert [r["val_acc"] for r in hist["ensemble"]] == [0.75, 0.75, 0.25]  # still validated every epoch
    assert hist["best"] == {"ensemble": {"epoch": 3, "val_acc": 0.25, "ema": False}}
    assert torch.equal(model.fusion.head.bias, seen[2]) and hist["settings"]["select"] == "last"
    with pytest.raises(ValueError, match="select: expected 'best' .* or 'last', got 'worst'"):
        devit_ext.train_dekd(model, teacher, tiny.train, val, epochs=1, select="worst", **KW)


def test_the_best_validated_epoch_is_kept_and_restored_at_the_end(tiny, monkeypatch):
    seen = []
    _one_class_epochs(monkeypatch, seen)
    teacher, model = _setup()
    x = tiny.train.images
    val = (x[:8], torch.tensor([0] * 6 + [1] * 2))
    hist = devit_ext.train_dekd(model, teacher, tiny.train, val, stages=("ensemble",), epochs=3, **KW)
    assert [r["val_acc"] for r in hist["ensemble"]] == [0.75, 0.75, 0.25]
    assert hist["best"] == {"ensemble": {"epoch": 1, "val_acc": 0.75, "ema": False}}  # the first of equals
    assert torch.equal(model.fusion.head.bias, seen[0])  # epoch 1's weights are what the run returns


def test_resume_restores_the_weight_average(tiny, monkeypatch, tmp_path):
    seen = []

    def epoch(io, model, *args, **kw):
        ema = args[-1].ema.module
        seen.append(ema.fusion.head.bias.detach().clone())
        with torch.no_grad():
            ema.fusion.head.bias.add_(1.0)  # what an epoch of updates would do to the average
        return dict(SUMS["ensemble"])

    stop = stop_at("ensemble")  # the only stage of this run
    monkeypatch.setattr(T, "ensemble_epoch", epoch)
    kw = dict(stages=("ensemble",), epochs=2, recipe="deit", ema_decay=0.5, out_dir=tmp_path, **KW)
    teacher, model = _setup()
    with pytest.raises(StopRun):
        devit_ext.train_dekd(model, teacher, tiny.train, callback=stop, **kw)
    _, model = _setup()
    devit_ext.train_dekd(model, teacher, tiny.train, resume=True, **kw)
    assert torch.equal(seen[1], seen[0] + 1.0)  # epoch 2 starts from the average saved after epoch 1


def _head_predicts(module, cls):
    """Set the fused head so that every image is given class `cls`."""
    with torch.no_grad():
        module.fusion.head.weight.zero_()
        module.fusion.head.bias.zero_()
        module.fusion.head.bias[cls] = 1e3


def test_the_weight_average_wins_when_it_validates_better_and_is_what_the_run_returns(tiny, monkeypatch):
    def epoch(io, model, *args, **kw):
        _head_predicts(model, 1)  # 2 of 8 right
        _head_predicts(args[-1].ema.module, 0)  # 6 of 8 right
        return dict(SUMS["ensemble"])

    monkeypatch.setattr(T, "ensemble_epoch", epoch)
    teacher, model = _setup()
    val = _Items(tiny.train.images[:8], torch.tensor([0] * 6 + [1] * 2))  # a Dataset: read with the loader's seed
    hist = devit_ext.train_dekd(model, teacher, tiny.train, val, stages=("ensemble",), epochs=1, recipe="deit",
                                loader_opts={"num_workers": 0}, **KW)
    (rec,) = hist["ensemble"]
    assert (rec["val_acc"], rec["ema_val_acc"]) == (0.25, 0.75)
    assert hist["best"] == {"ensemble": {"epoch": 1, "val_acc": 0.75, "ema": True}}
    assert int(model.fusion.head.bias.argmax()) == 0  # the average's weights


def test_stage_distill_validates_each_device_on_its_own_classes(tiny, monkeypatch):
    calls = _spy(monkeypatch)
    teacher, model = _setup()
    hist = devit_ext.train_dekd(model, teacher, tiny.train, tiny.val, stages=("distill",), epochs=1, recipe="deit",
                                **KW)
    (rec,) = hist["distill"]
    assert len(rec["val_acc_local"]) == 2 and rec["val_acc"] == sum(rec["val_acc_local"]) / 2
    assert rec["ema_val_acc"] == rec["val_acc"]  # nothing stepped: the average is the model, judged the same way
    assert len(calls) == 1


def test_a_finished_stage_is_checkpointed_as_done_and_a_resume_starts_the_next(tiny, monkeypatch, tmp_path):
    stop = stop_at("distill", 2)
    teacher, model = _setup()
    _spy(monkeypatch)
    with pytest.raises(StopRun):
        devit_ext.train_dekd(model, teacher, tiny.train, tiny.val, epochs=2, out_dir=tmp_path, callback=stop, **KW)
    state, _ = ckpt.load_checkpoint(os.path.join(tmp_path, ckpt.CKPT_DIR))  # the next stage starts afresh:
    assert (state["version"], state["stage"], state["epoch"], state["best_val"]) == (2, 1, 0, None)
    calls = _spy(monkeypatch)
    _, model = _setup()
    hist = devit_ext.train_dekd(model, teacher, tiny.train, tiny.val, epochs=2, out_dir=tmp_path, resume=True, **KW)
    assert [c["io"].label for c in calls] == ["train_dekd: stage 'ensemble' epoch 1", "train_dekd: stage 'ensemble' epoch 2"]
    assert hist["best"]["ensemble"]["epoch"] == 1  # judged on its own, not against stage distill's best


def test_progress_bars_name_the_stage_and_epoch(tiny, monkeypatch, capsys):
    _run(monkeypatch, tiny.train, epochs=(2, 1), progress=True)
    err = capsys.readouterr().err
    for desc in ("DEKD distill 1/2", "DEKD distill 2/2", "DEKD ensemble 1/1"):
        assert f"{desc}:" in err and "%|" in err, err[-500:]  # with a total: a percentage


def test_history_file_callback_records_and_default_epochs(tiny, monkeypatch, tmp_path):
    import json

    got = []
    calls = _spy(monkeypatch)
    teacher, model = _setup()
    hist = devit_ext.train_dekd(model, teacher, tiny.train, epochs=None, out_dir=tmp_path,
                                callback=lambda *a: got.append(a), **KW)
    assert hist["settings"]["epochs"] == {"distill": 10, "ensemble": 10} and len(calls) == 20
    assert got == [(s, e + 1, hist[s][e]) for s in ("distill", "ensemble") for e in range(10)]
    text = (tmp_path / "history.json").read_text()
    assert json.loads(text) == json.loads(json.dumps(hist)) and text.startswith('{\n "distill": [\n  {')  # indent 1
    assert sorted(os.listdir(tmp_path)) == [ckpt.CKPT_DIR, "history.json", "model"]  # no temporary left


def test_rank_1_validates_its_own_share_of_the_validation_set(tiny, monkeypatch):
    from devit_ext.training import dist

    class Rank1(dist.Context):
        def sum(self, values):  # this process's counts alone: the share it read is what the accuracy shows
            return dict(values)

        def barrier(self):
            pass

    def epoch(io, model, *args, **kw):
        _head_predicts(model, 0)
        return dict(SUMS["ensemble"])

    monkeypatch.setattr(dist, "setup", lambda device, timeout_s: Rank1(rank=1, world=2, local_world=2))
    monkeypatch.setattr(T, "ensemble_epoch", epoch)
    teacher, model = _setup()
    val = (tiny.train.images[:8], torch.tensor([0] * 6 + [1] * 2))  # rank 1 reads items 4..7: labels 0, 0, 1, 1
    hist = devit_ext.train_dekd(model, teacher, tiny.train, val, stages=("ensemble",), epochs=1, **KW)
    assert hist["ensemble"][0]["val_acc"] == 0.5
