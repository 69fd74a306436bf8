"""The skinny (decode) GEMM kernel == F.linear: odd sizes, every M up to 16, strided rows, bad input."""

from __future__ import annotations

import pytest
import torch

from deltaserve.ops.skinny_gemm import (
    MAX_M,
    GemvConfig,
    skinny_linear,
    skinny_linear_ref,
    skinny_norm_linear,
    skinny_norm_linear_ref,
)

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


@pytest.mark.parametrize("M", [1, 5, 17, 64])
@pytest.mark.parametrize("N,K", [(40, 64), (37, 300)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_norm_in_the_prologue_matches_norm_then_linear_fp32(kernel_device, M, N, K, with_residual):
    x = _rand(M, K, dtype=torch.float32, device=kernel_device)
    r = _rand(M, K, dtype=torch.float32, device=kernel_device, seed=2) if with_residual else None
    g = _rand(K, dtype=torch.float32, device=kernel_device, seed=3) * 0.1
    w = _rand(N, K, dtype=torch.float32, device=kernel_device, seed=1)
    y, h = skinny_norm_linear(x, r, g, 1e-6, w, GemvConfig(block_n=16, block_k=64))
    y_ref, h_ref = skinny_norm_linear_ref(x, r, g, 1e-6, w)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)  # the residual is written exactly (several programs)
    if not with_residual:
        assert h is x


@pytest.mark.parametrize("split_k", [2, 3, 8])
@pytest.mark.parametrize("M,N,K", [(1, 40, 256), (5, 37, 300), (17, 130, 512)])
def test_split_k_matches_linear_and_leaves_counters_zero(kernel_device, split_k, M, N, K):
    from deltaserve.ops import skinny_gemm

    x = _rand(M, K, dtype=torch.float32, device=kernel_device)
    w = _rand(N, K, dtype=torch.float32, device=kernel_device, seed=1)
    cfg = GemvConfig(block_n=16, block_k=64, split_k=split_k)
    first = skinny_linear(x, w, cfg)
    torch.testing.assert_close(first, skinny_linear_ref(x, w), rtol=1e-5, atol=1e-4)
    assert int(skinny_gemm._COUNTERS[torch.device(kernel_device)].abs().sum()) == 0  # reset by each tile's last program
    torch.testing.assert_close(skinny_linear(x, w, cfg), first, rtol=0, atol=0)  # partials summed in split order


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("res_in_loop", [False, True])
@pytest.mark.parametrize("unit_weight", [False, True])
def test_norm_variants_match_the_reference(kernel_device, split_k, res_in_loop, unit_weight):
    """Split-K with the norm (partial sums of squares per split), the residual stored in the loop or in its
    own pass, and the unit-weight norm (``1 + g`` folded into w) all give norm-then-GEMM."""
    M, N, K = 3, 40, 320
    x = _rand(M, K, dtype=torch.float32, device=kernel_device)
    r = _rand(M, K, dtype=torch.float32, device=kernel_device, seed=2)
    g = None if unit_weight else _rand(K, dtype=torch.float32, device=kernel_device, seed=3) * 0.1
    w = _rand(N, K, dtype=torch.float32, device=kernel_device, seed=1)
    cfg = GemvConfig(block_n=16, block_k=64, split_k=split_k)
    y, h = skinny_norm_linear(x, r, g, 1e-6, w, cfg, res_in_loop=res_in_loop)
    y_ref, h_ref = skinny_norm_linear_ref(x, r, g, 1e-6, w)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)


def test_folding_the_norm_weight_into_w_is_the_same_function(kernel_device):
    x = _rand(4, 128, dtype=torch.float32, device=kernel_device)
    g = _rand(128, dtype=torch.float32, device=kernel_device, seed=3) * 0.1
    w = _rand(24, 128, dtype=torch.float32, device=kernel_device, seed=1)
    cfg = GemvConfig(block_n=16, block_k=64)
    y_folded, _ = skinny_norm_linear(x, None, None, 1e-6, w * (1 + g)[None, :], cfg)
    torch.testing.assert_close(y_folded, skinny_norm_linear_ref(x, None, g, 1e-6, w)[0], rtol=1e-5, atol=1e-4)


