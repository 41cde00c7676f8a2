"""The aggregator's keep-alives (internal): what bounds a worker's wait for the next batch.

A worker whose hello declares an idle bound (its --timeout) ends any wait that
hears nothing from the aggregator for that long, once it has heard a first
keep-alive (so a worker talking to an aggregator that sends none keeps
waiting, as before). `Heartbeat` sends that first keep-alive when the group
opens, then one to each such device whenever nothing went to it on TAG_CTRL
for `_proto.keepalive_interval(bound)` (batch control messages count:
`touch`), from a daemon thread, idle calls or not. A stopped (SIGSTOP),
hung or vanished aggregator sends none, and its workers exit within their
--timeout instead of waiting forever.

Every call into the group goes under the group's `send_lock` (this thread and
`distributed._run_batches`' posts: sends and receives; an NCCL communicator
must not be entered from two threads at once). A Gloo send completes only when the worker
has posted its receive, and only `Work.wait` says so: a per-device `Waiter`
waits on each keep-alive's send, and a device whose last one has not left (a
worker not reading: busy on a long batch, or hung) gets no new one, so nothing
piles up. The wire layout: engines/_proto.py.
"""
from __future__ import annotations

import threading
import time

from . import _proto, _waiters


class Heartbeat:
    def __init__(self, pg, comm, send_lock: threading.Lock, bounds: dict[int, float], keys: dict[int, bytes],
                 dead: dict):
        """bounds: device -> the idle bound its hello declared (only devices with one > 0 get keep-alives);
        keys: device -> session key (authenticated groups); dead: the group's lost devices (skipped)."""
        self.pg, self.comm, self.lock, self.keys, self.dead = pg, comm, send_lock, keys, dead
        self.interval = {i: _proto.keepalive_interval(b) for i, b in bounds.items() if b > 0}
        self.seq = dict.fromkeys(self.interval, 0)
        self.last = dict.fromkeys(self.interval, 0.0)  # time.monotonic() of the last control message sent
        self.pending: dict[int, tuple] = {}  # device -> (tensor, work, slot) of its last keep-alive
        self.waiters = {i: _waiters.Waiter(i, "keepalive") for i in self.interval}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="devit-keepalive", daemon=True)
        self.sent = 0

    @property
    def devices(self) -> list[int]:
        return sorted(self.interval)

    def start(self):
        """The first keep-alive to every device that takes them (it arms their bound), then the thread."""
        if not self.interval:
            return
        with self.lock:
            for i in self.interval:
                self._beat(i)
        self.thread.start()

    def touch(self, i: int):
        """A control message just went to device i (caller holds the send lock): no keep-alive due."""
        if i in self.last:
            self.last[i] = time.monotonic()

    def _beat(self, i: int):
        self.last[i] = time.monotonic()  # also when skipped: try again one interval later
        if i in self.dead:
            return
        p = self.pending.get(i)
        if p is not None and not p[2].event.is_set():
            return  # the last one has not left: the worker is not reading; one in flight is enough
        self.seq[i] += 1
        c = _proto.keepalive_ctrl(self.seq[i], self.interval[i], self.keys.get(i)).to(self.comm)
        try:
            work = self.pg.send([c], i + 1, _proto.TAG_CTRL)
        except RuntimeError:
            return  # the connection is gone: the next call sees it and names the device
        self.pending[i] = (c, work, self.waiters[i].submit(work))
        self.sent += 1

    def _loop(self):
        while True:
            now = time.monotonic()
            due = min(self.last[i] + self.interval[i] for i in self.interval)
            if self.stopped.wait(max(0.0, due - now)):
                return
            with self.lock:
                if self.stopped.is_set():
                    return
                now = time.monotonic()
                for i in self.interval:
                    if now >= self.last[i] + self.interval[i]:
                        self._beat(i)

    def stop(self) -> list:
        """No keep-alive after this returns. Returns what Gloo may still read (the caller keeps it alive)."""
        self.stopped.set()
        with self.lock:
            pass  # a beat in progress has finished
        if self.thread.is_alive():
            self.thread.join(2.0)
        for w in self.waiters.values():
            w.stop()
        return list(self.pending.values())
