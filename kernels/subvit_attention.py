"""subvit_attention: softmax(Q K^T * scale) V for every (sub-model, image, head) in one launch.

Layout in:  stacked qkv (M, B, N, 3, H, D), normally a view of the QKV linear
            output (M, B, N, 3*H*D) -- read with its strides, no copy; or a list
            of M tensors (B, N, 3, H_m, D) (heterogeneous sub-models).
Layout out: (M, B, N, H*D) (or a list of (B, N, H_m*D)): what the output
            projection reads.

Grid: (query blocks, global heads G = sum_m H_m, images B); query blocks of one
head are adjacent in launch order so their K/V re-reads hit L2. Each global head
g has one row in a small int64 table (cached on the device by content):

    [q_off, s_b, s_n, s_3, o_off, o_b, o_n, 0]

q_off: element offset of Q[b=0, n=0, h, d=0] from the qkv pointer (for the list
form, relative to the first tensor: sub-models need not share an allocation or
strides); s_b/s_n/s_3: strides of image, token and q/k/v; o_*: same for the
output. The head width dimension must be contiguous (stride 1).

Softmax: online (running max m_i, running sum l_i) in fp32, in base 2 with
log2(e) folded into the scale. Keys past N are masked to -inf, query rows past
N are neither computed into nor stored. Since N >= 1, every row sees a finite
max in the first key block, so no NaN can appear.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from devit_ext.checks import AttnShape, check_attention

LOG2E = 1.4426950408889634


@triton.jit
def _subvit_attention_fwd(
    qkv_ptr,  # first qkv tensor; all offsets are relative to it (elements)
    out_ptr,  # first output tensor
    tab_ptr,  # (G, 8) int64 per-head table, see module docstring
    N,  # tokens
    qk_scale,  # scale * log2(e)
    D: tl.constexpr,  # head width (16, 32, 64, 128)
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per inner step
    ALIGN: tl.constexpr,  # every offset/stride is a multiple of ALIGN elements (16-byte vector hint)
    DOT_PREC: tl.constexpr,  # "ieee" for fp32 operands
):
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    row = tab_ptr + g * 8
    q_off = tl.load(row + 0)
    s_b = tl.load(row + 1)
    s_n = tl.load(row + 2)
    s_3 = tl.load(row + 3)
    o_off = tl.load(row + 4)
    o_b = tl.load(row + 5)
    o_n = tl.load(row + 6)
    if ALIGN > 1:
        q_off = tl.multiple_of(q_off, ALIGN)
        s_b = tl.multiple_of(s_b, ALIGN)
        s_n = tl.multiple_of(s_n, ALIGN)
        s_3 = tl.multiple_of(s_3, ALIGN)
        o_off = tl.multiple_of(o_off, ALIGN)
        o_b = tl.multiple_of(o_b, ALIGN)
        o_n = tl.multiple_of(o_n, ALIGN)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query rows
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,) keys within a step
    offs_d = tl.arange(0, D)  # (D,)
    m_mask = offs_m < N

    q_base = qkv_ptr + q_off + b * s_b  # Q[b, 0, h, 0]
    k_base = q_base + s_3  # K[b, 0, h, 0]
    v_base = q_base + 2 * s_3  # V[b, 0, h, 0]

    # Q tile (BLOCK_M, D), kept in registers for the whole key loop
    q = tl.load(q_base + offs_m[:, None] * s_n + offs_d[None, :], mask=m_mask[:, None], other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max (log2 units)
    l_i = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp2
    acc = tl.zeros((BLOCK_M, D), tl.float32)  # running P @ V

    for start in range(0, N, BLOCK_N):
        kn = start + offs_n  # (BLOCK_N,) key indices
        k_mask = kn < N
        # K^T tile (D, BLOCK_N)
        kt = tl.load(k_base + offs_d[:, None] + kn[None, :] * s_n, mask=k_mask[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N) fp32
        s = tl.where(k_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)  # rescale of the old state (0 on the first step)
        p = tl.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N)
        l_i = l_i * alpha + tl.sum(p, 1)
        # V tile (BLOCK_N, D)
        v = tl.load(v_base + kn[:, None] * s_n + offs_d[None, :], mask=k_mask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_base = out_ptr + o_off + b * o_b  # out[b, 0, h*D]
    tl.store(
        o_base + offs_m[:, None] * o_n + offs_d[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None],
    )


def tile_config(N: int, D: int, dtype: torch.dtype, programs_per_qblock: int, target: _launch.Target,
                block_m=None, block_n=None, num_warps=None, num_stages=None):
    """The launcher's tile choice (BLOCK_M, BLOCK_N, num_warps, num_stages); `devit-ext bench static`
    compiles exactly what this returns. Explicit arguments win.

    bf16/fp16: BLOCK_N 64 (32 at D 128: the K and V tiles double); BLOCK_M 128 with 8 warps when that
    still gives >= 2 waves of programs, else 64 with 4 (small batches need more, smaller programs).
    fp32 ("ieee" dots on FFMA, no tensor cores): 32 x 32, 4 warps at D <= 64, 8 at D 128. At 64 x 64 ptxas
    keeps 32 registers and puts ~7 KB per thread on the stack (13-17 KB of spill stores, ~8,000 local-memory
    instructions per program); 32 x 32 compiles to 80-92 registers, no spill (D 64); at D 128 4 warps
    need 255 registers and spill on sm_80, 8 warps take 80 (sm_80) / 110 (sm_90).
    Interpreter (target.arch None): 16 x 16 tiles, cheap in numpy."""
    if target.arch is None:
        return block_m or 16, block_n or 16, num_warps or 4, num_stages or 1
    if dtype == torch.float32:
        bn = block_n or 32
        bm = block_m or 32
    else:
        bn = block_n or (64 if D <= 64 else 32)
        if block_m is None:
            bm = 128 if programs_per_qblock * _launch.cdiv(N, 128) >= 2 * target.sms and D <= 64 else 64
        else:
            bm = block_m
    if block_m is None and N <= 32:
        bm = max(16, min(bm, _launch.next_pow2(N)))
    nw = num_warps or (8 if bm >= 128 or (dtype == torch.float32 and D > 64) else 4)
    ns = num_stages or 2
    return bm, bn, nw, ns


def _elem_offset(t: torch.Tensor, base: torch.Tensor) -> int:
    diff = t.data_ptr() - base.data_ptr()
    es = t.element_size()
    if diff % es:
        raise RuntimeError("subvit_attention: tensors are not aligned to their element size")
    return diff // es


def subvit_attention(qkv, scale=None, *, out=None, block_m=None, block_n=None, num_warps=None, num_stages=None,
                     target=None):
    """Triton launcher. Arguments as devit_ext.ops.subvit_attention; `out` (optional) receives the
    result (a tensor for the stacked form, a list for the list form; last dim contiguous).
    Forward only: gradients go through devit_ext.ops (which falls back to the reference).
    `target` (a `_launch.Target`, default: the tensors' device) is what the tiles are chosen for."""
    shape, s = check_attention(qkv, scale)
    return launch(qkv, shape, s, out=out, block_m=block_m, block_n=block_n, num_warps=num_warps,
                  num_stages=num_stages, target=target)


class StackedLaunch:
    """A stacked-form launch with everything that follows from qkv's layout decided once: output shape,
    grid, tiles, metadata table. Calling it with a qkv of that layout allocates the output and launches.

    Why: at batch 1 the host path is the latency floor (without CUDA graphs); the engine calls the op
    once per block with the same layout, so the per-call work shrinks to an allocation and the launch."""

    __slots__ = ("out_shape", "dtype", "device", "grid", "table", "N", "scale_log2", "meta")

    def __init__(self, shape: AttnShape, strides: tuple, s: float, tgt: _launch.Target):
        M, H, B, N, D = len(shape.heads), shape.heads[0], shape.B, shape.N, shape.D
        G = M * H
        if B and (G > 65535 or B > 65535):
            raise ValueError(f"qkv: at most 65535 heads and 65535 images per launch, got {G} heads, B = {B}")
        self.out_shape, self.dtype, self.device = (M, B, N, H * D), shape.dtype, shape.device
        rows = _stacked_rows(M, H, D, strides, (B * N * H * D, N * H * D, H * D, 1))  # contiguous output
        align = _launch.align_elems(shape.dtype.itemsize, [v for r in rows for v in r[:7]])
        self.table = _launch.device_table(rows, shape.device)
        bm, bn, nw, ns = tile_config(N, D, shape.dtype, G * B, tgt)
        self.grid, self.N, self.scale_log2 = (_launch.cdiv(N, bm), G, B), N, s * LOG2E
        self.meta = dict(D=D, BLOCK_M=bm, BLOCK_N=bn, ALIGN=align, DOT_PREC=_launch.dot_precision(shape.dtype),
                         num_warps=nw, num_stages=ns)

    def __call__(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv: the layout this launch was made for (the caller keys it by shape, strides, dtype, device)."""
        out = torch.empty(self.out_shape, dtype=self.dtype, device=self.device)
        if self.out_shape[1] == 0:
            return out
        _subvit_attention_fwd[self.grid](qkv, out, self.table, self.N, self.scale_log2, **self.meta)
        return out


_STACKED: dict = {}  # (shape, strides, scale, target) -> StackedLaunch


def stacked_launch(shape: AttnShape, strides: tuple, s: float, target=None) -> StackedLaunch:
    """The cached StackedLaunch of a checked stacked-form layout (head width contiguous: strides[-1] == 1)."""
    _launch.check_launchable("subvit_attention", shape.device)
    tgt = target or _launch.target(shape.device)
    key = (shape, strides, s, tgt)
    plan = _STACKED.get(key)
    if plan is None:
        plan = _STACKED[key] = StackedLaunch(shape, strides, s, tgt)
        if len(_STACKED) > 256:
            _STACKED.pop(next(iter(_STACKED)))
    return plan


def launch(qkv, shape: AttnShape, s: float, *, out=None, block_m=None, block_n=None, num_warps=None, num_stages=None,
           target=None):
    """The launch itself, for arguments already checked by `devit_ext.checks.check_attention`
    (which gave `shape` and the scale `s`): devit_ext.ops calls this, so its inputs are checked once."""
    if shape.stacked and out is None and qkv.stride(-1) == 1 and (block_m, block_n, num_warps, num_stages) == (None,) * 4:
        return stacked_launch(shape, qkv.stride(), s, target)(qkv)
    _launch.check_launchable("subvit_attention", shape.device)
    B, N, D = shape.B, shape.N, shape.D
    ins = [qkv] if shape.stacked else list(qkv)
    # the head width must be contiguous; other strides are free (a strided view of the QKV output is fine)
    ins = [t if t.stride(-1) == 1 else t.contiguous() for t in ins]

    if shape.stacked:
        M, H = len(shape.heads), shape.heads[0]
        if out is None:
            out = torch.empty((M, B, N, H * D), dtype=shape.dtype, device=shape.device)
        _check_out("out", out, (M, B, N, H * D), shape)
        outs, result = [out], out
        key = (tuple(ins[0].shape), ins[0].stride(), out.stride())
    else:
        if out is None:
            out = [torch.empty((B, N, h * D), dtype=shape.dtype, device=shape.device) for h in shape.heads]
        if not isinstance(out, (list, tuple)) or len(out) != len(ins):
            raise ValueError(f"out: expected a list of {len(ins)} tensors (B, N, H_m*D)")
        for i, (o, h) in enumerate(zip(out, shape.heads)):
            _check_out(f"out[{i}]", o, (B, N, h * D), shape)
        outs, result = list(out), list(out)
        key = tuple(
            (H, x.stride(), _elem_offset(x, ins[0]), o.stride(), _elem_offset(o, outs[0]))
            for x, o, H in zip(ins, outs, shape.heads)
        )
    G = sum(shape.heads)
    if B == 0:
        return result
    if G > 65535 or B > 65535:
        raise ValueError(f"qkv: at most 65535 heads and 65535 images per launch, got {G} heads, B = {B}")
    key = (shape.stacked, D, key, str(shape.device), ins[0].element_size())
    plan = _PLANS.get(key)
    if plan is None:
        rows = _table_rows(shape, ins, outs)
        align = _launch.align_elems(ins[0].element_size(), [v for r in rows for v in r[:7]])
        plan = _PLANS[key] = (_launch.device_table(rows, shape.device), align)
        if len(_PLANS) > 256:
            _PLANS.pop(next(iter(_PLANS)))
    table, align = plan
    tgt = target or _launch.target(shape.device)
    bm, bn, nw, ns = tile_config(N, D, shape.dtype, G * B, tgt, block_m, block_n, num_warps, num_stages)
    grid = (_launch.cdiv(N, bm), G, B)
    _subvit_attention_fwd[grid](
        ins[0], outs[0], table, N, s * LOG2E,
        D=D, BLOCK_M=bm, BLOCK_N=bn, ALIGN=align, DOT_PREC=_launch.dot_precision(shape.dtype),
        num_warps=nw, num_stages=ns,
    )
    return result


_PLANS: dict = {}  # layout -> (device table, alignment); the table is a pure function of the layout


def _table_rows(shape, ins, outs) -> list[list[int]]:
    """One row per global head: [q_off, s_b, s_n, s_3, o_off, o_b, o_n, 0] (elements)."""
    D = shape.D
    if shape.stacked:
        return _stacked_rows(len(shape.heads), shape.heads[0], D, ins[0].stride(), outs[0].stride())
    rows = []
    for x, o, H in zip(ins, outs, shape.heads):
        xs, os_ = x.stride(), o.stride()
        xo, oo = _elem_offset(x, ins[0]), _elem_offset(o, outs[0])
        rows += [[xo + h * xs[3], xs[0], xs[1], xs[2], oo + h * D, os_[0], os_[1], 0] for h in range(H)]
    return rows


def _stacked_rows(M: int, H: int, D: int, xs: tuple, os_: tuple) -> list[list[int]]:
    """The stacked form's table: qkv strides xs (M, B, N, 3, H, D), output strides os_ (M, B, N, H*D)."""
    return [[m * xs[0] + h * xs[4], xs[1], xs[2], xs[3], m * os_[0] + h * D, os_[1], os_[2], 0]
            for m in range(M) for h in range(H)]


def _check_out(name, o, expected, shape) -> None:
    if not isinstance(o, torch.Tensor) or tuple(o.shape) != tuple(expected):
        got = tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__
        raise ValueError(f"{name}: expected a tensor of shape {tuple(expected)}, got {got}")
    if o.dtype != shape.dtype or o.device != shape.device:
        raise TypeError(f"{name}: expected dtype {shape.dtype} on {shape.device}, got {o.dtype} on {o.device}")
    if o.stride(-1) != 1:
        raise ValueError(f"{name}: expected a contiguous last dimension, got strides {o.stride()}")


def flops(B: int, N: int, D: int, heads) -> int:
    """Matmul FLOPs: two (N x N x D) products per (image, head)."""
    return 4 * B * sum(heads) * N * N * D


def bytes_moved(B: int, N: int, D: int, heads, element_size: int) -> int:
    """Compulsory HBM traffic: read Q, K, V once, write O once."""
    return 4 * B * sum(heads) * N * D * element_size


__all__ = ["subvit_attention", "launch", "stacked_launch", "StackedLaunch", "tile_config", "flops", "bytes_moved", "LOG2E"]
