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
    assert rows["yardstick: torch.empty((4, 5, 16)) on the CPU"]["host_us"] > 0
    full = rows["sender side per block = (depth 3 - depth 1) / 2, aten CPU arithmetic included (upper bound)"]
    zero = rows["sender side per block at zero rows: dispatch without arithmetic (excluding the kernels)"]
    assert "target_us" not in full  # the target is judged on the row that excludes the kernels
    assert zero["target_us"] == host_overhead.TARGET_US
    assert zero["within_target"] == (zero["host_us"] <= host_overhead.TARGET_US)


def test_zero_row_sender_keeps_the_attention_launch():
    """The zero-row sender (aten ops without arithmetic) must still run the attention op's whole host path:
    the op returns early on an empty batch, so the bench calls it on the batch-1 QKV, one launch per block,
    and the sender's outputs keep their zero-row shapes."""
    import torch

    from devit_ext import kernels
    from devit_ext.bench import host_overhead

    if not kernels.available():
        pytest.skip(f"Triton kernels unavailable: {kernels.info()['error']}")
    with torch.inference_mode(), host_overhead.patched_launch() as recs:
        fn, stack = host_overhead._sender(3, rows=0)
        before = recs["attention"].calls
        out = fn()
        assert recs["attention"].calls - before == 3
        assert [tuple(o.shape) for o in out] == [(0, stack.groups[0].T, stack.groups[0].d)] * 4


def test_cached_attention_launches_do_not_outlive_the_patch():
    """The ops cache a planned attention launch per layout on the Triton path; the bench's patch makes CPU
    tensors take that path, so its plans (launching into the recorder) must be gone after it, and a
    call on CPU tensors afterwards runs the CPU path again."""
    import torch

    from devit_ext import kernels, ops
    from devit_ext.bench import host_overhead
    from devit_ext.ops import attention, reference

    if not kernels.available():
        pytest.skip(f"Triton kernels unavailable: {kernels.info()['error']}")
    qkv = torch.randn(2, 1, 5, 3 * 16 * 1).view(2, 1, 5, 3, 1, 16)
    with torch.inference_mode(), host_overhead.patched_launch() as recs:
        before = recs["attention"].calls
        ops.subvit_attention(qkv)
        ops.subvit_attention(qkv)  # the cached plan: still one launch per call
        assert recs["attention"].calls - before == 2
        assert len(attention._LAUNCHES) == 1
    assert attention._LAUNCHES == {}
    torch.testing.assert_close(ops.subvit_attention(qkv), reference.subvit_attention(qkv))


def test_a_tensor_subclass_takes_the_uncached_triton_path():
    """Only plain tensors are keyed into the launch cache; a subclass on the Triton path launches uncached
    (it reached an unset cache key before)."""
    import torch

    from devit_ext import kernels, ops
    from devit_ext.bench import host_overhead
    from devit_ext.ops import attention

    if not kernels.available():
        pytest.skip(f"Triton kernels unavailable: {kernels.info()['error']}")

    class Sub(torch.Tensor):
        pass

    qkv = torch.randn(2, 1, 5, 3 * 16 * 1).view(2, 1, 5, 3, 1, 16).as_subclass(Sub)
    with torch.inference_mode(), host_overhead.patched_launch() as recs:
        before = recs["attention"].calls
        ops.subvit_attention(qkv)
        assert recs["attention"].calls - before == 1
        assert attention._LAUNCHES == {}
