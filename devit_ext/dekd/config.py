"""DEKD's settings: per-stage values, the checks of a training request, which blocks are matched, what trains."""
from __future__ import annotations


from ..training.common import real
from .losses import middle_block

STAGES = ("distill", "ensemble")
DEFAULT_EPOCHS = {"distill": 10, "ensemble": 10}
DEFAULT_LR = {"distill": 1e-3, "ensemble": 1e-3}


def per_stage(name: str, value, default: dict, cast) -> dict:
    if value is None:
        return dict(default)
    if isinstance(value, dict):
        unknown = set(value) - set(STAGES)
        if unknown:
            raise ValueError(f"{name}: unknown stage(s) {sorted(unknown)}; stages are {list(STAGES)}")
        out = dict(default)
        out.update({k: cast(v) for k, v in value.items()})
        return out
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name}: expected one value or (distill, ensemble), got {value!r}")
        return {"distill": cast(value[0]), "ensemble": cast(value[1])}
    return {s: cast(value) for s in STAGES}


def check_setup(model, teacher, stages, subtask_teachers, device_dropout, alpha, relation_weights):
    from ..model import DeViT, teacher_config

    if not isinstance(model, DeViT):
        raise TypeError(f"model: expected a devit_ext.DeViT (from devit_ext.decompose), got {type(model).__name__}")
    tcfg = teacher_config(teacher)  # clear error for a non-ViT teacher
    if tcfg["num_classes"] != model.num_classes:
        raise ValueError(
            f"teacher: has {tcfg['num_classes']} classes but model has {model.num_classes}; "
            "decompose this teacher, or pass the teacher the model was decomposed from"
        )
    scfg = model.submodels[0].cfg
    if list(tcfg["img_size"]) != list(scfg["img_size"]) or tcfg["in_chans"] != scfg["in_chans"]:
        raise ValueError(
            f"teacher: takes {tcfg['in_chans']}x{tcfg['img_size'][0]}x{tcfg['img_size'][1]} images but the "
            f"model takes {scfg['in_chans']}x{scfg['img_size'][0]}x{scfg['img_size'][1]}"
        )
    if bool(tcfg["distilled"]) != bool(model.distilled):
        raise ValueError(
            f"teacher: distilled={tcfg['distilled']} but model.distilled={model.distilled}; "
            "a DeiT-distilled teacher needs a model decomposed from it (two tokens per device)"
        )
    groups = model.class_groups
    flat = sorted(c for g in groups for c in g)
    if flat != list(range(model.num_classes)) or any(len(g) == 0 for g in groups):
        raise ValueError("model: class_groups must be non-empty, disjoint and cover 0..num_classes-1")
    stages = tuple(stages)
    if not stages or any(s not in STAGES for s in stages) or len(set(stages)) != len(stages):
        raise ValueError(f"stages: expected a non-empty subset of {STAGES} in that order, got {stages!r}")
    if list(stages) != [s for s in STAGES if s in stages]:
        raise ValueError(f"stages: must run in the order {STAGES}, got {stages!r}")
    if subtask_teachers not in ("restricted", "finetune"):
        raise ValueError(f"subtask_teachers: expected 'restricted' or 'finetune', got {subtask_teachers!r}")
    real("device_dropout", device_dropout, lo=0, hi=1, hi_open=True)
    real("alpha", alpha, lo=0, hi=1)
    if isinstance(relation_weights, (str, bytes)) or len(tuple(relation_weights)) != 3:
        raise ValueError(f"relation_weights: expected (g_Q, g_K, g_V), got {relation_weights!r}")
    return tcfg, stages


def relation_pairs(relation_layers, model, teacher) -> list[list[tuple[int, int]]]:
    """Per device, the (student block, teacher block) pairs to match."""
    lt_depth = len(teacher.blocks)
    out = []
    for i, m in enumerate(model.submodels):
        ls_depth = len(m.blocks)
        if relation_layers in (None, "none", ()):
            pairs = []
        elif relation_layers == "middle":
            pairs = [(middle_block(ls_depth), middle_block(lt_depth))]
        else:
            try:
                pairs = [(int(a), int(b)) for a, b in relation_layers]
            except (TypeError, ValueError):
                raise ValueError(
                    f"relation_layers: expected 'middle', None or a list of (student_block, teacher_block), "
                    f"got {relation_layers!r}"
                ) from None
            pairs = [(a % ls_depth if a < 0 else a, b % lt_depth if b < 0 else b) for a, b in pairs]
            for a, b in pairs:
                if not (0 <= a < ls_depth and 0 <= b < lt_depth):
                    raise ValueError(
                        f"relation_layers: pair ({a}, {b}) out of range for device {i} "
                        f"({ls_depth} blocks) and the teacher ({lt_depth} blocks)"
                    )
        out.append(pairs)
    return out


def set_trainable(model, stage: str, freeze: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(True)
    if stage == "distill":
        for p in model.fusion.parameters():
            p.requires_grad_(False)
    elif freeze:
        for p in model.submodels.parameters():
            p.requires_grad_(False)
    if stage == "ensemble":  # local heads are not on the fused path
        for m in model.submodels:
            for head in (m.head, m.head_dist):
                if head is not None:
                    for p in head.parameters():
                        p.requires_grad_(False)
