"""Latency-aware decomposition: latency budgets, the faster shape at equal FLOPs, the cached profile, bad input.

Deterministic: the search is driven by injected latency functions / hand-built profiles; the real profiler
is only smoke-tested (its numbers depend on the machine's load)."""
from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("timm")

import devit_ext
from devit_ext import latency as L
from devit_ext.budgets import SEARCH_TOL, search_shape
from devit_ext.latency import cache as lcache
from devit_ext.latency.measure import grids
from devit_ext.latency.profile import LatencyProfile
from devit_ext.shapes import attention_flops, describe_shape, num_tokens, shape_config, teacher_config, vit_flops
from test_decompose import _tiny


@pytest.fixture(scope="module")
def vit():
    return _tiny()  # d48 L4 h3 m192, 17 tokens of head width 16


def attention_heavy(cfg):
    """Seconds: 1 ns per FLOP, the N x N products 10x dearer, and 2 us per block (kernel launches)."""
    return 1e-9 * (vit_flops(cfg) + 9 * attention_flops(cfg)) + 2e-6 * len(cfg["blocks"])


def mlp_flops(cfg):
    return sum(4 * num_tokens(cfg) * cfg["embed_dim"] * b["mlp_hidden"] for b in cfg["blocks"])


def mlp_heavy(cfg):
    return 1e-9 * (vit_flops(cfg) + 9 * mlp_flops(cfg)) + 2e-6 * len(cfg["blocks"])


def _cfg(tc, shape):
    return shape_config(tc, shape["embed_dim"], shape["blocks"], 1)


def _big_tcfg(vit):
    """A ViT-S/16 teacher config at 224 px, 197 tokens (no module is built): d384 L12 h6 m1536, head width 64."""
    tc = teacher_config(vit) | {"head_dim": 64, "img_size": [224, 224], "patch_size": [16, 16]}
    return shape_config(tc, 384, [{"num_heads": 6, "mlp_hidden": 1536}] * 12, 10)


# ---------------------------------------------------------------------------
# Latency budgets
# ---------------------------------------------------------------------------


def test_latency_budgets_are_met(vit):
    tc = teacher_config(vit)
    t_s = attention_heavy(tc)
    budgets = [{"latency": 0.5}, {"latency": 0.2}, {"latency_ms": 1e3 * 0.3 * t_s}]
    m = devit_ext.decompose(vit, 3, budgets=budgets, latency=attention_heavy)
    targets = [0.5 * t_s, 0.2 * t_s, 0.3 * t_s]
    got = [attention_heavy(s.cfg) for s in m.submodels]
    for g, t in zip(got, targets):
        assert g <= t * (1 + 1e-9)
        assert g >= (1 - L.LATENCY_WINDOW - 0.05) * t  # the search aims just below the cap
    assert got[0] > got[2] > got[1]
    meta = m.meta["latency"]
    assert meta["runtime"] == "function" and meta["predicted_ms"] == pytest.approx([1e3 * g for g in got])
    assert [t["kind"] for t in m.meta["budget_targets"]] == ["latency"] * 3
    assert [t["value"] for t in m.meta["budget_targets"]] == pytest.approx(targets)
    json.dumps(m.meta)


def test_latency_budget_search_on_a_large_grid(vit):
    tcfg = _big_tcfg(vit)
    fn = L.FunctionLatency(attention_heavy, tcfg)
    for frac in (0.05, 0.1, 0.3):
        target = frac * attention_heavy(tcfg)
        shape = L.search_latency(tcfg, target, fn)
        got = attention_heavy(_cfg(tcfg, shape))
        assert (1 - L.LATENCY_WINDOW) * target <= got <= target


