"""The local engine's sender side on onnxruntime (CPU): one ONNX session per sub-model.

Why: on a CPU, onnxruntime runs a ViT ~2x faster than eager torch here (fused
LayerNorm / GELU / bias into its MLAS GEMMs, no layout copies between ops;
docs/perf-notes.md has the numbers).

Each session gives its model's *pre-norm* prefix tokens (the last block on the
prefix tokens only, as on the torch path): the final LayerNorm and the int8 quantisation stay in
`protocol.encode` (`layernorm_quantize_int8`), exactly as on the torch path, so
both paths send the same kind of message and differ only by fp32 rounding of the
tokens.

The export (`onnx_bytes`) lives here, below the top layer, so the engines can use
it; `devit_ext.export` writes its ONNX files with the same function.

onnxruntime is optional: `available()` says whether it imports, and the local
engine reports the sender path it took (`LocalEngine.backend`, `Stats.extra`).
"""
from __future__ import annotations

import os
import tempfile
import warnings
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import dispatch

OPSET = 18


def available() -> tuple[bool, str]:
    """(True, onnxruntime version) when onnxruntime, onnx and onnxscript import here, else (False, why)."""
    return dispatch.onnxruntime_status()


def _prefix_only_block(blk: nn.Module, x: torch.Tensor, T: int) -> torch.Tensor:
    """The last block for the prefix tokens only: keys/values from every token, queries, proj and MLP
    from the first T (nothing else is read after it). Same arithmetic as `model.Block` on those rows."""
    B, N, _ = x.shape
    a = blk.attn
    qkv = a.qkv(blk.norm1(x)).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(qkv[0][:, :, :T], qkv[1], qkv[2])  # (B, H, T, D)
    x = x[:, :T] + blk.ls1(a.proj(o.transpose(1, 2).reshape(B, T, -1)))
    return x + blk.ls2(blk.mlp(blk.norm2(x)))


class AllPreNormTokens(nn.Module):
    """images -> (B, T, sum d): every sub-model's pre-norm prefix tokens, concatenated in device order."""

    def __init__(self, submodels: Sequence[nn.Module]):
        super().__init__()
        self.subs = nn.ModuleList(submodels)
        self.T = int(submodels[0].num_prefix_tokens)

    def _tokens(self, s: nn.Module, images: torch.Tensor) -> torch.Tensor:
        x = s.patch_embed(images)
        prefix = s._prefix(x.shape[0])
        if s.cfg["no_embed_class"]:
            x = torch.cat([prefix, x + s.pos_embed], dim=1)
        else:
            x = torch.cat([prefix, x], dim=1) + s.pos_embed
        x = s.norm_pre(x)
        for blk in list(s.blocks)[:-1]:
            x = blk(x)
        return _prefix_only_block(s.blocks[-1], x, self.T)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._tokens(s, images) for s in self.subs], dim=-1)


class PooledVector(nn.Module):
    """A CCT's sender program: images -> its sequence-pooled vector (B, 1, d), `SubCCT.sender_tokens` (the final
    norm precedes the pooling, so nothing is left for `protocol.encode` but the int8 quantisation)."""

    def __init__(self, sub: nn.Module):
        super().__init__()
        self.sub = sub

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.sub.sender_tokens(images)


def sender_module(sub: nn.Module) -> nn.Module:
    """The program a sub-model's sender runs on onnxruntime / ExecuTorch, in eval mode: a ViT's pre-norm prefix
    tokens (`AllPreNormTokens`), a CCT's pooled vector (`PooledVector`; a CCT has no prefix tokens)."""
    return (PooledVector(sub) if int(sub.num_prefix_tokens) == 0 else AllPreNormTokens([sub])).eval()


_SHARED_ARENA: list = []  # registered once per process


def _shared_arena() -> None:
    """One CPU arena for every session of this process (onnxruntime's environment allocator).

    Why: each session's own arena keeps its peak activations, so 4 sub-model sessions held 4 of them
    (batch 32, 224 px: 1.1 GB above the imports vs 0.32 GB with one shared arena and no memory
    pattern, at the same speed; docs/perf-notes.md).
    """
    if _SHARED_ARENA:
        return
    import onnxruntime as ort

    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))  # onnxruntime's defaults
    _SHARED_ARENA.append(info)


def session_options(threads: int):
    import onnxruntime as ort

    _shared_arena()
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # idle spinning threads would steal the core from whatever torch runs next in this process
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # the process-wide arena, and no per-session memory pattern (a second block of the peak per shape)
    so.add_session_config_entry("session.use_env_allocators", "1")
    so.enable_mem_pattern = False
    so.log_severity_level = 3
    return so


def onnx_bytes(module: nn.Module, example: torch.Tensor, opset: int = OPSET, in_name: str = "images",
               out_name: str = "tokens") -> bytes:
    """The module exported to ONNX with torch's dynamo exporter: dynamic batch on its one input, named
    `in_name` -> `out_name` (also what `devit_ext.export` writes to its files)."""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = os.path.join(d, "senders.onnx")
        prog = torch.onnx.export(module, (example,), None, input_names=[in_name], output_names=[out_name],
                                 opset_version=opset, dynamo=True, dynamic_shapes=({0: batch},),
                                 verbose=False)
        prog.save(path)
        with open(path, "rb") as f:
            return f.read()


def make_session(model_bytes: bytes, threads: int | None = None):
    import onnxruntime as ort

    return ort.InferenceSession(model_bytes, session_options(threads or torch.get_num_threads()),
                                providers=["CPUExecutionProvider"])


class OrtSender:
    """Callable like `stacked.SenderStack`: normalised fp32 images (B, C, H, W) -> per model (B, T, d)
    (a CCT: its pooled vector, (B, 1, d)).

    One session per sub-model, run one after the other: 4 sessions run in turn beat an earlier version
    of this sender that ran one graph holding all 4 models, in two interleaved bench runs (batch 8:
    1360 vs 1950 ms, batch 1: 170 vs 212 ms; docs/perf-notes.md).
    """

    def __init__(self, submodels: Sequence[nn.Module], threads: int | None = None):
        ok, why = available()
        if not ok:
            raise RuntimeError(f"onnxruntime backend: cannot import onnxruntime/onnx ({why})")
        subs = [s.float().cpu().eval() for s in submodels]
        c = subs[0].cfg
        example = torch.randn(2, int(c["in_chans"]), *tuple(c["img_size"]))
        with torch.no_grad():
            self.sessions = [make_session(onnx_bytes(sender_module(s), example), threads) for s in subs]
        self.version = available()[1]

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = images.detach().to(dtype=torch.float32).contiguous().numpy()
        return [torch.from_numpy(s.run(None, {"images": x})[0]) for s in self.sessions]  # each (B, T, d)
