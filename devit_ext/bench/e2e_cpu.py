"""`devit-ext bench e2e --device cpu`: the local engine against every single-machine alternative.

Teacher timm `vit_small_patch16_224` (224 px, 100 classes), 4 sub-models of the
decomposition's default budget (40% of the teacher's FLOPs), fp32. Rows, timed
interleaved round after round in one process on the same inputs:

- teacher eager (the baseline of `speedup`), under torch.compile, exported to
  ONNX and run by onnxruntime (`speedup_vs_ort` is against this row)
- naive Python loop over the sub-models (`DeViT.forward`, eager)
- the 4 sub-models one after the other in onnxruntime (one session each) + fusion
- plain-torch stacked model (eager)
- the local engine (`collaborate`, int8) on its torch sender and on its
  onnxruntime sender (`backend="onnxruntime"`); the row's note says which
  sender path ran (never a silent fallback)
- the distributed engine over loopback (spawned workers)

A second table (`_e2e_cct_rows`): a CCT teacher (`cct_14_7x2_224`) against its 4-device
DeCCT from `decompose`, the same kinds of rows (DEVIT_E2E_SKIP=cct leaves it out).

Quiet-machine guard: per round, the CPU time other processes used (from
/proc/stat minus this process's own, /proc/self/stat) in cores. Medians use the
rounds where others used under `QUIET_CORES` cores when at least 3 such rounds
exist, else every round; the table says which (`rounds`, `others_load`).

Every onnxruntime session runs with `session.intra_op.allow_spinning = 0`, or its
idle threads would slow the next row. Env knobs: DEVIT_E2E_BATCHES="1,8,32",
DEVIT_E2E_SKIP="compile,distributed,ort,worker,cct", DEVIT_E2E_ROUNDS=7, DEVIT_E2E_IMG=224.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from ._e2e_rows import Setting, _ort_fn, _Tokens  # noqa: F401 - re-exported for scripts/
from .timing import Table

QUIET_CORES = 0.5
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine, ticks of this process) so far; (0, 0) where /proc is absent."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            s = f.read().rsplit(")", 1)[1].split()
        busy = sum(v) - v[3] - (v[4] if len(v) > 4 else 0)  # minus idle and iowait
        return busy, int(s[11]) + int(s[12])  # utime + stime of every thread of this process
    except OSError:
        return 0, 0


class Guard:
    """Measures the CPU load of other processes over a stretch of time, in cores."""

    def __enter__(self):
        self.t0, self.c0 = time.perf_counter(), _cpu_ticks()
        return self

    def __exit__(self, *exc):
        dt = time.perf_counter() - self.t0
        c1 = _cpu_ticks()
        others = (c1[0] - self.c0[0]) - (c1[1] - self.c0[1])
        self.others_cores = max(0.0, others / _TICK / dt) if dt > 0 else 0.0
        return False


def interleave(table: Table, batch: int, entries, inputs, rounds: int, warmup: int = 1,
               ort_row: str = "teacher onnxruntime") -> dict[str, float]:
    """Time each (name, fn, note) in turn, round after round; rows with medians over the quiet rounds.
    `speedup` is against the first entry, `speedup_vs_ort` against `ort_row`."""
    setup, live = {}, []
    with torch.inference_mode():
        for name, fn, note in entries:
            try:
                t0 = time.perf_counter()
                fn(inputs[0])
                setup[name] = time.perf_counter() - t0
                live.append((name, fn, note))
            except Exception as e:  # noqa: BLE001 - the row says what failed; nothing is faked
                msg = str(e).splitlines()[0][:160] if str(e) else ""
                table.add(row=name, batch=batch, ms="-", note=f"failed: {type(e).__name__}: {msg}")
        times: dict[str, list[float]] = {n: [] for n, _, _ in live}
        load: list[float] = []
        for r in range(warmup + rounds):
            x = inputs[r % len(inputs)]
            with Guard() as g:
                per = {}
                for name, fn, _ in live:
                    t0 = time.perf_counter()
                    fn(x)
                    per[name] = time.perf_counter() - t0
            if r >= warmup:
                load.append(g.others_cores)
                for n, s in per.items():
                    times[n].append(s)
            # progress on stderr: a slow, loaded run shows where it is
            print(f"[e2e cpu] batch {batch} round {r + 1}/{warmup + rounds} others {g.others_cores:.2f} cores: "
                  + "; ".join(f"{n} {v * 1e3:.0f}" for n, v in per.items()), file=sys.stderr, flush=True)
    quiet = [i for i, c in enumerate(load) if c < QUIET_CORES]
    use = quiet if len(quiet) >= 3 else list(range(len(load)))
    which = f"{len(use)}/{len(load)} quiet" if use is quiet else f"all {len(load)} (only {len(quiet)} quiet)"
    med = {n: statistics.median([v[i] for i in use]) for n, v in times.items()}
    base = med.get(entries[0][0])
    ort_base = med.get(ort_row)
    loads = [load[i] for i in use]
    for name, _, note in live:
        s = med[name]
        spread = [times[name][i] for i in use]
        table.add(row=name, batch=batch, ms=s * 1e3, ms_per_image=s * 1e3 / batch,
                  min_ms=min(spread) * 1e3, max_ms=max(spread) * 1e3,
                  speedup=(base / s) if base else "-", speedup_vs_ort=(ort_base / s) if ort_base else "-",
                  rounds=which, others_load=f"{statistics.median(loads):.2f} ({min(loads):.2f}-{max(loads):.2f})",
                  others_load_rounds=" ".join(f"{c:.2f}" for c in load),
                  setup_s=setup[name], note=note() if callable(note) else note)
    return med


def run_cpu(quick: bool, env_list) -> list[Table]:
    from ._e2e_rss import rss_rows
    from ._e2e_targets import targets

    skip = set(env_list("DEVIT_E2E_SKIP"))
    batches = [int(b) for b in env_list("DEVIT_E2E_BATCHES")] or ([1, 8] if quick else [1, 8, 32])
    rounds = int(os.environ.get("DEVIT_E2E_ROUNDS", "3" if quick else "7"))
    img = int(os.environ.get("DEVIT_E2E_IMG") or 224)  # smaller for smoke runs; the title says which
    # peak RSS: one fresh subprocess per row (seconds each): on by default, off for --quick
    rss = os.environ.get("DEVIT_E2E_RSS", "0" if quick else "1") not in ("", "0")
    t, names, meds = _timed(Setting(skip, img), batches, rounds)  # its models are freed before the CCT table
    cct_table = None
    if "cct" not in skip:
        from ._e2e_cct_rows import TEACHER_ORT_ROW, CctSetting

        try:
            cct_table = _timed(CctSetting(skip, img), batches, rounds, ort_row=TEACHER_ORT_ROW)[0]
        except Exception as e:  # noqa: BLE001 - the table says what failed; nothing is faked
            cct_table = Table("e2e cpu cct: failed")
            cct_table.add(row="CCT teacher vs DeCCT", ms="-",
                          note=f"failed to build: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    rss_table = rss_rows(names, max(batches), img, skip) if rss else None
    if rss_table is not None:  # each row's peak RSS next to its times
        peaks = {r["row"]: r for r in rss_table.rows}
        for r in t.rows:
            p = peaks.get(r["row"])
            if p is not None and "peak_rss_mb" in p:
                r["peak_rss_mb"], r["rss_above_imports_mb"] = p["peak_rss_mb"], p["rss_above_imports_mb"]
    tables = [t, targets(meds, rss_table, batches)]
    if rss_table is not None:
        tables.insert(1, rss_table)
    if cct_table is not None:
        tables.append(cct_table)
    return tables


def _timed(st, batches, rounds, **kw) -> tuple[Table, list[str], dict[int, dict[str, float]]]:
    """One setting's table: build its rows (a row that fails to build says so), time them at every batch.
    Returns (table, names of the rows that ran, {batch: {row: median seconds}})."""
    from ._e2e_models import _inputs

    t = Table(st.title)
    entries = []
    for name, make, note in st.rows():
        try:
            with torch.no_grad():
                entries.append((name, make(), note))
        except Exception as e:  # noqa: BLE001 - the row says what failed; nothing is faked
            t.add(row=name, ms="-", note=f"failed to build: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    for name, why in st.skipped:
        t.add(row=name, ms="-", note=f"skipped: {why}")
    meds = {}
    for b in batches:
        meds[b] = interleave(t, b, entries, _inputs(b, st.model, "cpu", torch.float32, n=2), rounds=rounds, **kw)
    return t, [n for n, _, _ in entries], meds
