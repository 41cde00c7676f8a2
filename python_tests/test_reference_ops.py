"""The reference ops (the oracle of every kernel) against hand computations where the kernels' own tests
cannot tell: rows whose scale is subnormal (the only place the [-127, 127] clamp binds) and the
aggregator head on the CPU (whose op path does not call the reference)."""
from __future__ import annotations

import pytest
import torch

from devit_ext.ops import quantize_int8
from devit_ext.ops import reference as R

UNIT = 2.0**-149  # the smallest fp32 subnormal


# (max |x| in units, expected q of +max, of -max, of one unit, scale in units): scale = fp32(max / 127) is
# a whole number of units, so x / scale is worked out by hand; where it rounds to 1 unit the quotient
# exceeds 127 and the clamp is what keeps q in range; 191 / 2 = 95.5 is a tie (to even: 96).
SUBNORMAL = [(190, 127, -127, 1, 1), (191, 96, -96, 0, 2), (127, 127, -127, 1, 1), (300, 127, -127, 0, 2),
             (64, 64, -64, 1, 1), (444, 127, -127, 0, 3)]


@pytest.mark.parametrize("quant", [R.quantize_int8, quantize_int8], ids=["reference", "op"])
@pytest.mark.parametrize("k,qp,qn,q1,su", SUBNORMAL, ids=[str(c[0]) for c in SUBNORMAL])
def test_subnormal_scales_round_and_clamp_by_hand(quant, k, qp, qn, q1, su):
    x = torch.tensor([[k * UNIT, -k * UNIT, UNIT, 0.0]], dtype=torch.float32)
    assert x[0, 0].item() == k * UNIT  # exactly representable
    q, scale = quant(x)
    assert q.tolist() == [[qp, qn, q1, 0]] and scale.tolist() == [su * UNIT]


def test_reference_ensemble_fusion_is_the_dequantised_side_by_side_tokens_through_two_linears():
    g = torch.Generator().manual_seed(0)
    widths, B, hidden, C = [3, 1, 4], 5, 6, 7
    q = torch.randint(-127, 128, (B, sum(widths)), generator=g, dtype=torch.int8)
    scales = torch.rand(B, len(widths), generator=g) * 0.1
    mw, mb = torch.randn(hidden, sum(widths), generator=g), torch.randn(hidden, generator=g)
    cw, cb = torch.randn(C, hidden, generator=g), torch.randn(C, generator=g)
    want = torch.zeros(B, C, dtype=torch.float64)
    want_nb = torch.zeros(B, C, dtype=torch.float64)
    for b in range(B):
        x, off = [], 0
        for m, w in enumerate(widths):
            x += [float(q[b, off + j]) * float(scales[b, m]) for j in range(w)]
            off += w
        h = [sum(float(mw[i, j]) * x[j] for j in range(len(x))) for i in range(hidden)]
        for c in range(C):
            z = sum(float(cw[c, i]) * h[i] for i in range(hidden))
            want_nb[b, c] = z
            want[b, c] = z + float(cb[c]) + sum(float(cw[c, i]) * float(mb[i]) for i in range(hidden))
    out = R.ensemble_fusion(q, scales, widths, mw.double(), mb.half().float(), cw.bfloat16().float(), cb)
    assert out.dtype == torch.float32
    torch.testing.assert_close(R.ensemble_fusion(q, scales, widths, mw, mb, cw, cb).double(), want,
                               rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(R.ensemble_fusion(q, scales.double(), tuple(widths), mw.double(), None,
                                                 cw.double(), None).double(), want_nb, rtol=1e-5, atol=1e-4)
