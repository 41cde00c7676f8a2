"""Authenticated devices (docs/security.md): the aggregator against hostile workers, in one process.

A fake worker runs in a thread of this process: it joins the group exactly as
`devit-ext worker` does (the same store, rank claim and Gloo group from
`engines._proto`) and then speaks the protocol by hand: without the secret,
with another secret, or with the secret but sending an altered or a replayed
token message. `D.run` is the real aggregator. No process is started, so these
are quick; every wait is bounded and a watchdog ends a hung test.
"""
from __future__ import annotations

import contextlib
import faulthandler
import os
import socket
import threading

import pytest
import torch

from devit_ext import auth, wire
from devit_ext.engines import _proto
from devit_ext.engines import distributed as D
from devit_ext.model import DeViT, FusionHead, SubViT

TEST_BOUND_S = 120
SECRET = b"0123456789abcdef-shared-secret"
WIDTH = 16


@contextlib.contextmanager
def bounded(monkeypatch, seconds: float, shutdown: bool = True):
    """No secret from the caller's environment; a hung test dumps its stacks and exits after `seconds`."""
    monkeypatch.delenv(auth.ENV, raising=False)
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        if shutdown:
            D.shutdown()


@pytest.fixture(autouse=True)
def _bounded(monkeypatch):
    with bounded(monkeypatch, TEST_BOUND_S):
        yield


def one_device_model(devices: int = 1) -> DeViT:
    torch.manual_seed(0)
    groups = [list(range(i, 3, devices)) for i in range(devices)]
    subs = [SubViT(dict(img_size=[16, 16], patch_size=[8, 8], in_chans=3, embed_dim=WIDTH, head_dim=8,
                        blocks=[dict(num_heads=2, mlp_hidden=32)], num_classes=len(g), distilled=False,
                        num_prefix_tokens=1, no_embed_class=False, layer_scale=False, qkv_bias=True, patch_bias=True,
                        pre_norm=False, norm_eps=1e-6, mean=[0.5] * 3, std=[0.25] * 3)) for g in groups]
    meta = dict(img_size=[16, 16], in_chans=3, mean=[0.5] * 3, std=[0.25] * 3, patch_size=[8, 8])
    return DeViT(subs, groups, FusionHead([WIDTH] * devices, 24, 3), meta).eval()


def images(n=4):
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recv_ctrl(pg):
    c = torch.zeros(_proto.CTRL_LEN, dtype=torch.int64)
    pg.recv([c], 0, _proto.TAG_CTRL).wait(_proto.td(30))
    return c.tolist()


def tokens_message(mhash, batch_id, n, key):
    q = torch.zeros(n, 1, WIDTH, dtype=torch.int8)
    return wire.seal(wire.encode(mhash, 0, batch_id, q=q, scales=torch.zeros(n, 1)), key)


class FakeWorker(threading.Thread):
    """Rank 1 of a world of 2, speaking the protocol by hand; `mode` says how it misbehaves."""

    def __init__(self, port, mhash, mode, secret=SECRET):
        super().__init__(daemon=True)
        self.port, self.mhash, self.mode, self.secret = port, mhash, mode, secret
        self.seen: list = []  # control messages received
        self.error = None

    def run(self):
        try:
            self._run()
        except BaseException as e:  # noqa: BLE001 - the test reads it
            self.error = e

    def _run(self):
        _, store = _proto.make_store("127.0.0.1", self.port, 2, False, 30.0)
        assert _proto.claim_rank(store, 1) is None
        pg = _proto.make_group(store, 1, 2, 30.0, "gloo", "127.0.0.1")
        holds = self.mode != "no_secret"
        pg.send([wire.encode_hello(self.mhash, 0, 1, WIDTH, holds_secret=holds)], 0, _proto.TAG_HELLO).wait()
        c = recv_ctrl(pg)
        self.seen.append(c)
        if c[1] != _proto.CTRL_AUTH:
            return
        h16, nonce_a, nonce_w = wire.hash_bytes(self.mhash), _proto.ctrl_value(c), auth.new_nonce()
        proof = auth.worker_proof(self.secret, nonce_a, nonce_w, h16, 1)
        pg.send([torch.frombuffer(bytearray(nonce_w + proof), dtype=torch.uint8)], 0, _proto.TAG_AUTH).wait()
        c = recv_ctrl(pg)
        self.seen.append(c)
        if c[1] != _proto.CTRL_AUTH_OK:
            return
        key = auth.session_key(self.secret, nonce_a, nonce_w, h16, 1)
        first = None
        while True:
            c = recv_ctrl(pg)
            self.seen.append(c)
            if c[1] != _proto.CTRL_BATCH:
                return
            x = torch.empty(tuple(c[3:7]), dtype=torch.uint8)
            pg.recv([x], 0, _proto.TAG_IMAGES).wait(_proto.td(30))
            assert _proto.batch_ctrl_ok(c, key, auth.image_digest(x.numpy()))  # the aggregator's tag holds
            msg = tokens_message(self.mhash, c[2], c[3], key)
            if self.mode == "forge":
                msg[wire.HEADER_SIZE + 4 * c[3] + 1] = 5  # one q byte of the payload, after sealing
            if self.mode == "replay":
                first = msg if first is None else first
                msg = first  # batch 1's message, validly tagged, again for batch 2
            pg.send([msg], 0, _proto.TAG_TOKENS).wait(_proto.td(30))
            self.keep = (msg, x)


