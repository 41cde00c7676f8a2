"""Per-device waiters of the distributed aggregator (internal).

Not Gloo's own `Work.wait(timeout)`: on expiry Gloo closes *every* connection
of the group, so one slow device would take the healthy ones down with it, and
`Work.is_completed()` does not report a Gloo receive as done until someone
waits on it. Instead one `Waiter` thread per device waits on that device's
receives in order, and the aggregator waits on the thread's event with its own
deadline (`await_slot`), so a device that misses it can be given up on alone.

`Watchdog` is the worker's side: the one bound on its waits that holds whatever
Gloo or the store do.
"""
from __future__ import annotations

import os
import queue
import threading
import time

from . import _proto


class Slot:
    __slots__ = ("event", "error")

    def __init__(self):
        self.event = threading.Event()
        self.error: BaseException | None = None


class Waiter:
    """Waits, in order, on one device's receives in a daemon thread (see the module docstring)."""

    def __init__(self, device: int, what: str = "recv"):
        self.q: "queue.Queue" = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name=f"devit-{what}-device{device}", daemon=True)
        self.thread.start()

    def _loop(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            work, slot = item
            try:
                work.wait(_proto.IDLE)  # explicit: the group's default timeout must not fire here
            except BaseException as e:  # noqa: BLE001 - handed to the aggregator
                slot.error = e
            slot.event.set()

    def submit(self, work) -> Slot:
        slot = Slot()
        self.q.put((work, slot))
        return slot

    def stop(self):
        self.q.put(None)


class Timeout(Exception):
    pass


def await_slot(slot: Slot, deadline: float):
    """Wait for a submitted receive until `deadline` (time.monotonic()); raise its error or Timeout."""
    if not slot.event.wait(max(0.0, deadline - time.monotonic())):
        raise Timeout("Timed out")
    if slot.error is not None:
        raise slot.error


def tell(pg, comm, kinds: dict, wait_s: float = 2.0) -> list:
    """Send a control message to devices and wait (bounded) until they have it.

    kinds: device -> a control kind, or (kind, argument) (a refusal's reason).

    Returns the sent tensors: Gloo may still read them, so the caller keeps them alive.
    """
    sent = []
    for i, kind in kinds.items():
        try:
            t = (_proto.ctrl(*kind) if isinstance(kind, tuple) else _proto.ctrl(kind)).to(comm)
            w = pg.send([t], i + 1, _proto.TAG_CTRL)
            sent.append((t, w))
        except RuntimeError:
            continue
    if not sent:
        return []
    deadline = time.monotonic() + wait_s
    waiter = Waiter(-1)  # sends complete in any order: one throwaway thread for all of them
    slots = [waiter.submit(w) for _, w in sent]
    waiter.stop()
    for slot in slots:
        try:
            await_slot(slot, deadline)
        except (Timeout, RuntimeError):
            pass
    return [t for t, _ in sent]


class Watchdog:
    """A worker's bound on its waits: ends the process (os._exit) when an armed wait runs past its
    bound + GRACE_S. Gloo's and the store's own timeouts took 2-3x theirs, or hung in connect.
    `arm(seconds, what)` ... `disarm()`; `say` reports which wait it was."""

    GRACE_S = 1.0

    def __init__(self, say, exit_code: int):
        self.say, self.code = say, exit_code
        self.cv = threading.Condition()
        self.deadline = None
        self.what = ""
        threading.Thread(target=self._loop, name="devit-worker-watchdog", daemon=True).start()

    def arm(self, seconds: float, what: str):
        with self.cv:
            self.deadline, self.what, self.bound = time.monotonic() + seconds + self.GRACE_S, what, seconds
            self.cv.notify()

    def disarm(self):
        with self.cv:
            self.deadline = None
            self.cv.notify()

    def _loop(self):
        with self.cv:
            while True:
                if self.deadline is None:
                    self.cv.wait()
                    continue
                left = self.deadline - time.monotonic()
                if left > 0:
                    self.cv.wait(left)
                    continue
                self.say(f"{self.what} did not finish within --timeout {self.bound:g} s; exiting")
                os._exit(self.code)


class NoWatchdog:
    """serve() in-process (tests): the torch timeouts alone bound the waits."""

    def arm(self, seconds, what):
        pass

    def disarm(self):
        pass
