"""One edge device of a distributed run: `devit-ext worker` (or `python -m devit_ext.engines.worker`).

    devit-ext worker --rank R --world-size W --init-method tcp://HOST:PORT --model PATH [--device cpu|cuda] [--timeout S]
                     [--secret-file PATH | $DEVIT_SECRET] [--insecure]
                     [--runtime torch|onnxruntime|executorch]

Rank 0 is the aggregator (the process calling `collaborate(..., engine="distributed")`);
rank R >= 1 runs device R - 1's sub-model of the saved DeViT at PATH. Under
torchrun leave out --rank/--world-size/--init-method: RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT are read from the environment.

The worker joins the group (within --timeout), sends a hello (its model's
content hash, device index, token count and width), then per micro-batch
receives the images, runs its sub-model, fuses the final LayerNorm with int8
quantisation (`layernorm_quantize_int8`; a LayerNorm and a cast for fp16/fp32)
(`devit_ext.protocol.encode`) and returns one `devit_ext.wire` message. It sends batch k while it already
waits for batch k + 1. It exits 0 on the aggregator's shutdown message, 3 when
the aggregator refuses it (another model, no or another secret) or fails to
prove the secret, 1 when the aggregator goes away or a wait runs past
--timeout, 2 on a usage error (also: its --rank already taken).

With a secret (--secret-file, else $DEVIT_SECRET, which the worker then
removes from its environment) the hello says so, the worker answers the
aggregator's challenge and checks the aggregator's proof, tags every token
message and checks every batch control message's tag (docs/security.md).
Without one, a non-loopback --init-method is refused unless --insecure.

Every wait (connecting, the hello and the challenge, each image receive and
send, and the wait for the next batch) is bounded by --timeout: a watchdog
ends the process 1 s after it, whatever Gloo or the store do. The hello
declares --timeout as the worker's idle bound, so the aggregator sends
keep-alives (every second, or a quarter of --timeout if less) while it has no
batch for it (engines/_heartbeat.py): an idle aggregator keeps its workers,
one that is stopped, hung or unreachable makes them exit 1 within --timeout.
The wait for the next batch is bounded from the first keep-alive on: an
aggregator that sends none (a version before them) is waited for as before.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

EXIT_OK, EXIT_LOST, EXIT_USAGE, EXIT_REFUSED, EXIT_ORPHAN = 0, 1, 2, 3, 4


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rank", type=int, default=None, help="this worker's rank, >= 1 (device rank - 1); default: $RANK")
    p.add_argument("--world-size", type=int, default=None, help="devices + 1; default: $WORLD_SIZE")
    p.add_argument("--init-method", default=None,
                   help="tcp://HOST:PORT of the aggregator (rank 0), or env:// (default: env:// under torchrun)")
    p.add_argument("--model", required=True, help="directory of a saved DeViT (DeViT.save / devit_ext.load)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds for the rendezvous, for each transfer, and without a word from the aggregator "
                        "between batches (it sends keep-alives while idle) (default 60)")
    p.add_argument("--backend", default="gloo", choices=("gloo", "nccl"), help="torch.distributed backend (default gloo)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--secret-file", default=None,
                   help="file holding the secret shared with the aggregator (default: $DEVIT_SECRET)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --init-method without a secret (unauthenticated: trusted networks only)")
    p.add_argument("--runtime", default="torch", choices=("torch", "onnxruntime", "executorch"),
                   help="what runs the sub-model up to its int8 token (engines/runtime.py; onnxruntime and "
                        "executorch: CPU, float32 compute); the message is the same (default torch)")
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)  # spawned: exit with the aggregator


def _say(prefix: str, text: str) -> None:
    print(f"devit-ext worker{prefix}: {text}", file=sys.stderr, flush=True)


def _watch_parent(pid: int) -> None:
    def loop():
        while True:
            time.sleep(0.5)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(EXIT_ORPHAN)
            except PermissionError:
                pass
            if os.getppid() == 1:
                os._exit(EXIT_ORPHAN)

    threading.Thread(target=loop, name="devit-parent-watch", daemon=True).start()


def run(args) -> int:
    rank = args.rank if args.rank is not None else _env_int("RANK")
    world = args.world_size if args.world_size is not None else _env_int("WORLD_SIZE")
    init = args.init_method or ("env://" if "MASTER_ADDR" in os.environ else None)
    if rank is None or world is None or init is None:
        _say("", "give --rank, --world-size and --init-method (or run under torchrun, which sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)")
        return EXIT_USAGE
    prefix = f" (rank {rank}, device {rank - 1})"
    if not (1 <= rank < world):
        _say(prefix, f"rank must be in 1..{world - 1} (rank 0 is the aggregator), got {rank}")
        return EXIT_USAGE
    if args.timeout is None or not args.timeout > 0:
        _say(prefix, f"--timeout must be positive, got {args.timeout}")
        return EXIT_USAGE
    if args.parent_pid:
        _watch_parent(args.parent_pid)

    from .. import auth

    try:
        secret = auth.read_secret_file(args.secret_file) if args.secret_file else auth.secret_from_env()
    except (auth.SecretError, TypeError) as e:
        _say(prefix, str(e))
        return EXIT_USAGE
    os.environ.pop(auth.ENV, None)  # nothing this process starts inherits it

    import torch

    from . import _proto, _waiters

    if args.threads:
        torch.set_num_threads(max(1, int(args.threads)))
    try:
        host, port, agent_store = _proto.parse_init_method(init)
    except ValueError as e:
        _say(prefix, str(e))
        return EXIT_USAGE
    try:
        auth.check_secure(host, secret, args.insecure, secret_hint="--secret-file PATH or $DEVIT_SECRET here, the "
                          "same as secret=... or $DEVIT_SECRET for the aggregator", insecure_hint="--insecure")
    except auth.SecretError as e:
        _say(prefix, f"--init-method {init}: {e}")
        return EXIT_USAGE
    try:
        w = _Worker(args.model, rank, world, args.device, args.timeout, secret, getattr(args, "runtime", "torch"))
    except Exception as e:  # noqa: BLE001 - a worker reports and exits
        _say(prefix, f"cannot start: {type(e).__name__}: {e}")
        return EXIT_USAGE
    try:
        w.warm_up()  # imports the ops and runs one image, so the first batch is not slower than the timeout allows
    except Exception as e:  # noqa: BLE001
        _say(prefix, f"cannot run its sub-model: {type(e).__name__}: {e}")
        return EXIT_USAGE
    dog = _waiters.Watchdog(lambda text: _say(prefix, text), EXIT_LOST)
    _say(prefix, f"joining the group at {init} (timeout {args.timeout:g} s)")
    t_end = time.monotonic() + args.timeout
    dog.arm(args.timeout, f"joining the group at {init}")
    try:
        _, store = _proto.make_store(host, port, world, False, args.timeout)
        holder = _proto.claim_rank(store, rank)
        if holder is not None:
            _say(prefix, f"rank {rank} is already taken in the group at {init} (by the worker with pid {holder}, "
                         f"maybe on another host): give each worker its own --rank (1..{world - 1}); exiting")
            return EXIT_USAGE
        # the group's connect gets what is left of the bound, not a second one
        pg = _proto.make_group(store, rank, world, max(0.5, t_end - time.monotonic()), args.backend, host)
    except Exception as e:  # noqa: BLE001
        _say(prefix, f"rendezvous at {init} failed within {args.timeout:g} s: {type(e).__name__}: {e}")
        return EXIT_LOST
    finally:
        dog.disarm()
    code = w.serve(pg, args.backend, prefix, dog)
    # skip the interpreter teardown (~1 s with a Gloo group, seconds with a live one), which only delays
    # the aggregator's shutdown (spawned) and the exit that --timeout bounds; nothing is left to flush but stdio
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else None


class _Worker:
    def __init__(self, path: str, rank: int, world: int, device: str, timeout: float, secret: bytes | None = None,
                 runtime: str = "torch"):
        import torch

        from .. import protocol
        from ..model import load
        from .runtime import SubModelRunner

        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA GPU here")
        model = load(path, map_location=self.device)
        if model.num_devices != world - 1:
            raise ValueError(
                f"the model at {path} has {model.num_devices} devices, so the world size must be {model.num_devices + 1}, got {world}"
            )
        self.model = model.eval()
        self.index = rank - 1
        self.sub = model.submodels[self.index]
        self.hash = model.content_hash()
        self.tokens = protocol.tokens_per_image(model)
        self.width = self.sub.embed_dim
        self.timeout = float(timeout)
        self.secret = secret
        self.rank = rank
        self._cast: dict = {}
        self.runner = SubModelRunner(self.sub, runtime, device=self.device, threads=torch.get_num_threads())

    def _sub(self, dtype):
        import torch

        if dtype == torch.float32:
            return self.sub
        if dtype not in self._cast:
            import copy

            self._cast[dtype] = copy.deepcopy(self.sub).to(dtype)
        return self._cast[dtype]

    def warm_up(self):
        import torch

        c, (h, w) = self.model.in_chans, self.model.img_size
        x = torch.zeros(1, c, h, w, dtype=torch.uint8, device=self.device)
        for transfer in ("int8", "fp32"):
            self.compute(x, transfer, torch.float32, 0)

    def compute(self, images, transfer: str, dtype, batch_id: int):
        """Raw images -> wire message (uint8 tensor), and the compute seconds."""
        import torch

        from .. import protocol, wire
        from . import common

        t0 = time.perf_counter()
        with torch.inference_mode():
            x = common.normalise_images(self.model, images, dtype=dtype, device=self.device)
            if self.runner.runtime == "torch":
                f = self._sub(dtype).sender_tokens(x)  # (B, T, d): ViT pre-norm prefix tokens, CCT pooled vector
            elif dtype != torch.float32:
                raise ValueError(f"--runtime {self.runner.runtime} computes in float32; the aggregator asked "
                                 f"for {dtype} (use dtype=torch.float32 or --runtime torch)")
            else:
                f = self.runner(x)  # (B, T, d) pre-norm, same as the torch path up to fp32 rounding
            msg = protocol.encode(f, *self.sub.sender_norm(), transfer)  # CCT: no norm left (eps None)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            return wire.encode(self.hash, self.index, batch_id, q=msg.q, scales=msg.scales, tokens=msg.tokens,
                               compute_s=dt), dt

    def serve(self, pg, backend: str, prefix: str, dog=None) -> int:
        import torch

        from .. import auth, wire
        from . import _proto

        from . import _waiters

        dog = dog or _waiters.NoWatchdog()
        comm = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        tmo = _proto.td(self.timeout)

        def bounded(work, what):
            dog.arm(self.timeout, what)
            try:
                work.wait(tmo)
            finally:
                dog.disarm()

        def recv_ctrl(wait):
            c = torch.zeros(_proto.CTRL_LEN, dtype=torch.int64, device=comm)
            work = pg.recv([c], 0, _proto.TAG_CTRL)
            if wait is None:
                work.wait(_proto.IDLE)
            else:
                bounded(work, wait)
            return c.cpu().tolist()

        def recv_next():
            """The next batch, keep-alive or shutdown; None when nothing came within --timeout."""
            if not last_beat:  # no keep-alive yet: the aggregator may send none (a version before them)
                return recv_ctrl(None)
            t0 = time.monotonic()
            try:
                return recv_ctrl("waiting for a batch or a keep-alive from the aggregator")
            except RuntimeError:
                if time.monotonic() - t0 < 0.9 * self.timeout:
                    raise  # not the bound: the connection closed (the aggregator is gone)
                return None

        pending = None
        key = None
        last_bid = last_beat = 0
        try:
            hello = wire.encode_hello(self.hash, self.index, self.tokens, self.width, holds_secret=self.secret is not None,
                                      idle_bound_s=self.timeout)
            bounded(pg.send([hello.to(comm)], 0, _proto.TAG_HELLO), "sending the hello")
            if self.secret is not None:
                key = self._authenticate(pg, comm, prefix, recv_ctrl, bounded)
                if isinstance(key, int):
                    return key
            while True:
                c = recv_next()
                if c is None:
                    _say(prefix, f"heard nothing from the aggregator for --timeout {self.timeout:g} s (no batch, "
                                 "no keep-alive): it is stopped, hung or unreachable; exiting")
                    return EXIT_LOST
                if c[0] != _proto.CTRL_MAGIC:
                    _say(prefix, f"malformed control message from the aggregator (magic {c[0]:#x}); exiting")
                    return EXIT_LOST
                kind, bid, shape = c[1], c[2], tuple(c[3:7])
                if kind == _proto.CTRL_KEEPALIVE:
                    bad = _proto.keepalive_error(c, key, last_beat)
                    if bad:
                        _say(prefix, f"{bad}; exiting")
                        return EXIT_LOST
                    if not last_beat:
                        _say(prefix, f"the aggregator sends keep-alives every {c[3] / 1000:g} s: waits between "
                                     f"batches are bounded by --timeout {self.timeout:g} s")
                    last_beat = max(bid, 1)
                    continue
                if kind == _proto.CTRL_SHUTDOWN:
                    if pending is not None:
                        bounded(pending, "sending the last message")
                    return EXIT_OK
                if kind == _proto.CTRL_REFUSE:
                    return self._refused(prefix, c[2])
                # checked against the model before anything is allocated
                bad = _proto.batch_ctrl_error(c, (self.model.in_chans, *self.model.img_size))
                if bad is None and key is not None and bid <= last_bid:
                    bad = f"batch id {bid} after {last_bid} (a replayed control message)"
                if bad:
                    _say(prefix, f"malformed control message from the aggregator: {bad}: {c}; exiting")
                    return EXIT_LOST
                images = torch.empty(shape, dtype=_proto.IMAGE_DTYPES[c[7]], device=comm)
                bounded(pg.recv([images], 0, _proto.TAG_IMAGES), f"receiving the images of batch {bid}")
                if key is not None and not _proto.batch_ctrl_ok(c, key, auth.image_digest(images.cpu().numpy())):
                    _say(prefix, f"batch {bid}: the control message's tag does not match it and its images "
                                 "(forged or altered on the way); exiting")
                    return EXIT_LOST
                last_bid = bid
                msg, _ = self.compute(images, wire.TRANSFER_NAMES[c[8]], _proto.COMPUTE_DTYPES[c[9]], bid)
                if key is not None:
                    msg = wire.seal(msg, key)
                if pending is not None:
                    bounded(pending, "sending a message")  # batch k-1 has left before batch k goes out
                out = msg.to(comm)  # stays referenced until the next batch has waited on this send
                pending = pg.send([out], 0, _proto.TAG_TOKENS)
        except RuntimeError as e:
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            _say(prefix, f"lost the aggregator ({text}); exiting")
            return EXIT_LOST
        except Exception as e:  # noqa: BLE001
            _say(prefix, f"failed: {type(e).__name__}: {e}")
            return EXIT_LOST

    def _refused(self, prefix: str, reason: int) -> int:
        from . import _proto

        why = _proto.REFUSE_TEXT.get(reason, f"reason {reason}")
        if reason == _proto.REFUSE_MODEL:
            why = why.replace("its model", f"its model (content hash {self.hash[:16]})")
        _say(prefix, f"the aggregator refused this worker: {why}")
        return EXIT_REFUSED

    def _authenticate(self, pg, comm, prefix, recv_ctrl, bounded):
        """Challenge-response (devit_ext.auth): answer the aggregator's nonce, check its proof of ours.
        Returns the session key, or an exit code."""
        import torch

        from .. import auth, wire
        from . import _proto

        c = recv_ctrl("waiting for the aggregator's challenge")
        if c[0] == _proto.CTRL_MAGIC and c[1] == _proto.CTRL_REFUSE:
            return self._refused(prefix, c[2])
        if c[0] != _proto.CTRL_MAGIC or c[1] != _proto.CTRL_AUTH:
            _say(prefix, f"expected the aggregator's challenge, got control message {c[:2]}; exiting")
            return EXIT_LOST
        nonce_a, nonce_w, h16 = _proto.ctrl_value(c), auth.new_nonce(), wire.hash_bytes(self.hash)
        # answered even when the aggregator's proof will not match: then it can say "wrong secret" too
        answer = torch.frombuffer(bytearray(nonce_w + auth.worker_proof(self.secret, nonce_a, nonce_w, h16, self.rank)),
                                  dtype=torch.uint8).to(comm)
        bounded(pg.send([answer], 0, _proto.TAG_AUTH), "answering the challenge")
        c = recv_ctrl("waiting for the aggregator's proof")
        if c[0] == _proto.CTRL_MAGIC and c[1] == _proto.CTRL_REFUSE:
            return self._refused(prefix, c[2])
        if c[0] != _proto.CTRL_MAGIC or c[1] != _proto.CTRL_AUTH_OK or not auth.verify(
                self.secret, _proto.ctrl_value(c), *auth.aggregator_context(nonce_a, nonce_w, h16, self.rank)):
            _say(prefix, "the aggregator failed to prove the shared secret (another secret, or not the aggregator); "
                         "exiting")
            return EXIT_REFUSED
        return auth.session_key(self.secret, nonce_a, nonce_w, h16, self.rank)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devit_ext.engines.worker", description="one edge device of a distributed DeViT run")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
