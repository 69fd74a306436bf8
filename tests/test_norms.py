"""Fused norm / activation kernels (Triton; the interpreter on the CPU) == their PyTorch references."""

from __future__ import annotations

import pytest
import torch

from deltaserve.ops.norms import (
    rms_norm,
    rms_norm_gated,
    rms_norm_gated_ref,
    rms_norm_ref,
    silu_and_mul,
    silu_and_mul_ref,
)

pytest.importorskip("triton")
DTYPES_CPU = [torch.float32, torch.float16]


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)


def _rand(*shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES_CPU)
@pytest.mark.parametrize("N", [64, 72, 200])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("zero_centered", [True, False])
def test_rms_norm(kernel_device, dtype, N, with_residual, zero_centered):
    x = _rand(5, N, dtype=dtype, device=kernel_device)
    w = _rand(N, dtype=dtype, device=kernel_device, seed=1) * 0.1
    r = _rand(5, N, dtype=dtype, device=kernel_device, seed=2) if with_residual else None
    got = rms_norm(x, w, 1e-6, r, zero_centered, force_triton=True)
    want = rms_norm_ref(x, w, 1e-6, r, zero_centered)
    if with_residual:
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)  # the sum is rounded like eager
        got, want = got[0], want[0]
    torch.testing.assert_close(got, want, **_tol(dtype))


def test_rms_norm_reads_strided_rows(kernel_device):
    base = _rand(4, 2 * 96, dtype=torch.float32, device=kernel_device)
    x = base[:, :96]  # row stride 192: a view of a wider projection
    w = _rand(96, dtype=torch.float32, device=kernel_device, seed=3)
    torch.testing.assert_close(rms_norm(x, w, 1e-6, force_triton=True), rms_norm_ref(x, w, 1e-6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES_CPU)
@pytest.mark.parametrize("Dv", [16, 40, 128])
def test_rms_norm_gated(kernel_device, dtype, Dv):
    o = _rand(3, 4, Dv, dtype=dtype, device=kernel_device)
    z = _rand(3, 4, Dv, dtype=dtype, device=kernel_device, seed=1)
    w = 1 + 0.1 * _rand(Dv, dtype=dtype, device=kernel_device, seed=2)
    torch.testing.assert_close(rms_norm_gated(o, z, w, 1e-6, force_triton=True), rms_norm_gated_ref(o, z, w, 1e-6),
                               **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES_CPU)
@pytest.mark.parametrize("I", [32, 48, 1100])
def test_silu_and_mul(kernel_device, dtype, I):
    x = _rand(3, 2 * I, dtype=dtype, device=kernel_device)
    torch.testing.assert_close(silu_and_mul(x, force_triton=True), silu_and_mul_ref(x), **_tol(dtype))


def test_bad_shapes_name_the_values():
    with pytest.raises(ValueError, match=r"weight must be \[8\]"):
        rms_norm(torch.ones(2, 8), torch.ones(4), 1e-6)
    with pytest.raises(ValueError, match="last dim must be even"):
        silu_and_mul(torch.ones(2, 7))


@pytest.mark.gpu
@pytest.mark.parametrize("N", [2048, 3072, 4096, 5120])
def test_bf16_real_widths_on_gpu(N):
    x, r = _rand(64, N, dtype=torch.bfloat16, device="cuda"), _rand(64, N, dtype=torch.bfloat16, device="cuda", seed=1)
    w = 0.1 * _rand(N, dtype=torch.bfloat16, device="cuda", seed=2)
    y, h = rms_norm(x, w, 1e-6, r)
    y_ref, h_ref = rms_norm_ref(x, w, 1e-6, r)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)
    torch.testing.assert_close(y, y_ref, rtol=1e-2, atol=1e-2)
    o, z = _rand(64, 32, 128, dtype=torch.bfloat16, device="cuda"), _rand(64, 32, 128, dtype=torch.bfloat16, device="cuda")
    wg = 1 + 0.1 * _rand(128, dtype=torch.bfloat16, device="cuda")
    torch.testing.assert_close(rms_norm_gated(o, z, wg, 1e-6), rms_norm_gated_ref(o, z, wg, 1e-6), rtol=1e-2, atol=1e-2)
    gu = _rand(64, 2 * 12288, dtype=torch.bfloat16, device="cuda")
    torch.testing.assert_close(silu_and_mul(gu), silu_and_mul_ref(gu), rtol=1e-2, atol=1e-2)
