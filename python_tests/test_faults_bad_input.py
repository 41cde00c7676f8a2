"""Bad input is refused with an error naming it (issue 17, items 3 and 8): no processes, no sockets.

The wire decoder refuses values no honest sender makes (non-finite or
out-of-range scales, q = -128, non-finite fp16/fp32 tokens, non-zero reserved
bytes, a non-finite compute time); the engines refuse images that overflow the
compute dtype and images without data; the distributed engine's options and
ensemble_fusion's arguments are checked with errors naming the argument.
"""
from __future__ import annotations

import struct

import pytest
import torch

import devit_ext
from devit_ext import ops, wire
from devit_ext.engines import distributed as D

from test_distributed import make_model, uint8_images

H = "ab" * 32


def _int8_msg(B=2, T=1, d=8):
    q, s = ops.quantize_int8(torch.randn(B, T, d))
    return wire.encode(H, 1, 5, q=q, scales=s)


def _patched(buf, offset, raw: bytes):
    b = buf.clone()
    b[offset : offset + len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    return b


F32 = struct.Struct("<f")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda b: _patched(b, 64, F32.pack(3e38)), "scales are negative, NaN, infinite or above"),
        (lambda b: _patched(b, 64, F32.pack(float("inf"))), "scales are negative, NaN, infinite"),
        (lambda b: _patched(b, 68, F32.pack(-1.0)), "scales are negative"),
        (lambda b: _patched(b, 64 + 8 + 3, bytes([0x80])), r"-128, outside the symmetric range"),
        (lambda b: _patched(b, 57, bytes([1])), "reserved header bytes"),
        (lambda b: _patched(b, 56, bytes([2])), "unknown header flags 0x02"),
        (lambda b: _patched(b, 56, bytes([1])), "an authenticated message .HMAC tag., but this side holds no key"),
        (lambda b: _patched(b, 63, bytes([0xFF])), "reserved header bytes"),
        (lambda b: _patched(b, 48, struct.pack("<d", float("inf"))), "invalid compute time inf"),
        (lambda b: _patched(b, 48, struct.pack("<d", float("nan"))), "invalid compute time nan"),
        (lambda b: _patched(b, 48, struct.pack("<d", -1.0)), "invalid compute time"),
    ],
    ids=["scale-3e38", "scale-inf", "scale-negative", "q-128", "reserved-first", "flags-unknown", "tag-without-key",
         "reserved-last", "compute-inf",
         "compute-nan", "compute-negative"],
)
def test_decoder_refuses_values_no_sender_makes(mutate, match):
    with pytest.raises(wire.WireError, match=match) as e:
        wire.decode(mutate(_int8_msg()), device=1)
    assert "from device 1" in str(e.value)


def test_decoder_accepts_the_largest_scale_a_sender_makes():
    x = torch.full((1, 1, 4), torch.finfo(torch.float32).max)
    q, s = ops.quantize_int8(x)
    m = wire.decode(wire.encode(H, 0, 0, q=q, scales=s))  # accepted: the bound is what quantize can make
    assert torch.equal(m.scales, s) and float(s.max()) <= wire.MAX_SCALE


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_decoder_refuses_nonfinite_float_tokens(dtype, bad):
    t = torch.randn(3, 1, 8).to(dtype)
    t[1, 0, 5] = bad
    with pytest.raises(wire.WireError, match="NaN or infinite") as e:
        wire.decode(wire.encode(H, 2, 0, tokens=t), device=2)
    assert "from device 2" in str(e.value)


def test_hello_with_reserved_bytes_refused():
    hello = wire.encode_hello(H, 0, 1, 8)
    wire.decode(hello, kind=wire.KIND_HELLO)
    with pytest.raises(wire.WireError, match="reserved"):
        wire.decode(_patched(hello, 60, b"\x01"), kind=wire.KIND_HELLO)


# ---------------------------------------------------------------- images
def test_images_overflowing_the_compute_dtype_refused():
    m = make_model()
    x = torch.randn(2, 3, 32, 32)
    x[1, 0, 0, 0] = 1e30  # finite in fp32 and bf16, Inf in fp16
    with pytest.raises(ValueError, match=r"images: values up to 1e\+30 overflow the compute dtype float16"):
        devit_ext.collaborate(m, x, dtype="fp16")
    xd = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    xd[0, 1, 2, 3] = 1e39
    with pytest.raises(ValueError, match="overflow the compute dtype float32"):
        devit_ext.collaborate(m, xd)


def test_huge_finite_images_give_nan_like_the_model_not_zeros():
    # 1e30 fits fp32 but overflows inside the model: the int8 path must show the NaN model(x) shows
    m = make_model()
    x = torch.randn(2, 3, 32, 32)
    x[1] = 1e30
    with torch.no_grad():
        want = m(x)
    got = devit_ext.collaborate(m, x, transfer="int8")
    assert torch.equal(torch.isnan(got[1]).all(), torch.isnan(want[1]).all())
    assert not torch.isfinite(got[1]).all()
    assert torch.isfinite(got[0]).all()


