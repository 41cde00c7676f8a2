"""The e2e CPU bench's measuring parts: the quiet-machine guard and a row's peak RSS in a fresh process."""
from __future__ import annotations

import pytest

from devit_ext.bench import _e2e_rss, _e2e_targets, e2e_cpu


def test_guard_reads_other_processes_load():
    with e2e_cpu.Guard() as g:
        sum(i * i for i in range(200_000))  # this process's own work is not counted as others'
    assert g.others_cores >= 0.0


@pytest.mark.slow
def test_peak_rss_of_one_row_in_a_fresh_process():
    r = _e2e_rss.measure("naive loop eager", 2, 32, skip={"distributed", "compile"}, timeout=300)
    assert "note" not in r, r
    assert r["row"] == "naive loop eager" and r["batch"] == 2
    assert r["peak_rss_mb"] >= r["imports_mb"] > 50  # torch alone is more than 50 MB
    assert r["rss_above_imports_mb"] == pytest.approx(r["peak_rss_mb"] - r["imports_mb"])
    bad = _e2e_rss.measure("no such row", 2, 32, timeout=300)
    assert bad["note"].startswith("failed: exit") and "no row" in bad["note"]


def test_targets_are_ratios_of_the_medians():
    names = [_e2e_targets.TEACHER, _e2e_targets.TEACHER_ORT, _e2e_targets.NAIVE, _e2e_targets.SEQ_ORT_ROW,
             _e2e_targets.TORCH_ENGINE_ROW, *_e2e_targets.WORKER_ROWS.values()]
    meds = {1: dict(zip(names, [1.0, 0.5, 0.8, 0.4, 0.25, 0.1, 0.05])),
            8: dict(zip(names, [8.0, 4.0, 6.0, 3.0, 2.4, 0.7, 0.5]))}
    for m in meds.values():  # the onnxruntime sender's row is timed too, but not what the targets judge
        m["local engine (ours, int8, onnxruntime sender)"] = 100.0
    t = _e2e_targets.targets(meds, None, [1, 8])
    assert "torch sender" in t.title
    by = {(r["target"], r.get("batch")): r for r in t.rows}
    assert by[("speedup vs teacher eager", 1)]["value"] == pytest.approx(4.0)
    assert by[("speedup vs teacher onnxruntime", 8)]["value"] == pytest.approx(4.0 / 2.4)
    assert by[("worker compute: torch / onnxruntime runtime", 1)]["result"] == "met"  # 2.0
    assert by[("worker compute: torch / onnxruntime runtime", 8)]["result"] == "missed"  # 1.4
    rise = by[("per-image cost, batch 8 / batch 1", 8)]
    assert rise["value"] == pytest.approx((2.4 / 8) / 0.25) and rise["result"] == "missed"  # 0.30 > 0.25 ms
