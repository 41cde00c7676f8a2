"""Latency-aware decomposition: latency budgets and a shape search that knows what runs fast where.

    model = devit_ext.decompose(teacher, 4, budgets=[{"latency": 0.1}] * 4)            # 1/10 of the teacher's, torch
    model = devit_ext.decompose(teacher, 4, budgets=[{"latency_ms": 12.0}] * 4, runtime="onnxruntime")
    model = devit_ext.decompose(teacher, 4, runtime="torch")    # FLOPs budgets, the faster shape at equal FLOPs
    model = devit_ext.decompose(teacher, 4, budgets=[...], latency=my_profile_or_function)

A latency model prices shapes (`profile.py`): by default the teacher's profile on the
runtime, measured in a few seconds and cached on disk (`cache.cached_profile`,
`measure.py`); or the user's own `LatencyProfile` (e.g. `LatencyProfile.load(path)`)
or function cfg -> seconds per image. The search uses it through `search.py`.
"""
from __future__ import annotations

from ..budgets import check_latency_budget, latency_keys
from ..shapes import config_of, is_cct
from .cache import cached_profile, default_dir, profile_key
from .measure import RUNTIMES, check_runtime, measure_submodel, measure_teacher
from .profile import FunctionLatency, LatencyProfile, predict
from .search import LATENCY_GAIN, LATENCY_WINDOW, refine, search_latency

__all__ = ["RUNTIMES", "FunctionLatency", "LatencyProfile", "LATENCY_GAIN", "LATENCY_WINDOW", "cached_profile",
           "check_runtime", "default_dir", "measure_submodel", "measure_teacher", "predict", "profile_key",
           "refine", "search_latency", "latency_for", "resolve_latency"]


class Latency:
    """What the shape search is given: a latency model, the teacher's seconds per image, and where they came from."""

    def __init__(self, model, teacher_s: float, info: dict):
        self.model, self.teacher_s, self.info = model, float(teacher_s), info

    def predict(self, cfg: dict) -> float:
        return float(self.model.predict(cfg))

    def refine(self, tcfg: dict, shape: dict, kind: str, target: float) -> dict:
        """A FLOPs / params budget's shape with heads and MLP width traded for speed (`search.refine`)."""
        return refine(tcfg, shape, self.model, kind, target)

    def budget(self, where: str, tcfg: dict, b: dict) -> tuple[dict, dict]:
        """(shape, target) for {"latency": f} (f of the teacher's latency on the runtime) or
        {"latency_ms": x} (x ms per image): predicted at most the target, or a clear error."""
        kind, value = check_latency_budget(where, b)
        teacher_ms = 1e3 * self.teacher_s
        if kind == "latency":
            target = value * self.teacher_s
        else:
            if value > teacher_ms:
                raise ValueError(f"{where}: latency_ms={value:.4g} exceeds the teacher's {teacher_ms:.4g} ms "
                                 f"on {self.info.get('runtime')}")
            target = value / 1e3
        shape = refine(tcfg, search_latency(tcfg, target, self.model), self.model, "latency", target)
        got = self.predict(config_of(tcfg, shape))
        if got > target * (1 + 1e-9):
            raise ValueError(
                f"{where}: no sub-model shape has a predicted latency at most {1e3 * target:.4g} ms on "
                f"{self.info.get('runtime')} (fastest: {1e3 * got:.4g} ms); raise the budget")
        return shape, {"kind": "latency", "value": target, "predicted_s": got}


def latency_for(teacher, tcfg: dict, budgets, runtime, latency) -> Latency | None:
    """The `Latency` that `decompose(..., budgets=, runtime=, latency=)` asks for, or None when neither
    runtime nor latency nor a latency budget is given. Bad latency budgets fail before a profile is measured."""
    idx = latency_keys(budgets)
    if runtime is None and latency is None and not idx:
        return None
    for i in idx:
        check_latency_budget(f"budgets[{i}]", budgets[i])
    if is_cct(tcfg):
        raise ValueError("runtime / latency: latency-aware decomposition applies to ViT teachers, not a CCT")
    return resolve_latency(teacher, tcfg, runtime, latency)


def resolve_latency(teacher, tcfg: dict, runtime, latency) -> Latency:
    """The `Latency` for `decompose(..., runtime=, latency=)`: `latency` (a LatencyProfile or a function
    cfg -> seconds) when given, else the cached / measured profile of `teacher` on `runtime` ("torch"
    when None). Bad arguments name themselves."""
    if latency is None:
        runtime = "torch" if runtime is None else runtime
        check_runtime(runtime)
        prof = cached_profile(teacher, runtime)
        src = "cached" if prof.extra.get("cache", {}).get("hit") else "measured"
        return _from_profile(prof, tcfg, src)
    if isinstance(latency, LatencyProfile):
        if runtime is not None and runtime != latency.runtime:
            raise ValueError(f"runtime: {runtime!r}, but the given latency profile was measured on {latency.runtime!r}")
        why = latency.covers(tcfg)
        if why:
            raise ValueError(f"latency: the profile does not fit this teacher ({why})")
        return _from_profile(latency, tcfg, "given profile")
    if callable(latency):
        if runtime is not None:
            raise ValueError("runtime: a latency function replaces the measured profile; leave runtime unset")
        fn = FunctionLatency(latency, tcfg)
        return Latency(fn, fn.predict(tcfg), {"runtime": "function", "source": "given function", "batch": 1})
    raise TypeError(f"latency: expected a LatencyProfile or a function cfg -> seconds, got {type(latency).__name__}")


def _from_profile(prof: LatencyProfile, tcfg: dict, source: str) -> Latency:
    prof.extra["checks"] = []  # this decomposition's whole-model checks (`search.refine`)
    predicted = prof.predict(tcfg)
    measured = prof.teacher_s / prof.batch if prof.teacher_s else None
    info = {"runtime": prof.runtime, "runtime_version": prof.key.get("runtime_version"), "source": source,
            "batch": prof.batch, "threads": prof.key.get("threads"),
            "teacher_measured_ms": None if measured is None else 1e3 * measured,
            "teacher_predicted_ms": 1e3 * predicted, "profile_s": prof.measure_s,
            "cache": prof.extra.get("cache", {}).get("path")}
    # fractions are of the teacher as measured; a profile without that measurement falls back to its
    # prediction, and says so in `source`
    if measured is None:
        info["source"] += " (teacher latency predicted, not measured)"
    return Latency(prof, measured if measured is not None else predicted, info)
