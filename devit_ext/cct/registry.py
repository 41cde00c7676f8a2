"""The published CCT variants as timm models: `timm.create_model("cct_7_3x1_32", num_classes=100)`.

Names, shapes and defaults are SHI-Labs/Compact-Transformers' (`cct_{L}_{k}x{convs}_{img}`, `_sine` for a
sine position embedding, `_c100` / `_fl` for their CIFAR-100 / Flowers-102 heads). No weights are hosted
here: `pretrained=True` is an error; load a public checkpoint with `model.load_state_dict(torch.load(...))`
(the parameter names are theirs).
"""
from __future__ import annotations

from timm.models import generate_default_cfgs, register_model

from . import shapes as S
from .model import CCT

# depth -> (heads, MLP ratio, width), as their cct_2 .. cct_14
FAMILIES = {2: (2, 1, 128), 4: (2, 1, 128), 6: (4, 2, 256), 7: (4, 2, 256), 14: (6, 3, 384)}
# name -> (depth, kernel, convs, image size, classes, position embedding)
VARIANTS = {
    "cct_2_3x2_32": (2, 3, 2, 32, 10, "learnable"),
    "cct_2_3x2_32_sine": (2, 3, 2, 32, 10, "sine"),
    "cct_4_3x2_32": (4, 3, 2, 32, 10, "learnable"),
    "cct_4_3x2_32_sine": (4, 3, 2, 32, 10, "sine"),
    "cct_6_3x1_32": (6, 3, 1, 32, 10, "learnable"),
    "cct_6_3x1_32_sine": (6, 3, 1, 32, 10, "sine"),
    "cct_6_3x2_32": (6, 3, 2, 32, 10, "learnable"),
    "cct_6_3x2_32_sine": (6, 3, 2, 32, 10, "sine"),
    "cct_7_3x1_32": (7, 3, 1, 32, 10, "learnable"),
    "cct_7_3x1_32_sine": (7, 3, 1, 32, 10, "sine"),
    "cct_7_3x1_32_c100": (7, 3, 1, 32, 100, "learnable"),
    "cct_7_3x1_32_sine_c100": (7, 3, 1, 32, 100, "sine"),
    "cct_7_3x2_32": (7, 3, 2, 32, 10, "learnable"),
    "cct_7_3x2_32_sine": (7, 3, 2, 32, 10, "sine"),
    "cct_7_7x2_224": (7, 7, 2, 224, 102, "learnable"),
    "cct_7_7x2_224_sine": (7, 7, 2, 224, 102, "sine"),
    "cct_14_7x2_224": (14, 7, 2, 224, 1000, "learnable"),
    "cct_14_7x2_384": (14, 7, 2, 384, 1000, "learnable"),
    "cct_14_7x2_384_fl": (14, 7, 2, 384, 102, "learnable"),
}
MODEL_KWARGS = ("num_classes", "img_size", "in_chans", "positional_embedding", "drop_rate", "attn_drop_rate",
                "drop_path_rate")


def _pretrained_cfg(name: str) -> dict:
    _, _, _, img, classes, _ = VARIANTS[name]
    small = img <= 64
    return {"url": "", "num_classes": classes, "input_size": (3, img, img), "pool_size": None,
            "crop_pct": 1.0 if small else 0.875, "interpolation": "bicubic",
            "mean": S.CIFAR_MEAN if small else S.IMAGENET_MEAN, "std": S.CIFAR_STD if small else S.IMAGENET_STD,
            "first_conv": "tokenizer.conv_layers.0.0", "classifier": "classifier.fc", "license": "apache-2.0"}


default_cfgs = generate_default_cfgs({name: _pretrained_cfg(name) for name in VARIANTS})


def build(name: str, pretrained: bool = False, **kwargs) -> CCT:
    """The variant `name` with timm's keyword overrides (MODEL_KWARGS); unknown keywords are an error."""
    if pretrained:
        raise ValueError(f"pretrained: devit_ext hosts no weights for {name}; build it with pretrained=False and "
                         "load the published checkpoint with model.load_state_dict (the parameter names are theirs)")
    pcfg = kwargs.pop("pretrained_cfg", None)
    for k in ("pretrained_cfg_overlay", "cache_dir", "progress"):
        kwargs.pop(k, None)
    unknown = sorted(set(kwargs) - set(MODEL_KWARGS))
    if unknown:
        raise TypeError(f"{name}: unknown keyword(s) {unknown}; accepted: {list(MODEL_KWARGS)}")
    depth, kernel, convs, img, classes, pos = VARIANTS[name]
    heads, ratio, dim = FAMILIES[depth]
    opts = {"img_size": img, "num_classes": classes, "positional_embedding": pos} | kwargs
    cfg = S.make_config(embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=ratio, kernel_size=kernel,
                        n_conv_layers=convs, **opts)
    model = CCT(cfg)
    base = default_cfgs[name].cfgs[""].to_dict() | {"architecture": name}
    if pcfg is not None and hasattr(pcfg, "to_dict"):
        base = pcfg.to_dict() | {"architecture": name}
    base["input_size"] = (cfg["in_chans"], *cfg["img_size"])
    base["num_classes"] = cfg["num_classes"]
    base["mean"], base["std"] = tuple(cfg["mean"]), tuple(cfg["std"])
    model.pretrained_cfg = model.default_cfg = base
    return model


def _entrypoint(name: str):
    def fn(pretrained: bool = False, **kwargs) -> CCT:
        return build(name, pretrained, **kwargs)

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"CCT variant {name} (SHI-Labs/Compact-Transformers' shapes)."
    fn.__module__ = __name__
    return fn


for _name in VARIANTS:
    globals()[_name] = register_model(_entrypoint(_name))
