"""Sub-models as stacks: the sender side of the local engine.

Sub-models with identical shapes form a *group*; a group's weights are stacked
over a model dimension M and run with batched matmuls (`torch.baddbmm`):
the residual stream is one (M, B*N, d) tensor. Every group's attention at the
same block index shares one `subvit_attention` launch (stacked form for a single
group, list form otherwise), which reads the QKV projection output in place:
(M, B*N, 3*H*D) viewed as (M, B, N, 3, H, D), no permute copies.

Folding (exact algebra, done once in fp64 when the engine is built):
- LayerNorm affine of norm1/norm2 into the following qkv/fc1 weights, so the
  per-block norms are plain normalisations (the per-model affine lives in the
  stacked weights);
- LayerScale gammas into proj/fc2 weights and biases;
- the patch-embedding bias into the position embedding; class/distillation
  tokens plus their position embedding into one prefix table.
The final LayerNorm stays separate: it is fused with int8 quantisation on the
sender side (`layernorm_quantize_int8`), per model.

The last block runs its projection and MLP on the prefix tokens only (nothing
else is read after it).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..model import SubViT, num_tokens


def shape_signature(sub: SubViT) -> tuple:
    """Sub-models with equal signatures can be stacked."""
    c = sub.cfg
    return (
        int(c["embed_dim"]),
        int(c["head_dim"]),
        tuple((int(b["num_heads"]), int(b["mlp_hidden"])) for b in c["blocks"]),
        tuple(c["img_size"]),
        tuple(c["patch_size"]),
        int(c["in_chans"]),
        int(c["num_prefix_tokens"]),
        bool(c["no_embed_class"]),
        bool(c["pre_norm"]),
        float(c["norm_eps"]),
    )


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float64)


def fold_submodel(sub: SubViT) -> dict:
    """fp64 folded weights of one sub-model (see the module docstring)."""
    c = sub.cfg
    d = sub.embed_dim
    T = sub.num_prefix_tokens
    pw = _f64(sub.patch_embed.proj.weight)  # (d, C, ph, pw)
    pb = _f64(sub.patch_embed.proj.bias)
    pos = _f64(sub.pos_embed)[0]  # (n_pos, d)
    prefix = torch.cat([_f64(sub.cls_token)[0]] + ([_f64(sub.dist_token)[0]] if sub.distilled else []), 0)  # (T, d)
    if c["no_embed_class"]:
        pos_patch = pos
    else:
        pos_patch = pos[T:]
        prefix = prefix + pos[:T]
    if pb is not None:
        pos_patch = pos_patch + pb
    out = {
        "patch_w": pw.reshape(d, -1),  # (d, C*ph*pw) in (C, ph, pw) order
        "pos_patch": pos_patch,
        "prefix": prefix,
        "pre_norm": None if not c["pre_norm"] else (_f64(sub.norm_pre.weight), _f64(sub.norm_pre.bias)),
        "norm": (_f64(sub.norm.weight), _f64(sub.norm.bias)),
        "blocks": [],
    }
    for blk in sub.blocks:
        g1, b1 = _f64(blk.norm1.weight), _f64(blk.norm1.bias)
        g2, b2 = _f64(blk.norm2.weight), _f64(blk.norm2.bias)
        wq = _f64(blk.attn.qkv.weight)
        bq = _f64(blk.attn.qkv.bias)
        bq = torch.zeros(wq.shape[0], dtype=torch.float64, device=wq.device) if bq is None else bq
        wp, bp = _f64(blk.attn.proj.weight), _f64(blk.attn.proj.bias)
        w1, bb1 = _f64(blk.mlp.fc1.weight), _f64(blk.mlp.fc1.bias)
        w2, bb2 = _f64(blk.mlp.fc2.weight), _f64(blk.mlp.fc2.bias)
        ls1 = _f64(blk.ls1.gamma) if hasattr(blk.ls1, "gamma") else None
        ls2 = _f64(blk.ls2.gamma) if hasattr(blk.ls2, "gamma") else None
        if ls1 is not None:
            wp, bp = wp * ls1[:, None], bp * ls1
        if ls2 is not None:
            w2, bb2 = w2 * ls2[:, None], bb2 * ls2
        out["blocks"].append(
            {
                "qkv_w": wq * g1[None, :],
                "qkv_b": bq + wq @ b1,
                "proj_w": wp,
                "proj_b": bp,
                "fc1_w": w1 * g2[None, :],
                "fc1_b": bb1 + w1 @ b2,
                "fc2_w": w2,
                "fc2_b": bb2,
                "num_heads": int(blk.attn.num_heads),
            }
        )
    return out


class StackedGroup:
    """M sub-models of one shape, weights stacked over M, on one device in one dtype."""

    def __init__(self, subs: Sequence[SubViT], indices: Sequence[int], device: torch.device, dtype: torch.dtype):
        self.indices = list(indices)
        self.M = len(subs)
        c = subs[0].cfg
        self.d = int(c["embed_dim"])
        self.head_dim = int(c["head_dim"])
        self.T = int(c["num_prefix_tokens"])
        self.N = num_tokens(c)
        self.P = self.N - self.T
        self.patch = tuple(c["patch_size"])
        self.eps = float(c["norm_eps"])
        self.depth = len(c["blocks"])
        self.device, self.dtype = device, dtype
        folded = [fold_submodel(s) for s in subs]

        def put(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype).contiguous()

        def stack(key_fn) -> torch.Tensor:
            return torch.stack([key_fn(f) for f in folded], 0)

        # patch embedding of all models in one matmul: (K, M*d)
        self.patch_wt = put(torch.cat([f["patch_w"] for f in folded], 0).t())
        self.pos_patch = put(stack(lambda f: f["pos_patch"]))[:, None]  # (M, 1, P, d)
        self.prefix = put(stack(lambda f: f["prefix"]))[:, None]  # (M, 1, T, d)
        self.pre_norm = None
        if folded[0]["pre_norm"] is not None:
            self.pre_norm = tuple(put(stack(lambda f, i=i: f["pre_norm"][i]))[:, None, :] for i in range(2))
        # final norm in fp32: it runs inside layernorm_quantize_int8 (fp32 math)
        self.norm_w = [f["norm"][0].to(device=device, dtype=torch.float32).contiguous() for f in folded]
        self.norm_b = [f["norm"][1].to(device=device, dtype=torch.float32).contiguous() for f in folded]
        self.blocks = []
        for k in range(self.depth):
            bl = [f["blocks"][k] for f in folded]
            self.blocks.append(
                {
                    "H": bl[0]["num_heads"],
                    "qkv_wt": put(torch.stack([b["qkv_w"].t() for b in bl])),  # (M, d, 3A)
                    "qkv_b": put(torch.stack([b["qkv_b"] for b in bl]))[:, None],  # (M, 1, 3A)
                    "proj_wt": put(torch.stack([b["proj_w"].t() for b in bl])),  # (M, A, d)
                    "proj_b": put(torch.stack([b["proj_b"] for b in bl]))[:, None],
                    "fc1_wt": put(torch.stack([b["fc1_w"].t() for b in bl])),  # (M, d, m)
                    "fc1_b": put(torch.stack([b["fc1_b"] for b in bl]))[:, None],
                    "fc2_wt": put(torch.stack([b["fc2_w"].t() for b in bl])),  # (M, m, d)
                    "fc2_b": put(torch.stack([b["fc2_b"] for b in bl]))[:, None],
                }
            )

    # -- stages ----------------------------------------------------------
    def embed(self, patches: torch.Tensor, B: int) -> torch.Tensor:
        """patches (B*P, K) -> residual stream (M, B*N, d)."""
        M, d, T, N, P = self.M, self.d, self.T, self.N, self.P
        emb = patches @ self.patch_wt  # (B*P, M*d)
        x = torch.empty(M, B, N, d, device=emb.device, dtype=emb.dtype)
        torch.add(emb.view(B, P, M, d).permute(2, 0, 1, 3), self.pos_patch, out=x[:, :, T:])
        x[:, :, :T] = self.prefix
        if self.pre_norm is not None:
            w, b = self.pre_norm
            x = F.layer_norm(x, (d,), eps=self.eps).view(M, B * N, d).mul_(w).add_(b).view(M, B, N, d)
        return x.view(M, B * N, d)

    def qkv(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """(M, B*N, d) -> (M, B*N, 3A): norm1 (affine folded) + qkv."""
        blk = self.blocks[k]
        # torch.layer_norm, not F.layer_norm: the same op without the wrapper's checks (host time, issue 12)
        h = torch.layer_norm(x, (self.d,), None, None, self.eps)
        return torch.baddbmm(blk["qkv_b"], h, blk["qkv_wt"])

    def qkv_view(self, k: int, qkv: torch.Tensor, B: int) -> torch.Tensor:
        return qkv.view(self.M, B, self.N, 3, self.blocks[k]["H"], self.head_dim)

    def finish_block(self, k: int, x: torch.Tensor, o: torch.Tensor, B: int) -> torch.Tensor:
        """x (M, B*N, d), attention output o (M, B, N, A) -> x after proj + MLP residuals.

        The last block keeps only the prefix tokens: returns (M, B*T, d).
        """
        blk = self.blocks[k]
        M, d, N, T = self.M, self.d, self.N, self.T
        A = o.shape[-1]
        if k == self.depth - 1:
            o = o[:, :, :T].reshape(M, B * T, A)
            x = x.view(M, B, N, d)[:, :, :T].reshape(M, B * T, d)
        else:
            o = o.reshape(M, B * N, A)
        x = x.add_(blk["proj_b"]).baddbmm_(o, blk["proj_wt"])  # GEMM accumulates into the residual
        h = torch.layer_norm(x, (d,), None, None, self.eps)
        g = F.gelu(torch.baddbmm(blk["fc1_b"], h, blk["fc1_wt"]))
        return x.add_(blk["fc2_b"]).baddbmm_(g, blk["fc2_wt"])

    def tokens(self, x: torch.Tensor, B: int) -> torch.Tensor:
        """After the last block: (M, B, T, d) pre-norm prefix tokens."""
        return x.view(self.M, B, self.T, self.d)


def patchify(images: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B*P, C*ph*pw) in the conv weight's (C, ph, pw) order."""
    B, C, H, W = images.shape
    ph, pw = patch
    gh, gw = H // ph, W // pw
    x = images[:, :, : gh * ph, : gw * pw]
    return x.reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(B * gh * gw, C * ph * pw)


