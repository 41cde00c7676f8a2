"""torchrun: DEKD data-parallel on 2 CPU processes (Gloo) matches one process, resumes, and fails cleanly.

Every process binds the loopback address only.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

from devit_ext import data as D
from devit_ext.checkpoint import checkpoint_files
from devit_ext.teacher import save_teacher, train_teacher

pytestmark = pytest.mark.slow
JOB = os.path.join(os.path.dirname(__file__), "_ddp_job.py")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", **extra)
    return env


def _torchrun(args, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_port()), JOB, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    torch.set_num_threads(2)
    splits = D.digits(seed=0)
    t, _ = train_teacher(splits.train, splits.val, epochs=20, batch_size=32, lr=2e-3, shift=1, device="cpu",
                         progress=False, img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=64,
                         depth=2, num_heads=4, mlp_ratio=2.0)
    path = tmp_path_factory.mktemp("teacher")
    save_teacher(t, path)
    return str(path)


def _result(path):
    with open(path) as f:
        return json.load(f)


def test_two_processes_match_one(teacher_dir, tmp_path):
    one = subprocess.run([sys.executable, JOB, teacher_dir, str(tmp_path / "one"), str(tmp_path / "one.json")],
                         capture_output=True, text=True, timeout=600, env=_env())
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun([teacher_dir, str(tmp_path / "two"), str(tmp_path / "two.json")])
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = _result(tmp_path / "one.json"), _result(tmp_path / "two.json")
    assert r1["world_size"] == 1 and r2["world_size"] == 2
    assert r1["acc"] > 0.8  # both runs learn (10 classes: chance is 0.1)
    assert abs(r1["acc"] - r2["acc"]) <= 0.03, (r1, r2)
    assert (tmp_path / "two" / "model").is_dir() and (tmp_path / "two" / "history.json").is_file()


def test_resume_under_torchrun_after_the_first_stage(teacher_dir, tmp_path):
    out, res = str(tmp_path / "run"), str(tmp_path / "r.json")
    first = _torchrun([teacher_dir, out, res, "--stop-after-distill"])
    assert first.returncode != 0 and not os.path.exists(res)
    with open(checkpoint_files(os.path.join(out, "checkpoint"))[0]) as f:
        st = json.load(f)
    assert (st["stage"], st["epoch"]) == (1, 0)  # stage "distill" closed, "ensemble" not begun
    shutil.copytree(out, out + "-one")  # the same checkpoint, resumed by one process below
    second = _torchrun([teacher_dir, out, res, "--resume"])
    assert second.returncode == 0, second.stderr[-3000:]
    r = _result(res)
    assert r["epochs"] == {"distill": 4, "ensemble": 6} and r["world_size"] == 2
    # batch_size is per process: resumed by one process with the same per-process batch (32)
    one = subprocess.run([sys.executable, JOB, teacher_dir, out + "-one", res + "-one", "--resume", "--batch", "32"],
                         capture_output=True, text=True, timeout=600, env=_env())
    assert one.returncode == 0, one.stderr[-3000:]
    r1 = _result(res + "-one")
    assert r1["epochs"] == {"distill": 4, "ensemble": 6} and r1["world_size"] == 1
    assert abs(r1["acc"] - r["acc"]) <= 0.05  # the ensemble stage at half the global batch


def test_a_killed_rank_makes_the_other_stop_with_an_error(teacher_dir, tmp_path):
    port = str(_port())
    procs = []
    for rank in (0, 1):
        env = _env(MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
        procs.append(subprocess.Popen([sys.executable, JOB, teacher_dir, str(tmp_path / "k"), str(tmp_path / "k.json"),
                                       "--die-rank", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env))
    t0 = time.time()
    try:
        _, err0 = procs[0].communicate(timeout=300)
    finally:
        for p in procs:
            p.kill()
    assert procs[1].wait() != 0
    assert procs[0].returncode != 0
    assert "another training process died" in err0, err0[-3000:]
    assert time.time() - t0 < 300
