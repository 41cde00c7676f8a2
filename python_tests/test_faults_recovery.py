"""Recovery after a device fault (issue 17, item 1): tearing a group down frees its port at once.

Fast: a real Gloo group of two ranks in this process (rank 1 in a thread) on
127.0.0.1, a receive from rank 1 that never completes (a hung worker) parked in
the aggregator's waiter thread, then `WorkerGroup.close`: the rendezvous port
must be hostable again immediately, without garbage collection and although the
waiter thread still holds the group. Slow: the whole sequence with external
worker processes on a fixed port: a worker killed mid-run gives DeviceError,
restarted workers and a second call succeed on the same port. And an aggregator
process whose worker hung (its receive still parked in a waiter thread) exits
cleanly, not with `terminate called without an active exception`.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest
import torch
from _child import TESTS, child_env

from devit_ext.engines import _group, _proto, _waiters
from devit_ext.engines import distributed as D

from test_distributed import check_int8, make_model, uint8_images


@pytest.fixture(autouse=True)
def _watchdog():
    faulthandler.dump_traceback_later(180, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_group(port: int):
    """Rank 0 as the aggregator's WorkerGroup holds it, rank 1 (a pg) built in a thread."""
    g = _group.WorkerGroup(f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port}", 2, "gloo", False)
    g.store, g.pstore = _proto.make_store("127.0.0.1", port, 2, True, 10)
    peer = {}

    def rank1():
        _, ps = _proto.make_store("127.0.0.1", port, 2, False, 10)
        peer["pg"] = _proto.make_group(ps, 1, 2, 10)

    t = threading.Thread(target=rank1)
    t.start()
    g.pg = _proto.make_group(g.pstore, 0, 2, 10)
    t.join(20)
    assert "pg" in peer
    return g, peer


def test_close_frees_the_rendezvous_port_while_a_receive_hangs():
    port = _free_port()
    g, peer = _two_rank_group(port)
    g.waiters = [_waiters.Waiter(0)]
    buf = torch.zeros(64, dtype=torch.uint8)
    slot = g.waiters[0].submit(g.pg.recv([buf], 1, _proto.TAG_TOKENS))  # rank 1 never sends: hung
    with pytest.raises(_waiters.Timeout):
        _waiters.await_slot(slot, time.monotonic() + 0.2)
    t0 = time.monotonic()
    g.close(graceful=False)
    again = _proto.host_store("127.0.0.1", port, 2, 5)  # EADDRINUSE before the fix
    assert again.port == port
    assert time.monotonic() - t0 < 3.0
    del again
    peer.clear()


def _start_worker(rank, model_dir, port, timeout=20):
    args = ["--model", str(model_dir), "--timeout", str(timeout), "--threads", "1", "--parent-pid", str(os.getpid()),
            "--rank", str(rank), "--world-size", "3", "--init-method", f"tcp://127.0.0.1:{port}"]
    return subprocess.Popen([sys.executable, "-m", "devit_ext.engines.worker", *args], cwd=tempfile.gettempdir(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env())


def _stop(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_restarted_workers_succeed_on_the_same_port(tmp_path, fault):
    D.shutdown()
    m = make_model(seed=11)
    m.save(tmp_path / "m")
    x = uint8_images(16, seed=3)
    port = _free_port()
    init = f"tcp://127.0.0.1:{port}"
    procs = [_start_worker(r, tmp_path / "m", port) for r in (1, 2)]
    try:
        out, _ = D.run(m, x, init_method=init, world_size=3, timeout=20, rendezvous_timeout=120)
        check_int8(out, m, x)
        # the fault: device 1 killed, or stopped (hung), while the aggregator waits on it
        procs[1].send_signal(signal.SIGSTOP)
        if fault == "kill":
            threading.Timer(0.3, procs[1].kill).start()
        with pytest.raises(D.DeviceError) as e:
            D.run(m, x, init_method=init, world_size=3, timeout=3, batch_size=4)
        assert 1 in e.value.devices
        if fault == "hang":
            procs[1].kill()
        _stop(procs)
        # restart, as the error says, and call again on the same port: it must work, promptly
        t0 = time.monotonic()
        procs = [_start_worker(r, tmp_path / "m", port) for r in (1, 2)]
        out, st = D.run(m, x, init_method=init, world_size=3, timeout=20, rendezvous_timeout=120)
        check_int8(out, m, x)
        assert st.extra["new_group"] and st.missing_devices == []
        assert time.monotonic() - t0 < 120
    finally:
        D.shutdown()
        _stop(procs)


HUNG_THEN_EXIT = textwrap.dedent("""
    import threading, time
    from devit_ext import wire
    from devit_ext.engines import _proto
    from devit_ext.engines import distributed as D
    from test_auth import WIDTH, free_port, images, one_device_model, recv_ctrl

    def hung(port, mhash):  # a worker that takes a batch and never answers, nor reads again
        _, store = _proto.make_store("127.0.0.1", port, 2, False, 30.0)
        _proto.claim_rank(store, 1)
        pg = _proto.make_group(store, 1, 2, 30.0, "gloo", "127.0.0.1")
        pg.send([wire.encode_hello(mhash, 0, 1, WIDTH, idle_bound_s=30.0)], 0, _proto.TAG_HELLO).wait()
        while recv_ctrl(pg)[1] != _proto.CTRL_BATCH:
            pass
        time.sleep(600)

    m = one_device_model()
    port = free_port()
    threading.Thread(target=hung, args=(port, m.content_hash()), daemon=True).start()
    try:
        D.run(m, images(), init_method=f"tcp://127.0.0.1:{port}", world_size=2, timeout=1.0, rendezvous_timeout=60)
    except D.DeviceError as e:
        print("fault:", str(e).splitlines()[0][:120], flush=True)
    print("exiting", flush=True)
""")


def test_aggregator_process_exits_cleanly_after_a_hung_worker(tmp_path):
    r = subprocess.run([sys.executable, "-c", HUNG_THEN_EXIT], cwd=str(tmp_path), capture_output=True, text=True,
                       timeout=120, env=child_env(TESTS, OMP_NUM_THREADS="1"))
    out = r.stdout + r.stderr
    assert "fault: distributed: micro-batch 0 failed: device 0 (rank 1): no message within the timeout" in out, out
    assert "exiting" in out and r.returncode == 0, (r.returncode, out)
    assert "terminate called" not in out and "Aborted" not in out, out
