"""Export a DeViT per device for edge runtimes: ONNX (onnxruntime) and ExecuTorch `.pte` (XNNPACK).

Files written to DIR::

    device<i>.<ext>   images (B, C, H, W), normalised -> token (B, d_i) or (B, 2, d_i) with a
                      distillation token: a ViT's class token(s) after the final LayerNorm, a
                      CCT's sequence-pooled vector (B, d_i); the device quantises it to int8 and
                      sends it (`device_message`; docs/cli.md: the message byte by byte)
    fusion.<ext>      tokens (B, sum d_i) or (B, 2, sum d_i): device tokens concatenated in device
                      order on the last axis (zeros for a missing device) -> logits (B, C)
    manifest.json     devices, fusion, preprocess, content_hash, parity

Every file is checked against the PyTorch model with the format's own runtime
(`check_parity`); a mismatch is an error. Optional dependencies:
`pip install "devit-ext[export]"` (onnx, onnxscript, onnxruntime, executorch).
"""
from __future__ import annotations

import importlib
import os
from typing import Sequence

import torch
import torch.nn as nn

from .engines.runtime import MAX_BATCH_EXECUTORCH  # ExecuTorch plans memory for a bounded batch

FORMATS = {"onnx": ".onnx", "executorch": ".pte"}
_NEEDS = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "executorch": ("executorch",)}
DEFAULT_OPSET = 18


class ExportError(RuntimeError):
    """A format that cannot be produced here, or an exported file that disagrees with PyTorch."""


class DeviceTokens(nn.Module):
    """One device's program: images -> its token(s): `forward_tokens` (ViT: class token(s) after the final
    norm; CCT: the pooled vector)."""

    def __init__(self, sub: nn.Module):
        super().__init__()
        self.sub = sub

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.sub.forward_tokens(images)


class FusionFromTokens(nn.Module):
    """The aggregator's program: concatenated tokens -> logits (FusionHead concatenates the same way)."""

    def __init__(self, fusion: nn.Module):
        super().__init__()
        self.fusion = fusion

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fusion([tokens])


def require(fmt: str) -> None:
    """Import the format's packages or raise ExportError saying what to install."""
    if fmt not in FORMATS:
        raise ExportError(f"--format: expected one of {sorted(FORMATS)}, got {fmt!r}")
    missing = []
    for mod in _NEEDS[fmt]:
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001 - any import failure means the format is unavailable
            missing.append(f"{mod} ({type(e).__name__}: {e})")
    if missing:
        raise ExportError(f"--format {fmt}: cannot import {', '.join(missing)}; "
                          f"install the export extras: pip install \"devit-ext[export]\"")


def _export_onnx(module: nn.Module, example: torch.Tensor, path: str, in_name: str, out_name: str, opset: int) -> None:
    # one exporter for the files and for the engines' onnxruntime paths (engines/ort_sender.py)
    from .engines.ort_sender import onnx_bytes

    _write(path, onnx_bytes(module, example, opset, in_name=in_name, out_name=out_name))


def _export_executorch(module: nn.Module, example: torch.Tensor, path: str) -> None:
    from .engines.runtime import executorch_bytes  # the worker's --runtime executorch uses the same lowering

    _write(path, executorch_bytes(module, example, MAX_BATCH_EXECUTORCH))


def _write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class Runner:
    """Runs exported files with the format's runtime: onnxruntime, or ExecuTorch's Python runtime."""

    def __init__(self, fmt: str):
        self.fmt = fmt
        if fmt == "executorch":
            try:
                from executorch.runtime import Runtime
            except Exception as e:  # noqa: BLE001
                raise ExportError(f"--format executorch: the ExecuTorch runtime does not import here ({e}), "
                                  "so the .pte files cannot be checked") from e
            self._rt = Runtime.get()

    def load(self, path: str):
        if self.fmt == "onnx":
            import onnxruntime as ort

            s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            name = s.get_inputs()[0].name
            return lambda x: torch.from_numpy(s.run(None, {name: x.contiguous().numpy()})[0])
        method = self._rt.load_program(path).load_method("forward")
        return lambda x: method.execute([x.contiguous()])[0].clone()


