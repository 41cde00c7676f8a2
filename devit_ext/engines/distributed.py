"""Distributed engine: one process per edge device plus this process as the aggregator.

    logits, stats = run(model, images, transfer="int8", init_method="tcp://127.0.0.1:29500", world_size=N + 1)
    logits, stats = run(model, images, spawn=True)        # N local workers on loopback

Rank 0 (this process) is the aggregator; device i is rank i + 1, a
`devit-ext worker` process (or one under torchrun) running sub-model i of the
same saved DeViT.

The group. Built directly as a `TCPStore` hosted here + `ProcessGroupGloo`
(NCCL with backend="nccl" where available), not through
`init_process_group`: nothing global is touched, several groups can coexist
(one per `init_method`), and a group can be torn down after a fault and built
again. Groups live in a per-process registry keyed by `init_method`
(`"spawn"` for spawned workers without one): repeated calls reuse them.
`shutdown()` closes them (also at exit).

Per call. After the rendezvous (bounded by `timeout`; spawned workers get at
least 120 s to import torch, see `rendezvous_timeout`) every worker sends a
hello with its model's content hash: a worker running another model is refused
(the error names the device). Then per micro-batch the aggregator sends a
control tensor (batch id, shape, dtypes) and the images (uint8 when given
uint8, else float32) to every device and posts a receive for its
`devit_ext.wire` message; two micro-batches are in flight, so workers compute
batch k + 1 while this process decodes and fuses batch k (`ensemble_fusion`
per fusion branch for int8; the fusion head's linears for fp16/fp32).

Faults. Every receive waits with a deadline. Not with Gloo's own
`Work.wait(timeout)`: on expiry Gloo closes *every* connection of the group
("Application timeout caused pair closure"), so one slow device would take the
healthy ones down with it, and `Work.is_completed()` does not report a Gloo
receive as done until someone waits on it. Instead one waiter thread per device
waits on that device's receives in order and the aggregator waits on the
thread's event with the deadline. A device that misses it is marked lost and
gets nothing more (its receive stays posted, its buffer kept alive, so a late
message lands harmlessly). A dead worker is seen at once (connection reset); a
stuck one after `timeout`. Without `degrade` the call
raises `DeviceError` naming the device(s) and the group is torn down (spawned
workers are killed; external workers see the connection close and exit): the
next call respawns, or for external workers re-runs the rendezvous (restart
them) and says which ranks did not join. With `degrade=True` the answer uses
the devices still alive (zeros for the missing tokens, as if a device sent
nothing), `stats.missing_devices` lists the others by device index, and later
calls on the same group keep answering without them.
"""
from __future__ import annotations

import atexit
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from typing import Any

import torch

from .. import ops, protocol, wire
from . import _proto, common

ENGINE_OPTS = ("init_method", "world_size", "spawn", "backend", "threads", "worker_device", "rendezvous_timeout",
               "pipeline_depth")
SPAWN_KEY = "spawn"


class DistributedError(RuntimeError):
    """The distributed engine could not answer: rendezvous, refused worker, or lost devices."""


class DeviceError(DistributedError):
    """One or more devices died, hung or sent a malformed message; `.devices` lists their indices."""

    def __init__(self, message: str, devices: list[int]):
        super().__init__(message)
        self.devices = list(devices)


class WorkerRefused(DistributedError):
    """A worker runs another model than the aggregator (content hash mismatch); `.devices` lists them."""

    def __init__(self, message: str, devices: list[int]):
        super().__init__(message)
        self.devices = list(devices)


class _Slot:
    __slots__ = ("event", "error")

    def __init__(self):
        self.event = threading.Event()
        self.error: BaseException | None = None


class _Waiter:
    """Waits, in order, on one device's receives in a daemon thread (see the module docstring)."""

    def __init__(self, device: int):
        self.q: "queue.Queue" = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name=f"devit-recv-device{device}", daemon=True)
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

    def submit(self, work) -> _Slot:
        slot = _Slot()
        self.q.put((work, slot))
        return slot

    def stop(self):
        self.q.put(None)


class _Timeout(Exception):
    pass


