"""Benchmarks of the Triton ops: subvit_attention and ensemble_fusion.

GPU (`device="cuda"`), all in one run on the same tensors (medians of CUDA-event
timings, warm-up excluded, inputs rotated):

- subvit_attention (4 x (3 heads, D 64), N 197, batch 1/8/64/256; heterogeneous
  heads 3, 4, 6, 2) vs (a) torch SDPA called per sub-model with the timm-style
  permutes it needs, (b) one SDPA call over all sub-models merged, with its
  permutes/copies, each for every SDPA backend (flash, mem-efficient, cuDNN,
  math). The Triton input is the QKV linear output viewed (no copy).
- ensemble_fusion (4 x 192 -> 1024 -> 100, batch 1/8/64/256; heterogeneous
  widths) vs the eager reference chain (fp32 math, what devit_ext.ops.reference
  does), an eager chain in the weights' dtype, and torch.compile of the reference.
- Ceilings measured in the same run: a bf16 matmul and a device-to-device copy;
  every row gives achieved TFLOP/s and GB/s (compulsory bytes) and % of those.

CPU (`device="cpu"`): the ops' CPU paths vs the reference at small sizes; the
Triton rows say they need a GPU (no numbers are invented).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from .timing import Table, median_time

HOMO = (3, 3, 3, 3)
HETERO = (3, 4, 6, 2)
N_TOK, HEAD_D = 197, 64
FUSION_WIDTHS = (192, 192, 192, 192)
FUSION_HETERO = (192, 256, 384, 128)
D_T, CLASSES = 1024, 100


# ----------------------------------------------------------------------------- helpers


def _backends():
    from torch.nn.attention import SDPBackend

    names = [("flash", "FLASH_ATTENTION"), ("mem_efficient", "EFFICIENT_ATTENTION"),
             ("cudnn", "CUDNN_ATTENTION"), ("math", "MATH")]
    return [(n, getattr(SDPBackend, a)) for n, a in names if hasattr(SDPBackend, a)]


def _sdpa_ctx(backend):
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()


def ceilings(device: str, quick: bool) -> dict:
    """Measured bf16 matmul TFLOP/s and device copy GB/s (read + write) on this device."""
    if device != "cuda":
        return {}
    n = 4096 if quick else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = median_time(lambda x, y: x @ y, [(a, b)], device=device, warmup=3, iters=10)
    del a, b
    nbytes = (256 if quick else 1024) << 20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    tc = median_time(lambda s, d: d.copy_(s), [(src, dst)], device=device, warmup=3, iters=10)
    del src, dst
    return {"matmul_tflops": 2 * n**3 / t / 1e12, "copy_gbs": 2 * nbytes / tc / 1e9, "matmul_n": n}


def _rates(row: dict, seconds: float, flops: int, nbytes: int, ceil: dict) -> dict:
    tf, gb = flops / seconds / 1e12, nbytes / seconds / 1e9
    row.update(us=seconds * 1e6, tflops=tf, gbs=gb)
    if ceil:
        row.update(pct_mm=100 * tf / ceil["matmul_tflops"], pct_copy=100 * gb / ceil["copy_gbs"])
    return row


def _n_sets(nbytes_per_set: int) -> int:
    """Rotate enough input sets to defeat L2 (50 MB on H100) without wasting memory."""
    return max(2, min(6, math.ceil(200e6 / max(nbytes_per_set, 1))))


# ----------------------------------------------------------------------------- attention


def _attn_inputs(heads, B, N, D, dtype, device, sets):
    """Per set: the QKV linear outputs, viewed as the op reads them (stacked if homogeneous)."""
    out = []
    for _ in range(sets):
        if len(set(heads)) == 1:
            lin = torch.randn(len(heads), B, N, 3 * heads[0] * D, device=device, dtype=dtype)
            out.append(lin.view(len(heads), B, N, 3, heads[0], D))
        else:
            out.append([torch.randn(B, N, 3 * h * D, device=device, dtype=dtype).view(B, N, 3, h, D) for h in heads])
    return out


def _per_model(qkv):
    return list(qkv.unbind(0)) if isinstance(qkv, torch.Tensor) else list(qkv)


def looped_sdpa(qkv):
    """What timm's Attention does, once per sub-model: permute, SDPA, transpose + reshape (copy)."""
    outs = []
    for t in _per_model(qkv):  # (B, N, 3, H, D)
        B, N, _, H, D = t.shape
        q, k, v = t.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D) strided views
        o = F.scaled_dot_product_attention(q, k, v)
        outs.append(o.transpose(1, 2).reshape(B, N, H * D))
    return outs


