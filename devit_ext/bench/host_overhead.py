"""`devit-ext bench host`: host (CPU) time of the ops' CUDA path up to the launch, no GPU needed.

Without CUDA graphs every op call costs its Python path on the host before the
GPU sees anything; at batch 1 the kernels are short, so that host time is the
latency floor. This suite measures it on any machine.

Method ("patched launch"), stated in the table's method row:
- The op's own code runs as it runs for CUDA tensors: the public function,
  the argument checks (`devit_ext.checks`), the eager/torch.ops decision, the
  path choice (`dispatch`), output allocation, metadata-table and plan caches,
  the tile choice, and the argument list of the launch.
- To take the CUDA branch with CPU tensors, `patched_launch()` makes the path
  functions answer for a CUDA device, answers the current stream with 0 and the
  GPU target with an H100's (132 SMs, sm_90), and replaces the last call (the
  native `*_cuda` function, the Triton `kernel[grid](...)`) with a recorder that
  counts calls; each row checks that its launch was reached exactly once per call.
- Not included, since it needs a GPU: the launch itself (Triton's launcher,
  cudaLaunchKernel), the current-stream query, the caching allocator's
  `torch.empty` on CUDA (CPU `torch.empty` runs instead).
- Times: the calling thread's CPU time (time.thread_time_ns: host time is CPU time, and a thread
  descheduled by other processes on a shared machine does not count it) over blocks of calls, median
  over blocks, gc off,
  one intra-op thread (a GPU run does not fork the CPU thread pool per op).

The sender side per block: a DeViT of 4 stacked sub-models at batch 1 run by
`engines.stacked.SenderStack` with the attention op in the patched launch; its
aten ops (layer norm, baddbmm, gelu, adds) run their CPU kernels on tiny
tensors (1 image, 5 tokens, width 16: well under a microsecond of arithmetic
each), so their time is their dispatch plus that arithmetic: an upper bound of
their host dispatch, without the CUDA driver's launch calls. Per block =
(sender time at depth 3 - at depth 1) / 2, the two interleaved in the same run.

The same per block at zero rows ("excluding the kernels", which the target is judged on): the sender
run on a batch of 0 images, so every aten op goes through the dispatcher, its argument and shape
checks, the TensorIterator / output set-up and the allocator, and its CPU loop runs no element; the
attention op (which returns early on an empty batch) is called on the batch-1 QKV instead and its
output sliced to zero rows (`_ZeroRowAttention`: its full patched-launch path is in, plus one slice).
What a CUDA op adds on top (cudaLaunchKernel, cuBLAS's host-side set-up) is the launch, not in either.
"""
from __future__ import annotations

import contextlib
import gc
import statistics
import time

import torch

from .timing import Table

TARGET_US = 30.0  # issue 12: host time per block of the sender side at batch 1
CUDA = torch.device("cuda", 0)
METHOD = ("patched launch: the op's CUDA-path Python on CPU tensors, the final native/Triton launch replaced "
          "by a call counter; thread CPU time; not included: the launch itself, the current-stream query, "
          "CUDA torch.empty")


class LaunchRecorder:
    """Stands in for a Triton kernel (`kernel[grid](*args, **meta)`) or a native function: counts calls."""

    def __init__(self):
        self.calls = 0

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        self.calls += 1


class _NativeRecorder:
    """The native module with its CUDA entry points recorded (and reported as compiled)."""

    def __init__(self, real, rec: LaunchRecorder):
        self._real, self._rec = real, rec

    def cuda_compiled(self):
        return True

    def __getattr__(self, name):
        return self._rec if name.endswith("_cuda") else getattr(self._real, name)


@contextlib.contextmanager
def patched_launch():
    """Within: the ops take their CUDA branch on CPU tensors and launch into recorders.

    Yields {"native": rec, "attention": rec, "fusion": rec}, or raises RuntimeError naming what is missing
    (the native module, triton)."""
    from .. import _build
    from .. import kernels
    from ..kernels import _launch
    from ..ops import attention, dispatch, fusion, quant

    if _build.native() is None:
        raise RuntimeError(f"native module missing: {_build.native_error()}")
    if not kernels.available():
        raise RuntimeError(f"Triton kernels unavailable: {kernels.info()['error']}")
    import importlib

    ka = importlib.import_module("devit_ext.kernels.subvit_attention")
    kf = importlib.import_module("devit_ext.kernels.ensemble_fusion")
    recs = {"native": LaunchRecorder(), "attention": LaunchRecorder(), "fusion": LaunchRecorder()}
    native = _NativeRecorder(_build.native(), recs["native"])
    real_quant_path, real_fused_path, real_launchable = dispatch.quant_path, dispatch.fused_path, _launch.check_launchable
    gpu = _launch.Target(132, 90)
    patches = [
        (_build, "native", lambda: native),
        (quant, "_path", lambda device: real_quant_path(CUDA)),  # the real choice, for a CUDA device
        (quant, "_stream", lambda device: 0),
        (attention, "fused_path", lambda device: real_fused_path(CUDA)),
        (fusion, "fused_path", lambda device: real_fused_path(CUDA)),
        (_launch, "INTERPRET", False),
        (_launch, "check_launchable", lambda name, device: real_launchable(name, CUDA)),
        (_launch, "target", lambda device: gpu),
        (ka, "_subvit_attention_fwd", recs["attention"]),
        (kf, "_ensemble_fusion_fwd", recs["fusion"]),
    ]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    attention.clear_plans()  # a launch planned outside (or inside) must not outlive the patch
    try:
        for mod, name, value in patches:
            setattr(mod, name, value)
        yield recs
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)
        attention.clear_plans()


