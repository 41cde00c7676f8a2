"""Stage 2 of DeViT, part 1: how important each prunable unit of the teacher is, per class group.

Units: embedding channels (one set for the whole residual stream), attention
heads per block, MLP neurons per block, and blocks. Every criterion returns,
for each device's class group, a dict

    {"embed": (d,), "heads": [(H_k,)] * L, "neurons": [(M_k,)] * L, "blocks": (L,) or None}

of scores, larger = keep. `blocks=None` means "no block ranking: keep the
first k blocks" (see `decompose`).

- `magnitude` (data-free): L1 norms of the weights that read or write each unit,
  each tensor's contribution normalised to mean 1 so that big and small tensors
  weigh alike. It is made group-specific through the embedding channels: the
  columns of the teacher's head rows for the group's classes contribute 25% of
  the channel score, so every specialist keeps the channels its classes are
  read from.
- `taylor`: first-order |w * dL/dw| accumulated over `data`, where L is the
  teacher's cross-entropy restricted to the group's classes (local labels) on
  the group's images. Per unit the scores of every weight that reads or writes
  it are summed; a block's score is the sum over its weights.
- `hsic`: the paper's criterion. Heads: normalised HSIC (Gaussian kernel,
  median bandwidth) between a head's output at the class (and distillation)
  token and the teacher's group prediction (log-probabilities of the group's
  classes, linear kernel), ranked greedily by relevance minus 0.5 x mean
  redundancy (HSIC with the heads already chosen in the block: mRMR).
  Neurons and channels: linear HSIC of the unit's activation with the
  prediction, blended 50/50 with mean activation magnitude. Blocks: relative
  size of the block's update to the residual stream on the group's images.
"""
from __future__ import annotations

import re
from typing import Iterable

import torch
import torch.nn.functional as F

from .cct import shapes as cct_shapes
from .shapes import head_names, is_cct

HEAD_TERM = 0.25  # share of the group's head columns in magnitude channel importance
HSIC_REDUNDANCY = 0.5  # weight of the redundancy term in mRMR head ranking
HSIC_BLEND = 0.5  # share of HSIC relevance (vs activation magnitude) for neurons and channels
MIN_GROUP_SAMPLES = 4  # fewer group images than this: score on all images instead


# ---------------------------------------------------------------------------
# Which axis of which timm parameter indexes which unit
# ---------------------------------------------------------------------------


def param_axes(name: str, tcfg: dict | None = None) -> dict[int, tuple]:
    """Axes of a timm ViT parameter (or, with a CCT's `tcfg`, a CCT's) that index prunable units.

    Kinds: ("embed",), ("qkv", k) (rows in the (3, H, D) layout of block k),
    ("heads", k) (H*D columns of block k's attn.proj), ("neurons", k),
    ("classes",) (rows of a classifier); a CCT adds ("conv", i), the output
    channels of its inner tokenizer conv i.
    """
    if tcfg is not None and is_cct(tcfg):
        return cct_shapes.param_axes(name, tcfg)
    E = ("embed",)
    if name in ("cls_token", "dist_token", "pos_embed"):
        return {2: E}
    parts = name.split(".")
    if parts[0] in ("patch_embed", "norm_pre", "norm"):
        return {0: E}
    if parts[0] in ("head", "head_dist"):
        return {0: ("classes",), 1: E} if parts[-1] == "weight" else {0: ("classes",)}
    if parts[0] == "blocks":
        k, rest, w = int(parts[1]), ".".join(parts[2:-1]), parts[-1] == "weight"
        if rest in ("norm1", "norm2", "ls1", "ls2"):
            return {0: E}
        if rest == "attn.qkv":
            return {0: ("qkv", k), 1: E} if w else {0: ("qkv", k)}
        if rest == "attn.proj":
            return {0: E, 1: ("heads", k)} if w else {0: E}
        if rest == "mlp.fc1":
            return {0: ("neurons", k), 1: E} if w else {0: ("neurons", k)}
        if rest == "mlp.fc2":
            return {0: E, 1: ("neurons", k)} if w else {0: E}
    raise ValueError(f"teacher: parameter {name!r} is not part of a supported ViT")


_BLOCK_NAME = re.compile(r"^(?:classifier\.)?blocks\.(\d+)\.")