class SenderStack:
    """All sub-models of a DeViT as stacked groups; forward gives each model's pre-norm prefix tokens."""

    def __init__(self, submodels: Sequence[SubViT], device: torch.device, dtype: torch.dtype, attention):
        sigs: dict[tuple, list[int]] = {}
        for i, s in enumerate(submodels):
            sigs.setdefault(shape_signature(s), []).append(i)
        self.groups = [StackedGroup([submodels[i] for i in idx], idx, device, dtype) for idx in sigs.values()]
        self.num_models = len(submodels)
        self.patch = self.groups[0].patch
        self.depth = max(g.depth for g in self.groups)
        self.attention = attention
        self.homogeneous = len(self.groups) == 1
        for g in self.groups:
            if g.patch != self.patch:
                raise ValueError("model: sub-models with different patch sizes cannot share the image patches")

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (B, C, H, W) normalised, compute dtype -> per model (B, T, d) pre-norm prefix tokens."""
        B = images.shape[0]
        patches = patchify(images, self.patch)
        if self.homogeneous:  # one group: no per-block bookkeeping (the batch-1 host path, issue 12)
            g = self.groups[0]
            x = g.embed(patches, B)
            for k in range(g.depth):
                x = g.finish_block(k, x, self.attention(g.qkv_view(k, g.qkv(k, x), B)), B)
            return list(g.tokens(x, B).unbind(0))
        xs = [g.embed(patches, B) for g in self.groups]
        for k in range(self.depth):
            live = [i for i, g in enumerate(self.groups) if k < g.depth]
            qkvs = [self.groups[i].qkv(k, xs[i]) for i in live]
            if len(live) == 1:
                g = self.groups[live[0]]
                outs = [self.attention(g.qkv_view(k, qkvs[0], B))]
            else:
                # list form: one (B, N, 3, H_m, D) view per model of every live group, one launch
                views = [v for i, q in zip(live, qkvs) for v in self.groups[i].qkv_view(k, q, B).unbind(0)]
                res = self.attention(views)
                outs, at = [], 0
                for i in live:
                    M = self.groups[i].M
                    outs.append(res[at].unsqueeze(0) if M == 1 else torch.stack(res[at: at + M]))
                    at += M
            for i, o in zip(live, outs):
                xs[i] = self.groups[i].finish_block(k, xs[i], o, B)
        out: list[torch.Tensor | None] = [None] * self.num_models
        for g, x in zip(self.groups, xs):
            toks = g.tokens(x, B)
            for j, m in enumerate(g.indices):
                out[m] = toks[j]
        return out  # type: ignore[return-value]

    def final_norm(self, m: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        for g in self.groups:
            if m in g.indices:
                j = g.indices.index(m)
                return g.norm_w[j], g.norm_b[j], g.eps
        raise IndexError(m)
