"""Budgets -> sub-model shapes: what `decompose(..., budgets=...)` accepts and the shape search.

A device's budget is a fraction of the teacher's FLOPs, `{"flops": n}` or
`{"params": n}`, a latency on a runtime, `{"latency": f}` (of the teacher's)
or `{"latency_ms": x}`, or an explicit shape `{"embed_dim", "depth",
"num_heads", "mlp_hidden"}`; `resolve_budgets` turns N of them into N shapes
(each within `BUDGET_TOL` of its FLOPs / params target, at most its latency
target, or a clear error naming the device), with `search_shape` picking the
uniform ViT closest to a target cost. Costs come from `devit_ext.shapes`,
latencies from a latency model (`devit_ext.latency`).
"""
from __future__ import annotations

import copy

import torch

from .checks import is_int, is_number
from .shapes import config_of, flops_of, inner_channels, is_cct, params_of, uniform_config

DEFAULT_TOTAL_FRACTION = 0.4  # default: all devices together get 40% of the teacher's FLOPs, equal shares
SEARCH_TOL = 0.03  # shape search aims within 3% of the budget ...
BUDGET_TOL = 0.10  # ... and fails loudly beyond 10%
SHAPE_KEYS = ("embed_dim", "depth", "num_heads", "mlp_hidden")
COST_KEYS = ("flops", "params", "latency", "latency_ms")  # one per device


def latency_keys(budgets) -> list[int]:
    """Indices of the budgets that are latencies ({"latency": f} or {"latency_ms": x})."""
    if not isinstance(budgets, (list, tuple)):
        return []
    return [i for i, b in enumerate(budgets) if isinstance(b, dict) and set(b) & {"latency", "latency_ms"}]


def _dims(limit: int) -> list[int]:
    """Candidate sizes up to `limit`: multiples of 8 (all of 1..limit when it is below 16), plus `limit`."""
    if limit < 16:
        return list(range(1, limit + 1))
    return sorted(set(range(8, limit + 1, 8)) | {limit})


def penalty(d, h, L, m, D: int, ratio: float, L_pref: float) -> torch.Tensor:
    """How far a shape is from the teacher's proportions (0: embed = heads x head width, the teacher's MLP
    ratio, the preferred depth); tensors broadcast."""
    return (d / (h * D)).log().abs() + (m / (ratio * d)).log().abs() + 0.5 * (L / L_pref).log().abs()