def block_index(name: str) -> int | None:
    """The block a parameter belongs to (`blocks.K.` of a ViT, `classifier.blocks.K.` of a CCT), or None."""
    m = _BLOCK_NAME.match(name)
    return int(m.group(1)) if m else None


def _is_head(name: str, tcfg: dict) -> bool:
    return any(name.startswith(h + ".") for h in head_names(tcfg))


def _unit_key(kind: tuple):
    if kind[0] in ("qkv", "heads"):
        return ("heads", kind[1])
    return kind if kind[0] in ("neurons", "conv") else kind[0]


def reduce_axis(t: torch.Tensor, axis: int, kind: tuple, tcfg: dict) -> torch.Tensor:
    """Sum a per-weight score tensor over everything but the units along `axis`."""
    others = [i for i in range(t.dim()) if i != axis]
    v = t.sum(others) if others else t  # (units along axis,), no copy of the big tensor
    if kind[0] in ("qkv", "heads"):
        H, D = tcfg["blocks"][kind[1]]["num_heads"], tcfg["head_dim"]
        return v.reshape((3, H, D) if kind[0] == "qkv" else (1, H, D)).sum((0, 2))
    return v


def _empty(tcfg: dict) -> dict:
    out = {
        "embed": torch.zeros(tcfg["embed_dim"], dtype=torch.float64),
        "heads": [torch.zeros(b["num_heads"], dtype=torch.float64) for b in tcfg["blocks"]],
        "neurons": [torch.zeros(b["mlp_hidden"], dtype=torch.float64) for b in tcfg["blocks"]],
        "blocks": None,
    }
    if is_cct(tcfg):  # the inner channels of a multi-conv tokenizer
        out["conv"] = [torch.zeros(c, dtype=torch.float64) for c in tcfg["conv_channels"]]
    return out


