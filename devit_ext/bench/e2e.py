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
DEVIT_E2E_SKIP="compile,autotune,graph,distributed" (row families to leave out).
"""
from __future__ import annotations

import os
import statistics
import time
import traceback
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .timing import Table, median_time

NUM_CLASSES = 100
NUM_DEVICES = 4
GPU_TEACHER = "vit_large_patch16_224"
GPU_SUB = {"embed_dim": 192, "depth": 12, "num_heads": 3, "mlp_hidden": 768}
CPU_TEACHER = "vit_small_patch16_224"


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def make_teacher(name: str = GPU_TEACHER, num_classes: int = NUM_CLASSES, **kw) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kw).eval()


def build_devit(teacher: nn.Module, shapes: list[dict], seed: int = 0):
    """A DeViT with the given sub-model shapes on `teacher`'s config (random weights)."""
    from ..model import DeViT, FusionHead, SubViT
    from ..shapes import shape_config, teacher_config

    tcfg = teacher_config(teacher)
    torch.manual_seed(seed)
    subs = []
    n = len(shapes)
    for s in shapes:
        blocks = [{"num_heads": int(s["num_heads"]), "mlp_hidden": int(s["mlp_hidden"])}] * int(s["depth"])
        c = shape_config(tcfg, int(s["embed_dim"]), blocks, max(1, tcfg["num_classes"] // n))
        sub = SubViT(c)
        with torch.no_grad():  # zeros in cls/pos would make every token alike; keep it ViT-like
            sub.cls_token.normal_(std=0.02)
            sub.pos_embed.normal_(std=0.02)
        subs.append(sub)
    fusion = FusionHead([s.embed_dim for s in subs], tcfg["embed_dim"], tcfg["num_classes"], tcfg["distilled"])
    groups = [list(range(i, tcfg["num_classes"], n)) for i in range(n)]
    meta = {k: tcfg[k] for k in ("img_size", "in_chans", "mean", "std")}
    meta["teacher"] = getattr(teacher, "default_cfg", {}).get("architecture", type(teacher).__name__)
    return DeViT(subs, groups, fusion, meta).eval()


def default_cpu_shape(teacher: nn.Module) -> tuple[dict, str]:
    """The sub-model shape the decomposition's default budget gives (40% of the teacher in total)."""
    from .. import budgets as dec
    from ..shapes import teacher_config

    tcfg = teacher_config(teacher)
    frac = dec.DEFAULT_TOTAL_FRACTION / NUM_DEVICES
    cfg = dec.resolve_budgets(tcfg, NUM_DEVICES, None)[0][0]  # device 0 of the default budgets
    blocks = cfg["blocks"]
    if any(b != blocks[0] for b in blocks):
        raise ValueError(f"the default budget gave uneven blocks {blocks}; the stacked baseline needs even ones")
    shape = {"embed_dim": cfg["embed_dim"], "depth": len(blocks), "num_heads": blocks[0]["num_heads"],
             "mlp_hidden": blocks[0]["mlp_hidden"]}
    return shape, f"decompose default budget: {frac:.2f} of the teacher's FLOPs per device"


class PlainStacked(nn.Module):
    """Baseline: what a user writes by hand. Weights stacked over M, baddbmm, one SDPA call for all
    models, per-model LayerNorm affine, float tokens, fusion head. Homogeneous DeViTs only."""

    def __init__(self, model):
        super().__init__()
        subs = list(model.submodels)
        c = subs[0].cfg
        if any(s.cfg["blocks"] != c["blocks"] or s.embed_dim != subs[0].embed_dim for s in subs):
            raise ValueError("PlainStacked: sub-models must share one shape")
        if c["layer_scale"] or c["pre_norm"] or c["no_embed_class"]:
            raise ValueError("PlainStacked: plain ViT blocks only (no layer scale, pre-norm or no_embed_class)")
        self.M, self.d, self.D, self.T = len(subs), subs[0].embed_dim, c["head_dim"], c["num_prefix_tokens"]
        self.patch, self.eps = tuple(c["patch_size"]), c["norm_eps"]
        self.heads = [b["num_heads"] for b in c["blocks"]]

        def st(get):
            return nn.Parameter(torch.stack([get(s).detach().clone() for s in subs]), requires_grad=False)

        def lin(get):  # nn.Linear weight (out, in) -> (M, in, out) for x @ W
            return st(lambda s: get(s).weight.t().contiguous())

        def bias(get):
            return st(lambda s: (get(s).bias if get(s).bias is not None else torch.zeros(get(s).out_features))[None])

        self.patch_w = st(lambda s: s.patch_embed.proj.weight.reshape(self.d, -1).t())  # (M, K, d)
        self.patch_b = st(lambda s: s.patch_embed.proj.bias[None])
        self.prefix = st(lambda s: torch.cat([s.cls_token[0]] + ([s.dist_token[0]] if s.distilled else [])))
        self.pos = st(lambda s: s.pos_embed[0])  # (M, N, d)
        L = len(self.heads)
        self.p = nn.ParameterDict()
        for k in range(L):
            b = lambda s, k=k: s.blocks[k]  # noqa: E731
            self.p[f"{k}_n1w"] = st(lambda s: b(s).norm1.weight[None])
            self.p[f"{k}_n1b"] = st(lambda s: b(s).norm1.bias[None])
            self.p[f"{k}_qkv_w"], self.p[f"{k}_qkv_b"] = lin(lambda s: b(s).attn.qkv), bias(lambda s: b(s).attn.qkv)
            self.p[f"{k}_proj_w"], self.p[f"{k}_proj_b"] = lin(lambda s: b(s).attn.proj), bias(lambda s: b(s).attn.proj)
            self.p[f"{k}_n2w"] = st(lambda s: b(s).norm2.weight[None])
            self.p[f"{k}_n2b"] = st(lambda s: b(s).norm2.bias[None])
            self.p[f"{k}_fc1_w"], self.p[f"{k}_fc1_b"] = lin(lambda s: b(s).mlp.fc1), bias(lambda s: b(s).mlp.fc1)
            self.p[f"{k}_fc2_w"], self.p[f"{k}_fc2_b"] = lin(lambda s: b(s).mlp.fc2), bias(lambda s: b(s).mlp.fc2)
        self.nw = st(lambda s: s.norm.weight[None])
        self.nb = st(lambda s: s.norm.bias[None])
        self.fusion = model.fusion

    def _ln(self, x, w, b):
        return F.layer_norm(x, (self.d,), eps=self.eps) * w + b

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        B, C, H, W = images.shape
        ph, pw = self.patch
        M, d, D, T = self.M, self.d, self.D, self.T
        patches = images.reshape(B, C, H // ph, ph, W // pw, pw).permute(0, 2, 4, 1, 3, 5).reshape(1, -1, C * ph * pw)
        x = torch.baddbmm(self.patch_b, patches.expand(M, -1, -1), self.patch_w).view(M, B, -1, d)
        x = torch.cat([self.prefix[:, None].expand(M, B, T, d), x], dim=2) + self.pos[:, None]
        N = x.shape[2]
        x = x.reshape(M, B * N, d)
        for k, Hh in enumerate(self.heads):
            p = lambda n: self.p[f"{k}_{n}"]  # noqa: E731
            h = self._ln(x, p("n1w"), p("n1b"))
            qkv = torch.baddbmm(p("qkv_b"), h, p("qkv_w")).view(M * B, N, 3, Hh, D).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (M*B, H, N, D)
            o = o.transpose(1, 2).reshape(M, B * N, Hh * D)
            x = x + torch.baddbmm(p("proj_b"), o, p("proj_w"))
            h = self._ln(x, p("n2w"), p("n2b"))
            x = x + torch.baddbmm(p("fc2_b"), F.gelu(torch.baddbmm(p("fc1_b"), h, p("fc1_w"))), p("fc2_w"))
        toks = self._ln(x.view(M, B, N, d)[:, :, :T].reshape(M, B * T, d), self.nw, self.nb).view(M, B, T, d)
        toks = [toks[m, :, 0] if T == 1 else toks[m] for m in range(M)]
        return self.fusion(toks)


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


def _inputs(batch: int, model, device: str, dtype: torch.dtype, n: int = 3) -> list[torch.Tensor]:
    c, (h, w) = model.in_chans, model.img_size
    g = torch.Generator().manual_seed(batch)
    return [torch.randn(batch, c, h, w, generator=g).to(device=device, dtype=dtype) for _ in range(n)]


# ---------------------------------------------------------------------------
# Suites
# ---------------------------------------------------------------------------


def run(device: str, quick: bool) -> list[Table]:
    return [_run_gpu(quick) if device == "cuda" else _run_cpu(quick)]


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


def _run_cpu(quick: bool) -> Table:
    from .e2e_cpu import run_cpu

    return run_cpu(quick, _env_list)
