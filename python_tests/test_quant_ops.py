"""int8 feature-transfer ops against the pure-torch reference (never against another kernel).

quantize_int8 and dequantize_int8 must match the reference bit for bit (same
fp32 division / product, round half to even, same fp16/bf16 rounding);
layernorm_quantize_int8 may differ by the rounding of the LayerNorm itself: q by
at most 1, scale relatively by ~1e-6, and it must obey the int8 rule
|y - dequant(quant(y))| <= scale / 2 against the fp32 LayerNorm.
CPU tests run the C++ kernels; `cuda` tests run the CUDA kernels on a GPU.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from devit_ext import _build
from devit_ext.ops import dequantize_int8, layernorm_quantize_int8, quantize_int8
from devit_ext.ops import reference as R

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1,), (7,), (197,), (1000,), (5, 1), (3, 7), (4, 197), (2, 3, 1000), (2, 1, 3, 7)]


def _ids(v):
    return str(v).replace("torch.", "") if isinstance(v, torch.dtype) else str(v)


def _x(shape, dtype, device="cpu", mag=1.0):
    """Random data with a few all-zero rows mixed in (never all-zero alone)."""
    x = torch.randn(shape, device=device) * mag
    if x.dim() > 1 and x.shape[-2] > 2:
        x[..., 1, :] = 0
    return x.to(dtype)


def _assert_quant_equal(got, want):
    q, s = got
    qr, sr = want
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.shape == qr.shape and s.shape == sr.shape
    assert torch.equal(s, sr), f"scale differs: max {(s - sr).abs().max()}"
    assert torch.equal(q, qr), f"q differs at {int((q != qr).sum())} places"


def _ln_ref_fp32(x, w, b, eps):
    return F.layer_norm(
        x.float(), (x.shape[-1],), None if w is None else w.float(), None if b is None else b.float(), eps
    )


def _assert_ln_close(got, x, w, b, eps):
    q, s = got
    qr, sr = R.layernorm_quantize_int8(x, w, b, eps)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.shape == qr.shape and s.shape == sr.shape
    assert not torch.isnan(s).any()
    torch.testing.assert_close(s, sr, rtol=2e-5, atol=1e-30)
    assert (q.int() - qr.int()).abs().max() <= 1
    assert q.abs().max() <= 127
    # int8 rule against the fp32 LayerNorm (slack for the LN's own rounding)
    y = _ln_ref_fp32(x, w, b, eps)
    err = (y - dequantize_int8(q, s)).abs()
    bound = s.unsqueeze(-1) * 0.5 + y.abs().amax(-1, keepdim=True) * 2e-5 + 1e-30
    assert (err <= bound).all(), f"max excess {(err - bound).max()}"


# ------------------------------------------------------------------ quantize
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_quantize_matches_reference(shape, dtype):
    x = _x(shape, dtype)
    _assert_quant_equal(quantize_int8(x), R.quantize_int8(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_quantize_zero_rows(dtype):
    x = _x((6, 197), dtype)
    x[0] = 0
    x[4] = 0
    q, s = quantize_int8(x)
    assert s[0] == 0 and s[4] == 0 and (q[0] == 0).all() and (q[4] == 0).all()
    assert (s[[1, 2, 3, 5]] == 0).sum() == 1  # row 1 is zero too (see _x)
    assert torch.isfinite(s).all()
    _assert_quant_equal((q, s), R.quantize_int8(x))


def test_quantize_empty_leading_dim():
    x = torch.randn(0, 7)
    q, s = quantize_int8(x)
    assert q.shape == (0, 7) and s.shape == (0,)


@pytest.mark.parametrize(
    "dtype,mag",
    [
        (torch.float32, 1e30),
        (torch.float32, 3e38),
        (torch.float32, 1e-30),
        (torch.float32, 1e-40),  # denormal inputs (and denormal scales)
        (torch.float32, 1e-44),  # scale underflows to 0 -> q = 0
        (torch.float16, 6e4),
        (torch.float16, 1e-6),  # fp16 denormals
        (torch.bfloat16, 1e30),
        (torch.bfloat16, 1e-38),
    ],
    ids=_ids,
)
def test_quantize_extreme_magnitudes(dtype, mag):
    base = torch.rand(16, 197) * 2 - 1
    x = (base * mag).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
    assert x.abs().max() > 0
    got = quantize_int8(x)
    _assert_quant_equal(got, R.quantize_int8(x))
    assert torch.isfinite(got[1]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_ids)
def test_quantize_every_half_value(dtype):
    """Every finite fp16/bf16 bit pattern as its own row: checks the hand-written conversions."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype)
    x = x[torch.isfinite(x)].reshape(-1, 1)
    _assert_quant_equal(quantize_int8(x), R.quantize_int8(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_quantize_non_contiguous(dtype):
    base = _x((40, 60), dtype)
    views = {
        "transposed": base.t(),
        "step-sliced": base[::3, 1::2],
        "permuted-3d": _x((5, 6, 7), dtype).permute(1, 0, 2),  # leading dims don't collapse
        "inner-strided-3d": _x((4, 5, 14), dtype)[:, :, ::2],
        "expanded": _x((1, 33), dtype).expand(6, 33),
        "offset": base.reshape(-1)[1:1 + 7 * 197].view(7, 197),  # misaligned start
    }
    for name, v in views.items():
        _assert_quant_equal(quantize_int8(v), R.quantize_int8(v))
        assert name  # keeps the name in the traceback


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_int8_rule(dtype):
    x = _x((33, 197), dtype, mag=3.0)
    q, s = quantize_int8(x)
    err = (x.float() - dequantize_int8(q, s)).abs()
    # q * scale rounds in fp32: up to 127 * 2^-24 * scale beyond scale / 2
    assert (err <= s.unsqueeze(-1) * (0.5 + 1e-5) + 1e-37).all()
    assert q.abs().max() == 127


def test_threads_agree():
    """Multi-threaded rows give the same bits as one thread (large enough for OpenMP)."""
    x = torch.randn(300, 257)
    w, b = torch.randn(257), torch.randn(257)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = quantize_int8(x), layernorm_quantize_int8(x, w, b, 1e-5)
        torch.set_num_threads(max(2, old))
        many = quantize_int8(x), layernorm_quantize_int8(x, w, b, 1e-5)
    finally:
        torch.set_num_threads(old)
    for a, c in zip(one, many):
        assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])


