"""subvit_attention on the CPU against an oracle written here, not against ops/reference.py.

On CPU tensors `ops.subvit_attention` *is* the reference (torch SDPA), so
comparing the two proves nothing. The oracle below reads Q, K and V straight
out of the documented QKV layout with plain indexing, one (sub-model, image,
head) at a time, and computes softmax(Q K^T * scale) V in float64 with the
softmax written out (exp(s - max) / sum). Its gradient is written out too
(dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dP * P)), dQ = scale dS K,
dK = scale dS^T Q) and checked against finite differences with
`torch.autograd.gradcheck` (float64), so the ops' autograd is compared with a
gradient that is itself verified. torch SDPA on separately built (B, H, N, D)
copies is a second, independent check of the forward.

Covered: odd N (1, 7, 13, 29), every head width the op accepts, M 1-3, B 1-3,
explicit and default scale, the stacked form as a strided view of the QKV
linear output and as a permuted (non-contiguous) layout, heterogeneous heads
in the list form with the tensors sliced out of one buffer, fp32 and bf16,
and autograd through the stacked view and the list form.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from devit_ext import ops
from devit_ext.ops import reference as R

FP32 = dict(rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the oracle


def _head(qkv_m_b: torch.Tensor, which: int, h: int) -> torch.Tensor:
    """(N, 3, H, D) of one (sub-model, image) -> the (N, D) Q (0), K (1) or V (2) of head h, float64."""
    return qkv_m_b[:, which, h, :].double()


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """One head: (out, P) with P = softmax(q k^T * scale) written out."""
    s = (q @ k.t()) * scale
    e = torch.exp(s - s.max(dim=1, keepdim=True).values)
    p = e / e.sum(dim=1, keepdim=True)
    return p @ v, p


def oracle_one(x: torch.Tensor, scale: float | None) -> torch.Tensor:
    """x (B, N, 3, H, D) of one sub-model -> (B, N, H*D) float64: head h at columns h*D .. (h+1)*D."""
    B, N, three, H, D = x.shape
    assert three == 3
    s = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, N, H * D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            o, _ = _attend(_head(x[b], 0, h), _head(x[b], 1, h), _head(x[b], 2, h), s)
            out[b, :, h * D:(h + 1) * D] = o
    return out


def oracle(qkv, scale=None):
    """Stacked (M, B, N, 3, H, D) -> (M, B, N, H*D); list of (B, N, 3, H_m, D) -> list of (B, N, H_m*D)."""
    if isinstance(qkv, (list, tuple)):
        return [oracle_one(t, scale) for t in qkv]
    return torch.stack([oracle_one(qkv[m], scale) for m in range(qkv.shape[0])])


def oracle_grad_one(x: torch.Tensor, g: torch.Tensor, scale: float | None) -> torch.Tensor:
    """The hand-written gradient of oracle_one: x (B, N, 3, H, D), upstream g (B, N, H*D) -> dx like x, float64."""
    B, N, _, H, D = x.shape
    s = 1.0 / math.sqrt(D) if scale is None else scale
    dx = torch.zeros(x.shape, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            q, k, v = (_head(x[b], i, h) for i in range(3))
            _, p = _attend(q, k, v, s)
            do = g[b, :, h * D:(h + 1) * D].double()
            dv = p.t() @ do
            dp = do @ v.t()
            ds = p * (dp - (dp * p).sum(dim=1, keepdim=True))
            dx[b, :, 0, h] = s * ds @ k
            dx[b, :, 1, h] = s * ds.t() @ q
            dx[b, :, 2, h] = dv
    return dx


class _Oracle(torch.autograd.Function):
    """oracle_one with its hand-written backward, so gradcheck can test that backward."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.save_for_backward(x)
        ctx.scale = scale
        return oracle_one(x, scale)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return oracle_grad_one(x, g, ctx.scale), None


