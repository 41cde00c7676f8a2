"""`devit-ext bench static`: what the compiler makes of every GPU kernel, without a GPU.

    devit-ext bench static [--arch 80,90] [--json FILE] [--quick]

For every Triton kernel (the configuration its launcher picks at each benchmark
shape, every dtype) and every CUDA kernel of csrc/quant_cuda.cu, compiled for
each arch: registers, spills, shared memory, tensor-core MMA (kind and count),
load widths and the occupancy that follows (see _gpu_arch). Then the checks:

- no_spills: no spill stores or loads;
- shared_fits: static + dynamic shared memory within the arch's per-block limit,
  and at least one block fits an SM;
- tensor_cores: every bf16/fp16 Triton configuration uses tensor-core MMA, and
  on sm_90 it is wgmma.

Every row is a configuration some launcher picks, so "the configuration each
launcher picks passes" is every row passing; `picks` says which shapes chose
which configuration, with the grid, waves and a roofline estimate.
Exit status: 0 all checks hold, 1 a check failed, 2 nothing could be compiled.
JSON: {"rows": [...], "picks": [...], "checks": [...], "skipped": [...], "machine": {...}}.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time

from . import _gpu_arch, _static_cuda, _static_triton
from .timing import Table, machine_info

MMA_DTYPES = ("bf16", "fp16")
ROW_COLUMNS = ("kernel", "arch", "dtype", "config", "spec", "registers", "spill_bytes", "spill_loads", "shared_bytes",
               "threads", "mma", "mma_count", "ldg_128", "ldgsts_128", "ldg_narrow", "local_ld_st", "blocks_per_sm",
               "occupancy", "limiter")


def parse_archs(text: str) -> list[int]:
    try:
        archs = [int(a.strip().removeprefix("sm_")) for a in str(text).split(",") if a.strip()]
    except ValueError:
        raise ValueError(f"--arch: expected a comma-separated list like 80,90, got {text!r}") from None
    bad = [a for a in archs if a not in _gpu_arch.ARCHS]
    if not archs or bad:
        raise ValueError(f"--arch: expected archs among {sorted(_gpu_arch.ARCHS)}, got {text!r}")
    return sorted(set(archs))


def check_rows(rows: list[dict]) -> list[dict]:
    """One entry per failed check: {check, kernel, arch, dtype, config, detail, shapes}."""
    fails = []

    def fail(check, r, detail):
        fails.append({"check": check, "kernel": r["kernel"], "arch": r["arch"], "dtype": r["dtype"],
                      "config": r["config"], "detail": detail, "shapes": r.get("shapes", [])})

    for r in rows:
        lim = _gpu_arch.limits(r["arch"])
        if r["spill_bytes"] or r["spill_loads"]:
            fail("no_spills", r, f"{r['spill_bytes']} B spill stores, {r['spill_loads']} B spill loads "
                                 f"at {r['registers']} registers")
        if r["shared_bytes"] > lim.shared_per_block_optin or r["blocks_per_sm"] < 1:
            fail("shared_fits", r, f"{r['shared_bytes']} B shared (limit {lim.shared_per_block_optin}), "
                                   f"{r['blocks_per_sm']} blocks/SM")
        if not r["kernel"].startswith("cuda:") and r["dtype"] in MMA_DTYPES:
            want = "wgmma" if r["arch"] >= 90 else None
            if r["mma"] is None:
                fail("tensor_cores", r, "no tensor-core MMA in the PTX")
            elif want and r["mma"] != want:
                fail("tensor_cores", r, f"{r['mma']} instead of {want} on sm_{r['arch']}")
    return fails


def roofline(picks: list[dict], rows: list[dict]) -> None:
    """Adds t_roof_us (max of FLOPs/peak, bytes/HBM) and t_est_us (divided by the SM fill / wave efficiency)."""
    by_config = {(r["kernel"], r["arch"], r["dtype"], r["config"]): r for r in rows}
    for p in picks:
        lim = _gpu_arch.limits(p["arch"])
        r = by_config[(p["kernel"], p["arch"], p["dtype"], p["config"])]
        peak = lim.peak_tc_tflops if r["mma"] else lim.peak_fp32_tflops
        t_flops, t_bytes = p["flops"] / (peak * 1e12), p["bytes"] / (lim.hbm_gbs * 1e9)
        slots = max(1, r["blocks_per_sm"]) * lim.sms
        if p["programs"] < lim.sms:
            eff = p["programs"] / lim.sms  # SMs with no program idle
        else:
            eff = p["programs"] / (math.ceil(p["programs"] / slots) * slots)  # last-wave tail
        p.update(bound="compute" if t_flops >= t_bytes else "memory", t_roof_us=1e6 * max(t_flops, t_bytes),
                 sm_fill=eff, t_est_us=1e6 * max(t_flops, t_bytes) / max(eff, 1e-9))


def collect(archs, quick: bool, dtypes=None) -> dict:
    out = {"rows": [], "picks": [], "skipped": []}
    why = _static_triton.unavailable_reason()
    if why:
        out["skipped"].append({"part": "triton kernels", "reason": why})
    else:
        rows, picks = _static_triton.rows(archs, quick, dtypes)
        roofline(picks, rows)
        out["rows"] += rows
        out["picks"] += picks
    why = _static_cuda.unavailable_reason()
    if why:
        out["skipped"].append({"part": "cuda kernels (csrc/quant_cuda.cu)", "reason": why})
    else:
        out["rows"] += _static_cuda.rows(archs)
    out["checks"] = check_rows(out["rows"])
    return out


def _write_json(path: str, obj: dict) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".static-", suffix=".json", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=str)
        os.replace(tmp, path)  # atomic: a reader never sees half a file
    except BaseException:
        os.unlink(tmp)
        raise


def format_report(res: dict) -> str:
    t = Table("static: compiled kernels (one row per kernel x config x dtype x arch)")
    t.extend([{c: r.get(c, "") for c in ROW_COLUMNS} for r in res["rows"]])
    p = Table("static picks: the launcher's choice per benchmark shape (roofline from spec-sheet peaks)")
    p.extend([{c: q[c] for c in ("kernel", "shape", "dtype", "arch", "config", "programs", "waves", "bound",
                                 "t_roof_us", "sm_fill", "t_est_us")} for q in res["picks"]])
    parts = [t.format(), p.format()]
    for s in res["skipped"]:
        parts.append(f"SKIPPED {s['part']}: {s['reason']}")
    if res["checks"]:
        lines = [f"CHECKS FAILED ({len(res['checks'])}):"]
        lines += [f"  {c['check']}: {c['kernel']} sm_{c['arch']} {c['dtype']} [{c['config']}]: {c['detail']}"
                  f" (shapes: {', '.join(c['shapes']) or '-'})" for c in res["checks"]]
        parts.append("\n".join(lines))
    else:
        parts.append(f"checks: all hold ({len(res['rows'])} compiled configurations)")
    return "\n\n".join(parts)


def main(args) -> int:
    try:
        archs = parse_archs(args.arch)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    t0 = time.perf_counter()
    res = collect(archs, quick=args.quick)
    res["seconds"] = time.perf_counter() - t0
    res["archs"] = archs
    res["machine"] = machine_info()
    print("machine:", res["machine"])
    print(format_report(res))
    print(f"\n{len(res['rows'])} configurations compiled in {res['seconds']:.0f} s")
    if args.json:
        _write_json(args.json, res)
        print("written:", args.json)
    if not res["rows"]:
        return 2
    return 1 if res["checks"] else 0
