"""A process group of the distributed engine and its workers (internal).

`WorkerGroup.open` hosts the rendezvous (a `TCPStore` under a `PrefixStore`),
spawns local workers when asked (the secret in their environment, not on
their command line), waits until every rank has joined (refusing a rank
claimed twice), connects the group (`_proto.make_group`), checks every
worker's hello (its model's content hash, token count and width) and, with a
secret, runs the challenge-response that gives each device its session key
(`_authenticate`, devit_ext.auth) and starts the keep-alives to the workers
that take them (`_heartbeat.Heartbeat`); `close` tells the workers to exit and
tears everything down; `describe_fault` turns a lost device into a sentence
with its exit code and log. The aggregation loop is `distributed._run_batches`.
"""
from __future__ import annotations

import os
import signal
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import torch

from .. import auth, wire
from . import _heartbeat, _proto, _waiters


class DistributedError(RuntimeError):
    """The distributed engine could not answer: rendezvous, refused worker, or lost devices."""


class DevicesError(DistributedError):
    """A failure of particular devices; `.devices` lists their indices."""

    def __init__(self, message: str, devices: list[int]):
        super().__init__(message)
        self.devices = list(devices)


class DeviceError(DevicesError):
    """One or more devices died, hung or sent a malformed message."""


class WorkerRefused(DevicesError):
    """A worker refused in its hello: another model (content hash mismatch), or no / another secret."""


