"""Transport shared by the distributed aggregator and its workers (internal).

Both sides build the group the same way: a `TCPStore` (hosted by rank 0, the
aggregator, unless torchrun's agent hosts it) under a `PrefixStore`, and a
`ProcessGroupGloo` (or NCCL) constructed directly, not through
`init_process_group`: no global default group is touched, so a program can
hold several groups (one per `init_method`), tear one down after a fault and
build a new one, and still use `torch.distributed` for its own purposes.

Aggregator -> worker, per micro-batch: a control tensor (int64, CTRL_LEN) on
TAG_CTRL, then the images on TAG_IMAGES. Worker -> aggregator: a hello
(`wire.encode_hello`) once after the rendezvous, then one `wire` message per
batch on TAG_TOKENS.

With a secret (devit_ext.auth, docs/security.md), between the hello and the
first batch: the aggregator sends CTRL_AUTH (its nonce), the worker answers on
TAG_AUTH (its nonce and proof), the aggregator sends CTRL_AUTH_OK (its proof);
batch control messages then carry a 16-byte tag in their last two slots.

Keep-alive (CTRL_KEEPALIVE): a worker's hello declares its idle bound (its
--timeout; 0 from a worker that takes none). To each such worker the aggregator
sends a keep-alive control message once its group is open, and then whenever
nothing went to that worker on TAG_CTRL for `keepalive_interval(bound)` (1 s, or
a quarter of the bound if smaller): slots 0 magic, 1 kind, 2 its sequence
number (1, 2, ... per device), 3 the interval in ms, 4..9 zero, 10..11 the tag
(as a batch control message's, over fields 0..9 and no images; zero without a
secret). A worker that heard one bounds its wait for the next batch by
--timeout: a stopped or vanished aggregator ends it (`_heartbeat.py`).
Both ways compatible with the versions before: such a worker's hello says 0
(no keep-alives go to it), and such an aggregator reads no hello's
compute-seconds field and sends none (the worker then waits as before).

Sockets listen only where the init_method says: the store on the host's own
address (`host_store` binds the socket itself; TCPStore alone listens on every
interface), Gloo on the address that reaches the host (loopback for loopback).
"""
from __future__ import annotations

import datetime
import os
import socket
import struct
import urllib.parse

import torch

from .. import auth

CTRL_MAGIC = 0x44655669543031  # "DeViT01"
CTRL_LEN = 12
CTRL_BATCH, CTRL_SHUTDOWN, CTRL_REFUSE, CTRL_AUTH, CTRL_AUTH_OK, CTRL_KEEPALIVE = 1, 2, 3, 4, 5, 6
KEEPALIVE_S = 1.0  # the aggregator's keep-alive interval, unless a quarter of a worker's idle bound is less
MIN_KEEPALIVE_S = 0.05
# why a worker is refused (slot 2 of CTRL_REFUSE), and what it is told
REFUSE_MODEL, REFUSE_NO_SECRET, REFUSE_WRONG_SECRET, REFUSE_UNEXPECTED_SECRET = 1, 2, 3, 4
REFUSE_TEXT = {
    REFUSE_MODEL: "its model is not the aggregator's; start it with the same saved model",
    REFUSE_NO_SECRET: "it holds no secret and the aggregator requires one: pass --secret-file PATH or set DEVIT_SECRET",
    REFUSE_WRONG_SECRET: "its secret is not the aggregator's (the challenge failed)",
    REFUSE_UNEXPECTED_SECRET: "it holds a secret but the aggregator runs without one: give the aggregator the same "
                              "secret (secret=... or DEVIT_SECRET)",
}
AUTH_ANSWER_BYTES = 2 * auth.NONCE_BYTES  # the worker's nonce and proof

TAG_CTRL, TAG_IMAGES, TAG_TOKENS, TAG_HELLO, TAG_AUTH = 11, 12, 13, 14, 15

IMAGE_DTYPES = {1: torch.uint8, 2: torch.float32, 3: torch.float16, 4: torch.bfloat16}
IMAGE_CODES = {v: k for k, v in IMAGE_DTYPES.items()}
COMPUTE_DTYPES = {1: torch.float32, 2: torch.bfloat16, 3: torch.float16}
COMPUTE_CODES = {v: k for k, v in COMPUTE_DTYPES.items()}

STORE_PREFIX = "devit_ext/"
# "no bound" for Gloo: the aggregator's waiter threads (which keep their own deadlines), and a worker's
# wait between batches before it has heard a keep-alive (an aggregator that sends none may idle for long)
IDLE = datetime.timedelta(days=7)


def td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(float(seconds), 0.001))


