"""Shapes and costs of ViTs, computed from a config dict alone (no module is built).

The config of a sub-model (`SubViT(cfg)`) is the teacher's (`teacher_config`)
with width, blocks and local class count replaced (`shape_config`); FLOPs
(`vit_flops`), parameters (`vit_params`) and tokens (`num_tokens`) follow from
it, and so does the text of the summary table of a DeViT. Ground floor: it
imports no other module of the package (timm only inside `teacher_config`).
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch.nn as nn


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, (int, float)) else [int(x) for x in v]


def num_tokens(cfg: dict) -> int:
    """Tokens per image: patches plus class (and distillation) token."""
    gh, gw = (i // p for i, p in zip(cfg["img_size"], cfg["patch_size"]))
    return gh * gw + cfg["num_prefix_tokens"]


def vit_flops(cfg: dict, include_head: bool = False) -> int:
    """FLOPs (2 per multiply-add) of one image's forward pass, counted for the real shapes.

    Matmuls, convolution and attention products are counted; norms, softmax,
    GELU and additions are left out (under 1% for ViTs). The local class head is
    training-only on a device, so it is left out unless asked for.
    """
    n = num_tokens(cfg)
    d, hd = cfg["embed_dim"], cfg["head_dim"]
    patches = n - cfg["num_prefix_tokens"]
    ph, pw = cfg["patch_size"]
    flops = 2 * patches * cfg["in_chans"] * ph * pw * d
    for blk in cfg["blocks"]:
        a = blk["num_heads"] * hd
        m = blk["mlp_hidden"]
        flops += 2 * n * d * 3 * a  # qkv
        flops += 2 * 2 * n * n * a  # q k^T and attn v
        flops += 2 * n * a * d  # proj
        flops += 2 * 2 * n * d * m  # fc1 + fc2
    if include_head:
        flops += 2 * d * cfg["num_classes"] * (2 if cfg["distilled"] else 1)
    return int(flops)


def is_cct(cfg: dict) -> bool:
    """A CCT config (`devit_ext.cct`), not a ViT's: configs without a "backbone" field are ViTs."""
    return cfg.get("backbone", "vit") == "cct"


def flops_of(cfg: dict, include_head: bool = False) -> int:
    """FLOPs of one image for any backbone's config (`vit_flops`, or `devit_ext.cct.shapes.flops`)."""
    if is_cct(cfg):
        from .cct.shapes import flops

        return flops(cfg, include_head)
    return vit_flops(cfg, include_head)


def params_of(cfg: dict) -> int:
    """Parameters a device runs for any backbone's config (`vit_params`, or `devit_ext.cct.shapes.params`)."""
    if is_cct(cfg):
        from .cct.shapes import params

        return params(cfg)
    return vit_params(cfg)


def attention_flops(cfg: dict) -> int:
    """FLOPs of the attention products (q k^T and attn v) alone, the part that grows with tokens^2 x heads."""
    if is_cct(cfg):
        from .cct.shapes import seq_len

        n = seq_len(cfg)
    else:
        n = num_tokens(cfg)
    return int(sum(2 * 2 * n * n * b["num_heads"] * cfg["head_dim"] for b in cfg["blocks"]))


def head_layers(cfg: dict) -> int:
    """Attention heads summed over blocks (each one an N x N softmax per image, whatever the width)."""
    return int(sum(b["num_heads"] for b in cfg["blocks"]))


def attention_record(cfg: dict) -> dict:
    """What the summary shows of a teacher (kept in a DeViT's meta): shape, head-layers, attention FLOPs."""
    return {"shape": describe_shape(cfg), "head_layers": head_layers(cfg), "flops": attention_flops(cfg)}


def head_names(cfg: dict) -> list[str]:
    """Parameter prefixes of the teacher's classifier(s), one per fusion branch (class token, distillation)."""
    if is_cct(cfg):
        from .cct.shapes import HEAD

        return [HEAD]
    return ["head", "head_dist"] if cfg["distilled"] else ["head"]


def final_norm_name(cfg: dict) -> str:
    """Parameter prefix of the final LayerNorm (the one before the token that is sent)."""
    if is_cct(cfg):
        from .cct.shapes import FINAL_NORM

        return FINAL_NORM
    return "norm"


