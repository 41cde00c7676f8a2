"""`devit-ext bench host` in quick mode: the table's structure, never its timings."""
from __future__ import annotations

import pytest

pytest.importorskip("timm")


def test_bench_host_quick_structure():
    from devit_ext import kernels
    from devit_ext.bench import SUITES, host_overhead

    assert SUITES["host"] == ["devit_ext.bench.host_overhead"]
    (table,) = host_overhead.run("cpu", quick=True)
    rows = {r["what"]: r for r in table.rows}
    assert "patched launch" in rows["method"]["note"]
    if not kernels.available():
        assert "not measured" in rows
        return
    for name, _, _ in host_overhead.op_cases():
        assert rows[name]["host_us"] > 0 and rows[name]["launches_per_call"] == 1
    block = rows["sender side per block = (depth 3 - depth 1) / 2"]
    assert block["target_us"] == host_overhead.TARGET_US
    assert block["within_target"] == (block["host_us"] <= host_overhead.TARGET_US)
