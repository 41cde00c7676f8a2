"""Local engine: every sub-model in one process (the paper's "GPU server" case).

- Sender side (`stacked.SenderStack`): sub-models stacked per shape group,
  batched matmuls, one `subvit_attention` launch per block index, then per
  model the final LayerNorm fused with int8 quantisation
  (`layernorm_quantize_int8`), or for transfer="fp16"/"fp32" the LayerNorm and
  a cast.
- Aggregator (`ensemble_fusion` per fusion branch, averaged for DeiT).
- CUDA: bf16 by default; the sender side and the aggregator are each captured in
  a CUDA graph per batch-size bucket (powers of two up to `max_bucket`), built
  on first use and reused across calls; a batch is padded up to its bucket and
  copied into the graph's static input buffer. Two graphs (not one) so stats can
  time senders and fusion apart with events between the replays.
- CPU: the same code through the CPU ops, fp32 by default, no graphs.

Engines are cached per model (weak reference) and keyed by device, dtype,
transfer and options; a cached engine is rebuilt when any parameter tensor was
changed in place (its version counter moved: training, load_state_dict,
p.copy_) or a sub-model / the fusion head was replaced. Replacing a parameter
object deep inside a sub-model (`blk.attn.qkv.weight = nn.Parameter(...)`) is
not detected: call `devit_ext.engines.local.clear_cache()` after that.
"""
from __future__ import annotations

import operator
import time
import weakref
from typing import Any

import torch

from .. import ops, protocol
from ..shapes import is_cct
from . import common
from .stacked import SenderStack
from .stacked_cct import CCTSenderStack

ENGINE_OPTS = ("cuda_graphs", "max_bucket", "compile", "backend")
BACKENDS = ("torch", "onnxruntime", "auto")
_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_CACHE_PER_MODEL = 4
# CPU, torch sender, ViT: a batch with no batch_size runs as micro-batches of this many images; batches
# of 8-32 ran 6-25% faster so than whole (docs/perf-notes.md, "CPU micro-batches"; smaller activations
# per micro-batch are the likely reason, not profiled). batch_size=n runs n images whole.
CPU_CHUNK = 4


_VERSION = operator.attrgetter("_version")


def _structure(model) -> tuple:
    """Cheap identity of the model's top-level parts (a replaced sub-model or fusion head rebuilds)."""
    return (id(model.fusion), *map(id, model.submodels))


