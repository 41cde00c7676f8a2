"""Exact ties in every rounding path: int8 quantisation (x.5 multiples of the scale) and the
fp16 / bf16 stores of dequantisation, on the reference, the native C++ kernels (8-lane
vector body and scalar tail) and the CUDA kernels.

Random data almost never lands on a tie, so the kernel-vs-reference tests cannot
tell round-half-even from round-half-away-from-zero. Here every value is a tie
and the oracle is independent of the code under test: Python's `round` (half to
even) for int8, `struct`'s IEEE binary16 packing for fp16, and spelled-out
expected values.
"""
from __future__ import annotations

import struct

import pytest
import torch

from devit_ext import _build, ops
from devit_ext.ops import reference as R

# x / scale values that are exact ties, with 127 present so that scale = max / 127 is exact
TIES = [0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5, 125.5, 126.5, -126.5, 4.5, 5.5, -4.5, -5.5, 10.5, -10.5]
TIES_EXPECTED = [0, 2, 2, 4, 0, -2, -2, -4, 126, 126, -126, 4, 6, -4, -6, 10, -10]  # half to even, by hand
# lengths covering a vector body only (8, 16), a tail only (< 8) and both (9 .. 23); the CUDA
# kernels' vector width is 4 (fp32) or 8 (fp16 / bf16)
LENGTHS = [1, 2, 3, 5, 7, 8, 9, 12, 15, 16, 17, 23]
SCALES = [1.0, 0.25, 4.0]  # powers of two: v * scale and v * scale / scale are exact
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _paths():
    out = [pytest.param("reference", id="reference")]
    out.append(pytest.param("cpp", id="cpp", marks=pytest.mark.skipif(
        _build.native() is None, reason=f"native module missing: {_build.native_error()}")))
    out.append(pytest.param("cuda", id="cuda", marks=pytest.mark.cuda))
    return out


def _device(path):
    return torch.device("cuda") if path == "cuda" else torch.device("cpu")


def _quantize(path):
    if path == "reference":
        return R.quantize_int8
    return ops.quantize_int8


def _ln_quantize(path):
    if path == "reference":
        return R.layernorm_quantize_int8
    return ops.layernorm_quantize_int8


def _dequantize(path):
    if path == "reference":
        return R.dequantize_int8
    return ops.dequantize_int8


def _check_path(path, device):
    if path == "cpp":
        assert ops.op_paths(device)["quantize_int8"] == "native C++"
    if path == "cuda":
        assert ops.op_paths(device)["quantize_int8"] == "native CUDA"


def _tie_rows(n: int):
    """Rows of length n, all ties but one 127 (at a different place per row); expected q by Python's round."""
    rows, want = [], []
    for r in range(n):  # 127 at position r, ties elsewhere, cycling through TIES from a row-dependent start
        vals = [TIES[(r + j) % len(TIES)] for j in range(n)]
        vals[r] = 127.0 if r % 2 == 0 else -127.0
        rows.append(vals)
        want.append([round(v) for v in vals])  # Python rounds half to even
    return rows, want


def test_oracle_is_half_to_even():
    assert [round(v) for v in TIES] == TIES_EXPECTED


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("scale", SCALES)
def test_quantize_ties_round_half_to_even(path, dtype, scale):
    dev = _device(path)
    _check_path(path, dev)
    for n in LENGTHS:
        rows, want = _tie_rows(n)
        x = (torch.tensor(rows, dtype=torch.float32) * scale).to(dtype)
        assert torch.equal(x.float(), torch.tensor(rows) * scale)  # every tie is exact in this dtype
        q, s = _quantize(path)(x.to(dev))
        assert torch.equal(s.cpu(), torch.full((n,), scale)), (n, s)
        assert q.cpu().tolist() == want, f"n={n}: {q.cpu().tolist()} != {want}"


