"""Peak RSS of each `bench e2e --device cpu` row, each in a fresh process.

    python -m devit_ext.bench._e2e_rss ROW BATCH IMG [SKIP]   # prints one JSON line

Why a process per row: RSS is per process, and a row measured after others would carry their
allocations. Method (Linux /proc): the child imports torch, timm and devit_ext and reads its
RSS (`imports_mb`); builds only its row (`e2e_cpu.Setting`; the teacher on the meta device,
no weights, for rows that do not run it); makes the first call (export / compile happen here);
calls glibc's malloc_trim(0) so memory the setup freed goes back; resets the high-water mark
(writing "5" to /proc/self/clear_refs); runs the row 3 times on a batch of BATCH images; and
reads VmHWM: `peak_rss_mb`, the serving peak. `setup_peak_mb` is ru_maxrss, the peak over the
process's life up to the end of the setup (VmHWM then; not ru_maxrss, which a child
inherits from its parent's peak). The distributed row is not measured (its workers are other
processes).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from .timing import Table

NOT_MEASURED = {"distributed engine (loopback, spawned workers)": "its workers are other processes"}


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


def _child(row: str, batch: int, img: int, skip: set) -> dict:
    import ctypes

    import timm  # noqa: F401 - imported before the baseline, as every row needs it
    import torch

    from ._e2e_models import _inputs
    from ._e2e_rows import Setting

    imports = _status_kb("VmRSS")
    st = Setting(skip, img, meta_teacher=not row.startswith("teacher"))
    make = {n: mk for n, mk, _ in st.rows()}.get(row)
    if make is None:
        raise SystemExit(f"_e2e_rss: no row {row!r} here (skip={sorted(skip)})")
    x = _inputs(batch, st.model, "cpu", torch.float32, n=1)[0]
    with torch.inference_mode():
        with torch.no_grad():
            fn = make()
        fn(x)
        setup_peak = _status_kb("VmHWM")  # not ru_maxrss: that one starts from the parent's peak at fork
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc: the serving peak then includes memory the setup freed
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        for _ in range(3):
            fn(x)
    kb = 1024.0
    return {"row": row, "batch": batch, "peak_rss_mb": _status_kb("VmHWM") / kb, "imports_mb": imports / kb,
            "rss_above_imports_mb": (_status_kb("VmHWM") - imports) / kb,
            "setup_peak_mb": setup_peak / kb}


def measure(row: str, batch: int, img: int, skip=(), timeout: float = 900.0) -> dict:
    """One row's peak RSS from a fresh process (see the module doc); a failure comes back as a note."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "devit_ext.bench._e2e_rss", row, str(batch), str(img), ",".join(sorted(skip))]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"row": row, "batch": batch, "note": f"failed: no answer within {timeout:g} s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1][:200]
        return {"row": row, "batch": batch, "note": f"failed: exit {r.returncode}: {tail}"}
    return json.loads(lines[-1])


def rss_rows(rows, batch: int, img: int, skip=()) -> Table:
    t = Table(f"e2e cpu peak rss: batch {batch}, {img} px, one fresh process per row (serving peak: VmHWM "
              "after the setup and malloc_trim, over 3 calls)")
    for row in rows:
        if row in NOT_MEASURED:
            t.add(row=row, batch=batch, note=f"not measured: {NOT_MEASURED[row]}")
            continue
        print(f"[e2e cpu] peak RSS of {row!r} at batch {batch} (fresh process)", file=sys.stderr, flush=True)
        t.add(**measure(row, batch, img, skip))
    return t


if __name__ == "__main__":
    a = sys.argv[1:]
    print(json.dumps(_child(a[0], int(a[1]), int(a[2]), {s for s in (a[3] if len(a) > 3 else "").split(",") if s})))