def test_norm_in_the_prologue_half_precision(kernel_device):
    dtype = torch.float16 if kernel_device == "cpu" else torch.bfloat16
    x, r = _rand(3, 192, dtype=dtype, device=kernel_device), _rand(3, 192, dtype=dtype, device=kernel_device, seed=2)
    g = _rand(192, dtype=dtype, device=kernel_device, seed=3) * 0.1
    w = _rand(72, 192, dtype=dtype, device=kernel_device, seed=1) * 0.1
    y, h = skinny_norm_linear(x, r, g, 1e-6, w, GemvConfig(block_n=32, block_k=64))
    y_ref, h_ref = skinny_norm_linear_ref(x, r, g, 1e-6, w)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)  # the same rounding of x + r as the norm kernel
    assert ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item() < 1e-2


def test_norm_in_the_prologue_names_bad_input(kernel_device):
    x, w = torch.zeros(2, 32, device=kernel_device), torch.zeros(8, 32, device=kernel_device)
    g = torch.zeros(32, device=kernel_device)
    with pytest.raises(ValueError, match="M=65"):
        skinny_norm_linear(torch.zeros(65, 32, device=kernel_device), None, g, 1e-6, w)
    with pytest.raises(ValueError, match="norm_weight must be \\[32\\]"):
        skinny_norm_linear(x, None, g[:31], 1e-6, w)
    with pytest.raises(ValueError, match="residual shape"):
        skinny_norm_linear(x, torch.zeros(3, 32, device=kernel_device), g, 1e-6, w)


def test_model_with_the_input_norm_in_the_in_proj_prologue(monkeypatch, tmp_path):
    """The decoder wiring of the fused path (norm_project): a tiny fp32 model whose every GDN in_proj is
    ``fused_gemv`` (the kernel, under the interpreter on the CPU) equals the same model with ``fused``,
    through a prefill (layer 0 has no residual) and decode steps (later layers add theirs)."""
    from model_utils import Runner

    import deltaserve.layers.inproj as inproj
    from deltaserve.layers.inproj import FUSED_GEMV, InProjPlan
    from deltaserve.models.loader import load_model
    from deltaserve.models.make_model import make_model

    calls, add_calls = [], []
    real, real_add = inproj.skinny_norm_linear_op.fn, inproj.skinny_add_norm_linear_op.fn

    def counting(*args):
        calls.append(args[0].shape[0])
        return real(*args)

    def counting_add(*args):
        add_calls.append(args[0].shape[0])
        return real_add(*args)

    d = make_model("tiny", tmp_path, dtype="float32", seed=4)
    gemv = InProjPlan("auto")
    gemv.set_table({8192: FUSED_GEMV})
    monkeypatch.setattr(inproj, "skinny_serves", lambda s, x: s == FUSED_GEMV and x.shape[0] <= inproj.GEMV_MAX_TOKENS)
    monkeypatch.setattr(inproj.skinny_norm_linear_op, "fn", counting)
    monkeypatch.setattr(inproj.skinny_add_norm_linear_op, "fn", counting_add)
    runs = {}
    for name, plan in (("fused", InProjPlan("fused")), ("gemv", gemv)):
        runner = Runner(load_model(d, dtype=torch.float32, plan=plan))
        seq, logits = runner.prefill(list(range(3, 20)))
        runs[name] = [logits] + [runner.step([(seq, [t])]) for t in (21, 22)]
    for got, want in zip(runs["gemv"], runs["fused"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert calls == [17, 1, 1]  # layer 0 of each step has no residual: the norm-only variant
    n_gdn = sum(layer.is_gdn for layer in load_model(d, dtype=torch.float32).model.layers)
    assert n_gdn >= 2 and add_calls == [17] * (n_gdn - 1) + [1] * (n_gdn - 1) * 2


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
@pytest.mark.parametrize("M", [1, 7, 16, 64])
@pytest.mark.parametrize("N,K", [(12352, 2048), (12352, 4096), (20608, 3072)])
def test_norm_in_the_prologue_real_shapes_bf16_on_gpu(M, N, K):
    x, r = _rand(M, K, dtype=torch.bfloat16, device="cuda"), _rand(M, K, dtype=torch.bfloat16, device="cuda", seed=2)
    g = _rand(K, dtype=torch.bfloat16, device="cuda", seed=3) * 0.1
    w = _rand(N, K, dtype=torch.bfloat16, device="cuda", seed=1) * 0.02
    (y, h), (y_ref, h_ref) = skinny_norm_linear(x, r, g, 1e-6, w), skinny_norm_linear_ref(x, r, g, 1e-6, w)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)
    assert ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item() < 1e-2


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


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 64])
@pytest.mark.parametrize("split_k", [2, 4, 8])
@pytest.mark.parametrize("N,K", [(2048, 4096), (4096, 4096), (12352, 2048)])
def test_split_k_real_shapes_bf16_on_gpu(M, split_k, N, K):
    x = _rand(M, K, dtype=torch.bfloat16, device="cuda")
    w = _rand(N, K, dtype=torch.bfloat16, device="cuda", seed=1) * 0.02
    cfg = GemvConfig(block_n=32, block_k=128, split_k=split_k)
    got, want = skinny_linear(x, w, cfg).float(), skinny_linear_ref(x.float(), w.float())
    assert ((got - want).norm() / want.norm()).item() < 1e-2
    torch.testing.assert_close(skinny_linear(x, w, cfg).float(), got, rtol=0, atol=0)  # deterministic


