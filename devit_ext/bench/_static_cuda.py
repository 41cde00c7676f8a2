"""Static report of the CUDA kernels of csrc/quant_cuda.cu (half of `devit-ext bench static`).

Compiles the file once per arch with the flags CMakeLists.txt gives the build
(-O3 -DNDEBUG -std=c++17, one real arch each), plus -Xptxas=-v, into a temporary
fatbin (nothing is written into the repo), and reads:

- ptxas -v: registers, spill stores/loads, stack frame, static shared memory;
- cuobjdump -sass: global loads by width (LDG.E.128 is the 16-byte vector path),
  local-memory instructions (LDL/STL);
- cuobjdump -elf: EIATTR_MAX_THREADS, the kernel's __launch_bounds__, which is
  the block size the launchers use (kThreads), for the occupancy.

The archs compile in parallel (one nvcc process each) so logs never interleave.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

from . import _compiled, _gpu_arch

_TEMPLATE_ARG = re.compile(r"I(.+?)EEv")
_TYPES = {"13__nv_bfloat16": "bf16", "6__half": "fp16", "f": "fp32"}
_MAX_THREADS = re.compile(r"Attribute:\s+EIATTR_MAX_THREADS\s*\n\s*Format:\s+\S+\s*\n\s*Value:\s+(0x[0-9a-f]+)")


def source_path() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc", "quant_cuda.cu")


def nvcc_path() -> str | None:
    return os.environ.get("CUDACXX") or shutil.which("nvcc")


def unavailable_reason() -> str | None:
    """Why the CUDA half cannot run here, or None."""
    if not os.path.exists(source_path()):
        return f"{source_path()} not found (an installed package without the sources)"
    if nvcc_path() is None:
        return "nvcc not found on PATH (set CUDACXX or put the CUDA toolkit's bin on PATH)"
    if _compiled.cuobjdump_path() is None:
        return "cuobjdump not found (neither Triton's bundled copy nor one on PATH)"
    return None


def nvcc_command(arch: int, out: str) -> list[str]:
    src = source_path()
    return [
        nvcc_path(), "-O3", "-DNDEBUG", "-std=c++17", "-Xcompiler=-ffp-contract=off", "-Xptxas=-v",
        f"-gencode=arch=compute_{arch},code=sm_{arch}", "-I", os.path.dirname(src), "-fatbin", src, "-o", out,
    ]


def kernel_name(mangled: str) -> tuple[str, str]:
    """('quantize_kernel', 'bf16') from the mangled name of a template instantiation."""
    # Itanium mangling: <length><identifier>; the kernel is the identifier followed by its template args 'I...E'
    # Digits inside an anonymous namespace's hash (_GLOBAL__N__<path hash>) can read as a longer length that
    # also ends at "_kernel": of the identifiers that end there, the shortest is the kernel's own name.
    found = []
    for m in re.finditer(r"(\d+)", mangled):
        n, start = int(m.group(1)), m.end()
        ident = mangled[start:start + n]
        if ident.endswith("_kernel") and mangled[start + n:start + n + 1] == "I":
            t = _TEMPLATE_ARG.match(mangled, start + n)
            if t:
                found.append((len(ident), ident, _TYPES.get(t.group(1), t.group(1))))
    if found:
        _, ident, dtype = min(found)
        return ident, dtype
    return mangled, "?"


def _block_sizes(elf: str) -> dict[str, int]:
    """{mangled function: EIATTR_MAX_THREADS x} from cuobjdump -elf (sections .nv.info.<function>)."""
    out: dict[str, int] = {}
    parts = re.split(r"\n(?=\.nv\.info\.)", elf)
    for part in parts:
        head = part.split("\n", 1)[0]
        if not head.startswith(".nv.info."):
            continue
        m = _MAX_THREADS.search(part)
        if m:
            out[head[len(".nv.info."):].strip()] = int(m.group(1), 16)
    return out


def rows(archs, timeout: float = 300) -> list[dict]:
    """One row per kernel x dtype x arch."""
    with tempfile.TemporaryDirectory(prefix="devit-static-cuda-") as tmp:
        procs = {}
        for arch in archs:
            out = os.path.join(tmp, f"quant_sm{arch}.fatbin")
            procs[arch] = (out, subprocess.Popen(nvcc_command(arch, out), stdout=subprocess.PIPE,
                                                 stderr=subprocess.STDOUT, text=True))
        logs = {}
        for arch, (out, p) in procs.items():
            try:
                log, _ = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                for _, q in procs.values():  # none may outlive the temporary folder
                    q.kill()
                    q.wait()
                raise RuntimeError(f"nvcc for sm_{arch} ran past {timeout} s") from None
            if p.returncode != 0:
                raise RuntimeError(f"nvcc for sm_{arch} failed ({p.returncode}):\n{log[-2000:]}")
            logs[arch] = log
        result = []
        for arch, (out, _) in procs.items():
            records = [r for r in _compiled.parse_ptxas_log(logs[arch]) if r["arch"] == arch]
            sass = _compiled.sass_counts(_compiled.cuobjdump(out, "-sass"))
            threads = _block_sizes(_compiled.cuobjdump(out, "-elf"))
            for r in records:
                name, dtype = kernel_name(r["function"])
                if r["function"] not in threads:
                    raise RuntimeError(f"cuobjdump -elf: no EIATTR_MAX_THREADS for {r['function']} (sm_{arch}); "
                                       "the kernel lost its __launch_bounds__?")
                nthreads = threads[r["function"]]
                occ = _gpu_arch.occupancy(arch, r["registers"], nthreads, r["static_shared"])
                counts = sass.get((arch, r["function"]))
                if counts is None:
                    raise RuntimeError(f"cuobjdump -sass: no code for {r['function']} on sm_{arch}")
                result.append({
                    "kernel": f"cuda:{name}", "arch": arch, "dtype": dtype,
                    "config": f"threads={nthreads}",
                    "registers": r["registers"], "spill_bytes": r["spill_stores"], "spill_loads": r["spill_loads"],
                    "stack_bytes": r["stack_bytes"], "shared_bytes": r["static_shared"], "threads": nthreads,
                    "mma": None, "mma_count": 0, **_compiled.load_summary(counts),
                    **{k: occ[k] for k in ("blocks_per_sm", "warps_per_sm", "occupancy", "limiter")},
                })
    return sorted(result, key=lambda r: (r["kernel"], r["dtype"], r["arch"]))
