"""Latency in the shape search: latency budgets, and at equal cost the faster heads / MLP width.

`search_latency`: the uniform shape whose predicted latency (a latency model, see
`profile.py`) is at most the budget and within `LATENCY_WINDOW` of it, the most
teacher-like among those (`budgets.penalty`, the FLOPs search's measure), as
`budgets.search_shape` does for FLOPs.

`refine`: the search's second step when a latency model is given. It keeps the
chosen embed width and depth (the teacher-like part) and looks at every head count
and every MLP width from half to twice the chosen ones whose cost is still within
`SEARCH_TOL` of a FLOPs / params budget (or whose latency still fits a latency
budget), and takes the pair with the least predicted time per FLOP (per parameter
for a params budget): at equal FLOPs, fewer heads when the N x N attention is slow
per FLOP here, an MLP width the GEMMs run well; at equal latency, more FLOPs. It
changes the shape only for a gain of at least `LATENCY_GAIN` (below that, a
profile's noise would pick), and, when the profile was measured on this machine
(`LatencyProfile.measure_whole`), only when the two whole models measured here
confirm that gain: components timed alone miss part of how a whole graph runs
(ViT-S/16, d128 L9: one head fewer and a wider MLP predicted 7% / 12% less time per
FLOP on torch / onnxruntime, measured 2.8% / 2.6%; docs/perf-notes.md).
"""
from __future__ import annotations

import math

import torch

from ..budgets import SEARCH_TOL, _dims, penalty
from ..shapes import describe_shape, flops_of, params_of, uniform_config

LATENCY_WINDOW = 2 * SEARCH_TOL  # a latency budget is a cap: aim in [(1 - 0.06) x budget, budget]
LATENCY_GAIN = 0.05  # refine moves off the teacher-like shape for >= 5% less time per FLOP (the profile's error
# against whole models measured here was 1-6%)
SPAN = 2.0  # refine looks at heads and MLP widths from 1/2 to 2x the teacher-like shape's


def _teacher(tcfg: dict):
    LT = len(tcfg["blocks"])
    HT = max(b["num_heads"] for b in tcfg["blocks"])
    MT = max(b["mlp_hidden"] for b in tcfg["blocks"])
    return tcfg["embed_dim"], tcfg["head_dim"], LT, HT, MT


def _shape(d: int, L: int, h: int, m: int) -> dict:
    return {"embed_dim": int(d), "depth": int(L), "num_heads": int(h), "mlp_hidden": int(m),
            "blocks": [{"num_heads": int(h), "mlp_hidden": int(m)}] * int(L)}


def search_latency(tcfg: dict, target_s: float, lat) -> dict:
    """The uniform shape closest below `target_s` seconds per image under latency model `lat`."""
    dT, D, LT, HT, MT = _teacher(tcfg)
    full = lat.predict(tcfg)
    if target_s >= full:
        return _shape(dT, LT, HT, MT) | {"blocks": [dict(b) for b in tcfg["blocks"]]}
    f64 = torch.float64
    d = torch.tensor(_dims(dT), dtype=f64)
    h = torch.arange(1, HT + 1, dtype=f64)
    L = torch.arange(1, LT + 1, dtype=f64)
    m = torch.tensor(_dims(MT), dtype=f64)
    stem = lat.stem_s(d)  # (nd,)
    A = lat.attn_s(d[:, None], h[None, :])  # (nd, nh)
    M = lat.mlp_s(d[:, None], m[None, :])  # (nd, nm)
    # per (d, h, L) the MLP time that fills the budget; the MLP time grows with m (cummax guards against a
    # noisy profile), so the widths just below and above it are the candidates, as floor/ceil are for FLOPs
    need = (target_s - stem[:, None, None]) / L[None, None, :] - A[:, :, None]  # (nd, nh, nL)
    mono = torch.cummax(M, dim=1).values
    nd, nh, nL = need.shape
    j = torch.searchsorted(mono.contiguous(), need.reshape(nd, -1).contiguous()).reshape(nd, nh, nL)
    cands = torch.stack([(j - 1).clamp(0, len(m) - 1), j.clamp(0, len(m) - 1)])  # (2, nd, nh, nL)
    Mc = M[torch.arange(nd)[None, :, None, None], cands]  # (2, nd, nh, nL)
    c = stem[None, :, None, None] + L * (A[None, :, :, None] + Mc)
    mc = m[cands]
    ratio = MT / dT
    L_pref = max(1.0, LT * (target_s / full) ** 0.15)
    pen = penalty(d[None, :, None, None], h[None, None, :, None], L, mc, D, ratio, L_pref)
    rel = c / target_s
    ok = (rel <= 1.0) & (rel >= 1.0 - LATENCY_WINDOW)
    key = torch.where(ok, pen + (1.0 - rel), torch.where(rel <= 1.0, 1e6 + (1.0 - rel), 2e6 + rel))
    i = int(torch.argmin(key.flatten()))  # first minimum: deterministic
    k, di, hi, li = (int(v) for v in torch.unravel_index(torch.tensor(i), key.shape))
    return _shape(d[di], L[li], h[hi], mc[k, di, hi, li])


