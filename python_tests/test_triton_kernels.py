"""Triton kernels subvit_attention and ensemble_fusion against the reference.

- `triton`-marked tests run the launchers on tiny odd shapes: under
  TRITON_INTERPRET=1 on CPU tensors (CI), or compiled on CUDA tensors when a GPU
  is there and the interpreter is off. fp32 (exact products) and fp16; bf16 only
  on the GPU (the interpreter has no bf16 arithmetic: numpy lacks the type).
- `cuda`-marked tests run the full sizes (N 197, D 64, bf16) with the tolerance
  rule of ARCHITECTURE.md: error at most 2x the error of torch doing the same
  computation in that dtype, both against an fp32 reference.
- Every output is poisoned with NaN before the run and checked fully written.
- The ops in devit_ext.ops: opcheck, CPU path vs reference, autograd fallback.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():  # conftest does the same; the kernels read it when decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

from devit_ext import kernels  # noqa: E402
from devit_ext.ops import reference as R  # noqa: E402

ATTN_MOD = importlib.import_module("devit_ext.kernels.subvit_attention")
FUSION_MOD = importlib.import_module("devit_ext.kernels.ensemble_fusion")

if kernels.interpreting():
    DEV = "cpu"
elif torch.cuda.is_available() and kernels.available():
    DEV = "cuda"
else:
    DEV = None

triton_only = [
    pytest.mark.triton,
    pytest.mark.skipif(DEV is None, reason="needs Triton with a GPU, or TRITON_INTERPRET=1 on the CPU"),
]
cuda_only = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and kernels.available() and not kernels.interpreting()),
        reason="needs a CUDA GPU with Triton (interpreter off)",
    ),
]


def _mark(*marks):
    def deco(f):
        for m in reversed(marks):
            f = m(f)
        return f

    return deco


def qkv_view(M, B, N, H, D, dtype=torch.float32, device=DEV, pad=8):
    """The stacked qkv as the QKV linear output is viewed: (M, B, N, 3*H*D) -> (M, B, N, 3, H, D).
    `pad` extra columns make the token stride differ from 3*H*D (a strided, non-contiguous view)."""
    buf = torch.randn(M, B, N, 3 * H * D + pad, device=device).to(dtype)
    return buf[..., : 3 * H * D].view(M, B, N, 3, H, D)


def close_fp32(out, ref, rtol=2e-5, atol=2e-5):
    assert torch.isfinite(out).all(), "some outputs were not written (NaN poison left)"
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol)


def within_2x(out, ref32, torch_lowp, floor=1e-3):
    """Tolerance rule for fp16/bf16: |out - ref| <= 2 * |torch_lowp - ref| (max over elements), plus a floor
    relative to the output magnitude for the case where torch happens to be exact."""
    assert torch.isfinite(out).all(), "some outputs were not written (NaN poison left)"
    err = (out.float() - ref32.float()).abs().max().item()
    err_t = (torch_lowp.float() - ref32.float()).abs().max().item()
    scale = ref32.float().abs().max().item()
    assert err <= 2 * err_t + floor * 1e-3 * max(scale, 1.0), f"error {err:.3g} > 2 x torch's {err_t:.3g}"


# ----------------------------------------------------------------- subvit_attention


ATTN_SHAPES = [  # (M, B, N, H, D)
    (2, 1, 5, 3, 16),
    (3, 2, 17, 2, 32),  # N spans two key blocks with the 16-wide interpreter tiles
    (1, 1, 1, 1, 16),  # N = 1
    (2, 1, 13, 1, 64),
]


@_mark(*triton_only)
@pytest.mark.parametrize("M,B,N,H,D", ATTN_SHAPES)
def test_attention_stacked_strided_view(M, B, N, H, D):
    torch.manual_seed(0)
    qkv = qkv_view(M, B, N, H, D)
    assert N == 1 or not qkv.is_contiguous()
    out = torch.full((M, B, N, H * D), float("nan"), device=DEV)
    res = kernels.subvit_attention(qkv, out=out)
    assert res is out
    close_fp32(out, R.subvit_attention(qkv))


@_mark(*triton_only)
def test_attention_cached_launch_follows_each_layout():
    """Without `out` the stacked form runs a launch planned once per layout (shape, strides, dtype,
    scale): alternating layouts of the same shape, and the same layout with another scale, each get
    their own plan and the reference's answer, and a repeated layout reuses its plan."""
    torch.manual_seed(0)
    M, B, N, H, D = 2, 1, 9, 2, 16
    layouts = [qkv_view(M, B, N, H, D, pad=8), qkv_view(M, B, N, H, D, pad=0), qkv_view(M, B, N, H, D, pad=16)]
    assert len({x.stride() for x in layouts}) == 3
    for _ in range(2):
        for x in layouts:
            for scale in (None, 0.3):
                close_fp32(kernels.subvit_attention(x, scale), R.subvit_attention(x, scale))
    plans = [k for k in ATTN_MOD._STACKED if k[0].N == N and k[0].heads == (H,) * M and k[0].D == D]
    assert len(plans) == 6  # 3 layouts x 2 scales, none planned twice
    shape, strides = plans[0][0], plans[0][1]
    p = ATTN_MOD.stacked_launch(shape, strides, plans[0][2])
    assert p is ATTN_MOD.stacked_launch(shape, strides, plans[0][2])