# ------------------------------------------------------------------ dequantize
@pytest.mark.parametrize("out_dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_dequantize_matches_reference(shape, out_dtype):
    q, s = R.quantize_int8(_x(shape, torch.float32, mag=5.0))
    got = dequantize_int8(q, s, out_dtype)
    want = R.dequantize_int8(q, s, out_dtype)
    assert got.dtype == out_dtype and got.shape == q.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=_ids)
def test_dequantize_rounding_overflow_underflow(out_dtype):
    """Products that round, overflow to inf and land in the denormals of the output dtype."""
    q = torch.arange(-127, 128, dtype=torch.int8).repeat(7, 1)
    s = torch.tensor([1.0, 1e-3, 600.0, 1e10, 1e-7, 3e36, 1e-38], dtype=torch.float32)
    got = dequantize_int8(q, s, out_dtype)
    want = R.dequantize_int8(q, s, out_dtype)
    assert torch.equal(got.isinf(), want.isinf())
    assert torch.equal(got, want)


def test_dequantize_non_contiguous():
    q, s = R.quantize_int8(torch.randn(30, 50))
    big_s = torch.stack([s, s * 2], dim=1)  # (30, 2)
    cases = [
        (q.t(), R.quantize_int8(torch.randn(50, 30))[1]),  # transposed q
        (q[::2, ::3], s[::2]),  # stepped q and scale
        (q, big_s[:, 1]),  # strided scale
        (q.view(5, 6, 50).permute(1, 0, 2), s.view(5, 6).t()),  # non-collapsible leading dims
    ]
    for qq, ss in cases:
        for dt in DTYPES:
            assert torch.equal(dequantize_int8(qq, ss, dt), R.dequantize_int8(qq, ss, dt))


def test_dequantize_grad_scale():
    q, s = R.quantize_int8(torch.randn(4, 9))
    s = s.clone().requires_grad_(True)
    dequantize_int8(q, s).pow(2).sum().backward()
    s_ref = s.detach().clone().requires_grad_(True)
    R.dequantize_int8(q, s_ref).pow(2).sum().backward()
    torch.testing.assert_close(s.grad, s_ref.grad)