def search_shape(tcfg: dict, target: float, kind: str = "flops") -> dict:
    """The uniform shape (embed_dim, depth, num_heads, mlp_hidden) closest to `target` FLOPs or params.

    Grid: depth 1..L_T, heads 1..H_T (head width kept), embed_dim in multiples
    of 8 up to the teacher's; mlp_hidden is then solved for the target and
    rounded to a multiple of 8. Among the shapes within 3% of the target the
    most teacher-like is taken: embed_dim close to heads x head_dim, MLP ratio
    close to the teacher's, depth close to L_T x f^0.15 (f the budget fraction:
    small budgets cut width faster than depth, as the ViT family does; ViT-L at
    2% gives 13, next to ViT-Ti's 12). A target at or above the teacher's own
    cost gives the teacher's shape. A CCT's inner tokenizer channels scale with the width
    (`shapes.inner_channels`); the shape says them ("conv_channels").
    """
    dT, D, P = tcfg["embed_dim"], tcfg["head_dim"], tcfg["num_prefix_tokens"]
    LT, HT = len(tcfg["blocks"]), max(b["num_heads"] for b in tcfg["blocks"])
    MT = max(b["mlp_hidden"] for b in tcfg["blocks"])
    cost = flops_of if kind == "flops" else params_of
    full = cost(tcfg)
    if target >= full:
        return {"embed_dim": dT, "depth": LT, "num_heads": HT, "mlp_hidden": MT, "blocks": copy.deepcopy(tcfg["blocks"])}
    ratio, frac = MT / dT, target / full
    L_pref = max(1.0, LT * frac**0.15)
    # cost is polynomial in the shape: c0(d) + L * (c1(d, h) + cm(d) * m) with cm affine in d and c1 bilinear
    # in (d, h); read the coefficients off a few probe configs, then evaluate the grid at once. c0 (tokens,
    # pooling; a CCT's tokenizer, whose inner channels scale with d) is probed per candidate width.
    def probe(d, L, h, m):
        return float(cost(uniform_config(tcfg, d, L, h, m)))

    def c1(d, h):
        return probe(d, 2, h, 0) - probe(d, 1, h, 0)

    p11, p12, p21, p22 = c1(1, 1), c1(1, 2), c1(2, 1), c1(2, 2)
    dh = p22 - p21 - p12 + p11
    dd, hh = p21 - p11 - dh, p12 - p11 - dh
    cst = p11 - dh - dd - hh
    cm1 = probe(1, 1, 1, 1) - probe(1, 1, 1, 0)
    cma = probe(2, 1, 1, 1) - probe(2, 1, 1, 0) - cm1
    cmb = cm1 - cma
    f64 = torch.float64
    dims = _dims(dT)
    d = torch.tensor(dims, dtype=f64)[:, None, None]
    h = torch.arange(1, HT + 1, dtype=f64)[None, :, None]
    L = torch.arange(1, LT + 1, dtype=f64)[None, None, :]
    c0 = torch.tensor([probe(x, 1, 1, 0) - c1(x, 1) for x in dims], dtype=f64)[:, None, None]
    cl, cm = dh * d * h + dd * d + hh * h + cst, cma * d + cmb
    m_exact = (target - c0 - L * cl) / (L * cm)
    cands = []
    for rnd in (torch.floor, torch.ceil):
        m_fine = rnd(m_exact).clamp(1, MT)
        m_8 = (8 * rnd(m_exact / 8)).clamp(8, MT)
        cands.append(torch.where(m_exact >= 8, m_8, m_fine))
    m = torch.stack(cands)  # (2, nd, nh, nL)
    c = c0 + L * (cl + cm * m)
    err = (c / target - 1).abs()
    pen = penalty(d, h, L, m, D, ratio, L_pref)
    key = torch.where(err <= SEARCH_TOL, pen + err, 1e6 + err)
    i = int(torch.argmin(key.flatten()))  # first minimum: deterministic
    _, di, hi, li = torch.unravel_index(torch.tensor(i), key.shape)
    d, h, L, m = int(d.flatten()[di]), int(h.flatten()[hi]), int(L.flatten()[li]), int(m.flatten()[i])
    shape = {"embed_dim": d, "depth": L, "num_heads": h, "mlp_hidden": m, "blocks": [{"num_heads": h, "mlp_hidden": m}] * L}
    inner = inner_channels(tcfg, d)
    return shape if inner is None else shape | {"conv_channels": inner}


