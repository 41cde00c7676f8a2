"""What `train_dekd` hands each epoch of each stage: the settings, the class tables, the epoch plan and its
seeds, the optimizer, the lr schedule and the clip groups; how it reads its inputs (batch size from a
DataLoader or the default, loader options, the label cache, errors naming the argument) and the per-epoch
progress lines. The epochs are replaced by spies (no training), so this runs in seconds; the epochs
themselves are pinned by test_method_dekd*.py."""
from __future__ import annotations

import math
import os

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import devit_ext
import devit_ext.dekd.trainer as T
from devit_ext import checkpoint as ckpt
from devit_ext.training import common as U
from devit_ext.training import sampling as S
from test_training_args import _setup, tiny  # noqa: F401 - the same tiny teacher, model and data; tiny is a fixture

torch.set_num_threads(1)
SUMS = {"distill": {"loss": 2.0, "ce": 1.0, "kd": 0.5, "rel": 0.25, "correct": 1.0, "seen": 4.0},
        "ensemble": {"loss": 3.0, "mse": 1.5, "ce": 0.75, "kd": 0.25, "correct": 2.0, "seen": 8.0}}


def _seed(seed, *salt):  # the documented (seed, salt...) hash, written out
    s = seed
    for v in salt:
        s = (s * 1_000_003 + v + 1) % 2**63
    return s


