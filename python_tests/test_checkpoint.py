"""Checkpoints (devit_ext.checkpoint) in train_teacher: exact resume, mixed-up or foreign checkpoints refused."""
import json
import os
import re
import shutil

import pytest
import torch

from devit_ext import checkpoint as ckpt
from devit_ext import data as D
from devit_ext.teacher import build_teacher, train_teacher

torch.set_num_threads(1)

ARCH = dict(img_size=16, patch_size=4, in_chans=1, num_classes=6, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0)
KW = dict(epochs=3, batch_size=8, lr=3e-3, shift=1, device="cpu", progress=False)


@pytest.fixture(scope="module")
def tiny():
    return D.synthetic(num_classes=6, per_class=8, img_size=16, channels=1, seed=0)


class _Stop(Exception):
    pass


def _strip(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def test_teacher_resume_equals_uninterrupted(tiny, tmp_path):
    teacher_a, hist_a = train_teacher(tiny.train, tiny.val, **ARCH, **KW)

    out = tmp_path / "run"

    def stop_after_epoch_1(epoch, rec):
        if epoch == 1:
            raise _Stop

    with pytest.raises(_Stop):
        train_teacher(tiny.train, tiny.val, out_dir=out, callback=stop_after_epoch_1, **ARCH, **KW)
    state, weights = ckpt.checkpoint_files(out / ckpt.CKPT_DIR)
    assert sorted(os.listdir(os.path.dirname(state))) == [ckpt.CKPT_STATE, ckpt.CKPT_WEIGHTS]
    assert sorted(os.listdir(out / ckpt.CKPT_DIR)) == [ckpt.CKPT_LATEST, os.path.basename(os.path.dirname(state))]

    # a fresh process: other initial weights and global RNG; resume must overwrite both
    torch.manual_seed(123)
    epochs_run = []
    teacher_b, hist_b = train_teacher(tiny.train, tiny.val, teacher=build_teacher(seed=5, **ARCH), out_dir=out,
                                      resume=True, callback=lambda e, r: epochs_run.append(e), **KW)
    assert epochs_run == [2, 3]  # continued, not restarted
    sa, sb = teacher_a.state_dict(), teacher_b.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert _strip(hist_a) == _strip(hist_b)

    with pytest.raises(ValueError, match=r"resume: .*different settings \(\['lr'\]\)"):
        train_teacher(tiny.train, tiny.val, out_dir=out, resume=True, **ARCH, **dict(KW, lr=0.5))
    with pytest.raises(ValueError, match="resume: needs out_dir"):
        train_teacher(tiny.train, tiny.val, resume=True, **ARCH, **KW)


def test_checkpoint_files_from_different_saves_are_refused(tiny, tmp_path):
    out = tmp_path / "run"
    ckdir = out / ckpt.CKPT_DIR
    epoch1_state = tmp_path / "epoch1-state.json"

    def keep_epoch1_state(epoch, rec):
        if epoch == 1:
            shutil.copy(ckpt.checkpoint_files(ckdir)[0], epoch1_state)

    kw = dict(KW, epochs=2)
    train_teacher(tiny.train, None, out_dir=out, callback=keep_epoch1_state, **ARCH, **kw)
    shutil.copy(epoch1_state, ckpt.checkpoint_files(ckdir)[0])  # epoch 1's JSON beside epoch 2's weights
    with pytest.raises(ValueError, match=rf"out_dir: .*{re.escape(str(out))}.*different saves"):
        train_teacher(tiny.train, None, out_dir=out, resume=True, **ARCH, **kw)


# every step of save_checkpoint's write, in order: (module, function, which call is killed); the last
# is after LATEST has moved, so there the new save is the one that loads
KILL_POINTS = {
    "writing the weights": ("safetensors.torch", "save_file", lambda *a: True),
    "writing the state": (json, "dump", lambda *a: True),
    "renaming the save into place": (os, "replace", lambda src, dst: os.path.basename(str(dst)).startswith("save-")),
    "before LATEST moves": (os, "replace", lambda src, dst: str(dst).endswith(ckpt.CKPT_LATEST)),
    "removing the older save": (shutil, "rmtree", lambda *a: True),
}


@pytest.mark.parametrize("where", list(KILL_POINTS))
def test_a_kill_during_a_save_keeps_the_last_good_copy(tmp_path, monkeypatch, where):
    import importlib

    model = torch.nn.Linear(3, 2)
    ckdir = tmp_path / "checkpoint"
    ckpt.save_checkpoint(ckdir, model=model, best_state=None, opt=None, state={"epoch": 1})
    good = ckpt.checkpoint_files(ckdir)
    with torch.no_grad():
        model.weight.add_(1.0)

    class Killed(BaseException):
        pass

    mod, fn, hit = KILL_POINTS[where]
    mod = importlib.import_module(mod) if isinstance(mod, str) else mod
    real = getattr(mod, fn)

    def killed_here(*a, **k):
        if hit(*a):
            raise Killed
        return real(*a, **k)
    monkeypatch.setattr(mod, fn, killed_here)
    with pytest.raises(Killed):
        ckpt.save_checkpoint(ckdir, model=model, best_state=None, opt=None, state={"epoch": 2})
    monkeypatch.undo()
    state, tensors = ckpt.load_checkpoint(ckdir)
    if where == "removing the older save":  # LATEST had moved: the new save is complete
        assert state["epoch"] == 2 and torch.equal(tensors["model.weight"], model.weight)
    else:
        assert ckpt.checkpoint_files(ckdir) == good
        assert state["epoch"] == 1 and not torch.equal(tensors["model.weight"], model.weight)
    ckpt.save_checkpoint(ckdir, model=model, best_state=None, opt=None, state={"epoch": 3})
    assert len(os.listdir(ckdir)) == 2  # LATEST and the one save: older saves and leftovers removed
    assert ckpt.load_checkpoint(ckdir)[0]["epoch"] == 3
