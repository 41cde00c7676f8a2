"""`devit-ext bench e2e`: whole-model latency and throughput, teacher vs. decomposed.

GPU (the canonical setting): teacher timm `vit_large_patch16_224` (random weights,
100 classes), 4 ViT-Ti-shaped sub-models (192 wide, 3 heads, 12 blocks, MLP
768), bf16, batches 1, 8, 64, 256. Rows, all in one run on the same inputs:

- teacher eager / in a CUDA graph / torch.compile (default mode)
- naive sub-model loop (`DeViT.forward`, the authors' way) eager / compiled
- plain-torch stacked model (`PlainStacked`: baddbmm + one SDPA call +
  per-model LayerNorm) under torch.compile(mode="max-autotune-no-cudagraphs")
  (batches 64 and 256 only: ~2 min of autotuning per batch size)
- our local engine: `devit_ext.collaborate(model, images)` (int8 tokens,
  bf16, CUDA graphs), timed as a user calls it (argument and image checks
  included); and with `compile=True` (inductor fuses the elementwise passes
  of the sender side, the devit ops stay opaque), still in CUDA graphs

CPU (2 cores): bench/e2e_cpu.py (teacher ViT-S/16 eager, compiled and on
onnxruntime; naive loop; sub-models in onnxruntime one after the other; plain
stacked; the local engine on its torch and onnxruntime senders; distributed
over loopback), interleaved with a quiet-machine guard.

Speed does not depend on weight values, so the DeViT is built directly with
the shapes `decompose` would give (random initialisation) instead of running
the importance scoring on a large teacher. Every row has `speedup` =
teacher-eager time / row time (same batch, same run).

Environment knobs (for sizing device runs): DEVIT_E2E_BATCHES="64,256",
DEVIT_E2E_SKIP="compile,autotune,graph,distributed" (row families to leave out),
DEVIT_E2E_IMG=32 (CPU only: the teacher's image size, default 224; a smoke-test
size, the title says which was used).
"""
from __future__ import annotations

import os
import statistics
import time
import traceback
from typing import Callable

import torch

from .timing import Table, median_time

from ._e2e_models import (  # noqa: F401 - re-exported: tests and scripts build models from here
    CPU_TEACHER, GPU_SUB, GPU_TEACHER, NUM_CLASSES, NUM_DEVICES, PlainStacked, _inputs, build_devit,
    default_cpu_shape, make_teacher)


# ---------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------


def cuda_graphed(fn: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor):
    static = example.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(static)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn(static)

    def run(x):
        static.copy_(x)
        g.replay()
        return out

    return run


def _env_list(name: str) -> list[str]:
    v = os.environ.get(name, "")
    return [s.strip() for s in v.split(",") if s.strip()]


