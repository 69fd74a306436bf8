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


def _patch_triton_interpreter() -> None:
    """Test-only shims for two Triton 3.6 interpreter bugs; the kernels themselves are unchanged.

    1. It calls ``int()`` on 1-element arrays for loop bounds loaded from memory, which numpy >= 2.4
       rejects: convert through ``.reshape(-1)[0]`` instead.
    """
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    orig = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched

    # The interpreter's tl.dot multiplies bf16 tiles as their raw uint16 bits; widen them to fp32 first.
    import numpy as np
    import triton.language as tl

    original_dot = interpreter.InterpreterBuilder.create_dot

    def widen(h):
        if h.dtype != tl.bfloat16:
            return h
        return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_triton_interpreter()

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
