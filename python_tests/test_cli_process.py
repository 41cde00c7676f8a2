"""The installed `devit-ext` command, run as a user runs it: a separate process, its exit code,
what it prints and the files it writes.

The command is the console script pip installed next to this Python (or on
PATH); the package it imports is the one this test process imported (_child.child_env). Without an
installed command these tests skip and say so (`pip install -e .`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from _child import child_env

import devit_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command() -> str | None:
    here = os.path.join(os.path.dirname(sys.executable), "devit-ext")
    return here if os.path.exists(here) else shutil.which("devit-ext")


CMD = _command()
pytestmark = pytest.mark.skipif(CMD is None, reason="the devit-ext command is not installed (pip install -e .)")


def run_cli(args, cwd, timeout=600, **env_extra):
    env = child_env(**env_extra)
    return subprocess.run([CMD, *args], cwd=str(cwd), env=env, capture_output=True, text=True, timeout=timeout)


def test_version(tmp_path):
    r = run_cli(["--version"], tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    first = r.stdout.strip().split(" ", 1)
    assert first[0] == devit_ext.__version__
    assert "'cpp'" in first[1] and "'triton'" in first[1]  # the build info travels with the version


def test_no_command_prints_usage_and_fails(tmp_path):
    r = run_cli([], tmp_path, timeout=120)
    assert r.returncode == 2 and "usage: devit-ext" in r.stdout
    r = run_cli(["bench", "nosuch"], tmp_path, timeout=120)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def _rows(path):
    with open(path) as f:
        return json.load(f)["rows"]


@pytest.mark.slow
def test_bench_kernels_quick(tmp_path):
    r = run_cli(["bench", "kernels", "--quick", "--device", "cpu", "--out", "res"], tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    files = sorted(os.listdir(tmp_path / "res"))
    assert {"kernels_quant_ops_cpu_cpu.csv", "kernels_quant_ops_cpu_cpu.json", "kernels_triton_ops_cpu.csv",
            "kernels_triton_ops_cpu.json"} <= set(files), files
    quant = _rows(tmp_path / "res" / "kernels_quant_ops_cpu_cpu.json")
    assert {(q["op"], q["dtype"]) for q in quant} >= {(op, "float32") for op in
                                                      ("quantize_int8", "dequantize_int8", "layernorm_quantize_int8")}
    for q in quant:  # the native kernels ran (no silent fallback), and the ratio is of the two times
        assert q["path"] == "cpp", q
        assert q["native_us"] > 0 and q["reference_us"] > 0
        assert q["speedup"] == pytest.approx(q["reference_us"] / q["native_us"], rel=1e-6)
    for t in _rows(tmp_path / "res" / "kernels_triton_ops_cpu.json"):
        if "us" in t:
            assert t["us"] > 0 and t["vs_reference"] > 0, t
        else:
            assert "needs a CUDA GPU" in t["note"], t  # an unmeasured row says why
    assert "written:" in r.stdout


@pytest.mark.slow
def test_bench_e2e_quick_tiny(tmp_path):
    """ViT-S at 32 px, batch 2, without the spawned distributed row: every other row runs; so do the CCT
    teacher's and its DeCCT's rows (second table)."""
    r = run_cli(["bench", "e2e", "--quick", "--device", "cpu", "--out", "res"], tmp_path,
                DEVIT_E2E_IMG="32", DEVIT_E2E_BATCHES="2", DEVIT_E2E_SKIP="distributed")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = _rows(tmp_path / "res" / "e2e_e2e_cpu_cpu.json")
    by = {row["row"]: row for row in rows}
    base = by["teacher eager (timm)"]
    local = "local engine (ours, int8, torch sender)"
    for name in ("teacher eager (timm)", "naive loop eager", "plain stacked eager", local):
        row = by[name]
        assert row["batch"] == 2 and row["ms"] > 0, row
        assert row["speedup"] == pytest.approx(base["ms"] / row["ms"], rel=1e-6)  # against the same run's teacher
    width = int(re.search(r"x\(d=(\d+),", r.stdout).group(1))  # each sub-model's width, from the table title
    assert f"sender=torch; {width + 4} B/image/device" in by[local]["note"]
    assert "skipped: DEVIT_E2E_SKIP" in by["distributed engine (loopback, spawned workers)"]["note"]
    assert "(32 px)" in r.stdout
    assert len(base["others_load_rounds"].split()) == 3  # the guard's load of every timed round
    assert by["worker sub-model, torch runtime"]["ms"] > 0
    lines = {x["target"]: x for x in _rows(tmp_path / "res" / "e2e_e2e_cpu_targets_(issue_16)_cpu.json")}
    # the targets judge the torch sender (what collaborate and backend="auto" run), onnxruntime or not
    assert lines["speedup vs teacher eager"]["value"] == pytest.approx(base["ms"] / by[local]["ms"], rel=1e-6)
    assert "not measured" in lines["peak RSS, engine / teacher eager"]["result"]  # --quick: no RSS processes
    cct = {row["row"]: row for row in _rows(tmp_path / "res" / "e2e_e2e_cpu_cct_cpu.json")}
    base = cct["CCT teacher eager"]
    engine = cct["DeCCT local engine (ours, int8, torch sender)"]
    for row in (base, cct["DeCCT naive loop eager"], engine, cct["DeCCT worker sub-model, torch runtime"]):
        assert row["batch"] == 2 and row["ms"] > 0, row
        assert row["speedup"] == pytest.approx(base["ms"] / row["ms"], rel=1e-6)  # against the CCT teacher
    width = int(re.search(r"DeCCT \(d=(\d+),", r.stdout).group(1))
    assert f"sender=torch; {width + 4} B/image/device" in engine["note"]  # the pooled vector in int8 + its scale
    ort = cct["DeCCT local engine (ours, int8, onnxruntime sender)"]
    if base["speedup_vs_ort"] != "-":  # onnxruntime imports here: its sender ran and says so
        assert ort["ms"] > 0 and f"sender=onnxruntime; {width + 4} B/image/device" in ort["note"]
    assert "cct_14_7x2_224 (32 px" in r.stdout


def _readme_python_blocks() -> list[str]:
    readme = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no python example"
    return blocks


def test_readme_cct_example():
    """The README's CCT variant, run as written after the names of the main example it uses."""
    import torch

    code = next(b for b in _readme_python_blocks() if "cct_14_7x2_224" in b)
    names = {"images": torch.randint(0, 256, (8, 3, 224, 224), dtype=torch.uint8,
                                     generator=torch.Generator().manual_seed(0))}
    exec("import timm, torch\nimport devit_ext\n" + code, names)  # noqa: S102 - the README's own code
    from devit_ext.cct import SubCCT

    assert tuple(names["logits"].shape) == (8, 100)
    decct = names["decct"]
    assert decct.num_devices == 4 and all(isinstance(s, SubCCT) for s in decct.submodels)
    assert sum(decct.flops()) <= 0.41 * decct.meta["teacher_flops"]


@pytest.mark.slow
def test_readme_example_at_224(tmp_path):
    """The README's quick-start code, run as written (224 px timm ViT)."""
    code = _readme_python_blocks()[0]
    script = tmp_path / "example.py"
    # what the example's comments promise, checked on the names it defines
    checks = """
assert tuple(logits.shape) == (8, 100), logits.shape
assert stats.transfer_bytes_per_image == [w + 4 for w in model.widths], stats.transfer_bytes_per_image
assert model.content_hash() == devit_ext.load("devit-4").content_hash()
print("README example OK")
"""
    script.write_text(code + checks)
    env = child_env()
    r = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "README example OK" in r.stdout