def _accumulate(scores: dict, name: str, s: torch.Tensor, tcfg: dict, normalise: bool) -> None:
    for axis, kind in param_axes(name, tcfg).items():
        if kind[0] == "classes":
            continue
        v = reduce_axis(s, axis, kind, tcfg).double().cpu()
        if normalise:
            v = v / v.mean().clamp_min(1e-30)
        key = _unit_key(kind)
        if key == "embed":
            scores["embed"] += v
        else:
            scores[key[0]][key[1]] += v


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def collect_data(data: Iterable, max_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate (images, labels) batches from an iterable until `max_samples` images."""
    xs, ys, n = [], [], 0
    for item in data:
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise ValueError("data: expected an iterable of (images, labels) batches")
        x, y = item[0], item[1]
        if not torch.is_tensor(x) or x.dim() != 4:
            raise ValueError(f"data: images must be a (B, C, H, W) tensor, got {type(x).__name__}")
        y = torch.as_tensor(y).long().reshape(-1)
        if len(y) != len(x):
            raise ValueError(f"data: batch has {len(x)} images but {len(y)} labels")
        xs.append(x.detach().cpu())
        ys.append(y.cpu())
        n += len(x)
        if n >= max_samples:
            break
    if not xs:
        raise ValueError("data: is empty")
    return torch.cat(xs)[:max_samples], torch.cat(ys)[:max_samples]


def _batches(n: int, bs: int):
    for i in range(0, n, bs):
        yield slice(i, min(n, i + bs))


def _group_index(labels: torch.Tensor, group: list[int]) -> torch.Tensor:
    idx = torch.nonzero(torch.isin(labels, torch.tensor(group))).flatten()
    return idx if len(idx) >= MIN_GROUP_SAMPLES else torch.arange(len(labels))


# ---------------------------------------------------------------------------
# Criteria
# ---------------------------------------------------------------------------


def magnitude(teacher, tcfg: dict, groups: list[list[int]], **_) -> list[dict]:
    base = _empty(tcfg)
    heads = {}
    with torch.no_grad():
        for name, p in teacher.state_dict().items():
            if _is_head(name, tcfg):
                heads[name] = p
                continue
            if is_cct(tcfg) and name == "classifier.positional_emb" and tcfg["positional_embedding"] == "sine":
                continue  # a fixed table, the same for every width: it says nothing about a channel
            _accumulate(base, name, p.abs(), tcfg, normalise=True)
    base["embed"] /= base["embed"].mean().clamp_min(1e-30)
    out = []
    for g in groups:
        s = {k: ([t.clone() for t in v] if isinstance(v, list) else v) for k, v in base.items()}
        hv = torch.zeros_like(s["embed"])
        for name in (f"{h}.weight" for h in head_names(tcfg)):
            if name in heads:
                v = heads[name][g].abs().sum(0).double().cpu()
                hv += v / v.mean().clamp_min(1e-30)
        if float(hv.sum()) > 0:
            s["embed"] = (1 - HEAD_TERM) * s["embed"] + HEAD_TERM * hv / hv.mean()
        else:
            s["embed"] = s["embed"].clone()
        out.append(s)
    return out


def taylor(teacher, tcfg: dict, groups: list[list[int]], images, labels, batch_size: int = 32, **_) -> list[dict]:
    dev = next(teacher.parameters()).device
    names, params = zip(*[(n, p) for n, p in teacher.named_parameters()])
    flags = [p.requires_grad for p in params]
    L = len(tcfg["blocks"])
    out = []
    for _ in groups:
        sc = _empty(tcfg)
        sc["blocks"] = torch.zeros(L, dtype=torch.float64)
        out.append(sc)
    try:
        for p in params:
            p.requires_grad_(True)
        for gi, g in enumerate(groups):
            gt = torch.tensor(g)
            idx = torch.nonzero(torch.isin(labels, gt)).flatten()
            pseudo = len(idx) == 0  # no image of the group: use the teacher's own choice among the group
            if pseudo:
                idx = torch.arange(len(labels))
            local = torch.full((int(max(labels.max(), gt.max())) + 1,), -1, dtype=torch.long)
            local[gt] = torch.arange(len(g))
            for sl in _batches(len(idx), batch_size):
                b = idx[sl]
                x = images[b].to(dev)
                z = teacher.forward_head(teacher.forward_features(x))[:, g]  # timm's head (DeiT: mean of both)
                y = z.argmax(1).detach() if pseudo else local[labels[b]].to(dev)
                loss = F.cross_entropy(z, y, reduction="sum")
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                # reduce to unit scores right away: no per-group copy of the teacher's gradients is kept
                for n, p, gr in zip(names, params, grads):
                    if gr is None or _is_head(n, tcfg):
                        continue
                    sw = (p.detach() * gr).abs()
                    _accumulate(out[gi], n, sw, tcfg, normalise=False)
                    k = block_index(n)
                    if k is not None:
                        out[gi]["blocks"][k] += float(sw.sum())
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return out


def _centre_gram(K: torch.Tensor) -> torch.Tensor:
    return K - K.mean(0, keepdim=True) - K.mean(1, keepdim=True) + K.mean()


def _gauss_gram(X: torch.Tensor) -> torch.Tensor:
    d2 = torch.cdist(X, X).pow(2)
    pos = d2[d2 > 0]
    bw = pos.median() if len(pos) else torch.tensor(1.0, dtype=X.dtype)
    return torch.exp(-d2 / (2 * bw))


def _nhsic(Kc: torch.Tensor, Lc: torch.Tensor) -> float:
    den = (Kc.norm() * Lc.norm()).clamp_min(1e-30)
    return float((Kc * Lc).sum() / den)


def _linear_nhsic(X: torch.Tensor, Yc: torch.Tensor) -> torch.Tensor:
    """Normalised linear-kernel HSIC of every column of X with the rows of Yc (centred): in [0, 1]."""
    Xc = X - X.mean(0)
    num = (Yc.T @ Xc).pow(2).sum(0)
    den = Xc.pow(2).sum(0) * (Yc.T @ Yc).norm()
    return num / den.clamp_min(1e-30)


def _blend(rel: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    return HSIC_BLEND * rel / rel.mean().clamp_min(1e-30) + (1 - HSIC_BLEND) * mag / mag.mean().clamp_min(1e-30)


def hsic(teacher, tcfg: dict, groups: list[list[int]], images, labels, batch_size: int = 32, **_) -> list[dict]:
    if is_cct(tcfg):
        raise ValueError("importance: 'hsic' reads the heads' outputs at the class token, which a CCT does not "
                         "have; use 'magnitude' or 'taylor' for a CCT teacher")
    dev = next(teacher.parameters()).device
    P = tcfg["num_prefix_tokens"]
    L = len(tcfg["blocks"])
    feats = {"head": [[] for _ in range(L)], "neu": [[] for _ in range(L)], "neu_mag": [[] for _ in range(L)],
             "upd": [[] for _ in range(L)]}
    hooks = []

    def proj_pre(k):
        def f(mod, inp):
            feats["head"][k].append(inp[0][:, :P].detach().float().cpu())  # (B, P, H*D)
        return f

    def act_hook(k):
        def f(mod, inp, out):
            feats["neu"][k].append(out.mean(1).detach().float().cpu())
            feats["neu_mag"][k].append(out.abs().mean(1).detach().float().cpu())
        return f

    def blk_hook(k):
        def f(mod, inp, out):
            x = inp[0]
            feats["upd"][k].append(((out - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).mean(1).detach().double().cpu())
        return f

    for k, blk in enumerate(teacher.blocks):
        hooks.append(blk.attn.proj.register_forward_pre_hook(proj_pre(k)))
        hooks.append(blk.mlp.act.register_forward_hook(act_hook(k)))
        hooks.append(blk.register_forward_hook(blk_hook(k)))
    toks, mags, logits = [], [], []
    try:
        with torch.no_grad():
            for sl in _batches(len(images), batch_size):
                f = teacher.forward_features(images[sl].to(dev))
                toks.append(f[:, 0].double().cpu())
                mags.append(f.abs().mean(1).double().cpu())
                z = teacher.head(f[:, 0])
                if P == 2:
                    z = (z + teacher.head_dist(f[:, 1])) / 2
                logits.append(z.double().cpu())
    finally:
        for h in hooks:
            h.remove()
    toks, mags = torch.cat(toks), torch.cat(mags)
    logp = torch.log_softmax(torch.cat(logits), dim=1)
    head_f = [torch.cat(v) for v in feats["head"]]
    neu, neu_mag, upd = ([torch.cat(v) for v in feats[k]] for k in ("neu", "neu_mag", "upd"))
    upd = torch.stack(upd, 1)  # (S, L)
    D = tcfg["head_dim"]
    out = []
    for g in groups:
        idx = _group_index(labels, g)
        Y = logp[idx][:, g]
        Yc = Y - Y.mean(0)
        Lc = _centre_gram(Yc @ Yc.T)
        s = _empty(tcfg)
        for k in range(L):
            H = tcfg["blocks"][k]["num_heads"]
            X = head_f[k][idx].double().reshape(len(idx), P, H, D).permute(2, 0, 1, 3).reshape(H, len(idx), P * D)
            Kc = [_centre_gram(_gauss_gram(X[h])) for h in range(H)]
            rel = torch.tensor([_nhsic(K, Lc) for K in Kc])
            red = torch.tensor([[_nhsic(Kc[a], Kc[b]) for b in range(H)] for a in range(H)])
            # mRMR: greedily pick the head with the best relevance minus mean redundancy with those picked.
            # A head whose output is constant on the data (centred Gram exactly 0) carries nothing, yet its
            # gain is 0, above a relevant head whose redundancy outweighs its relevance: it goes last.
            chosen, rank = [], torch.zeros(H, dtype=torch.float64)
            left = list(range(H))
            live = {h for h in range(H) if bool(Kc[h].any())}
            while left:
                pool = [h for h in left if h in live] or left
                gain = [rel[h] - (HSIC_REDUNDANCY * red[h, chosen].mean() if chosen else 0.0) for h in pool]
                best = pool[int(torch.tensor(gain).argmax())]
                rank[best] = H - len(chosen)
                chosen.append(best)
                left.remove(best)
            s["heads"][k] = rank
            s["neurons"][k] = _blend(_linear_nhsic(neu[k][idx].double(), Yc), neu_mag[k][idx].double().mean(0))
        s["embed"] = _blend(_linear_nhsic(toks[idx], Yc), mags[idx].mean(0))
        s["blocks"] = upd[idx].mean(0)
        out.append(s)
    return out


CRITERIA = {"magnitude": magnitude, "taylor": taylor, "hsic": hsic}
DATA_DRIVEN = {"taylor", "hsic"}
