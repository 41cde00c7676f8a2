"""`devit-ext bench kernels`: the int8 feature-transfer ops, native kernel vs torch reference.

Per op and size, on the same tensors in the same run: median time of the
public op (custom-op dispatch + the C++ or CUDA kernel) and of the pure-torch
reference chain (`devit_ext.ops.reference`), and their ratio.

- CPU rows use torch's intra-op thread count (the `threads` column); the
  target row is layernorm_quantize_int8 on 1,024 x 192 fp32 (>= 3x, 2 threads).
- CUDA rows: 4 x 256 x 192 bf16 latency per op, eager (CUDA events around one
  call: includes Python dispatch) and in a CUDA graph (the kernel itself);
  16,384 x 1,024 bf16 achieved GB/s against the device's copy bandwidth
  measured in the same run (target >= 70%).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..ops import quant
from ..ops import reference as R
from ..ops.dispatch import quant_path
from .timing import Table, median_time

EPS = 1e-6


def _bytes(op: str, rows: int, cols: int, in_size: int, out_size: int = 4) -> int:
    """DRAM bytes an op must move (each input read once, each output written once)."""
    if op == "quantize_int8":
        return rows * cols * in_size + rows * cols + rows * 4
    if op == "dequantize_int8":
        return rows * cols + rows * 4 + rows * cols * out_size
    # layernorm_quantize_int8: x, weight + bias, q, scale
    return rows * cols * in_size + 2 * cols * in_size + rows * cols + rows * 4


def _inputs(op: str, shape, dtype, device, n_sets: int):
    """n_sets independent argument tuples (inputs are rotated so caches don't flatter)."""
    sets = []
    d = shape[-1]
    for _ in range(n_sets):
        x = torch.randn(shape, device=device).to(dtype)
        if op == "quantize_int8":
            sets.append((x,))
        elif op == "dequantize_int8":
            q, s = R.quantize_int8(x)
            sets.append((q, s, dtype))
        else:
            w = (torch.rand(d, device=device) + 0.5).to(dtype)
            b = torch.randn(d, device=device).to(dtype)
            sets.append((x, w, b, EPS))
    return sets


_OPS: dict[str, tuple[Callable, Callable]] = {
    "quantize_int8": (quant.quantize_int8, R.quantize_int8),
    "dequantize_int8": (quant.dequantize_int8, R.dequantize_int8),
    "layernorm_quantize_int8": (quant.layernorm_quantize_int8, R.layernorm_quantize_int8),
}


def _cpu_rows(quick: bool) -> Table:
    t = Table("quant ops cpu: native C++ vs torch reference")
    threads = torch.get_num_threads()
    sizes = [((1024, 192), torch.float32), ((1024, 192), torch.bfloat16)]
    if not quick:
        sizes += [((4, 256, 192), torch.float16), ((16384, 1024), torch.float32), ((16384, 1024), torch.bfloat16)]
    path = quant_path(torch.device("cpu"))
    for shape, dtype in sizes:
        rows = 1
        for s in shape[:-1]:
            rows *= s
        big = rows * shape[-1] >= 1 << 22
        iters = 10 if big else (50 if quick else 200)
        for op, (fn, ref) in _OPS.items():
            sets = _inputs(op, shape, dtype, "cpu", 2 if big else 4)
            t_ref = median_time(ref, sets, device="cpu", warmup=3, iters=iters)
            t_nat = median_time(fn, sets, device="cpu", warmup=3, iters=iters)
            size = _bytes(op, rows, shape[-1], torch.finfo(dtype).bits // 8, torch.finfo(dtype).bits // 8)
            row = dict(
                op=op,
                shape="x".join(map(str, shape)),
                dtype=str(dtype).replace("torch.", ""),
                threads=threads,
                path=path,
                native_us=t_nat * 1e6,
                reference_us=t_ref * 1e6,
                speedup=t_ref / t_nat,
                native_GBps=size / t_nat / 1e9,
                target="",
            )
            if op == "layernorm_quantize_int8" and shape == (1024, 192) and dtype == torch.float32:
                row["target"] = f">=3x at 2 threads: {'met' if t_ref / t_nat >= 3 else 'NOT met'}"
            t.add(**row)
    return t


def _copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    n = 256 * 1024 * 1024
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    sec = median_time(lambda a, b: b.copy_(a), [(src, dst)], device=device, warmup=3, iters=20)
    return 2 * n / sec


def _graph_time(fn, args, reps: int = 20) -> float:
    """Seconds per call of fn(*args) replayed from a CUDA graph of `reps` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn(*args)
    sec = median_time(lambda: g.replay(), [()], device="cuda", warmup=3, iters=20)
    return sec / reps


def _cuda_rows(quick: bool) -> Table:
    t = Table("quant ops cuda: native CUDA vs torch reference")
    path = quant_path(torch.device("cuda"))
    dev = torch.device("cuda")
    copy_bw = _copy_bandwidth(dev)
    sizes = [((4, 256, 192), torch.bfloat16), ((16384, 1024), torch.bfloat16)]
    if not quick:
        sizes += [((4, 256, 192), torch.float32), ((16384, 1024), torch.float32), ((4, 64, 1024), torch.bfloat16)]
    for shape, dtype in sizes:
        rows = 1
        for s in shape[:-1]:
            rows *= s
        esize = torch.finfo(dtype).bits // 8
        for op, (fn, ref) in _OPS.items():
            sets = _inputs(op, shape, dtype, dev, 4)
            row = dict(op=op, shape="x".join(map(str, shape)), dtype=str(dtype).replace("torch.", ""), path=path)
            try:
                t_ref = median_time(ref, sets, device=dev, warmup=5, iters=50)
                t_nat = median_time(fn, sets, device=dev, warmup=5, iters=50)
                t_graph = _graph_time(fn, sets[0])
                t_ref_graph = _graph_time(ref, sets[0])
                size = _bytes(op, rows, shape[-1], esize, esize)
                row.update(
                    native_us=t_nat * 1e6,
                    reference_us=t_ref * 1e6,
                    speedup=t_ref / t_nat,
                    native_graph_us=t_graph * 1e6,
                    reference_graph_us=t_ref_graph * 1e6,
                    native_GBps=size / t_graph / 1e9,
                    copy_GBps=copy_bw / 1e9,
                    pct_of_copy=100.0 * size / t_graph / copy_bw,
                )
                if rows * shape[-1] < 1 << 20:
                    row["target"] = f"<8 us/op (graph): {'met' if t_graph < 8e-6 else 'NOT met'}"
                else:
                    row["target"] = f">=70% of copy: {'met' if size / t_graph >= 0.7 * copy_bw else 'NOT met'}"
            except Exception as e:  # noqa: BLE001 - one failing row must not lose the GPU run
                row["error"] = f"{type(e).__name__}: {e}"[:200]
            t.add(**row)
    return t


def run(device: str, quick: bool) -> list[Table]:
    tables = [_cpu_rows(quick)]
    if device == "cuda":
        tables.append(_cuda_rows(quick))
    return tables