def sdpa(qkv, scale=None):
    """torch SDPA on (B*M, H, N, D) float64 copies built with permute + contiguous (another layout path)."""
    M, B, N, _, H, D = qkv.shape
    q, k, v = (qkv[:, :, :, i].permute(0, 1, 3, 2, 4).reshape(M * B, H, N, D).double().contiguous() for i in range(3))
    o = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return o.reshape(M, B, H, N, D).permute(0, 1, 3, 2, 4).reshape(M, B, N, H * D)


def strided_qkv(M, B, N, H, D, pad=5, dtype=torch.float32):
    """The QKV linear output (M, B, N, 3*H*D + pad) viewed as (M, B, N, 3, H, D): not contiguous."""
    buf = torch.randn(M, B, N, 3 * H * D + pad).to(dtype)
    return buf[..., : 3 * H * D].view(M, B, N, 3, H, D)


def permuted_qkv(M, B, N, H, D):
    """(M, B, N, 3, H, D) whose memory is laid out (3, H, N, B, M, D): every stride but D's is unusual."""
    base = torch.randn(3, H, N, B, M, D)
    return base.permute(4, 3, 2, 0, 1, 5)


# ---------------------------------------------------------------- the oracle's own checks


def test_oracle_gradient_passes_gradcheck():
    torch.manual_seed(0)
    # the oracle takes any head width: small ones keep the finite differences cheap
    for shape, scale in (((2, 5, 3, 2, 4), None), ((1, 1, 3, 1, 3), 0.7), ((1, 4, 3, 3, 5), 0.05)):
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: _Oracle.apply(t, scale), (x,), eps=1e-6, atol=1e-7)


def test_oracle_matches_sdpa_and_tells_mistakes_apart():
    """The oracle equals SDPA (float64), and differs by far more than the fp32 tolerance from what a
    wrong op would compute: K and V swapped, the scale left out, heads read in another order."""
    torch.manual_seed(1)
    qkv = strided_qkv(2, 2, 7, 3, 16).double()
    want = oracle(qkv)
    torch.testing.assert_close(sdpa(qkv), want, rtol=1e-12, atol=1e-12)
    wrong = {
        "k and v swapped": oracle(qkv[:, :, :, [0, 2, 1]]),
        "no scale": oracle(qkv, 1.0),
        "heads reversed": oracle(qkv.flip(4)),
    }
    for what, w in wrong.items():
        assert (w - want).abs().max() > 100 * FP32["atol"], what


# ---------------------------------------------------------------- the op (CPU path) against the oracle


STACKED = [  # (M, B, N, H, D)
    (1, 1, 1, 1, 16),  # one token: softmax over a single key
    (2, 1, 7, 3, 16),
    (3, 2, 13, 2, 32),
    (2, 3, 29, 1, 64),
    (1, 2, 7, 2, 128),
]


@pytest.mark.parametrize("M,B,N,H,D", STACKED)
@pytest.mark.parametrize("scale", [None, 0.3])
def test_stacked_strided_view_matches_oracle(M, B, N, H, D, scale):
    torch.manual_seed(2)
    qkv = strided_qkv(M, B, N, H, D)
    assert not qkv.is_contiguous() or M * B * N == 1  # (1, 1, 1, ...) is contiguous whatever its strides
    want = oracle(qkv, scale)
    got = ops.subvit_attention(qkv, scale)
    assert got.shape == (M, B, N, H * D) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, **FP32)
    torch.testing.assert_close(sdpa(qkv, scale), want, rtol=1e-10, atol=1e-10)


def test_stacked_permuted_layout_matches_oracle():
    torch.manual_seed(3)
    qkv = permuted_qkv(2, 3, 11, 3, 32)
    assert not qkv.is_contiguous() and qkv.shape == (2, 3, 11, 3, 3, 32)
    torch.testing.assert_close(ops.subvit_attention(qkv, 0.2).double(), oracle(qkv, 0.2), **FP32)