class _Rows:
    def __init__(self, table: Table, device: str, iters: int, warmup: int, min_seconds: float):
        self.t, self.device, self.iters, self.warmup, self.min_seconds = table, device, iters, warmup, min_seconds
        self.base: dict[int, float] = {}

    def time(self, name: str, batch: int, fn, inputs, *, baseline: bool = False, setup_s: float | None = None, **extra):
        try:
            t0 = time.perf_counter()
            with torch.inference_mode():
                fn(inputs[0])  # first call: compile / capture / spawn, reported as setup
                first = time.perf_counter() - t0
                s = median_time(fn, [(x,) for x in inputs], device=self.device, warmup=self.warmup, iters=self.iters,
                                min_seconds=self.min_seconds)
        except Exception as e:  # noqa: BLE001 - the row says what failed; nothing is faked
            self.t.add(row=name, batch=batch, ms="-", images_per_s="-", speedup="-",
                       note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__)
            if os.environ.get("DEVIT_E2E_TRACE"):
                traceback.print_exc()
            return None
        if baseline:
            self.base[batch] = s
        ref = self.base.get(batch)
        row = {"row": name, "batch": batch, "ms": s * 1e3, "images_per_s": batch / s,
               "speedup": (ref / s) if ref else "-", "setup_s": setup_s if setup_s is not None else first}
        row.update(extra)
        self.t.add(**row)
        return s

    def interleaved(self, batch: int, entries: list[tuple[str, Callable]], inputs, rounds: int) -> dict[str, float]:
        """CPU: time every entry in turn, round after round (load drift on a shared machine hits all rows
        alike); median per entry. The first entry is the batch's baseline. A failing entry gets a row
        saying why."""
        setup, live = {}, []
        with torch.inference_mode():
            for name, fn in entries:
                try:
                    t0 = time.perf_counter()
                    fn(inputs[0])
                    setup[name] = time.perf_counter() - t0
                    live.append((name, fn))
                except Exception as e:  # noqa: BLE001 - the row says what failed
                    self.t.add(row=name, batch=batch, ms="-", images_per_s="-", speedup="-",
                               note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
            times: dict[str, list[float]] = {n: [] for n, _ in live}
            for r in range(self.warmup + rounds):
                for name, fn in live:
                    x = inputs[r % len(inputs)]
                    t0 = time.perf_counter()
                    fn(x)
                    if r >= self.warmup:
                        times[name].append(time.perf_counter() - t0)
        med = {n: statistics.median(v) for n, v in times.items()}
        base = med.get(entries[0][0])
        for name, _ in live:
            s = med[name]
            self.t.add(row=name, batch=batch, ms=s * 1e3, images_per_s=batch / s,
                       speedup=(base / s) if base else "-", setup_s=setup[name])
        return med

    def skip(self, name: str, batch: int, why: str):
        self.t.add(row=name, batch=batch, ms="-", images_per_s="-", speedup="-", note=f"skipped: {why}")


# ---------------------------------------------------------------------------
# Suites
# ---------------------------------------------------------------------------


def run(device: str, quick: bool) -> list[Table]:
    return [_run_gpu(quick)] if device == "cuda" else _run_cpu(quick)


def _run_gpu(quick: bool) -> Table:
    from ..engines import collaborate

    dt = torch.bfloat16
    skip = set(_env_list("DEVIT_E2E_SKIP"))
    batches = [int(b) for b in _env_list("DEVIT_E2E_BATCHES")] or ([1, 64, 256] if quick else [1, 8, 64, 256])
    if quick:
        skip |= {"autotune"}
    teacher = make_teacher(GPU_TEACHER).cuda().to(dt)
    model = build_devit(teacher, [GPU_SUB] * NUM_DEVICES).cuda()
    model_bf16 = build_devit(teacher, [GPU_SUB] * NUM_DEVICES).cuda().to(dt)  # naive loop runs in bf16
    stacked = PlainStacked(model_bf16).cuda()
    shape = f"{NUM_DEVICES}x(d={GPU_SUB['embed_dim']},H={GPU_SUB['num_heads']},L={GPU_SUB['depth']},mlp={GPU_SUB['mlp_hidden']})"
    t = Table(f"e2e gpu: {GPU_TEACHER} vs {shape}, bf16, {NUM_CLASSES} classes")
    rows = _Rows(t, "cuda", iters=10 if quick else 30, warmup=3 if quick else 10, min_seconds=0.0 if quick else 0.5)
    compiled_teacher = torch.compile(teacher) if "compile" not in skip else None
    compiled_loop = torch.compile(model_bf16) if "compile" not in skip else None
    autotuned = torch.compile(stacked, mode="max-autotune-no-cudagraphs") if "autotune" not in skip else None
    for b in batches:
        xs = _inputs(b, model, "cuda", dt)
        rows.time("teacher eager (timm)", b, teacher, xs, baseline=True)
        if "graph" not in skip:
            with torch.inference_mode():
                tg = cuda_graphed(teacher, xs[0])
            rows.time("teacher CUDA graph", b, tg, xs)
        if compiled_teacher is not None:
            rows.time("teacher torch.compile", b, compiled_teacher, xs)
        rows.time("naive loop eager", b, model_bf16, xs)
        if compiled_loop is not None:
            rows.time("naive loop torch.compile", b, compiled_loop, xs)
        if autotuned is not None and b >= 64:
            rows.time("plain stacked compile max-autotune-no-cudagraphs", b, autotuned, xs)
        elif autotuned is None:
            rows.skip("plain stacked compile max-autotune-no-cudagraphs", b, "--quick / DEVIT_E2E_SKIP (compiles ~2 min)")
        stats = {}

        def engine(x):
            out, st = collaborate(model, x, return_stats=True)
            stats["st"] = st
            return out

        rows.time("local engine (ours, int8, CUDA graphs)", b, engine, xs)
        if "st" in stats:
            st = stats.pop("st")
            t.rows[-1]["bytes_per_image_per_device"] = st.transfer_bytes_per_image[0]
            t.rows[-1]["note"] = "ops: " + ", ".join(f"{k}={v}" for k, v in st.op_paths.items())
        if "compile" not in skip:

            def engine_compiled(x):
                out, st = collaborate(model, x, compile=True, return_stats=True)
                stats["st"] = st
                return out

            rows.time("local engine + compile=True (inductor-fused sender)", b, engine_compiled, xs)
        if "st" in stats:
            st = stats["st"]
            t.rows[-1]["bytes_per_image_per_device"] = st.transfer_bytes_per_image[0]
            t.rows[-1]["note"] = "ops: " + ", ".join(f"{k}={v}" for k, v in st.op_paths.items())
    return t


def _run_cpu(quick: bool) -> list[Table]:
    from .e2e_cpu import run_cpu  # imports only _e2e_models and timing, not this module

    return run_cpu(quick, _env_list)
