"""The build: build_info(), the native module, CUDA compiled in, OpenMP next to torch.

DEVIT_EXPECT_CUDA=1 (set by CI where nvcc is present) makes "CUDA kernels were
compiled" a hard requirement; DEVIT_EXPECT_CUDA=0 requires a CPU-only build.
Unset, the expectation follows the build: nvcc on PATH and a build mode other
than DEVIT_CUDA=0 means the kernels must be there.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch

import devit_ext
from devit_ext import _build

KEYS = {
    "version": str,
    "cpp": bool,
    "cuda_compiled": bool,
    "cuda_archs": list,
    "cuda_available": bool,
    "triton": bool,
    "triton_interpret": bool,
    "torch": str,
    "openmp": int,
    "quant_cpu": str,
    "quant_cuda": str,
}


def test_build_info_keys_and_types():
    info = devit_ext.build_info()
    for key, typ in KEYS.items():
        assert key in info, key
        assert isinstance(info[key], typ), (key, info[key])
    assert info["version"] == devit_ext.__version__
    assert info["torch"] == torch.__version__
    assert info["cuda_available"] == torch.cuda.is_available()
    assert info["triton_interpret"] == (os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))
    assert all(isinstance(a, str) and a for a in info["cuda_archs"])
    from devit_ext.ops import OP_NAMES

    for key in ("ops_cpu", "ops_cuda"):  # every op's implementation is stated, per device type
        assert set(info[key]) == set(OP_NAMES) and all(info[key].values()), info[key]


def test_every_source_package_is_installed():
    """Each package of the source tree imports from the installed devit_ext (a wheel missing one breaks every user)."""
    import importlib
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    names = {"devit_ext." + ".".join(p.parent.relative_to(root / "devit_ext").parts)
             for p in (root / "devit_ext").rglob("__init__.py") if p.parent != root / "devit_ext"}
    names |= {"devit_ext.kernels"} if (root / "kernels" / "__init__.py").exists() else set()
    assert names, "no subpackages found in the source tree"
    installed = pathlib.Path(devit_ext.__file__).resolve().parent
    for name in sorted(names):
        module = importlib.import_module(name)
        assert module.__file__, name
        where = pathlib.Path(module.__file__).resolve()
        assert installed in where.parents or where.parent == (root / "kernels"), (name, where)


def test_native_module_loaded():
    info = devit_ext.build_info()
    assert info["cpp"], f"devit_ext._C did not load: {info['native_error']}"
    assert info["native_error"] is None
    assert info["quant_cpu"] == "cpp"
    assert info["openmp"] > 0, "the CPU kernels were built without OpenMP"


def _expect_cuda() -> bool:
    env = os.environ.get("DEVIT_EXPECT_CUDA")
    if env is not None and env != "":
        return env not in ("0", "false", "no")
    mode = (_build.native().build_config()["cuda_mode"] if _build.native() else "0")
    return shutil.which("nvcc") is not None and mode != "0"


def test_cuda_compiled_as_expected():
    info = devit_ext.build_info()
    expected = _expect_cuda()
    assert info["cuda_compiled"] == expected, (
        f"cuda_compiled={info['cuda_compiled']} but expected {expected} "
        f"(DEVIT_EXPECT_CUDA={os.environ.get('DEVIT_EXPECT_CUDA')!r}, nvcc={shutil.which('nvcc')}, "
        f"build mode={info.get('cuda_build_mode')})"
    )
    if info["cuda_compiled"]:
        assert info["cuda_archs"], "CUDA kernels without architectures"
        assert info["quant_cuda"] == "cuda"
    else:
        assert info["cuda_archs"] == []
        assert info["quant_cuda"].startswith("reference")


def test_default_archs_when_not_overridden():
    info = devit_ext.build_info()
    if not info["cuda_compiled"] or os.environ.get("DEVIT_CUDA_ARCHS"):
        pytest.skip("CUDA not compiled, or archs overridden")
    assert info["cuda_archs"] == ["80", "87", "89", "90"]


def _run(code: str, **env) -> subprocess.CompletedProcess:
    # cwd: a folder with no devit_ext/ in it, so the child imports the installed package
    # (run from a source checkout, `python -c` would put the source tree first on sys.path)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "2", **env},
    )


_OMP_WORK = """
    x = torch.randn(512, 300)
    q = torch.empty(512, 300, dtype=torch.int8); s = torch.empty(512)
    C.quantize_int8_cpu(x.data_ptr(), 0, 512, 300, 300, 1, q.data_ptr(), s.data_ptr(), 2)   # our OpenMP loop
    y = torch.randn(256, 256) @ torch.randn(256, 256)                                         # torch's threads
    C.quantize_int8_cpu(x.data_ptr(), 0, 512, 300, 300, 1, q.data_ptr(), s.data_ptr(), 2)
    assert torch.equal(s, x.abs().amax(-1) / 127)
    maps = open('/proc/self/maps').read()
    gomps = sorted({l.split()[-1] for l in maps.splitlines() if 'libgomp' in l})
    print('GOMP', gomps)
