"""CCT (Hassani et al., "Escaping the Big Data Paradigm with Compact Transformers"): the teacher and the sub-model.

Convolutional tokenizer (bias-free convs, ReLU, max-pool 3/2/1) -> position
embedding (learnable, sine or none) -> blocks -> final LayerNorm -> sequence
pooling (a Linear(d, 1) score per token, softmax over tokens, weighted sum)
-> classifier. A block is not timm's pre-norm block:

    x = x + proj(attn(qkv(pre_norm(x))));  x = norm1(x);  x = x + linear2(gelu(linear1(x)))

(the MLP residual starts from the normalised stream). Parameter names are
SHI-Labs/Compact-Transformers' (`tokenizer.conv_layers.I.0`,
`classifier.positional_emb`, `classifier.blocks.K.{pre_norm, self_attn.qkv,
self_attn.proj, linear1, norm1, linear2}`, `classifier.norm`,
`classifier.attention_pool`, `classifier.fc`), so their checkpoints load as
they are. Blocks may differ in heads and MLP width (pruned sub-models);
`blocks[k].attn.qkv` reads Q/K/V as it does on a ViT.

`CCT` follows timm's conventions (`forward_features` -> normalised tokens,
`forward_head(tokens, pre_logits)`); `SubCCT` is a device's model in a DeViT
(`forward_tokens` -> the pooled vector it sends, `forward_head` -> local logits).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import shapes as S


def sine_embedding(n: int, dim: int) -> torch.Tensor:
    """The published sinusoidal table (1, n, dim): p / 10000^(2 (i // 2) / dim), sin on even i, cos on odd."""
    p = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(dim, dtype=torch.float64)[None]
    pe = p / torch.pow(10000.0, 2 * torch.div(i, 2, rounding_mode="floor") / dim)
    pe[:, 0::2] = torch.sin(pe[:, 0::2])
    pe[:, 1::2] = torch.cos(pe[:, 1::2])
    return pe.float()[None]


class Tokenizer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        chans = [cfg["in_chans"], *cfg["conv_channels"], cfg["embed_dim"]]
        k, s, p = cfg["kernel_size"], cfg["stride"], cfg["padding"]
        self.conv_layers = nn.Sequential(*[
            nn.Sequential(nn.Conv2d(chans[i], chans[i + 1], k, stride=s, padding=p, bias=False), nn.ReLU(),
                          nn.MaxPool2d(*cfg["pool"]) if cfg["max_pool"] else nn.Identity())
            for i in range(len(chans) - 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_layers(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, d)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int, attn_drop: float, proj_drop: float):
        super().__init__()
        self.num_heads, self.head_dim, self.attn_drop = num_heads, head_dim, attn_drop
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=False)
        self.proj = nn.Linear(num_heads * head_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, N, -1)))


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class TransformerEncoderLayer(nn.Module):
    def __init__(self, cfg: dict, num_heads: int, mlp_hidden: int, drop_path: float):
        super().__init__()
        d, eps = cfg["embed_dim"], cfg["norm_eps"]
        self.pre_norm = nn.LayerNorm(d, eps=eps)
        self.self_attn = Attention(d, num_heads, cfg["head_dim"], cfg["attn_drop_rate"], cfg["drop_rate"])
        self.linear1 = nn.Linear(d, mlp_hidden)
        self.dropout1 = nn.Dropout(cfg["drop_rate"])
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.linear2 = nn.Linear(mlp_hidden, d)
        self.dropout2 = nn.Dropout(cfg["drop_rate"])
        self.drop_path = float(drop_path)

    @property
    def attn(self) -> Attention:
        """The attention under the name a ViT block uses (Q/K/V hooks read `blocks[k].attn.qkv`)."""
        return self.self_attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + _drop_path(self.self_attn(self.pre_norm(x)), self.drop_path, self.training)
        x = self.norm1(x)
        y = self.linear2(self.dropout1(F.gelu(self.linear1(x))))
        return x + _drop_path(self.dropout2(y), self.drop_path, self.training)


class TransformerClassifier(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d, n = cfg["embed_dim"], S.seq_len(cfg)
        self.seq_len = n
        self.attention_pool = nn.Linear(d, 1)
        kind = cfg["positional_embedding"]
        if kind == "learnable":
            self.positional_emb = nn.Parameter(torch.zeros(1, n, d))
        elif kind == "sine":  # fixed: a buffer (the state-dict key is the same as the public Parameter's)
            self.register_buffer("positional_emb", sine_embedding(n, d))
        else:
            self.positional_emb = None
        self.dropout = nn.Dropout(cfg["drop_rate"])
        L = len(cfg["blocks"])
        dpr = [cfg["drop_path_rate"] * k / (L - 1) if L > 1 else 0.0 for k in range(L)]
        self.blocks = nn.ModuleList([TransformerEncoderLayer(cfg, b["num_heads"], b["mlp_hidden"], dpr[k])
                                     for k, b in enumerate(cfg["blocks"])])
        self.norm = nn.LayerNorm(d, eps=cfg["norm_eps"])
        self.fc = nn.Linear(d, cfg["num_classes"]) if cfg["num_classes"] > 0 else nn.Identity()


class CCT(nn.Module):
    """A CCT from a config (`shapes.make_config`); timm conventions for the forward passes."""

    def __init__(self, cfg: dict):
        super().__init__()
        S.seq_len(cfg)  # clear error for an image size the tokenizer cannot take
        self.cfg = copy.deepcopy(cfg)
        self.embed_dim = self.num_features = int(cfg["embed_dim"])
        self.num_classes = int(cfg["num_classes"])
        self.tokenizer = Tokenizer(cfg)
        self.classifier = TransformerClassifier(cfg)
        self._init_weights()

    def _init_weights(self) -> None:
        """The published init: kaiming-normal convs, trunc-normal(0.02) linears, unit norms, pos trunc-normal(0.2)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if isinstance(self.classifier.positional_emb, nn.Parameter):
            nn.init.trunc_normal_(self.classifier.positional_emb, std=0.2)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.classifier.blocks

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> tokens (B, N, d) after the final norm."""
        x = self.tokenizer(x)
        pos = self.classifier.positional_emb
        if pos is not None:
            if x.shape[1] != pos.shape[1]:
                raise ValueError(
                    f"images: the tokenizer gives {x.shape[1]} tokens but the position embedding has "
                    f"{pos.shape[1]} (the model takes {self.cfg['in_chans']}x{self.cfg['img_size'][0]}x"
                    f"{self.cfg['img_size'][1]} images)")
            x = x + pos
        x = self.classifier.dropout(x)
        for blk in self.classifier.blocks:
            x = blk(x)
        return self.classifier.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Sequence pooling: normalised tokens (B, N, d) -> (B, d)."""
        w = F.softmax(self.classifier.attention_pool(x), dim=1)  # (B, N, 1)
        return (w.transpose(1, 2) @ x).squeeze(1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)
        return x if pre_logits else self.classifier.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = self.cfg["num_classes"] = int(num_classes)
        fc = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.classifier.fc = fc.to(self.classifier.norm.weight.device)

    def no_weight_decay(self) -> set[str]:
        return {"classifier.positional_emb"}


class SubCCT(CCT):
    """One device's CCT in a DeViT: sends its pooled vector; `cfg["num_classes"]` is local."""

    distilled = False
    num_prefix_tokens = 0

    @property
    def head(self) -> nn.Module:
        return self.classifier.fc

    head_dist = None

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The token a device sends: the sequence-pooled vector (B, d) (already after the final norm)."""
        return self.pool(self.forward_features(x))

    def forward_head(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """Local logits (z, z), as a plain SubViT gives them."""
        z = self.classifier.fc(tokens)
        return z, z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.fc(self.forward_tokens(x))

    def sender_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, d): what `protocol.encode` takes; no final norm is left to fuse (it precedes the pooling)."""
        return self.forward_tokens(x)[:, None]

    def sender_norm(self) -> tuple[None, None, None]:
        return None, None, None

    def flops(self) -> int:
        return S.flops(self.cfg)

    def num_params(self) -> int:
        skip = {id(p) for p in self.head.parameters()}
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)


def teacher_config(teacher: nn.Module) -> dict:
    """The config describing a built CCT exactly (the teacher's blocks may already differ in width)."""
    if not isinstance(teacher, CCT):
        raise TypeError(f"teacher: expected a devit_ext CCT, got {type(teacher).__name__}")
    cfg = copy.deepcopy(teacher.cfg)
    cfg["num_classes"] = int(teacher.num_classes)
    pcfg = getattr(teacher, "pretrained_cfg", None) or {}
    for key in ("mean", "std"):
        if key in pcfg:
            cfg[key] = [float(v) for v in pcfg[key]]
    return cfg