def export_model(model, out_dir: str, fmt: str, *, opset: int = DEFAULT_OPSET, progress=None) -> dict:
    """Write each device's file and the fusion file to `out_dir`; returns the manifest (without parity)."""
    require(fmt)
    if fmt == "onnx" and opset < 17:
        raise ExportError(f"--opset: ONNX export needs opset >= 17, got {opset}")
    model = model.float().cpu().eval()
    ext = FORMATS[fmt]
    c, (h, w) = model.in_chans, model.img_size
    example = torch.randn(2, c, h, w)
    T = 2 if model.distilled else 1
    devices = []
    with torch.no_grad():
        for i, sub in enumerate(model.submodels):
            name = f"device{i}{ext}"
            mod = DeviceTokens(sub).eval()
            if fmt == "onnx":
                _export_onnx(mod, example, os.path.join(out_dir, name), "images", "token", opset)
            else:
                _export_executorch(mod, example, os.path.join(out_dir, name))
            devices.append({"device": i, "path": name, "input": "images", "output": "token",
                            "classes": model.class_groups[i], "width": sub.embed_dim,
                            "input_shape": ["batch", c, h, w],
                            "output_shape": ["batch", sub.embed_dim] if T == 1 else ["batch", 2, sub.embed_dim]})
            if progress is not None:
                progress.update()
        D = sum(model.widths)
        toks = torch.randn(2, D) if T == 1 else torch.randn(2, 2, D)
        fmod = FusionFromTokens(model.fusion).eval()
        name = f"fusion{ext}"
        if fmt == "onnx":
            _export_onnx(fmod, toks, os.path.join(out_dir, name), "tokens", "logits", opset)
        else:
            _export_executorch(fmod, toks, os.path.join(out_dir, name))
        if progress is not None:
            progress.update()
    offsets = [sum(model.widths[:i]) for i in range(model.num_devices)]
    return {
        "format": fmt,
        **({"opset": opset} if fmt == "onnx" else {"backend": "xnnpack", "max_batch": MAX_BATCH_EXECUTORCH}),
        "devices": devices,
        "fusion": {"path": name, "input": "tokens", "output": "logits", "width": D, "offsets": offsets,
                   "input_shape": ["batch", D] if T == 1 else ["batch", 2, D], "num_classes": model.num_classes,
                   "note": "device tokens concatenated in device order on the last axis; zeros for a missing device"},
        "tokens_per_device": T,
        "content_hash": model.content_hash(),
        "wire": wire_spec(model.content_hash()),
    }


@torch.no_grad()
def check_parity(model, out_dir: str, manifest: dict, images: torch.Tensor, *, atol: float = 1e-4) -> dict:
    """Run every exported file on `images` with its runtime and compare with PyTorch.

    Devices: max |token - PyTorch token|. Fusion: the exported devices' tokens
    through the exported fusion vs PyTorch logits: max abs difference and top-1
    agreement. Raises ExportError when a difference exceeds `atol` (relative to
    max(1, max |reference|)).
    """
    model = model.float().cpu().eval()
    runner = Runner(manifest["format"])
    images = images.float().cpu()
    ref_tokens = [sub.forward_tokens(images) for sub in model.submodels]
    ref_logits = model.fusion(ref_tokens)
    got_tokens, report, bad = [], {"images": int(len(images)), "atol": atol, "devices": []}, []
    for d, ref in zip(manifest["devices"], ref_tokens):
        got = runner.load(os.path.join(out_dir, d["path"]))(images)
        if tuple(got.shape) != tuple(ref.shape):
            raise ExportError(f"parity: {d['path']} gives shape {tuple(got.shape)}, PyTorch {tuple(ref.shape)}")
        diff = float((got - ref).abs().max())
        report["devices"].append({"device": d["device"], "max_abs_diff": diff})
        if not diff <= atol * max(1.0, float(ref.abs().max())):
            bad.append(f"{d['path']}: max |token diff| {diff:.3g}")
        got_tokens.append(got)
    logits = runner.load(os.path.join(out_dir, manifest["fusion"]["path"]))(torch.cat(got_tokens, dim=-1))
    diff = float((logits - ref_logits).abs().max())
    agree = float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean())
    report["fusion"] = {"max_abs_diff": diff, "top1_agreement": agree}
    if not diff <= atol * max(1.0, float(ref_logits.abs().max())):
        bad.append(f"{manifest['fusion']['path']}: max |logit diff| {diff:.3g}")
    if bad:
        raise ExportError(f"parity: exported files disagree with PyTorch beyond atol={atol}: {'; '.join(bad)}")
    return report