def test_images_on_the_meta_device_refused():
    m = make_model()
    with pytest.raises(ValueError, match="images: on the meta device"):
        devit_ext.collaborate(m, torch.empty(2, 3, 32, 32, device="meta"))


# ---------------------------------------------------------------- distributed options (before any socket)
@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(spawn=True, world_size="x"), TypeError, "world_size: expected an int"),
        (dict(spawn=True, world_size=3.0), TypeError, "world_size: expected an int"),
        (dict(init_method=5), TypeError, "init_method: expected a str"),
        (dict(spawn=True, threads=0), ValueError, "threads: expected None or a positive int"),
        (dict(spawn=True, threads=1.5), ValueError, "threads"),
        (dict(spawn=True, rendezvous_timeout=float("inf")), ValueError, "rendezvous_timeout"),
        (dict(spawn=True, rendezvous_timeout="10"), ValueError, "rendezvous_timeout"),
        (dict(spawn=True, worker_device=0), TypeError, "worker_device"),
        (dict(spawn=True, pipeline_depth=True), ValueError, "pipeline_depth"),
    ],
)
def test_distributed_options_named(kw, err, match):
    with pytest.raises(err, match=match):
        D.run(make_model(), uint8_images(2), **kw)
    assert D.sessions() == {} or D.SPAWN_KEY not in D.sessions()


# ---------------------------------------------------------------- ensemble_fusion
def _fusion_args(B=2):
    q = torch.zeros(B, 12, dtype=torch.int8)
    return q, torch.ones(B, 2), [5, 7], torch.randn(6, 12), None, torch.randn(4, 6), None


def test_ensemble_fusion_empty_batch_refused():
    with pytest.raises(ValueError, match="q: expected a batch of at least one image"):
        ops.ensemble_fusion(*_fusion_args(B=0))


def test_ensemble_fusion_float_widths_not_truncated():
    q, s, _, mw, mb, cw, cb = _fusion_args()
    with pytest.raises(TypeError, match="widths: expected a sequence of ints"):
        ops.ensemble_fusion(q, s, [5.5, 6.5], mw, mb, cw, cb)
    with pytest.raises(TypeError, match="widths"):
        ops.ensemble_fusion(q, s, [True, 11], mw, mb, cw, cb)
    out = ops.ensemble_fusion(q, s, torch.tensor([5, 7]), mw, mb, cw, cb)  # an int tensor is fine
    assert out.shape == (2, 4)


# ---------------------------------------------------------------- a worker's control messages
def test_worker_checks_the_control_message_against_its_model():
    from devit_ext.engines import _proto
    from devit_ext.engines._proto import MAX_BATCH_BYTES, batch_ctrl_error

    chw = (3, 32, 32)
    ok = _proto.ctrl(_proto.CTRL_BATCH, 7, (4, 3, 32, 32), 1, 1, 1).tolist()
    assert batch_ctrl_error(ok, chw) is None
    huge = _proto.ctrl(_proto.CTRL_BATCH, 7, (1 << 20, 3, 1 << 15, 1 << 15), 1, 1, 1).tolist()  # ~3.4 PB
    assert "image shape" in batch_ctrl_error(huge, chw)
    many = _proto.ctrl(_proto.CTRL_BATCH, 7, (MAX_BATCH_BYTES // (3 * 32 * 32) + 1, 3, 32, 32), 1, 1, 1).tolist()
    assert "at most" in batch_ctrl_error(many, chw)
    assert "batch of 0" in batch_ctrl_error(_proto.ctrl(_proto.CTRL_BATCH, 7, (0, 3, 32, 32), 1, 1, 1).tolist(), chw)
    assert "code" in batch_ctrl_error(_proto.ctrl(_proto.CTRL_BATCH, 7, (4, 3, 32, 32), 9, 1, 1).tolist(), chw)
    assert "kind" in batch_ctrl_error(_proto.ctrl(42).tolist(), chw)


# ---------------------------------------------------------------- local engine and partition arguments
@pytest.mark.parametrize("value", ["maybe", 1, None])
def test_cuda_graphs_must_be_a_bool(value):
    with pytest.raises(TypeError, match=r"cuda_graphs: expected a bool, got"):
        devit_ext.collaborate(make_model(), uint8_images(2), cuda_graphs=value)


def test_similarity_partition_of_nan_data_refused():
    from devit_ext import partition

    tokens, labels, head = torch.randn(12, 8), torch.arange(12) % 4, torch.randn(4, 8)
    assert sorted(len(g) for g in partition.similarity_groups(tokens, labels, head, [2, 2], 0)) == [2, 2]
    tokens[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"partition='similarity': the teacher's class tokens of the data hold 1 NaN"):
        partition.similarity_groups(tokens, labels, head, [2, 2], 0)
    head[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        partition.similarity_groups(torch.randn(12, 8), labels, head, [2, 2], 0)
