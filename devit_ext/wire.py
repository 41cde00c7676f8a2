"""The bytes of a token message between processes: one flat uint8 tensor per (device, micro-batch).

What a message holds and how it is made and fused is `devit_ext.protocol`'s
(`TokenMessage`); this module lays it out as bytes and checks them on arrival.

Layout (little-endian), a fixed 64-byte header then the payload::

    offset size  field
    0      4     magic b"DVTW"
    4      2     format version (VERSION)
    6      1     kind: 0 hello (no payload), 1 tokens
    7      1     transfer code: 1 int8, 2 fp16, 3 fp32 (0 in a hello)
    8      16    model content hash: first 16 bytes of the sha256 (DeViT.content_hash())
    24     2     device index (device i is rank i + 1)
    26     2     tokens per image (1, or 2 with a distillation token)
    28     4     width d of the token
    32     8     batch id
    40     4     batch size B
    44     4     payload length in bytes
    48     8     compute seconds on the device (float64; informative); in a
                 hello: the worker's idle bound in seconds (its --timeout: it
                 takes keep-alives and ends a wait that hears nothing for that
                 long), 0 from a worker that takes none (engines/_proto.py)
    56     1     flags: bit 0 FLAG_AUTH (tokens: a tag follows the payload;
                 hello: the worker holds a secret and answers a challenge)
    57     7     reserved, zero (decode refuses anything else, and other flag bits)

    payload, int8:  scales float32 (B, T) then q int8 (B, T, d)  -> B*T*(d + 4) bytes
    payload, fp16:  tokens float16 (B, T, d)                     -> B*T*2d bytes
    payload, fp32:  tokens float32 (B, T, d)                     -> B*T*4d bytes
    tag (FLAG_AUTH): HMAC-SHA256 under the device's session key of the
                    header and the payload                       -> 32 bytes

The payload length field excludes the tag. The batch id is the message's
sequence number: it is under the tag, and the aggregator accepts only the id
it expects next, so a replayed message is refused like a forged one
(`seal` adds the tag, `decode(key=...)` checks it first; see devit_ext.auth).
A message without FLAG_AUTH is byte for byte the format before flags existed.

Scales come first so that the float32 view of the payload is 4-byte aligned
whatever d is. `decode` validates everything it can (including the values: scales finite and
within what quantize_int8 can make, q in [-127, 127], fp16/fp32 tokens finite,
a finite compute time) and raises `WireError`
naming the device the message came from (the one the caller expected, since a
corrupt header cannot be trusted to say).
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch

from . import auth
from .protocol import FLOAT_TRANSFER_DTYPES, TRANSFERS as _TRANSFER_NAMES, TokenMessage, message_bytes

MAGIC = b"DVTW"
VERSION = 1
HEADER_SIZE = 64
HASH_BYTES = 16

KIND_HELLO = 0
KIND_TOKENS = 1
_KINDS = {KIND_HELLO: "hello", KIND_TOKENS: "tokens"}

TRANSFERS = {name: code for code, name in enumerate(_TRANSFER_NAMES, 1)}  # int8 1, fp16 2, fp32 3
TRANSFER_NAMES = {v: k for k, v in TRANSFERS.items()}

_HEADER = struct.Struct("<4sHBB16sHHIqIIdB7x")  # B: flags; 7x: the reserved bytes (packed as zeros)
assert _HEADER.size == HEADER_SIZE

FLAGS_OFFSET = 56
FLAG_AUTH = 1
TAG_BYTES = auth.TAG_BYTES
_RESERVED = 7
# The largest scale a sender can make: max|row| <= the largest fp32, divided by 127. A larger
# one overflows to Inf when multiplied by q (up to 127) on the aggregator.
# (the fp32 division, as quantize_int8 does it)
MAX_SCALE = float(torch.tensor(torch.finfo(torch.float32).max) / 127.0)


class WireError(ValueError):
    """A message that is malformed, truncated, from another model, or of the wrong shape."""


@dataclass
class Message:
    kind: int
    transfer: str | None  # "int8" | "fp16" | "fp32"; None for a hello
    model_hash: bytes
    device: int
    num_tokens: int
    width: int
    batch_id: int
    batch_size: int
    compute_s: float  # a hello: the worker's idle bound (idle_bound_s)
    flags: int = 0
    q: torch.Tensor | None = None  # int8 (B, T, d)
    scales: torch.Tensor | None = None  # float32 (B, T)
    tokens: torch.Tensor | None = None  # float16/float32 (B, T, d)

    @property
    def idle_bound_s(self) -> float:
        """A hello's idle bound: > 0 when the worker takes keep-alives (see encode_hello)."""
        return self.compute_s if self.kind == KIND_HELLO else 0.0

    def token_message(self) -> TokenMessage:
        """The tokens as a `protocol.TokenMessage` (views into the received buffer)."""
        return TokenMessage(self.transfer, q=self.q, scales=self.scales, tokens=self.tokens)

    def dequantized(self) -> torch.Tensor:
        """Tokens as float32 (B, T, d) whatever the transfer."""
        return self.token_message().dequantized()


