"""Every way `wire.encode` / `wire.decode` refuse a message, with the words the user sees.

Messages are built by hand (a header packed field by field at the documented
offsets, see test_wire_layout.py), so each check of `decode` is exercised on
its own; every error must name the device it came from.
"""
from __future__ import annotations

import math
import struct

import pytest
import torch

from devit_ext import wire

HASH = "ab" * 32


def header(kind=1, tcode=1, device=2, T=1, d=3, bid=7, B=2, plen=None, compute_s=0.0, magic=b"DVTW", version=1,
           mhash=bytes.fromhex(HASH[:32])) -> bytes:
    if plen is None:
        plen = 0 if kind == 0 else wire.payload_size(wire.TRANSFER_NAMES.get(tcode, "int8"), B, T, d)
    return (magic + struct.pack("<HBB", version, kind, tcode) + mhash + struct.pack("<HHIqIId", device, T, d, bid, B,
                                                                                       plen, compute_s) + bytes(8))


def buf(raw: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def int8_payload(B=2, T=1, d=3, scales=None):
    s = scales if scales is not None else [0.5] * (B * T)
    return struct.pack(f"<{B * T}f", *s) + bytes(B * T * d)


def good(**kw) -> bytes:
    B, T, d = kw.get("B", 2), kw.get("T", 1), kw.get("d", 3)
    return header(**kw) + int8_payload(B, T, d)


def test_a_hand_built_message_decodes():
    m = wire.decode(buf(good()), device=2, batch_id=7, batch_size=2, num_tokens=1, width=3, transfer="int8",
                    kind=wire.KIND_TOKENS, expected_hash=HASH)
    assert (m.device, m.batch_id, m.batch_size, m.num_tokens, m.width, m.compute_s) == (2, 7, 2, 1, 3, 0.0)
    assert m.dequantized().shape == (2, 1, 3)


@pytest.mark.parametrize("raw,kw,match", [
    (good()[:40], {}, r"from an unknown device: truncated: 40 bytes, shorter than the 64-byte header"),
    (good()[:40], {"device": 2}, r"from device 2: truncated: 40 bytes"),
    (good(magic=b"XXXX"), {}, r"from an unknown device: bad magic b'XXXX'"),
    (good(version=2), {}, r"from device 2: format version 2, this side speaks version 1"),
    (header(kind=5), {}, r"from device 2: unknown message kind 5"),
    (good(), {"kind": wire.KIND_HELLO}, r"from device 2: expected a hello message, got a tokens message"),
    (good(), {"device": 1}, r"from device 1: header says device 2, but it arrived from device 1 \(rank 2\)"),
    (good(), {"expected_hash": "cd" * 32}, r"from device 2: it runs a different model \(content hash abab"),
    (good(T=3), {}, r"from device 2: 3 tokens per image \(expected 1 or 2\)"),
    (good(T=2), {"num_tokens": 1}, r"from device 2: 2 tokens per image, the model's device 2 sends 1"),
    (good(), {"width": 4}, r"from device 2: token width 3, the model's device 2 has width 4"),
    (header(kind=0, B=0, bid=0) + b"\x00", {}, r"from device 2: a hello message has no payload, got 1 bytes \(header says 0\)"),
    (header(kind=0, plen=5), {}, r"from device 2: a hello message has no payload, got 0 bytes \(header says 5\)"),
    (header(tcode=9, plen=0), {}, r"from device 2: unknown transfer code 9"),
    (good(), {"transfer": "fp16"}, r"from device 2: transfer int8, expected fp16"),
    (good(), {"batch_id": 8}, r"from device 2: batch id 7, expected 8 \(replayed, out of order or stale\)"),
    (good(), {"batch_size": 3}, r"from device 2: batch size 2, expected 3"),
    (header(d=0, plen=0), {}, r"from device 2: empty shape \(B=2, T=1, d=0\)"),
    (header(B=0, plen=0), {}, r"from device 2: empty shape \(B=0, T=1, d=3\)"),
    (header(plen=13) + int8_payload(), {}, r"from device 2: header declares a 13-byte payload, but B=2, T=1, d=3, int8 needs 14"),
    (good()[:-1], {}, r"from device 2: truncated: 77 bytes, expected 78 \(B=2, T=1, d=3, int8\)"),
    (good() + b"\x00", {}, r"from device 2: too long: 79 bytes, expected 78 \(B=2, T=1, d=3, int8\)"),
    (good(compute_s=-1.0), {}, r"from device 2: invalid compute time -1.0"),
    (good(compute_s=math.nan), {}, r"from device 2: invalid compute time nan"),
    (header() + int8_payload(scales=[0.5, -0.5]), {}, r"from device 2: scales are negative, NaN, infinite or above"),
    (header() + int8_payload(scales=[math.inf, 0.5]), {}, r"from device 2: scales are negative, NaN, infinite or above"),
])
def test_decode_refuses(raw, kw, match):
    with pytest.raises(wire.WireError, match="^wire: message " + match):
        wire.decode(buf(raw), **kw)


@pytest.mark.parametrize("bad,match", [
    ("not a tensor", r"an unknown device: expected a 1-D uint8 tensor, got str"),
    (torch.zeros(64, dtype=torch.int8), r"an unknown device: expected a 1-D uint8 tensor, got torch.int8 tensor of shape \(64,\)"),
    (torch.zeros(2, 64, dtype=torch.uint8), r"got torch.uint8 tensor of shape \(2, 64\)"),
])
def test_decode_refuses_what_is_not_a_message(bad, match):
    with pytest.raises(wire.WireError, match=match):
        wire.decode(bad)


def test_zero_scale_rows_are_valid():
    """An all-zero token quantises to scale 0 (ops.quantize_int8): decode must take it."""
    m = wire.decode(buf(header() + int8_payload(scales=[0.0, 0.5])))
    assert m.scales.tolist() == [[0.0], [0.5]]


def test_hello_fields():
    m = wire.decode(wire.encode_hello(HASH, 3, 2, 40), kind=wire.KIND_HELLO, device=3)
    assert (m.kind, m.transfer, m.device, m.num_tokens, m.width, m.batch_id, m.batch_size, m.compute_s) == (
        0, None, 3, 2, 40, 0, 0, 0.0)
    assert m.model_hash == bytes.fromhex(HASH[:32])


def test_encode_2d_inputs_are_one_token_per_image():
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    m = wire.decode(wire.encode(HASH, 0, 1, tokens=t))
    assert m.num_tokens == 1 and m.width == 3 and m.compute_s == 0.0  # compute_s defaults to 0
    assert torch.equal(m.tokens, t.reshape(2, 1, 3))
    q = torch.tensor([[1, -2, 3], [4, 5, -6]], dtype=torch.int8)
    s = torch.tensor([0.5, 2.0], dtype=torch.float32)
    m = wire.decode(wire.encode(HASH, 0, 1, q=q, scales=s))
    assert m.num_tokens == 1 and m.width == 3
    assert torch.equal(m.q, q.reshape(2, 1, 3)) and torch.equal(m.scales, s.reshape(2, 1))
    m = wire.decode(wire.encode(HASH, 0, 1, q=q, scales=s.double()))  # scales travel as float32 whatever they are
    assert m.scales.dtype == torch.float32 and m.scales.flatten().tolist() == [0.5, 2.0]


@pytest.mark.parametrize("kw,match", [
    (dict(q=torch.zeros(2, 1, 3, dtype=torch.int8), scales=torch.zeros(2, 1), tokens=torch.zeros(2, 3)),
     r"^encode: give either q and scales \(int8\) or tokens \(fp16/fp32\), not both$"),
    (dict(q=torch.zeros(2, 1, 3, dtype=torch.int8), tokens=torch.zeros(2, 3)), r"^encode: give either q and scales"),
    (dict(scales=torch.zeros(2, 1), tokens=torch.zeros(2, 3)), r"^encode: give either q and scales"),
    (dict(tokens=torch.zeros(2, 3, dtype=torch.float64)), r"^encode: tokens must be float16 or float32, got torch.float64$"),
    (dict(tokens=torch.zeros(2, 1, 1, 3)), r"^encode: tokens must be \(B, T, d\), got shape \(2, 1, 1, 3\)$"),
    (dict(q=torch.zeros(2, 1, 3, dtype=torch.int8)), r"^encode: int8 needs both q and scales$"),
    (dict(scales=torch.zeros(2, 1)), r"^encode: int8 needs both q and scales$"),
    (dict(q=torch.zeros(2, 1, 3), scales=torch.zeros(2, 1)), r"^encode: q must be int8, got torch.float32$"),
    (dict(q=torch.zeros(2, 1, 3, dtype=torch.int8), scales=torch.zeros(2, 2)),
     r"^encode: q \(B, T, d\) and scales \(B, T\) expected, got \(2, 1, 3\) and \(2, 2\)$"),
    (dict(q=torch.zeros(2, 1, 1, 3, dtype=torch.int8), scales=torch.zeros(2, 1, 1)),
     r"^encode: q \(B, T, d\) and scales \(B, T\) expected, got \(2, 1, 1, 3\) and \(2, 1, 1\)$"),
    (dict(tokens=torch.zeros(2, 3, 4)), r"^encode: 1 or 2 tokens per image, got 3$"),
])
def test_encode_refuses(kw, match):
    with pytest.raises(ValueError, match=match):
        wire.encode(HASH, 0, 1, **kw)


def test_sizes_and_hash_bytes():
    assert wire.payload_size("int8", 2, 2, 5) == 2 * 2 * 9
    assert wire.payload_size("fp16", 2, 1, 5) == 20 and wire.payload_size("fp32", 2, 1, 5) == 40
    assert wire.message_size("int8", 1, 1, 192) == 64 + 196
    with pytest.raises(ValueError, match=r"^transfer: expected one of .*'int8'.*, got 'bf16'$"):
        wire.payload_size("bf16", 1, 1, 1)
    raw = bytes(range(16))
    assert wire.hash_bytes(raw) == raw  # exactly 16 bytes is enough
    assert wire.hash_bytes(raw + b"xyz") == raw
    assert wire.hash_bytes(HASH) == bytes.fromhex(HASH[:32])
    with pytest.raises(ValueError, match=r"^content_hash: 15 bytes, need at least 16$"):
        wire.hash_bytes(raw[:15])


def test_width_one_and_dequantized_values():
    """d = 1 is a valid width; dequantized() is q * scale per token (T = 2: each token its own scale)."""
    raw = header(T=1, d=1, B=1) + struct.pack("<f", 0.5) + bytes([3])
    m = wire.decode(buf(raw))
    assert m.width == 1 and m.dequantized().tolist() == [[[1.5]]]
    q = torch.tensor([[[1, -2, 3], [4, 0, -1]]], dtype=torch.int8)  # B=1, T=2, d=3
    s = torch.tensor([[0.5, 2.0]])
    m = wire.decode(wire.encode(HASH, 0, 1, q=q, scales=s))
    assert m.dequantized().tolist() == [[[0.5, -1.0, 1.5], [8.0, 0.0, -2.0]]]
