"""ensemble_fusion: the aggregator's head in one kernel.

    logits (B, C) fp32 = (dequant(q) @ W1^T + b1) @ W2^T + b2

q int8 (B, K = sum widths) holds the M device tokens side by side, scales fp32
(B, M) one per (image, device), W1 = map_weight (T, K), W2 = cls_weight (C, T).

Dequantisation in the GEMM prologue, exactly: the K loop walks tiles that never
straddle two devices (a small int table [k0, k_end, device] per tile, cached on
the device), so inside a tile the scale is one value per row and

    x_tile @ W1_tile = scale[:, m] * (q_tile @ W1_tile)

with q converted to the weight dtype exactly (|q| <= 127 fits fp16/bf16) and fp32
accumulation: no rounding of the dequantised token at all.

Program (b-block, t-split x k-split, c-block): for each BLOCK_T tile of d_T in
its t-split, h_tile (BLOCK_B, BLOCK_T) = sum over the K tiles of its k-split
(+ b1 in k-split 0), stays in registers and is immediately multiplied into the
logits partial (BLOCK_B, BLOCK_C) += h_tile @ W2[c, t]^T, so h never leaves the
chip (the logits are linear in h, so K partials of h give logits partials).
With one split of each the program stores its logits (plain store,
deterministic); with several (to fill the SMs at small batch) the partials are
atomically added into a zeroed output (fp32 atomics: summation order, hence the
last bits, can differ run to run). When C > BLOCK_C
(128) the c-blocks each recompute their h tiles: right for the paper's heads
(C = 100 or fewer classes per branch), a cost for 1000-class heads.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import _launch
from devit_ext.checks import FusionShape, check_fusion


@triton.jit
def _ensemble_fusion_fwd(
    q_ptr, sc_ptr, tiles_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr,
    B, T, C, NK,  # images, d_T, classes, number of K tiles
    s_qb, s_sb, s_sm, s_w1t, s_w2c, s_ob,  # row strides (columns are contiguous) and scales' strides
    T_PER_SPLIT,  # d_T columns per t-split (a multiple of BLOCK_T)
    K_SPLITS, TILES_PER_KSPLIT,  # K tiles are cut into K_SPLITS runs of TILES_PER_KSPLIT (the last may be short)
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    ALIGN_K: tl.constexpr,  # every tile start k0 is a multiple of ALIGN_K
    DOT_PREC: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_t = tl.program_id(1) // K_SPLITS
    pid_k = tl.program_id(1) % K_SPLITS
    pid_c = tl.program_id(2)

    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)  # (BLOCK_B,) images
    r_mask = rows < B
    cls = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,) classes
    c_mask = cls < C
    rows64 = rows.to(tl.int64)

    logits = tl.zeros((BLOCK_B, BLOCK_C), tl.float32)
    t_lo = pid_t * T_PER_SPLIT
    t_hi = tl.minimum(t_lo + T_PER_SPLIT, T)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        tt = t0 + tl.arange(0, BLOCK_T)  # (BLOCK_T,) columns of h
        t_mask = tt < T
        h = tl.zeros((BLOCK_B, BLOCK_T), tl.float32)
        for i in range(pid_k * TILES_PER_KSPLIT, tl.minimum(NK, (pid_k + 1) * TILES_PER_KSPLIT)):
            k0 = tl.load(tiles_ptr + 3 * i)  # tile start
            k_end = tl.load(tiles_ptr + 3 * i + 1)  # end of this device's columns
            dev = tl.load(tiles_ptr + 3 * i + 2)  # device of this tile
            if ALIGN_K > 1:
                k0 = tl.multiple_of(k0, ALIGN_K)
            kk = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
            k_mask = kk < k_end
            # int8 token tile (BLOCK_B, BLOCK_K)
            qt = tl.load(q_ptr + rows64[:, None] * s_qb + kk[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0)
            # W1^T tile (BLOCK_K, BLOCK_T)
            w1 = tl.load(w1_ptr + tt[None, :] * s_w1t + kk[:, None], mask=k_mask[:, None] & t_mask[None, :], other=0.0)
            part = tl.dot(qt.to(w1.dtype), w1, input_precision=DOT_PREC)  # exact q, fp32 accumulate
            sc = tl.load(sc_ptr + rows64 * s_sb + dev * s_sm, mask=r_mask, other=0.0)  # (BLOCK_B,) fp32
            h += part * sc[:, None]
        if HAS_B1:
            # b1 once per column of h: in the first K split only (the others hold partial sums of q W1^T)
            h += tl.load(b1_ptr + tt, mask=t_mask & (pid_k == 0), other=0.0).to(tl.float32)[None, :]
        # W2^T tile (BLOCK_T, BLOCK_C)
        w2 = tl.load(w2_ptr + cls[None, :] * s_w2c + tt[:, None], mask=t_mask[:, None] & c_mask[None, :], other=0.0)
        logits += tl.dot(h.to(w2.dtype), w2, input_precision=DOT_PREC)

    if HAS_B2:
        b2 = tl.load(b2_ptr + cls, mask=c_mask & (pid_t == 0) & (pid_k == 0), other=0.0).to(tl.float32)
        logits += b2[None, :]
    o_ptrs = out_ptr + rows64[:, None] * s_ob + cls[None, :]
    o_mask = r_mask[:, None] & c_mask[None, :]
    if ATOMIC:
        tl.atomic_add(o_ptrs, logits, mask=o_mask)
    else:
        tl.store(o_ptrs, logits, mask=o_mask)


def k_tiles(widths, block_k: int) -> list[list[int]]:
    """[k0, k_end, device] for every K tile; no tile straddles two devices."""
    rows, start = [], 0
    for m, w in enumerate(widths):
        for k0 in range(start, start + w, block_k):
            rows.append([k0, start + w, m])
        start += w
    return rows


class FusionTiles(NamedTuple):
    block_b: int
    block_t: int
    block_k: int
    block_c: int
    b_blocks: int
    c_blocks: int
    t_splits: int
    t_per_split: int  # d_T columns per t-split
    k_splits: int
    tiles_per_ksplit: int  # K tiles per k-split
    num_warps: int
    num_stages: int


def tile_config(B: int, T: int, C: int, widths, dtype: torch.dtype, target: _launch.Target, block_b=None,
                block_t=None, block_k=None, t_splits=None, k_splits=None, num_warps=None, num_stages=None) -> FusionTiles:
    """The launcher's tile choice; `devit-ext bench static` compiles exactly what this returns.
    Explicit arguments win; with t_splits given and k_splits not, k_splits is 1 (t_splits=1: one pass).

    bf16/fp16 on sm_90+: BLOCK_B 64, the rows one warpgroup MMA (wgmma) needs; below 64 Triton falls back
    to mma.sync. At batch 1-8 most rows are masked: the kernel is weight-bandwidth-bound there, the
    MMA work is not what it waits for (224 registers, no spill, 2 blocks per SM).
    bf16/fp16 before sm_90: BLOCK_B 16 / 32 / 64 by batch (mma.sync; 143-214 registers).
    fp32 ("ieee" dots on FFMA): BLOCK_B 16 / 32, BLOCK_T 32, 8 warps: at BLOCK_T 64 and BLOCK_B 32 with
    4 warps ptxas needs more than 255 registers and spills (604 B on sm_80); BLOCK_T 32 with 4 warps still
    spills 20 B on sm_90 (BLOCK_B 16) and takes 255 on sm_80 (BLOCK_B 32); 8 warps: 78-120 registers.
    Splits: enough programs for about one wave of the SMs, d_T split first, then K (small batch at C <= 128
    has one row block and one class block: d_T alone gives 16 programs).
    Interpreter (target.arch None): 16-wide tiles and at most 2 splits each, cheap in numpy."""
    cpu = target.arch is None
    if cpu:
        bb, bt, bk = block_b or 16, block_t or 16, block_k or 16
    elif dtype == torch.float32:
        bb, bt, bk = block_b or (16 if B <= 16 else 32), block_t or 32, block_k or 64
    elif target.arch >= 90:
        bb, bt, bk = block_b or 64, block_t or 64, block_k or 64
    else:
        bb, bt, bk = block_b or (16 if B <= 16 else 32 if B <= 512 else 64), block_t or 64, block_k or 64
    bc = max(16, min(128, _launch.next_pow2(C)))
    b_blocks, c_blocks, t_tiles = _launch.cdiv(B, bb), _launch.cdiv(C, bc), _launch.cdiv(T, bt)
    nk = len(k_tiles(widths, bk))
    base = max(1, b_blocks * c_blocks)
    if t_splits is None:
        t_splits = max(1, min(t_tiles, target.sms // base))
        if k_splits is None:
            k_splits = max(1, min(nk, target.sms // (base * t_splits)))
        if cpu:
            t_splits, k_splits = min(t_splits, 2), min(k_splits, 2)
    t_splits = max(1, min(int(t_splits), t_tiles))
    t_per_split = _launch.cdiv(t_tiles, t_splits) * bt
    t_splits = _launch.cdiv(T, t_per_split)
    k_splits = max(1, min(int(k_splits or 1), max(1, nk)))
    tiles_per_ksplit = _launch.cdiv(nk, k_splits)
    k_splits = max(1, _launch.cdiv(nk, tiles_per_ksplit))
    nw = num_warps or (8 if dtype == torch.float32 and not cpu else 4)
    ns = num_stages or (1 if cpu else 3)
    return FusionTiles(bb, bt, bk, bc, b_blocks, c_blocks, t_splits, t_per_split, k_splits, tiles_per_ksplit, nw, ns)


def ensemble_fusion(
    q, scales, widths, map_weight, map_bias, cls_weight, cls_bias,
    *, out=None, block_b=None, block_t=None, block_k=None, t_splits=None, k_splits=None, num_warps=None,
    num_stages=None, target=None,
):
    """Triton launcher. Arguments as devit_ext.ops.ensemble_fusion; returns logits fp32 (B, C) (into `out`
    if given: fp32 (B, C), contiguous last dim). t_splits=1 gives a deterministic single-pass result.
    `target` (a `_launch.Target`, default: the tensors' device) is what the tiles are chosen for."""
    shp = check_fusion(q, scales, widths, map_weight, map_bias, cls_weight, cls_bias)
    return launch(q, scales, shp, map_weight, map_bias, cls_weight, cls_bias, out=out, block_b=block_b,
                  block_t=block_t, block_k=block_k, t_splits=t_splits, k_splits=k_splits, num_warps=num_warps,
                  num_stages=num_stages, target=target)


def launch(
    q, scales, shp: FusionShape, map_weight, map_bias, cls_weight, cls_bias,
    *, out=None, block_b=None, block_t=None, block_k=None, t_splits=None, k_splits=None, num_warps=None,
    num_stages=None, target=None,
):
    """The launch itself, for arguments already checked by `devit_ext.checks.check_fusion` (which gave
    `shp`): devit_ext.ops calls this, so its inputs are checked once."""
    _launch.check_launchable("ensemble_fusion", q.device)
    B, T, C = shp.B, shp.T, shp.C
    if out is None:
        out = torch.empty((B, C), dtype=torch.float32, device=q.device)
    elif (
        not isinstance(out, torch.Tensor) or tuple(out.shape) != (B, C) or out.dtype != torch.float32
        or out.device != q.device or out.stride(-1) != 1
    ):
        raise ValueError(f"out: expected a float32 tensor ({B}, {C}) on {q.device} with a contiguous last dimension")
    if B == 0:
        return out
    # columns must be contiguous (no-ops for nn.Linear weights and a packed token buffer)
    q = q if q.stride(1) == 1 else q.contiguous()
    w1 = map_weight if map_weight.stride(1) == 1 else map_weight.contiguous()
    w2 = cls_weight if cls_weight.stride(1) == 1 else cls_weight.contiguous()
    b1 = None if map_bias is None else map_bias.contiguous()
    b2 = None if cls_bias is None else cls_bias.contiguous()

    cfg = tile_config(B, T, C, shp.widths, w1.dtype, target or _launch.target(q.device), block_b, block_t,
                      block_k, t_splits, k_splits, num_warps, num_stages)
    tiles = k_tiles(shp.widths, cfg.block_k)
    table = _launch.device_table(tiles, q.device)
    align_k = _launch.align_elems(1, [r[0] for r in tiles])
    atomic = cfg.t_splits * cfg.k_splits > 1
    if atomic:
        out.zero_()
    _ensemble_fusion_fwd[(cfg.b_blocks, cfg.t_splits * cfg.k_splits, cfg.c_blocks)](
        q, scales, table, w1, w1 if b1 is None else b1, w2, w2 if b2 is None else b2, out,
        B, T, C, len(tiles),
        q.stride(0), scales.stride(0), scales.stride(1), w1.stride(0), w2.stride(0), out.stride(0),
        cfg.t_per_split, cfg.k_splits, cfg.tiles_per_ksplit,
        HAS_B1=b1 is not None, HAS_B2=b2 is not None, ATOMIC=atomic,
        BLOCK_B=cfg.block_b, BLOCK_K=cfg.block_k, BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c, ALIGN_K=align_k,
        DOT_PREC=_launch.dot_precision(w1.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def flops(B: int, K: int, T: int, C: int) -> int:
    return 2 * B * K * T + 2 * B * T * C


def bytes_moved(B: int, K: int, T: int, C: int, M: int, weight_size: int) -> int:
    """Compulsory traffic: q (int8), scales, both weights and biases once, logits out (fp32)."""
    return B * K + 4 * B * M + weight_size * (T * K + T + C * T + C) + 4 * B * C


__all__ = ["ensemble_fusion", "launch", "tile_config", "FusionTiles", "k_tiles", "flops", "bytes_moved"]
