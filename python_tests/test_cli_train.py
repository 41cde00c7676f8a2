"""`devit-ext train`: the recipe's image transform, recipe deit end to end (and `--select last`), torchrun
data-parallel (slow)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _child import child_env  # noqa: E402
from _cli_data import TEACHER, TEACHER_KWARGS, kwargs_flags, write_imagefolder  # noqa: E402

from devit_ext.cli import main  # noqa: E402



@pytest.fixture
def small_run(tmp_path):
    import timm
    from safetensors.torch import save_file

    data = write_imagefolder(str(tmp_path / "data"), per_split=(("train", 3), ("val", 1)))
    torch.manual_seed(0)
    t = timm.create_model(TEACHER, pretrained=False, **TEACHER_KWARGS)
    ckpt = str(tmp_path / "t.safetensors")
    save_file({k: v.contiguous() for k, v in t.state_dict().items()}, ckpt)
    run = str(tmp_path / "run")
    assert main(["decompose", "--teacher", TEACHER, "--teacher-checkpoint", ckpt, "--model-kwargs", *kwargs_flags(),
                 "--devices", "2", "--data", data, "--out", run]) == 0
    return data, run


def test_recipe_picks_the_image_transform():
    import timm
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing

    from devit_ext.imagefolder import make_transform
    from devit_ext.run_dir import data_config

    cfg = data_config(timm.create_model(TEACHER, pretrained=False, **TEACHER_KWARGS))
    assert cfg["input_size"] == (1, 16, 16) and cfg["mean"] == (0.5,)
    kinds = [type(t) for t in make_transform(cfg, training=True, recipe="deit").transforms]
    assert RandAugment in kinds and RandomErasing in kinds
    for light in (make_transform(cfg, training=True, recipe="light"), make_transform(cfg, training=False)):
        assert not any(k in (RandAugment, RandomErasing) for k in map(type, light.transforms))
    from PIL import Image

    img = Image.new("L", (20, 20), 128)
    x = make_transform(cfg, training=False)(img)
    assert x.shape == (1, 16, 16) and torch.allclose(x, torch.full_like(x, (128 / 255 - 0.5) / 0.5), atol=1e-6)


def test_train_recipe_deit(small_run):
    import yaml

    data, run = small_run
    assert main(["train", run, "--data", data, "--recipe", "deit", "--epochs", "1", "2", "--batch-size", "8",
                 "--workers", "0", "--select", "last", "--no-progress"]) == 0
    hist = json.load(open(os.path.join(run, "history.json")))
    assert hist["settings"]["recipe"]["name"] == "deit" and hist["settings"]["recipe"]["mixup"] > 0
    assert hist["settings"]["select"] == "last" and hist["best"]["ensemble"]["epoch"] == 2
    saved = yaml.safe_load(open(os.path.join(run, "args.yaml")))["train"]
    assert saved["recipe"] == "deit" and saved["select"] == "last"


@pytest.mark.slow
def test_torchrun_trains_data_parallel(small_run):
    import devit_ext

    data, run = small_run
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = child_env(OMP_NUM_THREADS="1")
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "devit_ext", "train", run, "--data", data,
                           "--epochs", "1", "1", "--batch-size", "4", "--workers", "0", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=os.path.dirname(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("train: wrote") == 1  # rank 0 only
    model = devit_ext.load(os.path.join(run, "model"))
    assert model.num_devices == 2
