"""Non-finite values propagate or are refused, never hidden (issue 17, item 3).

Every int8 op against the pure-torch reference on rows holding NaN / +-Inf
(odd widths, every input dtype, strided views, enough rows for the threaded
path): a NaN row has scale NaN, an Inf row scale Inf (NaN after a LayerNorm),
q = 0 there, and dequantisation gives a NaN row, so that the fused logits of
that image are NaN rather than a finite wrong answer. `cuda` cases run the CUDA
kernels on a GPU.
"""
from __future__ import annotations

import pytest
import torch

from devit_ext import ops
from devit_ext.ops import reference as R

NAN, INF = float("nan"), float("inf")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _ids(v):
    return str(v).replace("torch.", "") if isinstance(v, torch.dtype) else str(v)


def _rows_with_nonfinite(rows: int, cols: int, dtype, device="cpu") -> torch.Tensor:
    """Random rows; row 0 a NaN, 1 +Inf at the end, 2 -Inf at the start, 3 both Inf and NaN,
    4 +Inf and -Inf, 5 all NaN; every 7th row from 6 on gets a NaN at a moving column."""
    x = torch.randn(rows, cols)
    x[0, cols // 2] = NAN
    x[1, cols - 1] = INF
    x[2, 0] = -INF
    x[3, 0], x[3, cols - 1] = INF, NAN
    x[4, 0], x[4, cols - 1] = INF, -INF
    x[5] = NAN
    for r in range(6, rows, 7):
        x[r, r % cols] = NAN
    return x.to(dtype).to(device)


def _devices():
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs.append(pytest.param("cuda", marks=pytest.mark.cuda))
    return devs


def _same_nonfinite(got: torch.Tensor, want: torch.Tensor):
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
    assert torch.equal(torch.isposinf(got), torch.isposinf(want)), (got, want)
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("cols", [1, 7, 37, 197], ids=str)
def test_quantize_nonfinite_rows_follow_reference(device, dtype, cols):
    if cols == 1:
        x = torch.tensor([[NAN], [INF], [-INF], [2.0], [0.0]], dtype=dtype, device=device)
    else:
        x = _rows_with_nonfinite(40, cols, dtype, device)
    q, s = ops.quantize_int8(x)
    qr, sr = R.quantize_int8(x.cpu())
    assert torch.equal(q.cpu(), qr)  # q = 0 on every non-finite row, bit-exact elsewhere
    assert torch.equal(torch.isnan(s.cpu()), torch.isnan(sr)) and torch.equal(torch.isinf(s.cpu()), torch.isinf(sr))
    assert torch.equal(s.cpu()[torch.isfinite(sr)], sr[torch.isfinite(sr)])
    if cols > 1:
        assert torch.isnan(s[0]) and torch.isinf(s[1]) and torch.isinf(s[2]) and torch.isnan(s[3])
    # dequantised: the whole non-finite row is NaN (0 * NaN, 0 * Inf), the others finite
    y = ops.dequantize_int8(q, s).cpu()
    bad = ~torch.isfinite(x.cpu().float()).all(dim=-1)
    assert torch.isnan(y[bad]).all()
    assert torch.isfinite(y[~bad]).all()


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_quantize_nonfinite_strided_and_threaded(device, dtype):
    # 300 x 257 > the serial threshold: rows are split across threads; a transposed view is strided
    x = _rows_with_nonfinite(257, 300, dtype, device).t()
    q, s = ops.quantize_int8(x)
    qr, sr = R.quantize_int8(x.cpu())
    assert torch.equal(q.cpu(), qr)
    _same_nonfinite(s.cpu(), sr)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
def test_layernorm_quantize_nonfinite_rows_follow_reference(device, dtype, affine):
    cols = 37
    x = _rows_with_nonfinite(40, cols, dtype, device)
    w = torch.randn(cols, device=device) if affine else None
    b = torch.randn(cols, device=device) if affine else None
    q, s = ops.layernorm_quantize_int8(x, w, b, 1e-6)
    qr, sr = R.layernorm_quantize_int8(x.cpu(), None if w is None else w.cpu(), None if b is None else b.cpu(), 1e-6)
    bad = ~torch.isfinite(x.cpu().float()).all(dim=-1)
    assert torch.isnan(sr[bad]).all()  # the reference: a LayerNorm of a row with NaN or Inf is all NaN
    assert torch.isnan(s.cpu()[bad]).all() and torch.equal(q.cpu()[bad], qr[bad])
    assert torch.isfinite(s.cpu()[~bad]).all()
    assert (q.cpu()[~bad].int() - qr[~bad].int()).abs().max() <= 1


@pytest.mark.parametrize("device", _devices())
def test_layernorm_quantize_nonfinite_weight_gives_nan_scale(device):
    x = torch.randn(5, 33, device=device)
    w = torch.ones(33, device=device)
    w[4] = NAN
    _, s = ops.layernorm_quantize_int8(x, w, None, 1e-6)
    _, sr = R.layernorm_quantize_int8(x.cpu(), w.cpu(), None, 1e-6)
    assert torch.isnan(sr).all() and torch.isnan(s.cpu()).all()


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("out_dtype", DTYPES, ids=_ids)
def test_dequantize_nonfinite_scale(device, out_dtype):
    q = torch.randint(-127, 128, (4, 19), dtype=torch.int8, device=device)
    s = torch.tensor([NAN, INF, 0.5, 0.0], device=device)
    got = ops.dequantize_int8(q, s, dtype=out_dtype).cpu()
    want = R.dequantize_int8(q.cpu(), s.cpu(), out_dtype)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.isnan(got[0]).all()


def test_ensemble_fusion_nan_scale_gives_nan_logits():
    g = torch.Generator().manual_seed(0)
    widths = [5, 7]
    q = torch.randint(-127, 128, (3, 12), dtype=torch.int8, generator=g)
    s = torch.rand(3, 2, generator=g)
    s[1, 1] = NAN
    mw, mb = torch.randn(6, 12, generator=g), torch.randn(6, generator=g)
    cw, cb = torch.randn(4, 6, generator=g), torch.randn(4, generator=g)
    got = ops.ensemble_fusion(q, s, widths, mw, mb, cw, cb)
    want = R.ensemble_fusion(q, s, widths, mw, mb, cw, cb)
    assert torch.isnan(got[1]).all() and torch.isnan(want[1]).all()
    torch.testing.assert_close(got[[0, 2]], want[[0, 2]], rtol=1e-5, atol=1e-5)


def test_protocol_int8_message_of_nan_token_is_nan_after_fusion():
    # the sender's encode + the aggregator's fuse, as every engine runs them
    from devit_ext import protocol

    x = torch.randn(3, 1, 16)
    x[2, 0, 3] = NAN
    msg = protocol.encode(x, torch.ones(16), torch.zeros(16), 1e-6, "int8")
    assert torch.isnan(msg.scales[2]).all() and torch.isfinite(msg.scales[:2]).all()
    br = [(torch.randn(8, 16), None, torch.randn(4, 8), None)]
    logits = protocol.fuse([msg], br, [16])
    assert torch.isnan(logits[2]).all() and torch.isfinite(logits[:2]).all()
