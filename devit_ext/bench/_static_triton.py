"""Static report of the Triton kernels (half of `devit-ext bench static`).

The configuration is the launcher's own choice: each public launcher
(devit_ext.kernels.subvit_attention / ensemble_fusion) is called on meta tensors
of every benchmark shape with `target=_launch.Target(SMs, arch)`, so its one
tile-choice function (`tile_config` in each kernel module) picks for that GPU;
the launch is replaced by a recorder and the device check bypassed. The
recorded arguments go through Triton's own binder (the runtime's
specialisation: pointer alignment, ints equal to 1 or divisible by 16) and are
compiled ahead of time with `triton.compile(ASTSource(...), GPUTarget("cuda",
arch, 32))`: no GPU needed. Compiling needs TRITON_INTERPRET unset (under the
interpreter `tl` is patched for numpy and the compiler fails).

From each compiled kernel: the ptxas -v log of the compile itself (Triton's
dump_ptxas_log, cache bypassed so ptxas really runs), metadata.shared (dynamic
shared memory), PTX (MMA kind/count) and SASS via cuobjdump (tensor-core ops,
load widths, local memory).
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import tempfile
from dataclasses import dataclass
from unittest import mock

import torch

from . import _compiled, _gpu_arch

N_TOK = 197
BATCHES = (1, 8, 64, 256)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FUSION_T = 1024


@dataclass(frozen=True)
class Shape:
    kernel: str  # "subvit_attention" | "ensemble_fusion"
    label: str
    B: int
    heads: tuple = ()  # attention: heads per sub-model
    D: int = 64
    widths: tuple = ()  # fusion: token widths
    C: int = 100


def shapes(quick: bool) -> list[Shape]:
    """The benchmark shapes of issue 12 (quick: one per kernel, the paper's 4 x 3 heads and 4 x 192 tokens)."""
    if quick:
        return [Shape("subvit_attention", "4x3h D64 B256", 256, (3,) * 4, 64),
                Shape("ensemble_fusion", "4x192 C100 B256", 256, widths=(192,) * 4, C=100)]
    out = []
    for B in BATCHES:
        for D in (64, 128):
            for H in (3, 16):
                out.append(Shape("subvit_attention", f"4x{H}h D{D} B{B}", B, (H,) * 4, D))
            out.append(Shape("subvit_attention", f"3+4+6+2h D{D} B{B}", B, (3, 4, 6, 2), D))
        for widths, wl in (((192,) * 4, "4x192"), ((192, 256, 384, 128), "192+256+384+128")):
            for C in (100, 1000):
                out.append(Shape("ensemble_fusion", f"{wl} C{C} B{B}", B, widths=widths, C=C))
    return out


def missing_tools() -> str | None:
    """Why Triton kernels cannot be compiled and read on this machine (a missing tool), or None."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except Exception as e:  # noqa: BLE001 - report why
        return f"triton does not import: {type(e).__name__}: {e}"
    if _compiled.cuobjdump_path() is None:
        return "cuobjdump not found (neither Triton's bundled copy nor one on PATH)"
    return None


def unavailable_reason() -> str | None:
    """missing_tools(), or the interpreter being on in this process."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is set: compiling for the GPU needs it unset (run without TRITON_INTERPRET=1)"
    return missing_tools()


# ----------------------------------------------------------------------------- launcher capture


class _Recorder:
    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((tuple(grid), args, kwargs))

        return launch


def _module(kernel: str):
    return importlib.import_module(f"devit_ext.kernels.{kernel}")


_KERNEL_FN = {"subvit_attention": "_subvit_attention_fwd", "ensemble_fusion": "_ensemble_fusion_fwd"}


def _call_launcher(shape: Shape, dtype: torch.dtype, target):
    meta = torch.device("meta")
    mod = _module(shape.kernel)
    if shape.kernel == "subvit_attention":
        B, N, D = shape.B, N_TOK, shape.D
        if len(set(shape.heads)) == 1:  # the QKV linear output, viewed (what the engines pass)
            M, H = len(shape.heads), shape.heads[0]
            qkv = torch.empty(M, B, N, 3 * H * D, dtype=dtype, device=meta).view(M, B, N, 3, H, D)
        else:
            qkv = [torch.empty(B, N, 3 * h * D, dtype=dtype, device=meta).view(B, N, 3, h, D) for h in shape.heads]
        mod.subvit_attention(qkv, target=target)
    else:
        B, K, T, C, M = shape.B, sum(shape.widths), FUSION_T, shape.C, len(shape.widths)
        q = torch.empty(B, K, dtype=torch.int8, device=meta)
        scales = torch.empty(B, M, dtype=torch.float32, device=meta)
        w1, b1 = torch.empty(T, K, dtype=dtype, device=meta), torch.empty(T, dtype=dtype, device=meta)
        w2, b2 = torch.empty(C, T, dtype=dtype, device=meta), torch.empty(C, dtype=dtype, device=meta)
        mod.ensemble_fusion(q, scales, list(shape.widths), w1, b1, w2, b2, target=target)


def capture(shape: Shape, dtype: torch.dtype, sms: int, arch: int):
    """(jit function, grid, args, kwargs) of the launch the launcher makes for `shape` on sm_<arch> with `sms` SMs."""
    from devit_ext.kernels import _launch

    mod = _module(shape.kernel)
    name = _KERNEL_FN[shape.kernel]
    real = getattr(mod, name)
    rec = _Recorder()
    with mock.patch.object(mod, name, rec), \
            mock.patch.object(_launch, "check_launchable", lambda *a, **k: None):
        _call_launcher(shape, dtype, _launch.Target(sms, arch))
    if len(rec.calls) != 1:
        raise RuntimeError(f"{shape.kernel}: expected one launch for {shape.label}, recorded {len(rec.calls)}")
    grid, args, kwargs = rec.calls[0]
    return real, grid, args, kwargs


class _Ptr:
    """A tensor argument as Triton's binder sees it: dtype and address (offset from a 256-byte-aligned allocation)."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._addr = t.storage_offset() * t.element_size()

    def data_ptr(self):
        return self._addr


# ----------------------------------------------------------------------------- compile


def _jit(fn):
    from triton.runtime.jit import JITFunction

    return fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)


@dataclass
class Specialised:
    """One launch as Triton's runtime would compile it for sm_<arch>."""

    jit: object
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: object

    def key(self) -> str:
        opts = {k: v for k, v in sorted(self.options.__dict__.items()) if k not in ("extern_libs",)}
        return repr((self.jit.fn.__qualname__, self.arch, sorted(self.signature.items()),
                     sorted(self.constexprs.items()), sorted(self.attrs.items()), opts))


def specialise(fn, args, kwargs, arch: int) -> Specialised:
    """Triton's own binder on the recorded arguments: the specialisation the runtime would compute."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    jit = _jit(fn)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    args = [_Ptr(a) if isinstance(a, torch.Tensor) else a for a in args]
    try:
        binder = create_function_from_signature(jit.signature, jit.params, backend)
        bound, spec, opts = binder(*args, **kwargs)
        options, signature, constexprs, attrs = jit._pack_args(backend, dict(kwargs), bound, spec, opts)
    except (AttributeError, TypeError) as e:
        raise RuntimeError(f"triton {triton.__version__}: its launch binder changed ({e}); update _static_triton.specialise") from e
    return Specialised(jit, arch, signature, constexprs, attrs, options)


def compile_specialised(sp: Specialised):
    """Compile ahead of time; returns (compiled kernel, the ptxas -v log of that compile)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    saved = (knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile, knobs.cache.dir)
    buf = io.StringIO()
    with tempfile.TemporaryDirectory(prefix="devit-static-triton-") as cache:
        try:  # a fresh cache: ptxas must run for its -v log to exist, and nothing lands in ~/.triton or the repo
            knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile, knobs.cache.dir = True, True, cache
            with contextlib.redirect_stdout(buf):
                k = triton.compile(ASTSource(sp.jit, sp.signature, sp.constexprs, sp.attrs),
                                   target=GPUTarget("cuda", sp.arch, 32), options=sp.options.__dict__)
        finally:
            knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile, knobs.cache.dir = saved
    return k, buf.getvalue()


def _describe(fn, signature, constexprs, num_warps, num_stages) -> tuple[str, str]:
    """(config: the launcher's tile choice, spec: ints specialised to constants)."""
    jit = _jit(fn)
    names = jit.arg_names
    tiles, consts = [], []
    for key, v in sorted(constexprs.items()):
        n = names[key[0]]
        if signature.get(n) == "constexpr" and jit.params[key[0]].is_constexpr:
            if n.startswith(("BLOCK", "ALIGN")) or n in ("ATOMIC",):
                tiles.append(f"{n.replace('BLOCK_', 'B')}={int(v) if isinstance(v, bool) else v}")
        else:
            consts.append(f"{n}={v}")
    tiles += [f"w{num_warps}", f"s{num_stages}"]
    return " ".join(tiles), " ".join(consts)


def rows(archs, quick: bool, dtypes=None) -> tuple[list[dict], list[dict]]:
    """(one row per kernel x config x dtype x arch, one pick row per shape x dtype x arch)."""
    if dtypes is None:
        dtypes = ["bf16"] if quick else list(DTYPES)
    compiled: dict[tuple, dict] = {}
    picks: list[dict] = []
    for arch in archs:
        lim = _gpu_arch.limits(arch)
        for dname in dtypes:
            for shape in shapes(quick):
                fn, grid, args, kwargs = capture(shape, DTYPES[dname], lim.sms, arch)
                sp = specialise(fn, args, kwargs, arch)
                key = sp.key()
                row = compiled.get(key)
                if row is None:
                    row = compiled[key] = _row(shape.kernel, dname, sp)
                row["shapes"].append(shape.label)
                programs = grid[0] * grid[1] * grid[2]
                resident = max(1, row["blocks_per_sm"]) * lim.sms
                picks.append({"kernel": shape.kernel, "shape": shape.label, "dtype": dname, "arch": arch,
                              "config": row["config"], "grid": "x".join(map(str, grid)), "programs": programs,
                              "waves": programs / resident, **_work(shape, DTYPES[dname])})
    return list(compiled.values()), picks


def _row(kernel, dname, sp: Specialised) -> dict:
    arch = sp.arch
    k, log = compile_specialised(sp)
    recs = _compiled.parse_ptxas_log(log)
    if len(recs) != 1:
        raise RuntimeError(f"{kernel} sm_{arch}: expected one ptxas record, got {len(recs)} (log: {log[:300]!r})")
    r = recs[0]
    with tempfile.TemporaryDirectory(prefix="devit-static-sass-") as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        sass = _compiled.sass_counts(_compiled.cuobjdump(path, "-sass"))
    counts = sass.get((arch, k.metadata.name))
    if counts is None:
        raise RuntimeError(f"cuobjdump -sass: no code for {k.metadata.name} on sm_{arch}")
    mma, n_mma = _compiled.ptx_mma(k.asm["ptx"])
    threads = k.metadata.num_warps * 32
    shared = r["static_shared"] + int(k.metadata.shared)
    occ = _gpu_arch.occupancy(arch, r["registers"], threads, shared)
    config, spec = _describe(sp.jit, sp.signature, sp.constexprs, sp.options.num_warps, sp.options.num_stages)
    return {
        "kernel": kernel, "arch": arch, "dtype": dname, "config": config, "spec": spec,
        "registers": r["registers"], "spill_bytes": r["spill_stores"], "spill_loads": r["spill_loads"],
        "stack_bytes": r["stack_bytes"], "shared_bytes": shared, "threads": threads,
        "mma": mma, "mma_count": n_mma, **_compiled.load_summary(counts),
        **{x: occ[x] for x in ("blocks_per_sm", "warps_per_sm", "occupancy", "limiter")},
        "shapes": [],
    }


def _work(shape: Shape, dtype: torch.dtype) -> dict:
    """FLOPs and compulsory bytes of one call, from the kernel modules' own formulas."""
    mod = _module(shape.kernel)
    es = torch.empty((), dtype=dtype).element_size()
    if shape.kernel == "subvit_attention":
        return {"flops": mod.flops(shape.B, N_TOK, shape.D, shape.heads),
                "bytes": mod.bytes_moved(shape.B, N_TOK, shape.D, shape.heads, es)}
    K = sum(shape.widths)
    return {"flops": mod.flops(shape.B, K, FUSION_T, shape.C),
            "bytes": mod.bytes_moved(shape.B, K, FUSION_T, shape.C, len(shape.widths), es)}