@_mark(*triton_only)
def test_attention_list_heterogeneous():
    torch.manual_seed(1)
    B, N, D = 2, 13, 16
    # one view of a padded linear output, one contiguous, one with permuted storage (image stride < token stride)
    a = qkv_view(1, B, N, 3, D)[0]
    b = torch.randn(B, N, 3, 1, D, device=DEV)
    c = torch.randn(N, B, 3, 2, D, device=DEV).transpose(0, 1)
    xs = [a, b, c]
    outs = [torch.full((B, N, t.shape[3] * D), float("nan"), device=DEV) for t in xs]
    res = kernels.subvit_attention(xs, out=outs)
    assert [r is o for r, o in zip(res, outs)] == [True] * 3
    for o, r in zip(outs, R.subvit_attention(xs)):
        close_fp32(o, r)


@_mark(*triton_only)
@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 16), (16, 32)])
def test_attention_tiles_and_scale(block_m, block_n):
    torch.manual_seed(2)
    qkv = qkv_view(2, 1, 37, 2, 16)  # N = 37: three 16-key blocks, ragged last one
    out = torch.full((2, 1, 37, 32), float("nan"), device=DEV)
    kernels.subvit_attention(qkv, 0.3, out=out, block_m=block_m, block_n=block_n)
    close_fp32(out, R.subvit_attention(qkv, 0.3))


@_mark(*triton_only)
def test_attention_fp16():
    torch.manual_seed(3)
    qkv = qkv_view(2, 1, 17, 2, 32, dtype=torch.float16)
    out = torch.full((2, 1, 17, 64), float("nan"), device=DEV, dtype=torch.float16)
    kernels.subvit_attention(qkv, out=out)
    assert out.dtype == torch.float16
    ref32 = R.subvit_attention(qkv.float())
    within_2x(out, ref32, R.subvit_attention(qkv))


def _no_launch(monkeypatch, mod, name):
    class Boom:
        def __getitem__(self, grid):
            raise AssertionError("the kernel was launched on bad input")

    monkeypatch.setattr(mod, name, Boom())


BAD_ATTN = [
    (lambda: torch.randn(1, 1, 5, 3, 2, 24), ValueError, "D"),  # unsupported head width
    (lambda: torch.randn(1, 1, 0, 3, 2, 16), ValueError, "N"),  # N < 1
    (lambda: torch.randn(1, 1, 5, 2, 2, 16), ValueError, "3"),  # not q/k/v
    (lambda: torch.randn(1, 5, 3, 2, 16), ValueError, "qkv"),  # wrong rank
    (lambda: torch.randn(1, 1, 5, 3, 2, 16).to(torch.int32), TypeError, "dtype"),
    (lambda: [torch.randn(1, 5, 3, 2, 16), torch.randn(1, 6, 3, 2, 16)], ValueError, "qkv\\[1\\]"),  # N differs
    (lambda: [torch.randn(1, 5, 3, 2, 16), torch.randn(1, 5, 3, 2, 32)], ValueError, "qkv\\[1\\]"),  # D differs
    (lambda: [torch.randn(1, 5, 3, 2, 16), torch.randn(1, 5, 3, 2, 16).half()], TypeError, "qkv\\[1\\]"),
    (lambda: [], ValueError, "empty"),
]