def run_against(mode, *, secret=SECRET, worker_secret=SECRET, **kw):
    m = one_device_model()
    port = free_port()
    fake = FakeWorker(port, m.content_hash(), mode, worker_secret)
    fake.start()
    try:
        return fake, D.run(m, images(), init_method=f"tcp://127.0.0.1:{port}", world_size=2, timeout=10.0,
                           rendezvous_timeout=60, secret=secret, **kw)
    finally:
        D.shutdown(f"tcp://127.0.0.1:{port}")
        fake.join(30)


# ---------------------------------------------------------------------------
# the hello: no secret, another secret, a secret the aggregator does not have
# ---------------------------------------------------------------------------


def test_worker_without_a_secret_is_refused_in_the_hello():
    with pytest.raises(D.WorkerRefused, match=r"device 0 \(rank 1\): the worker holds no secret") as e:
        run_against("no_secret")
    assert e.value.devices == [0]


def test_worker_with_another_secret_is_refused_in_the_hello():
    fake = None
    with pytest.raises(D.WorkerRefused, match=r"device 0 \(rank 1\): its secret is not the aggregator's") as e:
        fake, _ = run_against("wrong", worker_secret=b"another-secret-of-20-bytes")
    assert e.value.devices == [0]


def test_refusal_reaches_the_worker():
    m = one_device_model()
    port = free_port()
    fake = FakeWorker(port, m.content_hash(), "wrong", b"another-secret-of-20-bytes")
    fake.start()
    with pytest.raises(D.WorkerRefused):
        D.run(m, images(), init_method=f"tcp://127.0.0.1:{port}", world_size=2, timeout=10.0, secret=SECRET)
    fake.join(30)
    assert fake.error is None, fake.error
    assert [c[1] for c in fake.seen] == [_proto.CTRL_AUTH, _proto.CTRL_REFUSE]
    assert fake.seen[-1][2] == _proto.REFUSE_WRONG_SECRET


def test_worker_with_a_secret_the_aggregator_lacks_is_refused():
    with pytest.raises(D.WorkerRefused, match=r"device 0 \(rank 1\): the worker holds a secret but the aggregator"):
        run_against("wrong", secret=None)


# ---------------------------------------------------------------------------
# token messages: forged, replayed; and the honest case
# ---------------------------------------------------------------------------


def test_altered_message_is_refused_naming_the_device():
    with pytest.raises(D.DeviceError, match=r"device 0 \(rank 1\).*authentication failed: the HMAC tag") as e:
        run_against("forge")
    assert e.value.devices == [0]


def test_replayed_message_is_refused_naming_the_device():
    with pytest.raises(D.DeviceError, match=r"micro-batch 1 failed: device 0 \(rank 1\).*batch id 1, expected 2 "
                                            r"\(replayed") as e:
        run_against("replay", batch_size=2)
    assert e.value.devices == [0]


def test_honest_worker_is_served():
    fake, (out, st) = run_against("honest", batch_size=2, return_stats=True)
    assert fake.error is None, fake.error
    assert out.shape == (4, 3) and st.extra["authenticated"] and st.extra["tag_bytes_per_message"] == 32
    assert [c[1] for c in fake.seen[:4]] == [_proto.CTRL_AUTH, _proto.CTRL_AUTH_OK, _proto.CTRL_BATCH, _proto.CTRL_BATCH]


# ---------------------------------------------------------------------------
# where the sockets listen; no secret on a non-loopback address
# ---------------------------------------------------------------------------


def _own_socket_inodes() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(link[8:-1])
    return out


def listening() -> set[tuple[str, int]]:
    """(address hex, port) of this process's listening TCP sockets, from /proc/net/tcp{,6}."""
    mine, out = _own_socket_inodes(), set()
    for name in ("tcp", "tcp6"):
        try:
            lines = open(f"/proc/net/{name}").read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A" and f[9] in mine:  # LISTEN
                addr, port = f[1].split(":")
                out.add((addr, int(port, 16)))
    return out


LOOPBACK_HEX = {"0100007F", "00000000000000000000000001000000"}


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads /proc/net/tcp")
def test_store_and_gloo_listen_on_loopback_only():
    server = _proto.host_store("127.0.0.1", 0, 2, 5.0)
    try:
        socks = {a for a, p in listening() if p == server.port}
        assert socks == {"0100007F"}, socks  # 127.0.0.1, not 0.0.0.0 / ::
    finally:
        del server
    # the whole group: the rendezvous and Gloo's own listeners opened by a run are all on loopback
    before = listening()
    m = one_device_model()
    port = free_port()
    fake = FakeWorker(port, m.content_hash(), "honest")
    fake.start()
    try:
        D.run(m, images(), init_method=f"tcp://127.0.0.1:{port}", world_size=2, timeout=10.0, secret=SECRET)
        new = listening() - before
        assert any(p == port for _, p in new), new
        assert {a for a, _ in new} <= LOOPBACK_HEX, new
    finally:
        D.shutdown(f"tcp://127.0.0.1:{port}")
        fake.join(30)


