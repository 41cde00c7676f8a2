"""The worker against a hostile aggregator, in one process: the real `worker._Worker.serve` in a
thread, this test as a fake aggregator (rank 0) speaking the protocol by hand.

A fake aggregator without the secret is refused (the worker exits 3 before it
computes anything); an authenticated aggregator's control message with a
forged tag, a replayed batch id, or a shape that would need petabytes is
refused before any allocation; the CLI refuses a non-loopback address without
a secret and a short or missing secret file. No process is started.
"""
from __future__ import annotations

import threading

import pytest
import torch

from devit_ext import auth, wire
from devit_ext.engines import _proto, worker

from test_auth import SECRET, WIDTH, bounded, free_port, one_device_model

TEST_BOUND_S = 120


@pytest.fixture(autouse=True)
def _bounded(monkeypatch):
    with bounded(monkeypatch, TEST_BOUND_S, shutdown=False):
        yield


class Served(threading.Thread):
    """The real worker (rank 1 of 2) serving in a thread; `.code` its exit code."""

    def __init__(self, path, port, secret, timeout=10.0):
        super().__init__(daemon=True)
        self.w = worker._Worker(str(path), 1, 2, "cpu", timeout, secret)
        self.port, self.code, self.computed = port, None, 0
        real = self.w.compute

        def counting(*a, **k):
            self.computed += 1
            return real(*a, **k)
        self.w.compute = counting

    def run(self):
        _, store = _proto.make_store("127.0.0.1", self.port, 2, False, 30.0)
        assert _proto.claim_rank(store, 1) is None
        pg = _proto.make_group(store, 1, 2, 30.0, "gloo", "127.0.0.1")
        self.code = self.w.serve(pg, "gloo", " (rank 1, device 0)")


@pytest.fixture
def group(tmp_path):
    """(fake aggregator's pg, the served worker thread, the model) for a worker holding SECRET."""
    m = one_device_model()
    m.save(tmp_path / "m")

    def make(secret=SECRET, timeout=10.0):
        server, pstore = _proto.make_store("127.0.0.1", 0, 2, True, 30.0)
        w = Served(tmp_path / "m", server.port, secret, timeout)
        w.start()
        pg = _proto.make_group(pstore, 0, 2, 30.0, "gloo", "127.0.0.1")
        hello = torch.zeros(wire.HEADER_SIZE, dtype=torch.uint8)
        pg.recv([hello], 1, _proto.TAG_HELLO).wait(_proto.td(30))
        h = wire.decode(hello, kind=wire.KIND_HELLO, device=0, expected_hash=m.content_hash())
        assert bool(h.flags & wire.FLAG_AUTH) == (secret is not None)
        assert h.idle_bound_s == timeout  # its --timeout: it takes keep-alives
        return pg, w, server

    return make, m


def challenge(pg, secret, m, rank=1):
    """Run the aggregator's side of the challenge-response; the session key."""
    nonce_a = auth.new_nonce()
    pg.send([_proto.ctrl_auth(_proto.CTRL_AUTH, nonce_a)], 1, _proto.TAG_CTRL).wait(_proto.td(30))
    ans = torch.zeros(_proto.AUTH_ANSWER_BYTES, dtype=torch.uint8)
    pg.recv([ans], 1, _proto.TAG_AUTH).wait(_proto.td(30))
    raw = ans.numpy().tobytes()
    h16 = wire.hash_bytes(m.content_hash())
    nonce_w = raw[:32]
    assert auth.verify(SECRET, raw[32:], *auth.worker_context(nonce_a, nonce_w, h16, rank))
    proof = auth.aggregator_proof(secret, nonce_a, nonce_w, h16, rank)
    pg.send([_proto.ctrl_auth(_proto.CTRL_AUTH_OK, proof)], 1, _proto.TAG_CTRL).wait(_proto.td(30))
    return auth.session_key(SECRET, nonce_a, nonce_w, h16, rank)


