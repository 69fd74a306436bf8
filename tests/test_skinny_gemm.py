"""The skinny (decode) GEMM kernel == F.linear: odd sizes, every M up to 16, strided rows, bad input."""

from __future__ import annotations

import pytest
import torch

from deltaserve.ops.skinny_gemm import MAX_M, GemvConfig, skinny_linear, skinny_linear_ref

pytest.importorskip("triton")


def _rand(*shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


@pytest.mark.parametrize("M", [1, 3, 16, 17, 64])
@pytest.mark.parametrize("N,K", [(40, 64), (37, 300), (130, 256)])
def test_matches_linear_fp32(kernel_device, M, N, K):
    x = _rand(M, K, dtype=torch.float32, device=kernel_device)
    w = _rand(N, K, dtype=torch.float32, device=kernel_device, seed=1)
    torch.testing.assert_close(skinny_linear(x, w, GemvConfig(block_k=64)), skinny_linear_ref(x, w),
                               rtol=1e-5, atol=1e-4)


def test_half_precision_and_row_strided_input(kernel_device):
    dtype = torch.float16 if kernel_device == "cpu" else torch.bfloat16
    big = _rand(5, 2 * 192, dtype=dtype, device=kernel_device)
    x = big[:, 192:]  # a column slice: row stride 384, unit stride along K
    w = _rand(72, 192, dtype=dtype, device=kernel_device, seed=1)
    got = skinny_linear(x, w, GemvConfig(block_n=32, block_k=64))
    torch.testing.assert_close(got.float(), skinny_linear_ref(x.float(), w.float()), rtol=2e-2, atol=2e-2)


def test_inproj_routes_to_the_kernel_up_to_its_row_limit():
    from deltaserve.layers.inproj import GEMV_MAX_TOKENS

    assert GEMV_MAX_TOKENS == MAX_M


def test_bad_input_names_the_problem(kernel_device):
    w = torch.zeros(8, 32, device=kernel_device)
    with pytest.raises(ValueError, match="M=65"):
        skinny_linear(torch.zeros(MAX_M + 1, 32, device=kernel_device), w)
    with pytest.raises(ValueError, match="x \\[M, K\\] and w \\[N, K\\]"):
        skinny_linear(torch.zeros(2, 31, device=kernel_device), w)
    with pytest.raises(ValueError, match="unit stride"):
        skinny_linear(torch.zeros(32, 2, device=kernel_device).t(), w)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 2, 4, 8, 16, 32, 64])
@pytest.mark.parametrize("N,K", [(12352, 2048), (2048, 4096), (20608, 3072), (17, 4096)])
def test_real_shapes_bf16_on_gpu(M, N, K):
    x = _rand(M, K, dtype=torch.bfloat16, device="cuda")
    w = _rand(N, K, dtype=torch.bfloat16, device="cuda", seed=1) * 0.02
    got, want = skinny_linear(x, w).float(), skinny_linear_ref(x.float(), w.float())
    assert ((got - want).norm() / want.norm()).item() < 1e-2


@pytest.mark.gpu
def test_fused_gemv_inproj_equals_fused():
    """`inproj=auto`'s fused_gemv choice computes the same split as the cuBLAS fused GEMM."""
    from deltaserve.layers.inproj import FUSED_GEMV, project

    w = _rand(12352, 2048, dtype=torch.bfloat16, device="cuda", seed=2) * 0.02
    for m in (1, 5, 16, 40, 64):
        x = _rand(m, 2048, dtype=torch.bfloat16, device="cuda", seed=m)
        for got, want in zip(project(x, w, 12288, FUSED_GEMV, None), project(x, w, 12288, "fused", None)):
            assert got.shape == want.shape
            assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2
