"""The files of a saved DeViT: content hash, config limits from the weights' header, atomic directory (and text file) writes.

A saved model is a directory holding `config.json` and `model.safetensors`
(`devit_ext.model.DeViT.save` / `devit_ext.model.load`). This module is what
makes that directory trustworthy:

- `content_hash(cfg, state_digest)`: sha256 over the canonical JSON of the
  config (sorted keys, no spaces) and the tensors' digest, so an edited
  `config.json` (an eps, a mean, a class group) no longer matches its hash.
- `read_header(path)`: the safetensors header (names, dtypes, shapes) read on
  its own, bounded, before any tensor is loaded; `read_config(path)`: the JSON,
  bounded in size and nesting; `check_config(cfg, header)`: every field of the
  config checked against limits the header implies (devices, blocks, widths,
  heads, classes, tokens) before a module is built, so a crafted config cannot
  cost minutes and gigabytes first.
- `write_dir(path, write)`: the files are written into a fresh directory beside
  `path`, synced, and swapped into place in one step (renameat2 RENAME_EXCHANGE
  on Linux; elsewhere two renames), so a kill at any point leaves the old copy
  or the new one at `path`, complete. Directories a killed save left behind are
  removed by the next save to the same place.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
import uuid
from typing import Any, Callable

from .checks import is_int, is_number
from .cct import shapes as cct_shapes
from .shapes import num_tokens

HASH_TAG = b"devit content v2\n"
MAX_CONFIG_BYTES = 16 << 20  # a 21k-class model's config is ~200 KB
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
OWN_FILES = ("config.json", "model.safetensors")

# test hook: called with the name of each step of `write_dir` (a test raises there to play a kill)
_on_step: Callable[[str], None] | None = None


def _step(name: str) -> None:
    if _on_step is not None:
        _on_step(name)


# ---------------------------------------------------------------------------
# Content hash
# ---------------------------------------------------------------------------


def canonical_json(obj: Any) -> bytes:
    """One byte string per config: sorted keys, no spaces, ASCII (floats as Python's shortest repr)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def content_hash(cfg: dict, state_digest: str) -> str:
    """sha256 over the canonical config (its own `content_hash` field left out) and the tensors' digest."""
    body = {k: v for k, v in cfg.items() if k != "content_hash"}
    return hashlib.sha256(HASH_TAG + canonical_json(body) + b"\n" + state_digest.encode()).hexdigest()


# ---------------------------------------------------------------------------
# Reading, bounded
# ---------------------------------------------------------------------------


def read_config(path: str) -> Any:
    size = os.path.getsize(path)
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path} is {size} bytes, more than the {MAX_CONFIG_BYTES} a DeViT config can need")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ValueError(f"{path} nests too deeply to be a DeViT config") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def read_header(path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor in a safetensors file, from its header alone."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is corrupt or truncated (shorter than a safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{path} is corrupt or truncated (header of {n} bytes in a {size}-byte file)")
        raw = f.read(n)
    try:
        hdr = json.loads(raw.decode("utf-8"))
    except (RecursionError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupt or truncated (unreadable header: {type(e).__name__})") from None
    if not isinstance(hdr, dict):
        raise ValueError(f"{path} is corrupt or truncated (header is not a table)")
    out = {}
    for name, entry in hdr.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(is_int(s) and s >= 0 for s in shape):
            raise ValueError(f"{path} is corrupt or truncated (tensor {name!r} has no valid shape)")
        out[name] = (str(entry.get("dtype")), tuple(shape))
    return out


# ---------------------------------------------------------------------------
# Config limits from the header
# ---------------------------------------------------------------------------


class _Bad(ValueError):
    pass


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise _Bad(msg)


def _dim(header, name: str, axis: int) -> int:
    _need(name in header, f"the weights have no tensor {name}")
    shape = header[name][1]
    _need(len(shape) > axis, f"tensor {name} has shape {shape}")
    return shape[axis]


def _finite_list(name: str, v, n: int, *, positive: bool) -> None:
    _need(isinstance(v, list) and len(v) == n and all(is_number(x) and math.isfinite(x) for x in v),
          f"{name}: expected {n} finite numbers, got {v!r}")
    if positive:
        _need(all(x > 0 for x in v), f"{name}: expected positive values (a std of 0 gives Inf images), got {v!r}")


def _check_pair(name: str, v) -> None:
    _need(isinstance(v, list) and len(v) == 2 and all(is_int(x) and 1 <= x <= 1 << 16 for x in v),
          f"{name}: expected [H, W] of positive ints, got {v!r}")


def _check_cct_submodel(p: str, c: dict, header, prefix: str) -> None:
    """A SubCCT's config against the weights' shapes (every size the model would be built with)."""
    for key in ("embed_dim", "head_dim", "in_chans", "num_classes", "kernel_size", "stride"):
        _need(is_int(c.get(key)) and c[key] >= 1, f"{p}.{key}: expected a positive int, got {c.get(key)!r}")
    _need(is_int(c.get("padding")) and 0 <= c["padding"] <= c["kernel_size"], f"{p}.padding: got {c.get('padding')!r}")
    _need(c.get("pool") == [3, 2, 1] and c.get("max_pool") is True, f"{p}.pool: expected [3, 2, 1] max-pooling")
    _need(c.get("positional_embedding") in cct_shapes.POS_KINDS, f"{p}.positional_embedding: got {c.get('positional_embedding')!r}")
    _need(c.get("distilled") is False and c.get("num_prefix_tokens") == 0, f"{p}: a CCT has no class or distillation token")
    for key in ("norm_eps", "drop_rate", "attn_drop_rate", "drop_path_rate"):
        v = c.get(key)
        _need(is_number(v) and math.isfinite(v) and 0 <= v <= 1 and (key != "norm_eps" or v > 0), f"{p}.{key}: got {v!r}")
    _check_pair(f"{p}.img_size", c.get("img_size"))
    inner = c.get("conv_channels")
    _need(isinstance(inner, list) and all(is_int(x) and x >= 1 for x in inner), f"{p}.conv_channels: got {inner!r}")
    chans, k = [c["in_chans"], *inner, c["embed_dim"]], c["kernel_size"]
    for j in range(len(chans) - 1):
        w = header.get(f"{prefix}tokenizer.conv_layers.{j}.0.weight", (None, ()))[1]
        _need(tuple(w) == (chans[j + 1], chans[j], k, k), f"{p}: tokenizer conv {j} should be "
              f"{(chans[j + 1], chans[j], k, k)}, the weights' is {tuple(w)}")
    try:
        n = cct_shapes.seq_len(c)
    except ValueError as e:
        raise _Bad(f"{p}.{e}") from None
    if c["positional_embedding"] != "none":
        _need(n == _dim(header, prefix + "classifier.positional_emb", 1), f"{p}.img_size: {c['img_size']} gives {n} "
              f"tokens, the weights' positional_emb has shape {header[prefix + 'classifier.positional_emb'][1]}")
    _need(c["num_classes"] == _dim(header, prefix + "classifier.fc.weight", 0), f"{p}.num_classes: {c['num_classes']}, "
          f"the weights' classifier has shape {header[prefix + 'classifier.fc.weight'][1]}")
    blocks = c.get("blocks")
    n_blocks = len({m.group(1) for key in header for m in [re.match(re.escape(prefix) + r"classifier\.blocks\.(\d+)\.", key)] if m})
    _need(isinstance(blocks, list) and len(blocks) == n_blocks, f"{p}.blocks: the weights have {n_blocks} blocks")
    for j, b in enumerate(blocks):
        bp = f"{prefix}classifier.blocks.{j}."
        _need(isinstance(b, dict) and is_int(b.get("num_heads")) and is_int(b.get("mlp_hidden")) and b["num_heads"] >= 1
              and b["mlp_hidden"] >= 1, f"{p}.blocks[{j}]: expected num_heads and mlp_hidden >= 1, got {b!r}")
        _need(3 * b["num_heads"] * c["head_dim"] == _dim(header, bp + "self_attn.qkv.weight", 0),
              f"{p}.blocks[{j}]: {b['num_heads']} heads of {c['head_dim']}, the weights' qkv has shape "
              f"{header[bp + 'self_attn.qkv.weight'][1]}")
        _need(b["mlp_hidden"] == _dim(header, bp + "linear1.weight", 0),
              f"{p}.blocks[{j}].mlp_hidden: {b['mlp_hidden']}, the weights' linear1 has shape {header[bp + 'linear1.weight'][1]}")


def _check_submodel(i: int, c, header, prefix: str) -> None:
    p = f"submodels[{i}]"
    _need(isinstance(c, dict), f"{p}: expected a table, got {type(c).__name__}")
    if c.get("backbone", "vit") != "vit":
        _need(c.get("backbone") == "cct", f"{p}.backbone: expected 'vit' or 'cct', got {c.get('backbone')!r}")
        _check_cct_submodel(p, c, header, prefix)
        for key in ("mean", "std"):
            if key in c:
                _finite_list(f"{p}.{key}", c[key], c["in_chans"], positive=key == "std")
        return
    for key in ("embed_dim", "head_dim", "in_chans", "num_classes", "num_prefix_tokens"):
        _need(is_int(c.get(key)) and c[key] >= 1, f"{p}.{key}: expected a positive int, got {c.get(key)!r}")
    for key in ("distilled", "no_embed_class", "layer_scale", "qkv_bias", "patch_bias", "pre_norm"):
        _need(isinstance(c.get(key), bool), f"{p}.{key}: expected true or false, got {c.get(key)!r}")
    _need(c["num_prefix_tokens"] == (2 if c["distilled"] else 1),
          f"{p}.num_prefix_tokens: {c['num_prefix_tokens']} with distilled={c['distilled']}")
    eps = c.get("norm_eps")
    _need(is_number(eps) and math.isfinite(eps) and 0 < eps <= 1, f"{p}.norm_eps: expected a finite number in (0, 1], got {eps!r}")
    _check_pair(f"{p}.img_size", c.get("img_size"))
    _check_pair(f"{p}.patch_size", c.get("patch_size"))
    d = c["embed_dim"]
    _need(d == _dim(header, prefix + "cls_token", 2), f"{p}.embed_dim: {d}, but the weights' tensor "
          f"{prefix}cls_token has shape {header.get(prefix + 'cls_token', (None, None))[1]}")
    w = header.get(prefix + "patch_embed.proj.weight", (None, ()))[1]
    _need(tuple(w) == (d, c["in_chans"], *c["patch_size"]),
          f"{p}: embed_dim/in_chans/patch_size say {(d, c['in_chans'], *c['patch_size'])}, the weights' "
          f"patch_embed.proj.weight has shape {tuple(w)}")
    n_pos = num_tokens(c) - (c["num_prefix_tokens"] if c["no_embed_class"] else 0)
    _need(n_pos == _dim(header, prefix + "pos_embed", 1),
          f"{p}.img_size: {c['img_size']} gives {n_pos} positions, the weights' pos_embed has shape "
          f"{header[prefix + 'pos_embed'][1]}")
    _need(c["num_classes"] == _dim(header, prefix + "head.weight", 0),
          f"{p}.num_classes: {c['num_classes']}, the weights' head has shape {header[prefix + 'head.weight'][1]}")
    blocks = c.get("blocks")
    n_blocks = len({m.group(1) for k in header for m in [re.match(re.escape(prefix) + r"blocks\.(\d+)\.", k)] if m})
    _need(isinstance(blocks, list) and len(blocks) == n_blocks,
          f"{p}.blocks: the weights have {n_blocks} blocks, the config "
          f"{len(blocks) if isinstance(blocks, list) else type(blocks).__name__}")
    for k, b in enumerate(blocks):
        bp = f"{prefix}blocks.{k}."
        _need(isinstance(b, dict) and is_int(b.get("num_heads")) and is_int(b.get("mlp_hidden"))
              and b["num_heads"] >= 1 and b["mlp_hidden"] >= 1, f"{p}.blocks[{k}]: expected num_heads and mlp_hidden >= 1, got {b!r}")
        _need(3 * b["num_heads"] * c["head_dim"] == _dim(header, bp + "attn.qkv.weight", 0),
              f"{p}.blocks[{k}]: {b['num_heads']} heads of {c['head_dim']}, the weights' qkv has shape "
              f"{header[bp + 'attn.qkv.weight'][1]}")
        _need(b["mlp_hidden"] == _dim(header, bp + "mlp.fc1.weight", 0),
              f"{p}.blocks[{k}].mlp_hidden: {b['mlp_hidden']}, the weights' fc1 has shape {header[bp + 'mlp.fc1.weight'][1]}")
    for key in ("mean", "std"):
        if key in c:
            _finite_list(f"{p}.{key}", c[key], c["in_chans"], positive=key == "std")


def check_config(cfg, header: dict) -> None:
    """Every field of a saved config against the tensors the weights file declares; raises ValueError."""
    try:
        _need(isinstance(cfg, dict), f"expected a table, got {type(cfg).__name__}")
        subs = cfg.get("submodels")
        n_dev = len({m.group(1) for k in header for m in [re.match(r"submodels\.(\d+)\.", k)] if m})
        _need(isinstance(subs, list) and len(subs) == n_dev and n_dev >= 1,
              f"submodels: the weights hold {n_dev} sub-models, the config "
              f"{len(subs) if isinstance(subs, list) else type(subs).__name__}")
        for i, c in enumerate(subs):
            _check_submodel(i, c, header, f"submodels.{i}.")
        f = cfg.get("fusion")
        _need(isinstance(f, dict), "fusion: expected a table")
        _need(f.get("widths") == [c["embed_dim"] for c in subs],
              f"fusion.widths: {f.get('widths')!r}, the sub-models' widths are {[c['embed_dim'] for c in subs]}")
        _need(isinstance(f.get("distilled"), bool) and f["distilled"] == ("fusion.map_dist.weight" in header)
              and all(c["distilled"] == f["distilled"] for c in subs), f"fusion.distilled: {f.get('distilled')!r} "
              "does not match the weights / the sub-models")
        _need(f.get("teacher_dim") == _dim(header, "fusion.map.weight", 0),
              f"fusion.teacher_dim: {f.get('teacher_dim')!r}, the weights' map has shape {header['fusion.map.weight'][1]}")
        C = _dim(header, "fusion.head.weight", 0)
        _need(f.get("num_classes") == C, f"fusion.num_classes: {f.get('num_classes')!r}, the weights' head has {C} classes")
        groups = cfg.get("class_groups")
        _need(isinstance(groups, list) and len(groups) == n_dev, f"class_groups: expected {n_dev} lists, got {groups!r:.80}")
        seen: set[int] = set()
        for i, g in enumerate(groups):
            _need(isinstance(g, list) and len(g) == subs[i]["num_classes"],
                  f"class_groups[{i}]: expected {subs[i]['num_classes']} classes (device {i}'s head), got {g!r:.80}")
            _need(all(is_int(x) and 0 <= x < C for x in g), f"class_groups[{i}]: expected class indices in [0, {C}), got {g!r:.80}")
            _need(not (seen & set(g)), f"class_groups[{i}]: classes {sorted(seen & set(g))[:5]} already belong to another device")
            seen |= set(g)
        _need(len(seen) == C, f"class_groups: cover {len(seen)} of the {C} classes")
        meta = cfg.get("meta")
        _need(isinstance(meta, dict), "meta: expected a table")
        _check_pair("meta.img_size", meta.get("img_size"))
        _need(meta["img_size"] == subs[0]["img_size"] and meta.get("in_chans") == subs[0]["in_chans"],
              f"meta: img_size {meta.get('img_size')} / in_chans {meta.get('in_chans')!r} differ from the sub-models'")
        for key in ("mean", "std"):
            if key in meta:
                _finite_list(f"meta.{key}", meta[key], subs[0]["in_chans"], positive=key == "std")
    except _Bad as e:
        raise ValueError(str(e)) from None


# ---------------------------------------------------------------------------
# Atomic directory write
# ---------------------------------------------------------------------------


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def _fsync_path(p: str) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def scratch_prefix(path: str) -> str:
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.devit-save-")


def clean_leftovers(path: str) -> list[str]:
    """Tidy after saves to `path` whose process is gone: remove their scratch directories, and where a
    two-rename save was killed between its renames (path absent), move the old copy back. Returns what was removed."""
    prefix = scratch_prefix(path)
    parent, stem = os.path.split(prefix)
    removed = []
    try:
        names = sorted(os.listdir(parent))
    except FileNotFoundError:
        return removed
    for n in names:
        m = re.fullmatch(re.escape(stem) + r"(\d+)-[0-9a-f]+(-old)?", n)
        if not m or _pid_alive(int(m.group(1))):
            continue
        full = os.path.join(parent, n)
        if m.group(2) and not os.path.lexists(path):
            os.rename(full, path)  # the last good copy goes back in place
            continue
        shutil.rmtree(full, ignore_errors=True)
        removed.append(full)
    return removed


def write_atomic(path: str, text: str) -> None:
    """Write a text file so that a reader never sees half of it."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_dir(path: str, write: Callable[[str], None]) -> None:
    """Write a directory atomically: `write(tmp)` fills a fresh one beside `path`, which then replaces `path`.

    `path` may be absent, an empty directory or an earlier save (holding only
    OWN_FILES); anything else is refused rather than thrown away.
    """
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    clean_leftovers(path)
    if os.path.lexists(path):
        if not os.path.isdir(path) or os.path.islink(path):
            raise FileExistsError(f"path: {path} exists and is not a directory")
        other = sorted(set(os.listdir(path)) - set(OWN_FILES))
        if other:
            raise FileExistsError(f"path: {path} holds other files ({other[:5]}); save into a new or empty directory "
                                  "or over an earlier save")
    new = f"{scratch_prefix(path)}{os.getpid()}-{uuid.uuid4().hex[:12]}"
    os.mkdir(new)
    _step("scratch-created")
    try:
        write(new)
        for n in os.listdir(new):
            _fsync_path(os.path.join(new, n))
        _fsync_path(new)
        _step("written")
    except Exception:
        shutil.rmtree(new, ignore_errors=True)
        raise
    if not os.path.exists(path):
        os.rename(new, path)  # one step; nothing to keep
        old = None
    elif _exchange(new, path):
        old = new  # path is the new copy now, `new` holds the old one
        _step("swapped")
    else:  # two renames; a kill between them is undone by the next save's clean_leftovers
        old = new + "-old"
        os.rename(path, old)
        _step("moved-old")
        os.rename(new, path)
    _fsync_path(os.path.dirname(path))
    if old is not None:
        shutil.rmtree(old)
    _step("done")