def hash_bytes(content_hash: str | bytes) -> bytes:
    """The 16 bytes of a model's content hash that travel in every header."""
    if isinstance(content_hash, bytes):
        if len(content_hash) < HASH_BYTES:
            raise ValueError(f"content_hash: {len(content_hash)} bytes, need at least {HASH_BYTES}")
        return content_hash[:HASH_BYTES]
    return bytes.fromhex(content_hash[: 2 * HASH_BYTES])


def payload_size(transfer: str, batch_size: int, num_tokens: int, width: int) -> int:
    return int(batch_size) * message_bytes(width, transfer, num_tokens)


def message_size(transfer: str, batch_size: int, num_tokens: int, width: int, authenticated: bool = False) -> int:
    """Total bytes of a tokens message (with its tag when authenticated)."""
    return HEADER_SIZE + payload_size(transfer, batch_size, num_tokens, width) + (TAG_BYTES if authenticated else 0)


def _header(kind, transfer_code, model_hash, device, num_tokens, width, batch_id, batch_size, payload_len, compute_s,
            flags=0) -> torch.Tensor:
    raw = _HEADER.pack(
        MAGIC, VERSION, kind, transfer_code, hash_bytes(model_hash), device, num_tokens, width,
        batch_id, batch_size, payload_len, float(compute_s), flags,
    )
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def encode_hello(model_hash: str | bytes, device: int, num_tokens: int, width: int, holds_secret: bool = False,
                 idle_bound_s: float = 0.0) -> torch.Tensor:
    """The fixed-size first message of a worker: which model it runs, what it will send,
    (FLAG_AUTH) whether it holds a secret and waits for the aggregator's challenge, and (in the
    compute-seconds field) its idle bound: > 0 asks for keep-alives, 0 (a worker before them) not."""
    if not (math.isfinite(idle_bound_s) and idle_bound_s >= 0):
        raise ValueError(f"idle_bound_s: expected a finite number of seconds >= 0, got {idle_bound_s!r}")
    return _header(KIND_HELLO, 0, model_hash, device, num_tokens, width, 0, 0, 0, idle_bound_s,
                   FLAG_AUTH if holds_secret else 0)


def seal(message: torch.Tensor, key: bytes) -> torch.Tensor:
    """A tokens message -> the same with FLAG_AUTH set and its HMAC-SHA256 tag under `key` appended."""
    raw = bytearray(message.detach().cpu().contiguous().numpy().tobytes())
    if len(raw) < HEADER_SIZE or raw[6] != KIND_TOKENS or raw[FLAGS_OFFSET] != 0:
        raise ValueError("seal: expected an untagged tokens message (wire.encode)")
    raw[FLAGS_OFFSET] = FLAG_AUTH
    raw += auth.tag(key, bytes(raw))
    return torch.frombuffer(raw, dtype=torch.uint8)


