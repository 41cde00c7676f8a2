"""Latency models of uniform ViT shapes: a measured component profile, or a user's function.

Both answer the same three questions the shape search asks, per image at the
profile's batch, in seconds:

    stem_s(d)        patch embedding, prefix tokens, position embedding, final norm at width d
    attn_s(d, h)     one block's attention half (norm1, qkv, the N x N products for h heads, proj, residual)
    mlp_s(d, m)      one block's MLP half (norm2, fc1, GELU, fc2, residual)

so a shape (d, L, h, m) costs stem_s(d) + L * (attn_s(d, h) + mlp_s(d, m)) and
`predict(cfg)` sums the same over a config's own blocks. `LatencyProfile` holds
component times measured on a grid of widths (`measure.measure_profile`) and
interpolates linearly between grid widths (every head count is measured);
`FunctionLatency` wraps a function cfg -> seconds and reads the three parts
off it by differences (it assumes a block's attention and MLP halves add).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..shapes import describe_shape, num_tokens, uniform_config

FORMAT = 2  # 2: with the whole-model calibration


def _weights(xs: torch.Tensor, x: torch.Tensor):
    x = x.to(torch.float64).contiguous()
    i = torch.searchsorted(xs, x).clamp(1, len(xs) - 1)
    return i, (x - xs[i - 1]) / (xs[i] - xs[i - 1])


def _interp(xs: torch.Tensor, ys: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear y(x) along the last axis of `ys` for every x (grid `xs` ascending; linear beyond
    the ends): shape ys.shape[:-1] + x.shape."""
    i, w = _weights(xs, x)
    return ys[..., i - 1] * (1 - w) + ys[..., i] * w


