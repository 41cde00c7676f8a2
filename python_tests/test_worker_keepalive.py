"""The worker's wait for the next batch is bounded by keep-alives (engines/_heartbeat.py), in one process:
the real `worker._Worker.serve` in a thread, this test as the aggregator speaking the protocol by hand
(the `group` fixture of test_worker_auth); and the real aggregator (`D.run`) against hand-written workers
that record the keep-alives they get.

A worker that has heard a keep-alive and then hears nothing for its --timeout
exits 1 (the aggregator stopped, hung or vanished), within the bound + 1 s; an
aggregator that keeps sending keep-alives keeps it past its --timeout; one that
never sent any (a version before them) is waited for as before. A forged or
replayed keep-alive in an authenticated group is refused. The aggregator side
(the real `D.run` keeping an idle worker alive, a SIGSTOPped aggregator) is in
test_worker_bounds.py (processes).
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

from devit_ext import wire
from devit_ext.engines import _proto, worker
from devit_ext.engines import distributed as D

from test_auth import SECRET, WIDTH, free_port, images, one_device_model, recv_ctrl
from test_worker_auth import _bounded, answer, challenge, group, send_batch, x2  # noqa: F401 - fixtures

BOUND = 2.0  # the worker's --timeout


def beat(pg, seq, key, interval=0.5):
    pg.send([_proto.keepalive_ctrl(seq, interval, key)], 1, _proto.TAG_CTRL).wait(_proto.td(30))


def test_silent_aggregator_ends_the_wait_within_the_bound(group, capfd):
    make, m = group
    pg, w, _server = make(secret=SECRET, timeout=BOUND)
    key = challenge(pg, SECRET, m)
    t_end = time.monotonic() + 3 * BOUND  # keep-alives every 0.5 s for three bounds: it stays
    seq = 0
    while time.monotonic() < t_end:
        seq += 1
        beat(pg, seq, key)
        time.sleep(0.5)
        assert w.is_alive(), capfd.readouterr().err
    send_batch(pg, key, 1, x2())  # and serves a batch after them
    assert answer(pg, key, 2).batch_id == 1
    t_silent = time.monotonic()  # from here the aggregator says nothing
    w.join(BOUND + 10)
    took = time.monotonic() - t_silent
    assert w.code == worker.EXIT_LOST, capfd.readouterr().err
    assert BOUND - 0.2 <= took <= BOUND + 1.0, took
    err = capfd.readouterr().err
    assert "the aggregator sends keep-alives every 0.5 s" in err
    assert f"heard nothing from the aggregator for --timeout {BOUND:g} s" in err


def test_no_keepalive_yet_waits_as_before(group, capfd):
    """An aggregator that sends none (before keep-alives existed) may be idle for long: no bound."""
    make, m = group
    pg, w, _server = make(secret=None, timeout=BOUND)
    w.join(2 * BOUND)
    assert w.is_alive(), capfd.readouterr().err
    pg.send([_proto.ctrl(_proto.CTRL_SHUTDOWN)], 1, _proto.TAG_CTRL).wait(_proto.td(30))
    w.join(30)
    assert w.code == worker.EXIT_OK


def _refused(group, capfd, mangle, want):
    make, m = group
    pg, w, _server = make(secret=SECRET, timeout=10.0)
    key = challenge(pg, SECRET, m)
    beat(pg, 1, key)
    c = mangle(key)
    pg.send([c], 1, _proto.TAG_CTRL).wait(_proto.td(30))
    w.join(30)
    assert w.code == worker.EXIT_LOST and w.computed == 0
    assert want in capfd.readouterr().err


def test_forged_keepalive_refused(group, capfd):
    def forged(key):
        c = _proto.keepalive_ctrl(2, 0.5, key)
        c[11] ^= 1
        return c
    _refused(group, capfd, forged, "a keep-alive whose tag does not match it")


def test_replayed_keepalive_refused(group, capfd):
    _refused(group, capfd, lambda key: _proto.keepalive_ctrl(1, 0.5, key), "keep-alive 1 after 1 (a replayed")


def test_untagged_keepalive_refused_in_an_authenticated_group(group, capfd):
    _refused(group, capfd, lambda key: _proto.keepalive_ctrl(2, 0.5, None), "tag does not match")


@pytest.mark.parametrize("stall", ["challenge", "images"])
def test_the_other_waits_end_within_the_bound(group, capfd, stall):
    """An aggregator that never sends its challenge, or a batch's images after its control message: the
    worker exits 1 within its --timeout (+ 1 s) (in a process the watchdog stands behind Gloo's timeout)."""
    make, m = group
    pg, w, _server = make(secret=SECRET if stall == "challenge" else None, timeout=BOUND)
    t0 = time.monotonic()
    if stall == "images":
        beat(pg, 1, None)
        c = _proto.ctrl(_proto.CTRL_BATCH, 1, (2, 3, 16, 16), 1, 1, 1)
        pg.send([c], 1, _proto.TAG_CTRL).wait(_proto.td(30))
        t0 = time.monotonic()
    w.join(BOUND + 10)
    took = time.monotonic() - t0
    assert w.code == worker.EXIT_LOST and w.computed == 0, capfd.readouterr().err
    assert took <= BOUND + 1.0, took
    assert "lost the aggregator" in capfd.readouterr().err


def test_keepalive_interval_is_well_under_the_bound():
    assert _proto.keepalive_interval(60) == _proto.KEEPALIVE_S == 1.0
    assert _proto.keepalive_interval(2.0) == 0.5
    assert _proto.keepalive_interval(0.01) == _proto.MIN_KEEPALIVE_S
    # the bytes: test_wire_layout.py::test_keepalive_control_golden_bytes


class Listener(threading.Thread):
    """A hand-written worker (unauthenticated, loopback) that declares `bound` in its hello, answers
    batches with zero tokens and records every control message: (time.monotonic(), kind, slot 2)."""

    def __init__(self, port, mhash, rank, world, bound):
        super().__init__(daemon=True)
        self.port, self.mhash, self.rank, self.world, self.bound = port, mhash, rank, world, bound
        self.seen, self.error = [], None

    def run(self):
        try:
            _, store = _proto.make_store("127.0.0.1", self.port, self.world, False, 30.0)
            assert _proto.claim_rank(store, self.rank) is None
            pg = _proto.make_group(store, self.rank, self.world, 30.0, "gloo", "127.0.0.1")
            hello = wire.encode_hello(self.mhash, self.rank - 1, 1, WIDTH, idle_bound_s=self.bound)
            pg.send([hello], 0, _proto.TAG_HELLO).wait()
            keep = []
            while True:
                c = recv_ctrl(pg)
                self.seen.append((time.monotonic(), c[1], c[2]))
                if c[1] == _proto.CTRL_BATCH:
                    x = torch.empty(tuple(c[3:7]), dtype=torch.uint8)
                    pg.recv([x], 0, _proto.TAG_IMAGES).wait(_proto.td(30))
                    q = torch.zeros(c[3], 1, WIDTH, dtype=torch.int8)
                    msg = wire.encode(self.mhash, self.rank - 1, c[2], q=q, scales=torch.zeros(c[3], 1))
                    keep.append(msg)
                    pg.send([msg], 0, _proto.TAG_TOKENS).wait(_proto.td(30))
                elif c[1] != _proto.CTRL_KEEPALIVE:
                    return
        except BaseException as e:  # noqa: BLE001 - the test reads it
            self.error = e


def test_the_real_aggregator_sends_keepalives_while_idle_to_workers_that_take_them():
    """Device 0 declares a 2 s bound: a keep-alive before the first batch, then every 0.5 s while idle;
    device 1 declares none (a worker before keep-alives): it gets none."""
    m = one_device_model(devices=2)
    port = free_port()
    init = f"tcp://127.0.0.1:{port}"
    fakes = [Listener(port, m.content_hash(), 1, 3, BOUND), Listener(port, m.content_hash(), 2, 3, 0.0)]
    for f in fakes:
        f.start()
    try:
        D.run(m, images(8), init_method=init, world_size=3, timeout=10.0, rendezvous_timeout=60, batch_size=2)
        t_idle = time.monotonic()
        time.sleep(2.2)
        D.run(m, images(2), init_method=init, world_size=3, timeout=10.0)  # the same group, still served
    finally:
        D.shutdown(init)
        for f in fakes:
            f.join(30)
    assert all(f.error is None for f in fakes), [f.error for f in fakes]
    kinds0 = [k for _, k, _ in fakes[0].seen]
    assert kinds0[0] == _proto.CTRL_KEEPALIVE and kinds0[-1] == _proto.CTRL_SHUTDOWN
    beats = [(t, seq) for t, k, seq in fakes[0].seen if k == _proto.CTRL_KEEPALIVE]
    assert [s for _, s in beats] == list(range(1, len(beats) + 1))  # sequence numbers 1, 2, ...
    idle = [t for t, _ in beats if t > t_idle]
    assert 3 <= len(idle) <= 6, idle  # every 0.5 s in 2.2 s of idling (scheduling on a loaded machine)
    assert _proto.CTRL_KEEPALIVE not in [k for _, k, _ in fakes[1].seen]
    assert [k for _, k, _ in fakes[1].seen] == [_proto.CTRL_BATCH] * 5 + [_proto.CTRL_SHUTDOWN]