# ---------------------------------------------------------------------------
# At equal FLOPs, the faster shape
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("frac", [0.1, 0.25])
def test_equal_flops_fewer_heads_when_attention_is_slow(vit, frac):
    tcfg = _big_tcfg(vit)
    target = frac * vit_flops(tcfg, include_head=True)
    plain = search_shape(tcfg, target)
    fast = L.refine(tcfg, plain, L.FunctionLatency(attention_heavy, tcfg), "flops", target)
    assert fast["num_heads"] < plain["num_heads"]
    assert (fast["embed_dim"], fast["depth"]) == (plain["embed_dim"], plain["depth"])
    assert abs(vit_flops(_cfg(tcfg, fast)) / target - 1) <= SEARCH_TOL
    per_flop = lambda s: attention_heavy(_cfg(tcfg, s)) / vit_flops(_cfg(tcfg, s))  # noqa: E731
    assert per_flop(fast) <= (1 - L.LATENCY_GAIN) * per_flop(plain)
    # where the MLP is the slow part, heads are not cut (more of them, a narrower MLP, if anything)
    other = L.refine(tcfg, plain, L.FunctionLatency(mlp_heavy, tcfg), "flops", target)
    assert other["num_heads"] >= plain["num_heads"] and other["mlp_hidden"] <= plain["mlp_hidden"]


def test_decompose_with_runtime_prefers_the_faster_shape(vit):
    plain = devit_ext.decompose(vit, 2, budgets=[0.3, 0.3])
    fast = devit_ext.decompose(vit, 2, budgets=[0.3, 0.3], latency=attention_heavy)
    p, f = plain.submodels[0].cfg, fast.submodels[0].cfg
    assert describe_shape(p) != describe_shape(f)
    assert f["blocks"][0]["num_heads"] < p["blocks"][0]["num_heads"]
    assert attention_heavy(f) < attention_heavy(p)
    tf = plain.meta["teacher_flops"]
    assert abs(fast.flops()[0] / (0.3 * tf) - 1) <= 0.10
    assert plain.meta["latency"] is None
    assert fast.meta["budget_targets"][0]["predicted_s"] == pytest.approx(attention_heavy(f))


def _profile(tcfg, mlp_time, attn_time, stem_time=lambda d: 1e-6 * d):
    """A hand-built LatencyProfile on a grid of every multiple of 8 (batch 1)."""
    dg = list(range(8, tcfg["embed_dim"] + 1, 8))
    mg = [1] + list(range(8, max(b["mlp_hidden"] for b in tcfg["blocks"]) + 1, 8))
    H = max(b["num_heads"] for b in tcfg["blocks"])
    key = {"runtime": "torch", "batch": 1, "tokens": num_tokens(tcfg), "head_dim": tcfg["head_dim"]}
    return LatencyProfile(key=key, d_grid=dg, m_grid=mg, stem=[stem_time(d) for d in dg],
                          attn=[[attn_time(d, h) for h in range(1, H + 1)] for d in dg],
                          mlp=[[mlp_time(d, m) for m in mg] for d in dg], teacher_s=None)


def test_equal_flops_mlp_width_that_suits_the_gemm(vit):
    tcfg = _big_tcfg(vit)
    N, D = num_tokens(tcfg), tcfg["head_dim"]
    target = 0.1 * vit_flops(tcfg, include_head=True)
    plain = search_shape(tcfg, target)
    d0, m0 = plain["embed_dim"], plain["mlp_hidden"]
    fast_w = next(w for w in (m0 + 16, m0 - 16, m0 + 8) if w % 8 == 0)  # a width the kernels like, next to m0

    def mlp_time(d, m):
        return 1e-9 * 4 * N * d * m * (0.5 if m == fast_w else 1.0)

    prof = _profile(tcfg, mlp_time, lambda d, h: 1e-9 * (8 * N * d * h * D + 4 * N * N * h * D))
    got = L.refine(tcfg, plain, prof, "flops", target)
    assert got["mlp_hidden"] == fast_w and got["num_heads"] == plain["num_heads"]
    per_flop = lambda s: prof.predict(_cfg(tcfg, s)) / vit_flops(_cfg(tcfg, s))  # noqa: E731
    assert per_flop(got) < per_flop(plain)
    # without the dip the teacher-like shape stays (no gain of 3%)
    flat = _profile(tcfg, lambda d, m: 1e-9 * 4 * N * d * m, lambda d, h: 1e-9 * (8 * N * d * h * D + 4 * N * N * h * D))
    assert L.refine(tcfg, plain, flat, "flops", target) == plain


