"""The skinny (decode) GEMM kernel == F.linear: odd sizes, every M up to 16, strided rows, bad input."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter

import pytest
import torch

from deltaserve.ops.skinny_gemm import MAX_M, GemvConfig, pick_config, skinny_linear, skinny_linear_ref

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


@pytest.mark.parametrize("split_k", [2, 3, 8])
@pytest.mark.parametrize("M,N,K", [(1, 40, 256), (5, 37, 300), (17, 130, 512)])
def test_split_k_matches_linear_and_leaves_counters_zero(kernel_device, split_k, M, N, K):
    from deltaserve.ops.arrival import counters

    x = _rand(M, K, dtype=torch.float32, device=kernel_device)
    w = _rand(N, K, dtype=torch.float32, device=kernel_device, seed=1)
    cfg = GemvConfig(block_n=16, block_k=64, split_k=split_k)
    first = skinny_linear(x, w, cfg)
    torch.testing.assert_close(first, skinny_linear_ref(x, w), rtol=1e-5, atol=1e-4)
    assert not counters(kernel_device, 1).any()  # reset by each tile's last program
    torch.testing.assert_close(skinny_linear(x, w, cfg), first, rtol=0, atol=0)  # partials summed in split order


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("M,N,K", [(1, 40, 256), (17, 130, 300), (5, 37, 512)])
def test_swapped_tile_matches_linear(kernel_device, split_k, M, N, K):
    """``swap`` (y^T = w x^T, the weight rows on the MMA's row side) computes the same product."""
    x = _rand(M, K, dtype=torch.float32, device=kernel_device)
    w = _rand(N, K, dtype=torch.float32, device=kernel_device, seed=1)
    cfg = GemvConfig(block_n=64 if N > 64 else 32, block_k=64, split_k=split_k, swap=True)
    torch.testing.assert_close(skinny_linear(x, w, cfg), skinny_linear_ref(x, w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("block_n", [128, 256])
def test_wide_row_tiles_match_linear(kernel_device, block_n, swap):
    """The 128- and 256-row tiles of the 64-token sweeps (scripts/bench_gemv.py): 8 warps, a partial last tile."""
    x = _rand(64, 192, dtype=torch.float32, device=kernel_device)
    w = _rand(block_n + 37, 192, dtype=torch.float32, device=kernel_device, seed=1)
    cfg = GemvConfig(block_n=block_n, block_k=64, num_warps=8, num_stages=4, swap=swap)
    torch.testing.assert_close(skinny_linear(x, w, cfg), skinny_linear_ref(x, w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("group", [2, 3, 4])
@pytest.mark.parametrize("M,N,K", [(64, 3 * 32 * 2 + 37, 192), (5, 130, 300)])
def test_grouped_row_tiles_match_linear(kernel_device, group, swap, M, N, K):
    """``group`` row tiles per program against one load of the tokens: the last program's group partly or
    wholly past N, and K not a multiple of the K step."""
    x = _rand(M, K, dtype=torch.float32, device=kernel_device)
    w = _rand(N, K, dtype=torch.float32, device=kernel_device, seed=1)
    cfg = GemvConfig(block_n=32, block_k=64, num_stages=3, swap=swap, group=group)
    torch.testing.assert_close(skinny_linear(x, w, cfg), skinny_linear_ref(x, w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("M,N,K", [(64, 3 * 32 * 2 + 37, 300), (5, 130, 256), (1, 97, 200), (17, 32, 128)])
def test_persistent_tiles_match_linear(kernel_device, swap, M, N, K):
    """A persistent launch: each program loops over several row tiles (off CUDA: 3 programs), the last one
    partly past N; K not always a multiple of the K step; a single tile."""
    x = _rand(M, K, dtype=torch.float32, device=kernel_device)
    w = _rand(N, K, dtype=torch.float32, device=kernel_device, seed=1)
    cfg = GemvConfig(block_n=32, block_k=64, num_stages=3, swap=swap, persistent=1)
    torch.testing.assert_close(skinny_linear(x, w, cfg), skinny_linear_ref(x, w), rtol=1e-5, atol=1e-4)


def test_persistent_tile_takes_plain_tiles_only():
    for bad in (dict(persistent=-1), dict(persistent=1, split_k=2), dict(persistent=1, group=2),
                dict(persistent=1, prefetch_k=256)):
        with pytest.raises(ValueError, match="persistent=.* must be >= 0 and takes plain tiles only"):
            GemvConfig(**bad)


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("M,N,K", [(64, 130, 300), (5, 37, 256), (1, 97, 200), (17, 32, 128), (33, 64, 64)])
def test_tma_tiles_match_linear(kernel_device, swap, M, N, K):
    """TMA loads: rows past M and N and columns past K come back zero from the copy engine (no masks)."""
    x = _rand(M, K, dtype=torch.float32, device=kernel_device)
    w = _rand(N, K, dtype=torch.float32, device=kernel_device, seed=1)
    cfg = GemvConfig(block_n=64 if swap else 32, block_k=64, num_stages=3, swap=swap, tma=True)
    torch.testing.assert_close(skinny_linear(x, w, cfg), skinny_linear_ref(x, w), rtol=1e-5, atol=1e-4)


def test_tma_tile_falls_back_to_pointers_where_tma_cannot_fetch(kernel_device, monkeypatch):
    """A row stride or base address off 16 bytes (fp32 K = 301; a view one element in) takes the pointer
    kernel, with the same result; aligned operands take the TMA kernel."""
    from deltaserve.ops import skinny_gemm

    launched = []
    real = skinny_gemm._launch_tma
    monkeypatch.setattr(skinny_gemm, "_launch_tma", lambda *a: launched.append(1) or real(*a))
    cfg = GemvConfig(block_n=32, block_k=64, num_stages=3, tma=True)
    w = _rand(40, 301, dtype=torch.float32, device=kernel_device, seed=1)
    x = _rand(3, 301, dtype=torch.float32, device=kernel_device)
    assert not skinny_gemm.tma_usable(x, w)
    torch.testing.assert_close(skinny_linear(x, w, cfg), skinny_linear_ref(x, w), rtol=1e-5, atol=1e-4)
    base = _rand(3, 257, dtype=torch.float32, device=kernel_device)
    x_off = base[:, 1:]  # 256 columns, a 1028-byte row stride and a base 4 bytes in
    w_ok = _rand(40, 256, dtype=torch.float32, device=kernel_device, seed=2)
    assert not skinny_gemm.tma_usable(x_off, w_ok)
    torch.testing.assert_close(skinny_linear(x_off, w_ok, cfg), skinny_linear_ref(x_off, w_ok), rtol=1e-5, atol=1e-4)
    assert launched == []
    x_ok = _rand(3, 256, dtype=torch.float32, device=kernel_device)
    torch.testing.assert_close(skinny_linear(x_ok, w_ok, cfg), skinny_linear_ref(x_ok, w_ok), rtol=1e-5, atol=1e-4)
    assert launched == [1]


def test_wide_weights_take_tma_tiles_and_skip_the_prefetch_option(kernel_device):
    """pick_config's tile for a weight of 8,192 rows or more loads by TMA; ``--skinny-prefetch`` (a cp.async
    option) leaves it alone instead of making an invalid tile (narrow weights still take the prefetch:
    test_late_trigger_and_prefetch_reach_the_launch)."""
    from deltaserve.ops import skinny_gemm

    x = _rand(2, 64, dtype=torch.float32, device=kernel_device)
    w = _rand(8200, 64, dtype=torch.float32, device=kernel_device, seed=1)
    assert pick_config(2, 8200, 64).tma and not pick_config(2, 4096, 64).tma
    seen = []
    real = skinny_gemm._launch_tma
    skinny_gemm.set_pdl_prefetch(128)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(skinny_gemm, "_launch_tma", lambda x, w, y, cfg, bm: seen.append(cfg) or real(x, w, y, cfg, bm))
            torch.testing.assert_close(skinny_linear(x, w), skinny_linear_ref(x, w), rtol=1e-5, atol=1e-4)
    finally:
        skinny_gemm.set_pdl_prefetch(0)
    assert [c.prefetch_k for c in seen] == [0]


def test_tma_tile_takes_plain_or_swapped_tiles_only():
    for bad in (dict(split_k=2), dict(group=2), dict(prefetch_k=256), dict(persistent=1),
                dict(late_trigger=True, trigger_left=1)):
        with pytest.raises(ValueError, match="tma=True takes plain or swapped tiles only"):
            GemvConfig(tma=True, **bad)
    GemvConfig(tma=True, swap=True)  # fine


def test_grouped_tile_refuses_split_k_and_bad_group_sizes():
    for bad in (0, 5):
        with pytest.raises(ValueError, match=f"group={bad} must be"):
            GemvConfig(group=bad)
    with pytest.raises(ValueError, match="needs split_k=1"):
        GemvConfig(group=2, split_k=2)


def test_model_with_skinny_in_proj_and_out_proj(monkeypatch, tmp_path):
    """The decoder wiring of the skinny GEMM: a tiny fp32 model whose GDN in_proj is ``fused_gemv`` and
    whose out_proj / o_proj / dense MLP take the skinny path (the kernels under the interpreter on the CPU) equals
    the same model on cuBLAS-equivalent F.linear, through a prefill (too many tokens for the out_proj
    path: 17 > 16) and decode steps (one token: every skinny path)."""
    from model_utils import Runner

    import deltaserve.layers.inproj as inproj
    import deltaserve.layers.linear as linear
    from deltaserve.layers.inproj import FUSED_GEMV, InProjPlan
    from deltaserve.layers.mlp import SwiGLU
    from deltaserve.models.loader import load_model
    from deltaserve.models.make_model import make_model

    calls = []
    real = linear.skinny_linear_op.fn

    def counting(x, w):
        calls.append((x.shape[0], w.shape[0]))
        return real(x, w)

    d = make_model("tiny", tmp_path, dtype="float32", seed=4)
    gemv = InProjPlan("auto")
    gemv.set_table({8192: FUSED_GEMV})
    monkeypatch.setattr(linear, "skinny_fits", lambda x, n: 0 < x.shape[0] <= n)  # as if on CUDA
    monkeypatch.setattr(inproj, "skinny_fits", lambda x, n: 0 < x.shape[0] <= n)
    monkeypatch.setattr(linear.skinny_linear_op, "fn", counting)
    runs = {}
    for name, plan, skinny_out in (("fused", InProjPlan("fused"), False), ("skinny", gemv, True)):
        model = load_model(d, dtype=torch.float32, plan=plan)
        model.set_skinny(skinny_out, dense=skinny_out)
        runner = Runner(model)
        seq, logits = runner.prefill(list(range(3, 20)))
        runs[name] = [logits] + [runner.step([(seq, [t])]) for t in (21, 22)]
    for got, want in zip(runs["skinny"], runs["fused"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    layers = load_model(d, dtype=torch.float32).model.layers
    n_gdn = sum(layer.is_gdn for layer in layers)
    in_rows = layers[0].linear_attn.in_proj.weight.shape[0]
    assert [c for c in calls if c[1] == in_rows] == [(17, in_rows)] * n_gdn \
        + [(1, in_rows)] * n_gdn * 2  # fused_gemv up to 64 tokens
    # The rest only at the decode steps (prefill: 17 > 16 tokens): per layer out_proj / o_proj, per dense
    # MLP gate_up and down_proj (with dense=True); never the attention qkv_proj (cuBLAS is faster there).
    per_step = Counter()
    for layer in layers:
        per_step[layer.linear_attn.out_proj.weight.shape[0] if layer.is_gdn else layer.self_attn.o_proj.weight.shape[0]] += 1
        if isinstance(layer.mlp, SwiGLU):
            per_step[layer.mlp.gate_up_proj.weight.shape[0]] += 1
            per_step[layer.mlp.down_proj.weight.shape[0]] += 1
    assert any(isinstance(layer.mlp, SwiGLU) for layer in layers) and not all(layer.is_gdn for layer in layers)
    assert Counter(c for c in calls if c[1] != in_rows) == Counter({(1, n): 2 * k for n, k in per_step.items()})


def test_moe_router_gemm_takes_the_skinny_path_from_two_tokens(monkeypatch, tmp_path):
    """``skinny_router``: the router GEMM of a sparse MoE block runs on the skinny GEMM at 2..16 tokens
    (cuBLAS stays faster at one), and routes like F.linear's logits."""
    from model_utils import randomize_
    from test_model_parity import build_hf

    import deltaserve.layers.linear as linear
    from deltaserve.layers.moe import ROUTER_SKINNY_MIN_TOKENS, SparseMoE
    from deltaserve.models.loader import load_model

    torch.manual_seed(0)
    hf = build_hf("qwen3_5_moe").eval()
    randomize_(hf)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=torch.float32)
    model.set_moe_router("gemm")
    moe = next(m for m in model.modules() if isinstance(m, SparseMoE))
    calls = []
    real = linear.skinny_linear_op.fn
    monkeypatch.setattr(linear, "skinny_fits", lambda x, n: 0 < x.shape[0] <= n)  # as if on CUDA
    monkeypatch.setattr(linear.skinny_linear_op, "fn", lambda x, w: calls.append(x.shape[0]) or real(x, w))
    xs = [torch.randn(n, moe.gate.weight.shape[1]) for n in (1, 2, 5, 16, 17)]
    want = [moe(x) for x in xs]
    assert calls == []
    moe.skinny_router = True
    got = [moe(x) for x in xs]
    assert ROUTER_SKINNY_MIN_TOKENS == 2 and calls == [2, 5, 16]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_pick_config_covers_the_shapes_it_was_measured_on():
    """Wide weights never split K; narrow ones split at decode sizes, the router's 257 rows the most;
    every pick is a valid tiling."""
    for M in (1, 16, 32, 64):
        for N, K in ((12352, 2048), (12352, 4096), (20608, 3072), (2048, 4096), (4096, 4096), (4096, 12288),
                     (24576, 4096), (257, 2048)):
            cfg = pick_config(M, N, K)
            assert cfg.block_k <= K and K % cfg.block_k == 0
            assert (cfg.split_k == 1) == (N >= 8192)
            assert cfg.tma == (N >= 8192)  # TMA loads for the wide weights (docs/perf/2026-12-07c.md)
    assert pick_config(4, 257, 2048) == GemvConfig(block_n=32, block_k=128, num_stages=3, split_k=8)


def test_arrival_counters_are_one_zeroed_buffer_with_a_named_limit(kernel_device):
    from deltaserve.ops.arrival import NUM_COUNTERS, counters, prepare

    buf = prepare(kernel_device)
    assert buf is counters(kernel_device, NUM_COUNTERS) and buf.dtype == torch.int32 and not buf.any()
    with pytest.raises(ValueError, match=f"{NUM_COUNTERS + 1} tiles exceed the {NUM_COUNTERS} arrival counters"):
        counters(kernel_device, NUM_COUNTERS + 1)


def test_pdl_defaults_to_where_it_can_run_and_is_refused_elsewhere():
    """Programmatic dependent launch: no launch attribute unless enabled; the default resolves to off on
    the CPU; the interpreter (these CPU tests) and a CPU engine config refuse it with the fix named."""
    from deltaserve.config import ConfigError, EngineConfig
    from deltaserve.ops import pdl

    assert pdl.launch_args() == {"PDL": False} and not pdl.enabled()
    if os.environ.get("TRITON_INTERPRET") == "1":
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            pdl.enable(True)
        assert not pdl.enabled()
    with pytest.raises(ConfigError, match="pdl=True is invalid: .*use --no-pdl"):
        EngineConfig(device="cpu", pdl=True)
    assert EngineConfig(device="cpu").pdl is False and EngineConfig(device="cpu", pdl=False).pdl is False
    assert "pdl" not in EngineConfig(device="cpu").non_defaults()
    with pytest.raises(ConfigError, match="pdl_late_trigger=True is invalid: .*needs PDL"):
        EngineConfig(device="cpu", pdl_late_trigger=True)
    with pytest.raises(ConfigError, match="skinny_prefetch=128 is invalid: .*needs PDL"):
        EngineConfig(device="cpu", skinny_prefetch=128)
    with pytest.raises(ConfigError, match="pdl_preload=True is invalid: .*needs PDL"):
        EngineConfig(device="cpu", pdl_preload=True)
    with pytest.raises(ConfigError, match="skinny_prefetch=100 is invalid: use 0 .*power of two"):
        EngineConfig(device="cpu", skinny_prefetch=100)


def test_late_trigger_and_prefetch_reach_the_launch(kernel_device, monkeypatch):
    """The trigger follows pdl.late_trigger (by grid size unless forced) where the tile leaves it open, and
    the process-wide prefetch (the engine's --skinny-prefetch) reaches launches that take pick_config's
    tile, not those given a config; without PDL the result does not change."""
    import deltaserve.ops.skinny_gemm as sg
    from deltaserve.ops import pdl

    seen, real = [], sg._skinny_gemm_kernel

    class Recorder:  # records the grid and constexprs of each launch, then launches
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append((grid[0] * grid[1], kw["LATE_TRIGGER"], kw["PREFETCH_K"]))
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(sg, "_skinny_gemm_kernel", Recorder())
    x = _rand(2, 256, dtype=torch.float32, device=kernel_device)
    w = _rand(40, 256, dtype=torch.float32, device=kernel_device, seed=1)
    want = skinny_linear(x, w)
    sg.set_pdl_prefetch(128)
    monkeypatch.setattr(pdl, "LATE_TRIGGER_PROGRAMS", 1)  # any grid of 2 or more programs counts as large
    try:
        torch.testing.assert_close(skinny_linear(x, w), want, rtol=0, atol=0)
        skinny_linear(x, w, GemvConfig(block_k=64, late_trigger=False))
    finally:
        sg.set_pdl_prefetch(0)
    assert seen == [(4, False, 0), (4, True, 128), (2, False, 0)]  # 2 row tiles x split 2, then 2 x 1
    with pytest.raises(ValueError, match="prefetch_k=48"):
        sg.set_pdl_prefetch(48)


def test_late_trigger_where_a_grid_fills_over_half_the_gpu_unless_forced(monkeypatch):
    """Measured in chains of GEMMs under PDL (H200, 132 SMs): with the early trigger, a grid that fills over
    half of what the GPU holds at once leaves too little room for the next one (9B gate_up 64 vs 48 us); grids
    filling less gain from it. Without a capacity (the MoE kernels), > 512 programs count as large."""
    from deltaserve.ops import pdl
    from deltaserve.ops.skinny_gemm import launch_grid, resident_per_sm

    def late(M, N, K):
        cfg = pick_config(M, N, K)
        tiles, split, _ = launch_grid(N, K, cfg)
        return pdl.late_trigger(tiles * split, 132 * resident_per_sm(cfg, max(16, 1 << (M - 1).bit_length()), 2))

    assert late(1, 24576, 4096)  # 9B MLP gate_up: 768 programs, 9 per SM: 0.65 of the GPU
    assert late(16, 20608, 3072)  # 122B-A10B GDN in_proj: 644, 0.54
    assert late(32, 20608, 3072)  # 322 programs of 64-row tiles, 4 per SM: 0.61
    assert late(64, 12352, 2048)  # 35B-A3B at 64 tokens: 193, 2 per SM: 0.73
    assert not late(1, 12352, 2048)  # 35B-A3B GDN in_proj: 386, 0.32
    assert not late(32, 12352, 2048)  # 193, 0.37
    assert not late(1, 2048, 4096)  # 35B-A3B out_proj: 32 tiles x split 4, 2 per SM: 0.48
    assert pdl.late_trigger(513) and not pdl.late_trigger(512)  # no capacity known
    monkeypatch.setattr(pdl, "_late_trigger", False)
    assert not pdl.late_trigger(10_000, 100)
    monkeypatch.setattr(pdl, "_late_trigger", True)
    assert pdl.late_trigger(1, 100)


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
@pytest.mark.parametrize("M", [1, 16, 33, 64])
@pytest.mark.parametrize("cfg", [GemvConfig(32, 128, 4, 5, persistent=1), GemvConfig(64, 128, 4, 3, persistent=2),
                                 GemvConfig(64, 128, 4, 4, persistent=1, swap=True)])
def test_persistent_real_shapes_bf16_on_gpu(M, cfg):
    """Persistent launches on the 35B-A3B in_proj shape and a ragged one: against the fp32 reference, and bit for
    bit against the same tile launched one program per row tile (the same sums in the same order)."""
    for N, K in ((12352, 2048), (4133, 1000)):
        x = _rand(M, K, dtype=torch.bfloat16, device="cuda")
        w = _rand(N, K, dtype=torch.bfloat16, device="cuda", seed=1) * 0.02
        got, want = skinny_linear(x, w, cfg), skinny_linear_ref(x.float(), w.float())
        assert ((got.float() - want).norm() / want.norm()).item() < 1e-2
        torch.testing.assert_close(got, skinny_linear(x, w, dataclasses.replace(cfg, persistent=0)), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 33, 64])
@pytest.mark.parametrize("cfg", [GemvConfig(32, 128, 4, 3, tma=True), GemvConfig(64, 128, 4, 3, tma=True),
                                 GemvConfig(64, 128, 4, 3, swap=True, tma=True), GemvConfig(128, 64, 8, 4, tma=True)])
def test_tma_real_shapes_bf16_on_gpu(M, cfg):
    """TMA launches on the 35B-A3B in_proj shape and a ragged one (N, K and M off every tile edge): against the
    fp32 reference, and bit for bit against the same tile's pointer kernel (the same sums in the same order)."""
    for N, K in ((12352, 2048), (4133, 1000)):
        x = _rand(M, K, dtype=torch.bfloat16, device="cuda")
        w = _rand(N, K, dtype=torch.bfloat16, device="cuda", seed=1) * 0.02
        got, want = skinny_linear(x, w, cfg), skinny_linear_ref(x.float(), w.float())
        assert ((got.float() - want).norm() / want.norm()).item() < 1e-2
        torch.testing.assert_close(got, skinny_linear(x, w, dataclasses.replace(cfg, tma=False)), rtol=0, atol=0)


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


def test_prefetch_columns_must_be_whole_lines():
    for bad in (32, 96, 100):
        with pytest.raises(ValueError, match=f"prefetch_k={bad} must be 0 or a power of two >= 64"):
            GemvConfig(prefetch_k=bad)
    assert GemvConfig(prefetch_k=256, late_trigger=True).prefetch_k == 256


def test_trigger_left_needs_a_late_trigger():
    for bad in (dict(trigger_left=-1), dict(trigger_left=2, late_trigger=False)):
        with pytest.raises(ValueError, match="trigger_left=.* must be >= 0, and 0 unless the trigger is late"):
            GemvConfig(**bad)
    assert GemvConfig(trigger_left=2).trigger_left == 2  # late_trigger None: applies where the launch picks late
    assert GemvConfig(trigger_left=2, late_trigger=True).trigger_left == 2


@pytest.mark.parametrize("left", [1, 2, 40])
def test_trigger_left_changes_nothing_off_pdl(kernel_device, left):
    """The trigger inside the K loop (``trigger_left`` steps before the end; more steps than the loop has: at the
    first) is timing only: without PDL the kernel is the plain one, here with a grouped tile and odd sizes."""
    x = _rand(7, 300, dtype=torch.float32, device=kernel_device)
    w = _rand(3 * 32 * 2 + 37, 300, dtype=torch.float32, device=kernel_device, seed=1)
    cfg = GemvConfig(block_n=32, block_k=64, num_stages=2, group=3, late_trigger=True, trigger_left=left)
    torch.testing.assert_close(skinny_linear(x, w, cfg), skinny_linear_ref(x, w), rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("late,prefetch,left,group,persistent,tma", [
    (True, 0, 0, 1, 0, False), (False, 128, 0, 1, 0, False), (True, 256, 0, 1, 0, False),
    (True, 4096, 0, 1, 0, False), (True, 256, 2, 1, 0, False), (True, 256, 2, 3, 0, False), (True, 0, 1, 3, 0, False),
    (False, 0, 0, 1, 1, False), (True, 0, 0, 1, 2, False), (False, 0, 0, 1, 0, True), (True, 0, 0, 1, 0, True)])
def test_pdl_trigger_and_prefetch_variants_equal_the_default_in_a_dependent_chain(late, prefetch, left, group,
                                                                                  persistent, tma):
    """Under PDL, a late trigger (after the K loop or ``left`` steps before its end), L2 prefetches before the
    wait, 2-stage grouped tiles, persistent launches and TMA loads change only timing: a graph of GEMMs where
    each one's input is the previous one's output (plain, split-K and a wide grid) gives the same bits as the
    engine's default launch, replay after replay (TMA: its descriptors captured with the launches)."""
    from deltaserve.ops import pdl

    if pdl.unavailable("cuda"):
        pytest.skip(pdl.unavailable("cuda"))
    ws = [_rand(n, 2048, dtype=torch.bfloat16, device="cuda", seed=s) * 0.02
          for s, n in enumerate((2048, 12352, 2048, 4096))]
    x = _rand(3, 2048, dtype=torch.bfloat16, device="cuda", seed=9)

    def chain(variant: bool):
        h = x
        for w in ws:
            base = pick_config(h.shape[0], w.shape[0], w.shape[1])
            plain = base.split_k == 1
            if persistent and plain:  # the same tile looping over row tiles: the same sums in the same order
                cfg = dataclasses.replace(base, late_trigger=late, persistent=persistent, tma=False)
            elif tma and plain:  # the same tile, its loads by TMA
                cfg = dataclasses.replace(base, late_trigger=late, tma=True)
            else:  # the pointer kernel's options (the same tile with cp.async loads)
                cfg = dataclasses.replace(base, late_trigger=late, prefetch_k=prefetch, trigger_left=left, tma=False,
                                          **({"group": group, "num_stages": 2} if group > 1 and plain else {}))
            cfg = cfg if variant else base
            h = skinny_linear(h, w, cfg)[:, :2048]
        return h

    pdl.enable(True, "cuda")
    try:
        want = chain(False).clone()
        chain(True)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = chain(True)
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    finally:
        pdl.enable(False, "cuda")
