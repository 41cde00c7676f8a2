"""Which path each op takes, and how build_info() says so, for every combination of what is installed
(native module with or without CUDA kernels, triton, onnxruntime), faked in-process."""
from __future__ import annotations

import sys

import pytest
import torch

from devit_ext import _build
from devit_ext.kernels import _launch
from devit_ext.ops import dispatch as P

CPU, CUDA, META = torch.device("cpu"), torch.device("cuda"), torch.device("meta")


class _FakeNative:
    def __init__(self, cuda: bool, config: dict | None = None):
        self._cuda, self._config = cuda, config or {}

    def cuda_compiled(self):
        return self._cuda

    def build_config(self):
        return dict(self._config)


@pytest.fixture
def installed(monkeypatch):
    """installed(native=..., error=..., triton=..., ort=...) fakes what this machine has."""

    def set_(native=None, error=None, triton=None, triton_error=None, ort=(True, "9.9")):
        monkeypatch.setattr(_build, "native", lambda: native)
        monkeypatch.setattr(_build, "native_error", lambda: error)
        monkeypatch.setattr(_launch, "triton_version", lambda: triton)
        monkeypatch.setattr(_launch, "triton_error", lambda: triton_error)
        monkeypatch.setattr(P, "onnxruntime_status", lambda: ort)

    return set_


def test_quant_path_by_device_and_build(installed):
    installed(native=None)
    assert [P.quant_path(d) for d in (CPU, CUDA, META)] == ["reference"] * 3
    installed(native=_FakeNative(cuda=False))
    assert [P.quant_path(d) for d in (CPU, CUDA, META)] == ["cpp", "reference", "reference"]
    installed(native=_FakeNative(cuda=True))
    assert [P.quant_path(d) for d in (CPU, CUDA, META)] == ["cpp", "cuda", "reference"]


def test_fused_path_is_triton_on_cuda_only():
    assert [P.fused_path(d) for d in (CPU, CUDA, META)] == ["cpu", "triton", "cpu"]


SDPA = "reference (torch SDPA: the op's CPU path)"
QUANT = ("quantize_int8", "dequantize_int8", "layernorm_quantize_int8")


def test_op_paths_name_every_implementation_and_every_fallback(installed):
    installed(native=_FakeNative(cuda=False), triton="3.1")
    assert P.op_paths() == {**dict.fromkeys(QUANT, "native C++"), "subvit_attention": SDPA,
                            "ensemble_fusion": "native C++ dequantise + torch matmul"}
    assert P.op_paths("cuda") == {**dict.fromkeys(QUANT, "reference (no native kernel for cuda)"),
                                  "subvit_attention": "triton", "ensemble_fusion": "triton"}
    assert P.op_paths("meta", names=("ensemble_fusion",)) == {
        "ensemble_fusion": "reference (no native kernel for meta) dequantise + torch matmul"}
    installed(native=_FakeNative(cuda=True), triton=None)
    assert P.op_paths(CUDA) == {**dict.fromkeys(QUANT, "native CUDA"),
                                "subvit_attention": "unavailable (triton missing)",
                                "ensemble_fusion": "unavailable (triton missing)"}
    installed(native=None, error="ImportError: no _C")
    why = "reference (native module missing: ImportError: no _C)"
    assert P.op_paths("cpu") == {**dict.fromkeys(QUANT, why), "subvit_attention": SDPA,
                                 "ensemble_fusion": f"{why} dequantise + torch matmul"}


def test_onnxruntime_status_names_the_first_module_that_does_not_import(monkeypatch):
    pytest.importorskip("onnxruntime")  # the [test] extra installs all three
    pytest.importorskip("onnx")
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    ok, why = P.onnxruntime_status()
    assert not ok and why.startswith("onnxscript: ModuleNotFoundError: "), why
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert P.onnxruntime_status()[1].startswith("onnx: ModuleNotFoundError: ")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert P.onnxruntime_status()[1].startswith("onnxruntime: ModuleNotFoundError: ")


def test_onnxruntime_status_gives_the_version_when_everything_imports():
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    assert P.onnxruntime_status() == (True, str(ort.__version__))


