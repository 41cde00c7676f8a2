"""The on-disk cache of measured latency profiles: one JSON file per key, written atomically.

Key: the machine (hostname, architecture, processor, CPU count), torch's version, the
runtime and its version, torch's thread count and the clock, and the shape grid (tokens, head width,
the teacher's widths, heads and patch, batch, repeats). A profile measured under any
other key is never reused: a new torch, another thread count or another teacher grid
measures again. Directory: `cache_dir` if given, else $DEVIT_CACHE_DIR, else
$XDG_CACHE_HOME/devit-ext/latency (~/.cache/devit-ext/latency).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time

import torch

from ..shapes import num_tokens
from .measure import (DEFAULT_REPEATS, check_runtime, clock_name, measure_components, measure_probes, measure_teacher,
                      grids)
from .profile import LatencyProfile, fit_calibration


def default_dir() -> str:
    env = os.environ.get("DEVIT_CACHE_DIR")
    if env:
        return os.path.join(env, "latency")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "devit-ext", "latency")


def profile_key(tcfg: dict, runtime: str, batch: int = 1, repeats: int = DEFAULT_REPEATS) -> dict:
    """Everything a measured profile depends on (see the module docstring)."""
    version = check_runtime(runtime)
    return {
        "host": platform.node(), "machine": platform.machine(), "processor": platform.processor(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "runtime": runtime, "runtime_version": version,
        "threads": torch.get_num_threads(), "clock": clock_name(), "tokens": num_tokens(tcfg), "head_dim": tcfg["head_dim"],
        "img_size": list(tcfg["img_size"]), "patch_size": list(tcfg["patch_size"]), "in_chans": tcfg["in_chans"],
        "teacher_blocks": [[b["num_heads"], b["mlp_hidden"]] for b in tcfg["blocks"]],
        "embed_dim": tcfg["embed_dim"], "d_grid": grids(tcfg)[0], "m_grid": grids(tcfg)[1],
        "batch": int(batch), "repeats": int(repeats),
    }


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cached_profile(teacher, runtime: str = "torch", *, batch: int = 1, repeats: int = DEFAULT_REPEATS,
                   cache_dir: str | None = None) -> LatencyProfile:
    """The teacher's latency profile on `runtime`: read from the cache when its key matches, else measured
    (components and the teacher itself) and written there. `teacher`: a timm ViT (`shapes.teacher_config`)."""
    from ..shapes import teacher_config

    tcfg = teacher_config(teacher)
    key = profile_key(tcfg, runtime, batch, repeats)
    path = os.path.join(cache_dir or default_dir(), f"latency-{runtime}-{key_hash(key)}.json")
    if os.path.exists(path):
        try:
            prof = LatencyProfile.load(path)
        except (OSError, ValueError, KeyError, TypeError):  # unreadable or from another format: measure again
            prof = None
        if prof is not None and prof.key == key:
            prof.extra["cache"] = {"path": path, "hit": True}
            prof.measure_here()
            return prof
    t0 = time.perf_counter()
    tables = measure_components(tcfg, runtime, batch, repeats)
    teacher_s = measure_teacher(teacher, runtime, batch, repeats)
    prof = LatencyProfile(key=key, teacher_s=teacher_s, **tables)
    # the probes only: the teacher's graph is not built like the sub-models' (timm's, and on onnxruntime
    # another exporter), and its latency is measured anyway
    prof.calibration = fit_calibration(prof, measure_probes(tcfg, runtime, batch, repeats))
    prof.measure_s = time.perf_counter() - t0
    prof.save(path)
    prof.extra["cache"] = {"path": path, "hit": False}
    prof.measure_here()
    return prof
