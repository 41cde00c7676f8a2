"""The wire message's byte layout, pinned against the table in devit_ext/wire.py's docstring.

The round-trip tests elsewhere cannot see two header fields swapped in both
`encode` and `decode`; these compare with golden bytes written out by hand
(int.to_bytes / struct of single fields, never the module's header format).
"""
from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
import torch

from devit_ext import wire

HASH_HEX = "00112233445566778899aabbccddeeff" + "f0" * 16  # a sha256 hex; 16 bytes travel
HASH16 = bytes.fromhex("00112233445566778899aabbccddeeff")


def le(n: int, size: int) -> bytes:
    return int(n).to_bytes(size, "little")


def golden_header(kind, tcode, device, T, d, batch_id, B, plen, compute_s, flags=0) -> bytes:
    """The 64-byte header, field by field at the documented offsets."""
    h = bytearray(64)
    h[0:4] = b"DVTW"
    h[4:6] = le(1, 2)  # format version
    h[6] = kind
    h[7] = tcode
    h[8:24] = HASH16
    h[24:26] = le(device, 2)
    h[26:28] = le(T, 2)
    h[28:32] = le(d, 4)
    h[32:40] = le(batch_id, 8)
    h[40:44] = le(B, 4)
    h[44:48] = le(plen, 4)
    h[48:56] = struct.pack("<d", compute_s)
    h[56] = flags  # bit 0: authenticated
    # 57..64 reserved, zero
    return bytes(h)


def as_bytes(t: torch.Tensor) -> bytes:
    return t.numpy().tobytes()


def test_hello_golden_bytes():
    got = as_bytes(wire.encode_hello(HASH_HEX, device=5, num_tokens=2, width=0x0102))
    want = golden_header(0, 0, 5, 2, 0x0102, 0, 0, 0, 0.0)
    assert got == want
    # a few fields spelled out, so a wrong helper above cannot hide a wrong layout
    assert got[:8] == b"DVTW\x01\x00\x00\x00"
    assert got[24:32] == b"\x05\x00\x02\x00\x02\x01\x00\x00"


def test_int8_message_golden_bytes():
    B, T, d = 2, 1, 3
    q = torch.tensor([[[1, -2, 127]], [[-127, 0, 5]]], dtype=torch.int8)
    s = torch.tensor([[0.5], [2.0]], dtype=torch.float32)
    got = as_bytes(wire.encode(HASH_HEX, 3, 0x0A0B0C0D0E, q=q, scales=s, compute_s=1.25))
    plen = B * T * (d + 4)
    head = golden_header(1, 1, 3, T, d, 0x0A0B0C0D0E, B, plen, 1.25)
    payload = struct.pack("<2f", 0.5, 2.0) + bytes([1, 0xFE, 127, 0x81, 0, 5])  # scales first, then q
    assert got == head + payload
    assert len(got) == 64 + 14
    assert got[32:40] == b"\x0e\x0d\x0c\x0b\x0a\x00\x00\x00"  # batch id, little-endian
    assert got[40:48] == b"\x02\x00\x00\x00\x0e\x00\x00\x00"  # B then payload length
    assert got[48:56] == b"\x00\x00\x00\x00\x00\x00\xf4\x3f"  # 1.25 as float64


@pytest.mark.parametrize("dtype,tcode,fmt", [(torch.float16, 2, "<4e"), (torch.float32, 3, "<4f")])
def test_float_message_golden_bytes(dtype, tcode, fmt):
    vals = [1.5, -2.0, 0.25, 3.0]
    tok = torch.tensor(vals, dtype=dtype).reshape(1, 2, 2)  # B=1, T=2 (distillation token), d=2
    got = as_bytes(wire.encode(HASH_HEX, 1, 7, tokens=tok, compute_s=0.0))
    plen = 4 * (2 if dtype == torch.float16 else 4)
    assert got == golden_header(1, tcode, 1, 2, 2, 7, 1, plen, 0.0) + struct.pack(fmt, *vals)


def test_hello_of_a_worker_with_a_secret_golden_bytes():
    got = as_bytes(wire.encode_hello(HASH_HEX, device=1, num_tokens=1, width=8, holds_secret=True))
    assert got == golden_header(0, 0, 1, 1, 8, 0, 0, 0, 0.0, flags=1)
    assert wire.decode(torch.frombuffer(bytearray(got), dtype=torch.uint8), kind=wire.KIND_HELLO).flags == 1


