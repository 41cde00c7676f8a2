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
(the error names the device). With a secret (`secret=`, else $DEVIT_SECRET;
generated per group for spawn=True) each worker then proves it by
challenge-response and gets a session key; every token message carries an
HMAC tag under it and every batch control message a tag too, so a worker
without the secret, or a forged, altered or replayed message, is refused
naming the device (docs/security.md). Without a secret a non-loopback
init_method is refused unless insecure=True. Then per micro-batch the aggregator sends a
control tensor (batch id, shape, dtypes) and the images (uint8 when given
uint8, else float32) to every device and posts a receive for its
`devit_ext.wire` message; two micro-batches are in flight, so workers compute
batch k + 1 while this process decodes and fuses batch k (`ensemble_fusion`
per fusion branch for int8; the fusion head's linears for fp16/fp32).

Faults. Every receive waits with a deadline. Not with Gloo's own
`Work.wait(timeout)`: on expiry Gloo closes *every* connection of the group
("Application timeout caused pair closure"), so one slow device would take the
healthy ones down with it, and `Work.is_completed()` does not report a Gloo
receive as done until someone waits on it. Instead one waiter thread per device (_waiters.py)
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

Between batches and between calls a keep-alive thread (_heartbeat.py) sends
each worker that asks for them (its hello declares an idle bound) a small
control message whenever nothing else went to it for a second: an idle
aggregator keeps its workers, a stopped or vanished one makes them exit
within their --timeout.
"""
from __future__ import annotations

import atexit
import threading
import time
import weakref
from typing import Any

import torch

from .. import auth, ops, protocol, wire
from ..checks import is_int, is_number
from . import _proto, _waiters, common
from ._group import DeviceError, DevicesError, DistributedError, WorkerGroup, WorkerRefused  # noqa: F401 - public errors

ENGINE_OPTS = ("init_method", "world_size", "spawn", "backend", "threads", "worker_device", "rendezvous_timeout",
               "pipeline_depth", "secret", "insecure")
SPAWN_KEY = "spawn"


_LOCK = threading.RLock()
_SESSIONS: dict[str, WorkerGroup] = {}
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
# The registry of groups
# ---------------------------------------------------------------------------


def sessions() -> dict[str, dict]:
    """What groups this process holds: key -> {init_method, world_size, spawned, worker_pids, dead devices}."""
    with _LOCK:
        return {
            k: {
                "init_method": s.init_method_used,
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
                 worker_device, secret=None) -> tuple[WorkerGroup, bool]:
    s = _SESSIONS.get(key)
    if s is not None:
        reason = None
        if s.world != world or s.backend != backend or s.spawned != bool(spawn):
            reason = (f"the group at {key} has world size {s.world}, backend {s.backend}, spawned={s.spawned}; "
                      f"this call needs world size {world}, backend {backend}, spawned={bool(spawn)}")
        elif secret is not None and s.secret != secret or secret is None and not s.spawned and s.secret is not None:
            reason = "respawn" if s.spawned else f"the group at {key} was opened with another secret"
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
    if spawn and secret is None:
        secret = auth.as_secret(auth.new_secret())  # one per group of spawned workers
    s = WorkerGroup(key, init_method, world, backend, bool(spawn), secret)
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
        rendezvous_timeout: float | None = None, pipeline_depth: int = 2, return_stats: bool = True,
        request: common.Request | None = None, secret: str | bytes | None = None, insecure: bool = False, **unknown):
    """Validated raw images -> (logits float32 (B, C) on the images' device, Stats).

    init_method: tcp://HOST:PORT (rank 0 = this process hosts the rendezvous)
    or env://; world_size: devices + 1 (checked against the model). spawn: start
    one local worker per device on loopback (init_method optional, a free port
    is picked). backend: "gloo" (default) or "nccl" (only where available).
    device: where the fusion runs (default: the model's device). dtype: the
    workers' compute dtype (default fp32 on CPU). threads: torch threads per
    spawned worker. worker_device: spawned workers' --device.
    rendezvous_timeout: default `timeout`, at least 120 s for spawned workers.
    pipeline_depth: micro-batches in flight per device (>= 1). secret: shared
    with the workers (str or bytes, >= 16 bytes; default $DEVIT_SECRET; spawn:
    generated per group when neither is set). insecure: allow a non-loopback
    init_method without a secret (docs/security.md). request: the
    `common.Request` that `collaborate` resolved (then the arguments it covers
    are not checked again); built here when absent.
    """
    if unknown:
        raise TypeError(f"engine='distributed': unknown option(s) {sorted(unknown)}; known: {list(ENGINE_OPTS)}")
    if request is None:
        request = common.resolve_request(model, images, engine="distributed", transfer=transfer, batch_size=batch_size,
                                         timeout=timeout, degrade=degrade, device=device, dtype=dtype)
    transfer, batch_size, timeout, degrade = request.transfer, request.batch_size, request.timeout, request.degrade
    n_dev = model.num_devices
    world = n_dev + 1
    if world_size is not None and not is_int(world_size):
        raise TypeError(f"world_size: expected an int (devices + 1 = {world}), got {world_size!r}")
    if world_size is not None and int(world_size) != world:
        raise ValueError(f"world_size: the model has {n_dev} devices, so the world size is {world} (aggregator + devices), got {world_size}")
    if not isinstance(spawn, bool):
        raise TypeError(f"spawn: expected a bool, got {type(spawn).__name__}")
    if init_method is not None and not isinstance(init_method, str):
        raise TypeError(f"init_method: expected a str 'tcp://HOST:PORT' or 'env://', got {init_method!r}")
    if threads is not None and (not is_int(threads) or threads < 1):
        raise ValueError(f"threads: expected None or a positive int, got {threads!r}")
    if not isinstance(worker_device, str):
        raise TypeError(f"worker_device: expected a device name such as 'cpu' or 'cuda:0', got {worker_device!r}")
    if rendezvous_timeout is not None:
        if not is_number(rendezvous_timeout) or not (0 < float(rendezvous_timeout) < float("inf")):
            raise ValueError(f"rendezvous_timeout: expected None or a positive finite number of seconds, got {rendezvous_timeout!r}")
    if init_method is None and not spawn:
        raise ValueError(
            "engine='distributed' needs init_method='tcp://HOST:PORT' (workers started with `devit-ext worker`) "
            "or spawn=True (local workers on loopback)"
        )
    if not isinstance(insecure, bool):
        raise TypeError(f"insecure: expected a bool, got {type(insecure).__name__}")
    secret = auth.as_secret(secret, "secret") if secret is not None else auth.secret_from_env()
    if init_method is not None:
        host, _, _ = _proto.parse_init_method(init_method)  # clear error before any work
        if not spawn:
            auth.check_secure(host, secret, insecure, secret_hint="secret=... or $DEVIT_SECRET here, "
                              "--secret-file PATH or $DEVIT_SECRET for the workers", insecure_hint="insecure=True")
    backend = backend or "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend: expected 'gloo' or 'nccl', got {backend!r}")
    if not is_int(pipeline_depth) or pipeline_depth < 1:
        raise ValueError(f"pipeline_depth: expected a positive int, got {pipeline_depth!r}")
    dev = request.device
    # the workers compute on their own device: resolve the caller's dtype for it
    wdtype = common.resolve_dtype(request.dtype_arg, torch.device(worker_device) if spawn else torch.device("cpu"))
    if request.image_kind == "float":
        common.check_images_fit(images, wdtype)
    rdv = float(rendezvous_timeout) if rendezvous_timeout is not None else (max(timeout, 120.0) if spawn else timeout)
    key = init_method if init_method is not None else SPAWN_KEY

    with _LOCK:
        t_start = time.perf_counter()
        mhash = model_hash(model)
        s, opened = _get_session(model, mhash, key=key, init_method=init_method, world=world, backend=backend,
                                 spawn=spawn, degrade=degrade, timeout=timeout, rdv_timeout=rdv, threads=threads,
                                 worker_device=worker_device, secret=secret)
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
            authenticated=s.secret is not None,
        )
        return logits.to(images.device), stats


def _run_batches(model, s: WorkerGroup, images, *, transfer, batch_size, timeout, degrade, dev, wdtype, depth):
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
        bid = s.next_id  # the sequence number: every device's message for this batch must carry it
        s.next_id += 1
        c0 = _proto.ctrl(_proto.CTRL_BATCH, bid, tuple(x.shape), img_code, tcode, ccode)
        digest = auth.image_digest(raw[a:b].numpy()) if s.keys else b""
        entry = {"bid": bid, "n": b - a, "ctrl": [], "x": x, "recv": {}, "send": [], "t": {}}
        for i in range(n_dev):
            if i in missing:
                continue
            try:
                c = (_proto.sign_batch_ctrl(c0, s.keys[i], digest) if s.keys else c0).to(s.comm)
                entry["ctrl"].append(c)
                size = wire.message_size(transfer, b - a, T, widths[i], authenticated=bool(s.keys))
                buf = torch.empty(size, dtype=torch.uint8, device=s.comm)
                # every call into the group under the lock: the keep-alive thread sends too (_heartbeat.py),
                # and an NCCL communicator must not be entered from two threads at once
                with s.send_lock:
                    entry["send"].append(s.pg.send([c], i + 1, _proto.TAG_CTRL))
                    entry["send"].append(s.pg.send([x], i + 1, _proto.TAG_IMAGES))
                    if s.heartbeat is not None:
                        s.heartbeat.touch(i)
                    work = s.pg.recv([buf], i + 1, _proto.TAG_TOKENS)
                entry["recv"][i] = (buf, s.waiters[i].submit(work))
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
                _waiters.await_slot(slot, deadline)
                t_done = time.perf_counter()
                m = wire.decode(buf.cpu(), expected_hash=s.hash, device=i, batch_id=entry["bid"], batch_size=entry["n"],
                                num_tokens=T, width=widths[i], transfer=transfer, kind=wire.KIND_TOKENS,
                                key=s.keys.get(i))
            except (_waiters.Timeout, RuntimeError, wire.WireError) as e:
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
        tag_bytes_per_message=wire.TAG_BYTES if s.keys else 0,
        image_bytes_per_image=int(raw[0].numel() * raw.element_size()),
    )
    return logits, stats


def _fuse(model, msgs: dict, widths, dev) -> torch.Tensor:
    """Messages -> logits (B, C) float32: the fusion head, zeros for missing devices."""
    with torch.inference_mode():
        ordered = [msgs[i].token_message().to(dev) if i in msgs else None for i in range(len(widths))]
        return protocol.fuse(ordered, protocol.branches(model.fusion), widths)
