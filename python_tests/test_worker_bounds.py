"""A real `devit-ext worker` process: its waits end within --timeout, and a duplicate rank is refused.

Its wait for the next batch too: an idle aggregator keeps it alive with
keep-alives past its --timeout; a SIGSTOPped one makes it exit within the bound.

Each test starts one worker process (it imports torch: seconds on a loaded
machine), so they are marked slow. The worker prints when it starts joining
the group; from there its exit is bounded by --timeout + the watchdog's 1 s
grace (plus a margin for a loaded machine), not by Gloo's connect, which took
2-3x the stated timeout before.
"""
from __future__ import annotations

import os
import subprocess
import signal
import sys
import textwrap
import threading
import time

import pytest
from _child import TESTS, child_env

from devit_ext.engines import _proto
from devit_ext.engines import distributed as D

from test_auth import bounded, images, one_device_model

pytestmark = pytest.mark.slow
TEST_BOUND_S = 180
MARGIN_S = 3.0  # scheduling on 2 shared cores; far below the 2x of the bound that Gloo alone took


@pytest.fixture(autouse=True)
def _bounded(monkeypatch):
    with bounded(monkeypatch, TEST_BOUND_S):
        yield


def start_worker(model_dir, port, timeout, world=2):
    env = child_env(OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "devit_ext.engines.worker", "--rank", "1", "--world-size", str(world),
         "--init-method", f"tcp://127.0.0.1:{port}", "--model", str(model_dir), "--timeout", str(timeout)],
        cwd=str(model_dir.parent), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def read_until_exit(p, mark="joining the group"):
    """(seconds from the line holding `mark` to the exit, exit code, the whole log)."""
    lines, t_mark = [], None
    for raw in p.stdout:
        line = raw.decode(errors="replace")
        lines.append(line)
        if t_mark is None and mark in line:
            t_mark = time.monotonic()
    code = p.wait(timeout=60)
    return (None if t_mark is None else time.monotonic() - t_mark), code, "".join(lines)


def test_worker_connect_is_bounded_by_its_timeout(tmp_path):
    """The store is up but no aggregator ever builds the group: Gloo's connect would wait on."""
    one_device_model().save(tmp_path / "m")
    server, _pstore = _proto.make_store("127.0.0.1", 0, 2, True, 60.0)
    p = start_worker(tmp_path / "m", server.port, 3)
    try:
        took, code, log = read_until_exit(p)
    finally:
        if p.poll() is None:
            p.kill()
    assert code == 1, log
    assert took is not None and took <= 3 + 1 + MARGIN_S, (took, log)
    assert "within --timeout 3 s" in log or "failed within 3 s" in log, log


def test_duplicate_rank_refused_on_both_sides(tmp_path):
    """Rank 1 is already taken (by a claim of this process) while the aggregator waits for rank 2;
    a second worker for rank 1 and the aggregator both say so at once."""
    m = one_device_model(devices=2)
    m.save(tmp_path / "m")
    port = _free_port()
    box = {}

    def first():
        try:
            _, store = _proto.make_store("127.0.0.1", port, 3, False, 60.0)
            box["claim"] = _proto.claim_rank(store, 1)
        except Exception as e:  # noqa: BLE001
            box["error"] = e

    def aggregator():
        try:
            D.run(m, images(), init_method=f"tcp://127.0.0.1:{port}", world_size=3, timeout=5.0,
                  rendezvous_timeout=120)
        except BaseException as e:  # noqa: BLE001
            box["agg"] = e

    agg = threading.Thread(target=aggregator, daemon=True)
    agg.start()
    t = threading.Thread(target=first, daemon=True)
    t.start()
    t.join(60)
    assert box.get("claim", "x") is None, box
    p = start_worker(tmp_path / "m", port, 30, world=3)
    try:
        took, code, log = read_until_exit(p)
    finally:
        if p.poll() is None:
            p.kill()
    agg.join(60)
    assert code == 2, log
    assert f"rank 1 is already taken in the group at tcp://127.0.0.1:{port} (by the worker with pid {os.getpid()}" in log
    assert took is not None and took < 30, (took, log)  # refused, not timed out
    err = box.get("agg")
    assert isinstance(err, D.DistributedError) and "rank 1 (device 0) by pids" in str(err) and "claimed twice" in str(err)


AGGREGATOR = textwrap.dedent("""
    import sys, time
    import torch
    from devit_ext.model import load
    from devit_ext.engines import distributed as D
    from test_auth import images
    D.run(load(sys.argv[1]), images(), init_method=f"tcp://127.0.0.1:{sys.argv[2]}", world_size=2, timeout=3.0,
          rendezvous_timeout=120)
    print("served", flush=True)
    time.sleep(300)  # idle: only its keep-alives go out
""")


def test_idle_aggregator_keeps_the_worker_a_stopped_one_ends_it(tmp_path):
    """A real aggregator process serves one call, then idles for twice the worker's --timeout (the worker
    stays), then is SIGSTOPped: the worker exits 1 within --timeout + 1 s (it waited forever before)."""
    one_device_model().save(tmp_path / "m")
    port, bound = _free_port(), 3
    agg = subprocess.Popen([sys.executable, "-c", AGGREGATOR, str(tmp_path / "m"), str(port)], cwd=str(tmp_path),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env(TESTS, OMP_NUM_THREADS="1"))
    p = start_worker(tmp_path / "m", port, bound)
    try:
        line = agg.stdout.readline().decode(errors="replace")  # blocks until the call has been served
        assert line.strip() == "served", line + agg.stdout.read(4000).decode(errors="replace")
        time.sleep(2 * bound)
        assert p.poll() is None, p.stdout.read().decode(errors="replace")  # idle, but kept alive
        os.kill(agg.pid, signal.SIGSTOP)
        t_stop = time.monotonic()
        try:
            code = p.wait(timeout=bound + 1 + MARGIN_S + 10)
        except subprocess.TimeoutExpired:
            code = None  # still waiting: unbounded
        took = time.monotonic() - t_stop
        log = (p.kill(), p.stdout.read().decode(errors="replace"))[1]
        print(f"the worker exited {took:.2f} s after the aggregator's SIGSTOP (--timeout {bound})")
    finally:
        for q in (p, agg):
            if q.poll() is None:
                q.kill()
            q.wait(30)
    assert code == 1, log
    assert took <= bound + 1 + MARGIN_S, (took, log)
    assert f"heard nothing from the aggregator for --timeout {bound} s" in log, log
    assert "the aggregator sends keep-alives every 0.75 s" in log, log


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
