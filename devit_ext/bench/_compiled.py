"""Read what the compiler made: ptxas -v logs, PTX text and SASS (cuobjdump).

Pure text parsing plus two small tool calls, shared by the Triton and the CUDA
halves of `devit-ext bench static`:

- `parse_ptxas_log(text)`: one record per entry function and arch: registers,
  spill stores/loads, stack frame, static shared memory, barriers.
- `ptx_mma(ptx)`: tensor-core MMA kind and count in PTX (wgmma.mma_async /
  mma.sync).
- `sass_counts(text)`: per (arch, function) opcode counts that matter here:
  tensor-core ops (HGMMA = wgmma, HMMA = mma.sync), global loads by width
  (LDG.E.128 = 16-byte vector, LDG.E.64 = 8-byte), cp.async (LDGSTS) by width,
  TMA loads (UTMALDG), local-memory traffic (LDL/STL: spills or stack arrays).
- `cuobjdump(path, *flags)`: runs cuobjdump (Triton's bundled one, else PATH).
"""
from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_BARRIERS = re.compile(r"used (\d+) barriers")
_SMEM = re.compile(r"(\d+) bytes smem")


def arch_number(sm: str) -> int:
    """'sm_90a' -> 90, 'sm_80' -> 80."""
    m = re.fullmatch(r"sm_(\d+)[a-z]?", sm)
    if not m:
        raise ValueError(f"arch: cannot read {sm!r} (expected e.g. sm_80, sm_90a)")
    return int(m.group(1))


def parse_ptxas_log(text: str) -> list[dict]:
    """Records {function, arch, registers, spill_stores, spill_loads, stack_bytes, static_shared, barriers}."""
    out: list[dict] = []
    cur: dict | None = None
    in_entry_props = False
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"function": m.group(1), "arch": arch_number(m.group(2)), "registers": None,
                   "spill_stores": 0, "spill_loads": 0, "stack_bytes": 0, "static_shared": 0, "barriers": 0}
            out.append(cur)
            in_entry_props = False
            continue
        if cur is None:
            continue
        m = _PROPS.search(line)
        if m:  # properties of the entry itself, or of a non-inlined callee (counted into the entry)
            in_entry_props = True
            continue
        m = _SPILL.search(line)
        if m and in_entry_props:
            cur["stack_bytes"] = max(cur["stack_bytes"], int(m.group(1)))
            cur["spill_stores"] += int(m.group(2))
            cur["spill_loads"] += int(m.group(3))
            continue
        m = _USED.search(line)
        if m:
            cur["registers"] = int(m.group(1))
            b = _BARRIERS.search(line)
            s = _SMEM.search(line)
            cur["barriers"] = int(b.group(1)) if b else 0
            cur["static_shared"] = int(s.group(1)) if s else 0
    missing = [r["function"] for r in out if r["registers"] is None]
    if missing:
        raise ValueError(f"ptxas log: no 'Used N registers' line for {missing}")
    return out


def ptx_mma(ptx: str) -> tuple[str | None, int]:
    """('wgmma' | 'mma.sync' | None, number of MMA instructions in the PTX)."""
    n_wgmma = len(re.findall(r"^\s*wgmma\.mma_async", ptx, re.M))
    n_mma = len(re.findall(r"^\s*(?:@%p\d+\s+)?mma\.sync", ptx, re.M))
    if n_wgmma:
        return "wgmma", n_wgmma
    if n_mma:
        return "mma.sync", n_mma
    return None, 0


_SASS_FUNC = re.compile(r"^\s*Function : (\S+)")
_SASS_ARCH = re.compile(r"code for (sm_\w+)")
_SASS_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_.]*)")


def _classify(op: str) -> str | None:
    head = op.split(".")[0]
    if head in ("HGMMA", "HMMA", "UTMALDG", "LDL", "STL"):
        return head
    if head == "LDG":
        return "LDG.128" if ".128" in op else "LDG.64" if ".64" in op else "LDG.narrow"
    if head == "LDGSTS":
        return "LDGSTS.128" if ".128" in op else "LDGSTS.narrow"
    if head == "STG":
        return "STG.128" if ".128" in op else "STG.64" if ".64" in op else "STG.narrow"
    return None


def sass_counts(text: str) -> dict[tuple[int, str], collections.Counter]:
    """{(arch, function): Counter of classified opcodes} from `cuobjdump -sass` output."""
    out: dict[tuple[int, str], collections.Counter] = {}
    arch, cur = None, None
    for line in text.splitlines():
        m = _SASS_ARCH.search(line)
        if m:
            arch = arch_number(m.group(1))
            continue
        m = _SASS_FUNC.match(line)
        if m:
            if arch is None:
                raise ValueError("cuobjdump -sass: a function before any 'code for sm_XX' line")
            cur = out.setdefault((arch, m.group(1)), collections.Counter())
            continue
        if cur is None:
            continue
        m = _SASS_OP.search(line)
        if m:
            kind = _classify(m.group(1))
            if kind:
                cur[kind] += 1
    return out


def load_summary(c: collections.Counter) -> dict:
    """The row fields taken from SASS counts."""
    return {
        "sass_mma": int(c["HGMMA"] + c["HMMA"]),
        "ldg_128": int(c["LDG.128"]),
        "ldg_64": int(c["LDG.64"]),
        "ldg_narrow": int(c["LDG.narrow"]),
        "ldgsts_128": int(c["LDGSTS.128"]),
        "ldgsts_narrow": int(c["LDGSTS.narrow"]),
        "tma_loads": int(c["UTMALDG"]),
        "local_ld_st": int(c["LDL"] + c["STL"]),
    }


def cuobjdump_path() -> str | None:
    try:  # the copy Triton ships matches its ptxas; else one on PATH
        from triton import knobs

        p = knobs.nvidia.cuobjdump.path
        if p and os.path.exists(p):
            return p
    except Exception:  # noqa: BLE001 - triton absent or changed: fall back to PATH, said by the caller
        pass
    return shutil.which("cuobjdump")


def cuobjdump(path: str, *flags: str, timeout: float = 120) -> str:
    exe = cuobjdump_path()
    if exe is None:
        raise RuntimeError("cuobjdump not found (neither Triton's bundled copy nor one on PATH)")
    r = subprocess.run([exe, *flags, path], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"cuobjdump {' '.join(flags)} {path} failed ({r.returncode}): {r.stderr.strip()[:500]}")
    return r.stdout