def preprocess(data_cfg: dict) -> dict:
    """What a device does to a picture before its program (timm's eval transform, in words)."""
    c, h, w = data_cfg["input_size"]
    crop = float(data_cfg.get("crop_pct", 1.0) or 1.0)
    return {"img_size": [h, w], "in_chans": c, "mean": list(data_cfg["mean"]), "std": list(data_cfg["std"]),
            "interpolation": data_cfg.get("interpolation"), "crop_pct": crop, "crop_mode": data_cfg.get("crop_mode"),
            "steps": f"{'grayscale' if c == 1 else 'RGB'}; resize shorter side to {int(h / crop)} "
                     f"({data_cfg.get('interpolation')}); center crop {h}x{w}; /255; (x - mean) / std; NCHW float32"}


def token_message(token: Sequence[float]):
    """A device's int8 message for one token, without torch: (scale float32, q int8 values).

    scale = max|x| / 127 (0 for an all-zero token), q = round-half-even(x / scale) clipped to
    [-127, 127]; the same numbers as devit_ext.ops.quantize_int8.
    """
    import numpy as np

    x = np.asarray(token, dtype=np.float32)
    scale = np.float32(np.abs(x).max(axis=-1) / np.float32(127.0))
    safe = np.where(scale > 0, scale, np.float32(1.0))
    q = np.clip(np.round(x / safe[..., None]), -127, 127)
    q = np.where((scale > 0)[..., None], q, 0).astype(np.int8)
    return scale.astype(np.float32), q


def wire_spec(content_hash: str) -> dict:
    """What a device needs to build its int8 message without torch (see `device_message`, devit_ext/wire.py)."""
    from . import wire

    return {"header_struct": wire._HEADER.format, "header_size": wire.HEADER_SIZE, "magic": wire.MAGIC.decode(),
            "version": wire.VERSION, "kind_tokens": wire.KIND_TOKENS, "transfer_int8": wire.TRANSFERS["int8"],
            "model_hash16": wire.hash_bytes(content_hash).hex(),
            "payload": "scales float32 (B, T) then q int8 (B, T, d), little-endian"}


def device_message(spec: dict, token, device: int, batch_id: int, compute_s: float = 0.0) -> bytes:
    """A device's int8 message (header + payload) from its exported program's output, numpy and struct only.

    spec: manifest["wire"]; token: (B, d) or (B, T, d) float32. The bytes equal
    devit_ext.wire.encode(...) of devit_ext.ops.quantize_int8(token), so the aggregator decodes them.
    """
    import struct

    import numpy as np

    t = np.asarray(token, dtype=np.float32)
    if t.ndim == 2:
        t = t[:, None, :]
    B, T, d = t.shape
    scales, q = token_message(t)
    payload = scales.astype("<f4").tobytes() + q.tobytes()
    head = struct.pack(spec["header_struct"], spec["magic"].encode(), spec["version"], spec["kind_tokens"],
                       spec["transfer_int8"], bytes.fromhex(spec["model_hash16"]), device, T, d, batch_id, B,
                       len(payload), float(compute_s), 0)  # flags 0: an unsealed message
    return head + payload