def host_us(fn, *, calls: int, blocks: int) -> float:
    """Median over `blocks` of the mean host microseconds of `calls` back-to-back fn() calls."""
    for _ in range(max(3, calls // 10)):
        fn()
    per = []
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(blocks):
            t0 = time.thread_time_ns()
            for _ in range(calls):
                fn()
            per.append((time.thread_time_ns() - t0) / calls / 1e3)
    finally:
        if gc_was:
            gc.enable()
    return statistics.median(per)


@contextlib.contextmanager
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# ---------------------------------------------------------------- the ops, at the local engine's batch-1 shapes


def op_cases():
    """(row name, launch recorder key, fn) for every public op at batch 1, deit-tiny-like sub-models
    (4 x (3 heads, D 64, width 192), N 197, bf16 compute; fusion 4 x 192 -> 192 -> 100 in fp32, as the
    local engine holds its fusion weights)."""
    from .. import ops

    M, N, H, D, d, T, C = 4, 197, 3, 64, 192, 192, 100
    bf = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, d, generator=g).to(bf)  # (B, T, d): one image's class token
    w, b = torch.ones(d), torch.zeros(d)
    q8 = torch.randint(-127, 128, (1, M * d), dtype=torch.int8, generator=g)
    s = torch.rand(1, M, generator=g)
    qkv = torch.randn(M, 1, N, 3 * H * D, generator=g).to(bf).view(M, 1, N, 3, H, D)  # the QKV output, viewed
    xs = [torch.randn(1, N, 3, h, D, generator=g).to(bf) for h in (3, 4, 6, 2)]
    fw = (torch.randn(T, M * d, generator=g), torch.randn(T, generator=g),
          torch.randn(C, T, generator=g), torch.randn(C, generator=g))
    widths = [d] * M
    q1, s1 = q8[:, :d], s[:, 0]
    return [
        ("quantize_int8 (1, 192) bf16", "native", lambda: ops.quantize_int8(x[:, 0])),
        ("dequantize_int8 (1, 192)", "native", lambda: ops.dequantize_int8(q1, s1)),
        ("layernorm_quantize_int8 (1, 1, 192) bf16", "native", lambda: ops.layernorm_quantize_int8(x, w, b, 1e-6)),
        ("subvit_attention stacked 4 x 3 heads, N 197", "attention", lambda: ops.subvit_attention(qkv)),
        ("subvit_attention list heads 3, 4, 6, 2", "attention", lambda: ops.subvit_attention(xs)),
        ("ensemble_fusion 4 x 192 -> 192 -> 100", "fusion", lambda: ops.ensemble_fusion(q8, s, widths, *fw)),
        ("torch.ops.devit.layernorm_quantize_int8 (custom-op dispatch)", "native",
         lambda: torch.ops.devit.layernorm_quantize_int8(x, w, b, 1e-6)),
        ("torch.ops.devit.subvit_attention (custom-op dispatch)", "attention",
         lambda: torch.ops.devit.subvit_attention(qkv, None)),
        ("torch.ops.devit.ensemble_fusion (custom-op dispatch)", "fusion",
         lambda: torch.ops.devit.ensemble_fusion(q8, s, widths, *fw)),
    ]


def _counted(rec: LaunchRecorder, fn, n: int) -> int:
    before = rec.calls
    for _ in range(n):
        fn()
    return rec.calls - before


def op_rows(quick: bool) -> list[dict]:
    calls, blocks = (50, 5) if quick else (1000, 15)
    rows = []
    with _one_thread(), torch.inference_mode(), patched_launch() as recs:
        for name, key, fn in op_cases():
            launches = _counted(recs[key], fn, 10)
            if launches != 10:
                raise RuntimeError(f"bench host: {name} reached its launch {launches} times in 10 calls, not 10")
            rows.append({"what": name, "host_us": host_us(fn, calls=calls, blocks=blocks), "launches_per_call": 1})
    return rows


# ---------------------------------------------------------------- the local engine's sender side, per block


class _ZeroRowAttention:
    """The attention op for a zero-row sender: runs the op on the block's batch-1 QKV (the op returns early
    on an empty batch, which would leave its host path out) and hands back zero rows of its output."""

    def __init__(self, attention, qkv1: torch.Tensor):
        self.attention, self.qkv1 = attention, qkv1

    def __call__(self, qkv: torch.Tensor) -> torch.Tensor:
        return self.attention(self.qkv1)[:, : qkv.shape[1]]


def _sender(depth: int, rows: int = 1):
    """(fn, stack): `fn()` runs the sender side of a 4-model DeViT of `depth` blocks on `rows` images."""
    from ..engines.stacked import SenderStack, patchify
    from ..ops import subvit_attention
    from ._e2e_models import build_devit, make_teacher

    teacher = make_teacher("vit_base_patch16_224", num_classes=8, img_size=16, patch_size=8, embed_dim=16,
                           depth=1, num_heads=1)
    shape = {"embed_dim": 16, "depth": depth, "num_heads": 1, "mlp_hidden": 16}
    model = build_devit(teacher, [shape] * 4)
    stack = SenderStack(list(model.submodels), torch.device("cpu"), torch.float32, subvit_attention)
    if rows == 0:
        g = stack.groups[0]
        qkv1 = g.qkv_view(0, g.qkv(0, g.embed(patchify(torch.randn(1, 3, 16, 16), stack.patch), 1)), 1)
        stack.attention = _ZeroRowAttention(subvit_attention, qkv1)
    images = torch.randn(rows, 3, 16, 16)
    return lambda: stack(images), stack


def _per_block(rows: int, calls: int, rounds: int, recs) -> tuple[float, float, int]:
    """(depth-1 us, depth-3 us, M) of the sender side on `rows` images, the two interleaved."""
    (f1, _), (f3, s3) = _sender(1, rows), _sender(3, rows)
    if _counted(recs["attention"], f3, 1) != 3:
        raise RuntimeError(f"bench host: the depth-3 sender ({rows} rows) did not launch the attention kernel "
                           "3 times")
    t1, t3 = [], []
    for _ in range(rounds):  # interleaved: the machine's load hits both alike
        t1.append(host_us(f1, calls=calls, blocks=3))
        t3.append(host_us(f3, calls=calls, blocks=3))
    return statistics.median(t1), statistics.median(t3), s3.groups[0].M


def yardstick_row(quick: bool) -> dict:
    """The machine's own speed, for reading these microseconds across runs and machines: a bare
    `torch.empty` (dispatcher + CPU allocator, no op logic); a shared VM's host can be 2-3x slower one
    day than the next."""
    calls, blocks = (200, 3) if quick else (5000, 9)
    with _one_thread(), torch.inference_mode():
        us = host_us(lambda: torch.empty(4, 5, 16), calls=calls, blocks=blocks)
    return {"what": "yardstick: torch.empty((4, 5, 16)) on the CPU", "host_us": us}


def sender_rows(quick: bool) -> list[dict]:
    calls, rounds = (20, 3) if quick else (300, 11)
    with _one_thread(), torch.inference_mode(), patched_launch() as recs:
        a, c, M = _per_block(1, calls, rounds, recs)
        az, cz, _ = _per_block(0, calls, rounds, recs)
    per_block, per_block_zero = (c - a) / 2, (cz - az) / 2
    return [
        {"what": f"sender side, depth 1 ({M} stacked sub-models, batch 1)", "host_us": a, "launches_per_call": 1},
        {"what": "sender side, depth 3", "host_us": c, "launches_per_call": 3},
        {"what": "sender side per block = (depth 3 - depth 1) / 2, aten CPU arithmetic included (upper bound)",
         "host_us": per_block},
        {"what": "sender side per block at zero rows: dispatch without arithmetic (excluding the kernels)",
         "host_us": per_block_zero, "target_us": TARGET_US, "within_target": per_block_zero <= TARGET_US},
    ]


def run(device: str = "cpu", quick: bool = False) -> list[Table]:
    t = Table("Host path: CPU time per call up to the launch (us)")
    t.add(what="method", note=METHOD + ("" if device == "cpu" else f" (also with --device {device}: no GPU is used)"))
    try:
        rows = [yardstick_row(quick)] + op_rows(quick) + sender_rows(quick)
    except RuntimeError as e:  # no native module / no triton: say so, invent nothing
        t.add(what="not measured", note=str(e))
        return [t]
    for r in rows:
        t.add(**r)
    return [t]
