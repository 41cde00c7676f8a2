"""Per-architecture SM limits and the occupancy that follows from a kernel's resources.

The rule is CUDA's own occupancy calculator (cuda_occupancy.h, CUDA 13.0:
cudaOccMaxBlocksPerSMRegsLimit / ...SmemLimit / ...WarpsLimit), reduced to what
the static report needs:

- registers are allocated per warp in units of 256, inside each of the 4 SM
  sub-partitions (65,536 / 4 registers each): warps/SM = 4 * floor(16384 /
  roundup(regs * 32, 256)); blocks = floor(warps/SM / warps per block);
- shared memory per block = roundup(static + dynamic + 1 KB reserved by the
  driver, 128); blocks = floor(shared per SM / that), assuming the driver picks
  the largest carveout (it does when a kernel asks for more than the default);
  a block over the per-block opt-in limit cannot launch at all (0 blocks);
- at most 64 resident warps (2,048 threads) and 32 blocks per SM.

SM counts and peaks are the parts this project targets (A100 SXM for sm_80, H100
SXM for sm_90; an H200 has the same SMs and more bandwidth); the launchers size
their grids from the SM count.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchLimits:
    arch: int
    part: str  # the GPU the SM count is taken from
    sms: int
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    shared_per_sm: int = 0  # bytes, largest carveout
    shared_per_block_optin: int = 0  # bytes a block may use (static + dynamic) with the opt-in attribute
    reserved_shared_per_block: int = 1024
    shared_granularity: int = 128
    reg_granularity: int = 256
    sub_partitions: int = 4
    # spec-sheet peaks of that part, for the roofline estimate (dense, no sparsity)
    peak_tc_tflops: float = 0.0  # bf16/fp16 tensor cores
    peak_fp32_tflops: float = 0.0  # FFMA (the fp32 "ieee" dots run there)
    hbm_gbs: float = 0.0


ARCHS: dict[int, ArchLimits] = {
    80: ArchLimits(80, "A100 SXM 80GB", sms=108, shared_per_sm=164 * 1024, shared_per_block_optin=163 * 1024,
                   peak_tc_tflops=312.0, peak_fp32_tflops=19.5, hbm_gbs=2039.0),
    # H200 SXM: same SM (132 SMs, same limits and peaks), 4.8 TB/s HBM3e instead of 3.35
    90: ArchLimits(90, "H100 SXM", sms=132, shared_per_sm=228 * 1024, shared_per_block_optin=227 * 1024,
                   peak_tc_tflops=989.0, peak_fp32_tflops=67.0, hbm_gbs=3350.0),
}


def limits(arch: int) -> ArchLimits:
    try:
        return ARCHS[int(arch)]
    except (KeyError, ValueError):
        raise ValueError(f"arch: expected one of {sorted(ARCHS)}, got {arch!r}") from None


def _roundup(x: int, y: int) -> int:
    return -(-x // y) * y


def occupancy(arch: int, registers: int, threads: int, shared_bytes: int) -> dict:
    """Resident blocks per SM and which resource limits them.

    registers: per thread; threads: per block; shared_bytes: static + dynamic per block.
    Returns {blocks_per_sm, warps_per_sm, occupancy (resident warps / 64), limiter,
    blocks_by_regs, blocks_by_shared, blocks_by_warps}.
    """
    lim = limits(arch)
    if threads < 1 or registers < 0 or shared_bytes < 0:
        raise ValueError(f"occupancy: expected threads >= 1, registers >= 0, shared >= 0, got {threads}, {registers}, {shared_bytes}")
    warps = -(-threads // 32)
    by_warps = min(lim.max_blocks_per_sm, lim.max_warps_per_sm // warps)
    if registers > lim.max_regs_per_thread:
        by_regs = 0
    elif registers == 0:
        by_regs = lim.max_blocks_per_sm
    else:
        per_warp = _roundup(registers * 32, lim.reg_granularity)
        warps_regs = (lim.regs_per_sm // lim.sub_partitions // per_warp) * lim.sub_partitions
        by_regs = warps_regs // warps
    per_block = _roundup(shared_bytes + lim.reserved_shared_per_block, lim.shared_granularity)
    if shared_bytes > lim.shared_per_block_optin:
        by_shared = 0
    else:
        by_shared = lim.shared_per_sm // per_block
    blocks = min(by_warps, by_regs, by_shared)
    candidates = {"registers": by_regs, "shared memory": by_shared, "warps/blocks per SM": by_warps}
    order = ("warps/blocks per SM", "registers", "shared memory")  # on a tie, the hardware cap is the limit
    limiter = min(candidates, key=lambda k: (candidates[k], order.index(k)))
    return {
        "blocks_per_sm": blocks,
        "warps_per_sm": blocks * warps,
        "occupancy": blocks * warps / lim.max_warps_per_sm,
        "limiter": limiter,
        "blocks_by_regs": by_regs,
        "blocks_by_shared": by_shared,
        "blocks_by_warps": by_warps,
    }