def test_local_backend_explicit_auto_and_refusals(installed):
    f32, f64 = torch.float32, torch.float64
    installed(ort=(False, "onnx: missing"))
    assert P.local_backend("torch", CUDA, f64, True) == ("torch", "asked for")
    assert P.local_backend("auto", CPU, f32, False) == ("torch", P.AUTO_WHY)
    with pytest.raises(RuntimeError) as e:
        P.local_backend("onnxruntime", CPU, f32, False)
    assert str(e.value) == ("backend='onnxruntime': onnxruntime does not import here (onnx: missing); "
                            "pip install \"devit-ext[export]\" or use backend='torch'")
    installed(ort=(True, "9.9"))
    assert P.local_backend("onnxruntime", CPU, f32, False) == ("onnxruntime", "onnxruntime 9.9")
    # auto takes torch even where onnxruntime imports: the torch sender measured faster on CPU
    for dev, dt, comp in [(CPU, f32, False), (CPU, f64, False), (CUDA, f32, False), (CPU, f32, True)]:
        assert P.local_backend("auto", dev, dt, comp) == ("torch", P.AUTO_WHY)
    assert "measured faster" in P.AUTO_WHY and "docs/perf-notes.md" in P.AUTO_WHY
    with pytest.raises(ValueError, match="backend: expected one of torch, onnxruntime, auto, got 'ort'"):
        P.local_backend("ort", CPU, f32, False)
    for dev, dt in [(CPU, f64), (CUDA, f32)]:
        with pytest.raises(ValueError) as e:
            P.local_backend("onnxruntime", dev, dt, False)
        assert str(e.value) == ("backend: 'onnxruntime' runs the sender side on the CPU in float32, "
                                f"got device={dev}, dtype={dt}")
    with pytest.raises(ValueError) as e:
        P.local_backend("onnxruntime", CPU, f32, True)
    assert str(e.value) == "backend: 'onnxruntime' and compile=True exclude each other"


def test_build_info_with_everything_installed(installed, monkeypatch):
    cfg = dict(cuda_archs=["80", "90"], openmp=201511, cuda_mode="auto", cuda_compiler="nvcc 12.4",
               cxx_compiler="g++ 13")
    installed(native=_FakeNative(cuda=True, config=cfg), triton="3.1", ort=(True, "9.9"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: 1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    info = P.build_info()
    assert info == {
        "version": P.__version__, "torch": torch.__version__, "cpp": True, "cuda_compiled": True,
        "cuda_archs": ["80", "90"], "cuda_available": True, "triton": True, "triton_interpret": True,
        "openmp": 201511, "cuda_build_mode": "auto", "cuda_compiler": "nvcc 12.4", "cxx_compiler": "g++ 13",
        "native_error": None, "triton_error": None, "quant_cpu": "cpp", "quant_cuda": "cuda",
        "ops_cpu": {**dict.fromkeys(QUANT, "native C++"), "subvit_attention": SDPA,
                    "ensemble_fusion": "native C++ dequantise + torch matmul"},
        "ops_cuda": {**dict.fromkeys(QUANT, "native CUDA"), "subvit_attention": "triton", "ensemble_fusion": "triton"},
        "onnxruntime": "9.9", "onnxruntime_error": None, "local_backend_cpu": f"torch ({P.AUTO_WHY})",
    }
    assert type(info["cuda_available"]) is bool and type(info["openmp"]) is int


def test_build_info_says_what_is_missing(installed, monkeypatch):
    installed(native=None, error="ImportError: no _C", triton=None, triton_error="ImportError: no triton",
              ort=(False, "onnxruntime: missing"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for interp in ("", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", interp)
        assert P.build_info()["triton_interpret"] is False
    monkeypatch.delenv("TRITON_INTERPRET")
    info = P.build_info()
    why = "reference (native module missing: ImportError: no _C)"
    assert {k: info[k] for k in info if k not in ("version", "torch", "ops_cpu")} == {
        "cpp": False, "cuda_compiled": False, "cuda_archs": [], "cuda_available": False, "triton": False,
        "triton_interpret": False, "openmp": 0, "cuda_build_mode": None, "cuda_compiler": None,
        "cxx_compiler": None, "native_error": "ImportError: no _C", "triton_error": "ImportError: no triton",
        "quant_cpu": "reference (native module missing)", "quant_cuda": "reference (native module missing)",
        "ops_cuda": {**dict.fromkeys(QUANT, why), "subvit_attention": "unavailable (triton missing)",
                     "ensemble_fusion": "unavailable (triton missing)"},
        "onnxruntime": None, "onnxruntime_error": "onnxruntime: missing",
        "local_backend_cpu": f"torch ({P.AUTO_WHY})",
    }
    installed(native=_FakeNative(cuda=False, config=dict(cxx_compiler="")), ort=(True, "9.9"))
    info = P.build_info()
    assert info["quant_cpu"] == "cpp" and info["quant_cuda"] == "reference (CUDA kernels not compiled)"
    assert info["cuda_compiler"] is None and info["cxx_compiler"] is None and info["cuda_compiled"] is False


def test_eager_ok_only_for_plain_tensors_outside_every_mode_and_transform():
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    x = torch.randn(2, 3)
    assert P.eager_ok(x, None, x) and P.eager_ok()
    assert not P.eager_ok(x, x.clone().requires_grad_(True))

    class Sub(torch.Tensor):
        pass

    assert not P.eager_ok(x.as_subclass(Sub))

    class FunctionMode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class DispatchMode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with FunctionMode():  # each mode alone is enough
        assert not P.eager_ok(x)
    with DispatchMode():
        assert not P.eager_ok(x)
    with torch.autograd.profiler.profile():
        assert not P.eager_ok(x)
    seen = []

    def f(t):
        seen.append(P.eager_ok(t))
        return t

    torch.func.vmap(f)(torch.randn(2, 3))
    assert seen == [False]  # a functorch transform
    assert P.eager_ok(x)  # and back outside
