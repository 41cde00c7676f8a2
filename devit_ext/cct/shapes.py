"""CCT configs and their costs, from a config dict alone (no module is built).

A CCT config (`make_config`, or `teacher_config` of a built model) is a plain
dict with `"backbone": "cct"`: the tokenizer (conv kernel/stride/padding, the
inner channels of a multi-conv tokenizer, max-pool 3/2/1), the position
embedding kind, the width, the blocks (heads, MLP neurons, each may differ
after pruning) and the classes. `grid` gives the tokenizer's output size,
`flops` / `params` the costs, `param_axes` which axis of which parameter (the
public repository's names) indexes which prunable unit.
"""
from __future__ import annotations

import copy
import re

POS_KINDS = ("learnable", "sine", "none")
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HEAD = "classifier.fc"  # the classifier's parameter prefix
FINAL_NORM = "classifier.norm"
INNER_PLANES = 64  # the public tokenizer's channels between convs (in_planes)


def _conv_out(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


def grid(cfg: dict) -> list[tuple[int, int]]:
    """(H, W) after each conv layer (after its max-pool); a clear error when an image is too small."""
    h, w = (int(v) for v in cfg["img_size"])
    out = []
    for i in range(len(cfg["conv_channels"]) + 1):
        h, w = _conv_out(h, cfg["kernel_size"], cfg["stride"], cfg["padding"]), _conv_out(w, cfg["kernel_size"], cfg["stride"], cfg["padding"])
        if cfg["max_pool"]:
            if h >= 1 and w >= 1:
                h, w = _conv_out(h, *cfg["pool"]), _conv_out(w, *cfg["pool"])
        if h < 1 or w < 1:
            raise ValueError(
                f"img_size: {list(cfg['img_size'])} is too small for the CCT tokenizer (conv {i + 1} of "
                f"{len(cfg['conv_channels']) + 1}: kernel {cfg['kernel_size']}, stride {cfg['stride']}, padding "
                f"{cfg['padding']}, max-pool {cfg['pool'] if cfg['max_pool'] else None}) leaves no tokens")
        out.append((h, w))
    return out


def seq_len(cfg: dict) -> int:
    h, w = grid(cfg)[-1]
    return h * w


def make_config(*, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float, kernel_size: int, n_conv_layers: int,
                img_size=224, in_chans: int = 3, num_classes: int = 1000, positional_embedding: str = "learnable",
                stride: int | None = None, padding: int | None = None, drop_rate: float = 0.0,
                attn_drop_rate: float = 0.1, drop_path_rate: float = 0.1, mean=None, std=None,
                conv_channels=None) -> dict:
    """The config of a published CCT variant (defaults as SHI-Labs/Compact-Transformers' `_cct`).

    `conv_channels`: the output channels of the tokenizer's inner convs (n_conv_layers - 1 of them; default
    the public tokenizer's 64 each), e.g. [16, 32] for a tokenizer that widens as it pools."""
    if positional_embedding not in POS_KINDS:
        raise ValueError(f"positional_embedding: expected one of {POS_KINDS}, got {positional_embedding!r}")
    for name, v in (("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads), ("n_conv_layers", n_conv_layers),
                    ("kernel_size", kernel_size), ("in_chans", in_chans)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim: {embed_dim} is not a multiple of num_heads={num_heads}")
    inner = [INNER_PLANES] * (n_conv_layers - 1) if conv_channels is None else list(conv_channels)
    if len(inner) != n_conv_layers - 1 or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in inner):
        raise ValueError(f"conv_channels: expected {n_conv_layers - 1} positive ints (n_conv_layers - 1), "
                         f"got {conv_channels!r}")
    img = [int(img_size)] * 2 if isinstance(img_size, int) else [int(v) for v in img_size]
    small = img[0] <= 64
    cfg = {
        "backbone": "cct",
        "img_size": img,
        "in_chans": int(in_chans),
        "embed_dim": int(embed_dim),
        "head_dim": int(embed_dim) // int(num_heads),
        "conv_channels": [int(c) for c in inner],
        "kernel_size": int(kernel_size),
        "stride": int(stride if stride is not None else max(1, kernel_size // 2 - 1)),
        "padding": int(padding if padding is not None else max(1, kernel_size // 2)),
        "max_pool": True,
        "pool": [3, 2, 1],
        "positional_embedding": positional_embedding,
        "blocks": [{"num_heads": int(num_heads), "mlp_hidden": int(embed_dim * mlp_ratio)} for _ in range(depth)],
        "num_classes": int(num_classes),
        "norm_eps": 1e-5,
        "drop_rate": float(drop_rate),
        "attn_drop_rate": float(attn_drop_rate),
        "drop_path_rate": float(drop_path_rate),
        "distilled": False,
        "num_prefix_tokens": 0,
        "mean": _per_channel(mean, CIFAR_MEAN if small else IMAGENET_MEAN, in_chans),
        "std": _per_channel(std, CIFAR_STD if small else IMAGENET_STD, in_chans),
    }
    seq_len(cfg)  # the image size must leave tokens
    return cfg


def _per_channel(given, default, in_chans: int) -> list[float]:
    """Given values, or the data set's (3-channel) defaults; another channel count repeats the first."""
    if given is not None:
        return [float(v) for v in given]
    return [float(v) for v in default] if in_chans == 3 else [float(default[0])] * in_chans


def student_config(cfg: dict) -> dict:
    """A sub-model's config: no dropout / stochastic depth (DEKD students train without, as SubViTs do)."""
    out = copy.deepcopy(cfg)
    out.update(drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0)
    return out


def flops(cfg: dict, include_head: bool = False) -> int:
    """FLOPs (2 per multiply-add) of one image: tokenizer convs, blocks, sequence pooling (+ classifier)."""
    k2 = cfg["kernel_size"] ** 2
    chans = [cfg["in_chans"], *cfg["conv_channels"], cfg["embed_dim"]]
    total = 0
    for i, (h, w) in enumerate(grid(cfg)):
        hc, wc = _conv_out_before_pool(cfg, i)
        total += 2 * hc * wc * chans[i] * chans[i + 1] * k2
    n, d, hd = seq_len(cfg), cfg["embed_dim"], cfg["head_dim"]
    for b in cfg["blocks"]:
        a, m = b["num_heads"] * hd, b["mlp_hidden"]
        total += 2 * n * d * 3 * a + 2 * 2 * n * n * a + 2 * n * a * d + 2 * 2 * n * d * m
    total += 2 * 2 * n * d  # attention_pool scores and the weighted sum
    if include_head:
        total += 2 * d * cfg["num_classes"]
    return int(total)


def _conv_out_before_pool(cfg: dict, i: int) -> tuple[int, int]:
    """(H, W) of conv i's output before its max-pool."""
    if i == 0:
        h, w = cfg["img_size"]
    else:
        h, w = grid(cfg)[i - 1]
    k, s, p = cfg["kernel_size"], cfg["stride"], cfg["padding"]
    return _conv_out(h, k, s, p), _conv_out(w, k, s, p)


def params(cfg: dict) -> int:
    """Parameters a device runs (the classifier left out; a sine table is a buffer); equals `SubCCT.num_params()`."""
    k2 = cfg["kernel_size"] ** 2
    chans = [cfg["in_chans"], *cfg["conv_channels"], cfg["embed_dim"]]
    n_ = sum(chans[i] * chans[i + 1] * k2 for i in range(len(chans) - 1))
    d, hd = cfg["embed_dim"], cfg["head_dim"]
    if cfg["positional_embedding"] == "learnable":
        n_ += seq_len(cfg) * d
    for b in cfg["blocks"]:
        a, m = b["num_heads"] * hd, b["mlp_hidden"]
        n_ += 2 * d + 3 * a * d + a * d + d + 2 * d + m * d + m + m * d + d
    return int(n_ + 2 * d + d + 1)  # final norm, attention_pool


_BLOCK = re.compile(r"^classifier\.blocks\.(\d+)\.(.+)\.(weight|bias)$")
_CONV = re.compile(r"^tokenizer\.conv_layers\.(\d+)\.0\.weight$")


def param_axes(name: str, cfg: dict) -> dict[int, tuple]:
    """Axes of a CCT parameter that index prunable units (kinds as `importance.param_axes`, plus ("conv", i):
    the output channels of inner tokenizer conv i)."""
    E = ("embed",)
    m = _CONV.match(name)
    if m:
        i, last = int(m.group(1)), len(cfg["conv_channels"])
        out = {0: E if i == last else ("conv", i)}
        if i > 0:
            out[1] = ("conv", i - 1)
        return out
    if name == "classifier.positional_emb":
        return {2: E}
    if name == "classifier.attention_pool.weight":
        return {1: E}
    if name == "classifier.attention_pool.bias":
        return {}
    if name in (f"{FINAL_NORM}.weight", f"{FINAL_NORM}.bias"):
        return {0: E}
    if name == f"{HEAD}.weight":
        return {0: ("classes",), 1: E}
    if name == f"{HEAD}.bias":
        return {0: ("classes",)}
    m = _BLOCK.match(name)
    if m:
        k, rest, w = int(m.group(1)), m.group(2), m.group(3) == "weight"
        if rest in ("pre_norm", "norm1"):
            return {0: E}
        if rest == "self_attn.qkv" and w:
            return {0: ("qkv", k), 1: E}
        if rest == "self_attn.proj":
            return {0: E, 1: ("heads", k)} if w else {0: E}
        if rest == "linear1":
            return {0: ("neurons", k), 1: E} if w else {0: ("neurons", k)}
        if rest == "linear2":
            return {0: E, 1: ("neurons", k)} if w else {0: E}
    raise ValueError(f"teacher: parameter {name!r} is not part of a supported CCT")
