"""Shared test set-up.

Without CUDA, Triton kernels run in Triton's interpreter on the CPU (TRITON_INTERPRET=1 must be set
before any kernel is defined), so every kernel is checked against its PyTorch reference in CI too.
GPU-only tests carry ``@pytest.mark.gpu`` and are skipped without a CUDA device.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@pytest.fixture
def kernel_device() -> str:
    """Where Triton kernels run in this test session: the GPU, or the CPU under the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"
