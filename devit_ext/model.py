"""The DeViT container: class-specialised sub-ViTs, their class groups, the fusion head.

`SubViT` is a plain ViT whose blocks may differ in width (heads, MLP neurons)
after physical pruning. It keeps timm's parameter names (`patch_embed.proj`,
`cls_token`, `dist_token`, `pos_embed`, `blocks.K.attn.qkv`, `blocks.K.mlp.fc1`,
`norm`, `head`, ...) so timm checkpoints and tooling line up, and so one
forward hook on `blocks.K.attn.qkv` reads Q/K/V from a teacher and a student
alike.

`DeViT` holds the sub-models (one per device), their class groups and the
fusion head; `forward` is the plain float path that every engine is checked
against. `save`/`load` use safetensors plus a JSON config with a content hash
over both (written atomically, checked against the weights' header before
anything is built: `model_files`); nothing is ever unpickled.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import model_files
from .cct import CCT, SubCCT
from .cct import teacher_config as cct_teacher_config
from .protocol import fused_logits
from .shapes import is_cct, num_tokens, summary_table, vit_flops
from .shapes import teacher_config as vit_teacher_config

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# ---------------------------------------------------------------------------
# SubViT: a ViT whose blocks may differ in width, with timm's parameter names
# ---------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.proj = nn.Conv2d(
            cfg["in_chans"], cfg["embed_dim"], cfg["patch_size"], stride=cfg["patch_size"], bias=cfg["patch_bias"]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N_patches, d)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int, qkv_bias: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        # (B, N, 3*H*D) -> 3 x (B, H, N, D)
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, N, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, cfg: dict, num_heads: int, mlp_hidden: int):
        super().__init__()
        d, eps = cfg["embed_dim"], cfg["norm_eps"]
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.attn = Attention(d, num_heads, cfg["head_dim"], cfg["qkv_bias"])
        self.ls1 = LayerScale(d) if cfg["layer_scale"] else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=eps)
        self.mlp = Mlp(d, mlp_hidden)
        self.ls2 = LayerScale(d) if cfg["layer_scale"] else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class SubViT(nn.Module):
    """One device's model. `cfg` is a plain dict (see `teacher_config`); `num_classes` is local."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = copy.deepcopy(cfg)
        d = cfg["embed_dim"]
        self.embed_dim = d
        self.distilled = bool(cfg["distilled"])
        self.num_prefix_tokens = cfg["num_prefix_tokens"]
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d)) if self.distilled else None
        n_pos = num_tokens(cfg) - (self.num_prefix_tokens if cfg["no_embed_class"] else 0)
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, d))
        self.norm_pre = nn.LayerNorm(d, eps=cfg["norm_eps"]) if cfg["pre_norm"] else nn.Identity()
        self.blocks = nn.Sequential(*[Block(cfg, b["num_heads"], b["mlp_hidden"]) for b in cfg["blocks"]])
        self.norm = nn.LayerNorm(d, eps=cfg["norm_eps"])
        self.head = nn.Linear(d, cfg["num_classes"])
        self.head_dist = nn.Linear(d, cfg["num_classes"]) if self.distilled else None

    def _prefix(self, B: int) -> torch.Tensor:
        toks = [self.cls_token] + ([self.dist_token] if self.distilled else [])
        return torch.cat([t.expand(B, -1, -1) for t in toks], dim=1)

    def forward_features(self, x: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        """images (B, C, H, W) -> all tokens (B, N, d), after the final norm unless told not to.

        Senders skip the final norm here and fuse it with int8 quantisation
        (`devit_ext.ops.layernorm_quantize_int8` with `self.norm`'s parameters).
        """
        x = self.patch_embed(x)
        prefix = self._prefix(x.shape[0])
        if self.cfg["no_embed_class"]:
            x = torch.cat([prefix, x + self.pos_embed], dim=1)
        else:
            x = torch.cat([prefix, x], dim=1) + self.pos_embed
        x = self.blocks(self.norm_pre(x))
        return self.norm(x) if final_norm else x

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The token a device sends: (B, d), or (B, 2, d) with a distillation token."""
        f = self.forward_features(x)
        return f[:, :2] if self.distilled else f[:, 0]

    def sender_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d) pre-norm prefix tokens: what `protocol.encode` takes with `sender_norm()`."""
        return self.forward_features(x, final_norm=False)[:, : self.num_prefix_tokens]

    def sender_norm(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The final LayerNorm, fused with int8 quantisation on the sender side."""
        return self.norm.weight, self.norm.bias, self.norm.eps

    def forward_head(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Local logits (z_cls, z_dist); for a plain ViT both are the same tensor."""
        if self.distilled:
            return self.head(tokens[:, 0]), self.head_dist(tokens[:, 1])
        z = self.head(tokens)
        return z, z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, zd = self.forward_head(self.forward_tokens(x))
        return z if not self.distilled else (z + zd) / 2

    def no_weight_decay(self) -> set[str]:
        """Parameters an optimizer should not decay (timm's convention: tokens and position embedding)."""
        return {"pos_embed", "cls_token", "dist_token"}

    def flops(self) -> int:
        return vit_flops(self.cfg)

    def num_params(self) -> int:
        """Parameters a device runs (the local training head left out)."""
        skip = {id(p) for m in (self.head, self.head_dist) if m is not None for p in m.parameters()}
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)


# ---------------------------------------------------------------------------
# Backbones: ViT (SubViT) and CCT (devit_ext.cct.SubCCT), told apart by the config's "backbone" field
# ---------------------------------------------------------------------------


def teacher_config(teacher: nn.Module) -> dict:
    """The sub-model config describing `teacher`: a timm ViT (`shapes.teacher_config`) or a CCT."""
    return cct_teacher_config(teacher) if isinstance(teacher, CCT) else vit_teacher_config(teacher)


def build_submodel(cfg: dict) -> nn.Module:
    """A device's model for a config: `SubCCT` for `"backbone": "cct"`, else `SubViT`."""
    return SubCCT(cfg) if is_cct(cfg) else SubViT(cfg)


def teacher_tokens(teacher: nn.Module, feats: torch.Tensor, distilled: bool = False) -> list[torch.Tensor]:
    """What the fusion map is matched to, from `teacher.forward_features`: the class (and distillation)
    token of a ViT, the sequence-pooled vector of a CCT."""
    if isinstance(teacher, CCT):
        return [teacher.pool(feats)]
    return [feats[:, 0]] + ([feats[:, 1]] if distilled else [])


# ---------------------------------------------------------------------------
# Fusion head and the DeViT container
# ---------------------------------------------------------------------------


class FusionHead(nn.Module):
    """concat(tokens) -> Linear(sum widths -> d_T) -> Linear(d_T -> C), no non-linearity (the paper's fusion).

    With distillation tokens a second branch fuses those and the two logit sets
    are averaged.
    """

    def __init__(self, widths: Sequence[int], teacher_dim: int, num_classes: int, distilled: bool = False):
        super().__init__()
        self.widths = [int(w) for w in widths]
        self.distilled = bool(distilled)
        self.map = nn.Linear(sum(self.widths), teacher_dim)
        self.head = nn.Linear(teacher_dim, num_classes)
        self.map_dist = nn.Linear(sum(self.widths), teacher_dim) if distilled else None
        self.head_dist = nn.Linear(teacher_dim, num_classes) if distilled else None

    def branches(self) -> list[tuple[nn.Linear, nn.Linear]]:
        """(linear map, classifier) per token kind: [cls] or [cls, dist]."""
        out = [(self.map, self.head)]
        if self.distilled:
            out.append((self.map_dist, self.head_dist))
        return out

    def mapped(self, tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Linear map of the concatenated tokens, per branch: what is matched to the teacher's tokens."""
        cat = torch.cat(list(tokens), dim=-1)
        if self.distilled:
            return [self.map(cat[:, 0]), self.map_dist(cat[:, 1])]
        return [self.map(cat)]

    def forward(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        return fused_logits(self, self.mapped(tokens))


class DeViT(nn.Module):
    """N class-specialised sub-models, their class groups and the fusion head."""

    def __init__(self, submodels: Sequence[nn.Module], class_groups: Sequence[Sequence[int]], fusion: FusionHead, meta: dict):
        super().__init__()
        self.submodels = nn.ModuleList(submodels)
        self.class_groups = [[int(c) for c in g] for g in class_groups]
        self.fusion = fusion
        self.meta = copy.deepcopy(meta)

    # -- properties -------------------------------------------------------
    @property
    def num_devices(self) -> int:
        return len(self.submodels)

    @property
    def widths(self) -> list[int]:
        return [m.embed_dim for m in self.submodels]

    @property
    def distilled(self) -> bool:
        return self.fusion.distilled

    @property
    def num_classes(self) -> int:
        return self.fusion.head.out_features

    @property
    def img_size(self) -> list[int]:
        return list(self.meta["img_size"])

    @property
    def in_chans(self) -> int:
        return int(self.meta["in_chans"])

    # -- forward passes ---------------------------------------------------
    def forward_tokens(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [m.forward_tokens(images) for m in self.submodels]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fusion(self.forward_tokens(images))

    # -- costs ------------------------------------------------------------
    def flops(self) -> list[int]:
        return [m.flops() for m in self.submodels]

    def num_params(self) -> list[int]:
        return [m.num_params() for m in self.submodels]

    def fusion_flops(self) -> int:
        return sum(2 * a.in_features * a.out_features + 2 * b.in_features * b.out_features for a, b in self.fusion.branches())

    def summary(self) -> str:
        """Text table: each device's classes, shape, parameters and FLOPs (`devit_ext.shapes.summary_table`)."""
        return summary_table(self)

    # -- persistence ------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "meta": self.meta,
            "class_groups": self.class_groups,
            "submodels": [m.cfg for m in self.submodels],
            "fusion": {
                "widths": self.fusion.widths,
                "teacher_dim": self.fusion.map.out_features,
                "num_classes": self.num_classes,
                "distilled": self.distilled,
            },
        }

    def content_hash(self) -> str:
        """sha256 over the canonical config and every tensor (`model_files.content_hash`)."""
        return model_files.content_hash(self.config(), state_hash(self.state_dict()))

    def save(self, path: str | os.PathLike) -> str:
        """Write `path/config.json` and `path/model.safetensors` atomically; returns the content hash.

        Both files go into a fresh directory beside `path` that replaces it in
        one step (`model_files.write_dir`): a kill leaves the old save or the new
        one, never a mix. `path` must be new, empty or an earlier save.
        """
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        cfg = self.config()
        digest = model_files.content_hash(cfg, state_hash(state))
        cfg["content_hash"] = digest

        def write(tmp: str) -> None:
            save_file(state, os.path.join(tmp, WEIGHTS_FILE), metadata={"content_hash": digest, "format": "devit"})
            model_files._step("weights-written")
            with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
                json.dump(cfg, f, indent=1)

        try:
            model_files.write_dir(os.fspath(path), write)
        except FileExistsError as e:
            raise ModelFileError(str(e)) from None
        return digest

    @classmethod
    def from_config(cls, cfg: dict) -> "DeViT":
        subs = [build_submodel(c) for c in cfg["submodels"]]
        fcfg = cfg["fusion"]
        fusion = FusionHead(fcfg["widths"], fcfg["teacher_dim"], fcfg["num_classes"], fcfg["distilled"])
        return cls(subs, cfg["class_groups"], fusion, cfg["meta"])


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of every tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ModelFileError(ValueError):
    """A saved DeViT (`DeViT.save`) that is missing, truncated, edited or does not match its config.

    Not to be confused with training checkpoints (`devit_ext.checkpoint`, resuming a run).
    """


CheckpointError = ModelFileError  # the name this error had before; kept so existing `except` clauses work


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> DeViT:
    """Load a DeViT saved with `DeViT.save`: safetensors + JSON, verified against its content hash."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    cfg_path, w_path = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise ModelFileError(f"path: {path!r} is not a saved DeViT (missing {os.path.basename(p)})")
    try:
        cfg = model_files.read_config(cfg_path)
    except ValueError as e:
        raise ModelFileError(f"path: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("format_version") != FORMAT_VERSION:
        got = cfg.get("format_version") if isinstance(cfg, dict) else None
        raise ModelFileError(f"path: {cfg_path} has format_version {got!r}, expected {FORMAT_VERSION}")
    try:  # every size the config names, against the weights' header, before anything is built
        header = model_files.read_header(w_path)
    except ValueError as e:
        raise ModelFileError(f"path: {e}") from None
    try:
        model_files.check_config(cfg, header)
    except ValueError as e:
        raise ModelFileError(f"path: {cfg_path} does not match its weights' shapes or limits: {e}") from None
    try:
        model = DeViT.from_config(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"path: {cfg_path} does not describe a DeViT ({type(e).__name__}: {e})") from None
    try:
        state = load_file(w_path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"path: {w_path} is corrupt or truncated ({e})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ModelFileError(
            f"path: weights do not match the config (missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''})"
        )
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ModelFileError(f"path: tensor {k} has shape {tuple(state[k].shape)}, config implies {tuple(v.shape)}")
    digest = model_files.content_hash(cfg, state_hash(state))
    if digest != cfg.get("content_hash"):
        raise ModelFileError(
            f"path: content hash mismatch (config says {str(cfg.get('content_hash'))[:12]}, config and weights hash "
            f"to {digest[:12]}): the files were edited or come from different saves"
        )
    model.load_state_dict(state)
    return model.to(map_location)