def ctrl(kind: int, batch_id: int = 0, shape=(0, 0, 0, 0), image_code: int = 0, transfer_code: int = 0,
         compute_code: int = 0) -> torch.Tensor:
    b, c, h, w = shape
    return torch.tensor(
        [CTRL_MAGIC, kind, batch_id, b, c, h, w, image_code, transfer_code, compute_code, 0, 0], dtype=torch.int64
    )


def ctrl_bytes(c: torch.Tensor) -> torch.Tensor:
    """A control message: (CTRL_LEN,) int64 <-> its 96 bytes (little-endian, as the tensor lies in memory)."""
    return c.contiguous().view(torch.uint8)


def ctrl_auth(kind: int, value: bytes) -> torch.Tensor:
    """CTRL_AUTH (a nonce) / CTRL_AUTH_OK (a proof): 32 bytes in slots 2..5."""
    c = ctrl(kind)
    c[2:6] = torch.tensor(struct.unpack("<4q", value), dtype=torch.int64)
    return c


def ctrl_value(c: list[int]) -> bytes:
    return struct.pack("<4q", *c[2:6])


def sign_batch_ctrl(c: torch.Tensor, key: bytes, image_digest: bytes) -> torch.Tensor:
    """A copy of a batch control message (or keep-alive: digest b"") with its tag (fields 0..9 and the
    images' sha256) in slots 10, 11."""
    c = c.clone()
    t = auth.ctrl_tag(key, struct.pack("<10q", *c[:10].tolist()), image_digest)
    c[10:12] = torch.tensor(struct.unpack("<2q", t), dtype=torch.int64)
    return c


def batch_ctrl_ok(c: list[int], key: bytes, image_digest: bytes) -> bool:
    """Whether a received batch control message's tag matches its fields and the images received."""
    return auth.verify(key, struct.pack("<2q", *c[10:12]), auth.CTRL_LABEL, struct.pack("<10q", *c[:10]),
                       image_digest)


MAX_BATCH_BYTES = 4 << 30  # images of one micro-batch; anything above is not an aggregator of this engine


def batch_ctrl_error(c: list[int], chw: tuple[int, int, int]) -> str | None:
    """Why a batch control message cannot be served (None when it can): kind, codes, and the image
    shape against the model's (C, H, W), bounded in bytes, before anything is allocated."""
    from .. import wire

    if c[1] != CTRL_BATCH:
        return f"unknown kind {c[1]}"
    if c[7] not in IMAGE_DTYPES or c[8] not in wire.TRANSFER_NAMES or c[9] not in COMPUTE_DTYPES:
        return f"unknown image/transfer/compute code {c[7:10]}"
    b, shape = c[3], tuple(c[4:7])
    if shape != tuple(chw):
        return f"image shape {shape}, this model takes {tuple(chw)}"
    nbytes = b * chw[0] * chw[1] * chw[2] * IMAGE_DTYPES[c[7]].itemsize
    if not 1 <= b or nbytes > MAX_BATCH_BYTES:
        return f"batch of {b} images ({nbytes} bytes; at most {MAX_BATCH_BYTES})"
    return None


def keepalive_interval(idle_bound_s: float) -> float:
    """Seconds between keep-alives to a worker whose hello declared `idle_bound_s` (> 0): well under it."""
    return max(MIN_KEEPALIVE_S, min(KEEPALIVE_S, float(idle_bound_s) / 4))


def keepalive_ctrl(seq: int, interval_s: float, key: bytes | None) -> torch.Tensor:
    """The seq-th keep-alive to a device (tagged under its session key when the group is authenticated)."""
    c = ctrl(CTRL_KEEPALIVE, seq)
    c[3] = max(1, round(interval_s * 1000))
    return sign_batch_ctrl(c, key, b"") if key is not None else c


def keepalive_error(c: list[int], key: bytes | None, last_seq: int) -> str | None:
    """Why a received keep-alive is not one the aggregator made (None when it is)."""
    if not 1 <= c[3] < 1 << 31 or any(c[4:10]):
        return f"malformed keep-alive {c}"
    if key is not None:
        if not batch_ctrl_ok(c, key, b""):
            return "a keep-alive whose tag does not match it (forged or altered on the way)"
        if c[2] <= last_seq:
            return f"keep-alive {c[2]} after {last_seq} (a replayed keep-alive)"
    return None


def parse_init_method(init_method: str) -> tuple[str, int, bool]:
    """tcp://HOST:PORT or env:// -> (host, port, whether torchrun's agent hosts the store)."""
    if init_method.startswith("env://"):
        try:
            host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        except (KeyError, ValueError) as e:
            raise ValueError(f"init_method: env:// needs MASTER_ADDR and MASTER_PORT in the environment ({e})") from None
        return host, port, os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    u = urllib.parse.urlparse(init_method)
    if u.scheme != "tcp" or not u.hostname or u.port is None:
        raise ValueError(f"init_method: expected 'tcp://HOST:PORT' or 'env://', got {init_method!r}")
    return u.hostname, int(u.port), False