def send_batch(pg, key, bid, x, *, forge=False, shape=None):
    c = _proto.ctrl(_proto.CTRL_BATCH, bid, shape or tuple(x.shape), 1, 1, 1)
    if key is not None:
        c = _proto.sign_batch_ctrl(c, key, auth.image_digest(x.numpy()))
    if forge:
        c[11] ^= 1  # the fields intact, the tag altered
    pg.send([c], 1, _proto.TAG_CTRL).wait(_proto.td(30))
    if shape is None:
        try:
            pg.send([x], 1, _proto.TAG_IMAGES).wait(_proto.td(30))
        except RuntimeError:
            pass  # the worker refused the control message and left before the images


def answer(pg, key, n):
    buf = torch.zeros(wire.message_size("int8", n, 1, WIDTH, authenticated=True), dtype=torch.uint8)
    pg.recv([buf], 1, _proto.TAG_TOKENS).wait(_proto.td(30))
    return wire.decode(buf, key=key, device=0)


def x2():
    return torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)


def test_fake_aggregator_without_the_secret_is_refused(group, capfd):
    make, m = group
    pg, w, _server = make()
    challenge(pg, b"not-the-secret-at-all", m)  # its proof is made with another secret
    w.join(30)
    assert w.code == worker.EXIT_REFUSED and w.computed == 0
    assert "the aggregator failed to prove the shared secret" in capfd.readouterr().err


def test_authenticated_batches_then_forged_control_refused(group, capfd):
    make, m = group
    pg, w, _server = make()
    key = challenge(pg, SECRET, m)
    x = x2()
    send_batch(pg, key, 1, x)
    msg = answer(pg, key, 2)  # a real, tagged message back
    assert msg.batch_id == 1 and msg.flags & wire.FLAG_AUTH
    send_batch(pg, key, 2, x, forge=True)
    w.join(30)
    assert w.code == worker.EXIT_LOST and w.computed == 1
    assert "batch 2: the control message's tag does not match" in capfd.readouterr().err


def test_replayed_control_refused(group, capfd):
    make, m = group
    pg, w, _server = make()
    key = challenge(pg, SECRET, m)
    x = x2()
    send_batch(pg, key, 5, x)
    answer(pg, key, 2)
    send_batch(pg, key, 5, x)  # the same, validly tagged control message again
    w.join(30)
    assert w.code == worker.EXIT_LOST and w.computed == 1
    assert "batch id 5 after 5 (a replayed control message)" in capfd.readouterr().err


@pytest.mark.parametrize("shape", [(2 ** 40, 3, 16, 16), (1, 3, 2 ** 20, 2 ** 20), (2, 4, 16, 16)])
def test_oversized_control_refused_before_allocation(group, capfd, shape):
    make, m = group
    pg, w, _server = make(secret=None)  # unauthenticated (loopback): the shape check alone stands guard
    send_batch(pg, None, 1, x2(), shape=shape)
    w.join(30)
    assert w.code == worker.EXIT_LOST and w.computed == 0
    err = capfd.readouterr().err
    assert "malformed control message from the aggregator" in err
    assert ("this model takes (3, 16, 16)" if shape[1:] != (3, 16, 16) else "at most 4294967296") in err


def test_cli_refuses_non_loopback_without_secret_and_bad_secret_files(tmp_path, capfd):
    from devit_ext.cli import main

    one_device_model().save(tmp_path / "m")
    base = ["worker", "--rank", "1", "--world-size", "2", "--model", str(tmp_path / "m")]
    assert main(base + ["--init-method", "tcp://203.0.113.7:1"]) == worker.EXIT_USAGE
    assert "not a loopback address and no secret" in capfd.readouterr().err
    (tmp_path / "short").write_text("abc\n")
    assert main(base + ["--init-method", "tcp://127.0.0.1:1", "--secret-file", str(tmp_path / "short")]) == 2
    assert "too short" in capfd.readouterr().err
    assert main(base + ["--init-method", "tcp://127.0.0.1:1", "--secret-file", str(tmp_path / "nope")]) == 2
    assert "cannot read" in capfd.readouterr().err
    (tmp_path / "good").write_text("x" * 32 + "\n")
    assert auth.read_secret_file(str(tmp_path / "good")) == b"x" * 32  # the trailing newline is not the secret
