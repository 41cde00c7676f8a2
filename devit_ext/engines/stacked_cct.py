"""CCT sub-models as stacks: the sender side of the local engine for a DeViT of `SubCCT`s.

Sub-models with identical shapes form a group whose weights are stacked over a
model dimension M (as `stacked.StackedGroup` does for ViTs):

- tokenizer: the first conv of all M models is one convolution with M x c_1
  output channels (every model reads the same image); each later conv is one
  grouped convolution (groups=M: model m reads only its own channels). ReLU and
  max-pool act per channel, so they run once on the stacked channels.
- blocks: the residual stream is one (M, B*N, d) tensor, batched matmuls
  (`torch.baddbmm`), one `subvit_attention` launch per group and block.
  pre_norm's affine is folded into the bias-free qkv (exact algebra, fp64, once).
  norm1's affine is *not* folded: a CCT block does `x = norm1(x); x = x +
  linear2(gelu(linear1(x)))`, so norm1's output is also the MLP's residual; it
  runs as a stacked affine after a plain normalisation.
- the final norm and the sequence pooling, stacked: each model's pooled vector
  (B, 1, d) is what it sends. It already comes after the final norm, so the
  engine's `encode` takes no norm (int8: `quantize_int8` alone).

Groups of different shapes run one after the other (one attention launch per
group and block, not one for all: the engine's notes say how many groups ran).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..cct import SubCCT
from ..cct.shapes import seq_len


def shape_signature(sub: SubCCT) -> tuple:
    c = sub.cfg
    return (int(c["embed_dim"]), int(c["head_dim"]), tuple(c["conv_channels"]),
            tuple((int(b["num_heads"]), int(b["mlp_hidden"])) for b in c["blocks"]), tuple(c["img_size"]),
            int(c["in_chans"]), int(c["kernel_size"]), int(c["stride"]), int(c["padding"]), bool(c["max_pool"]),
            tuple(c["pool"]), c["positional_embedding"], float(c["norm_eps"]))


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


class CCTStackedGroup:
    """M SubCCTs of one shape, weights stacked over M, on one device in one dtype."""

    def __init__(self, subs: Sequence[SubCCT], indices: Sequence[int], device: torch.device, dtype: torch.dtype):
        self.indices = list(indices)
        self.M = len(subs)
        c = subs[0].cfg
        self.d, self.head_dim, self.N = int(c["embed_dim"]), int(c["head_dim"]), seq_len(c)
        self.eps = float(c["norm_eps"])
        self.conv = dict(stride=int(c["stride"]), padding=int(c["padding"]))
        self.pool = tuple(c["pool"]) if c["max_pool"] else None

        def put(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype).contiguous()

        n_conv = len(c["conv_channels"]) + 1
        self.conv_w = [put(torch.cat([s.tokenizer.conv_layers[i][0].weight.detach() for s in subs], 0))
                       for i in range(n_conv)]
        pos = [s.classifier.positional_emb for s in subs]
        self.pos = None if pos[0] is None else put(torch.stack([p.detach()[0] for p in pos]))[:, None]  # (M,1,N,d)
        self.blocks = []
        for k in range(len(c["blocks"])):
            bl = [s.classifier.blocks[k] for s in subs]
            g = [_f64(b.pre_norm.weight) for b in bl]
            be = [_f64(b.pre_norm.bias) for b in bl]
            wq = [_f64(b.self_attn.qkv.weight) for b in bl]

            def st(fn):
                return put(torch.stack([fn(b) for b in bl]))

            self.blocks.append({
                "H": int(bl[0].self_attn.num_heads),
                "qkv_wt": put(torch.stack([(w * gi[None]).t() for w, gi in zip(wq, g)])),  # (M, d, 3A)
                "qkv_b": put(torch.stack([w @ bi for w, bi in zip(wq, be)]))[:, None],  # (M, 1, 3A)
                "proj_wt": st(lambda b: b.self_attn.proj.weight.detach().t()),
                "proj_b": st(lambda b: b.self_attn.proj.bias.detach())[:, None],
                "n1_w": st(lambda b: b.norm1.weight.detach())[:, None],
                "n1_b": st(lambda b: b.norm1.bias.detach())[:, None],
                "fc1_wt": st(lambda b: b.linear1.weight.detach().t()),
                "fc1_b": st(lambda b: b.linear1.bias.detach())[:, None],
                "fc2_wt": st(lambda b: b.linear2.weight.detach().t()),
                "fc2_b": st(lambda b: b.linear2.bias.detach())[:, None],
            })
        cl = [s.classifier for s in subs]
        self.norm_w = put(torch.stack([x.norm.weight.detach() for x in cl]))[:, None, None]  # (M, 1, 1, d)
        self.norm_b = put(torch.stack([x.norm.bias.detach() for x in cl]))[:, None, None]
        self.pool_w = put(torch.stack([x.attention_pool.weight.detach()[0] for x in cl]))[:, None, :, None]  # (M,1,d,1)
        self.pool_b = put(torch.stack([x.attention_pool.bias.detach() for x in cl]))[:, None, None]  # (M, 1, 1, 1)
        self.depth = len(self.blocks)

    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> residual stream (M, B*N, d) with the position embedding added."""
        # CPU: channels-last (NHWC) from the first conv on: torch's CPU max-pool is ~5x faster on NHWC than on
        # NCHW, and the convs take NHWC as well (cct_14_7x2_224's tokenizer, 4 devices, batch 8: 1.07 s -> 0.46 s)
        x = images.contiguous(memory_format=torch.channels_last) if images.device.type == "cpu" else images
        for i, w in enumerate(self.conv_w):
            x = F.conv2d(x, w, None, groups=1 if i == 0 else self.M, **self.conv)
            if self.pool is not None:  # pool, then ReLU: they commute (ReLU is monotone); ReLU reads 4x fewer values
                x = F.max_pool2d(x, *self.pool)
            x = F.relu_(x)
        B = x.shape[0]
        if x.shape[2] * x.shape[3] != self.N:
            raise ValueError(f"images: the tokenizer gives {x.shape[2] * x.shape[3]} tokens, the sub-models take {self.N}")
        x = x.permute(0, 2, 3, 1).reshape(B, self.N, self.M, self.d).permute(2, 0, 1, 3)  # (M, B, N, d)
        x = x + self.pos if self.pos is not None else x.contiguous()
        return x.reshape(self.M, B * self.N, self.d)

    def block(self, k: int, x: torch.Tensor, B: int, attention) -> torch.Tensor:
        blk, M, d, N = self.blocks[k], self.M, self.d, self.N
        qkv = torch.baddbmm(blk["qkv_b"], F.layer_norm(x, (d,), eps=self.eps), blk["qkv_wt"])
        o = attention(qkv.view(M, B, N, 3, blk["H"], self.head_dim))  # (M, B, N, A)
        x = x.add_(blk["proj_b"]).baddbmm_(o.reshape(M, B * N, -1), blk["proj_wt"])
        x = F.layer_norm(x, (d,), eps=self.eps).mul_(blk["n1_w"]).add_(blk["n1_b"])  # also the MLP's residual
        h = F.gelu(torch.baddbmm(blk["fc1_b"], x, blk["fc1_wt"]))
        return x.add_(blk["fc2_b"]).baddbmm_(h, blk["fc2_wt"])

    def pooled(self, x: torch.Tensor, B: int) -> torch.Tensor:
        """After the last block: final norm + sequence pooling -> (M, B, d)."""
        x = F.layer_norm(x, (self.d,), eps=self.eps).view(self.M, B, self.N, self.d).mul_(self.norm_w).add_(self.norm_b)
        a = torch.softmax(x @ self.pool_w + self.pool_b, dim=2)  # (M, B, N, 1)
        return (a * x).sum(2)


class CCTSenderStack:
    """All SubCCTs of a DeViT as stacked groups; forward gives each model's pooled vector (B, 1, d)."""

    def __init__(self, submodels: Sequence[SubCCT], device: torch.device, dtype: torch.dtype, attention):
        sigs: dict[tuple, list[int]] = {}
        for i, s in enumerate(submodels):
            sigs.setdefault(shape_signature(s), []).append(i)
        self.groups = [CCTStackedGroup([submodels[i] for i in idx], idx, device, dtype) for idx in sigs.values()]
        self.num_models = len(submodels)
        self.attention = attention
        self.homogeneous = len(self.groups) == 1

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        B = images.shape[0]
        out: list[torch.Tensor | None] = [None] * self.num_models
        for g in self.groups:
            x = g.tokenize(images)
            for k in range(g.depth):
                x = g.block(k, x, B, self.attention)
            toks = g.pooled(x, B)
            for j, m in enumerate(g.indices):
                out[m] = toks[j][:, None]
        return out  # type: ignore[return-value]

    def final_norm(self, m: int) -> tuple[None, None, None]:
        """No norm is left for the sender to fuse: the pooled vector follows the final norm."""
        return None, None, None
