"""Decompose a timm ViT into N physically pruned, class-specialised sub-models (stages 1 and 2).

    model = devit_ext.decompose(teacher, 4)                       # 4 devices, 10% of the teacher's FLOPs each
    model = devit_ext.decompose(teacher, 2, budgets=[0.3, 0.1])   # heterogeneous devices
    model = devit_ext.decompose(vit_l, 4, budgets=[{"embed_dim": 192, "depth": 12, "num_heads": 3, "mlp_hidden": 768}] * 4)
    model = devit_ext.decompose(teacher, 4, budgets=[{"latency": 0.1}] * 4)  # 1/10 of its latency on torch (CPU)
    model = devit_ext.decompose(teacher, 4, budgets=[{"latency_ms": 12.0}] * 4, runtime="onnxruntime")

Steps: validate the teacher (`shapes.teacher_config`) and the arguments; turn
each device's budget into a sub-model shape (`budgets.py`; latencies from a
measured, cached profile: `devit_ext.latency`); split the classes into groups
(`partition.py`); score the teacher's units for each group (`importance.py`);
slice the teacher's weights down to the kept units (`prune`); initialise the
fusion head from the teacher (`init_fusion`).
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from . import importance as imp
from . import partition as part
from .budgets import resolve_budgets
from .cct.shapes import student_config
from .latency import latency_for
from .model import DeViT, FusionHead, build_submodel, teacher_config, teacher_tokens
from .checks import is_int, is_number
from .shapes import attention_record, config_of, final_norm_name, flops_of, head_names, is_cct, params_of, shape_config

# ---------------------------------------------------------------------------
# Physical pruning
# ---------------------------------------------------------------------------


def top_units(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores (ties: lower index first), in ascending index order."""
    order = torch.argsort(-scores.double(), stable=True)
    return torch.sort(order[:k]).values


def _expand_heads(heads: torch.Tensor, D: int, H: int, qkv: bool) -> torch.Tensor:
    base = (heads[:, None] * D + torch.arange(D)).flatten()
    return torch.cat([s * H * D + base for s in range(3)]) if qkv else base


def prune(teacher_state: dict, tcfg: dict, keep: dict) -> nn.Module:
    """A sub-model (SubViT, or SubCCT for a CCT teacher) holding exact slices of the teacher's weights.

    keep: {"embed": idx, "blocks": [teacher block index, ...], "heads": [idx per kept block],
    "neurons": [idx per kept block], "classes": [global class, ...]} (all indices ascending);
    a CCT's also "conv": [idx per inner tokenizer conv] (the teacher's channels when absent).
    """
    D = tcfg["head_dim"]
    blocks = keep["blocks"]
    pos = {t: s for s, t in enumerate(blocks)}
    cfg = shape_config(
        tcfg,
        len(keep["embed"]),
        [{"num_heads": len(h), "mlp_hidden": len(m)} for h, m in zip(keep["heads"], keep["neurons"])],
        len(keep["classes"]),
    )
    conv = keep.get("conv")
    if is_cct(tcfg):
        conv = conv if conv is not None else [torch.arange(c) for c in tcfg["conv_channels"]]
        cfg = student_config(cfg)
        cfg["conv_channels"] = [len(c) for c in conv]
    classes = torch.tensor(keep["classes"], dtype=torch.long)
    state = {}
    for name, t in teacher_state.items():
        axes = imp.param_axes(name, tcfg)
        k = imp.block_index(name)
        if k is not None:
            if k not in pos:
                continue
            head, _, rest = name.partition(f"blocks.{k}.")
            name = f"{head}blocks.{pos[k]}.{rest}"
        t = t.detach()
        for axis, kind in axes.items():
            if kind[0] == "embed":
                idx = keep["embed"]
            elif kind[0] == "classes":
                idx = classes
            elif kind[0] == "conv":
                idx = conv[kind[1]]
            elif kind[0] in ("qkv", "heads"):
                H = tcfg["blocks"][kind[1]]["num_heads"]
                idx = _expand_heads(keep["heads"][pos[kind[1]]], D, H, kind[0] == "qkv")
            else:
                idx = keep["neurons"][pos[kind[1]]]
            t = t.index_select(axis, idx.to(t.device))
        state[name] = t.to("cpu", torch.float32)
    sub = build_submodel(cfg)
    sub.load_state_dict(state, strict=True)
    return sub