@pytest.mark.gpu
def test_split_k_replays_in_a_cuda_graph():
    """Graph replays reuse the tile counters: each replay must see them back at zero (reset by the last
    program of each tile) and give the same y, for several split-K GEMMs in one graph."""
    ws = [_rand(2048, 4096, dtype=torch.bfloat16, device="cuda", seed=s) * 0.02 for s in range(3)]
    x = _rand(4, 4096, dtype=torch.bfloat16, device="cuda")
    cfg = GemvConfig(block_n=32, block_k=128, split_k=4)
    want = [skinny_linear(x, w, cfg) for w in ws]  # eager first: makes the counters outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [skinny_linear(x, w, cfg) for w in ws]
    for _ in range(5):
        graph.replay()
        torch.cuda.synchronize()
        for got, ref in zip(outs, want):
            torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["in_loop", "own_pass", "folded", "split2"])
def test_norm_variants_real_shape_bf16_on_gpu(variant):
    M, N, K = 5, 12352, 2048
    x, r = _rand(M, K, dtype=torch.bfloat16, device="cuda"), _rand(M, K, dtype=torch.bfloat16, device="cuda", seed=2)
    g = _rand(K, dtype=torch.bfloat16, device="cuda", seed=3) * 0.1
    w = _rand(N, K, dtype=torch.bfloat16, device="cuda", seed=1) * 0.02
    y_ref, h_ref = skinny_norm_linear_ref(x.float(), r.float(), g.float(), 1e-6, w.float())
    if variant == "folded":
        y, h = skinny_norm_linear(x, r, None, 1e-6, (w.float() * (1 + g.float())).to(w.dtype))
    else:
        cfg = GemvConfig(split_k=2) if variant == "split2" else None
        y, h = skinny_norm_linear(x, r, g, 1e-6, w, cfg, res_in_loop=variant == "in_loop")
    torch.testing.assert_close(h, (x.float() + r.float()).to(x.dtype), rtol=0, atol=0)
    assert ((y.float() - y_ref).norm() / y_ref.norm()).item() < 1e-2
