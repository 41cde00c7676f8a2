"""The CCT rows of `bench e2e --device cpu`: a CCT teacher against its 4-device DeCCT.

Teacher `cct_14_7x2_224` (the paper's ImageNet CCT: two 7x7 convs, 14 blocks, d 384) with 100
classes, at DEVIT_E2E_IMG px, random weights; the DeCCT is `devit_ext.decompose(teacher, 4)` with
the default budget (40% of the teacher's FLOPs, the conv tokenizer counted), so its sub-models
are real slices of the teacher, equal-shaped (the local engine stacks them: grouped tokenizer
convs, batched blocks). Rows, timed interleaved like the ViT rows (e2e_cpu.interleave):

- CCT teacher eager (the baseline of `speedup`), and exported to onnxruntime
- the DeCCT's naive loop (`DeViT.forward`), its sub-models one after the other in onnxruntime
- the local engine (int8) on its torch sender (stacked) and on its onnxruntime sender (one session
  per sub-model; both asked for by name, `backend="auto"` takes torch)
- the distributed engine over loopback (spawned workers), unless DEVIT_E2E_SKIP has "distributed"
- device 0's worker compute (`devit-ext worker --runtime torch|onnxruntime`): the pooled vector + int8

DEVIT_E2E_SKIP=cct leaves the whole table out. Peak RSS is measured for the ViT rows only.
"""
from __future__ import annotations

import os

import torch

from ._e2e_rows import SEQ_ORT_ROW, Setting, _ort_fn

CCT_TEACHER = "cct_14_7x2_224"
TEACHER_ROW = "CCT teacher eager"
TEACHER_ORT_ROW = "CCT teacher onnxruntime"
ENGINE_ROW = "DeCCT local engine (ours, int8, torch sender)"
ORT_ENGINE_ROW = "DeCCT local engine (ours, int8, onnxruntime sender)"


class CctSetting(Setting):
    """The CCT table's models and row factories, with `Setting`'s interface (`title`, `model`, `rows()`)."""

    def __init__(self, skip: set, img: int):  # noqa: D107 - Setting's ViT models are not built
        import timm

        from .. import cct  # noqa: F401 - registers the CCT variants with timm
        from ..decomposition import decompose
        from ._e2e_models import NUM_CLASSES, NUM_DEVICES, _inputs

        self._state(skip, img)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.teacher = timm.create_model(CCT_TEACHER, num_classes=NUM_CLASSES, img_size=img).eval()
            self.model = decompose(self.teacher, NUM_DEVICES).eval()
        c = self.model.submodels[0].cfg
        b = c["blocks"][0]
        frac = sum(self.model.flops()) / self.model.meta["teacher_flops"]
        self.title = (f"e2e cpu cct: {CCT_TEACHER} ({img} px, {self.model.meta['teacher_flops'] / 1e9:.2f} GFLOPs) vs "
                      f"{NUM_DEVICES}x DeCCT (d={c['embed_dim']},H={b['num_heads']},L={len(c['blocks'])},"
                      f"mlp={b['mlp_hidden']},inner conv={c['conv_channels']}) = {frac:.0%} of the teacher's FLOPs "
                      f"[decompose default budget, tokenizer convs counted], fp32, {torch.get_num_threads()} threads, "
                      f"load average {os.getloadavg()[0]:.1f} at start; onnxruntime: {self.ort_why}")
        self.example = _inputs(2, self.model, "cpu", torch.float32, n=1)[0]

    def rows(self):
        m, t, ex = self.model, self.teacher, self.example
        out = [(TEACHER_ROW, lambda: t, "baseline of speedup")]
        if self.ort_ok:
            out.append((TEACHER_ORT_ROW, lambda: _ort_fn(t, ex), "baseline of speedup_vs_ort"))
        out.append(("DeCCT naive loop eager", lambda: m, "DeViT.forward: the sub-models one after the other"))
        if self.ort_ok:
            out.append(("DeCCT " + SEQ_ORT_ROW, self._seq_ort, "4 sessions + fusion head in torch"))
        out.append((ENGINE_ROW, lambda: self._engine("torch"), self._engine_note("torch")))
        if self.ort_ok:
            out.append((ORT_ENGINE_ROW, lambda: self._engine("onnxruntime"), self._engine_note("onnxruntime")))
        else:
            self.skipped.append((ORT_ENGINE_ROW, self.ort_why))
        return out + self._device_rows("DeCCT ", "the sub-model's pooled vector + int8")