def _await(slot: _Slot, deadline: float):
    """Wait for a submitted receive until `deadline` (time.monotonic()); raise its error or _Timeout."""
    if not slot.event.wait(max(0.0, deadline - time.monotonic())):
        raise _Timeout("Timed out")
    if slot.error is not None:
        raise slot.error


_LOCK = threading.RLock()
_SESSIONS: dict[str, "_Session"] = {}
_HASHES: "weakref.WeakKeyDictionary[Any, tuple]" = weakref.WeakKeyDictionary()


def model_hash(model) -> str:
    """model.content_hash(), cached until a parameter or buffer changes (storage or version counter)."""
    fp = tuple(
        (n, t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for n, t in model.state_dict(keep_vars=True).items()
    )
    hit = _HASHES.get(model)
    if hit is not None and hit[0] == fp:
        return hit[1]
    h = model.content_hash()
    _HASHES[model] = (fp, h)
    return h


# ---------------------------------------------------------------------------
# Sessions: one process group (and its workers, when spawned)
# ---------------------------------------------------------------------------


class _Session:
    def __init__(self, key: str, init_method: str | None, world: int, backend: str, spawned: bool):
        self.key, self.init_method, self.world, self.backend, self.spawned = key, init_method, world, backend, spawned
        self.num_devices = world - 1
        self.store = self.pstore = self.pg = None
        self.procs: list[subprocess.Popen] = []
        self.tmpdir: str | None = None
        self.hash: str | None = None  # the workers' model (from their hellos)
        self.tokens: list[int] = []
        self.widths: list[int] = []
        self.dead: dict[int, str] = {}
        self.waiters: list[_Waiter] = []
        self.abandoned: list = []  # buffers of receives given up on: Gloo may still write them
        self.next_id = 1
        self.rendezvous_s = 0.0
        self.comm = torch.device("cpu")

    # -- opening ----------------------------------------------------------
    def open(self, model, mhash: str, *, timeout: float, rdv_timeout: float, threads: int | None, worker_device: str):
        t0 = time.perf_counter()
        if self.backend == "nccl":
            self.comm = torch.device("cuda", torch.cuda.current_device())
        if self.spawned:
            host, port = "127.0.0.1", 0
            if self.init_method is not None:
                host, port, _ = _proto.parse_init_method(self.init_method)
                if host not in ("127.0.0.1", "localhost"):
                    raise ValueError(f"init_method: spawn=True starts workers on loopback, so use tcp://127.0.0.1:PORT, got {self.init_method!r}")
            agent = False
        else:
            host, port, agent = _proto.parse_init_method(self.init_method)
        try:
            self.store, self.pstore = _proto.make_store(host, port, self.world, not agent, rdv_timeout)
        except Exception as e:  # noqa: BLE001
            raise DistributedError(
                f"distributed: cannot host the rendezvous at {host}:{port} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                "is another group using that port?"
            ) from None
        if self.spawned:
            port = self.store.port
            self.init_method_used = f"tcp://127.0.0.1:{port}"
            self._spawn(model, mhash, threads, worker_device, timeout)
        else:
            self.init_method_used = self.init_method
        self._wait_joined(rdv_timeout)
        try:
            self.pg = _proto.make_group(self.pstore, 0, self.world, rdv_timeout, self.backend, host)
        except Exception as e:  # noqa: BLE001
            raise DistributedError(
                f"distributed: connecting the group at {self.init_method_used} failed within {rdv_timeout:g} s "
                f"({type(e).__name__}: {str(e).splitlines()[0]}){self._logs()}"
            ) from None
        self._hellos(mhash, timeout)
        self.rendezvous_s = time.perf_counter() - t0

    def _spawn(self, model, mhash: str, threads: int | None, worker_device: str, timeout: float):
        self.tmpdir = tempfile.mkdtemp(prefix="devit_workers_")
        saved = model.save(os.path.join(self.tmpdir, "model"))
        if saved != mhash:
            raise DistributedError(f"distributed: the saved model hashes to {saved[:12]}, the model to {mhash[:12]}")
        if threads is None:
            threads = max(1, (os.cpu_count() or 1) // self.num_devices)
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(threads))
        for r in range(1, self.world):
            cmd = [
                sys.executable, "-m", "devit_ext.engines.worker", "--rank", str(r), "--world-size", str(self.world),
                "--init-method", self.init_method_used, "--model", os.path.join(self.tmpdir, "model"),
                "--device", worker_device, "--timeout", repr(float(timeout)), "--backend", self.backend,
                "--threads", str(threads), "--parent-pid", str(os.getpid()),
            ]
            log = open(os.path.join(self.tmpdir, f"worker{r}.log"), "wb")
            try:
                # cwd: the temp dir, so `-m` cannot pick up a devit_ext/ source folder from the caller's cwd
                self.procs.append(subprocess.Popen(
                    cmd, cwd=self.tmpdir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
                ))
            finally:
                log.close()

    def _wait_joined(self, rdv_timeout: float):
        deadline = time.monotonic() + rdv_timeout
        missing = list(range(1, self.world))
        while True:
            missing = [r for r in missing if not self.pstore.check([f"joined/{r}"])]
            if not missing:
                return
            if self.spawned:
                gone = [(r, p.poll()) for r, p in enumerate(self.procs, 1) if p.poll() is not None]
                if gone:
                    raise DistributedError(
                        "distributed: spawned worker(s) exited before joining: "
                        + ", ".join(f"device {r - 1} (rank {r}) {_exit_text(c)}" for r, c in gone) + self._logs()
                    )
            if time.monotonic() > deadline:
                raise DistributedError(
                    f"distributed: rendezvous at {self.init_method_used} timed out after {rdv_timeout:g} s: "
                    f"device(s) {[r - 1 for r in missing]} (rank(s) {missing}) did not join; start them with "
                    f"`devit-ext worker --rank R --world-size {self.world} --init-method {self.init_method_used} --model PATH`"
                    + self._logs()
                )
            time.sleep(0.02)

    def _hellos(self, mhash: str, timeout: float):
        self.waiters = [_Waiter(i) for i in range(self.num_devices)]
        deadline = time.monotonic() + timeout
        bufs, slots = {}, {}
        for i in range(self.num_devices):
            bufs[i] = torch.zeros(wire.HEADER_SIZE, dtype=torch.uint8, device=self.comm)
            slots[i] = self.waiters[i].submit(self.pg.recv([bufs[i]], i + 1, _proto.TAG_HELLO))
        hellos, errors = {}, {}
        for i in range(self.num_devices):
            try:
                _await(slots[i], deadline)
                hellos[i] = wire.decode(bufs[i].cpu(), device=i, kind=wire.KIND_HELLO)
            except _Timeout:
                errors[i] = f"no hello within {timeout:g} s"
                self.abandoned.append(bufs[i])
            except (RuntimeError, wire.WireError) as e:
                errors[i] = _short(e)
        if errors:
            raise DeviceError(
                "distributed: no valid hello from " + "; ".join(f"device {i} (rank {i + 1}): {m}" for i, m in errors.items())
                + self._logs(), sorted(errors))
        self.hash = hellos[0].model_hash.hex()
        self.hellos = hellos
        self.tokens = [hellos[i].num_tokens for i in range(self.num_devices)]
        self.widths = [hellos[i].width for i in range(self.num_devices)]
        bad = [i for i, h in hellos.items() if h.model_hash != wire.hash_bytes(mhash)]
        if bad:
            self.refuse(bad)
            raise WorkerRefused(
                "distributed: refused " + ", ".join(
                    f"device {i} (rank {i + 1}): it runs another model (content hash {hellos[i].model_hash.hex()}, "
                    f"the aggregator's model has {wire.hash_bytes(mhash).hex()})" for i in bad
                ) + "; start every worker with the same saved model (DeViT.save) as the aggregator's", bad)
        self.hash = mhash

    def refuse(self, bad: list[int]):
        """Tell refused workers why (they exit with code 3), the others to shut down."""
        self._tell({i: _proto.CTRL_REFUSE if i in bad else _proto.CTRL_SHUTDOWN for i in range(self.num_devices)})
        self.told = True

    def _tell(self, kinds: dict[int, int], wait_s: float = 2.0):
        """Send a control message to devices and wait (bounded) until they have it."""
        sent = []
        for i, kind in kinds.items():
            try:
                t = _proto.ctrl(kind).to(self.comm)
                w = self.pg.send([t], i + 1, _proto.TAG_CTRL)
                sent.append((t, w))
            except RuntimeError:
                continue
        if not sent:
            return
        deadline = time.monotonic() + wait_s
        waiter = _Waiter(-1)  # sends complete in any order: one throwaway thread for all of them
        slots = [waiter.submit(w) for _, w in sent]
        waiter.stop()
        for slot in slots:
            try:
                _await(slot, deadline)
            except (_Timeout, RuntimeError):
                pass
        self.abandoned.extend(t for t, _ in sent)

    # -- closing ----------------------------------------------------------
    def close(self, graceful: bool = True):
        if self.pg is not None and not getattr(self, "told", False):
            if graceful:
                # lost devices get the message too: a worker that was only slow then exits cleanly
                self._tell({i: _proto.CTRL_SHUTDOWN for i in range(self.num_devices)})
            elif not self.spawned:
                # after a fault: external workers still alive are told to exit (spawned ones are killed)
                self._tell({i: _proto.CTRL_SHUTDOWN for i in range(self.num_devices) if i not in self.dead}, 1.0)
        for w in self.waiters:
            w.stop()
        if self.procs:
            end = time.monotonic() + (3.0 if graceful else 0.0)
            for p in self.procs:
                try:
                    p.wait(timeout=max(0.0, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            for p in self.procs:
                if p.poll() is None:
                    p.kill()
            for p in self.procs:
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        self.pg = None
        self.pstore = None
        self.store = None
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    # -- helpers ----------------------------------------------------------
    def proc(self, i: int):
        return self.procs[i] if self.spawned and i < len(self.procs) else None

    def describe_fault(self, i: int, err: BaseException | str, timeout: float) -> str:
        text = err if isinstance(err, str) else _short(err)
        if isinstance(err, _Timeout):
            what = text = f"no message within the timeout of {timeout:g} s (hung or too slow)"
        elif "closed" in text or "reset" in text or "Connection" in text:
            what = "the connection was lost (the worker died)"
        else:
            what = text
        p = self.proc(i)
        if p is not None:
            try:
                p.wait(timeout=0.3)
            except subprocess.TimeoutExpired:
                pass
            if p.poll() is not None:
                what += f"; the worker process {_exit_text(p.poll())}"
            log = self.worker_log(i).strip()
            if log:
                what += f" (its log ends: {log[-300:]!r})"
        return f"device {i} (rank {i + 1}): {what} [{text}]" if text not in what else f"device {i} (rank {i + 1}): {what}"

    def _logs(self, n: int = 600) -> str:
        if not self.tmpdir:
            return ""
        out = []
        for r in range(1, self.world):
            path = os.path.join(self.tmpdir, f"worker{r}.log")
            try:
                with open(path, "rb") as f:
                    text = f.read().decode(errors="replace").strip()
            except OSError:
                continue
            if text:
                out.append(f"\n--- worker rank {r} log (last {n} chars) ---\n{text[-n:]}")
        return "".join(out)

    def worker_log(self, i: int) -> str:
        if not self.tmpdir:
            return ""
        try:
            with open(os.path.join(self.tmpdir, f"worker{i + 1}.log"), "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""


def _short(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def _exit_text(code) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def sessions() -> dict[str, dict]:
    """What groups this process holds: key -> {init_method, world_size, spawned, worker_pids, dead devices}."""
    with _LOCK:
        return {
            k: {
                "init_method": getattr(s, "init_method_used", s.init_method),
                "world_size": s.world,
                "spawned": s.spawned,
                "worker_pids": [p.pid for p in s.procs],
                "dead_devices": dict(s.dead),
                "model_hash": s.hash,
            }
            for k, s in _SESSIONS.items()
        }


def shutdown(init_method: str | None = None, *, spawned: bool | None = None) -> None:
    """Close the group at `init_method` (spawned workers: key None with spawned=True), or every group."""
    with _LOCK:
        if init_method is None and spawned is None:
            keys = list(_SESSIONS)
        else:
            keys = [init_method if init_method is not None else SPAWN_KEY]
        for k in keys:
            s = _SESSIONS.pop(k, None)
            if s is not None:
                s.close()


atexit.register(shutdown)


def _get_session(model, mhash, *, key, init_method, world, backend, spawn, degrade, timeout, rdv_timeout, threads,
                 worker_device) -> tuple[_Session, bool]:
    s = _SESSIONS.get(key)
    if s is not None:
        reason = None
        if s.world != world or s.backend != backend or s.spawned != bool(spawn):
            reason = (f"the group at {key} has world size {s.world}, backend {s.backend}, spawned={s.spawned}; "
                      f"this call needs world size {world}, backend {backend}, spawned={bool(spawn)}")
        elif s.spawned and s.hash != mhash:
            reason = "respawn"  # the model changed: new workers with the new weights
        elif s.spawned and any(p.poll() is not None for p in s.procs) and not degrade:
            reason = "respawn"
        elif s.dead and (not degrade or len(s.dead) == s.num_devices):
            reason = "dead"
        if reason is not None:
            _SESSIONS.pop(key, None)
            s.close(graceful=True)
            if reason == "dead" and not s.spawned:
                raise DeviceError(
                    f"distributed: device(s) {sorted(s.dead)} of the group at {key} were lost in an earlier call "
                    f"({'; '.join(s.dead.values())}); the group has been torn down: restart all workers and call "
                    "again, or pass degrade=True to answer without the lost devices", sorted(s.dead))
            if reason not in ("respawn", "dead"):
                if not s.spawned:
                    raise DistributedError(f"distributed: {reason}; the group has been closed, restart the workers")
            s = None
        elif not s.spawned and s.hash != mhash:
            raise WorkerRefused(
                f"distributed: the workers at {key} run another model (content hash {str(s.hash)[:32]}, this "
                f"model has {mhash[:32]}); start them with this model (DeViT.save) or pass the model they run",
                list(range(s.num_devices)))
    if s is not None:
        return s, False
    s = _Session(key, init_method, world, backend, bool(spawn))
    try:
        s.open(model, mhash, timeout=timeout, rdv_timeout=rdv_timeout, threads=threads, worker_device=worker_device)
    except BaseException:
        s.close(graceful=False)
        raise
    _SESSIONS[key] = s
    return s, True


# ---------------------------------------------------------------------------
# The aggregator
# ---------------------------------------------------------------------------


def run(model, images: torch.Tensor, *, transfer: str = "int8", batch_size: int | None = None, timeout: float = 30.0,
        degrade: bool = False, init_method: str | None = None, world_size: int | None = None, spawn: bool = False,
        backend: str | None = None, device=None, dtype=None, threads: int | None = None, worker_device: str = "cpu",
        rendezvous_timeout: float | None = None, pipeline_depth: int = 2, return_stats: bool = True, **unknown):
    """Validated raw images -> (logits float32 (B, C) on the images' device, Stats).

    init_method: tcp://HOST:PORT (rank 0 = this process hosts the rendezvous)
    or env://; world_size: devices + 1 (checked against the model). spawn: start
    one local worker per device on loopback (init_method optional, a free port
    is picked). backend: "gloo" (default) or "nccl" (only where available).
    device: where the fusion runs (default: the model's device). dtype: the
    workers' compute dtype (default fp32 on CPU). threads: torch threads per
    spawned worker. worker_device: spawned workers' --device.
    rendezvous_timeout: default `timeout`, at least 120 s for spawned workers.
    pipeline_depth: micro-batches in flight per device (>= 1).
    """
    if unknown:
        raise TypeError(f"engine='distributed': unknown option(s) {sorted(unknown)}; known: {list(ENGINE_OPTS)}")
    common.check_model(model)
    common.check_args(engine="distributed", transfer=transfer, batch_size=batch_size, timeout=timeout, degrade=degrade)
    common.check_images(model, images)
    timeout = float(timeout)
    n_dev = model.num_devices
    world = n_dev + 1
    if world_size is not None and int(world_size) != world:
        raise ValueError(f"world_size: the model has {n_dev} devices, so the world size is {world} (aggregator + devices), got {world_size}")
    if not isinstance(spawn, bool):
        raise TypeError(f"spawn: expected a bool, got {type(spawn).__name__}")
    if init_method is None and not spawn:
        raise ValueError(
            "engine='distributed' needs init_method='tcp://HOST:PORT' (workers started with `devit-ext worker`) "
            "or spawn=True (local workers on loopback)"
        )
    if init_method is not None:
        _proto.parse_init_method(init_method)  # clear error before any work
    backend = backend or "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend: expected 'gloo' or 'nccl', got {backend!r}")
    if not isinstance(pipeline_depth, int) or pipeline_depth < 1:
        raise ValueError(f"pipeline_depth: expected a positive int, got {pipeline_depth!r}")
    dev = common.resolve_device(model, images, device)
    wdtype = common.resolve_dtype(dtype, torch.device(worker_device) if spawn else torch.device("cpu"))
    rdv = float(rendezvous_timeout) if rendezvous_timeout is not None else (max(timeout, 120.0) if spawn else timeout)
    key = init_method if init_method is not None else SPAWN_KEY

    with _LOCK:
        t_start = time.perf_counter()
        mhash = model_hash(model)
        s, opened = _get_session(model, mhash, key=key, init_method=init_method, world=world, backend=backend,
                                 spawn=spawn, degrade=degrade, timeout=timeout, rdv_timeout=rdv, threads=threads,
                                 worker_device=worker_device)
        try:
            logits, stats = _run_batches(model, s, images, transfer=transfer, batch_size=batch_size, timeout=timeout,
                                         degrade=degrade, dev=dev, wdtype=wdtype, depth=pipeline_depth)
        except BaseException:
            # a fault without degrade, an interrupt, a bug: the group's state is unknown, tear it down
            _SESSIONS.pop(key, None)
            s.close(graceful=False)
            raise
        stats.finish(time.perf_counter() - t_start)
        stats.extra.update(
            init_method=s.init_method_used, world_size=world, backend=backend, spawned=s.spawned,
            worker_pids=[p.pid for p in s.procs], rendezvous_s=s.rendezvous_s if opened else 0.0, new_group=opened,
        )
        return logits.to(images.device), stats


def _run_batches(model, s: _Session, images, *, transfer, batch_size, timeout, degrade, dev, wdtype, depth):
    n_dev = s.num_devices
    tokens = s.tokens
    widths = s.widths
    if widths != model.widths or any(t != protocol.tokens_per_image(model) for t in tokens):
        raise DistributedError(f"distributed: the workers send widths {widths} x tokens {tokens}, the model has {model.widths}")
    T = tokens[0]
    raw = images.detach()
    if raw.dtype != torch.uint8:
        raw = raw.to(torch.float32)
    raw = raw.to("cpu").contiguous()
    chunks = common.micro_batches(raw.shape[0], batch_size)
    img_code = _proto.IMAGE_CODES[raw.dtype]
    tcode = wire.TRANSFERS[transfer]
    ccode = _proto.COMPUTE_CODES[wdtype]
    missing: dict[int, str] = dict(s.dead)
    if len(missing) == n_dev:
        raise DeviceError(f"distributed: every device is lost ({'; '.join(missing.values())})", sorted(missing))

    compute = [0.0] * n_dev
    wire_t = [0.0] * n_dev
    fusion_s = 0.0
    inflight: dict[int, dict] = {}
    outs: list[torch.Tensor] = []

    def fault(i: int, err, k: int):
        msg = s.describe_fault(i, err, timeout)
        missing[i] = msg
        s.dead[i] = msg
        if not degrade:
            raise DeviceError(
                f"distributed: micro-batch {k} failed: {msg}. Pass degrade=True to answer from the devices still alive.",
                [i])

    def post(k: int):
        a, b = chunks[k]
        x = raw[a:b]
        if s.comm.type != "cpu":
            x = x.to(s.comm)
        bid = s.next_id
        s.next_id += 1
        c = _proto.ctrl(_proto.CTRL_BATCH, bid, tuple(x.shape), img_code, tcode, ccode).to(s.comm)
        entry = {"bid": bid, "n": b - a, "ctrl": c, "x": x, "recv": {}, "send": [], "t": {}}
        for i in range(n_dev):
            if i in missing:
                continue
            try:
                entry["send"].append(s.pg.send([c], i + 1, _proto.TAG_CTRL))
                entry["send"].append(s.pg.send([x], i + 1, _proto.TAG_IMAGES))
                buf = torch.empty(wire.message_size(transfer, b - a, T, widths[i]), dtype=torch.uint8, device=s.comm)
                entry["recv"][i] = (buf, s.waiters[i].submit(s.pg.recv([buf], i + 1, _proto.TAG_TOKENS)))
                entry["t"][i] = time.perf_counter()
            except RuntimeError as e:
                entry["recv"].pop(i, None)
                fault(i, e, k)
        inflight[k] = entry

    for k in range(min(depth, len(chunks))):
        post(k)
    for k in range(len(chunks)):
        entry = inflight.pop(k)
        deadline = time.monotonic() + timeout
        msgs: dict[int, wire.Message] = {}
        for i, (buf, slot) in entry["recv"].items():
            if i in missing:
                s.abandoned.append((entry["x"], entry["ctrl"], buf))
                continue
            try:
                _await(slot, deadline)
                t_done = time.perf_counter()
                m = wire.decode(buf.cpu(), expected_hash=s.hash, device=i, batch_id=entry["bid"], batch_size=entry["n"],
                                num_tokens=T, width=widths[i], transfer=transfer, kind=wire.KIND_TOKENS)
            except (_Timeout, RuntimeError, wire.WireError) as e:
                s.abandoned.append((entry["x"], entry["ctrl"], buf))
                fault(i, e, k)
                continue
            msgs[i] = m
            compute[i] += m.compute_s
            wire_t[i] += max(0.0, (t_done - entry["t"][i]) - m.compute_s)
        if k + depth < len(chunks):
            post(k + depth)  # workers start on batch k + depth while this one is fused
        if not msgs:
            raise DeviceError(f"distributed: no device answered micro-batch {k} ({'; '.join(missing.values())})", sorted(missing))
        t0 = time.perf_counter()
        outs.append(_fuse(model, msgs, widths, dev))
        fusion_s += time.perf_counter() - t0

    logits = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
    gone = sorted(missing)
    stats = common.Stats(
        engine="distributed", device=str(dev), dtype=str(wdtype).replace("torch.", ""), transfer=transfer,
        num_images=int(raw.shape[0]), num_devices=n_dev, micro_batches=len(chunks),
        compute_s=max((compute[i] for i in range(n_dev) if i not in missing), default=0.0),
        device_compute_s=[None if i in missing else compute[i] for i in range(n_dev)],
        transfer_bytes_per_image=[protocol.message_bytes(widths[i], transfer, T) for i in range(n_dev)],
        transfer_s=[None if i in missing else wire_t[i] for i in range(n_dev)],
        fusion_s=fusion_s,
        op_paths=ops.op_paths(dev, ("ensemble_fusion",) if transfer == "int8" else ()),
        missing_devices=gone, degraded=bool(gone),
    )
    stats.notes.append("compute_s: the slowest device (devices run in parallel); device_compute_s as timed by each worker")
    stats.notes.append("transfer_s: per device, round trip (images out, message back) minus the device's compute, "
                       "summed over micro-batches; includes queueing when micro-batches are pipelined")
    if gone:
        stats.notes.append("degraded: zeros in place of the tokens of devices " + ", ".join(map(str, gone)))
    stats.extra.update(
        missing_reasons={i: missing[i] for i in gone},
        header_bytes_per_message=wire.HEADER_SIZE,
        image_bytes_per_image=int(raw[0].numel() * raw.element_size()),
    )
    return logits, stats


def _fuse(model, msgs: dict, widths, dev) -> torch.Tensor:
    """Messages -> logits (B, C) float32: the fusion head, zeros for missing devices."""
    with torch.inference_mode():
        ordered = [msgs[i].token_message().to(dev) if i in msgs else None for i in range(len(widths))]
        return protocol.fuse(ordered, protocol.branches(model.fusion), widths)