def _spy(monkeypatch):
    calls = []

    def record(stage):
        def epoch(io, model, *args, **kw):
            st = args[-1]  # lr_at reads the trainer's loop variables: evaluate it now, during the epoch
            calls.append(dict(stage=stage, io=io, model=model, args=args, kw=kw, stepper=st, rand=torch.rand(2),
                              lrs=[st.lr_at(k) for k in range(-(-len(io.plan) // st.accum))],
                              trainable={n for n, p in model.named_parameters() if p.requires_grad}))
            return dict(SUMS[stage])
        return epoch

    monkeypatch.setattr(T, "distill_epoch", record("distill"))
    monkeypatch.setattr(T, "ensemble_epoch", record("ensemble"))
    return calls


def _ids(ps):
    return [id(p) for p in ps]


def test_each_epoch_gets_the_settings_tables_plan_and_schedule(tiny, monkeypatch):
    calls = _spy(monkeypatch)
    teacher, model = _setup()
    labels = tiny.train.labels
    hist = devit_ext.train_dekd(
        model, teacher, tiny.train, epochs=(2, 1), batch_size=8, lr=(0.01, 0.02), weight_decay=0.07,
        warmup_epochs=1.0, clip=0.5, alpha=0.3, distill_kind="soft", temperature=2.0, relation_weights=(0.4, 0.5, 0.6),
        relation_layers=[(0, 1)], shift=1, token_weight=0.7, quant_aware=False, device_dropout=0.25,
        freeze_backbones=True, seed=5, device="cpu", progress=False)
    assert [c["stage"] for c in calls] == ["distill", "distill", "ensemble"]
    groups = model.class_groups
    names = {n for n, _ in model.named_parameters()}
    fusion = {n for n in names if n.startswith("fusion.")}
    group_idx = [torch.tensor([j for j, y in enumerate(labels.tolist()) if y in g]) for g in groups]
    for epoch, c in enumerate(calls[:2]):
        teacher_arg, subteachers, groups_arg, lut, pairs, stepper = c["args"]
        assert teacher_arg is teacher and subteachers is None and groups_arg == groups
        assert lut.dtype == torch.long and lut.tolist() == [next(g.index(k) for g in groups if k in g) for k in range(6)]
        assert pairs == [[(0, 1)], [(0, 1)]]
        assert c["kw"] == dict(alpha=0.3, kind="soft", temperature=2.0, label_smoothing=0.0,
                               rweights=[0.4, 0.5, 0.6], shift=1, mixups=None)
        assert c["trainable"] == names - fusion  # the fusion does not train in stage "distill"
        io = c["io"]
        assert io.seed == _seed(5, 1, epoch, 7, 0) and io.g.initial_seed() == _seed(5, 1, epoch)
        # the global RNGs (transforms, Mixup) are seeded from (seed, stage, epoch, rank) at the epoch's start
        assert torch.equal(c["rand"], torch.rand(2, generator=torch.Generator().manual_seed(_seed(5, 1, epoch, 0))))
        assert io.image_shape == (1, 16, 16) and io.dev == torch.device("cpu")
        assert io.label == f"train_dekd: stage 'distill' epoch {epoch + 1}"
        want = S.grouped(group_idx, 8, torch.Generator().manual_seed(_seed(5, 1, epoch)))
        assert [b.tolist() for b in io.plan.batches] == [b.tolist() for b in want.batches]
        assert io.plan.sizes == want.sizes
        steps = math.ceil(max(len(ix) for ix in group_idx) / 8)
        assert len(io.plan) == steps
        total, warm = 2 * steps, min(steps, 2 * steps - 1)
        assert c["lrs"] == [U.cosine_lr(epoch * steps + k, total, warm, 0.01) for k in range(steps)]
        assert (stepper.clip, stepper.accum, stepper.ema, stepper.step) == (0.5, 1, None, 0)
        assert [_ids(g) for g in stepper.clip_groups] == [_ids(m.parameters()) for m in model.submodels]
        opt = stepper.opt
        assert [g["weight_decay"] for g in opt.param_groups] == [0.07, 0.0]
        assert sorted(_ids(p for g in opt.param_groups for p in g["params"])) == sorted(
            _ids(p for m in model.submodels for p in m.parameters()))
    assert calls[0]["stepper"].opt is calls[1]["stepper"].opt  # one optimizer per stage, kept across epochs
    c = calls[2]
    assert c["args"][0] is teacher and len(c["args"]) == 2
    assert c["kw"] == dict(alpha=0.3, kind="soft", temperature=2.0, label_smoothing=0.0, token_weight=0.7,
                           quant_aware=False, device_dropout=0.25, freeze=True, shift=1, mixup=None)
    assert c["trainable"] == fusion  # freeze_backbones: only the fusion trains
    io, stepper, n = c["io"], c["stepper"], len(labels)
    assert io.seed == _seed(5, 2, 0, 7, 0) and io.g.initial_seed() == _seed(5, 2, 0)
    assert io.label == "train_dekd: stage 'ensemble' epoch 1"
    want = S.shuffled(n, 8, torch.Generator().manual_seed(_seed(5, 2, 0)))
    assert [b.tolist() for b in io.plan.batches] == [b.tolist() for b in want.batches]
    steps = math.ceil(n / 8)
    assert c["lrs"] == [U.cosine_lr(k, steps, steps - 1, 0.02) for k in range(steps)]
    assert [_ids(g) for g in stepper.clip_groups] == [_ids(p for k, p in model.named_parameters() if k in fusion)]
    assert opt is not stepper.opt and stepper.opt.param_groups[0]["lr"] == 0.02
    for stage, recs in (("distill", hist["distill"]), ("ensemble", hist["ensemble"])):
        s = SUMS[stage]
        for e, rec in enumerate(recs):
            assert rec["epoch"] == e + 1 and rec["mixup"] is False
            sec = rec["seconds"]
            assert type(sec) is float and 0 <= sec < 600 and sec == round(sec, 3)  # wall time, in ms steps
            assert rec["lr"] == (0.01 if stage == "distill" else 0.02)  # the spies took no step
            assert {k: rec[k] for k in s if k not in ("correct", "seen")} == {
                k: v / s["seen"] for k, v in s.items() if k not in ("correct", "seen")}
            assert rec["train_acc"] == s["correct"] / s["seen"]
    assert len(hist["distill"]) == 2 and len(hist["ensemble"]) == 1 and hist["best"] == {}
    assert hist["settings"] == {
        "stages": ["distill", "ensemble"], "epochs": {"distill": 2, "ensemble": 1},
        "lr": {"distill": 0.01, "ensemble": 0.02}, "batch_size": 8, "weight_decay": 0.07, "warmup_epochs": 1.0,
        "clip": 0.5, "quant_aware": False, "freeze_backbones": True, "subtask_teachers": "restricted",
        "finetune_epochs": 2, "finetune_lr": 5e-4, "device_dropout": 0.25, "alpha": 0.3, "distill_kind": "soft",
        "temperature": 2.0, "relation_weights": [0.4, 0.5, 0.6], "relation_pairs": [[[0, 1]], [[0, 1]]],
        "token_weight": 0.7, "shift": 1, "seed": 5, "select": "best", "num_train": n, "num_val": 0, "class_groups": groups,
        "widths": model.widths, "recipe": dict(name="light", mixup=0.0, cutmix=0.0, label_smoothing=0.0,
                                               ema_decay=0.0, accum_steps=1, lr_per_512=False),
        "world_size": 1, "data": "tensors"}
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_label_smoothing_mixup_accumulation_and_the_deit_lr_rule_reach_the_epochs(tiny, monkeypatch):
    calls = _spy(monkeypatch)
    teacher, model = _setup()
    devit_ext.train_dekd(model, teacher, tiny.train, epochs=1, batch_size=4, lr=0.004, label_smoothing=0.2,
                         warmup_epochs=0.0, clip=0.0, device="cpu", progress=False)
    assert [c["kw"]["label_smoothing"] for c in calls] == [0.2, 0.2]
    assert calls[0]["stepper"].clip == 0.0 and calls[0]["kw"]["rweights"] == [0.2, 0.1, 0.3]  # the paper's
    assert calls[0]["args"][4] == [[(0, 0)], [(0, 0)]]  # "middle" of 2-block models: block 0
    assert calls[1]["kw"]["freeze"] is False and calls[1]["kw"]["device_dropout"] == 0.0
    steps = len(calls[1]["io"].plan)
    assert calls[1]["lrs"] == [U.cosine_lr(k, steps, 0, 0.004) for k in range(steps)]
    assert calls[1]["args"] == (teacher, calls[1]["stepper"])
    calls.clear()
    _, model = _setup()
    hist = devit_ext.train_dekd(model, teacher, tiny.train, tiny.val, epochs=1, batch_size=4, lr=0.004,
                                recipe="deit", accum_steps=2, ema_decay=0.5, stages=("ensemble",), device="cpu",
                                progress=False)
    (c,) = calls
    st = hist["settings"]
    assert (st["num_val"], st["quant_aware"], st["stages"]) == (len(tiny.val.labels), True, ["ensemble"])
    (rec,) = hist["ensemble"]
    best = max(rec["val_acc"], rec["ema_val_acc"])  # the model or its EMA, whichever validates better
    assert hist["best"] == {"ensemble": {"epoch": 1, "val_acc": best, "ema": rec["ema_val_acc"] > rec["val_acc"]}}
    assert c["kw"]["label_smoothing"] == 0.0  # Mixup puts the smoothing in its soft targets
    mix = c["kw"]["mixup"]
    assert (mix.mixup_alpha, mix.cutmix_alpha, mix.label_smoothing, mix.num_classes) == (0.8, 1.0, 0.1, 6)
    assert all(len(b) % 2 == 0 for b in c["io"].plan.batches)  # Mixup pairs
    st = c["stepper"]
    assert st.accum == 2 and st.ema is not None and st.ema_source is model
    micro = math.ceil(len(tiny.train.labels) / 4)
    steps = math.ceil(micro / 2)
    base = 0.004 * 4 * 2 / 512  # lr per 512 images of global batch x accumulation
    warm = min(steps, steps - 1)
    assert c["lrs"] == pytest.approx([U.cosine_lr(k, steps, warm, base) for k in range(steps)], rel=1e-12)


def test_distill_mixup_is_per_group_with_its_own_classes(tiny, monkeypatch):
    calls = _spy(monkeypatch)
    teacher, model = _setup()
    devit_ext.train_dekd(model, teacher, tiny.train, epochs=1, batch_size=3, mixup=0.5, stages=("distill",),
                         device="cpu", progress=False)  # 3 per group and step: Mixup needs pairs, so 2
    (c,) = calls
    mixups = c["kw"]["mixups"]
    assert [m.num_classes for m in mixups] == [len(g) for g in model.class_groups]
    assert all(m.mixup_alpha == 0.5 and m.cutmix_alpha == 0.0 for m in mixups)
    assert all(s % 2 == 0 for sizes in c["io"].plan.sizes for s in sizes)


# -- inputs and reports ---------------------------------------------------------------------------------


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


def test_schedule_length_with_a_partial_last_batch_and_warm_up_over_two_steps(tiny, monkeypatch):
    n = len(tiny.train.labels)  # 24
    calls, _ = _run(monkeypatch, tiny.train, stages=("ensemble",), batch_size=5, lr=1.0)
    steps = -(-n // 5)  # 5 steps, the last one of 4 images
    assert len(calls[0]["io"].plan) == steps and calls[0]["lrs"] == [U.cosine_lr(k, steps, steps - 1, 1.0)
                                                                     for k in range(steps)]
    calls, _ = _run(monkeypatch, tiny.train, stages=("ensemble",), batch_size=64, epochs=2, lr=1.0)
    assert [c["lrs"] for c in calls] == [[1.0], [1.0]]  # 1 step per epoch, 1 of warm-up: the 2nd is the peak


def test_a_process_of_two_reads_its_share_with_its_own_seeds(tiny, monkeypatch):
    """Rank 1 of a 2-process run (the process group faked: metrics sums are this process's alone)."""
    from devit_ext.training import dist

    class Rank1(dist.Context):
        def sum(self, values):
            return dict(values)

        def barrier(self):
            pass

    monkeypatch.setattr(dist, "setup", lambda device, timeout_s: Rank1(rank=1, world=2, local_world=2))
    calls, hist = _run(monkeypatch, tiny.train, batch_size=3, seed=3, recipe="deit", lr=0.5)
    labels = tiny.train.labels.tolist()
    groups = hist["settings"]["class_groups"]
    group_idx = [torch.tensor([j for j, y in enumerate(labels) if y in g]) for g in groups]
    for si, c in enumerate(calls):
        io = c["io"]
        g = torch.Generator().manual_seed(_seed(3, si + 1, 0))
        want = (S.grouped(group_idx, 6, g, rank=1, world=2, even=True) if si == 0
                else S.shuffled(len(labels), 6, g, rank=1, world=2, even=True))  # global batch 2 x 3
        assert [b.tolist() for b in io.plan.batches] == [b.tolist() for b in want.batches]
        assert io.seed == _seed(3, si + 1, 0, 7, 1) and io.g.initial_seed() == _seed(3, si + 1, 0, 1)
        assert torch.equal(c["rand"], torch.rand(2, generator=torch.Generator().manual_seed(_seed(3, si + 1, 0, 1))))
        steps = len(want)
        assert all(len(b) % 2 == 0 for b in io.plan.batches)  # 3 per process and step: Mixup pairs, so 2
        base = 0.5 * 6 / 512  # DeiT's rule on the global batch
        assert c["lrs"] == pytest.approx([U.cosine_lr(k, steps, steps - 1, base) for k in range(steps)], rel=1e-12)
    assert hist["settings"]["world_size"] == 2
