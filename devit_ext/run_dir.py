"""The RUN directory of the `devit-ext` commands, and the teacher it records.

Layout (written by `decompose`, completed by `train`)::

    RUN/run.json           how to rebuild the teacher (timm name, kwargs, checkpoint path + sha256),
                           the data's class names, the preprocessing (timm data config)
    RUN/decomposed/        the DeViT right after decompose (`devit_ext.load`)
    RUN/model/             the trained DeViT (written by train_dekd(out_dir=RUN))
    RUN/checkpoints/       train_dekd's per-epoch checkpoint (for --resume)
    RUN/args.yaml          the settings each command ran with, one section per command

Later commands rebuild the teacher from run.json alone and refuse a
checkpoint file whose sha256 changed since decompose. Weights load with
safetensors or `torch.load(weights_only=True)`, never a plain unpickle.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import pickle
import shutil
import tempfile
from typing import Any

from .model_files import write_atomic  # a text file a reader never sees half of (also the latency cache's)

RUN_FILE = "run.json"
ARGS_FILE = "args.yaml"
DECOMPOSED_DIR = "decomposed"
MODEL_DIR = "model"
RUN_FORMAT = 1


class RunError(ValueError):
    """Bad command-line input or RUN directory; the message names the flag or file."""


# ---------------------------------------------------------------------------
# Small file helpers
# ---------------------------------------------------------------------------


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_beside(out: str, fill):
    """`fill(tmp)` builds a directory beside `out`, which then replaces `out` (never half of one); returns what fill returned.

    An error (or interrupt) while filling removes the scratch directory and leaves `out` as it was.
    """
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.")
    try:
        result = fill(tmp)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def write_json(path: str, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=1) + "\n")


def parse_kwargs(items: list[str] | None, flag: str = "--model-kwargs") -> dict:
    """`k=v` items as timm's train.py parses them (ParseKwargs): values by ast.literal_eval, else strings."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item or item.startswith("="):
            raise RunError(f"{flag}: expected key=value items, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


# ---------------------------------------------------------------------------
# args.yaml and -c CONFIG.yaml
# ---------------------------------------------------------------------------


def _yaml():
    try:
        import yaml
    except ImportError as e:  # pragma: no cover - PyYAML ships with timm's dependencies
        raise RunError("-c/--config and args.yaml need PyYAML: pip install pyyaml") from e
    return yaml


def load_config(path: str, command: str) -> dict:
    """Defaults for `command` from a YAML file: a flat mapping of long-flag names (dashes or
    underscores), or a file with one section per command (RUN/args.yaml) from which the
    section `command` is taken."""
    yaml = _yaml()
    if not os.path.isfile(path):
        raise RunError(f"-c/--config: no such file {path!r}")
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise RunError(f"-c/--config: {path} is not valid YAML ({e})") from None
    if not isinstance(cfg, dict):
        raise RunError(f"-c/--config: {path} must hold a mapping of flag: value, got {type(cfg).__name__}")
    if isinstance(cfg.get(command), dict):
        cfg = cfg[command]
    return {str(k).replace("-", "_"): v for k, v in cfg.items()}


def write_args(run: str, command: str, settings: dict) -> None:
    """Record the settings `command` ran with in RUN/args.yaml (its own section; others kept)."""
    yaml = _yaml()
    path = os.path.join(run, ARGS_FILE)
    doc = {}
    if os.path.isfile(path):
        with open(path) as f:
            doc = yaml.safe_load(f) or {}
    doc[command] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()}
    write_atomic(path, yaml.safe_dump(doc, sort_keys=False))


# ---------------------------------------------------------------------------
# The teacher
# ---------------------------------------------------------------------------


def _read_state(path: str) -> dict:
    """A state dict from a safetensors file or a torch file loadable with weights_only=True."""
    import torch

    flag = "--teacher-checkpoint"
    if not os.path.isfile(path):
        raise RunError(f"{flag}: no such file {path!r}")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise RunError(f"{flag}: {path} is not a readable safetensors file ({e})") from None
    try:
        # timm train.py checkpoints carry their argparse.Namespace: a plain attribute bag, allowed by name
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError) as e:
        raise RunError(
            f"{flag}: {path} cannot be loaded with torch.load(weights_only=True) ({type(e).__name__}): it is "
            "not a safetensors file and holds Python objects beyond tensors, which are never unpickled here. "
            "Save the weights with "
            "safetensors.torch.save_file(model.state_dict(), 'teacher.safetensors') or "
            "torch.save(model.state_dict(), 'teacher.pth')"
        ) from None
    if isinstance(obj, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):  # timm train.py checkpoints
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RunError(f"{flag}: {path} does not hold a state dict of tensors")
    from timm.models._helpers import clean_state_dict

    return clean_state_dict(obj)


def data_config(teacher) -> dict:
    """timm's data config for `teacher` (resolve_model_data_config), with the input size the
    model was built with (pretrained_cfg keeps the pretrained resolution) and mean/std of
    in_chans entries."""
    import timm.data

    from .model import teacher_config

    tcfg = teacher_config(teacher)
    cfg = dict(timm.data.resolve_model_data_config(teacher))
    c = tcfg["in_chans"]
    cfg["input_size"] = (c, *tcfg["img_size"])
    for k in ("mean", "std"):
        v = [float(x) for x in cfg[k]]
        if len(v) != c:  # e.g. 1-channel model with an RGB pretrained_cfg: average, as timm adapts the stem
            v = [sum(v) / len(v)] * c
        cfg[k] = tuple(v)
    return cfg