def refine(tcfg: dict, shape: dict, lat, kind: str, target: float) -> dict:
    """`shape` with heads / MLP width traded for latency at equal cost (see the module docstring)."""
    dT, D, LT, HT, MT = _teacher(tcfg)
    d0, L0, h0, m0 = shape["embed_dim"], shape["depth"], shape["num_heads"], shape["mlp_hidden"]
    if shape["blocks"] != [{"num_heads": h0, "mlp_hidden": m0}] * L0:
        return shape  # the teacher's own (possibly non-uniform) blocks: nothing to trade
    hs = list(range(max(1, math.ceil(h0 / SPAN)), min(HT, int(h0 * SPAN)) + 1))
    ms = sorted({w for w in _dims(MT) if m0 / SPAN <= w <= m0 * SPAN} | {m0})
    f64 = torch.float64
    ht, mt = torch.tensor(hs, dtype=f64), torch.tensor(ms, dtype=f64)
    t = lat.stem_s(torch.tensor([float(d0)], dtype=f64))[0] + L0 * (
        lat.attn_s(torch.full_like(ht, d0), ht)[:, None] + lat.mlp_s(torch.full_like(mt, d0), mt)[None, :])
    measure = params_of if kind == "params" else flops_of  # a latency budget maximises FLOPs
    c00 = measure(uniform_config(tcfg, d0, L0, h0, m0))
    # FLOPs and params add over a block's attention and MLP parts: c(h, m) = c(h, m0) + c(h0, m) - c(h0, m0)
    ch = torch.tensor([measure(uniform_config(tcfg, d0, L0, h, m0)) for h in hs], dtype=f64)
    cm = torch.tensor([measure(uniform_config(tcfg, d0, L0, h0, m)) for m in ms], dtype=f64)
    c = ch[:, None] + cm[None, :] - c00
    i0 = (hs.index(h0), ms.index(m0))
    if kind == "latency":
        ok = (t <= target) & (t >= (1 - LATENCY_WINDOW) * target)
    else:
        ok = (c / target - 1).abs() <= SEARCH_TOL
    # seconds per FLOP (per parameter): comparing latencies alone would just take the cheapest shape
    # the tolerance allows, 3% fewer FLOPs for 3% less time
    per = t / c
    score = torch.where(ok, per, torch.full_like(per, math.inf))
    if not bool(ok.any()):
        return shape
    b = tuple(int(v) for v in torch.unravel_index(torch.argmin(score), score.shape))
    if b == i0 or not float(per[b]) <= float(per[i0]) * (1 - LATENCY_GAIN):
        return shape
    new = _shape(d0, L0, hs[b[0]], ms[b[1]])
    check = getattr(lat, "measure_whole", None)  # a profile measured here: check the trade on whole models
    if check is not None:
        cfg0, cfg1 = uniform_config(tcfg, d0, L0, h0, m0), uniform_config(tcfg, d0, L0, hs[b[0]], ms[b[1]])
        got = check(cfg1) / measure(cfg1) / (check(cfg0) / measure(cfg0))
        rec = {"from": describe_shape(cfg0), "to": describe_shape(cfg1),
               "predicted_per_flop": float(per[b] / per[i0]), "measured_per_flop": got}
        if rec not in lat.checks:  # equal devices check the same trade once (the timings are memoised)
            lat.checks.append(rec)
        if not got <= 1 - LATENCY_GAIN:
            return shape
    return new
