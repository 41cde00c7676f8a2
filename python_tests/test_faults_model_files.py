"""A saved model is all or nothing (issue 17, items 4 and 5 for DeViT.save).

- The content hash covers the canonical config as well as the tensors: every
  edit of config.json that changes the answers is refused, and values no model
  has (NaN eps, std 0, overlapping class groups) are refused by name.
- A crafted config is refused from the weights' header alone, in well under a
  second, before anything is built (100,000 blocks, 10^7 classes, a huge image,
  nesting 100,000 deep).
- A kill at every step of save (the kill point injected, not timed) leaves the
  old copy or the new one at the path, loadable; the next save removes what
  the killed one left beside it. One real os._exit in a child process too.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from devit_ext import model_files
from devit_ext.model import ModelFileError, load

from _child import child_env
from test_distributed import make_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    p = tmp_path_factory.mktemp("saved") / "m"
    m = make_model()
    digest = m.save(p)
    return m, p, digest


def _variant(tmp_path, saved, edit, name="v"):
    _, p, _ = saved
    d = tmp_path / name
    d.mkdir()
    (d / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes())
    cfg = json.loads((p / "config.json").read_text())
    out = edit(cfg)
    (d / "config.json").write_text(out if isinstance(out, str) else json.dumps(cfg))
    return d


def test_hash_round_trip_and_covers_config(saved):
    m, p, digest = saved
    assert m.content_hash() == digest == load(p).content_hash()
    m2 = make_model()
    m2.meta["mean"] = [0.5, 0.4, 0.31]
    assert m2.content_hash() != digest  # same tensors, other config


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c["submodels"][0].__setitem__("norm_eps", 1e-5), "content hash mismatch"),
        (lambda c: c["submodels"][1].__setitem__("norm_eps", 10.0), "norm_eps: expected a finite number in"),
        (lambda c: c["submodels"][0].__setitem__("norm_eps", float("nan")), "norm_eps"),
        (lambda c: c["meta"].__setitem__("mean", [0.1, 0.2, 0.3]), "content hash mismatch"),
        (lambda c: c["meta"].__setitem__("std", [0.0, 0.25, 0.3]), "meta.std: expected positive"),
        (lambda c: c["meta"].__setitem__("std", [float("inf"), 0.25, 0.3]), "meta.std: expected 3 finite"),
        (lambda c: c.__setitem__("class_groups", [[0, 2, 4, 6, 8], [0, 2, 4, 6, 8]]), "already belong to another device"),
        (lambda c: c.__setitem__("class_groups", [[0], [0]]), r"class_groups\[0\]: expected 5 classes"),
        (lambda c: c.__setitem__("class_groups", [[0, 2, 4, 6, 8], [1, 3, 5, 7, 99]]), r"class indices in \[0, 10\)"),
        (lambda c: c["submodels"][0].__setitem__("distilled", 1), "distilled: expected true or false"),
        (lambda c: c["submodels"][0]["blocks"][0].__setitem__("mlp_hidden", 65), r"blocks\[0\].mlp_hidden: 65"),
        (lambda c: c["submodels"][0].__setitem__("embed_dim", 40), "embed_dim: 40"),
        (lambda c: c["fusion"].__setitem__("num_classes", 11), "fusion.num_classes"),
    ],
    ids=["eps-small-change", "eps-10", "eps-nan", "mean", "std-0", "std-inf", "groups-overlap", "groups-short",
         "groups-range", "bool-type", "mlp-hidden", "embed-dim", "num-classes"],
)
def test_edited_config_refused(tmp_path, saved, edit, match):
    with pytest.raises(ModelFileError, match=match):
        load(_variant(tmp_path, saved, edit))


def _crafted(c, what):
    if what == "blocks":
        c["submodels"][0]["blocks"] = [{"num_heads": 2, "mlp_hidden": 64}] * 100_000
    elif what == "classes":
        c["fusion"]["num_classes"] = 10**7
        c["submodels"][0]["num_classes"] = 10**7
    elif what == "image":
        c["submodels"][0]["img_size"] = [65536, 65536]
    elif what == "devices":
        c["submodels"] = c["submodels"] * 5_000
    elif what == "nesting":
        return '{"format_version": 1, "meta": ' + "[" * 100_000 + "]" * 100_000 + "}"
    return None


@pytest.mark.parametrize("what, match", [("blocks", "the weights have 2 blocks"), ("classes", "num_classes"),
                                         ("image", "positions"), ("devices", "2 sub-models"),
                                         ("nesting", "nests too deeply")])
def test_crafted_config_refused_fast(tmp_path, saved, what, match):
    d = _variant(tmp_path, saved, lambda c: _crafted(c, what))
    t0 = time.perf_counter()
    with pytest.raises(ModelFileError, match=match):
        load(d)
    assert time.perf_counter() - t0 < 5.0  # a bound against minutes, not a speed target


def test_oversized_config_and_header_refused(tmp_path, saved):
    d = _variant(tmp_path, saved, lambda c: None)
    with open(d / "config.json", "ab") as f:
        f.truncate(model_files.MAX_CONFIG_BYTES + 1)
    with pytest.raises(ModelFileError, match="more than the"):
        load(d)
    d2 = _variant(tmp_path, saved, lambda c: None, "h")
    raw = bytearray((d2 / "model.safetensors").read_bytes())
    raw[:8] = (1 << 40).to_bytes(8, "little")
    (d2 / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match="corrupt or truncated"):
        load(d2)


# ---------------------------------------------------------------- atomic save
class _Killed(BaseException):
    """Raised by the step hook: like a kill, it skips save's `except Exception` clean-up."""


