"""The rows of `bench e2e --device cpu`: the models, and a factory per row (`Setting`).

Shared by the timed run (e2e_cpu.py), the peak-RSS child processes (_e2e_rss.py) and the target
lines (_e2e_targets.py), so each row is built by one piece of code.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable

import torch


def _ort_fn(module, example):
    """An onnxruntime callable for `module` (input images -> one output), spinning off."""
    from ..engines import ort_sender

    sess = ort_sender.make_session(ort_sender.onnx_bytes(module.eval(), example))
    return lambda x: torch.from_numpy(sess.run(None, {"images": x.contiguous().numpy()})[0])


class _Tokens(torch.nn.Module):
    def __init__(self, sub):
        super().__init__()
        self.sub = sub

    def forward(self, images):
        return self.sub.forward_tokens(images)


ENGINE_ROW = "local engine (ours, int8, onnxruntime sender)"
TORCH_ENGINE_ROW = "local engine (ours, int8, torch sender)"
SEQ_ORT_ROW = "sub-models one after the other in onnxruntime"
WORKER_ROWS = {"torch": "worker sub-model, torch runtime", "onnxruntime": "worker sub-model, onnxruntime runtime"}


class Setting:
    """The bench's models and row factories: `rows()` -> [(name, make, note)], `make()` -> the timed callable.

    Built lazily, so a peak-RSS subprocess (`_e2e_rss`) builds only its own row; `meta_teacher` builds
    the teacher on the meta device (no weights in memory) for rows that only need its config.
    """

    def __init__(self, skip: set, img: int, meta_teacher: bool = False):
        from ..shapes import teacher_config, vit_flops
        from ._e2e_models import CPU_TEACHER, NUM_DEVICES, _inputs, build_devit, default_cpu_shape, make_teacher

        self._state(skip, img)
        with torch.device("meta") if meta_teacher else contextlib.nullcontext():
            self.teacher = make_teacher(CPU_TEACHER, img_size=img)
        shape, how = default_cpu_shape(self.teacher)
        self.model = build_devit(self.teacher, [shape] * NUM_DEVICES)
        frac = sum(self.model.flops()) / vit_flops(teacher_config(self.teacher))
        self.title = (f"e2e cpu: {CPU_TEACHER} ({img} px) vs {NUM_DEVICES}x(d={shape['embed_dim']},H={shape['num_heads']},"
                      f"L={shape['depth']},mlp={shape['mlp_hidden']}) = {frac:.0%} of the teacher's FLOPs [{how}], fp32, "
                      f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at start; "
                      f"onnxruntime: {self.ort_why}")
        self.example = _inputs(2, self.model, "cpu", torch.float32, n=1)[0]

    def _state(self, skip: set, img: int) -> None:
        """What every setting keeps besides its models: the skips, onnxruntime's status, engine stats, left-out rows."""
        from ..engines import ort_sender

        self.skip, self.img = skip, img
        self.ort_ok, self.ort_why = ort_sender.available()
        if "ort" in skip:
            self.ort_ok, self.ort_why = False, "DEVIT_E2E_SKIP=ort"
        self.box: dict = {}  # the engine rows' last stats, for their notes
        self.skipped: list[tuple[str, str]] = []  # (row, why) of rows left out

    def _engine(self, backend):
        from ..engines import collaborate

        def fn(x):
            out, st = collaborate(self.model, x, backend=backend, return_stats=True)
            self.box[backend] = st
            return out
        return fn

    def _engine_note(self, backend):
        def note():
            st = self.box.get(backend)
            if st is None:
                return ""
            ops_ = ", ".join(f"{k}={v.split(' (')[0]}" for k, v in st.op_paths.items())
            return f"sender={st.extra['sender_backend']}; {st.transfer_bytes_per_image[0]} B/image/device; {ops_}"
        return note

    def _worker(self, name):
        """Device 0's per-micro-batch compute in `devit-ext worker --runtime NAME`: sub-model + LayerNorm+int8
        (a CCT: its pooled vector + int8, no norm left)."""
        from .. import protocol
        from ..engines.runtime import SubModelRunner

        sub = self.model.submodels[0]
        run = SubModelRunner(sub, name)
        return lambda x: protocol.encode(run(x), *sub.sender_norm(), "int8")

    def rows(self) -> list[tuple[str, Callable, Any]]:
        from ._e2e_models import PlainStacked

        m, t, ex = self.model, self.teacher, self.example
        out = [("teacher eager (timm)", lambda: t, "baseline of speedup")]
        if "compile" not in self.skip:
            out.append(("teacher torch.compile", lambda: torch.compile(t), "inductor, default mode"))
        else:
            self.skipped.append(("teacher torch.compile", "DEVIT_E2E_SKIP=compile"))
        if self.ort_ok:
            out.append(("teacher onnxruntime", lambda: _ort_fn(t, ex), "baseline of speedup_vs_ort"))
        out.append(("naive loop eager", lambda: m, "DeViT.forward: the sub-models one after the other"))
        if self.ort_ok:
            out.append((SEQ_ORT_ROW, self._seq_ort, "4 sessions + fusion head in torch"))
        out.append(("plain stacked eager", lambda: PlainStacked(m), ""))
        out.append((TORCH_ENGINE_ROW, lambda: self._engine("torch"), self._engine_note("torch")))
        if self.ort_ok:
            out.append((ENGINE_ROW, lambda: self._engine("onnxruntime"), self._engine_note("onnxruntime")))
        else:
            self.skipped.append((ENGINE_ROW, self.ort_why))
        return out + self._device_rows("", "sub-model + LayerNorm+int8")

    def _seq_ort(self):
        """The sub-models one after the other in onnxruntime (one session each) + the fusion head in torch."""
        m = self.model
        subs = [_ort_fn(_Tokens(s), self.example) for s in m.submodels]
        return lambda x: m.fusion([f(x) for f in subs])

    def _device_rows(self, prefix: str, sends: str) -> list[tuple[str, Callable, Any]]:
        """The distributed engine over loopback, and device 0's worker compute on each runtime (`prefix` + name)."""
        from ..engines import collaborate

        m, out = self.model, []
        name = prefix + "distributed engine (loopback, spawned workers)"
        if "distributed" not in self.skip:
            out.append((name, lambda: lambda x: collaborate(m, x, engine="distributed", spawn=True, timeout=60.0), ""))
        else:
            self.skipped.append((name, "DEVIT_E2E_SKIP"))
        if "worker" not in self.skip:
            for rt, name in WORKER_ROWS.items():
                if rt == "torch" or self.ort_ok:
                    out.append((prefix + name, lambda rt=rt: self._worker(rt), f"device 0: {sends} "
                                "(what `devit-ext worker --runtime` computes per micro-batch)"))
        return out
