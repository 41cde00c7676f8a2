"""Measuring a latency profile: the components of a ViT timed on a runtime, on a short grid.

What is timed (random weights; latency does not depend on their values), each at the
teacher's tokens N, head width D and the profile's batch:

- the stem at every grid width d: a SubViT without blocks (patch embedding, prefix and
  position embedding, final norm);
- a block's attention half (norm1, qkv, softmax(q k^T) v for h heads, proj, residual) at
  every grid width d and every head count h = 1..H_T;
- a block's MLP half (norm2, fc1, GELU, fc2, residual) at every (d, m) of the grid;
- two whole uniform models (`probe_configs`), which calibrate the sum of
  components to whole models (`profile.fit_calibration`: a scale and a cost per block).

A component is called once to warm up, then `repeats` times; its time is the fastest
call (the one least disturbed by other processes on a shared machine), on the process's
CPU-time clock when torch runs on one thread, else on the wall clock (`clock_name`). Runtimes:
"torch" (eager, CPU, float32, under inference_mode, torch's current thread count) and
"onnxruntime" (the components of one embed width exported together with torch's
TorchScript-based ONNX exporter, one export per width where the dynamo exporter takes
seconds per graph, each one's graph cut out with `onnx.utils.Extractor` and run in its
own session with the local engine's options, `ort_sender.session_options`). The teacher
is timed whole on the same runtime (onnxruntime: exported by `ort_sender.onnx_bytes`,
the project's exporter). A runtime that does not import here is an error, never a
silent switch to another one.
"""
from __future__ import annotations

import copy
import io
import time
import warnings

import torch
import torch.nn as nn

from ..model import Attention, Mlp, SubViT
from ..shapes import num_tokens, uniform_config

RUNTIMES = ("torch", "onnxruntime")
DEFAULT_REPEATS = 3


def check_runtime(runtime) -> str:
    """The runtime's version text, or a clear error: unknown name (ValueError), not importable (RuntimeError)."""
    from ..engines.runtime import status

    if runtime not in RUNTIMES:
        raise ValueError(f"runtime: expected one of {list(RUNTIMES)} for a latency profile, got {runtime!r}")
    ok, why = status(runtime)
    if not ok:
        raise RuntimeError(f"runtime={runtime!r}: not available here ({why}); pip install \"devit-ext[export]\" "
                           "or use runtime='torch'")
    return why


def widths(limit: int, lowest: int = 1) -> list[int]:
    """The grid of widths up to `limit`: 1, 8, 16, 32, multiples of 64 up to 512, of 128 above, and `limit`
    (from `lowest` on)."""
    step = list(range(64, min(limit, 512) + 1, 64)) + list(range(640, limit + 1, 128))
    return sorted({w for w in [1, 8, 16, 32, *step] if lowest <= w <= limit} | {int(limit)})


def grids(tcfg: dict) -> tuple[list[int], list[int]]:
    """(embed widths, MLP widths) a profile measures: down to the shape search's smallest candidates
    (embed widths from 8 when the teacher's is 16 or more; MLP widths from 1)."""
    dT = tcfg["embed_dim"]
    return widths(dT, 8 if dT >= 16 else 1), widths(max(b["mlp_hidden"] for b in tcfg["blocks"]))


class _AttnHalf(nn.Module):
    def __init__(self, d: int, h: int, head_dim: int, qkv_bias: bool):
        super().__init__()
        self.norm, self.attn = nn.LayerNorm(d), Attention(d, h, head_dim, qkv_bias)

    def forward(self, x):
        return x + self.attn(self.norm(x))


class _MlpHalf(nn.Module):
    def __init__(self, d: int, m: int):
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(d), Mlp(d, m)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class _Tokens(nn.Module):
    """A whole sub-model up to its normalised prefix tokens; without blocks, the stem."""

    def __init__(self, sub: nn.Module):
        super().__init__()
        self.sub = sub

    def forward(self, images):
        return self.sub.forward_tokens(images)


def clock_name() -> str:
    """"cpu" (the process's CPU time) when the runtimes run on one thread, else "wall".

    Why: on a shared machine a call that outlasts a scheduler slice waits for the core, so wall
    time grows with the call's length and the other processes' load (a 25 ms sub-model measured
    2.5x the sum of its sub-millisecond components at load 7 on 2 cores). On one thread the CPU
    time is what the call costs on a core of its own, long or short. With more threads only the
    wall time says what the user waits for.
    """
    return "cpu" if torch.get_num_threads() == 1 else "wall"


def best_time(fn, x, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls after one warm-up call, on `clock_name()`'s clock."""
    now = time.process_time if clock_name() == "cpu" else time.perf_counter
    fn(x)
    best = float("inf")
    for _ in range(max(1, int(repeats))):
        t0 = now()
        fn(x)
        best = min(best, now() - t0)
    return best


class _Bundle(nn.Module):
    """Components on one input, one output each: one ONNX export for all of them."""

    def __init__(self, modules):
        super().__init__()
        self.parts = nn.ModuleList(modules)

    def forward(self, x):
        return tuple(p(x) for p in self.parts)


def _legacy_onnx(module: nn.Module, x: torch.Tensor, outputs: int) -> bytes:
    from ..engines import ort_sender

    f = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), f, dynamo=False, opset_version=ort_sender.OPSET, input_names=["x"],
                          output_names=[f"y{i}" for i in range(outputs)])
    return f.getvalue()