STEPS_OVER = ["scratch-created", "weights-written", "written", "swapped", "done"]
STEPS_FALLBACK = ["scratch-created", "weights-written", "written", "moved-old", "done"]


def _kill_at(monkeypatch, step):
    def hook(name):
        if name == step:
            raise _Killed(name)

    monkeypatch.setattr(model_files, "_on_step", hook)


def _leftovers(path):
    parent, name = os.path.split(str(path))
    return sorted(n for n in os.listdir(parent) if n.startswith(f".{name}.devit-save-"))


def _pretend_dead(path):
    """Rename this process's scratch dirs as a dead process's (pid 2**22 + 1 is above Linux's pid_max default)."""
    parent = os.path.dirname(str(path))
    for n in _leftovers(path):
        os.rename(os.path.join(parent, n), os.path.join(parent, n.replace(f"-{os.getpid()}-", f"-{2**22 + 1}-")))


@pytest.mark.parametrize("fallback", [False, True], ids=["exchange", "two-renames"])
def test_kill_at_every_step_of_save_keeps_a_good_copy(tmp_path, monkeypatch, fallback):
    old, new = make_model(seed=0), make_model(seed=1)
    h_old, h_new = old.content_hash(), new.content_hash()
    if fallback:
        monkeypatch.setattr(model_files, "_exchange", lambda a, b: False)
    for step in STEPS_FALLBACK if fallback else STEPS_OVER:
        p = tmp_path / f"m-{step}"
        old.save(p)
        _kill_at(monkeypatch, step)
        with pytest.raises(_Killed):
            new.save(p)
        monkeypatch.setattr(model_files, "_on_step", None)
        _pretend_dead(p)
        if step == "moved-old":  # killed between the two renames: the path is gone until the next save tidies
            assert not p.exists()
            model_files.clean_leftovers(str(p))
        got = load(p).content_hash()
        assert got in (h_old, h_new), step
        assert got == (h_new if step in ("swapped", "done") else h_old), step
        old.save(p)  # the next save removes what the killed one left
        assert _leftovers(p) == [] and load(p).content_hash() == h_old


def test_kill_during_first_save_leaves_nothing_loadable_half_written(tmp_path, monkeypatch):
    m = make_model()
    p = tmp_path / "first"
    _kill_at(monkeypatch, "weights-written")
    with pytest.raises(_Killed):
        m.save(p)
    monkeypatch.setattr(model_files, "_on_step", None)
    assert not p.exists()  # no half save at the path
    _pretend_dead(p)
    m.save(p)
    assert _leftovers(p) == [] and load(p).content_hash() == m.content_hash()


def test_failed_save_cleans_up_and_keeps_old(tmp_path, monkeypatch):
    old = make_model(seed=0)
    p = tmp_path / "m"
    old.save(p)

    def boom(name):
        if name == "weights-written":
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_files, "_on_step", boom)
    with pytest.raises(OSError, match="No space"):
        make_model(seed=1).save(p)
    assert _leftovers(p) == [] and load(p).content_hash() == old.content_hash()


def test_save_refuses_a_directory_with_other_files(tmp_path):
    p = tmp_path / "busy"
    p.mkdir()
    (p / "notes.txt").write_text("keep me")
    with pytest.raises(ModelFileError, match="holds other files"):
        make_model().save(p)
    assert (p / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_real_kill_after_swap(tmp_path):
    # a child process saves over an existing copy and dies (os._exit) right after the swap
    p = tmp_path / "m"
    make_model(seed=0).save(p)
    code = (
        "import os, sys; sys.path.insert(0, sys.argv[2]);"
        "from devit_ext import model_files; from test_distributed import make_model;"
        "model_files._on_step = lambda n: os._exit(9) if n == 'swapped' else None;"
        "make_model(seed=1).save(sys.argv[1])"
    )
    env = child_env(os.path.join(ROOT, "python_tests"))
    r = subprocess.run([sys.executable, "-c", code, str(p), os.path.join(ROOT, "python_tests")], env=env,
                       timeout=120, capture_output=True)
    assert r.returncode == 9, r.stderr.decode()[-2000:]
    assert load(p).content_hash() == make_model(seed=1).content_hash()
    assert len(_leftovers(p)) == 1  # the old copy, owned by a dead process
    make_model(seed=2).save(p)
    assert _leftovers(p) == []