def choose_units(scores: dict, shape: dict, tcfg: dict, block_select: str) -> dict:
    L = shape["depth"]
    if block_select == "first" or scores.get("blocks") is None:
        blocks = list(range(L))
    else:
        blocks = top_units(scores["blocks"], L).tolist()
    bl = shape["blocks"]
    out = {}
    if scores.get("conv") is not None:  # a CCT's inner tokenizer channels: the teacher's unless the shape says
        chans = shape.get("conv_channels", [len(c) for c in scores["conv"]])
        out["conv"] = [top_units(c, n) for c, n in zip(scores["conv"], chans)]
    return out | {
        "embed": top_units(scores["embed"], shape["embed_dim"]),
        "blocks": blocks,
        "heads": [top_units(scores["heads"][k], min(bl[i]["num_heads"], len(scores["heads"][k]))) for i, k in enumerate(blocks)],
        "neurons": [top_units(scores["neurons"][k], min(bl[i]["mlp_hidden"], len(scores["neurons"][k]))) for i, k in enumerate(blocks)],
    }


def init_fusion(teacher_state: dict, tcfg: dict, kept_embed: list[torch.Tensor]) -> FusionHead:
    """Fusion head initialised from the teacher, so the ensemble starts near the teacher.

    `head` (and `head_dist`) are exact copies of the teacher's classifiers: the
    map's output space is the teacher's token space. The map is a block
    "scatter-average": device i's j-th channel is teacher channel E_i[j], so it
    goes back to that position with weight 1 / (number of devices keeping that
    channel). Each device's normalised token approximates the teacher's token
    on its kept channels (the norms are sliced from the teacher's), so this is
    the average of the devices' estimates of each channel. Channels no device
    keeps get the teacher's final-norm bias as map bias (a LayerNorm output's
    value for an average input). With nothing pruned and one device the map is
    the identity and the ensemble reproduces the teacher's logits. It needs no
    data; stage 4 of DEKD trains the map from here (MSE to the teacher's token).
    """
    dT, C = tcfg["embed_dim"], tcfg["num_classes"]
    fusion = FusionHead([len(e) for e in kept_embed], dT, C, tcfg["distilled"])
    W = torch.zeros(dT, sum(len(e) for e in kept_embed))
    cover = torch.zeros(dT)
    for e in kept_embed:
        cover[e] += 1
    off = 0
    for e in kept_embed:
        W[e, off + torch.arange(len(e))] = 1.0 / cover[e]
        off += len(e)
    norm_bias = teacher_state[f"{final_norm_name(tcfg)}.bias"].detach().float().cpu()
    bias = torch.where(cover > 0, torch.zeros(dT), norm_bias)
    with torch.no_grad():
        for (mp, hd), hname in zip(fusion.branches(), head_names(tcfg)):
            mp.weight.copy_(W)
            mp.bias.copy_(bias)
            hd.weight.copy_(teacher_state[f"{hname}.weight"])
            hd.bias.copy_(teacher_state[f"{hname}.bias"])
    return fusion


def fit_fusion_map(model: DeViT, teacher: nn.Module, images: torch.Tensor, batch_size: int = 32,
                   ridge: float = 0.1) -> None:
    """Refit the fusion map(s) by ridge least squares on `images`, shrunk towards the current (scatter) init.

    Solves min_W ||[c_1..c_N, 1] W - c_T||^2 + lam ||W - W0||^2 per branch, where c_T is the teacher's
    final class (distillation) token and lam = ridge x mean diagonal of X^T X. The shrinkage keeps the
    solution well posed when there are fewer images than token channels.
    """
    dev = next(teacher.parameters()).device
    xs, ts = [], []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            x = images[s : s + batch_size]
            f = teacher_tokens(teacher, teacher.forward_features(x.to(dev)), model.distilled)
            f = [t.double().cpu() for t in f]
            toks = [t.double().cpu() for t in model.forward_tokens(x.to(next(model.parameters()).device))]
            xs.append(torch.cat(toks, dim=-1))
            ts.append(torch.stack(f, 1) if model.distilled else f[0])
    X, T = torch.cat(xs), torch.cat(ts)
    for b, (mp, _) in enumerate(model.fusion.branches()):
        Xb = X[:, b] if model.distilled else X
        Tb = T[:, b] if model.distilled else T
        Xa = torch.cat([Xb, torch.ones(len(Xb), 1, dtype=Xb.dtype)], dim=1)
        W0 = torch.cat([mp.weight.detach().double().cpu().T, mp.bias.detach().double().cpu()[None]], dim=0)
        G = Xa.T @ Xa
        lam = ridge * float(G.diagonal().mean())
        W = torch.linalg.solve(G + lam * torch.eye(len(G), dtype=G.dtype), Xa.T @ Tb + lam * W0)
        with torch.no_grad():
            mp.weight.copy_(W[:-1].T.to(mp.weight))
            mp.bias.copy_(W[-1].to(mp.bias))


