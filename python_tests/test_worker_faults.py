"""External-worker faults the aggregator must name within its timeout, with hand-written fake workers.

A fake worker joins the group exactly as `devit-ext worker` does (the same
store and Gloo group from `engines._proto`) and then misbehaves: `silent` never
sends its hello; `mute` sends a valid hello and then never answers a batch.
One fake worker per test (a one-device model, world size 2), killed at the end.
"""
from __future__ import annotations

import faulthandler
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from _child import child_env

from devit_ext.engines import distributed as D
from devit_ext.model import DeViT, FusionHead, SubViT

TEST_BOUND_S = 240
pytestmark = pytest.mark.slow  # each starts a Python process that imports torch (~10 s on 2 loaded cores)

FAKE = textwrap.dedent("""
    import os, sys, time
    import torch
    from devit_ext import wire
    from devit_ext.engines import _proto
    mode, port, mhash, width = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    _, store = _proto.make_store("127.0.0.1", port, 2, False, 120.0)
    store.set("joined/1", str(os.getpid()))
    pg = _proto.make_group(store, 1, 2, 120.0, "gloo", "127.0.0.1")
    print("joined", flush=True)
    if mode == "mute":
        pg.send([wire.encode_hello(mhash, 0, 1, width)], 0, _proto.TAG_HELLO).wait()
        c = torch.zeros(_proto.CTRL_LEN, dtype=torch.int64)
        pg.recv([c], 0, _proto.TAG_CTRL).wait()
        print("got a batch, not answering", flush=True)
    time.sleep(600)
""")


@pytest.fixture(autouse=True)
def _watchdog():
    faulthandler.dump_traceback_later(TEST_BOUND_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_device_model() -> DeViT:
    torch.manual_seed(0)
    cfg = dict(img_size=[16, 16], patch_size=[8, 8], in_chans=3, embed_dim=16, head_dim=8,
               blocks=[dict(num_heads=2, mlp_hidden=32)], num_classes=3, distilled=False, num_prefix_tokens=1,
               no_embed_class=False, layer_scale=False, qkv_bias=True, patch_bias=True, pre_norm=False,
               norm_eps=1e-6, mean=[0.5] * 3, std=[0.25] * 3)
    meta = dict(img_size=[16, 16], in_chans=3, mean=[0.5] * 3, std=[0.25] * 3, patch_size=[8, 8])
    return DeViT([SubViT(cfg)], [[0, 1, 2]], FusionHead([16], 24, 3), meta).eval()


def start_fake(tmp_path, mode, port, model):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE)
    env = child_env(OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(script), mode, str(port), model.content_hash(), "16"],
                            cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def stop(p):
    if p.poll() is None:
        p.kill()
    p.wait(timeout=30)
    return p.stdout.read().decode()


def _images():
    return torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_no_hello_within_the_timeout(tmp_path):
    m = one_device_model()
    port = free_port()
    init = f"tcp://127.0.0.1:{port}"
    p = start_fake(tmp_path, "silent", port, m)
    try:
        with pytest.raises(D.DeviceError, match=r"no valid hello from device 0 \(rank 1\): no hello within 2 s") as e:
            D.run(m, _images(), init_method=init, world_size=2, timeout=2.0, rendezvous_timeout=180)
        assert e.value.devices == [0]
        assert init not in D.sessions()  # nothing half-open is kept
    finally:
        log = stop(p)
        D.shutdown(init)
    assert "joined" in log, log


@pytest.mark.parametrize("degrade", [False, True])
def test_no_device_answered(tmp_path, degrade):
    m = one_device_model()
    port = free_port()
    init = f"tcp://127.0.0.1:{port}"
    p = start_fake(tmp_path, "mute", port, m)
    try:
        want = (r"no device answered micro-batch 0 \(device 0 \(rank 1\): no message within the timeout of 2 s"
                if degrade else r"micro-batch 0 failed: device 0 \(rank 1\): no message within the timeout of 2 s")
        with pytest.raises(D.DeviceError, match=want) as e:
            D.run(m, _images(), init_method=init, world_size=2, timeout=2.0, rendezvous_timeout=180, degrade=degrade)
        assert e.value.devices == [0]
    finally:
        log = stop(p)
        D.shutdown(init)
    assert "got a batch" in log, log