class WorkerGroup:
    """One process group: its rendezvous, the workers' hellos, its spawned workers, its teardown."""

    def __init__(self, key: str, init_method: str | None, world: int, backend: str, spawned: bool,
                 secret: bytes | None = None):
        self.key, self.init_method, self.world, self.backend, self.spawned = key, init_method, world, backend, spawned
        self.secret = secret  # shared with the workers (spawned: generated for this group when not given)
        self.keys: dict[int, bytes] = {}  # device -> session key (authenticated groups)
        self.num_devices = world - 1
        self.store = self.pstore = self.pg = None
        self.procs: list[subprocess.Popen] = []
        self.tmpdir: str | None = None
        self.hash: str | None = None  # the workers' model (from their hellos)
        self.tokens: list[int] = []
        self.widths: list[int] = []
        self.dead: dict[int, str] = {}
        self.waiters: list[_waiters.Waiter] = []
        self.abandoned: list = []  # buffers of receives given up on: Gloo may still write them
        self.next_id = 1
        self.rendezvous_s = 0.0
        self.comm = torch.device("cpu")
        self.init_method_used: str | None = init_method  # spawned: the tcp:// address actually used
        self.hellos: dict = {}
        self.told = False  # the workers were already told to exit (refused)
        self.send_lock = threading.Lock()  # every send once the keep-alives run (_heartbeat.py)
        self.heartbeat: _heartbeat.Heartbeat | None = None

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
        if self.pstore.check(["duplicates"]):  # a second worker for a rank that came after the first had joined
            self.refuse([])
            self._refuse_duplicates()
        self.heartbeat = _heartbeat.Heartbeat(self.pg, self.comm, self.send_lock,
                                              {i: h.idle_bound_s for i, h in self.hellos.items()}, self.keys, self.dead)
        self.heartbeat.start()
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
        # the environment (readable by this user only), never the command line (`ps` shows it to all)
        env[auth.ENV] = os.fsdecode(self.secret)
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
            if self.pstore.check(["duplicates"]):
                self._refuse_duplicates()
            missing = [r for r in missing if not self.pstore.check([f"joined/{r}"])]
            if not missing:
                if self.pstore.check(["duplicates"]):
                    self._refuse_duplicates()
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

    def _refuse_duplicates(self):
        dup = [r for r in range(1, self.world) if self.pstore.check([f"duplicate/{r}"])]
        what = ", ".join(
            f"rank {r} (device {r - 1}) by pids {self.pstore.get(f'joined/{r}').decode()} and "
            f"{self.pstore.get(f'duplicate/{r}').decode()}" for r in dup)
        raise DistributedError(
            f"distributed: the rendezvous at {self.init_method_used} was refused: {what or 'a rank'} claimed twice; "
            f"start one worker per rank (--rank 1..{self.world - 1}) and call again" + self._logs())

    def _hellos(self, mhash: str, timeout: float):
        self.waiters = [_waiters.Waiter(i) for i in range(self.num_devices)]
        deadline = time.monotonic() + timeout
        bufs, slots = {}, {}
        for i in range(self.num_devices):
            bufs[i] = torch.zeros(wire.HEADER_SIZE, dtype=torch.uint8, device=self.comm)
            slots[i] = self.waiters[i].submit(self.pg.recv([bufs[i]], i + 1, _proto.TAG_HELLO))
        hellos, errors = {}, {}
        for i in range(self.num_devices):
            try:
                _waiters.await_slot(slots[i], deadline)
                hellos[i] = wire.decode(bufs[i].cpu(), device=i, kind=wire.KIND_HELLO)
            except _waiters.Timeout:
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
        holds = {i: bool(h.flags & wire.FLAG_AUTH) for i, h in hellos.items()}
        refused = {i: _proto.REFUSE_NO_SECRET if self.secret is not None else _proto.REFUSE_UNEXPECTED_SECRET
                   for i in range(self.num_devices) if holds[i] != (self.secret is not None)}
        if refused:
            self._refuse_auth(refused)
        if self.secret is not None:
            self._authenticate(wire.hash_bytes(mhash), time.monotonic() + timeout, timeout)
        self.hash = mhash

    def _authenticate(self, hash16: bytes, deadline: float, timeout: float):
        """Challenge-response with every worker (devit_ext.auth): its proof first, then ours."""
        nonces, answers, slots, errors = {}, {}, {}, {}
        for i in range(self.num_devices):
            nonces[i] = auth.new_nonce()
            c = _proto.ctrl_auth(_proto.CTRL_AUTH, nonces[i]).to(self.comm)
            answers[i] = torch.zeros(_proto.AUTH_ANSWER_BYTES, dtype=torch.uint8, device=self.comm)
            self.abandoned.append((c, answers[i], self.pg.send([c], i + 1, _proto.TAG_CTRL)))
            slots[i] = self.waiters[i].submit(self.pg.recv([answers[i]], i + 1, _proto.TAG_AUTH))
        wrong = {}
        for i in range(self.num_devices):
            try:
                _waiters.await_slot(slots[i], deadline)
            except _waiters.Timeout:
                errors[i] = f"no answer to the challenge within {timeout:g} s"
                continue
            except RuntimeError as e:
                errors[i] = _short(e)
                continue
            raw = answers[i].cpu().numpy().tobytes()
            nonce_w, proof = raw[: auth.NONCE_BYTES], raw[auth.NONCE_BYTES :]
            if not auth.verify(self.secret, proof, *auth.worker_context(nonces[i], nonce_w, hash16, i + 1)):
                wrong[i] = _proto.REFUSE_WRONG_SECRET
                continue
            ok = auth.aggregator_proof(self.secret, nonces[i], nonce_w, hash16, i + 1)
            c = _proto.ctrl_auth(_proto.CTRL_AUTH_OK, ok).to(self.comm)
            self.abandoned.append((c, self.pg.send([c], i + 1, _proto.TAG_CTRL)))
            self.keys[i] = auth.session_key(self.secret, nonces[i], nonce_w, hash16, i + 1)
        if errors:
            self.refuse([])
            raise DeviceError(
                "distributed: authentication failed for " + "; ".join(
                    f"device {i} (rank {i + 1}): {m}" for i, m in errors.items()) + self._logs(), sorted(errors))
        if wrong:
            self._refuse_auth(wrong)

    def _refuse_auth(self, reasons: dict[int, int]):
        self.refuse(reasons)
        raise WorkerRefused(
            "distributed: refused " + "; ".join(
                f"device {i} (rank {i + 1}): {_proto.REFUSE_TEXT[r].replace('it holds', 'the worker holds')}"
                for i, r in reasons.items()) + self._logs(), sorted(reasons))

    def refuse(self, bad):
        """Tell refused workers why (they exit with code 3), the others to shut down.
        bad: device indices (another model), or {device: _proto.REFUSE_* reason}."""
        reasons = bad if isinstance(bad, dict) else {i: _proto.REFUSE_MODEL for i in bad}
        self._tell({i: (_proto.CTRL_REFUSE, reasons[i]) if i in reasons else _proto.CTRL_SHUTDOWN
                    for i in range(self.num_devices)})
        self.told = True

    def _tell(self, kinds: dict[int, int], wait_s: float = 2.0):
        self.abandoned.extend(_waiters.tell(self.pg, self.comm, kinds, wait_s))

    # -- closing ----------------------------------------------------------
    def close(self, graceful: bool = True):
        if self.heartbeat is not None:
            self.abandoned.extend(self.heartbeat.stop())  # before the shutdown messages, which must come last
            self.heartbeat = None
        if self.pg is not None and not self.told:
            if graceful:
                # lost devices get the message too: a worker that was only slow then exits cleanly
                self._tell({i: _proto.CTRL_SHUTDOWN for i in range(self.num_devices)})
            elif not self.spawned:
                # after a fault external workers are told to exit (spawned ones are killed), the faulty ones
                # too: a slow one exits once it has caught up, one that sent a refused message at once, instead
                # of waiting for a next batch while a caller holding the error keeps this group's connections
                self._tell({i: _proto.CTRL_SHUTDOWN for i in range(self.num_devices)}, 1.0)
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
        self.store = None  # the rendezvous server (only this reference): its port is free from here on
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    # -- helpers ----------------------------------------------------------
    def proc(self, i: int):
        return self.procs[i] if self.spawned and i < len(self.procs) else None

    def describe_fault(self, i: int, err: BaseException | str, timeout: float) -> str:
        text = err if isinstance(err, str) else _short(err)
        if isinstance(err, _waiters.Timeout):
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