def test_profile_interpolates_between_grid_widths(vit):
    tcfg = _big_tcfg(vit)
    prof = _profile(tcfg, lambda d, m: 1e-6 * d * m, lambda d, h: 1e-5 * d + 1e-4 * h)
    assert float(prof.mlp_s(torch.tensor([20.0]), torch.tensor([100.0]))[0]) == pytest.approx(1e-6 * 20 * 100)
    assert float(prof.attn_s(torch.tensor([20.0]), torch.tensor([3.0]))[0]) == pytest.approx(1e-5 * 20 + 3e-4)
    cfg = shape_config(tcfg, 64, [{"num_heads": 2, "mlp_hidden": 256}, {"num_heads": 1, "mlp_hidden": 128}], 1)
    want = 1e-6 * 64 + (1e-5 * 64 + 2e-4 + 1e-6 * 64 * 256) + (1e-5 * 64 + 1e-4 + 1e-6 * 64 * 128)
    assert prof.predict(cfg) == pytest.approx(want)
    assert LatencyProfile.from_dict(json.loads(json.dumps(prof.to_dict()))).predict(cfg) == pytest.approx(want)


# ---------------------------------------------------------------------------
# The cached profile
# ---------------------------------------------------------------------------


def _fake_measure(calls):
    def components(tcfg, runtime, batch, repeats):
        calls.append(runtime)
        dg, mg = grids(tcfg)
        H = max(b["num_heads"] for b in tcfg["blocks"])
        return {"d_grid": dg, "m_grid": mg, "stem": [1e-6 * d for d in dg],
                "attn": [[1e-6 * (d + h) for h in range(1, H + 1)] for d in dg], "mlp": [[1e-8 * d * m for m in mg] for d in dg]}

    return components