# ------------------------------------------------------------------ layernorm_quantize
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_layernorm_quantize_close_to_reference(shape, dtype):
    x = _x(shape, dtype)
    d = shape[-1]
    w = (torch.rand(d) + 0.5).to(dtype)
    b = (torch.randn(d) * 0.1).to(dtype)
    _assert_ln_close(layernorm_quantize_int8(x, w, b, 1e-6), x, w, b, 1e-6)


@pytest.mark.parametrize("affine", ["none", "weight", "bias", "fp32-params"])
def test_layernorm_quantize_params(affine):
    x = _x((9, 197), torch.bfloat16)
    w = torch.rand(197) + 0.5
    b = torch.randn(197)
    if affine == "none":
        w = b = None
    elif affine == "weight":
        b = None
    elif affine == "bias":
        w = None
    # fp32 params with bf16 x (mixed dtypes are accepted); strided params
    if w is not None:
        w = torch.stack([w, w], 1)[:, 0]
    _assert_ln_close(layernorm_quantize_int8(x, w, b, 1e-5), x, w, b, 1e-5)


def test_layernorm_quantize_zero_rows_and_offsets():
    x = torch.randn(8, 192) + 100.0  # large mean (well-conditioned: spread 1)
    x[3] = 0  # all-zero row, no bias -> scale 0
    q, s = layernorm_quantize_int8(x, torch.ones(192), None, 1e-6)
    assert s[3] == 0 and (q[3] == 0).all() and torch.isfinite(s).all()
    _assert_ln_close((q, s), x, torch.ones(192), None, 1e-6)


@pytest.mark.parametrize("dtype,mag", [(torch.float32, 1e4), (torch.float32, 1e-30), (torch.float16, 6e4),
                                       (torch.float16, 1e-6), (torch.bfloat16, 1e15)], ids=_ids)
def test_layernorm_quantize_magnitudes(dtype, mag):
    x = (torch.rand(12, 197) * 2 - 1) * mag
    x = x.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
    _assert_ln_close(layernorm_quantize_int8(x, None, None, 1e-6), x, None, None, 1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_layernorm_quantize_non_contiguous(dtype):
    w, b = torch.rand(30) + 0.5, torch.randn(30)
    for v in (_x((30, 40), dtype).t()[:, :30], _x((6, 5, 60), dtype).permute(1, 0, 2)[..., ::2]):
        _assert_ln_close(layernorm_quantize_int8(v, w, b, 1e-6), v, w, b, 1e-6)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "call,exc,arg",
    [
        (lambda: quantize_int8(torch.arange(6).view(2, 3)), TypeError, "x"),
        (lambda: quantize_int8(torch.tensor(1.0)), ValueError, "x"),
        (lambda: quantize_int8(torch.randn(3, 0)), ValueError, "x"),
        (lambda: quantize_int8([1.0, 2.0]), TypeError, "x"),
        (lambda: dequantize_int8(torch.zeros(2, 3), torch.zeros(2)), TypeError, "q"),
        (lambda: dequantize_int8(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(3)), ValueError, "scale"),
        (lambda: dequantize_int8(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(2, dtype=torch.float64)),
         TypeError, "scale"),
        (lambda: dequantize_int8(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(2), torch.int32), TypeError,
         "dtype"),
        (lambda: dequantize_int8(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(2, device="meta")), ValueError,
         "scale"),
        (lambda: dequantize_int8(torch.tensor(1, dtype=torch.int8), torch.tensor(1.0)), ValueError, "q"),
        (lambda: layernorm_quantize_int8(torch.randn(2, 4), torch.ones(4, device="meta"), None, 1e-6), ValueError,
         "weight"),
        (lambda: layernorm_quantize_int8(torch.randn(2, 4), None, torch.zeros(4, device="meta"), 1e-6), ValueError,
         "bias"),
        (lambda: layernorm_quantize_int8(torch.randn(2, 4), torch.ones(5), None, 1e-6), ValueError, "weight"),
        (lambda: layernorm_quantize_int8(torch.randn(2, 4), torch.ones(4, dtype=torch.int32), None, 1e-6),
         TypeError, "weight"),
        (lambda: layernorm_quantize_int8(torch.randn(2, 4), None, None, float("nan")), ValueError, "eps"),
        (lambda: layernorm_quantize_int8(torch.randn(2, 4), None, None, float("inf")), ValueError, "eps"),
        (lambda: layernorm_quantize_int8(torch.randn(2, 4), None, None, -1.0), ValueError, "eps"),
        (lambda: layernorm_quantize_int8(torch.randint(0, 5, (2, 4)), None, None, 1e-6), TypeError, "x"),
        (lambda: layernorm_quantize_int8(torch.tensor(2.0), None, None, 1e-6), ValueError, "x"),
    ],
)
def test_bad_input_names_the_argument(call, exc, arg):
    with pytest.raises(exc, match=rf"^{arg}:"):
        call()


