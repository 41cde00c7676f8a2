"""Issue 16's CPU targets, read off one `bench e2e --device cpu` run (same run, same inputs).

Every line is a ratio of two medians of that run (higher is better, except per-image cost and
RSS, where the line says), the target, and met / missed; a row that did not run gives "-".
The engine checked is the local engine on its torch sender: what `collaborate` runs by default and
under `backend="auto"` (its onnxruntime sender, asked for by name, has its own row in the table).
"""
from __future__ import annotations

from ._e2e_rows import SEQ_ORT_ROW, TORCH_ENGINE_ROW, WORKER_ROWS
from .timing import Table

TEACHER, TEACHER_ORT, NAIVE = "teacher eager (timm)", "teacher onnxruntime", "naive loop eager"


def _line(t: Table, what: str, batch, value, target: str, ok) -> None:
    t.add(target=what, batch=batch, value="-" if value is None else value, wanted=target,
          result="-" if value is None else ("met" if ok(value) else "missed"))


def targets(meds: dict[int, dict[str, float]], rss: Table | None, batches) -> Table:
    engine = TORCH_ENGINE_ROW
    t = Table(f"e2e cpu targets (issue 16): {engine} against the same run's rows")

    def ratio(m, num, den):
        return m[num] / m[den] if num in m and den in m else None

    for b in batches:
        m = meds[b]
        _line(t, "speedup vs teacher eager", b, ratio(m, TEACHER, engine), ">= 2.5", lambda v: v >= 2.5)
        _line(t, "speedup vs teacher onnxruntime", b, ratio(m, TEACHER_ORT, engine), ">= 1.3", lambda v: v >= 1.3)
        _line(t, "speedup vs naive loop", b, ratio(m, NAIVE, engine), "> 1", lambda v: v > 1)
        _line(t, "speedup vs sub-models one after the other in onnxruntime", b, ratio(m, SEQ_ORT_ROW, engine),
              "> 1", lambda v: v > 1)
        _line(t, "worker compute: torch / onnxruntime runtime", b,
              ratio(m, WORKER_ROWS["torch"], WORKER_ROWS["onnxruntime"]), ">= 1.8", lambda v: v >= 1.8)
    prev = None
    for b in sorted(meds):
        if prev is not None and engine in meds[b] and engine in meds[prev]:
            rise = (meds[b][engine] / b) / (meds[prev][engine] / prev)
            _line(t, f"per-image cost, batch {b} / batch {prev}", b, rise, "<= 1 (not rising)", lambda v: v <= 1.0)
        prev = b
    peaks = {r["row"]: r.get("peak_rss_mb") for r in rss.rows} if rss is not None else {}
    if peaks.get(engine) and peaks.get(TEACHER):
        _line(t, "peak RSS, engine / teacher eager (serving, whole process)", rss.rows[0]["batch"],
              peaks[engine] / peaks[TEACHER], "<= 1", lambda v: v <= 1.0)
    else:
        t.add(target="peak RSS, engine / teacher eager", value="-", result="not measured (DEVIT_E2E_RSS=0 or --quick)")
    return t