class LocalEngine:
    def __init__(self, model, device: torch.device, dtype: torch.dtype, transfer: str, *, cuda_graphs: bool = True,
                 max_bucket: int = 256, compile: bool = False, backend: str = "torch"):
        self.device, self.dtype, self.transfer = device, dtype, transfer
        self.num_devices = model.num_devices
        self.widths = list(model.widths)
        self.T = protocol.tokens_per_image(model)
        self.num_classes = model.num_classes
        self.in_chans, self.img_size = model.in_chans, tuple(model.img_size)
        self.compiled = bool(compile)
        kinds = {is_cct(s.cfg) for s in model.submodels}
        if len(kinds) > 1:
            raise ValueError("model: mixes ViT and CCT sub-models; the local engine runs one backbone")
        self.cct = kinds == {True}
        self.backend, self.backend_note = self._pick_backend(backend)
        with torch.no_grad():
            if self.backend == "onnxruntime":
                from .ort_sender import OrtSender

                # no stacked copy of the weights: onnxruntime holds its own
                self.sender = None
                self._sender = OrtSender(list(model.submodels))
                self.backend_note = f"sender side on onnxruntime {self._sender.version} (CPU, one session per sub-model)"
                # a CCT's pooled vector follows its final norm: quantisation alone is left (eps None)
                self.norms = [(None, None, None) if self.cct else
                              (s.norm.weight.detach().float().contiguous(), s.norm.bias.detach().float().contiguous(),
                               float(s.norm.eps)) for s in model.submodels]
            elif self.cct:
                self.sender = CCTSenderStack(list(model.submodels), device, dtype, ops.subvit_attention)
                self._sender = torch.compile(self.sender, dynamic=False) if self.compiled else self.sender
                self.norms = [self.sender.final_norm(m) for m in range(self.num_devices)]
            else:
                self.sender = SenderStack(list(model.submodels), device, dtype, ops.subvit_attention)
                # opt-in: inductor fuses the elementwise passes between the batched matmuls; the devit ops
                # stay single opaque nodes (they have fake kernels). Compiles on the first call of each shape.
                self._sender = torch.compile(self.sender, dynamic=False) if self.compiled else self.sender
                self.norms = [self.sender.final_norm(m) for m in range(self.num_devices)]
            self.branches = [
                tuple(
                    None if t is None else t.detach().to(device=device, dtype=torch.float32).contiguous()
                    for t in (mp.weight, mp.bias, cls.weight, cls.bias)
                )
                for mp, cls in model.fusion.branches()
            ]
        self.use_graphs = bool(cuda_graphs) and device.type == "cuda"
        self.max_bucket = int(max_bucket)
        # a call without batch_size runs in micro-batches of this many images (None: whole): the largest
        # CUDA graph bucket, or CPU_CHUNK for a ViT on the CPU's torch sender
        self.default_chunk = (self.max_bucket if self.use_graphs else
                              CPU_CHUNK if device.type == "cpu" and self.backend == "torch" and not self.cct else None)
        self._graphs: dict[int, dict] = {}
        self._pool = None

    def _pick_backend(self, backend: str) -> tuple[str, str]:
        """(backend the sender side runs on, why): the rule is `ops.dispatch.local_backend` (build_info
        reports what "auto" gives there)."""
        from ..ops import dispatch

        name, why = dispatch.local_backend(backend, self.device, self.dtype, self.compiled)
        how = "CCT: stacked grouped convs + batched matmuls" if self.cct else "stacked batched matmuls"
        return name, (f"sender side on torch ({how}; {why})" if name == "torch" else why)

    # -- the two halves --------------------------------------------------
    def send(self, images: torch.Tensor) -> list[protocol.TokenMessage]:
        """Sender side: normalised images -> one `protocol.TokenMessage` per model."""
        toks = self._sender(images)
        return [protocol.encode(x.contiguous(), *self.norms[m], self.transfer) for m, x in enumerate(toks)]

    def fuse(self, msgs) -> torch.Tensor:
        """Aggregator: messages -> fp32 logits (B, C)."""
        return protocol.fuse(msgs, self.branches, self.widths)

    # -- CUDA graphs -----------------------------------------------------
    def bucket(self, b: int) -> int:
        k = 1
        while k < b:
            k *= 2
        return min(k, self.max_bucket) if b <= self.max_bucket else b

    def _graph(self, bucket: int) -> dict:
        g = self._graphs.get(bucket)
        if g is not None:
            return g
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        static_in = torch.zeros(bucket, self.in_chans, *self.img_size, device=self.device, dtype=self.dtype)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: lazy inits, op metadata tables, cuBLAS workspaces
            for _ in range(2):
                self.fuse(self.send(static_in))
        torch.cuda.current_stream(self.device).wait_stream(side)
        g_send, g_fuse = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(g_send, pool=self._pool):
            msgs = self.send(static_in)
        with torch.cuda.graph(g_fuse, pool=self._pool):
            logits = self.fuse(msgs)
        g = {"in": static_in, "send": g_send, "fuse": g_fuse, "msgs": msgs, "logits": logits}
        self._graphs[bucket] = g
        return g

    # -- one micro-batch -------------------------------------------------
    def run_chunk(self, model, raw: torch.Tensor, timing: dict | None) -> torch.Tensor:
        b = raw.shape[0]
        cuda = self.device.type == "cuda"
        if self.use_graphs and b <= self.max_bucket:
            g = self._graph(self.bucket(b))
            common.normalise_images(model, raw, device=self.device, out=g["in"][:b])
            if b < g["in"].shape[0]:
                g["in"][b:].zero_()
            if timing is not None:
                e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
                e0.record()
                g["send"].replay()
                e1.record()
                g["fuse"].replay()
                e2.record()
                timing["events"].append((e0, e1, e2))
            else:
                g["send"].replay()
                g["fuse"].replay()
            return g["logits"][:b].clone()
        x = common.normalise_images(model, raw, dtype=self.dtype, device=self.device)
        if timing is None:
            return self.fuse(self.send(x))
        if cuda:
            e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            e0.record()
            msgs = self.send(x)
            e1.record()
            out = self.fuse(msgs)
            e2.record()
            timing["events"].append((e0, e1, e2))
            return out
        t0 = time.perf_counter()
        msgs = self.send(x)
        t1 = time.perf_counter()
        out = self.fuse(msgs)
        t2 = time.perf_counter()
        timing["compute_s"] += t1 - t0
        timing["fusion_s"] += t2 - t1
        return out