def merged_sdpa(qkv):
    """One SDPA call for all sub-models: models merged into the batch (homogeneous) or heads (heterogeneous)."""
    if isinstance(qkv, torch.Tensor):
        M, B, N, _, H, D = qkv.shape
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).reshape(3, M * B, H, N, D).unbind(0)  # one copy
        o = F.scaled_dot_product_attention(q, k, v)
        return o.reshape(M, B, H, N, D).permute(0, 1, 3, 2, 4).reshape(M, B, N, H * D)
    B, N, _, _, D = qkv[0].shape
    heads = [t.shape[3] for t in qkv]
    q, k, v = torch.cat([t.permute(2, 0, 3, 1, 4) for t in qkv], dim=2).unbind(0)  # (B, sum H, N, D) copy
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # (B, N, sum H, D)
    return [x.reshape(B, N, h * D) for x, h in zip(o.split(heads, dim=2), heads)]


def attention_table(device, quick, ceil, *, batches=None, heads_sets=None, N=N_TOK, D=HEAD_D,
                    dtype=torch.bfloat16, backends=None, iters=None) -> Table:
    from devit_ext import kernels, ops
    from devit_ext.kernels.subvit_attention import bytes_moved, flops

    backends = _backends() if backends is None else backends
    batches = batches or ((1, 64, 256) if quick else (1, 8, 64, 256))
    heads_sets = heads_sets or (HOMO, HETERO)
    iters = iters or (10 if quick else 30)
    t = Table(f"subvit_attention: Triton vs SDPA looped/merged ({device}, {str(dtype)[6:]}, N {N}, D {D})")
    for heads in heads_sets:
        for B in batches:
            es = torch.finfo(dtype).bits // 8
            fl, nb = flops(B, N, D, heads), bytes_moved(B, N, D, heads, es)
            inputs = [(x,) for x in _attn_inputs(heads, B, N, D, dtype, device, _n_sets(3 * nb // 4))]
            base = dict(models="x".join(map(str, heads)) + " heads", batch=B)
            tk = median_time(kernels.subvit_attention, inputs, device=device, iters=iters)
            t.add(**_rates({**base, "impl": "triton (1 launch)", "vs_triton": 1.0}, tk, fl, nb, ceil))
            to = median_time(ops.subvit_attention, inputs, device=device, iters=iters)
            t.add(**_rates({**base, "impl": "devit.subvit_attention op", "vs_triton": to / tk}, to, fl, nb, ceil))
            for name, be in backends:
                for label, fn in (("looped", looped_sdpa), ("merged", merged_sdpa)):
                    row = {**base, "impl": f"sdpa {label} [{name}]"}
                    try:
                        with _sdpa_ctx(be):
                            ts = median_time(fn, inputs, device=device, iters=iters)
                    except RuntimeError as e:  # backend refuses these inputs: say so, no number
                        t.add(**row, note=f"n/a: {str(e).splitlines()[0][:60]}")
                        continue
                    t.add(**_rates({**row, "vs_triton": ts / tk}, ts, fl, nb, ceil))
            del inputs
    return t


# ----------------------------------------------------------------------------- fusion


def _fusion_inputs(B, widths, T, C, dtype, device, sets):
    M, K = len(widths), sum(widths)
    w1 = torch.randn(T, K, device=device, dtype=dtype) / K**0.5
    b1 = torch.randn(T, device=device, dtype=dtype)
    w2 = torch.randn(C, T, device=device, dtype=dtype) / T**0.5
    b2 = torch.randn(C, device=device, dtype=dtype)
    out = []
    for _ in range(sets):
        q = torch.randint(-127, 128, (B, K), device=device, dtype=torch.int8)
        s = torch.rand(B, M, device=device) / 50
        out.append((q, s, list(widths), w1, b1, w2, b2))
    return out


def eager_lowp_chain(q, s, widths, w1, b1, w2, b2):
    """The eager chain a user writes in the weights' dtype: dequantise, concat, two linears."""
    parts = torch.split(q, list(widths), dim=1)
    x = torch.cat([p.to(w1.dtype) * s[:, m : m + 1].to(w1.dtype) for m, p in enumerate(parts)], dim=1)
    return F.linear(F.linear(x, w1, b1), w2, b2).float()


def fusion_table(device, quick, ceil, *, batches=None, widths_sets=None, T=D_T, C=CLASSES,
                 dtype=torch.bfloat16, compile_ref=True, iters=None) -> Table:
    from devit_ext import kernels, ops
    from devit_ext.kernels.ensemble_fusion import bytes_moved, flops
    from devit_ext.ops import reference

    batches = batches or ((1, 256) if quick else (1, 8, 64, 256))
    widths_sets = widths_sets or ((FUSION_WIDTHS,) if quick else (FUSION_WIDTHS, FUSION_HETERO))
    iters = iters or (20 if quick else 50)
    t = Table(f"ensemble_fusion: Triton vs eager/compiled reference ({device}, {str(dtype)[6:]} weights, d_T {T}, C {C})")
    compiled = None
    if compile_ref:
        compiled = torch.compile(reference.ensemble_fusion)
    es = torch.finfo(dtype).bits // 8
    for widths in widths_sets:
        for B in batches:
            K, M = sum(widths), len(widths)
            fl, nb = flops(B, K, T, C), bytes_moved(B, K, T, C, M, es)
            inputs = _fusion_inputs(B, widths, T, C, dtype, device, 4)
            base = dict(widths="+".join(map(str, widths)), batch=B)
            tk = median_time(kernels.ensemble_fusion, inputs, device=device, iters=iters)
            t.add(**_rates({**base, "impl": "triton (1 launch)", "vs_triton": 1.0}, tk, fl, nb, ceil))
            impls = [("devit.ensemble_fusion op", ops.ensemble_fusion),
                     ("eager reference (fp32 math)", reference.ensemble_fusion),
                     (f"eager {str(dtype)[6:]} chain", eager_lowp_chain)]
            if compiled is not None:
                impls.append(("torch.compile(reference)", compiled))
            for name, fn in impls:
                ts = median_time(fn, inputs, device=device, iters=iters)
                t.add(**_rates({**base, "impl": name, "vs_triton": ts / tk}, ts, fl, nb, ceil))
    return t


# ----------------------------------------------------------------------------- CPU


def cpu_table(quick: bool) -> Table:
    """CPU paths of the ops vs the reference (same tensors, same run). Triton needs a GPU here."""
    t = Table("triton_ops: CPU paths vs reference (cpu; the Triton rows need a GPU: not measured here)")
    iters = 5 if quick else 20
    for B in (1,) if quick else (1, 8):
        inputs = [(x,) for x in _attn_inputs(HOMO, B, N_TOK, HEAD_D, torch.float32, "cpu", 2)]
        size = f"4x3 heads, N {N_TOK}, D {HEAD_D}, B {B}, fp32"
        _cpu_rows(t, "subvit_attention", size, "torch SDPA", inputs, iters)
    for B in (64,) if quick else (64, 256):
        inputs = _fusion_inputs(B, FUSION_WIDTHS, D_T, CLASSES, torch.float32, "cpu", 2)
        _cpu_rows(t, "ensemble_fusion", f"4x192 -> {D_T} -> {CLASSES}, B {B}, fp32", "eager torch", inputs, iters)
    return t


def _cpu_rows(t: Table, op: str, size: str, ref_label: str, inputs, iters: int) -> None:
    """The op's CPU path vs its reference on the same inputs, plus the Triton row a GPU run fills."""
    from devit_ext import ops
    from devit_ext.ops import reference

    tr = median_time(getattr(reference, op), inputs, iters=iters)
    to = median_time(getattr(ops, op), inputs, iters=iters)
    t.add(op=op, size=size, impl=f"reference ({ref_label})", us=tr * 1e6, vs_reference=1.0)
    t.add(op=op, size=size, impl=f"devit.{op} (CPU path)", us=to * 1e6, vs_reference=tr / to)
    t.add(op=op, size=size, impl="triton", note="needs a CUDA GPU (bench kernels --device cuda)")


def run(device: str, quick: bool) -> list[Table]:
    if device != "cuda":
        return [cpu_table(quick)]
    from devit_ext import kernels

    if not kernels.available():
        t = Table("triton_ops: Triton is not available on this machine")
        t.add(note=str(kernels.info()))
        return [t]
    ceil = ceilings(device, quick)
    tc = Table(f"triton_ops ceilings: {torch.cuda.get_device_name()}")
    tc.add(what=f"bf16 matmul {ceil['matmul_n']}^3", tflops=ceil["matmul_tflops"])
    tc.add(what="device-to-device copy (read + write)", gbs=ceil["copy_gbs"])
    with torch.inference_mode():
        return [tc, attention_table(device, quick, ceil), fusion_table(device, quick, ceil)]