def test_sealed_message_golden_bytes():
    """seal: flag bit 0 at byte 56, then HMAC-SHA256(key, header + payload) appended (32 bytes)."""
    key = bytes(range(32))
    q = torch.tensor([[[1, -2, 127]]], dtype=torch.int8)
    s = torch.tensor([[0.5]], dtype=torch.float32)
    got = as_bytes(wire.seal(wire.encode(HASH_HEX, 2, 9, q=q, scales=s, compute_s=0.0), key))
    body = golden_header(1, 1, 2, 1, 3, 9, 1, 7, 0.0, flags=1) + struct.pack("<f", 0.5) + bytes([1, 0xFE, 127])
    assert got == body + hmac.new(key, body, hashlib.sha256).digest()
    assert len(got) == wire.message_size("int8", 1, 1, 3, authenticated=True) == 64 + 7 + 32
    m = wire.decode(torch.frombuffer(bytearray(got), dtype=torch.uint8), key=key, device=2, batch_id=9)
    assert m.q.tolist() == [[[1, -2, 127]]] and m.flags == 1


def test_decode_reads_fields_at_their_offsets():
    """A hand-built message decodes into the fields the table says (decode is checked on its own)."""
    B, T, d = 1, 2, 2
    payload = struct.pack("<2f", 0.25, 4.0) + bytes([3, 0xFD, 7, 0x80 + 1])
    raw = golden_header(1, 1, 9, T, d, 123456789012, B, len(payload), 0.5) + payload
    m = wire.decode(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    assert (m.kind, m.transfer, m.device, m.num_tokens, m.width, m.batch_id, m.batch_size, m.compute_s) == (
        1, "int8", 9, 2, 2, 123456789012, 1, 0.5)
    assert m.model_hash == HASH16
    assert m.scales.tolist() == [[0.25, 4.0]]
    assert m.q.tolist() == [[[3, -3], [7, -127]]]
    hello = wire.decode(torch.frombuffer(bytearray(golden_header(0, 0, 4, 1, 40, 0, 0, 0, 0.0)), dtype=torch.uint8))
    assert (hello.kind, hello.transfer, hello.device, hello.num_tokens, hello.width) == (0, None, 4, 1, 40)


def test_reserved_bytes_and_constants():
    assert wire.HEADER_SIZE == 64 and wire.MAGIC == b"DVTW" and wire.VERSION == 1
    assert wire.TRANSFERS == {"int8": 1, "fp16": 2, "fp32": 3}
    assert (wire.KIND_HELLO, wire.KIND_TOKENS) == (0, 1)
    got = as_bytes(wire.encode(HASH_HEX, 65535, 2**63 - 1, tokens=torch.ones(1, 1, dtype=torch.float32), compute_s=2.0))
    assert got[56:64] == bytes(8)  # flags 0 (unauthenticated) and the reserved bytes
    assert got[24:26] == b"\xff\xff" and got[32:40] == b"\xff" * 7 + b"\x7f"


def test_hello_declaring_an_idle_bound_golden_bytes():
    """A worker that takes keep-alives puts its idle bound (--timeout) in the compute-seconds field."""
    got = as_bytes(wire.encode_hello(HASH_HEX, device=2, num_tokens=1, width=8, idle_bound_s=2.5))
    assert got == golden_header(0, 0, 2, 1, 8, 0, 0, 0, 2.5)
    assert got[48:56] == b"\x00\x00\x00\x00\x00\x00\x04\x40"  # 2.5 as float64
    h = wire.decode(torch.frombuffer(bytearray(got), dtype=torch.uint8), kind=wire.KIND_HELLO)
    assert h.idle_bound_s == 2.5
    old = wire.decode(torch.frombuffer(bytearray(golden_header(0, 0, 2, 1, 8, 0, 0, 0, 0.0)), dtype=torch.uint8))
    assert old.idle_bound_s == 0.0  # a worker before keep-alives: the aggregator sends it none
    for bad in (float("nan"), float("inf"), -1.0):
        raw = golden_header(0, 0, 2, 1, 8, 0, 0, 0, bad)
        with pytest.raises(wire.WireError, match="invalid idle bound"):
            wire.decode(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


def test_keepalive_control_golden_bytes():
    """12 int64 little-endian: magic "DeViT01", kind 6, sequence number, interval in ms, six zeros, then
    (authenticated) HMAC-SHA256(key, b"devit-ext/v1/ctrl" + bytes 0..79) truncated to 16 bytes."""
    from devit_ext.engines import _proto

    key = bytes(range(32))
    fields = le(0x44655669543031, 8) + le(6, 8) + le(7, 8) + le(250, 8) + bytes(48)
    assert fields[:8] == b"10TiVeD\x00"
    plain = as_bytes(_proto.ctrl_bytes(_proto.keepalive_ctrl(7, 0.25, None)))
    assert plain == fields + bytes(16)
    tagged = as_bytes(_proto.ctrl_bytes(_proto.keepalive_ctrl(7, 0.25, key)))
    assert tagged == fields + hmac.new(key, b"devit-ext/v1/ctrl" + fields, hashlib.sha256).digest()[:16]
    c = _proto.keepalive_ctrl(7, 0.25, key).tolist()
    assert _proto.keepalive_error(c, key, 6) is None
    assert "replayed" in _proto.keepalive_error(c, key, 7)
    assert "tag does not match" in _proto.keepalive_error(c, bytes(32), 6)