def resolve_budgets(tcfg: dict, num_devices: int, budgets, latency=None) -> tuple[list[dict], list[dict]]:
    """Per device: (shape, target) where target is {"kind", "value"} (+ "predicted_s" with a latency model)
    or None for explicit shapes. `latency`: a `devit_ext.latency.Latency` (passed in: this module does not
    import it), needed by latency budgets (`Latency.budget`); with it, FLOPs / params budgets also trade
    heads and MLP width for speed (`Latency.refine`)."""
    teacher_flops = flops_of(tcfg, include_head=True)
    teacher_params = params_of(tcfg)
    inner = list(tcfg.get("conv_channels", [])) if is_cct(tcfg) else []  # a CCT's inner tokenizer channels
    if budgets is None:
        budgets = [DEFAULT_TOTAL_FRACTION / num_devices] * num_devices
    if isinstance(budgets, (str, bytes, dict)) or not isinstance(budgets, (list, tuple)):
        raise ValueError(f"budgets: expected a list with one entry per device, got {type(budgets).__name__}")
    if len(budgets) != num_devices:
        raise ValueError(f"budgets: {len(budgets)} entries for num_devices={num_devices}")
    LT = len(tcfg["blocks"])
    limits = {
        "embed_dim": tcfg["embed_dim"],
        "depth": LT,
        "num_heads": max(b["num_heads"] for b in tcfg["blocks"]),
        "mlp_hidden": max(b["mlp_hidden"] for b in tcfg["blocks"]),
    }
    shapes, targets = [], []
    for i, b in enumerate(budgets):
        where = f"budgets[{i}]"
        if is_number(b):
            if not (0 < b <= 1):
                raise ValueError(f"{where}: fraction of the teacher's FLOPs must be in (0, 1], got {b}")
            kind, value = "flops", float(b) * teacher_flops
        elif isinstance(b, dict) and len(set(b) & set(COST_KEYS)) > 1:
            raise ValueError(f"{where}: give one budget per device, one of {list(COST_KEYS)}, got {sorted(b)}")
        elif isinstance(b, dict) and set(b) in ({"latency"}, {"latency_ms"}):
            check_latency_budget(where, b)
            if latency is None:
                raise ValueError(f"{where}: a latency budget needs a latency model (decompose's runtime= or latency=)")
            shape, target = latency.budget(where, tcfg, b)
            shapes.append(shape)
            targets.append(target)
            continue
        elif isinstance(b, dict) and set(b) == {"flops"} or isinstance(b, dict) and set(b) == {"params"}:
            kind, value = next(iter(b.items()))
            full = teacher_flops if kind == "flops" else teacher_params
            if not is_number(value) or not value > 0:
                raise ValueError(f"{where}: {kind} must be a positive number, got {value!r}")
            if value > full:
                raise ValueError(f"{where}: {kind}={value:.4g} exceeds the teacher's {full:.4g}")
            value = float(value)
        elif isinstance(b, dict) and set(b) - {"conv_channels"} == set(SHAPE_KEYS):
            if "conv_channels" in b:
                _check_conv_channels(where, b["conv_channels"], inner)
            for k in SHAPE_KEYS:
                v = b[k]
                if not is_int(v) or v <= 0:
                    raise ValueError(f"{where}: {k} must be a positive int, got {v!r}")
                if v > limits[k]:
                    raise ValueError(f"{where}: {k}={v} exceeds the teacher's {k} ({limits[k]})")
            shape = {k: int(b[k]) for k in SHAPE_KEYS}
            shape["blocks"] = [{"num_heads": shape["num_heads"], "mlp_hidden": shape["mlp_hidden"]}] * shape["depth"]
            if "conv_channels" in b:
                shape["conv_channels"] = [int(c) for c in b["conv_channels"]]
            shapes.append(shape)
            targets.append(None)
            continue
        else:
            raise ValueError(
                f"{where}: expected a fraction in (0, 1], {{'flops': n}}, {{'params': n}}, {{'latency': f}}, "
                f"{{'latency_ms': x}} or an explicit shape "
                f"with exactly the keys {list(SHAPE_KEYS)} (a CCT's may add 'conv_channels'), got {b!r}"
            )
        shape = search_shape(tcfg, value, kind)
        cost = flops_of if kind == "flops" else params_of
        got = cost(config_of(tcfg, shape))
        if abs(got / value - 1) > BUDGET_TOL and value < cost(tcfg):
            raise ValueError(
                f"{where}: no sub-model shape has {kind} within {BUDGET_TOL:.0%} of {value:.4g} "
                f"(closest: {got:.4g}); the smallest possible model is larger, raise the budget"
            )
        target = {"kind": kind, "value": value}
        if latency is not None:
            shape = latency.refine(tcfg, shape, kind, value)
            target["predicted_s"] = latency.predict(config_of(tcfg, shape))
        shapes.append(shape)
        targets.append(target)
    return shapes, targets


def check_latency_budget(where: str, b: dict) -> tuple[str, float]:
    """(kind, value) of a latency budget, or a clear error (checked before any profile is measured)."""
    if len(set(b) & set(COST_KEYS)) > 1:
        raise ValueError(f"{where}: give one budget per device, one of {list(COST_KEYS)}, got {sorted(b)}")
    kind, value = next(iter(b.items()))
    if not is_number(value) or not value > 0:
        raise ValueError(f"{where}: {kind} must be a positive number, got {value!r}")
    if kind == "latency" and value > 1:
        raise ValueError(f"{where}: latency is a fraction in (0, 1] of the teacher's latency, got {value}")
    return kind, float(value)


def _check_conv_channels(where: str, chans, inner: list[int]) -> None:
    """An explicit shape's `conv_channels`: one positive int per inner conv of a CCT's tokenizer, at most the teacher's."""
    if not inner:
        raise ValueError(f"{where}: conv_channels applies to a CCT teacher with a tokenizer of two or more convs")
    if not isinstance(chans, (list, tuple)) or len(chans) != len(inner) or not all(is_int(c) and c > 0 for c in chans):
        raise ValueError(f"{where}: conv_channels must be {len(inner)} positive int(s) (the teacher has {inner}), got {chans!r}")
    for c, t in zip(chans, inner):
        if c > t:
            raise ValueError(f"{where}: conv_channels {list(chans)} exceed the teacher's {inner}")