def encode(
    model_hash: str | bytes,
    device: int,
    batch_id: int,
    *,
    q: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
    tokens: torch.Tensor | None = None,
    compute_s: float = 0.0,
) -> torch.Tensor:
    """Tokens of one micro-batch -> one uint8 tensor (CPU).

    int8: q int8 (B, T, d) and scales float32 (B, T); otherwise tokens float16 or
    float32 (B, T, d). (B, d) / (B,) are taken as T = 1.
    """
    if tokens is not None:
        if q is not None or scales is not None:
            raise ValueError("encode: give either q and scales (int8) or tokens (fp16/fp32), not both")
        if tokens.dtype not in (torch.float16, torch.float32):
            raise ValueError(f"encode: tokens must be float16 or float32, got {tokens.dtype}")
        if tokens.dim() == 2:
            tokens = tokens.unsqueeze(1)
        if tokens.dim() != 3:
            raise ValueError(f"encode: tokens must be (B, T, d), got shape {tuple(tokens.shape)}")
        transfer = "fp16" if tokens.dtype == torch.float16 else "fp32"
        B, T, d = tokens.shape
        payload = [tokens.detach().cpu().contiguous().view(-1).view(torch.uint8)]
    else:
        if q is None or scales is None:
            raise ValueError("encode: int8 needs both q and scales")
        if q.dtype != torch.int8:
            raise ValueError(f"encode: q must be int8, got {q.dtype}")
        if q.dim() == 2:
            q, scales = q.unsqueeze(1), scales.reshape(-1, 1)
        if q.dim() != 3 or tuple(scales.shape) != tuple(q.shape[:2]):
            raise ValueError(f"encode: q (B, T, d) and scales (B, T) expected, got {tuple(q.shape)} and {tuple(scales.shape)}")
        transfer = "int8"
        B, T, d = q.shape
        payload = [
            scales.detach().to(torch.float32).cpu().contiguous().view(-1).view(torch.uint8),
            q.detach().cpu().contiguous().view(-1).view(torch.uint8),
        ]
    if T not in (1, 2):
        raise ValueError(f"encode: 1 or 2 tokens per image, got {T}")
    plen = payload_size(transfer, B, T, d)
    head = _header(KIND_TOKENS, TRANSFERS[transfer], model_hash, device, T, d, batch_id, B, plen, compute_s)
    return torch.cat([head, *payload])


def _fail(src: str, what: str):
    raise WireError(f"wire: message from {src}: {what}")


