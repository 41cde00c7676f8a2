"""The models of `devit-ext bench e2e` (shared by the GPU suite in e2e.py and the CPU suite in
e2e_cpu.py): the timm teacher, a DeViT with given sub-model shapes (random weights), the
decomposition's default CPU shape, the hand-written stacked baseline, and the inputs."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_CLASSES = 100
NUM_DEVICES = 4
GPU_TEACHER = "vit_large_patch16_224"
GPU_SUB = {"embed_dim": 192, "depth": 12, "num_heads": 3, "mlp_hidden": 768}
CPU_TEACHER = "vit_small_patch16_224"


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def make_teacher(name: str = GPU_TEACHER, num_classes: int = NUM_CLASSES, **kw) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kw).eval()


def build_devit(teacher: nn.Module, shapes: list[dict], seed: int = 0):
    """A DeViT with the given sub-model shapes on `teacher`'s config (random weights)."""
    from ..model import DeViT, FusionHead, SubViT
    from ..shapes import shape_config, teacher_config

    tcfg = teacher_config(teacher)
    torch.manual_seed(seed)
    subs = []
    n = len(shapes)
    for s in shapes:
        blocks = [{"num_heads": int(s["num_heads"]), "mlp_hidden": int(s["mlp_hidden"])}] * int(s["depth"])
        c = shape_config(tcfg, int(s["embed_dim"]), blocks, max(1, tcfg["num_classes"] // n))
        sub = SubViT(c)
        with torch.no_grad():  # zeros in cls/pos would make every token alike; keep it ViT-like
            sub.cls_token.normal_(std=0.02)
            sub.pos_embed.normal_(std=0.02)
        subs.append(sub)
    fusion = FusionHead([s.embed_dim for s in subs], tcfg["embed_dim"], tcfg["num_classes"], tcfg["distilled"])
    groups = [list(range(i, tcfg["num_classes"], n)) for i in range(n)]
    meta = {k: tcfg[k] for k in ("img_size", "in_chans", "mean", "std")}
    meta["teacher"] = getattr(teacher, "default_cfg", {}).get("architecture", type(teacher).__name__)
    return DeViT(subs, groups, fusion, meta).eval()


def default_cpu_shape(teacher: nn.Module) -> tuple[dict, str]:
    """The sub-model shape the decomposition's default budget gives (40% of the teacher in total)."""
    from .. import budgets as dec
    from ..shapes import teacher_config

    tcfg = teacher_config(teacher)
    frac = dec.DEFAULT_TOTAL_FRACTION / NUM_DEVICES
    cfg = dec.resolve_budgets(tcfg, NUM_DEVICES, None)[0][0]  # device 0 of the default budgets
    blocks = cfg["blocks"]
    if any(b != blocks[0] for b in blocks):
        raise ValueError(f"the default budget gave uneven blocks {blocks}; the stacked baseline needs even ones")
    shape = {"embed_dim": cfg["embed_dim"], "depth": len(blocks), "num_heads": blocks[0]["num_heads"],
             "mlp_hidden": blocks[0]["mlp_hidden"]}
    return shape, f"decompose default budget: {frac:.2f} of the teacher's FLOPs per device"


class PlainStacked(nn.Module):
    """Baseline: what a user writes by hand. Weights stacked over M, baddbmm, one SDPA call for all
    models, per-model LayerNorm affine, float tokens, fusion head. Homogeneous DeViTs only."""

    def __init__(self, model):
        super().__init__()
        subs = list(model.submodels)
        c = subs[0].cfg
        if any(s.cfg["blocks"] != c["blocks"] or s.embed_dim != subs[0].embed_dim for s in subs):
            raise ValueError("PlainStacked: sub-models must share one shape")
        if c["layer_scale"] or c["pre_norm"] or c["no_embed_class"]:
            raise ValueError("PlainStacked: plain ViT blocks only (no layer scale, pre-norm or no_embed_class)")
        self.M, self.d, self.D, self.T = len(subs), subs[0].embed_dim, c["head_dim"], c["num_prefix_tokens"]
        self.patch, self.eps = tuple(c["patch_size"]), c["norm_eps"]
        self.heads = [b["num_heads"] for b in c["blocks"]]

        def st(get):
            return nn.Parameter(torch.stack([get(s).detach().clone() for s in subs]), requires_grad=False)

        def lin(get):  # nn.Linear weight (out, in) -> (M, in, out) for x @ W
            return st(lambda s: get(s).weight.t().contiguous())

        def bias(get):
            return st(lambda s: (get(s).bias if get(s).bias is not None else torch.zeros(get(s).out_features))[None])

        self.patch_w = st(lambda s: s.patch_embed.proj.weight.reshape(self.d, -1).t())  # (M, K, d)
        self.patch_b = st(lambda s: s.patch_embed.proj.bias[None])
        self.prefix = st(lambda s: torch.cat([s.cls_token[0]] + ([s.dist_token[0]] if s.distilled else [])))
        self.pos = st(lambda s: s.pos_embed[0])  # (M, N, d)
        L = len(self.heads)
        self.p = nn.ParameterDict()
        for k in range(L):
            b = lambda s, k=k: s.blocks[k]  # noqa: E731
            self.p[f"{k}_n1w"] = st(lambda s: b(s).norm1.weight[None])
            self.p[f"{k}_n1b"] = st(lambda s: b(s).norm1.bias[None])
            self.p[f"{k}_qkv_w"], self.p[f"{k}_qkv_b"] = lin(lambda s: b(s).attn.qkv), bias(lambda s: b(s).attn.qkv)
            self.p[f"{k}_proj_w"], self.p[f"{k}_proj_b"] = lin(lambda s: b(s).attn.proj), bias(lambda s: b(s).attn.proj)
            self.p[f"{k}_n2w"] = st(lambda s: b(s).norm2.weight[None])
            self.p[f"{k}_n2b"] = st(lambda s: b(s).norm2.bias[None])
            self.p[f"{k}_fc1_w"], self.p[f"{k}_fc1_b"] = lin(lambda s: b(s).mlp.fc1), bias(lambda s: b(s).mlp.fc1)
            self.p[f"{k}_fc2_w"], self.p[f"{k}_fc2_b"] = lin(lambda s: b(s).mlp.fc2), bias(lambda s: b(s).mlp.fc2)
        self.nw = st(lambda s: s.norm.weight[None])
        self.nb = st(lambda s: s.norm.bias[None])
        self.fusion = model.fusion

    def _ln(self, x, w, b):
        return F.layer_norm(x, (self.d,), eps=self.eps) * w + b

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        B, C, H, W = images.shape
        ph, pw = self.patch
        M, d, D, T = self.M, self.d, self.D, self.T
        patches = images.reshape(B, C, H // ph, ph, W // pw, pw).permute(0, 2, 4, 1, 3, 5).reshape(1, -1, C * ph * pw)
        x = torch.baddbmm(self.patch_b, patches.expand(M, -1, -1), self.patch_w).view(M, B, -1, d)
        x = torch.cat([self.prefix[:, None].expand(M, B, T, d), x], dim=2) + self.pos[:, None]
        N = x.shape[2]
        x = x.reshape(M, B * N, d)
        for k, Hh in enumerate(self.heads):
            p = lambda n: self.p[f"{k}_{n}"]  # noqa: E731
            h = self._ln(x, p("n1w"), p("n1b"))
            qkv = torch.baddbmm(p("qkv_b"), h, p("qkv_w")).view(M * B, N, 3, Hh, D).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (M*B, H, N, D)
            o = o.transpose(1, 2).reshape(M, B * N, Hh * D)
            x = x + torch.baddbmm(p("proj_b"), o, p("proj_w"))
            h = self._ln(x, p("n2w"), p("n2b"))
            x = x + torch.baddbmm(p("fc2_b"), F.gelu(torch.baddbmm(p("fc1_b"), h, p("fc1_w"))), p("fc2_w"))
        toks = self._ln(x.view(M, B, N, d)[:, :, :T].reshape(M, B * T, d), self.nw, self.nb).view(M, B, T, d)
        toks = [toks[m, :, 0] if T == 1 else toks[m] for m in range(M)]
        return self.fusion(toks)


def _inputs(batch: int, model, device: str, dtype: torch.dtype, n: int = 3) -> list[torch.Tensor]:
    c, (h, w) = model.in_chans, model.img_size
    g = torch.Generator().manual_seed(batch)
    return [torch.randn(batch, c, h, w, generator=g).to(device=device, dtype=dtype) for _ in range(n)]
