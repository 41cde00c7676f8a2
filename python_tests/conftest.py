"""Shared pytest setup for python_tests/.

- Without a CUDA GPU, Triton kernels run under its interpreter: TRITON_INTERPRET=1
  is set here (unless the caller set it) before anything imports triton.
  `import torch` does not import triton, so asking torch about the GPU first is safe.
- Tests marked `cuda` are skipped without a usable CUDA GPU; tests marked
  `triton` are skipped when triton cannot be imported.
- Every test starts from the same random seed.
"""
from __future__ import annotations

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure means unusable
        return False
    return True


def pytest_report_header(config):
    return [
        f"devit: torch {torch.__version__}, CUDA GPU: {torch.cuda.get_device_name() if HAS_CUDA else 'none'}, "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}"
    ]


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    triton_ok = None
    skip_triton = pytest.mark.skip(reason="triton is not importable")
    for item in items:
        if item.get_closest_marker("cuda") is not None and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if item.get_closest_marker("triton") is not None:
            if triton_ok is None:
                triton_ok = _triton_importable()
            if not triton_ok:
                item.add_marker(skip_triton)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def cuda_device():
    """torch.device('cuda') for `cuda`-marked tests (skips without a GPU)."""
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")
