"""Shared-secret authentication of the distributed engine's devices (docs/security.md).

The aggregator and its workers share a secret (`secret=` / `DEVIT_SECRET` /
`--secret-file`; generated per group for `spawn=True`). Per device, after the
hello, a challenge-response (HMAC-SHA256 over both sides' fresh nonces, the
model's content hash and the rank) proves the secret in both directions and
derives a per-device session key; every token message then carries an
HMAC-SHA256 tag under that key over its header (whose batch id is the
message's sequence number) and payload (`wire.seal` / `wire.decode(key=...)`),
and every batch control message a tag over its fields and the images' digest.
Tags are compared with `hmac.compare_digest`.

Nothing is encrypted: tokens and images are readable on the wire.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import socket

TAG_BYTES = 32  # HMAC-SHA256
NONCE_BYTES = 32
CTRL_TAG_BYTES = 16  # a control message has room for 128 bits (HMAC-SHA256 truncated)
MIN_SECRET_BYTES = 16
ENV = "DEVIT_SECRET"
_MAKE_ONE = "make one with: python -c 'import secrets; print(secrets.token_hex(32))'"


class SecretError(ValueError):
    """A secret that is missing where it is required, unreadable or too short."""


def new_secret() -> str:
    """A fresh secret for one group of spawned workers (64 hex characters, 256 bits)."""
    return secrets.token_hex(32)


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def as_secret(value, what: str = "secret") -> bytes:
    """str (its UTF-8 bytes) or bytes -> the secret's bytes, at least MIN_SECRET_BYTES long."""
    if isinstance(value, str):
        value = os.fsencode(value)  # UTF-8; an environment variable's undecodable bytes round-trip
    if not isinstance(value, (bytes, bytearray)):
        raise TypeError(f"{what}: expected a str or bytes secret, got {type(value).__name__}")
    if len(value) < MIN_SECRET_BYTES:
        raise SecretError(f"{what}: a secret of {len(value)} bytes is too short (at least {MIN_SECRET_BYTES}); {_MAKE_ONE}")
    return bytes(value)


def read_secret_file(path: str) -> bytes:
    """The secret in a file: its bytes without a trailing newline."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 16)
    except OSError as e:
        raise SecretError(f"--secret-file: cannot read {path!r} ({e.strerror or e})") from None
    return as_secret(data.rstrip(b"\r\n"), f"--secret-file {path}")


def secret_from_env(environ=os.environ) -> bytes | None:
    v = environ.get(ENV)
    return None if v in (None, "") else as_secret(v, f"${ENV}")


def tag(key: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 of the concatenated parts under `key`."""
    h = hmac.new(key, digestmod=hashlib.sha256)
    for p in parts:
        h.update(p)
    return h.digest()


def verify(key: bytes, got: bytes, *parts: bytes) -> bool:
    """Whether `got` is the tag (or its first len(got) bytes, at least 16) of `parts`: constant-time."""
    if len(got) < CTRL_TAG_BYTES:
        return False
    return hmac.compare_digest(tag(key, *parts)[: len(got)], bytes(got))


def _context(label: bytes, nonce_a: bytes, nonce_w: bytes, model_hash16: bytes, rank: int) -> list[bytes]:
    # a label per purpose, so that no proof can be replayed as another (or as the session key)
    return [b"devit-ext/v1/" + label, nonce_a, nonce_w, model_hash16, int(rank).to_bytes(4, "little")]


def worker_context(nonce_a: bytes, nonce_w: bytes, model_hash16: bytes, rank: int) -> list[bytes]:
    """What the worker's proof is the tag of (for verify)."""
    return _context(b"worker", nonce_a, nonce_w, model_hash16, rank)


def worker_proof(secret: bytes, nonce_a: bytes, nonce_w: bytes, model_hash16: bytes, rank: int) -> bytes:
    """The worker's answer to the aggregator's nonce."""
    return tag(secret, *worker_context(nonce_a, nonce_w, model_hash16, rank))


def aggregator_context(nonce_a: bytes, nonce_w: bytes, model_hash16: bytes, rank: int) -> list[bytes]:
    return _context(b"aggregator", nonce_a, nonce_w, model_hash16, rank)


def aggregator_proof(secret: bytes, nonce_a: bytes, nonce_w: bytes, model_hash16: bytes, rank: int) -> bytes:
    """The aggregator's answer to the worker's nonce."""
    return tag(secret, *aggregator_context(nonce_a, nonce_w, model_hash16, rank))


def session_key(secret: bytes, nonce_a: bytes, nonce_w: bytes, model_hash16: bytes, rank: int) -> bytes:
    """The per-device key of one group: a message of another device or another group fails its tag."""
    return tag(secret, *_context(b"session", nonce_a, nonce_w, model_hash16, rank))


CTRL_LABEL = b"devit-ext/v1/ctrl"


def ctrl_tag(key: bytes, fields: bytes, image_digest: bytes) -> bytes:
    """The 16-byte tag of a batch control message: its fields and the sha256 of the images it announces
    (check it with verify(key, got, CTRL_LABEL, fields, image_digest))."""
    return tag(key, CTRL_LABEL, fields, image_digest)[:CTRL_TAG_BYTES]


def image_digest(data) -> bytes:
    """sha256 of the images' bytes (a buffer: numpy array, bytes, memoryview)."""
    return hashlib.sha256(memoryview(data).cast("B")).digest()


def _addresses(host: str) -> list[str]:
    try:
        return [ipaddress.ip_address(host).compressed]
    except ValueError:
        pass
    try:
        return sorted({ai[4][0] for ai in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)})
    except OSError:
        return []


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback one (127.0.0.0/8, ::1); an unknown name is not."""
    addrs = _addresses(host)
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def check_secure(host: str, secret, insecure: bool, *, secret_hint: str, insecure_hint: str) -> None:
    """Refuse an unauthenticated run on a non-loopback address unless the user asked for one."""
    if secret is None and not insecure and not is_loopback(host):
        raise SecretError(
            f"{host!r} is not a loopback address and no secret is set, so anyone who can reach it could join "
            f"and change the answers: give a shared secret ({secret_hint}; {_MAKE_ONE}), or pass "
            f"{insecure_hint} to run unauthenticated on a trusted network")
