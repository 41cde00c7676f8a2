"""What an engine's answer must equal: the float path, and the int8 semantics exactly.

Shared by the local and distributed engine tests.
"""
from __future__ import annotations

import torch

from devit_ext.engines import common
from devit_ext.ops import reference as R


@torch.no_grad()
def reference(model, images, missing=()):
    """model(images) on the plain float path; zeros in place of the missing devices' tokens."""
    x = common.normalise_images(model, images)
    toks = model.forward_tokens(x)
    toks = [torch.zeros_like(t) if i in missing else t for i, t in enumerate(toks)]
    return model.fusion(toks)


@torch.no_grad()
def int8_oracle(model, images, missing=()):
    """The int8 semantics exactly: reference LayerNorm+quantise of each device's tokens (a CCT's pooled vector:
    quantise alone), dequantised, fused in fp32."""
    x = common.normalise_images(model, images)
    toks = []
    for i, sub in enumerate(model.submodels):
        f = sub.sender_tokens(x)  # ViT: pre-norm prefix tokens; CCT: the pooled vector, no norm left
        w, b, eps = sub.sender_norm()
        q, s = R.quantize_int8(f) if eps is None else R.layernorm_quantize_int8(f, w, b, eps)
        t = R.dequantize_int8(q, s)
        t = t if model.distilled else t[:, 0]
        toks.append(torch.zeros_like(t) if i in missing else t)
    return model.fusion(toks)


def check_int8(out, model, images, missing=(), min_overall=0.98):
    """Exactly the int8 semantics, and close to the float path: small logit error, top-1 agreement
    >= 99.5% where the float path's own top-2 margin exceeds that error (random weights have
    near-ties that a trained model does not), and `min_overall` agreement on all images.
    Returns the max logit error against the float path."""
    oracle = int8_oracle(model, images, missing)
    close = torch.isclose(out, oracle, rtol=1e-4, atol=1e-5)
    assert close.float().mean().item() >= 0.99  # a token element on a rounding boundary may move one step
    ref = reference(model, images, missing)
    err = (out - ref).abs().max().item()
    assert err <= 0.05 * ref.abs().max().item(), (err, ref.abs().max().item())
    top2 = ref.topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * err
    agree = (out.argmax(1) == ref.argmax(1)).float()
    assert decided.float().mean().item() >= 0.8
    assert agree[decided].mean().item() >= 0.995
    assert agree.mean().item() >= min_overall
    return err


def assert_int8_agree(q_ref, s_ref, q_got, s_got, pre_ref, norm, max_fraction=0.01):
    """Two int8 messages of the same pre-norm tokens computed by two runtimes: scales equal to fp32
    rounding, int8 values exactly equal except a one-step difference on at most `max_fraction` of
    them, and only where the reference value sits next to a .5 rounding boundary. `norm` None: the tokens are
    quantised as they are (a CCT's pooled vector has no norm left)."""
    assert q_ref.shape == q_got.shape and q_ref.dtype == q_got.dtype == torch.int8
    torch.testing.assert_close(s_got, s_ref, rtol=1e-5, atol=1e-7)
    diff = (q_ref.int() - q_got.int()).abs()
    assert int(diff.max()) <= 1, int(diff.max())
    assert diff.bool().float().mean().item() <= max_fraction
    if diff.any():
        with torch.no_grad():
            y = pre_ref.float() if norm is None else torch.nn.functional.layer_norm(
                pre_ref.float(), (pre_ref.shape[-1],), norm.weight.float(), norm.bias.float(), norm.eps)
        frac = (y / s_ref.unsqueeze(-1)).abs().frac()
        assert bool(((frac - 0.5).abs()[diff.bool()] < 1e-3).all())