def get_engine(model, device: torch.device, dtype: torch.dtype, transfer: str, opts: dict) -> LocalEngine:
    unknown = sorted(set(opts) - set(ENGINE_OPTS))
    if unknown:
        raise TypeError(f"collaborate: unknown option(s) {unknown} for engine='local' (accepted: {list(ENGINE_OPTS)})")
    mb = opts.get("max_bucket", 256)
    if isinstance(mb, bool) or not isinstance(mb, int) or mb < 1:
        raise ValueError(f"max_bucket: expected a positive int, got {mb!r}")
    if not isinstance(opts.get("cuda_graphs", True), bool):
        raise TypeError(f"cuda_graphs: expected a bool, got {opts['cuda_graphs']!r}")
    backend = opts.get("backend", "torch")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    key = (str(device), dtype, transfer, bool(opts.get("cuda_graphs", True)), mb, bool(opts.get("compile", False)),
           backend)
    per_model = _CACHE.setdefault(model, {})
    entry = per_model.get(key)
    # valid while the same parameter tensors are unmodified: every in-place change (optimizer
    # step, load_state_dict, p.copy_) bumps a tensor's version counter
    if entry is not None and (entry["structure"] != _structure(model)
                              or list(map(_VERSION, entry["params"])) != entry["versions"]):
        entry = None
    if entry is None:
        params = list(model.parameters())
        eng = LocalEngine(model, device, dtype, transfer, cuda_graphs=key[3], max_bucket=mb, compile=key[5],
                          backend=backend)
        entry = {"engine": eng, "params": params, "versions": list(map(_VERSION, params)),
                 "structure": _structure(model)}
        per_model.pop(key, None)
        if len(per_model) >= _CACHE_PER_MODEL:
            per_model.pop(next(iter(per_model)))
        per_model[key] = entry
    return entry["engine"]


def clear_cache() -> None:
    _CACHE.clear()


def run(model, images: torch.Tensor, request: common.Request, *, return_stats: bool = True, **opts):
    """Raw images, checked with `request` by `collaborate` -> (logits float32 (B, C) on the images'
    device, Stats or None)."""
    dev, dt, transfer, batch_size = request.device, request.dtype, request.transfer, request.batch_size
    t_start = time.perf_counter()
    eng = get_engine(model, dev, dt, transfer, opts)
    timing = {"compute_s": 0.0, "fusion_s": 0.0, "events": []} if return_stats else None
    n = images.shape[0]
    chunks = common.micro_batches(n, eng.default_chunk if batch_size is None else batch_size)
    cpu_chunked = batch_size is None and not eng.use_graphs and len(chunks) > 1
    with torch.inference_mode():
        outs = [eng.run_chunk(model, images[s:e], timing) for s, e in chunks]
        logits = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    latency = time.perf_counter() - t_start
    logits = logits.to(images.device)
    if not return_stats:
        return logits, None
    if timing["events"]:
        timing["compute_s"] = sum(a.elapsed_time(b) for a, b, _ in timing["events"]) / 1e3
        timing["fusion_s"] = sum(b.elapsed_time(c) for _, b, c in timing["events"]) / 1e3
    quant = "quantize_int8" if eng.cct else "layernorm_quantize_int8"  # a CCT's pooled vector needs no final norm
    used = (quant, "subvit_attention", "ensemble_fusion") if transfer == "int8" else ("subvit_attention",)
    if eng.backend == "onnxruntime":  # attention runs inside the onnxruntime graph
        used = tuple(u for u in used if u != "subvit_attention")
    stats = common.Stats(
        engine="local",
        device=str(dev),
        dtype=str(dt).replace("torch.", ""),
        transfer=transfer,
        num_images=int(images.shape[0]),
        num_devices=model.num_devices,
        micro_batches=len(chunks),
        compute_s=timing["compute_s"],
        device_compute_s=[None] * model.num_devices,
        transfer_bytes_per_image=[protocol.message_bytes(w, transfer, eng.T) for w in eng.widths],
        transfer_s=[None] * model.num_devices,
        fusion_s=timing["fusion_s"],
        op_paths=ops.op_paths(dev, used),
        notes=[
            "all sub-models ran fused in one process: per-device compute time is not separable "
            "(compute_s is all devices together); nothing crossed a wire (transfer_s None)",
            f"{len(eng.sender.groups)} stacked shape group(s): {[g.indices for g in eng.sender.groups]}"
            if eng.sender is not None else "one onnxruntime session per sub-model",
            eng.backend_note,
        ],
        extra={
            "cuda_graphs": eng.use_graphs,
            "compiled": eng.compiled,
            "buckets": sorted(eng._graphs),
            "homogeneous": eng.sender.homogeneous if eng.sender is not None else None,
            "sender_backend": eng.backend,
        },
    )
    if cpu_chunked:
        stats.notes.append(f"CPU: {n} images run as micro-batches of {eng.default_chunk} (faster per image than "
                           "whole batches here; batch_size=N runs N at a time)")
    if request.degrade:
        stats.notes.append("degrade=True has no effect locally: every device is in this process")
    return logits, stats.finish(latency)