def build_teacher(name: str, kwargs: dict | None, checkpoint: str | None, *, seed: int = 0):
    """timm.create_model(name, **kwargs) + the checkpoint's weights, in eval mode; errors name the flag."""
    import timm
    import torch

    from . import cct  # noqa: F401 - registers the CCT variants (cct_7_3x1_32, ...) with timm

    kwargs = dict(kwargs or {})
    for bad in ("pretrained", "checkpoint_path", "pretrained_cfg_overlay"):
        if bad in kwargs:
            raise RunError(f"--model-kwargs: {bad!r} is not allowed here; give the weights with --teacher-checkpoint FILE")
    if not timm.is_model(name):
        near = timm.list_models(f"*{name.split('_')[0]}*")[:8] if name else []
        raise RunError(f"--teacher: {name!r} is not a timm model name" + (f" (similar: {', '.join(near)})" if near else ""))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # without a checkpoint the weights are this seeded init
            teacher = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise RunError(f"--model-kwargs: timm model {name!r} does not take these arguments ({e})") from None
    except (ValueError, AssertionError, RuntimeError) as e:
        raise RunError(f"--model-kwargs: {name!r} cannot be built with {kwargs} ({type(e).__name__}: {e})") from None
    if checkpoint is not None:
        state = _read_state(checkpoint)
        try:
            teacher.load_state_dict(state, strict=True)
        except RuntimeError as e:
            lines = [ln.strip() for ln in str(e).splitlines()[1:4] if ln.strip()]
            raise RunError(
                f"--teacher-checkpoint: {checkpoint} does not fit --teacher {name} with --model-kwargs "
                f"{' '.join(f'{k}={v}' for k, v in kwargs.items()) or '(none)'}: {' '.join(lines)[:400]}"
            ) from None
    from .model import teacher_config

    try:
        teacher_config(teacher)
    except (TypeError, ValueError) as e:
        raise RunError(f"--teacher: {name} cannot be decomposed: {e}") from None
    # decompose records mean/std/input size from pretrained_cfg: make it describe this model
    dcfg = data_config(teacher)
    teacher.pretrained_cfg = dict(teacher.pretrained_cfg, mean=dcfg["mean"], std=dcfg["std"],
                                  input_size=dcfg["input_size"], num_classes=teacher.num_classes)
    return teacher.eval()


def teacher_record(name: str, kwargs: dict, checkpoint: str | None, seed: int) -> dict:
    path = None if checkpoint is None else os.path.abspath(checkpoint)
    return {"name": name, "kwargs": kwargs, "checkpoint": path,
            "sha256": None if path is None else sha256_file(path), "init_seed": int(seed)}


def teacher_from_record(rec: dict):
    """Rebuild the teacher recorded by decompose; refuse a checkpoint file that changed."""
    path = rec.get("checkpoint")
    if path is not None:
        if not os.path.isfile(path):
            raise RunError(f"RUN/{RUN_FILE}: the teacher checkpoint {path} recorded by decompose is gone")
        digest = sha256_file(path)
        if digest != rec.get("sha256"):
            raise RunError(
                f"--teacher-checkpoint: {path} changed since decompose (sha256 recorded {str(rec.get('sha256'))[:16]}..., "
                f"now {digest[:16]}...); the sub-models were cut from the old weights: run decompose again"
            )
    return build_teacher(rec["name"], rec.get("kwargs") or {}, path, seed=int(rec.get("init_seed", 0)))


# ---------------------------------------------------------------------------
# Reading a RUN
# ---------------------------------------------------------------------------


def read_run(run: str) -> dict:
    path = os.path.join(run, RUN_FILE)
    if not os.path.isfile(path):
        raise RunError(f"RUN: {run!r} is not a devit-ext run directory (no {RUN_FILE}; create one with devit-ext decompose)")
    with open(path) as f:
        rec = json.load(f)
    if rec.get("format") != RUN_FORMAT:
        raise RunError(f"RUN: {path} has format {rec.get('format')!r}, expected {RUN_FORMAT}")
    return rec


def model_path(run: str, which: str) -> str:
    """RUN/model (trained) or RUN/decomposed; a clear error when it does not exist yet."""
    sub = {"trained": MODEL_DIR, "decomposed": DECOMPOSED_DIR}.get(which)
    if sub is None:
        raise RunError(f"--model: expected 'trained' or 'decomposed', got {which!r}")
    path = os.path.join(run, sub)
    if not os.path.isdir(path):
        hint = "run devit-ext train RUN first, or pass --model decomposed" if which == "trained" else "run decompose"
        raise RunError(f"RUN: {path} does not exist ({hint})")
    return path


def load_model(run: str, which: str = "trained"):
    from .model import CheckpointError, load

    path = model_path(run, which)
    try:
        return load(path)
    except CheckpointError as e:
        raise RunError(f"RUN: {e}") from None


def check_classes(run_rec: dict, classes: list[str], flag: str) -> None:
    """The data's classes must be the ones decompose saw (same names, same order)."""
    want = run_rec.get("classes")
    n = int(run_rec["num_classes"])
    if len(classes) != n:
        raise RunError(f"{flag}: the data has {len(classes)} classes, the teacher has num_classes={n}")
    if want is not None and list(want) != list(classes):
        diff = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(want, classes)) if a != b][:3]
        raise RunError(f"{flag}: class folders differ from the ones decompose recorded ({'; '.join(diff)})")
