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
"""
from __future__ import annotations

import datetime
import os
import urllib.parse

import torch

CTRL_MAGIC = 0x44655669543031  # "DeViT01"
CTRL_LEN = 12
CTRL_BATCH, CTRL_SHUTDOWN, CTRL_REFUSE = 1, 2, 3

TAG_CTRL, TAG_IMAGES, TAG_TOKENS, TAG_HELLO = 11, 12, 13, 14

IMAGE_DTYPES = {1: torch.uint8, 2: torch.float32, 3: torch.float16, 4: torch.bfloat16}
IMAGE_CODES = {v: k for k, v in IMAGE_DTYPES.items()}
COMPUTE_DTYPES = {1: torch.float32, 2: torch.bfloat16, 3: torch.float16}
COMPUTE_CODES = {v: k for k, v in COMPUTE_DTYPES.items()}

STORE_PREFIX = "devit_ext/"
# what a worker waits between batches: the aggregator may be idle for long; a
# closed connection (aggregator gone) still ends the wait at once
IDLE = datetime.timedelta(days=7)


def td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(float(seconds), 0.001))


def ctrl(kind: int, batch_id: int = 0, shape=(0, 0, 0, 0), image_code: int = 0, transfer_code: int = 0,
         compute_code: int = 0) -> torch.Tensor:
    b, c, h, w = shape
    return torch.tensor(
        [CTRL_MAGIC, kind, batch_id, b, c, h, w, image_code, transfer_code, compute_code, 0, 0], dtype=torch.int64
    )


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
    a hung worker still holds the group (and its client) in a waiter thread."""
    import torch.distributed as dist

    return dist.TCPStore(host, port, world_size, is_master=True, timeout=td(timeout), wait_for_workers=False)


def make_group(store, rank: int, world_size: int, timeout: float, backend: str = "gloo", host: str = "127.0.0.1"):
    """The process group over `store`; its default timeout bounds the connection set-up."""
    import torch.distributed as dist

    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = td(timeout)
        if host in ("127.0.0.1", "localhost"):
            dev = dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")  # loopback stays loopback
        else:
            dev = dist.ProcessGroupGloo.create_default_device()  # honours GLOO_SOCKET_IFNAME
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