def test_list_heterogeneous_heads_from_one_buffer_match_oracle():
    """Three sub-models with 3, 1 and 2 heads whose QKV tensors are column slices of one buffer."""
    torch.manual_seed(4)
    B, N, D, heads = 2, 13, 16, (3, 1, 2)
    widths = [3 * h * D for h in heads]
    buf = torch.randn(B, N, sum(widths) + 7)
    xs, at = [], 0
    for h, w in zip(heads, widths):
        xs.append(buf[:, :, at: at + w].view(B, N, 3, h, D))
        at += w
    assert not any(x.is_contiguous() for x in xs)
    for scale in (None, 0.4):
        got = ops.subvit_attention(xs, scale)
        want = oracle(xs, scale)
        assert [tuple(o.shape) for o in got] == [(B, N, h * D) for h in heads]
        for o, w in zip(got, want):
            torch.testing.assert_close(o.double(), w, **FP32)


def test_bf16_close_to_oracle():
    """bf16 in, bf16 out; within bf16 rounding of the float64 oracle (computed on the same bf16 inputs)."""
    torch.manual_seed(5)
    qkv = strided_qkv(2, 2, 13, 2, 32, dtype=torch.bfloat16)
    got = ops.subvit_attention(qkv)
    assert got.dtype == torch.bfloat16
    want = oracle(qkv)
    err = (got.double() - want).abs().max().item()
    assert err <= 2 ** -7 * max(1.0, want.abs().max().item()), err


# ---------------------------------------------------------------- autograd against the oracle's gradient


def test_autograd_stacked_view_matches_oracle_gradient():
    """Gradients reach the QKV linear output through the strided view, equal to the hand gradient."""
    torch.manual_seed(6)
    M, B, N, H, D = 2, 2, 7, 3, 16
    base = torch.randn(M, B, N, 3 * H * D + 5, requires_grad=True)
    qkv = base[..., : 3 * H * D].view(M, B, N, 3, H, D)
    g = torch.randn(M, B, N, H * D)
    for scale in (None, 0.5):
        (got,) = torch.autograd.grad(ops.subvit_attention(qkv, scale), base, g)
        want = torch.stack([oracle_grad_one(qkv[m].detach(), g[m], scale) for m in range(M)])
        torch.testing.assert_close(got[..., : 3 * H * D].double(), want.reshape(M, B, N, -1), **FP32)
        assert torch.equal(got[..., 3 * H * D:], torch.zeros_like(got[..., 3 * H * D:]))  # padding untouched


def test_autograd_list_form_matches_oracle_gradient():
    torch.manual_seed(7)
    B, N, D, heads = 2, 5, 16, (1, 3)
    xs = [torch.randn(B, N, 3, h, D, requires_grad=True) for h in heads]
    gs = [torch.randn(B, N, h * D) for h in heads]
    got = torch.autograd.grad(ops.subvit_attention(xs, 0.3), xs, gs)
    for x, g, d in zip(xs, gs, got):
        torch.testing.assert_close(d.double(), oracle_grad_one(x.detach(), g, 0.3), **FP32)


def test_autograd_only_some_list_outputs_used():
    """A loss on one sub-model's output: the other sub-model's input gets a zero (or no) gradient."""
    torch.manual_seed(8)
    xs = [torch.randn(1, 6, 3, h, 16, requires_grad=True) for h in (2, 1)]
    outs = ops.subvit_attention(xs)
    g = torch.randn_like(outs[1])
    d0, d1 = torch.autograd.grad(outs[1], xs, g, allow_unused=True)
    assert d0 is None or torch.count_nonzero(d0) == 0
    torch.testing.assert_close(d1.double(), oracle_grad_one(xs[1].detach(), g, None), **FP32)


def test_reference_matches_oracle():
    """ops/reference.py is the oracle of the GPU kernels: it must itself equal this one."""
    torch.manual_seed(9)
    qkv = strided_qkv(3, 2, 9, 2, 32)
    torch.testing.assert_close(R.subvit_attention(qkv, 0.25).double(), oracle(qkv, 0.25), **FP32)
    xs = [torch.randn(2, 9, 3, h, 16) for h in (2, 1)]
    for o, w in zip(R.subvit_attention(xs), oracle(xs)):
        torch.testing.assert_close(o.double(), w, **FP32)
