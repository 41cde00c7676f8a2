"""Training checkpoints: safetensors for tensors, JSON for everything else; never pickle.

The checkpoint folder (by convention `out_dir/checkpoint/`) holds one save
directory per save, `save-<token>/` with `weights.safetensors` (model, best
model, optimizer tensors, RNG state, each under a name prefix) and
`state.json` (epoch, history, optimizer hyper-parameters, settings), and a
file `LATEST` naming the current one. A save writes its directory under a
temporary name, renames it into place, then replaces `LATEST` (os.replace),
then removes older saves and leftovers: a kill at any moment leaves `LATEST`
pointing at a complete save, so the last good copy is never lost. The random
token is written into both files too, so files mixed from two saves are
refused.

Used by `train_dekd` and `train_teacher`, whose epoch randomness comes from
generators seeded by (seed, stage, epoch), so model + optimizer + epoch are all
a resume needs to replay a run exactly.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil

import torch

CKPT_DIR = "checkpoint"
CKPT_WEIGHTS = "weights.safetensors"
CKPT_STATE = "state.json"
CKPT_LATEST = "LATEST"


def optimizer_to_flat(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict, dict]:
    """An optimizer's state as (tensors named `prefix.<param id>.<key>`, JSON-able rest)."""
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}.{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                meta["state"].setdefault(str(pid), {})[k] = v
    meta["tensor_keys"] = sorted(tensors)
    return tensors, meta


def optimizer_from_flat(opt: torch.optim.Optimizer, prefix: str, tensors: dict, meta: dict) -> None:
    """Inverse of `optimizer_to_flat`: load the state into `opt` (same parameter groups)."""
    state: dict[int, dict] = {}
    for key in meta["tensor_keys"]:
        _, pid, k = key.rsplit(".", 2)
        state.setdefault(int(pid), {})[k] = tensors[key]
    for pid, st in meta["state"].items():
        state.setdefault(int(pid), {}).update(st)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):  # JSON has no tuples; Adam's code indexes and unpacks betas
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})


def prefixed(tensors: dict, prefix: str) -> dict:
    """The entries named `prefix.<rest>`, keyed by `<rest>` (e.g. a state_dict saved under "model")."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def save_checkpoint(ckdir, *, model, best_state, opt, state: dict, extra: dict | None = None) -> None:
    """Write `model`'s weights, `best_state` (or None), `opt` (or None), the torch RNG and `state` to `ckdir`.

    `extra`: more tensors, already named with their own prefix (e.g. "ema.<name>").
    `state` must be JSON-able; the optimizer's non-tensor part is added to it
    as "optimizer", and a fresh token as "token".
    """
    from safetensors.torch import save_file

    os.makedirs(ckdir, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if best_state is not None:
        tensors.update({f"best.{k}": v.detach().contiguous().cpu() for k, v in best_state.items()})
    if extra:
        tensors.update({k: v.detach().contiguous().cpu() for k, v in extra.items()})
    state = dict(state)
    if opt is not None:
        ot, om = optimizer_to_flat(opt, "opt")
        tensors.update(ot)
        state["optimizer"] = om
    tensors["rng.torch"] = torch.get_rng_state()
    token = secrets.token_hex(8)
    state["token"] = token
    name = f"save-{token}"
    tmp = os.path.join(ckdir, f".{name}.tmp")
    os.makedirs(tmp)
    save_file(tensors, os.path.join(tmp, CKPT_WEIGHTS), metadata={"token": token})
    with open(os.path.join(tmp, CKPT_STATE), "w") as f:
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(ckdir, name))
    ltmp = os.path.join(ckdir, f".{CKPT_LATEST}.{os.getpid()}.tmp")
    with open(ltmp, "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(ltmp, os.path.join(ckdir, CKPT_LATEST))
    for entry in os.listdir(ckdir):  # older saves and leftovers of interrupted ones
        if entry != name and (entry.startswith("save-") or (entry.startswith(".") and entry.endswith(".tmp"))):
            shutil.rmtree(os.path.join(ckdir, entry), ignore_errors=True) if os.path.isdir(
                os.path.join(ckdir, entry)) else os.remove(os.path.join(ckdir, entry))


def checkpoint_files(ckdir) -> tuple[str, str] | None:
    """(state.json, weights.safetensors) of the current save in `ckdir`, or None when there is none."""
    path = os.path.join(ckdir, CKPT_LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        name = f.read().strip()
    if not name.startswith("save-") or os.sep in name:
        raise ValueError(f"out_dir: {path} names {name!r}, not a save of this checkpoint folder")
    d = os.path.join(ckdir, name)
    return os.path.join(d, CKPT_STATE), os.path.join(d, CKPT_WEIGHTS)


def load_checkpoint(ckdir):
    """(state, tensors) from `ckdir`, or None when it holds no checkpoint.

    Raises ValueError (naming `ckdir`) when the two files come from different saves.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    files = checkpoint_files(ckdir)
    if files is None:
        return None
    spath, wpath = files
    if not (os.path.isfile(spath) and os.path.isfile(wpath)):
        raise ValueError(f"out_dir: the checkpoint in {ckdir} is incomplete ({spath} or {wpath} missing)")
    with open(spath) as f:
        state = json.load(f)
    with safe_open(wpath, framework="pt") as f:
        token = (f.metadata() or {}).get("token")
    if token != state.get("token"):
        raise ValueError(f"out_dir: checkpoint files in {ckdir} come from different saves (interrupted write?)")
    return state, load_file(wpath)


def check_settings(state: dict, settings: dict, ckdir) -> None:
    """Refuse to resume a checkpoint written with other settings (the run would not be the same run)."""
    want = json.loads(json.dumps(settings))  # compare as JSON: tuples become lists, keys strings
    have = state.get("settings") or {}
    if have != want:
        diff = sorted(k for k in set(want) | set(have) if have.get(k) != want.get(k))
        raise ValueError(f"resume: the checkpoint in {ckdir} was written with different settings ({diff})")