"""


@pytest.mark.parametrize("order", ["torch-first", "native-first"])
def test_openmp_next_to_torch(order):
    """Our module (gcc's libgomp) and torch (its bundled libgomp) in one process, either import order."""
    if _build.native() is None:
        pytest.skip("native module missing")
    imports = "import torch\nfrom devit_ext import _C as C\n"
    if order == "native-first":
        imports = "from devit_ext import _C as C\nimport torch\n"
    r = _run(imports + textwrap.dedent(_OMP_WORK))
    assert r.returncode == 0, r.stderr[-3000:]
    gomps = r.stdout.split("GOMP", 1)[1]
    assert gomps.count("libgomp") == 1, f"two OpenMP runtimes loaded: {gomps}"


def test_reference_fallback_without_native_module():
    """With the native module unavailable the ops run the reference and build_info says so."""
    r = _run(
        """
        import torch, devit_ext
        info = devit_ext.build_info()
        assert info["cpp"] is False and info["quant_cpu"].startswith("reference"), info
        assert info["cuda_compiled"] is False and info["quant_cuda"].startswith("reference"), info
        for op in ("quantize_int8", "dequantize_int8", "layernorm_quantize_int8"):
            assert info["ops_cpu"][op].startswith("reference (native module missing"), info["ops_cpu"]
        assert "reference" in info["ops_cpu"]["ensemble_fusion"], info["ops_cpu"]
        from devit_ext.ops import quant, reference as R
        x = torch.randn(5, 197)
        q, s = quant.quantize_int8(x)
        qr, sr = R.quantize_int8(x)
        assert torch.equal(q, qr) and torch.equal(s, sr)
        print("ok")
        """,
        DEVIT_DISABLE_NATIVE="1",
    )
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_import_devit_ext_is_light():
    """`import devit_ext` loads neither torch-heavy modules nor the native module nor triton."""
    r = _run(
        """
        import sys, devit_ext
        assert "devit_ext._C" not in sys.modules
        assert "triton" not in sys.modules
        assert "timm" not in sys.modules
        print("ok")
        """
    )
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


@pytest.mark.parametrize("first", ["devit_ext", "timm"])
def test_cct_variants_in_timm_after_import_devit_ext(first):
    """With devit_ext imported, timm.create_model knows the CCT variants whichever of the two came first,
    and `import devit_ext` alone still leaves timm unimported."""
    pytest.importorskip("timm")
    second = "timm" if first == "devit_ext" else "devit_ext"
    r = _run(
        f"""
        import sys
        import {first}
        assert ("timm" in sys.modules) == ({first!r} == "timm")
        import {second}
        import timm
        m = timm.create_model("cct_7_3x1_32", num_classes=100)
        assert type(m).__name__ == "CCT" and m.num_classes == 100, m
        assert "cct_14_7x2_224" in timm.list_models("cct_*")
        print("ok")
        """
    )
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_dtype_codes_match_native():
    """devit_ext.checks.DTYPE_CODES (what the ops pass to the kernels) is csrc/dtype.h's table."""
    if _build.native() is None:
        pytest.skip("native module missing")
    from devit_ext.checks import DTYPE_CODES

    assert {str(k).replace("torch.", ""): v for k, v in DTYPE_CODES.items()} == dict(_build.native().DTYPE_CODES)