def make_store(host: str, port: int, world_size: int, is_master: bool, timeout: float):
    """(store, prefixed store). With is_master the store is a *client* of a separate server
    (`host_store`), returned first: see `host_store` for why."""
    import torch.distributed as dist

    if is_master:
        server = host_store(host, port, world_size, timeout)
        client = dist.TCPStore(host, server.port, world_size, is_master=False, timeout=td(timeout))
        return server, dist.PrefixStore(STORE_PREFIX, client)
    store = dist.TCPStore(host, port, world_size, is_master=False, timeout=td(timeout))
    return store, dist.PrefixStore(STORE_PREFIX, store)


def host_store(host: str, port: int, world_size: int, timeout: float):
    """The rendezvous server alone. The process group and its pending receives hold only a client
    store, so dropping this one object closes the listening port at once, even while a receive from
    a hung worker still holds the group (and its client) in a waiter thread.

    It listens only on `host`'s address: the socket is bound here and handed to the TCPStore (which
    owns and closes it), since a TCPStore given only a port listens on every interface."""
    import torch.distributed as dist

    sock = listen_socket(host, port)
    port = sock.getsockname()[1]
    fd = sock.detach()
    try:
        return dist.TCPStore(host, port, world_size, is_master=True, timeout=td(timeout), wait_for_workers=False,
                             master_listen_fd=fd)
    except BaseException:
        os.close(fd)
        raise


def bind_address(host: str) -> tuple[int, tuple]:
    """(address family, sockaddr with port 0) that the store for `host` listens on: loopback names
    -> 127.0.0.1, anything else -> the first address it resolves to (which must be this machine's)."""
    if host == "localhost" or auth.is_loopback(host) and ":" not in host:
        return socket.AF_INET, ("127.0.0.1", 0)
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    infos.sort(key=lambda ai: ai[0] != socket.AF_INET)  # IPv4 first, as the TCPStore client tries it
    fam, _, _, _, addr = infos[0]
    return fam, (addr[0], 0, *addr[2:])


def listen_socket(host: str, port: int) -> socket.socket:
    fam, addr = bind_address(host)
    sock = socket.socket(fam, socket.SOCK_STREAM)
    try:
        # a restarted group can take the same port while old connections are in TIME_WAIT
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr[0], port, *addr[2:]))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def local_address(host: str) -> str:
    """This machine's address on the route to `host` (no packet is sent): where Gloo should listen."""
    if host == "localhost" or auth.is_loopback(host):
        return "127.0.0.1" if ":" not in host else "::1"
    fam, addr = bind_address(host)
    with socket.socket(fam, socket.SOCK_DGRAM) as u:
        u.connect((addr[0], 9, *addr[2:]))
        return u.getsockname()[0]


def claim_rank(store, rank: int) -> str | None:
    """Take `rank` in the rendezvous (atomically: the store's counter); None when taken, else the pid of
    the worker that already holds it (this one is a duplicate, and says so in the store)."""
    if store.add(f"claims/{rank}", 1) == 1:
        store.set(f"joined/{rank}", str(os.getpid()))
        return None
    store.set(f"duplicate/{rank}", str(os.getpid()))
    store.add("duplicates", 1)
    try:
        return store.get(f"joined/{rank}").decode()
    except Exception:  # noqa: BLE001 - the holder has not written its pid yet
        return "unknown"


def make_group(store, rank: int, world_size: int, timeout: float, backend: str = "gloo", host: str = "127.0.0.1"):
    """The process group over `store`; its default timeout bounds the connection set-up."""
    import torch.distributed as dist

    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = td(timeout)
        if os.environ.get("GLOO_SOCKET_IFNAME"):
            dev = dist.ProcessGroupGloo.create_default_device()  # the interface the user named
        else:
            # loopback stays loopback; otherwise only the address on the route to the aggregator
            dev = dist.ProcessGroupGloo.create_device(hostname=local_address(host))
        opts._devices = [dev]
        pg = dist.ProcessGroupGloo(store, rank, world_size, opts)
    elif backend == "nccl":
        if not (dist.is_nccl_available() and torch.cuda.is_available()):
            raise RuntimeError("backend='nccl' asked for but NCCL or a CUDA GPU is not available here; use 'gloo'")
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = td(timeout)
        pg = dist.ProcessGroupNCCL(store, rank, world_size, opts)
    else:
        raise ValueError(f"backend: expected 'gloo' or 'nccl', got {backend!r}")
    return pg