def test_direct_op_call_is_checked_too():
    with pytest.raises(TypeError, match=r"^x:"):
        torch.ops.devit.quantize_int8(torch.arange(4))


# ------------------------------------------------------------------ torch.library / torch.compile
def test_opcheck():
    x = torch.randn(5, 197)
    w, b = torch.rand(197) + 0.5, torch.randn(197)
    q, s = R.quantize_int8(x)
    torch.library.opcheck(torch.ops.devit.quantize_int8.default, (x,))
    torch.library.opcheck(torch.ops.devit.quantize_int8.default, (x.to(torch.bfloat16).t(),))
    torch.library.opcheck(torch.ops.devit.dequantize_int8.default, (q, s, torch.float16))
    torch.library.opcheck(torch.ops.devit.dequantize_int8.default, (q, s.clone().requires_grad_(True), torch.float32))
    torch.library.opcheck(torch.ops.devit.layernorm_quantize_int8.default, (x, w, b, 1e-6))
    torch.library.opcheck(torch.ops.devit.layernorm_quantize_int8.default, (x.half(), None, None, 1e-5))


def test_torch_compile_fullgraph_cpu():
    def sender_to_aggregator(x, w, b):
        q, s = layernorm_quantize_int8(x * 2.0, w, b, 1e-6)
        q2, s2 = quantize_int8(x)
        return dequantize_int8(q, s) + 1.0, dequantize_int8(q2, s2, torch.bfloat16)

    x = torch.randn(4, 197)
    w, b = torch.rand(197) + 0.5, torch.randn(197)
    compiled = torch.compile(sender_to_aggregator, fullgraph=True)
    got = compiled(x, w, b)
    want = sender_to_aggregator(x, w, b)
    for g, e in zip(got, want):
        assert torch.equal(g, e)


