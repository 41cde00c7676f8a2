"""The worker's wait for the next batch is bounded by keep-alives (engines/_heartbeat.py), in one process:
the real `worker._Worker.serve` in a thread, this test as the aggregator speaking the protocol by hand
(the `group` fixture of test_worker_auth).

A worker that has heard a keep-alive and then hears nothing for its --timeout
exits 1 (the aggregator stopped, hung or vanished), within the bound + 1 s; an
aggregator that keeps sending keep-alives keeps it past its --timeout; one that
never sent any (a version before them) is waited for as before. A forged or
replayed keep-alive in an authenticated group is refused. The aggregator side
(the real `D.run` keeping an idle worker alive, a SIGSTOPped aggregator) is in
test_worker_bounds.py (processes).
"""
from __future__ import annotations

import time

from devit_ext.engines import _proto, worker

from test_auth import SECRET
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


def test_keepalive_interval_is_well_under_the_bound():
    assert _proto.keepalive_interval(60) == _proto.KEEPALIVE_S == 1.0
    assert _proto.keepalive_interval(2.0) == 0.5
    assert _proto.keepalive_interval(0.01) == _proto.MIN_KEEPALIVE_S
    # the bytes: test_wire_layout.py::test_keepalive_control_golden_bytes