def teacher_config(teacher: nn.Module) -> dict:
    """The SubViT config describing a timm VisionTransformer exactly, or a clear error.

    Supported: timm `VisionTransformer` and `VisionTransformerDistilled` (vit_*,
    deit_*, deit3_*) with a class token, token pooling, pre-norm blocks of
    LayerNorm + Attention + GELU Mlp, optional layer scale and norm_pre.
    """
    from timm.layers import LayerScale, Mlp
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    supported = (
        "supported teachers: timm VisionTransformer / VisionTransformerDistilled (vit_*, deit_*, deit3_*) "
        "with a class token, global_pool='token', no register tokens, no qk-norm, standard pre-norm blocks; "
        "or a devit_ext CCT (devit_ext.cct: cct_7_3x1_32, ...)"
    )
    if not isinstance(teacher, VisionTransformer):
        raise TypeError(f"teacher: expected a timm VisionTransformer, got {type(teacher).__name__}; {supported}")
    if not getattr(teacher, "has_class_token", False) or teacher.cls_token is None:
        raise ValueError(f"teacher: has no class token (class_token=False); {supported}")
    problems = []
    if teacher.global_pool != "token":
        problems.append(f"global_pool={teacher.global_pool!r}")
    if getattr(teacher, "num_reg_tokens", 0):
        problems.append(f"{teacher.num_reg_tokens} register tokens")
    if getattr(teacher, "attn_pool", None) is not None:
        problems.append("attention pooling")
    if not isinstance(teacher.fc_norm, nn.Identity):
        problems.append("fc_norm")
    if not isinstance(teacher.norm, nn.LayerNorm):
        problems.append(f"final norm {type(teacher.norm).__name__}")
    if getattr(teacher, "dynamic_img_size", False):
        problems.append("dynamic_img_size")
    pe = teacher.patch_embed
    if not isinstance(getattr(pe, "norm", nn.Identity()), nn.Identity) or not isinstance(pe.proj, nn.Conv2d):
        problems.append("non-standard patch embedding")
    for k, blk in enumerate(teacher.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention or type(blk.mlp) is not Mlp:
            problems.append(f"block {k} is {type(blk).__name__}/{type(getattr(blk, 'attn', None)).__name__}")
            break
        if not isinstance(blk.attn.q_norm, nn.Identity) or not isinstance(getattr(blk.attn, "norm", nn.Identity()), nn.Identity):
            problems.append(f"block {k} uses qk/attention norm")
            break
        if not isinstance(blk.mlp.act, nn.GELU) or not isinstance(getattr(blk.mlp, "norm", nn.Identity()), nn.Identity):
            problems.append(f"block {k} MLP is not plain GELU")
            break
        if not isinstance(blk.ls1, (nn.Identity, LayerScale)):
            problems.append(f"block {k} layer scale {type(blk.ls1).__name__}")
            break
    if problems:
        raise ValueError(f"teacher: unsupported ViT variant ({', '.join(problems)}); {supported}")

    distilled = getattr(teacher, "dist_token", None) is not None
    blk0 = teacher.blocks[0]
    head_dim = blk0.attn.head_dim
    img_size = _pair(pe.img_size)
    patch_size = _pair(pe.patch_size)
    pcfg = getattr(teacher, "pretrained_cfg", None) or {}
    return {
        "img_size": img_size,
        "patch_size": patch_size,
        "in_chans": int(pe.proj.in_channels),
        "embed_dim": int(teacher.embed_dim),
        "head_dim": int(head_dim),
        "blocks": [
            {"num_heads": int(b.attn.num_heads), "mlp_hidden": int(b.mlp.fc1.out_features)} for b in teacher.blocks
        ],
        "num_classes": int(teacher.num_classes),
        "distilled": bool(distilled),
        "num_prefix_tokens": 2 if distilled else 1,
        "no_embed_class": bool(teacher.no_embed_class),
        "layer_scale": isinstance(blk0.ls1, LayerScale),
        "qkv_bias": blk0.attn.qkv.bias is not None,
        "patch_bias": pe.proj.bias is not None,
        "pre_norm": not isinstance(teacher.norm_pre, nn.Identity),
        "norm_eps": float(teacher.norm.eps),
        "mean": [float(v) for v in pcfg.get("mean", (0.5, 0.5, 0.5))],
        "std": [float(v) for v in pcfg.get("std", (0.5, 0.5, 0.5))],
    }


def shape_config(tcfg: dict, embed_dim: int, blocks: Sequence[dict], num_classes: int,
                 conv_channels: Sequence[int] | None = None) -> dict:
    """A sub-model config: the teacher's with width, blocks, (local) class count and, for a CCT, the inner
    tokenizer channels (the teacher's when None) replaced."""
    cfg = copy.deepcopy(tcfg)
    cfg["embed_dim"] = int(embed_dim)
    cfg["blocks"] = [{"num_heads": int(b["num_heads"]), "mlp_hidden": int(b["mlp_hidden"])} for b in blocks]
    cfg["num_classes"] = int(num_classes)
    if conv_channels is not None:
        cfg["conv_channels"] = [int(c) for c in conv_channels]
    return cfg


def config_of(tcfg: dict, shape: dict, num_classes: int = 1) -> dict:
    """The sub-model config of a budget's `shape` ({"embed_dim", "blocks"}, a CCT's optional "conv_channels")."""
    return shape_config(tcfg, shape["embed_dim"], shape["blocks"], num_classes, shape.get("conv_channels"))


def inner_channels(tcfg: dict, d: int) -> list[int] | None:
    """A CCT's inner tokenizer channels at width `d`: the teacher's scaled by d / its width (a width multiplier,
    as CNN families scale), at least 1 each; None for a ViT. Every device runs its tokenizer whole, so keeping
    the teacher's channels would spend a small device's budget on convs."""
    if not is_cct(tcfg) or not tcfg["conv_channels"]:
        return None
    return [max(1, round(c * d / tcfg["embed_dim"])) for c in tcfg["conv_channels"]]


def uniform_config(tcfg: dict, d: int, depth: int, heads: int, mlp: int, num_classes: int = 1) -> dict:
    """The config of a uniform shape; a CCT's inner tokenizer channels scale with `d` (`inner_channels`)."""
    return shape_config(tcfg, d, [{"num_heads": heads, "mlp_hidden": mlp}] * depth, num_classes,
                        inner_channels(tcfg, d))


def vit_params(cfg: dict) -> int:
    """Parameters a device runs (local classifier left out); equals `SubViT(cfg).num_params()`."""
    d, D, P = cfg["embed_dim"], cfg["head_dim"], cfg["num_prefix_tokens"]
    ph, pw = cfg["patch_size"]
    n_pos = num_tokens(cfg) - (P if cfg["no_embed_class"] else 0)
    n = d * cfg["in_chans"] * ph * pw + (d if cfg["patch_bias"] else 0)
    n += P * d + n_pos * d + (2 * d if cfg["pre_norm"] else 0) + 2 * d
    for b in cfg["blocks"]:
        a, m = b["num_heads"] * D, b["mlp_hidden"]
        n += 2 * d + 3 * a * d + (3 * a if cfg["qkv_bias"] else 0) + a * d + d  # norm1, qkv, proj
        n += 2 * d + m * d + m + m * d + d  # norm2, fc1, fc2
        n += 2 * d if cfg["layer_scale"] else 0  # ls1, ls2 gammas
    return int(n)


def describe_shape(cfg: dict) -> str:
    """'d192 L12 h3 m768', with ranges where blocks differ."""

    def rng(vals):
        return str(vals[0]) if min(vals) == max(vals) else f"{min(vals)}-{max(vals)}"

    bl = cfg["blocks"]
    return f"d{cfg['embed_dim']} L{len(bl)} h{rng([b['num_heads'] for b in bl])} m{rng([b['mlp_hidden'] for b in bl])}"


def fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def summary_table(model, max_classes: int = 6) -> str:
    """A text table: one row per device (classes, shape, params, FLOPs, share of the teacher's FLOPs,
    head-layers = heads x blocks, attention share = the attention products' part of its FLOPs), the
    fusion head, the total (head-layers summed over devices) and the teacher (when its blocks are known)."""
    tf = model.meta.get("teacher_flops")
    pct = lambda f: f"{100 * f / tf:.1f}" if tf else "-"  # noqa: E731
    rows = [("device", "classes", "shape", "params", "FLOPs", "% teacher", "head-layers", "attn %")]
    for i, (m, g) in enumerate(zip(model.submodels, model.class_groups)):
        shown = ",".join(map(str, g[:max_classes])) + (",..." if len(g) > max_classes else "")
        f = m.flops()
        rows.append((str(i), f"{len(g)}: {shown}", describe_shape(m.cfg), fmt_count(m.num_params()),
                     fmt_count(f), pct(f), str(head_layers(m.cfg)), f"{100 * attention_flops(m.cfg) / f:.1f}"))
    ff = model.fusion_flops()
    fp = sum(p.numel() for p in model.fusion.parameters())
    rows.append(("fusion", str(model.num_classes), f"{sum(model.widths)}->{model.meta.get('teacher_dim')}->{model.num_classes}",
                 fmt_count(fp), fmt_count(ff), pct(ff), "", ""))
    tot = sum(model.flops()) + ff
    att = sum(attention_flops(m.cfg) for m in model.submodels)
    rows.append(("total", "", "", fmt_count(sum(model.num_params()) + fp), fmt_count(tot), pct(tot),
                 str(sum(head_layers(m.cfg) for m in model.submodels)), f"{100 * att / tot:.1f}"))
    t = model.meta.get("teacher_attention")  # absent in checkpoints written before it was recorded
    if t and tf:
        rows.append(("teacher", str(model.num_classes), t["shape"], fmt_count(model.meta.get("teacher_params", 0)),
                     fmt_count(tf), "100.0", str(t["head_layers"]), f"{100 * t['flops'] / tf:.1f}"))
    w = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(r[c].ljust(w[c]) if c < 3 else r[c].rjust(w[c]) for c in range(len(r))).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    head = f"{model.meta.get('teacher_name', 'teacher')}: {fmt_count(tf) if tf else '?'} FLOPs -> {model.num_devices} devices"
    return head + "\n" + "\n".join(lines)
