"""Distributed engine, wire format and `devit-ext worker`: spawned Gloo workers on loopback.

Spawning is the cost here (every worker imports torch), so workers are spawned
a handful of times in all: one group per model, reused by every test of that
model (the engine's own session registry keeps it between calls), and the
fault tests run last on their group. Every test is bounded by a watchdog
(faulthandler ends the run instead of letting it hang), every wait has a
timeout, and every process started here is killed at the end.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import torch

from devit_ext import ops, wire
from devit_ext.engines import common
from devit_ext.engines import distributed as D
from devit_ext.model import DeViT, FusionHead, SubViT

from _agreement import check_int8 as _check_int8, reference

TEST_BOUND_S = 240  # hard bound per test, rendezvous of a spawned group under load included
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


@pytest.fixture(autouse=True)
def _watchdog():
    faulthandler.dump_traceback_later(TEST_BOUND_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module", autouse=True)
def _close_groups():
    yield
    D.shutdown()


def make_model(distilled=False, widths=(32, 32), classes=10, seed=0, depth=2, img=32, patch=8) -> DeViT:
    """A tiny random DeViT built from model.py's classes (random but well-scaled weights)."""
    torch.manual_seed(seed)
    n = len(widths)
    groups = [list(range(i, classes, n)) for i in range(n)]
    subs = []
    for w, grp in zip(widths, groups):
        cfg = dict(img_size=[img, img], patch_size=[patch, patch], in_chans=3, embed_dim=w, head_dim=16,
                   blocks=[dict(num_heads=max(1, w // 16), mlp_hidden=2 * w)] * depth, num_classes=len(grp),
                   distilled=distilled, num_prefix_tokens=2 if distilled else 1, no_embed_class=False,
                   layer_scale=False, qkv_bias=True, patch_bias=True, pre_norm=False, norm_eps=1e-6,
                   mean=MEAN, std=STD)
        m = SubViT(cfg)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "norm" in name and name.endswith("weight"):
                    p.copy_(1 + 0.1 * torch.randn_like(p))
                elif p.dim() == 3 or name.endswith("bias"):
                    p.copy_(0.1 * torch.randn_like(p))
        subs.append(m)
    fusion = FusionHead(widths, 48, classes, distilled)
    meta = dict(img_size=[img, img], in_chans=3, mean=MEAN, std=STD, patch_size=[patch, patch])
    return DeViT(subs, groups, fusion, meta).eval()


def uint8_images(n, seed=1):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def check_int8(out, model, images, missing=()):
    return _check_int8(out, model, images, missing, min_overall=0.97)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_pids() -> list[int]:
    return D.sessions()[D.SPAWN_KEY]["worker_pids"]


# ---------------------------------------------------------------------------
# wire: no processes
# ---------------------------------------------------------------------------

H = "ab" * 32  # a content hash (sha256 hex)


@pytest.mark.parametrize("T", [1, 2])
def test_wire_round_trip(T):
    B, d = 5, 24
    x = torch.randn(B, T, d)
    q, s = ops.quantize_int8(x)
    buf = wire.encode(H, 3, 17, q=q, scales=s, compute_s=0.25)
    assert buf.dtype == torch.uint8 and buf.dim() == 1
    assert buf.numel() == wire.HEADER_SIZE + B * T * (d + 4) == wire.message_size("int8", B, T, d)
    assert buf.numel() - wire.HEADER_SIZE == B * common.message_bytes(d, "int8", T)
    m = wire.decode(buf, expected_hash=H, device=3, batch_id=17, batch_size=B, num_tokens=T, width=d, transfer="int8")
    assert (m.device, m.batch_id, m.batch_size, m.num_tokens, m.width, m.transfer) == (3, 17, B, T, d, "int8")
    assert m.compute_s == 0.25 and m.model_hash == bytes.fromhex(H)[:16]
    assert torch.equal(m.q, q) and torch.equal(m.scales, s)
    assert (m.dequantized() - x).abs().max() <= s.max() / 2 + 1e-6
    for dt, name in ((torch.float16, "fp16"), (torch.float32, "fp32")):
        buf = wire.encode(H, 0, 2, tokens=x.to(dt))
        assert buf.numel() == wire.message_size(name, B, T, d)
        m = wire.decode(buf, expected_hash=H, device=0, transfer=name, num_tokens=T, width=d)
        assert m.tokens.dtype == dt and torch.equal(m.tokens, x.to(dt))
    h = wire.decode(wire.encode_hello(H, 2, T, d), kind=wire.KIND_HELLO, device=2, expected_hash=H)
    assert (h.device, h.num_tokens, h.width, h.transfer) == (2, T, d, None)


def test_wire_odd_width_alignment():
    q, s = ops.quantize_int8(torch.randn(3, 1, 7))
    m = wire.decode(wire.encode(H, 0, 1, q=q, scales=s))
    assert torch.equal(m.q, q) and torch.equal(m.scales, s)


def _msg(B=2, T=1, d=8, dev=1, bid=5):
    q, s = ops.quantize_int8(torch.randn(B, T, d))
    return wire.encode(H, dev, bid, q=q, scales=s)


def _patched(buf, offset, raw: bytes):
    b = buf.clone()
    b[offset : offset + len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    return b


@pytest.mark.parametrize(
    "mutate, kw, match",
    [
        (lambda b: b[:10], {}, "truncated.*shorter than the 64-byte header"),
        (lambda b: b[:-3], {}, "truncated"),
        (lambda b: torch.cat([b, torch.zeros(4, dtype=torch.uint8)]), {}, "too long"),
        (lambda b: _patched(b, 0, b"XXXX"), {}, "bad magic"),
        (lambda b: _patched(b, 4, (9).to_bytes(2, "little")), {}, "format version 9"),
        (lambda b: _patched(b, 6, bytes([7])), {}, "unknown message kind"),
        (lambda b: _patched(b, 7, bytes([9])), {}, "unknown transfer code"),
        (lambda b: _patched(b, 44, (3).to_bytes(4, "little")), {}, "header declares a 3-byte payload"),
        (lambda b: _patched(b, 64, b"\x00\x00\xc0\x7f"), {}, "scales are negative, NaN"),
        (lambda b: b, {"expected_hash": "cd" * 32}, "runs a different model"),
        (lambda b: b, {"device": 2}, "header says device 1"),
        (lambda b: b, {"batch_id": 6}, "batch id 5, expected 6"),
        (lambda b: b, {"batch_size": 3}, "batch size 2, expected 3"),
        (lambda b: b, {"width": 16}, "token width 8"),
        (lambda b: b, {"num_tokens": 2}, "1 tokens per image"),
        (lambda b: b, {"transfer": "fp16"}, "transfer int8, expected fp16"),
        (lambda b: b, {"kind": wire.KIND_HELLO}, "expected a hello message"),
        (lambda b: b.view(torch.int8), {}, "expected a 1-D uint8 tensor"),
        (lambda b: b.reshape(1, -1), {}, "expected a 1-D uint8 tensor"),
    ],
)
def test_wire_malformed(mutate, kw, match):
    buf = mutate(_msg())
    kw = dict(kw)
    dev = kw.pop("device", 1)
    with pytest.raises(wire.WireError, match=match) as e:
        wire.decode(buf, device=dev, **kw)
    assert f"from device {dev}" in str(e.value)


def test_wire_encode_rejects_bad_input():
    q, s = ops.quantize_int8(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="1 or 2 tokens"):
        wire.encode(H, 0, 0, q=q, scales=s)
    with pytest.raises(ValueError, match="int8"):
        wire.encode(H, 0, 0, q=q.float(), scales=s[:, 0])
    with pytest.raises(ValueError, match="float16 or float32"):
        wire.encode(H, 0, 0, tokens=torch.zeros(2, 8, dtype=torch.float64))


def test_argument_errors_before_any_work():
    m = make_model()
    x = uint8_images(2)
    with pytest.raises(ValueError, match="init_method.*or spawn=True"):
        D.run(m, x)
    with pytest.raises(ValueError, match="world size is 3"):
        D.run(m, x, init_method="tcp://127.0.0.1:1", world_size=5)
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        D.run(m, x, init_method="udp://127.0.0.1:5")
    with pytest.raises(TypeError, match="unknown option"):
        D.run(m, x, spawn=True, nonsense=1)
    with pytest.raises(ValueError, match="channels"):
        D.run(m, torch.zeros(2, 1, 32, 32), spawn=True)
    assert D.SPAWN_KEY not in D.sessions()


def test_rendezvous_timeout_names_missing_ranks():
    m = make_model()
    t0 = time.monotonic()
    with pytest.raises(D.DistributedError, match=r"device\(s\) \[0, 1\] \(rank\(s\) \[1, 2\]\) did not join"):
        D.run(m, uint8_images(2), init_method=f"tcp://127.0.0.1:{free_port()}", world_size=3, timeout=1.0)
    assert time.monotonic() - t0 < 6


# ---------------------------------------------------------------------------
# spawned groups: agreement with model(images)
# ---------------------------------------------------------------------------


def test_vit_homogeneous_agrees():
    m = make_model(widths=(32, 32), seed=0)
    x = uint8_images(200)
    out, st = D.run(m, x, spawn=True, transfer="int8", batch_size=50, timeout=30)
    check_int8(out, m, x)
    assert st.engine == "distributed" and st.micro_batches == 4 and st.missing_devices == [] and not st.degraded
    assert st.transfer_bytes_per_image == [32 + 4, 32 + 4]
    assert all(t is not None and t > 0 for t in st.device_compute_s)
    assert all(t is not None and t >= 0 for t in st.transfer_s)
    assert st.latency_s > 0 and st.throughput > 0 and st.fusion_s > 0
    assert st.extra["spawned"] and st.extra["new_group"]
    pids = group_pids()

    # fp32 transfer: exact to fp32 rounding; float images go as float; the group is reused
    xf = common.normalise_images(m, x[:40])
    out, st = D.run(m, xf, spawn=True, transfer="fp32", timeout=30)
    torch.testing.assert_close(out, reference(m, x[:40]), rtol=1e-5, atol=1e-5)
    assert not st.extra["new_group"] and group_pids() == pids
    assert st.transfer_bytes_per_image == [4 * 32, 4 * 32]

    out, st = D.run(m, x[:40], spawn=True, transfer="fp16", batch_size=7, timeout=30)
    torch.testing.assert_close(out, reference(m, x[:40]), rtol=2e-3, atol=2e-3)
    assert st.micro_batches == 6

    # through the front end, when it is there
    import devit_ext

    out = devit_ext.collaborate(m, x[:8], engine="distributed", spawn=True)
    check_int8(out, m, x[:8])
    assert group_pids() == pids


def test_model_hash_follows_in_place_changes():
    """Training the model in place changes its content hash (so spawned workers get replaced)."""
    m = make_model(widths=(16, 16), seed=0)
    h = D.model_hash(m)
    assert h == m.content_hash() and D.model_hash(m) == h
    with torch.no_grad():
        m.fusion.head.bias.add_(1.0)
    assert D.model_hash(m) != h and D.model_hash(m) == m.content_hash()


def test_deit_heterogeneous_agrees():
    old = group_pids() if D.SPAWN_KEY in D.sessions() else None
    m = make_model(distilled=True, widths=(32, 16, 48), seed=3)
    x = uint8_images(200, seed=4)
    out, st = D.run(m, x, spawn=True, transfer="int8", batch_size=64, timeout=30)
    check_int8(out, m, x)
    assert st.extra["new_group"] and group_pids() != old  # another model: the workers were replaced
    assert st.transfer_bytes_per_image == [2 * (32 + 4), 2 * (16 + 4), 2 * (48 + 4)]
    out, _ = D.run(m, x[:50], spawn=True, transfer="fp32", timeout=30)
    torch.testing.assert_close(out, reference(m, x[:50]), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# faults: on the DeiT group above (degrade first, then the error that tears it down)
# ---------------------------------------------------------------------------


def _signal(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def test_stuck_worker_degrades_within_timeout():
    m = make_model(distilled=True, widths=(32, 16, 48), seed=3)
    x = uint8_images(32, seed=5)
    D.run(m, x[:2], spawn=True, timeout=30)  # the DeiT group, started by the test above if it ran
    pids = group_pids()
    _signal(pids[2], signal.SIGSTOP)  # device 2 hangs
    try:
        t0 = time.monotonic()
        out, st = D.run(m, x, spawn=True, batch_size=8, timeout=2.0, degrade=True)
        elapsed = time.monotonic() - t0
    finally:
        _signal(pids[2], signal.SIGCONT)
    assert elapsed < 2.0 + 3.0, elapsed
    assert st.missing_devices == [2] and st.degraded
    assert st.device_compute_s[2] is None and st.transfer_s[2] is None
    assert "device 2" in st.extra["missing_reasons"][2] and "timeout" in st.extra["missing_reasons"][2]
    check_int8(out, m, x, missing={2})

    # a worker killed mid-run (while the aggregator waits for it): degraded at once, not after the timeout
    _signal(pids[0], signal.SIGSTOP)
    threading.Timer(0.5, _signal, (pids[0], signal.SIGKILL)).start()
    t0 = time.monotonic()
    out, st = D.run(m, x, spawn=True, batch_size=8, timeout=20.0, degrade=True)
    assert time.monotonic() - t0 < 10.0
    assert st.missing_devices == [0, 2]
    assert "SIGKILL" in st.extra["missing_reasons"][0] or "lost" in st.extra["missing_reasons"][0]
    check_int8(out, m, x, missing={0, 2})


def test_killed_worker_clear_error_within_timeout():
    m = make_model(widths=(32, 48), seed=7)  # heterogeneous ViT: a fresh group
    x = uint8_images(200, seed=8)
    out, _ = D.run(m, x, spawn=True, batch_size=50, timeout=30)
    check_int8(out, m, x)
    pids = group_pids()

    # killed while the aggregator waits on it (stopped first so the kill lands mid-run)
    _signal(pids[1], signal.SIGSTOP)
    threading.Timer(0.5, _signal, (pids[1], signal.SIGKILL)).start()
    t0 = time.monotonic()
    with pytest.raises(D.DeviceError, match=r"device 1 \(rank 2\): the connection was lost") as e:
        D.run(m, x, spawn=True, batch_size=16, timeout=5.0)
    elapsed = time.monotonic() - t0
    assert elapsed < 5.0 + 3.0, elapsed
    assert "SIGKILL" in str(e.value) and e.value.devices == [1]
    assert D.SPAWN_KEY not in D.sessions()  # the group was torn down ...
    for pid in pids:
        assert not _alive(pid)

    out, st = D.run(m, x[:8], spawn=True, timeout=30)  # ... and the next call works, on a fresh one
    check_int8(out, m, x[:8])
    assert st.extra["new_group"] and st.missing_devices == []


def _alive(pid) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ---------------------------------------------------------------------------
# external workers (`python -m devit_ext.engines.worker`, as `devit-ext worker` runs them)
# ---------------------------------------------------------------------------


def _start_worker(rank, model_dir, port, *, via_env=False):
    args = ["--model", str(model_dir), "--timeout", "120", "--threads", "1", "--parent-pid", str(os.getpid())]
    env = dict(os.environ)
    if via_env:  # as under torchrun
        env.update(RANK=str(rank), WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    else:
        args += ["--rank", str(rank), "--world-size", "3", "--init-method", f"tcp://127.0.0.1:{port}"]
    return subprocess.Popen([sys.executable, "-m", "devit_ext.engines.worker", *args], cwd=tempfile.gettempdir(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def test_external_workers_and_another_model_is_refused(tmp_path):
    D.shutdown()
    m = make_model(widths=(16, 32), seed=11)
    other = make_model(widths=(16, 32), seed=12)
    m.save(tmp_path / "m")
    other.save(tmp_path / "other")
    good, bad = free_port(), free_port()
    procs = []
    try:
        # one group of workers running the model (rank 1 configured like torchrun does), one where rank 2 runs another
        procs += [_start_worker(1, tmp_path / "m", good, via_env=True), _start_worker(2, tmp_path / "m", good)]
        procs += [_start_worker(1, tmp_path / "m", bad), _start_worker(2, tmp_path / "other", bad)]
        x = uint8_images(24)

        init = f"tcp://127.0.0.1:{good}"
        out, st = D.run(m, x, init_method=init, world_size=3, batch_size=8, timeout=10, rendezvous_timeout=180)
        check_int8(out, m, x)
        assert st.extra["new_group"] and not st.extra["spawned"]
        out, st = D.run(m, common.normalise_images(m, x), init_method=init, transfer="fp32", timeout=10)
        torch.testing.assert_close(out, reference(m, x), rtol=1e-5, atol=1e-5)
        assert not st.extra["new_group"]
        with pytest.raises(D.WorkerRefused, match="run another model"):
            D.run(other, x, init_method=init, timeout=10)  # the aggregator's model is not the workers'
        D.shutdown(init)
        assert [p.wait(timeout=30) for p in procs[:2]] == [0, 0]

        init = f"tcp://127.0.0.1:{bad}"
        with pytest.raises(D.WorkerRefused, match=r"device 1 \(rank 2\): it runs another model") as e:
            D.run(m, x, init_method=init, world_size=3, timeout=10, rendezvous_timeout=180)
        assert e.value.devices == [1]
        codes = [p.wait(timeout=30) for p in procs[2:]]
        logs = [p.stdout.read().decode() for p in procs[2:]]
        assert codes == [0, 3], (codes, logs)
        assert "refused" in logs[1] and "another model" not in logs[0]
        assert init not in D.sessions()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)


def test_worker_cli_usage_errors(tmp_path):
    from devit_ext.cli import main

    m = make_model(widths=(16, 16))
    m.save(tmp_path / "m")
    assert main(["worker", "--model", str(tmp_path / "m")]) == 2  # no rank / world size / init method
    assert main(["worker", "--rank", "0", "--world-size", "3", "--init-method", "tcp://127.0.0.1:1",
                 "--model", str(tmp_path / "m")]) == 2  # rank 0 is the aggregator
    assert main(["worker", "--rank", "1", "--world-size", "5", "--init-method", "tcp://127.0.0.1:1",
                 "--model", str(tmp_path / "m")]) == 2  # world size does not match the model