@pytest.mark.parametrize("path", _paths())
def test_quantize_ties_in_a_strided_view(path):
    """Non-contiguous rows go through the kernels' gather path: ties there too."""
    dev = _device(path)
    rows, want = _tie_rows(15)
    x = torch.tensor(rows, dtype=torch.float32)
    big = torch.zeros(15, 30)
    big[:, ::2] = x
    q, s = _quantize(path)(big.to(dev)[:, ::2])
    assert q.cpu().tolist() == want and torch.equal(s.cpu(), torch.ones(15))


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("n", [7, 8, 15, 23])
def test_layernorm_quantize_ties(path, n):
    """weight 0, bias = the ties: the LayerNorm output is exactly the bias, so every value is a tie."""
    dev = _device(path)
    rows, want = _tie_rows(n)
    b = torch.tensor(rows, dtype=torch.float32)
    x = torch.randn(n, n)
    for r in range(n):  # one row at a time: weight and bias are per column
        q, s = _ln_quantize(path)(x[r : r + 1].to(dev), torch.zeros(n, device=dev), b[r].to(dev), 1e-6)
        assert s.cpu().tolist() == [1.0]
        assert q.cpu().tolist() == [want[r]], (n, r)


def _fp16_oracle(v: float) -> float:
    return struct.unpack("<e", struct.pack("<e", v))[0]  # CPython packs binary16 rounding half to even


# scales s with q * s an exact fp32 value halfway between two fp16 (bf16) neighbours for q = +-2^k
FP16_TIE_SCALES = [1 + 2**-11, 1 + 3 * 2**-11, 1 + 5 * 2**-11, 1 + 7 * 2**-11]
BF16_TIE_SCALES = [1 + 2**-8, 1 + 3 * 2**-8, 1 + 5 * 2**-8, 1 + 7 * 2**-8]
POW2_Q = [1, -1, 2, -2, 4, -4, 8, -8, 16, -16, 32, -32, 64, -64, 0]  # 15: an 8-lane body and a 7 tail


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("n", [7, 8, 15])
def test_dequantize_fp16_ties(path, n):
    dev = _device(path)
    q = torch.tensor([POW2_Q[:n]] * len(FP16_TIE_SCALES), dtype=torch.int8)
    s = torch.tensor(FP16_TIE_SCALES, dtype=torch.float32)
    exact = q.double() * s.double()[:, None]
    assert torch.equal((q.float() * s[:, None]).double(), exact)  # the fp32 product is exact
    got = _dequantize(path)(q.to(dev), s.to(dev), torch.float16).cpu()
    want = torch.tensor([[_fp16_oracle(float(v)) for v in row] for row in exact], dtype=torch.float16)
    assert torch.equal(got, want), (got - want).abs().max()
    # spelled out: 1 + 2^-11 -> 1 (even), 1 + 3 * 2^-11 -> 1 + 2^-9 (even), and the same scaled by 2^k
    assert float(got[0, 0]) == 1.0 and float(got[1, 0]) == 1 + 2**-9
    if n > 3:
        assert float(got[0, 3]) == -2.0 and float(got[1, 2]) == 2 + 2**-8


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("n", [7, 8, 15])
def test_dequantize_bf16_ties(path, n):
    dev = _device(path)
    q = torch.tensor([POW2_Q[:n]] * len(BF16_TIE_SCALES), dtype=torch.int8)
    s = torch.tensor(BF16_TIE_SCALES, dtype=torch.float32)
    got = _dequantize(path)(q.to(dev), s.to(dev), torch.bfloat16).cpu().float()
    # bf16 keeps 8 significant bits: 1 + 2^-8 -> 1, 1 + 3 * 2^-8 -> 1 + 2^-6, 1 + 5 * 2^-8 -> 1 + 2^-6,
    # 1 + 7 * 2^-8 -> 1 + 2^-5 (each to the even neighbour), times q = +-2^k exactly
    mant = torch.tensor([1.0, 1 + 2**-6, 1 + 2**-6, 1 + 2**-5])
    want = mant[:, None] * torch.tensor(POW2_Q[:n], dtype=torch.float32)
    assert torch.equal(got, want), (got, want)