def _ort_time(model_bytes: bytes, x: torch.Tensor, repeats: int) -> float:
    from ..engines import ort_sender

    sess = ort_sender.make_session(model_bytes, torch.get_num_threads())
    feed = {sess.get_inputs()[0].name: x.numpy()}
    return best_time(lambda _x: sess.run(None, feed), x, repeats)


def time_modules(modules, x: torch.Tensor, runtime: str, repeats: int = DEFAULT_REPEATS) -> list[float]:
    """Seconds per call of each `module(x)` on `runtime` (CPU, float32). onnxruntime: one export of all of
    them, then each one's own graph cut out of it (`onnx.utils.Extractor`) in its own session (a session
    computes every output of its graph, asked for or not)."""
    modules = [m.float().cpu().eval() for m in modules]
    x = x.float().cpu().contiguous()
    if runtime == "torch":
        with torch.inference_mode():
            return [best_time(m, x, repeats) for m in modules]
    import onnx
    from onnx.utils import Extractor

    whole = onnx.load_from_string(_legacy_onnx(_Bundle(modules), x, len(modules)))
    ex = Extractor(whole)
    return [_ort_time(ex.extract_model(["x"], [f"y{i}"]).SerializeToString(), x, repeats) for i in range(len(modules))]


def time_module(module: nn.Module, x: torch.Tensor, runtime: str, repeats: int = DEFAULT_REPEATS) -> float:
    """Seconds per call of `module(x)` on `runtime` (CPU, float32)."""
    return time_modules([module], x, runtime, repeats)[0]


def measure_components(tcfg: dict, runtime: str, batch: int = 1, repeats: int = DEFAULT_REPEATS) -> dict:
    """The component tables of a profile (see the module docstring) for `tcfg`'s grid."""
    N, D = num_tokens(tcfg), tcfg["head_dim"]
    H = max(b["num_heads"] for b in tcfg["blocks"])
    dg, mg = grids(tcfg)
    images = torch.randn(batch, tcfg["in_chans"], *tcfg["img_size"])
    torch.manual_seed(0)
    stem, attn, mlp = [], [], []
    for d in dg:
        x = torch.randn(batch, N, d)
        stem.append(time_module(_Tokens(SubViT(uniform_config(tcfg, d, 0, 1, 1))), images, runtime, repeats))
        parts = [_AttnHalf(d, h, D, tcfg["qkv_bias"]) for h in range(1, H + 1)] + [_MlpHalf(d, m) for m in mg]
        times = time_modules(parts, x, runtime, repeats)
        attn.append(times[:H])
        mlp.append(times[H:])
    return {"d_grid": dg, "m_grid": mg, "stem": stem, "attn": attn, "mlp": mlp}


def measure_teacher(teacher: nn.Module, runtime: str, batch: int = 1, repeats: int = DEFAULT_REPEATS) -> float:
    """Seconds per call of the whole teacher (logits of `batch` images) on `runtime`, CPU float32."""
    t = teacher
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in t.parameters()):
        t = copy.deepcopy(teacher).float().cpu()
    was = t.training
    t.eval()
    try:
        c, (h, w) = t.patch_embed.proj.in_channels, t.patch_embed.img_size
        x = torch.randn(batch, c, h, w)
        if runtime == "torch":
            with torch.inference_mode():
                return best_time(t, x, repeats)
        from ..engines import ort_sender

        with torch.no_grad():
            return _ort_time(ort_sender.onnx_bytes(t, torch.randn(2, c, h, w)), x, repeats)
    finally:
        t.train(was)


def probe_configs(tcfg: dict) -> list[dict]:
    """Two whole uniform models between the sub-models' sizes and the teacher's, for the calibration."""
    dT, LT = tcfg["embed_dim"], len(tcfg["blocks"])
    HT = max(b["num_heads"] for b in tcfg["blocks"])
    MT = max(b["mlp_hidden"] for b in tcfg["blocks"])
    r8 = lambda v: max(8, 8 * round(v / 8)) if v >= 8 else max(1, round(v))  # noqa: E731
    return [uniform_config(tcfg, r8(dT / 3), max(1, round(0.75 * LT)), max(1, HT // 3), r8(MT / 3)),
            uniform_config(tcfg, r8(dT / 2), max(1, LT // 2), max(1, HT // 2), r8(MT / 2))]


def measure_config(cfg: dict, runtime: str, batch: int = 1, repeats: int = DEFAULT_REPEATS) -> float:
    """Seconds per call of a whole SubViT of config `cfg` (random weights) up to its tokens, timed as
    the profile's components are."""
    torch.manual_seed(0)
    images = torch.randn(batch, cfg["in_chans"], *cfg["img_size"])
    return time_module(_Tokens(SubViT(cfg)), images, runtime, repeats)


def measure_probes(tcfg: dict, runtime: str, batch: int = 1, repeats: int = DEFAULT_REPEATS) -> list[tuple[dict, float]]:
    """(config, seconds per call) of the `probe_configs` run whole on `runtime` (random weights)."""
    return [(c, measure_config(c, runtime, batch, repeats)) for c in probe_configs(tcfg)]


def measure_submodel(sub: nn.Module, runtime: str, batch: int = 1, repeats: int = DEFAULT_REPEATS) -> float:
    """Seconds per call of one sub-model up to its tokens on `runtime` (`engines.runtime.SubModelRunner`)."""
    from ..engines.runtime import SubModelRunner

    c = sub.cfg
    x = torch.randn(batch, int(c["in_chans"]), *tuple(c["img_size"]))
    sub = sub.float().cpu().eval()
    run = SubModelRunner(sub, runtime)
    with torch.inference_mode():
        return best_time(run, x, repeats)