def decode(
    buf: torch.Tensor,
    *,
    expected_hash: str | bytes | None = None,
    device: int | None = None,
    batch_id: int | None = None,
    batch_size: int | None = None,
    num_tokens: int | None = None,
    width: int | None = None,
    transfer: str | None = None,
    kind: int | None = None,
    key: bytes | None = None,
) -> Message:
    """uint8 tensor -> Message, checking every field against what the caller expects.

    Every keyword left as None is not checked. key: the device's session key:
    a tokens message must then carry FLAG_AUTH and a matching tag (checked
    before any other field is believed); without a key a tagged tokens message
    is refused. Token tensors are views into `buf` (no copy).
    """
    src = f"device {device}" if device is not None else "an unknown device"
    if not isinstance(buf, torch.Tensor) or buf.dtype != torch.uint8 or buf.dim() != 1:
        desc = f"{buf.dtype} tensor of shape {tuple(buf.shape)}" if isinstance(buf, torch.Tensor) else type(buf).__name__
        _fail(src, f"expected a 1-D uint8 tensor, got {desc}")
    buf = buf.detach().cpu().contiguous()
    n = buf.numel()
    if n < HEADER_SIZE:
        _fail(src, f"truncated: {n} bytes, shorter than the {HEADER_SIZE}-byte header")
    raw = buf[:HEADER_SIZE].numpy().tobytes()
    (magic, version, k, tcode, mhash, dev, T, d, bid, B, plen, compute_s, flags) = _HEADER.unpack(raw)
    reserved = raw[HEADER_SIZE - _RESERVED :]
    if magic != MAGIC:
        _fail(src, f"bad magic {magic!r} (expected {MAGIC!r}): not a devit message, or a corrupt one")
    if device is None:
        src = f"device {dev}"
    if version != VERSION:
        _fail(src, f"format version {version}, this side speaks version {VERSION}: update devit_ext on both sides")
    if reserved != bytes(_RESERVED):
        _fail(src, f"reserved header bytes 57..63 are {reserved.hex()}, expected zeros (a corrupt or foreign message)")
    if flags & ~FLAG_AUTH:
        _fail(src, f"unknown header flags {flags:#04x} (only bit 0, authenticated, exists)")
    if k not in _KINDS:
        _fail(src, f"unknown message kind {k}")
    tagged = k == KIND_TOKENS and bool(flags & FLAG_AUTH)
    if k == KIND_TOKENS and key is not None:
        if not tagged:
            _fail(src, "unauthenticated message (no HMAC tag) in an authenticated group: refused")
        if n < HEADER_SIZE + TAG_BYTES or not auth.verify(key, buf[n - TAG_BYTES :].numpy().tobytes(),
                                                           buf[: n - TAG_BYTES].numpy().tobytes()):
            _fail(src, "authentication failed: the HMAC tag does not match the header and payload "
                       "(a forged or altered message, or one from another session)")
        n -= TAG_BYTES
    elif tagged:
        _fail(src, "an authenticated message (HMAC tag), but this side holds no key for it")
    if kind is not None and k != kind:
        _fail(src, f"expected a {_KINDS[kind]} message, got a {_KINDS[k]} message")
    if device is not None and dev != device:
        _fail(src, f"header says device {dev}, but it arrived from device {device} (rank {device + 1})")
    if expected_hash is not None and mhash != hash_bytes(expected_hash):
        _fail(
            src,
            f"it runs a different model (content hash {mhash.hex()}, the aggregator's model has "
            f"{hash_bytes(expected_hash).hex()}): start the worker with the same saved model",
        )
    if T not in (1, 2):
        _fail(src, f"{T} tokens per image (expected 1 or 2)")
    if num_tokens is not None and T != num_tokens:
        _fail(src, f"{T} tokens per image, the model's device {dev} sends {num_tokens}")
    if width is not None and d != width:
        _fail(src, f"token width {d}, the model's device {dev} has width {width}")
    if k == KIND_HELLO:
        if n != HEADER_SIZE or plen != 0:
            _fail(src, f"a hello message has no payload, got {n - HEADER_SIZE} bytes (header says {plen})")
        if not (math.isfinite(compute_s) and compute_s >= 0):
            _fail(src, f"invalid idle bound {compute_s} in the hello (expected a finite number of seconds >= 0)")
        return Message(k, None, mhash, dev, T, d, bid, B, compute_s, flags)
    if tcode not in TRANSFER_NAMES:
        _fail(src, f"unknown transfer code {tcode}")
    tname = TRANSFER_NAMES[tcode]
    if transfer is not None and tname != transfer:
        _fail(src, f"transfer {tname}, expected {transfer}")
    if batch_id is not None and bid != batch_id:
        _fail(src, f"batch id {bid}, expected {batch_id} (replayed, out of order or stale)")
    if batch_size is not None and B != batch_size:
        _fail(src, f"batch size {B}, expected {batch_size}")
    if d <= 0 or B <= 0:
        _fail(src, f"empty shape (B={B}, T={T}, d={d})")
    want = payload_size(tname, B, T, d)
    if plen != want:
        _fail(src, f"header declares a {plen}-byte payload, but B={B}, T={T}, d={d}, {tname} needs {want}")
    if n != HEADER_SIZE + want:
        what = "truncated" if n < HEADER_SIZE + want else "too long"
        _fail(src, f"{what}: {n} bytes, expected {HEADER_SIZE + want} (B={B}, T={T}, d={d}, {tname})")
    if not (math.isfinite(compute_s) and compute_s >= 0):
        _fail(src, f"invalid compute time {compute_s} (expected a finite number of seconds >= 0)")
    body = buf[HEADER_SIZE:n]
    msg = Message(k, tname, mhash, dev, T, d, bid, B, compute_s, flags)
    if tname == "int8":
        s = body[: 4 * B * T].view(torch.float32).view(B, T)
        # one comparison catches NaN too (NaN is not within the range)
        if not bool(((s >= 0) & (s <= MAX_SCALE)).all()):
            bad = s[~((s >= 0) & (s <= MAX_SCALE))]
            _fail(src, f"scales are negative, NaN, infinite or above {MAX_SCALE:.3g} ({bad.numel()} of them, "
                       f"first {float(bad[0])!r}): not made by quantize_int8")
        q = body[4 * B * T :].view(torch.int8).view(B, T, d)
        if bool((q == -128).any()):
            _fail(src, f"{int((q == -128).sum())} int8 value(s) are -128, outside the symmetric range [-127, 127]")
        msg.scales, msg.q = s, q
    else:
        t = body.view(FLOAT_TRANSFER_DTYPES[tname]).view(B, T, d)
        if not bool(torch.isfinite(t).all()):
            _fail(src, f"{int((~torch.isfinite(t)).sum())} {tname} token value(s) are NaN or infinite")
        msg.tokens = t
    return msg