def _interp_rows(xs: torch.Tensor, ys: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Row k of `ys` (n, len(xs)) read at x[k] (n,)."""
    i, w = _weights(xs, x)
    r = torch.arange(len(x))
    return ys[r, i - 1] * (1 - w) + ys[r, i] * w


def _t(v) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float64)


@dataclass
class LatencyProfile:
    """Measured component times (seconds per call at `batch` images) on one runtime for one teacher's grid.

    key: what the numbers depend on (machine, torch and runtime versions, threads, tokens, head width,
    grid, batch; `cache.profile_key`); d_grid / m_grid: the widths measured; stem[i] at d_grid[i];
    attn[i][h - 1] for h = 1..len(attn[i]); mlp[i][j] at (d_grid[i], m_grid[j]); teacher_s: the teacher
    itself measured on the runtime at the same batch (None when not measured).
    """

    key: dict
    d_grid: list[int]
    m_grid: list[int]
    stem: list[float]
    attn: list[list[float]]
    mlp: list[list[float]]
    teacher_s: float | None = None
    measure_s: float | None = None  # how long the measurement took
    calibration: dict = field(default_factory=dict)  # {"scale", "per_block_s", "points"}: `fit_calibration`
    extra: dict = field(default_factory=dict)

    @property
    def runtime(self) -> str:
        return str(self.key.get("runtime", "?"))

    @property
    def batch(self) -> int:
        return int(self.key.get("batch", 1))

    def _grid(self):
        return _t(self.d_grid), _t(self.m_grid)

    @property
    def _scale(self) -> float:
        return float(self.calibration.get("scale", 1.0)) / self.batch

    def stem_s(self, d) -> torch.Tensor:
        return _interp(_t(self.d_grid), _t(self.stem), _t(d)) * self._scale

    def attn_s(self, d, h) -> torch.Tensor:
        """d, h broadcastable tensors; h an int in 1..H (every head count is on the grid)."""
        d, h = torch.broadcast_tensors(_t(d), _t(h))
        table = _t(self.attn)  # (nd, H)
        by_h = table[:, (h.long() - 1).flatten()]  # (nd, n)
        out = _interp_rows(_t(self.d_grid), by_h.T, d.flatten())  # (n,)
        return out.reshape(d.shape) * self._scale + float(self.calibration.get("per_block_s", 0.0)) / self.batch

    def mlp_s(self, d, m) -> torch.Tensor:
        d, m = torch.broadcast_tensors(_t(d), _t(m))
        dg, mg = self._grid()
        along_m = _interp(mg, _t(self.mlp), m.flatten())  # (nd, n): each grid width at the asked m
        out = _interp_rows(dg, along_m.T, d.flatten())
        return out.reshape(d.shape) * self._scale

    def predict(self, cfg: dict) -> float:
        return predict(self, cfg)

    @property
    def checks(self) -> list:
        """What `search.refine` checked on whole models (kept in `extra`, so in the saved file too)."""
        return self.extra.setdefault("checks", [])

    def measure_here(self) -> None:
        """Let the search check its trades on whole models measured here (`cache.cached_profile` does
        this for the profiles it measures or reads: they describe this machine)."""
        from .measure import measure_config

        memo: dict = {}

        def whole(cfg: dict) -> float:
            k = describe_shape(cfg)
            if k not in memo:
                memo[k] = measure_config(cfg, self.runtime, self.batch, int(self.key.get("repeats", 3))) / self.batch
            return memo[k]

        self.measure_whole = whole

    def covers(self, tcfg: dict) -> str | None:
        """None when this profile can price every shape of `tcfg`'s search, else what does not match."""
        k = self.key
        want = {"tokens": num_tokens(tcfg), "head_dim": tcfg["head_dim"]}
        for name, v in want.items():
            if k.get(name) != v:
                return f"it was measured for {name}={k.get(name)}, the teacher has {v}"
        heads = max(b["num_heads"] for b in tcfg["blocks"])
        if len(self.attn[0]) < heads:
            return f"it measured up to {len(self.attn[0])} heads, the teacher has {heads}"
        if self.d_grid[-1] < tcfg["embed_dim"] or self.m_grid[-1] < max(b["mlp_hidden"] for b in tcfg["blocks"]):
            return "its width grid stops below the teacher's widths"
        return None

    def to_dict(self) -> dict:
        return {"format": FORMAT, "key": self.key, "d_grid": self.d_grid, "m_grid": self.m_grid, "stem": self.stem,
                "attn": self.attn, "mlp": self.mlp, "teacher_s": self.teacher_s, "measure_s": self.measure_s,
                "calibration": self.calibration, "extra": self.extra}

    @classmethod
    def from_dict(cls, obj: dict) -> "LatencyProfile":
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ValueError(f"latency profile: expected format {FORMAT}, got {obj.get('format') if isinstance(obj, dict) else obj!r}")
        p = cls(**{k: obj[k] for k in ("key", "d_grid", "m_grid", "stem", "attn", "mlp")},
                teacher_s=obj.get("teacher_s"), measure_s=obj.get("measure_s"),
                calibration=obj.get("calibration") or {}, extra=obj.get("extra", {}))
        nd, nm = len(p.d_grid), len(p.m_grid)
        if nd < 2 or nm < 2 or len(p.stem) != nd or len(p.attn) != nd or len(p.mlp) != nd or any(len(r) != nm for r in p.mlp):
            raise ValueError("latency profile: the component tables do not match the grid sizes")
        return p

    def save(self, path: str) -> None:
        from ..model_files import write_atomic

        write_atomic(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str) -> "LatencyProfile":
        with open(path) as f:
            return cls.from_dict(json.load(f))


def fit_calibration(raw: LatencyProfile, points: list[tuple[dict, float]]) -> dict:
    """measured = scale x (sum of components) + per_block_s x blocks, least squares over whole models.

    Why: each component is timed alone, its weights and activations staying in the cache from one
    call to the next; in a whole model every block's weights come from further away, and there are
    the block's own calls (at load 8 on 2 cores, one thread, torch: a d128 L9 sub-model measured 1.21x
    the sum of its components, d192 L6 1.13x). `points`: (config, measured seconds per call);
    per_block_s is kept >= 0; no points: no correction.
    """
    if not points:
        return {}
    A = torch.tensor([[raw.predict(c) * raw.batch, float(len(c["blocks"]))] for c, _ in points], dtype=torch.float64)
    y = torch.tensor([t for _, t in points], dtype=torch.float64)
    sol = torch.linalg.lstsq(A, y[:, None]).solution[:, 0] if len(points) > 1 else torch.tensor([-1.0, -1.0])
    scale, per_block = float(sol[0]), float(sol[1])
    if per_block < 0 or scale <= 0:
        scale, per_block = float((A[:, 0] * y).sum() / (A[:, 0] ** 2).sum()), 0.0
    return {"scale": scale, "per_block_s": per_block,
            "points": [{"shape": describe_shape(c), "components_s": float(a), "measured_s": float(t)}
                       for (c, t), a in zip(points, A[:, 0])]}


def predict(model, cfg: dict) -> float:
    """Seconds per image of a config's shape under a latency model (its own blocks, not only uniform ones)."""
    bl = cfg["blocks"]
    d = cfg["embed_dim"]
    h = torch.tensor([b["num_heads"] for b in bl], dtype=torch.float64)
    m = torch.tensor([b["mlp_hidden"] for b in bl], dtype=torch.float64)
    dd = torch.full_like(h, float(d))
    return float(model.stem_s(torch.tensor([float(d)]))[0] + (model.attn_s(dd, h) + model.mlp_s(dd, m)).sum())


class FunctionLatency:
    """A user's latency function cfg -> seconds per image, seen through the three parts the search asks for.

    block(d, h, m) = f(2 blocks) - f(1 block); stem = f(1 block) - block; attn(d, h) = block(d, h, 1) and
    mlp(d, m) = block(d, 1, m) - block(d, 1, 1) (exact when f's block cost is attention + MLP). `predict`
    calls f itself. Values are memoised per shape.
    """

    def __init__(self, fn: Callable[[dict], float], tcfg: dict):
        self.fn, self.tcfg = fn, tcfg
        self._memo: dict = {}
        self.runtime = "function"
        self.teacher_s = None
        self.batch = 1

    def _call(self, cfg: dict, what: str) -> float:
        v = self.fn(copy.deepcopy(cfg))
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v == float("inf"):
            raise ValueError(f"latency: the latency function gave {v!r} for {what}; "
                             "expected a positive, finite number of seconds")
        return float(v)

    def _f(self, d: int, L: int, h: int, m: int) -> float:
        k = (d, L, h, m)
        if k not in self._memo:
            self._memo[k] = self._call(uniform_config(self.tcfg, d, L, h, m), f"d={d} L={L} h={h} m={m}")
        return self._memo[k]

    def _block(self, d, h, m):
        return self._f(d, 2, h, m) - self._f(d, 1, h, m)

    def _map(self, fn, *args) -> torch.Tensor:
        args = torch.broadcast_tensors(*[_t(a) for a in args])
        flat = [a.flatten().long().tolist() for a in args]
        return torch.tensor([fn(*v) for v in zip(*flat)], dtype=torch.float64).reshape(args[0].shape)

    def stem_s(self, d) -> torch.Tensor:
        return self._map(lambda d: self._f(d, 1, 1, 1) - self._block(d, 1, 1), d)

    def attn_s(self, d, h) -> torch.Tensor:
        return self._map(lambda d, h: self._block(d, h, 1), d, h)

    def mlp_s(self, d, m) -> torch.Tensor:
        return self._map(lambda d, m: self._block(d, 1, m) - self._block(d, 1, 1), d, m)

    def predict(self, cfg: dict) -> float:
        return self._call(cfg, "the config of " + describe_shape(cfg))