@_mark(*triton_only)
@pytest.mark.parametrize("make,exc,match", BAD_ATTN)
def test_attention_bad_input_raises_before_launch(monkeypatch, make, exc, match):
    _no_launch(monkeypatch, ATTN_MOD, "_subvit_attention_fwd")
    x = make()
    x = [t.to(DEV) for t in x] if isinstance(x, list) else x.to(DEV)
    with pytest.raises(exc, match=match):
        kernels.subvit_attention(x)


@_mark(*triton_only)
@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan")])
def test_attention_bad_scale(monkeypatch, scale):
    _no_launch(monkeypatch, ATTN_MOD, "_subvit_attention_fwd")
    with pytest.raises(ValueError, match="scale"):
        kernels.subvit_attention(qkv_view(1, 1, 5, 1, 16), scale)


# ----------------------------------------------------------------- ensemble_fusion


def fusion_inputs(B, widths, T, C, dtype=torch.float32, bias=True, device=DEV, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = sum(widths)
    q = torch.randint(-127, 128, (B, K), generator=g, dtype=torch.int8)
    scales = torch.rand(B, len(widths), generator=g) / 50
    w1 = torch.randn(T, K, generator=g) / K**0.5
    b1 = torch.randn(T, generator=g) if bias else None
    w2 = torch.randn(C, T, generator=g) / T**0.5
    b2 = torch.randn(C, generator=g) if bias else None
    to = lambda t, dt=None: None if t is None else t.to(device=device, dtype=dt or t.dtype)  # noqa: E731
    return to(q), to(scales), list(widths), to(w1, dtype), to(b1, dtype), to(w2, dtype), to(b2, dtype)


FUSION_CASES = [  # (B, widths, T, C, bias, t_splits)
    (1, (16, 24, 8), 40, 20, True, 1),
    (5, (5, 11), 37, 19, True, None),  # odd widths: tiles end mid-block
    (17, (32, 32, 32, 32), 33, 7, False, 3),  # two row blocks, three t-splits (atomic partials)
    (3, (16,), 16, 130, True, 2),  # C > 128: two class blocks
]


@_mark(*triton_only)
@pytest.mark.parametrize("B,widths,T,C,bias,t_splits", FUSION_CASES)
def test_fusion_fp32(B, widths, T, C, bias, t_splits):
    args = fusion_inputs(B, widths, T, C, bias=bias)
    out = torch.full((B, C), float("nan"), device=DEV)
    res = kernels.ensemble_fusion(*args, out=out, t_splits=t_splits)
    assert res is out and out.dtype == torch.float32
    close_fp32(out, R.ensemble_fusion(*args), rtol=1e-5, atol=1e-5)


@_mark(*triton_only)
@pytest.mark.parametrize("t_splits,k_splits", [(1, 3), (2, 4), (1, 99)])
def test_fusion_k_splits(t_splits, k_splits):
    # K cut into runs (the small-batch fill on the GPU): b1 and b2 must still be added exactly once;
    # 99 is clamped to the 6 K tiles (one per program)
    args = fusion_inputs(3, (16, 40, 24), 40, 20, bias=True)
    out = torch.full((3, 20), float("nan"), device=DEV)
    kernels.ensemble_fusion(*args, out=out, t_splits=t_splits, k_splits=k_splits)
    close_fp32(out, R.ensemble_fusion(*args), rtol=1e-5, atol=1e-5)


@_mark(*triton_only)
def test_fusion_strided_inputs():
    q, s, w, w1, b1, w2, b2 = fusion_inputs(6, (16, 8, 24), 24, 10)
    qw = torch.zeros(6, 64, dtype=torch.int8, device=DEV)
    qw[:, 3:51] = q
    q_view = qw[:, 3:51]  # row stride 64 != 48, unaligned start
    s_view = s.t().contiguous().t()  # (B, M) with column-major strides
    w1_view = w1.t().contiguous().t()  # non-contiguous rows: the launcher packs it
    out = torch.full((6, 10), float("nan"), device=DEV)
    kernels.ensemble_fusion(q_view, s_view, w, w1_view, b1, w2, b2, out=out)
    close_fp32(out, R.ensemble_fusion(q, s, w, w1, b1, w2, b2), rtol=1e-5, atol=1e-5)


@_mark(*triton_only)
def test_fusion_fp16():
    q, s, w, w1, b1, w2, b2 = fusion_inputs(5, (16, 24), 48, 20, dtype=torch.float16)
    out = torch.full((5, 20), float("nan"), device=DEV)
    kernels.ensemble_fusion(q, s, w, w1, b1, w2, b2, out=out)
    ref32 = R.ensemble_fusion(q, s, w, w1, b1, w2, b2)
    within_2x(out, ref32, _torch_fusion_lowp(q, s, w, w1, b1, w2, b2))


def _torch_fusion_lowp(q, s, w, w1, b1, w2, b2):
    """The same computation done by torch in the weights' dtype (the tolerance baseline)."""
    dt = w1.dtype
    x = (q.float() * s.repeat_interleave(torch.as_tensor(w, device=q.device), dim=1)).to(dt)
    h = torch.nn.functional.linear(x, w1, b1)
    return torch.nn.functional.linear(h, w2, b2).float()


def _bad_fusion():
    q, s, w, w1, b1, w2, b2 = fusion_inputs(3, (8, 8), 16, 5, device="cpu")
    return [
        (dict(widths=[8, 9]), ValueError, "widths"),  # sum != K
        (dict(widths=[16, 0]), ValueError, "widths"),
        (dict(scales=s[:, :1]), ValueError, "scales"),  # wrong shape
        (dict(scales=s.double()), TypeError, "scales"),  # wrong dtype
        (dict(q=q.float()), TypeError, "q"),  # not int8
        (dict(map_weight=w1[:, :8]), ValueError, "map_weight"),
        (dict(cls_weight=w2[:, :8]), ValueError, "cls_weight"),
        (dict(cls_weight=w2.half()), TypeError, "cls_weight"),  # dtype differs from map_weight
        (dict(map_bias=b1[:3]), ValueError, "map_bias"),
        (dict(cls_bias=b2[:3]), ValueError, "cls_bias"),
    ], dict(q=q, scales=s, widths=w, map_weight=w1, map_bias=b1, cls_weight=w2, cls_bias=b2)


@_mark(*triton_only)
@pytest.mark.parametrize("case", range(10))
def test_fusion_bad_input_raises_before_launch(monkeypatch, case):
    _no_launch(monkeypatch, FUSION_MOD, "_ensemble_fusion_fwd")
    cases, good = _bad_fusion()
    change, exc, match = cases[case]
    args = {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in {**good, **change}.items()}
    with pytest.raises(exc, match=match):
        kernels.ensemble_fusion(**args)


# ----------------------------------------------------------------- the ops (CPU path, opcheck, autograd)


def test_ops_cpu_match_reference_and_opcheck():
    from devit_ext import ops

    torch.manual_seed(4)
    qkv = qkv_view(2, 2, 7, 2, 16, device="cpu")
    torch.testing.assert_close(ops.subvit_attention(qkv), R.subvit_attention(qkv))
    torch.library.opcheck(torch.ops.devit.subvit_attention.default, (qkv, None))
    xs = [torch.randn(2, 7, 3, h, 16) for h in (3, 1)]
    for o, r in zip(ops.subvit_attention(xs, 0.5), R.subvit_attention(xs, 0.5)):
        torch.testing.assert_close(o, r)
    torch.library.opcheck(torch.ops.devit.subvit_attention_list.default, (xs, 0.5))
    for widths in ((8, 8, 8), (5, 11, 3)):
        args = fusion_inputs(4, widths, 12, 6, device="cpu")
        torch.testing.assert_close(ops.ensemble_fusion(*args), R.ensemble_fusion(*args))
        torch.library.opcheck(torch.ops.devit.ensemble_fusion.default, args)


def test_ops_bad_input_cpu():
    from devit_ext import ops

    with pytest.raises(ValueError, match="D"):
        ops.subvit_attention(torch.randn(1, 1, 5, 3, 2, 24))
    cases, good = _bad_fusion()
    for change, exc, match in cases:
        with pytest.raises(exc, match=match):
            ops.ensemble_fusion(**{**good, **change})


def test_ops_autograd_falls_back_to_reference():
    from devit_ext import ops

    torch.manual_seed(5)
    base = torch.randn(2, 1, 5, 3 * 2 * 16, requires_grad=True)
    qkv = base.view(2, 1, 5, 3, 2, 16)
    g = torch.randn(2, 1, 5, 32)
    (ga,) = torch.autograd.grad(ops.subvit_attention(qkv), base, g)
    (gr,) = torch.autograd.grad(R.subvit_attention(qkv), base, g)
    torch.testing.assert_close(ga, gr)

    xs = [torch.randn(1, 5, 3, h, 16, requires_grad=True) for h in (1, 2)]
    gs = [torch.randn(1, 5, h * 16) for h in (1, 2)]
    ga = torch.autograd.grad(ops.subvit_attention(xs), xs, gs)
    gr = torch.autograd.grad(R.subvit_attention(xs), xs, gs)
    for a, b in zip(ga, gr):
        torch.testing.assert_close(a, b)

    q, s, w, w1, b1, w2, b2 = fusion_inputs(3, (8, 4), 6, 5, device="cpu")
    leaves = [t.clone().requires_grad_(True) for t in (w1, b1, w2, b2)]
    ga = torch.autograd.grad(ops.ensemble_fusion(q, s, w, *leaves).sum(), leaves)
    gr = torch.autograd.grad(R.ensemble_fusion(q, s, w, *leaves).sum(), leaves)
    for a, b in zip(ga, gr):
        torch.testing.assert_close(a, b)


def test_kernels_info():
    info = kernels.info()
    assert set(info) >= {"triton", "available", "interpret", "error"}
    assert info["interpret"] == kernels.interpreting()


# ----------------------------------------------------------------- full sizes on a GPU


@_mark(*cuda_only)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,N", [(1, 197), (8, 197), (3, 198)])
def test_cuda_attention_full_size(dtype, B, N):
    torch.manual_seed(6)
    qkv = qkv_view(4, B, N, 3, 64, dtype=dtype, device="cuda", pad=0)  # the exact QKV-linear view
    out = torch.full((4, B, N, 192), float("nan"), device="cuda", dtype=dtype)
    kernels.subvit_attention(qkv, out=out)
    within_2x(out, R.subvit_attention(qkv.float()), R.subvit_attention(qkv))
    from devit_ext import ops

    within_2x(ops.subvit_attention(qkv), R.subvit_attention(qkv.float()), R.subvit_attention(qkv))


@_mark(*cuda_only)
@pytest.mark.parametrize("D", [16, 32, 128])
def test_cuda_attention_head_widths_and_list(D):
    torch.manual_seed(7)
    xs = [qkv_view(1, 2, 197, h, D, dtype=torch.bfloat16, device="cuda")[0] for h in (3, 4, 6, 2)]
    outs = [torch.full((2, 197, t.shape[3] * D), float("nan"), device="cuda", dtype=torch.bfloat16) for t in xs]
    kernels.subvit_attention(xs, out=outs)
    for o, r32, rl in zip(outs, R.subvit_attention([t.float() for t in xs]), R.subvit_attention(xs)):
        within_2x(o, r32, rl)


@_mark(*cuda_only)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B", [1, 256])
def test_cuda_fusion_full_size(dtype, B):
    q, s, w, w1, b1, w2, b2 = fusion_inputs(B, (192,) * 4, 1024, 100, dtype=dtype, device="cuda")
    out = torch.full((B, 100), float("nan"), device="cuda")
    kernels.ensemble_fusion(q, s, w, w1, b1, w2, b2, out=out)
    ref32 = R.ensemble_fusion(q, s, w, w1, b1, w2, b2)
    if dtype == torch.float32:
        close_fp32(out, ref32, rtol=1e-4, atol=1e-4)
    else:
        within_2x(out, ref32, _torch_fusion_lowp(q, s, w, w1, b1, w2, b2))
    from devit_ext import ops

    torch.testing.assert_close(ops.ensemble_fusion(q, s, w, w1, b1, w2, b2), out, rtol=1e-4, atol=1e-4)


@_mark(*cuda_only)
def test_cuda_fusion_heterogeneous_and_graph():
    q, s, w, w1, b1, w2, b2 = fusion_inputs(64, (192, 256, 384, 128), 1024, 100, dtype=torch.bfloat16, device="cuda")
    ref32 = R.ensemble_fusion(q, s, w, w1, b1, w2, b2)
    out = kernels.ensemble_fusion(q, s, w, w1, b1, w2, b2)  # warm-up also caches the tile table
    within_2x(out, ref32, _torch_fusion_lowp(q, s, w, w1, b1, w2, b2))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out_g = kernels.ensemble_fusion(q, s, w, w1, b1, w2, b2)
    out_g.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    within_2x(out_g, ref32, _torch_fusion_lowp(q, s, w, w1, b1, w2, b2))