def _non_loopback_address() -> str | None:
    for probe in ("192.0.2.1", "10.255.255.1", "8.8.8.8"):
        try:
            a = _proto.local_address(probe)
        except OSError:
            continue
        if not auth.is_loopback(a):
            return a
    return None


def test_store_is_not_reachable_on_another_interface():
    server = _proto.host_store("127.0.0.1", 0, 2, 5.0)
    try:
        assert _proto.bind_address("127.0.0.1") == (socket.AF_INET, ("127.0.0.1", 0))
        assert _proto.bind_address("localhost")[1][0] == "127.0.0.1"
        other = _non_loopback_address()
        if other is None:
            pytest.skip("this machine has only loopback: the bind address above is what is checked")
        with pytest.raises(OSError):
            socket.create_connection((other, server.port), timeout=2).close()
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
    finally:
        del server


def test_non_loopback_without_a_secret_refused_unless_insecure():
    m = one_device_model()
    init = "tcp://203.0.113.7:29999"  # TEST-NET-3: not this machine's, so nothing can bind it
    with pytest.raises(auth.SecretError, match=r"not a loopback address and no secret.*insecure=True"):
        D.run(m, images(), init_method=init, world_size=2, timeout=1.0)
    # insecure=True gets past the check (and then fails to host the rendezvous on an address not ours)
    with pytest.raises(D.DistributedError, match="cannot host the rendezvous at 203.0.113.7"):
        D.run(m, images(), init_method=init, world_size=2, timeout=1.0, insecure=True)
    # so does a secret
    with pytest.raises(D.DistributedError, match="cannot host the rendezvous"):
        D.run(m, images(), init_method=init, world_size=2, timeout=1.0, secret=SECRET)
    with pytest.raises(auth.SecretError, match="too short"):
        D.run(m, images(), init_method=init, world_size=2, secret="short")
    with pytest.raises(TypeError, match="insecure: expected a bool"):
        D.run(m, images(), init_method=init, world_size=2, insecure="yes")


# ---------------------------------------------------------------------------
# the primitives
# ---------------------------------------------------------------------------


def test_a_message_of_another_session_or_device_fails_its_tag():
    h = "ab" * 32
    k1, k2 = auth.session_key(SECRET, b"a" * 32, b"w" * 32, wire.hash_bytes(h), 1), \
        auth.session_key(SECRET, b"a" * 32, b"v" * 32, wire.hash_bytes(h), 1)
    msg = tokens_message(h, 3, 2, k1)
    wire.decode(msg, key=k1, device=0, batch_id=3)
    with pytest.raises(wire.WireError, match="from device 0: authentication failed"):
        wire.decode(msg, key=k2, device=0, batch_id=3)
    with pytest.raises(wire.WireError, match="unauthenticated message"):
        wire.decode(wire.encode(h, 0, 3, q=torch.zeros(2, 1, WIDTH, dtype=torch.int8), scales=torch.zeros(2, 1)),
                    key=k1, device=0)
    for pos in (8, 33, wire.HEADER_SIZE + 1, msg.numel() - 1):  # hash, batch id, payload, the tag itself
        bad = msg.clone()
        bad[pos] ^= 1
        with pytest.raises(wire.WireError, match="authentication failed"):
            wire.decode(bad, key=k1, device=0)


def test_control_tag_covers_fields_and_images():
    key = b"k" * 32
    x = images(2)
    c = _proto.sign_batch_ctrl(_proto.ctrl(_proto.CTRL_BATCH, 7, tuple(x.shape), 1, 1, 1), key,
                               auth.image_digest(x.numpy()))
    assert _proto.batch_ctrl_ok(c.tolist(), key, auth.image_digest(x.numpy()))
    y = x.clone()
    y[0, 0, 0, 0] ^= 1
    assert not _proto.batch_ctrl_ok(c.tolist(), key, auth.image_digest(y.numpy()))
    forged = c.tolist()
    forged[3] = 2 ** 40  # a batch size
    assert not _proto.batch_ctrl_ok(forged, key, auth.image_digest(x.numpy()))


def test_secrets_and_loopback():
    assert auth.as_secret("x" * 16) == b"x" * 16
    with pytest.raises(auth.SecretError, match="too short"):
        auth.as_secret(b"abc")
    with pytest.raises(TypeError, match="str or bytes"):
        auth.as_secret(12345678901234567)
    assert len(auth.as_secret(auth.new_secret())) == 64
    assert auth.is_loopback("127.0.0.1") and auth.is_loopback("::1") and auth.is_loopback("localhost")
    assert not auth.is_loopback("203.0.113.7") and not auth.is_loopback("0.0.0.0")
    assert not auth.is_loopback("no-such-host.invalid")