def test_profile_cache_written_once_reused_and_invalidated(vit, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(lcache, "measure_components", _fake_measure(calls))
    monkeypatch.setattr(lcache, "measure_teacher", lambda t, r, b, n: 1e-3)
    monkeypatch.setattr(lcache, "measure_probes", lambda c, r, b, n: [])
    p1 = L.cached_profile(vit, "torch", cache_dir=str(tmp_path))
    files = sorted(os.listdir(tmp_path))
    assert calls == ["torch"] and len(files) == 1 and files[0].startswith("latency-torch-")
    assert not p1.extra["cache"]["hit"] and p1.teacher_s == 1e-3
    mtime = os.stat(tmp_path / files[0]).st_mtime_ns
    p2 = L.cached_profile(vit, "torch", cache_dir=str(tmp_path))
    assert calls == ["torch"] and p2.extra["cache"]["hit"] and p2.to_dict()["mlp"] == p1.to_dict()["mlp"]
    assert os.stat(tmp_path / files[0]).st_mtime_ns == mtime
    # the key changes: another thread count, another batch -> measured again, in another file
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        L.cached_profile(vit, "torch", cache_dir=str(tmp_path))
    finally:
        torch.set_num_threads(threads)
    L.cached_profile(vit, "torch", batch=2, cache_dir=str(tmp_path))
    assert len(calls) == 3 and len(os.listdir(tmp_path)) == 3
    # a file whose stored key differs (edited, another grid) or that is unreadable is measured again
    path = tmp_path / files[0]
    obj = json.loads(path.read_text())
    obj["key"]["tokens"] = 999
    path.write_text(json.dumps(obj))
    assert not L.cached_profile(vit, "torch", cache_dir=str(tmp_path)).extra["cache"]["hit"]
    path.write_text("{half a file")
    assert not L.cached_profile(vit, "torch", cache_dir=str(tmp_path)).extra["cache"]["hit"]
    assert len(calls) == 5 and not [f for f in os.listdir(tmp_path) if f.startswith(".")]
    assert L.cached_profile(vit, "torch", cache_dir=str(tmp_path)).extra["cache"]["hit"]


def test_decompose_uses_the_cache_dir_from_the_environment(vit, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(lcache, "measure_components", _fake_measure(calls))
    monkeypatch.setattr(lcache, "measure_teacher", lambda t, r, b, n: 1e-3)
    monkeypatch.setattr(lcache, "measure_probes", lambda c, r, b, n: [])
    monkeypatch.setenv("DEVIT_CACHE_DIR", str(tmp_path))
    m = devit_ext.decompose(vit, 2, budgets=[{"latency": 0.4}] * 2)
    m2 = devit_ext.decompose(vit, 2, budgets=[{"latency": 0.4}] * 2)
    assert calls == ["torch"] and os.listdir(tmp_path / "latency")
    assert m.meta["latency"]["source"] == "measured" and m2.meta["latency"]["source"] == "cached"
    assert m.meta["latency"]["teacher_measured_ms"] == pytest.approx(1.0)
    assert all(p <= 0.4 + 1e-9 for p in m.meta["latency"]["predicted_ms"])


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(budgets=[{"latency": 0}]), ValueError, r"budgets\[0\]: latency must be a positive"),
    (dict(budgets=[{"latency": -0.1}]), ValueError, r"budgets\[0\]: latency must be a positive"),
    (dict(budgets=[{"latency": 1.5}]), ValueError, r"budgets\[0\]: latency is a fraction"),
    (dict(budgets=[{"latency_ms": 0.0}]), ValueError, r"budgets\[0\]: latency_ms must be a positive"),
    (dict(budgets=[{"latency_ms": "fast"}]), ValueError, r"budgets\[0\]: latency_ms"),
    (dict(budgets=[{"latency": 0.1, "flops": 1000}]), ValueError, r"budgets\[0\]: give one budget per device"),
    (dict(budgets=[{"latency": 0.1, "latency_ms": 3}]), ValueError, r"budgets\[0\]: give one budget"),
    (dict(budgets=[0.2], runtime="tflite"), ValueError, r"runtime: expected one of \['torch', 'onnxruntime'\]"),
    (dict(budgets=[0.2], runtime="executorch"), ValueError, "runtime: expected one of"),
    (dict(budgets=[0.2], latency=42), TypeError, "latency: expected a LatencyProfile or a function"),
    (dict(budgets=[0.2], latency=attention_heavy, runtime="torch"), ValueError, "runtime: a latency function"),
])
def test_bad_input_names_the_argument(vit, kwargs, err, match, monkeypatch):
    def no_profile(*a, **k):
        raise AssertionError("bad input must fail before a profile is measured")

    monkeypatch.setattr(L, "cached_profile", no_profile)
    with pytest.raises(err, match=match):
        devit_ext.decompose(vit, 1, **kwargs)


def test_bad_latency_targets(vit):
    t_ms = 1e3 * attention_heavy(teacher_config(vit))
    with pytest.raises(ValueError, match=r"budgets\[1\]: latency_ms=.* exceeds the teacher's"):
        devit_ext.decompose(vit, 2, budgets=[0.2, {"latency_ms": 2 * t_ms}], latency=attention_heavy)
    with pytest.raises(ValueError, match=r"budgets\[0\]: no sub-model shape .* at most .*raise the budget"):
        devit_ext.decompose(vit, 1, budgets=[{"latency": 1e-4}], latency=attention_heavy)
    with pytest.raises(ValueError, match=r"latency: the latency function gave -1"):
        devit_ext.decompose(vit, 1, budgets=[{"latency": 0.3}], latency=lambda cfg: -1)


def test_unavailable_runtime_and_unfit_profile(vit, monkeypatch):
    from devit_ext.ops import dispatch

    prof = _profile(_big_tcfg(vit), lambda d, m: 1e-9 * d * m, lambda d, h: 1e-6 * h)
    with pytest.raises(ValueError, match="latency: the profile does not fit this teacher .*tokens=197, the teacher has 17"):
        devit_ext.decompose(vit, 1, budgets=[0.3], latency=prof)
    with pytest.raises(ValueError, match="runtime: 'onnxruntime', but the given latency profile was measured on 'torch'"):
        devit_ext.decompose(vit, 1, budgets=[0.3], latency=prof, runtime="onnxruntime")
    monkeypatch.setattr(dispatch, "onnxruntime_status", lambda: (False, "onnxruntime: ImportError: hidden"))
    with pytest.raises(RuntimeError, match="runtime='onnxruntime': not available here .*hidden"):
        devit_ext.decompose(vit, 1, budgets=[{"latency": 0.3}], runtime="onnxruntime")


