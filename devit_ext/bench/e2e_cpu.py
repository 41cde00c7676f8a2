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

Quiet-machine guard: per round, the CPU time other processes used (from
/proc/stat minus this process's own, /proc/self/stat) in cores. Medians use the
rounds where others used under `QUIET_CORES` cores when at least 3 such rounds
exist, else every round; the table says which (`rounds`, `others_load`).

Every onnxruntime session runs with `session.intra_op.allow_spinning = 0`, or its
idle threads would slow the next row. Env knobs: DEVIT_E2E_BATCHES="1,8,32",
DEVIT_E2E_SKIP="compile,distributed,ort", DEVIT_E2E_ROUNDS=7, DEVIT_E2E_IMG=224.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch

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


def interleave(table: Table, batch: int, entries, inputs, rounds: int, warmup: int = 1) -> dict[str, float]:
    """Time each (name, fn, note) in turn, round after round; rows with medians over the quiet rounds."""
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
    ort_base = med.get("teacher onnxruntime")
    loads = [load[i] for i in use]
    for name, _, note in live:
        s = med[name]
        spread = [times[name][i] for i in use]
        table.add(row=name, batch=batch, ms=s * 1e3, ms_per_image=s * 1e3 / batch,
                  min_ms=min(spread) * 1e3, max_ms=max(spread) * 1e3,
                  speedup=(base / s) if base else "-", speedup_vs_ort=(ort_base / s) if ort_base else "-",
                  rounds=which, others_load=f"{statistics.median(loads):.2f} ({min(loads):.2f}-{max(loads):.2f})",
                  setup_s=setup[name], note=note() if callable(note) else note)
    return med


def _ort_fn(module, example):
    """An onnxruntime callable for `module` (input images -> one output), spinning off."""
    from ..engines import ort_sender

    sess = ort_sender.make_session(ort_sender.onnx_bytes(module.eval(), example))
    return lambda x: torch.from_numpy(sess.run(None, {"images": x.contiguous().numpy()})[0])


class _Tokens(torch.nn.Module):
    def __init__(self, sub):
        super().__init__()
        self.sub = sub

    def forward(self, images):
        return self.sub.forward_tokens(images)


def run_cpu(quick: bool, env_list) -> Table:
    from ..engines import collaborate, ort_sender
    from ..shapes import teacher_config, vit_flops
    from ._e2e_models import CPU_TEACHER, NUM_DEVICES, PlainStacked, _inputs, build_devit, default_cpu_shape, make_teacher

    skip = set(env_list("DEVIT_E2E_SKIP"))
    batches = [int(b) for b in env_list("DEVIT_E2E_BATCHES")] or ([8] if quick else [1, 8, 32])
    rounds = int(os.environ.get("DEVIT_E2E_ROUNDS", "3" if quick else "7"))
    img = int(os.environ.get("DEVIT_E2E_IMG") or 224)  # smaller for smoke runs; the title says which
    teacher = make_teacher(CPU_TEACHER, img_size=img)
    shape, how = default_cpu_shape(teacher)
    model = build_devit(teacher, [shape] * NUM_DEVICES)
    frac = sum(model.flops()) / vit_flops(teacher_config(teacher))
    ort_ok, ort_why = ort_sender.available()
    if "ort" in skip:
        ort_ok, ort_why = False, "DEVIT_E2E_SKIP=ort"
    t = Table(f"e2e cpu: {CPU_TEACHER} ({img} px) vs {NUM_DEVICES}x(d={shape['embed_dim']},H={shape['num_heads']},"
              f"L={shape['depth']},mlp={shape['mlp_hidden']}) = {frac:.0%} of the teacher's FLOPs [{how}], fp32, "
              f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at start; "
              f"onnxruntime: {ort_why}")
    box: dict = {}

    def engine(backend):
        def fn(x):
            out, st = collaborate(model, x, backend=backend, return_stats=True)
            box[backend] = st
            return out
        return fn

    def engine_note(backend):
        def note():
            st = box.get(backend)
            if st is None:
                return ""
            ops_ = ", ".join(f"{k}={v.split(' (')[0]}" for k, v in st.op_paths.items())
            return f"sender={st.extra['sender_backend']}; {st.transfer_bytes_per_image[0]} B/image/device; {ops_}"
        return note

    example = _inputs(2, model, "cpu", torch.float32, n=1)[0]
    entries = [("teacher eager (timm)", teacher, "baseline of speedup")]
    if "compile" not in skip:
        entries.append(("teacher torch.compile", torch.compile(teacher), "inductor, default mode"))
    if ort_ok:
        with torch.no_grad():
            entries.append(("teacher onnxruntime", _ort_fn(teacher, example), "baseline of speedup_vs_ort"))
    entries.append(("naive loop eager", model, "DeViT.forward: the sub-models one after the other"))
    if ort_ok:
        with torch.no_grad():
            subs = [_ort_fn(_Tokens(s), example) for s in model.submodels]

        def seq(x):
            return model.fusion([f(x) for f in subs])
        entries.append(("sub-models one after the other in onnxruntime", seq, "4 sessions + fusion head in torch"))
    entries.append(("plain stacked eager", PlainStacked(model), ""))
    entries.append(("local engine (ours, int8, torch sender)", engine("torch"), engine_note("torch")))
    if ort_ok:
        entries.append(("local engine (ours, int8, onnxruntime sender)", engine("onnxruntime"),
                        engine_note("onnxruntime")))
    else:
        t.add(row="local engine (ours, int8, onnxruntime sender)", ms="-", note=f"skipped: {ort_why}")
    if "distributed" not in skip:
        def dist(x):
            return collaborate(model, x, engine="distributed", spawn=True, timeout=60.0)
        entries.append(("distributed engine (loopback, spawned workers)", dist, ""))
    else:
        t.add(row="distributed engine (loopback, spawned workers)", ms="-", note="skipped: DEVIT_E2E_SKIP")
    for b in batches:
        interleave(t, b, entries, _inputs(b, model, "cpu", torch.float32, n=2), rounds=rounds)
    return t