def test_eager_fast_path_matches_op_and_modes_see_the_op():
    """Public functions skip the dispatcher only when nothing can tell; modes still see devit ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from devit_ext.ops import quant

    x = torch.randn(6, 197)
    w, b = torch.rand(197) + 0.5, torch.randn(197)
    assert quant._eager_ok(x, w, None)
    assert not quant._eager_ok(x, w.requires_grad_(True))
    w.requires_grad_(False)
    q, s = torch.ops.devit.quantize_int8(x)
    _assert_quant_equal(quantize_int8(x), (q, s))
    assert torch.equal(dequantize_int8(q, s, torch.bfloat16), torch.ops.devit.dequantize_int8(q, s, torch.bfloat16))
    _assert_quant_equal(layernorm_quantize_int8(x, w, b, 1e-6), torch.ops.devit.layernorm_quantize_int8(x, w, b, 1e-6))

    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Log():
        quantize_int8(x)
        dequantize_int8(q, s)
        layernorm_quantize_int8(x, w, b, 1e-6)
    assert {"devit.quantize_int8.default", "devit.dequantize_int8.default",
            "devit.layernorm_quantize_int8.default"} <= set(seen), seen


def test_cpu_path_is_native():
    if _build.native() is None:
        pytest.fail(f"devit_ext._C did not load: {_build.native_error()}")
    from devit_ext.ops import quant

    assert quant._path(torch.device("cpu")) == "cpp"


# ------------------------------------------------------------------ CUDA
CUDA_SHAPES = [(1,), (7,), (197,), (3, 1000), (4, 256, 192), (2, 3, 7), (1, 1), (64, 1024)]


def _needs_cuda_kernels():
    if not _build.cuda_kernels():
        pytest.fail("a GPU is present but devit_ext._C has no CUDA kernels (build with nvcc / DEVIT_CUDA=1)")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=_ids)
def test_cuda_quant_ops_match_reference(cuda_device, shape, dtype):
    _needs_cuda_kernels()
    x = _x(shape, dtype, device=cuda_device, mag=2.0)
    _assert_quant_equal(quantize_int8(x), R.quantize_int8(x))
    q, s = R.quantize_int8(x)
    for od in DTYPES:
        assert torch.equal(dequantize_int8(q, s, od), R.dequantize_int8(q, s, od))
    d = shape[-1]
    w = (torch.rand(d, device=cuda_device) + 0.5).to(dtype)
    b = (torch.randn(d, device=cuda_device) * 0.1).to(dtype)
    _assert_ln_close(layernorm_quantize_int8(x, w, b, 1e-6), x, w, b, 1e-6)
    _assert_ln_close(layernorm_quantize_int8(x, None, None, 1e-6), x, None, None, 1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_cuda_non_contiguous_and_misaligned(cuda_device, dtype):
    _needs_cuda_kernels()
    base = _x((64, 300), dtype, device=cuda_device)
    views = [base.t(), base[::3, 1::2], base[:, 1:198], base.reshape(-1)[3:3 + 9 * 197].view(9, 197),
             _x((5, 6, 7), dtype, device=cuda_device).permute(1, 0, 2), _x((1, 33), dtype, device=cuda_device).expand(6, 33)]
    for v in views:
        _assert_quant_equal(quantize_int8(v), R.quantize_int8(v))
        _assert_ln_close(layernorm_quantize_int8(v, None, None, 1e-6), v, None, None, 1e-6)
        q, s = R.quantize_int8(v)
        for od in DTYPES:
            assert torch.equal(dequantize_int8(q.t().contiguous().t(), s, od), R.dequantize_int8(q, s, od))
    q, s = R.quantize_int8(base)
    assert torch.equal(dequantize_int8(q[:, 1:], s, dtype), R.dequantize_int8(q[:, 1:], s, dtype))  # misaligned q


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,mag", [(torch.float32, 1e30), (torch.float32, 1e-40), (torch.float32, 1e-44),
                                       (torch.float16, 6e4), (torch.float16, 1e-6), (torch.bfloat16, 1e-38)], ids=_ids)
def test_cuda_extreme_magnitudes(cuda_device, dtype, mag):
    _needs_cuda_kernels()
    x = ((torch.rand(16, 197, device=cuda_device) * 2 - 1) * mag)
    x = x.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
    _assert_quant_equal(quantize_int8(x), R.quantize_int8(x))
    q, s = R.quantize_int8(x)
    for od in DTYPES:
        assert torch.equal(dequantize_int8(q, s, od), R.dequantize_int8(q, s, od))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_ids)
def test_cuda_every_half_value(cuda_device, dtype):
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype)
    x = x[torch.isfinite(x)].reshape(-1, 1).to(cuda_device)
    _assert_quant_equal(quantize_int8(x), R.quantize_int8(x))


@pytest.mark.cuda
def test_cuda_large_and_streams(cuda_device):
    _needs_cuda_kernels()
    x = torch.randn(16384, 1024, device=cuda_device, dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = quantize_int8(x)
        deq = dequantize_int8(*got, torch.bfloat16)
    torch.cuda.current_stream().wait_stream(side)
    _assert_quant_equal(got, R.quantize_int8(x))
    assert torch.equal(deq, R.dequantize_int8(*got, torch.bfloat16))


@pytest.mark.cuda
def test_cuda_graph_capture(cuda_device):
    _needs_cuda_kernels()
    x = torch.randn(4, 256, 192, device=cuda_device, dtype=torch.bfloat16)
    w = torch.rand(192, device=cuda_device, dtype=torch.bfloat16) + 0.5
    b = torch.randn(192, device=cuda_device, dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        layernorm_quantize_int8(x, w, b, 1e-6)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        q, sc = layernorm_quantize_int8(x, w, b, 1e-6)
        out = dequantize_int8(q, sc, torch.bfloat16)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    _assert_ln_close((q, sc), x, w, b, 1e-6)
    assert torch.equal(out, R.dequantize_int8(q, sc, torch.bfloat16))


@pytest.mark.cuda
def test_cuda_compile_fullgraph(cuda_device):
    _needs_cuda_kernels()

    def f(x):
        q, s = quantize_int8(x)
        return dequantize_int8(q, s, torch.float32) * 2

    x = torch.randn(8, 197, device=cuda_device)
    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))