def test_cct_teacher_is_refused():
    from test_cct_decompose import teacher

    with pytest.raises(ValueError, match="runtime / latency: .*not a CCT"):
        devit_ext.decompose(teacher(), 1, budgets=[0.3], latency=attention_heavy)


# ---------------------------------------------------------------------------
# The real profiler (smoke: numbers depend on the machine's load)
# ---------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """One torch thread: the profile then times on the CPU-time clock, which other processes' load leaves alone."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_real_profile_on_torch(vit, tmp_path, one_thread):
    prof = L.cached_profile(vit, "torch", cache_dir=str(tmp_path))
    assert prof.key["clock"] == "cpu" and prof.teacher_s > 0 and prof.measure_s < 60
    assert all(v > 0 for v in prof.stem) and all(v > 0 for r in prof.attn + prof.mlp for v in r)
    assert prof.calibration["scale"] > 0 and len(prof.calibration["points"]) == 2
    m = devit_ext.decompose(vit, 2, budgets=[{"latency": 0.5}] * 2, latency=prof)
    pred = m.meta["latency"]["predicted_ms"]
    assert all(p <= 0.5 * 1e3 * prof.teacher_s * (1 + 1e-9) for p in pred)
    assert m.meta["latency"]["runtime"] == "torch" and m.meta["latency"]["source"] == "given profile"
    json.dumps(m.meta)
    # the model against a direct measurement of the sub-model it chose (wide bounds: a tiny model's
    # time is mostly per-call overhead, which a loaded machine's caches and frequency move)
    measured = L.measure_submodel(m.submodels[0], "torch", repeats=5)
    assert 0.5 < pred[0] / (1e3 * measured) < 2


def test_real_profile_on_onnxruntime(tmp_path, one_thread):
    from devit_ext.engines.runtime import status

    ok, why = status("onnxruntime")
    if not ok:
        pytest.skip(f"onnxruntime unavailable: {why}")
    small = _tiny(depth=1, embed_dim=16, num_heads=1)
    prof = L.cached_profile(small, "onnxruntime", cache_dir=str(tmp_path))
    assert prof.runtime == "onnxruntime" and prof.teacher_s > 0
    assert all(v > 0 for r in prof.attn + prof.mlp for v in r)


def test_refine_keeps_the_shape_when_whole_models_disagree(vit):
    """A profile measured here checks its trade on the two whole models (injected here: fixed numbers)."""
    tcfg = _big_tcfg(vit)
    N, D = num_tokens(tcfg), tcfg["head_dim"]
    target = 0.1 * vit_flops(tcfg, include_head=True)
    plain = search_shape(tcfg, target)
    # components say attention is 10x dearer per FLOP than the MLP: one head fewer predicts a gain
    prof = _profile(tcfg, lambda d, m: 1e-9 * 4 * N * d * m, lambda d, h: 1e-8 * (8 * N * d * h * D + 4 * N * N * h * D))
    assert L.refine(tcfg, plain, prof, "flops", target)["num_heads"] < plain["num_heads"]
    for whole, kept in ((lambda cfg: 1e-9 * vit_flops(cfg), True), (attention_heavy, False)):
        prof.extra["checks"] = []
        prof.measure_whole = whole  # the whole models: FLOP-proportional (no gain), or attention-heavy
        got = L.refine(tcfg, plain, prof, "flops", target)
        assert (got == plain) is kept
        (check,) = prof.checks
        assert check["from"] == describe_shape(_cfg(tcfg, plain)) and check["predicted_per_flop"] < 0.95
        assert check["measured_per_flop"] == pytest.approx(1.0) if kept else check["measured_per_flop"] < 0.95
