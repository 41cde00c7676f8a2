"""What runs one device's sub-model up to its int8 message: torch, onnxruntime or ExecuTorch.

`SubModelRunner(sub, runtime)` is a callable: normalised float32 images (B, C, H, W) ->
what the sub-model's `sender_tokens` gives (B, T, d): a ViT's *pre-norm* prefix tokens, a
CCT's sequence-pooled vector (B, 1, d; its final norm precedes the pooling). The final
LayerNorm (ViT) and the int8 quantisation stay in `protocol.encode` on every runtime, so
a worker sends the same wire message whichever runtime computed its tokens; the runtimes
differ only by float32 rounding of the tokens (an int8 value on a rounding boundary can
move by one).

- torch: `sub.sender_tokens(x)`, eager, any device / dtype.
- onnxruntime: the sub-model exported once by `ort_sender.onnx_bytes` (for a ViT the local
  engine's onnxruntime sender uses the same graph: the last block on the prefix tokens only;
  for a CCT the whole `sender_tokens`), CPU, float32, one session, spinning off.
- executorch: the same module through `torch.export` + XNNPACK (`executorch_bytes`, which
  `devit_ext.export` also writes its .pte files with), run by ExecuTorch's Python runtime;
  CPU, float32, batch at most `MAX_BATCH_EXECUTORCH`. Optional: not in the test extra.

Used by `devit-ext worker --runtime` and by the worker rows of `devit-ext bench e2e --device cpu`.
"""
from __future__ import annotations

import importlib
import os
import tempfile

import torch
import torch.nn as nn

from ..ops import dispatch
from . import ort_sender

RUNTIMES = ("torch", "onnxruntime", "executorch")
MAX_BATCH_EXECUTORCH = 256  # ExecuTorch plans memory for a bounded dynamic batch


def status(runtime: str) -> tuple[bool, str]:
    """(True, version or note) when `runtime` can run here, else (False, why)."""
    if runtime == "torch":
        return True, f"torch {torch.__version__}"
    if runtime == "onnxruntime":
        ok, why = dispatch.onnxruntime_status()
        return ok, f"onnxruntime {why}" if ok else why
    if runtime == "executorch":
        try:
            importlib.import_module("executorch.runtime")
            importlib.import_module("executorch.backends.xnnpack.partition.xnnpack_partitioner")
        except Exception as e:  # noqa: BLE001 - any import failure means the runtime is unavailable
            return False, f"executorch: {type(e).__name__}: {e}"
        from importlib import metadata

        try:
            return True, f"executorch {metadata.version('executorch')}"
        except metadata.PackageNotFoundError:
            return True, "executorch (version unknown)"
    raise ValueError(f"runtime: expected one of {list(RUNTIMES)}, got {runtime!r}")


def executorch_bytes(module: nn.Module, example: torch.Tensor, max_batch: int = MAX_BATCH_EXECUTORCH) -> bytes:
    """`module` (one input, dynamic batch 1..max_batch) lowered to XNNPACK as an ExecuTorch program."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    batch = torch.export.Dim("batch", min=1, max=max_batch)
    ep = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    return bytes(to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)


class SubModelRunner:
    """One sub-model on one runtime: normalised images -> `sub.sender_tokens` (B, T, d)."""

    def __init__(self, sub: nn.Module, runtime: str = "torch", *, device: torch.device | str = "cpu",
                 threads: int | None = None):
        ok, why = status(runtime)
        if not ok:
            raise RuntimeError(f"runtime {runtime!r} does not import here ({why}); "
                               "pip install \"devit-ext[export]\" or use runtime 'torch'")
        self.runtime, self.version = runtime, why
        self.device = torch.device(device)
        self.T = int(sub.num_prefix_tokens)
        self.sub = sub
        if runtime == "torch":
            return
        if self.device.type != "cpu":
            raise ValueError(f"runtime {runtime!r} runs on the CPU, got device {self.device}")
        c = sub.cfg
        example = torch.randn(2, int(c["in_chans"]), *tuple(c["img_size"]))
        # a float32 CPU copy for the export; the caller's module stays as it is
        module = ort_sender.sender_module(_cpu_float_copy(sub))
        with torch.no_grad():
            if runtime == "onnxruntime":
                sess = ort_sender.make_session(ort_sender.onnx_bytes(module, example), threads)
                self._run = lambda x: torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])
            else:
                self._run = _executorch_method(executorch_bytes(module, example))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.runtime == "torch":
            return self.sub.sender_tokens(images)
        if images.dtype != torch.float32 or images.device.type != "cpu":
            raise ValueError(f"runtime {self.runtime!r}: images must be float32 on the CPU, "
                             f"got {images.dtype} on {images.device}")
        if self.runtime == "executorch" and images.shape[0] > MAX_BATCH_EXECUTORCH:
            raise ValueError(f"runtime 'executorch': batch of {images.shape[0]} images, at most {MAX_BATCH_EXECUTORCH}")
        return self._run(images.contiguous())


def _cpu_float_copy(sub: nn.Module) -> nn.Module:
    import copy

    if all(p.device.type == "cpu" and p.dtype == torch.float32 for p in sub.parameters()):
        return sub
    return copy.deepcopy(sub).float().cpu()


def _executorch_method(program: bytes):
    from executorch.runtime import Runtime

    # the Python runtime loads a program from a file (the form every ExecuTorch version accepts); the
    # folder lives as long as the method, in case the loader reads the file lazily
    folder = tempfile.TemporaryDirectory(prefix="devit-pte-")
    path = os.path.join(folder.name, "device.pte")
    with open(path, "wb") as f:
        f.write(program)
    method = Runtime.get().load_program(path).load_method("forward")

    def run(x, _keep=folder):
        return method.execute([x])[0].clone()

    return run