# ---------------------------------------------------------------------------
# The public call
# ---------------------------------------------------------------------------


def _teacher_name(teacher: nn.Module) -> str:
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(teacher, attr, None)
        if isinstance(cfg, dict) and cfg.get("architecture"):
            return str(cfg["architecture"])
    return type(teacher).__name__


def _json_budgets(budgets):
    if budgets is None:
        return None
    def num(v):
        return int(v) if is_int(v) else float(v) if is_number(v) else str(v)

    return [num(b) if is_number(b) else {str(k): num(v) for k, v in b.items()} if isinstance(b, dict) else str(b)
            for b in budgets]


def decompose(
    teacher: nn.Module,
    num_devices: int,
    *,
    budgets: Sequence[Any] | None = None,
    partition: str | Sequence[Sequence[int]] = "random",
    importance: str = "magnitude",
    data: Iterable | None = None,
    seed: int = 0,
    class_share: str = "equal",
    block_select: str = "auto",
    fusion_init: str = "scatter",
    max_samples: int = 256,
    batch_size: int = 32,
    runtime: str | None = None,
    latency: Any = None,
) -> DeViT:
    """Decompose a timm ViT `teacher` into `num_devices` class-specialised, physically pruned sub-models.

    Args:
        teacher: a timm `VisionTransformer` with a class token (vit_*, deit_*,
            deit3_*, DeiT distilled: the sub-models then keep both tokens), or
            a CCT (`devit_ext.cct`, e.g. `timm.create_model("cct_7_3x1_32")`):
            the sub-models are `SubCCT`s that send their sequence-pooled vector;
            an explicit shape may add "conv_channels" (a multi-conv tokenizer's
            inner channels; otherwise the teacher's are kept); under a FLOPs or
            params budget they scale with the device's width.
        num_devices: N, 1 <= N <= number of classes.
        budgets: one entry per device: a fraction in (0, 1] of the teacher's
            FLOPs (`meta["teacher_flops"]`, one image, head included),
            `{"flops": n}`, `{"params": n}` (parameters the device runs), or an
            explicit shape `{"embed_dim", "depth", "num_heads", "mlp_hidden"}`
            (honoured exactly; uniform blocks), or a latency per image on
            `runtime`: `{"latency": f}` (f in (0, 1] of the teacher's latency
            measured there) or `{"latency_ms": x}`. FLOPs/params budgets are
            met within 10% (`search_shape`); a latency budget is a cap: the
            predicted latency is at most it (the search aims within 6%
            below it, `devit_ext.latency.search_latency`; `meta["latency"]`
            holds each device's prediction). Default: every device the same, all
            together 40% of the teacher's FLOPs (0.4 / N each).
        partition: "random" (the paper: seeded shuffle, contiguous chunks, the
            last takes the remainder), "similarity" (balanced clustering of the
            teacher's per-class mean class tokens on `data`), or explicit class
            groups (N disjoint, non-empty lists covering every class).
        importance: "magnitude" (weight norms, data-free), "taylor"
            (|w x grad| of the group-restricted CE on `data`) or "hsic" (the
            paper's criterion on `data`); scores are computed per class group.
        data: iterable of (images, labels) batches, needed by "similarity",
            "taylor" and "hsic"; at most `max_samples` images are used.
        seed: seeds the random partition and the clustering.
        class_share: "equal" group sizes, or "budget": sizes in proportion to
            each device's FLOPs (heterogeneous devices; not for explicit groups).
        block_select: which blocks a shallower sub-model keeps: "first" (the
            first k: the kept stack computes exactly the teacher's
            intermediate tokens up to block k, so the cut is at one place
            only), "importance" (the k best-scored blocks, in order; needs a
            criterion that scores blocks: taylor, hsic), or "auto" (importance
            when the criterion scores blocks, else first).
        fusion_init: "scatter" (data-free, see `init_fusion`) or "lstsq" (then
            refit the map on `data` by ridge least squares to the teacher's
            tokens, shrunk towards the scatter init: `fit_fusion_map`).
        max_samples, batch_size: how many images of `data` to use, and the
            teacher's batch size on them.
        runtime: where the sub-models' latency is measured: "torch" (eager,
            CPU, float32; the default for latency budgets) or "onnxruntime"
            (an error when it does not import here). Latency budgets are
            priced on it; given with FLOPs / params budgets, the search also
            trades heads and MLP width for speed at equal cost
            (`devit_ext.latency.search.refine`). The teacher's profile on it
            is measured once (seconds) and cached on disk
            (`devit_ext.latency.cached_profile`); `meta["latency"]` says which
            runtime, the teacher's measured and predicted ms, and each
            device's predicted ms.
        latency: instead of the measured profile, a
            `devit_ext.latency.LatencyProfile` (e.g. `LatencyProfile.load(path)`)
            or a function cfg -> seconds per image (a sub-model config,
            `devit_ext.shapes.shape_config`); the teacher's latency is then
            the function's value for the teacher's config.

    Returns a `DeViT` on the teacher's device. Sub-model heads are the
    teacher's classifier rows for the group's classes (on the kept channels);
    the fusion head is initialised from the teacher (`init_fusion`).
    """
    tcfg = teacher_config(teacher)
    C = tcfg["num_classes"]
    if C < 1:
        raise ValueError("teacher: has no classifier (num_classes=0); build it with num_classes > 0")
    if not is_int(num_devices):
        raise TypeError(f"num_devices: expected an int, got {type(num_devices).__name__}")
    num_devices = int(num_devices)
    if num_devices < 1:
        raise ValueError(f"num_devices: must be >= 1, got {num_devices}")
    if num_devices > C:
        raise ValueError(f"num_devices: {num_devices} devices but the teacher has only {C} classes (each device needs one)")
    if isinstance(importance, str) and importance not in imp.CRITERIA:
        raise ValueError(f"importance: expected one of {sorted(imp.CRITERIA)}, got {importance!r}")
    if not isinstance(importance, str):
        raise ValueError(f"importance: expected one of {sorted(imp.CRITERIA)}, got {importance!r}")
    if isinstance(partition, str) and partition not in ("random", "similarity"):
        raise ValueError(f"partition: expected 'random', 'similarity' or a list of class groups, got {partition!r}")
    if class_share not in ("equal", "budget"):
        raise ValueError(f"class_share: expected 'equal' or 'budget', got {class_share!r}")
    if block_select not in ("auto", "first", "importance"):
        raise ValueError(f"block_select: expected 'auto', 'first' or 'importance', got {block_select!r}")
    if block_select == "importance" and importance == "magnitude":
        raise ValueError("block_select: 'importance' needs a criterion that scores blocks (importance='taylor' or 'hsic')")
    if importance == "hsic" and is_cct(tcfg):
        raise ValueError("importance: 'hsic' reads the heads' outputs at the class token, which a CCT does not "
                         "have; use 'magnitude' or 'taylor' for a CCT teacher")
    if fusion_init not in ("scatter", "lstsq"):
        raise ValueError(f"fusion_init: expected 'scatter' or 'lstsq', got {fusion_init!r}")
    for name, v, lo in (("seed", seed, 0), ("max_samples", max_samples, 1), ("batch_size", batch_size, 1)):
        if not is_int(v) or v < lo:
            raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    explicit = not isinstance(partition, str)
    if explicit and class_share != "equal":
        raise ValueError("class_share: only applies to 'random'/'similarity' partitions, not to explicit groups")
    needs_data = [w for w, on in (("partition='similarity'", partition == "similarity"),
                                  (f"importance={importance!r}", importance in imp.DATA_DRIVEN),
                                  ("fusion_init='lstsq'", fusion_init == "lstsq")) if on]
    if needs_data and data is None:
        raise ValueError(f"data: {' and '.join(needs_data)} needs data (an iterable of (images, labels) batches)")

    lat = latency_for(teacher, tcfg, budgets, runtime, latency)
    shapes, targets = resolve_budgets(tcfg, num_devices, budgets, lat)
    if explicit:
        groups = part.check_groups(partition, C, num_devices)

    images = labels = None
    was_training = teacher.training
    teacher.eval()
    try:
        if needs_data:
            images, labels = imp.collect_data(data, max_samples)
            if int(labels.min()) < 0 or int(labels.max()) >= C:
                raise ValueError(f"data: labels must be class indices in [0, {C}), got range "
                                 f"[{int(labels.min())}, {int(labels.max())}]")
            exp = [tcfg["in_chans"], *tcfg["img_size"]]
            if list(images.shape[1:]) != exp:
                raise ValueError(f"data: images have shape {list(images.shape[1:])}, the teacher takes {exp}")
        if not explicit:
            weights = None
            if class_share == "budget":
                weights = [flops_of(config_of(tcfg, s)) for s in shapes]
            sizes = part.group_sizes(C, num_devices, weights)
            if partition == "random":
                groups = part.random_groups(C, sizes, seed)
            else:
                dev = next(teacher.parameters()).device
                with torch.no_grad():
                    toks = torch.cat([teacher_tokens(teacher, teacher.forward_features(images[s].to(dev)))[0]
                                      .double().cpu() for s in imp._batches(len(images), batch_size)])
                head_w = teacher.state_dict()[f"{head_names(tcfg)[0]}.weight"].detach().cpu()
                groups = part.similarity_groups(toks, labels, head_w, sizes, seed)
        kwargs = {"images": images, "labels": labels, "batch_size": batch_size}
        scores = imp.CRITERIA[importance](teacher, tcfg, groups, **kwargs)
    finally:
        teacher.train(was_training)

    state = teacher.state_dict()
    subs, kept_embed, kept_blocks = [], [], []
    for g, shape, s in zip(groups, shapes, scores):
        keep = choose_units(s, shape, tcfg, block_select)
        keep["classes"] = g
        subs.append(prune(state, tcfg, keep))
        kept_embed.append(keep["embed"])
        kept_blocks.append(keep["blocks"])
    fusion = init_fusion(state, tcfg, kept_embed)
    meta = {
        "teacher_name": _teacher_name(teacher),
        "img_size": list(tcfg["img_size"]),
        "backbone": "cct" if is_cct(tcfg) else "vit",
        "patch_size": list(tcfg["patch_size"]) if "patch_size" in tcfg else None,
        "in_chans": tcfg["in_chans"],
        "mean": tcfg["mean"],
        "std": tcfg["std"],
        "num_classes": C,
        "teacher_dim": tcfg["embed_dim"],
        "teacher_depth": len(tcfg["blocks"]),
        "teacher_flops": flops_of(tcfg, include_head=True),
        "teacher_params": params_of(tcfg),
        "teacher_attention": attention_record(tcfg),
        "distilled": tcfg["distilled"],
        "seed": int(seed),
        "partition": partition if isinstance(partition, str) else "explicit",
        "importance": importance,
        "budgets": _json_budgets(budgets),
        "budget_targets": targets,
        "class_share": class_share,
        "block_select": block_select,
        "fusion_init": fusion_init,
        # teacher block / embedding channel behind each sub-model block / channel (for feature matching)
        "kept_blocks": kept_blocks,
        "kept_embed": [e.tolist() for e in kept_embed],
        "latency": None if lat is None else lat.info | {
            "predicted_ms": [1e3 * lat.predict(config_of(tcfg, s)) for s in shapes],
            "checks": list(getattr(lat.model, "extra", {}).get("checks", []))},
    }
    model = DeViT(subs, groups, fusion, meta)
    if fusion_init == "lstsq":
        was_training = teacher.training
        try:
            fit_fusion_map(model.eval(), teacher.eval(), images, batch_size)
        finally:
            teacher.train(was_training)
            model.train()
    p = next(teacher.parameters())
    return model.to(device=p.device, dtype=p.dtype if p.dtype.is_floating_point else None)

