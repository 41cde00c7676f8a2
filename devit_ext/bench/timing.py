"""Timing and reporting shared by every benchmark suite.

- `median_time` runs a callable over rotating input sets (so caches don't
  flatter), excludes warm-up, and returns the median seconds per call: CUDA
  events on a GPU, perf_counter on the CPU.
- `Table` collects rows (dicts), prints them aligned and writes CSV + JSON
  together with the machine, versions and commit they were measured on.
"""
from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Any, Callable, Sequence

import torch


def median_time(
    fn: Callable[..., Any],
    inputs: Sequence[Sequence[Any]],
    *,
    device: str | torch.device = "cpu",
    warmup: int = 3,
    iters: int = 20,
    min_seconds: float = 0.0,
) -> float:
    """Median seconds of fn(*inputs[i % len(inputs)]) over `iters` timed calls."""
    device = torch.device(device)
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    times: list[float] = []
    start_all = time.perf_counter()
    i = 0
    while i < iters or (time.perf_counter() - start_all) < min_seconds:
        args = inputs[i % len(inputs)]
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t0)
        i += 1
        if i >= 10 * iters:
            break
    return statistics.median(times)


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: card or CPU, versions, commit."""
    from ..ops.dispatch import build_info

    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host_cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": _git_commit(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - triton is optional, absence is reported
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    bi = build_info()
    info["build"] = {k: bi[k] for k in ("cpp", "cuda_compiled", "cuda_available", "triton", "triton_interpret",
                                                  "onnxruntime", "local_backend_cpu") if k in bi}
    return info


def _git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or os.environ.get("DEVIT_COMMIT")
    except Exception:  # noqa: BLE001 - no git, e.g. an installed wheel
        return os.environ.get("DEVIT_COMMIT")


class Table:
    """Rows of one benchmark suite; each row is a flat dict."""

    def __init__(self, title: str):
        self.title = title
        self.rows: list[dict[str, Any]] = []

    def add(self, **row: Any) -> None:
        self.rows.append(row)

    def extend(self, rows: Sequence[dict[str, Any]]) -> None:
        self.rows.extend(rows)

    def format(self) -> str:
        if not self.rows:
            return f"{self.title}: no rows"
        cols: list[str] = []
        for r in self.rows:
            cols += [c for c in r if c not in cols]
        cells = [[_fmt(r.get(c, "")) for c in cols] for r in self.rows]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
        line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
        out = [self.title, line, "-" * len(line)]
        out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
        return "\n".join(out)

    def write(self, path_prefix: str, info: dict[str, Any] | None = None) -> list[str]:
        """Write <prefix>.csv and <prefix>.json (rows + machine info); returns the paths."""
        info = machine_info() if info is None else info
        os.makedirs(os.path.dirname(os.path.abspath(path_prefix)), exist_ok=True)
        cols: list[str] = []
        for r in self.rows:
            cols += [c for c in r if c not in cols]
        with open(path_prefix + ".csv", "w", newline="") as f:
            f.write("# " + json.dumps(info) + "\n")
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(self.rows)
        with open(path_prefix + ".json", "w") as f:
            json.dump({"title": self.title, "machine": info, "rows": self.rows}, f, indent=1, default=str)
        return [path_prefix + ".csv", path_prefix + ".json"]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.1f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)
