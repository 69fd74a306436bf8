"""Routed-expert MoE on a GPU at the real shapes: accuracy against the fp32 reference, the alignment at
full expert counts, CUDA-graph capture with routing that changes between replays, the one-launch router
and the folded shared expert against their references, and a timing table against the bytes of the
touched experts (run with ``-s`` to see it; scripts/bench_moe.py times the whole block).
"""

from __future__ import annotations

import functools

import pytest
import torch

from deltaserve.ops import fused_moe_triton as fmt
from deltaserve.ops.fused_moe import fused_moe, fused_moe_ref
from deltaserve.ops.moe_router import moe_route, moe_router, moe_router_ref
from tests.test_fused_moe import check_alignment

pytestmark = pytest.mark.gpu

# name: (H, E, k, I)
SHAPES = {
    "qwen3.5-35b-a3b": (2048, 256, 8, 512),
    "qwen3.5-122b-a10b": (3072, 256, 8, 1024),
    "qwen3-next-80b": (2048, 512, 10, 512),
}
T_LIST = [1, 2, 4, 8, 16, 64, 512, 2048]


@functools.lru_cache(maxsize=1)  # one model's experts on the card at a time (122B: 4.8 GB)
def weights(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    H, E, _, I = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(E, 2 * I, H, device="cuda", generator=g).mul_(H**-0.5).bfloat16()
    w2 = torch.randn(E, H, I, device="cuda", generator=g).mul_(I**-0.5).bfloat16()
    return w13, w2


def routed_inputs(name: str, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    H, E, k, _ = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
    weights_, ids = moe_route(torch.randn(T, E, device="cuda", generator=g), k, renormalize=True)
    return x, weights_, ids


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("T", T_LIST)
@pytest.mark.parametrize("name", list(SHAPES))
def test_matches_reference(name, T):
    w13, w2 = weights(name)
    x, topk_weights, topk_ids = routed_inputs(name, T, seed=T)
    out = fused_moe(x, w13, w2, topk_weights, topk_ids)
    ref = fused_moe_ref(x, w13, w2, topk_weights, topk_ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-2, rel_err(out, ref)


@pytest.mark.parametrize("E,k,T", [(256, 8, 1), (256, 8, 37), (512, 10, 100), (256, 8, 512)])
@pytest.mark.parametrize("block_m", [16, 64])
def test_align_kernel_matches_torch_sort(E, k, T, block_m):
    # Several chunks of the one-program kernel, atomics contending on one crowded expert, and the
    # barrier between the fill and the scatter.
    ids = torch.rand(T, E, device="cuda").topk(k, dim=-1).indices.int()
    ids[: T // 2, 0] = 3  # one crowded expert
    got = fmt.moe_align_triton(ids, E, block_m)
    ref = fmt.moe_align_torch(ids, E, block_m)
    check_alignment(ids, *got, block_m, num_experts=E)
    assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])


@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("path", ["gemv", "sorted"])
def test_both_paths_at_decode_sizes(path, T):
    """The table picks one path per size; check the other one too where either could be chosen."""
    name = "qwen3.5-35b-a3b"
    w13, w2 = weights(name)
    x, topk_weights, topk_ids = routed_inputs(name, T, seed=T)
    cfg = (
        fmt.MoeConfig(16, 8, 256, 8, 512, gemv=True)
        if path == "gemv"
        else fmt.MoeConfig(16, 32, 256, 32, 128)
    )
    out = fused_moe(x, w13, w2, topk_weights, topk_ids, config=cfg)
    assert rel_err(out, fused_moe_ref(x, w13, w2, topk_weights, topk_ids)) < 1e-2


def capture(fn):
    """Run ``fn`` once on a side stream (compiles, allocates), then capture it: ``(graph, its outputs)``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.parametrize(
    "name,T",
    [
        ("qwen3.5-35b-a3b", 1),  # GEMV path
        ("qwen3.5-35b-a3b", 8),  # sorted path, one-program alignment
        ("qwen3-next-80b", 64),
        ("qwen3-next-80b", 2048),  # M = 20480: the torch-op alignment, captured too
    ],
)
def test_cuda_graph_replay_follows_new_routing(name, T):
    w13, w2 = weights(name)
    x, topk_weights, topk_ids = routed_inputs(name, T, seed=0)
    graph, out = capture(lambda: fused_moe(x, w13, w2, topk_weights, topk_ids))
    for seed in (1, 2, 3):
        new_x, new_w, new_ids = routed_inputs(name, T, seed=seed)
        x.copy_(new_x)
        topk_weights.copy_(new_w)
        topk_ids.copy_(new_ids)
        out.fill_(float("nan"))
        graph.replay()
        ref = fused_moe_ref(new_x, w13, w2, new_w, new_ids)
        assert rel_err(out, ref) < 1e-2
        assert torch.equal(out, fused_moe(new_x, w13, w2, new_w, new_ids))  # deterministic


# --------------------------------------------------------------------------- router, folded shared expert


def router_inputs(name: str, T: int, seed: int):
    H, E, _, _ = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
    w_gate = (torch.randn(E, H, device="cuda", generator=g) * H**-0.5).bfloat16()
    w_shared_gate = (torch.randn(1, H, device="cuda", generator=g) * H**-0.5).bfloat16()
    return x, w_gate, w_shared_gate


def assert_same_routing(got, ref, x, w_gate, k: int) -> None:
    """Same experts per token and weights within 1e-5, except where the k-th and (k+1)-th logits are
    so close (< 1e-4) that the kernel's and cuBLAS's fp32 summation orders may pick differently."""
    (w, ids), (ref_w, ref_ids) = got, ref
    ids_s, order = ids[:, :k].sort(1)
    ref_s, ref_order = ref_ids[:, :k].sort(1)
    same = (ids_s == ref_s).all(1)
    top = (x.float() @ w_gate.float().t()).topk(k + 1, dim=1).values
    near_tie = (top[:, k - 1] - top[:, k]).abs() < 1e-4
    assert (same | near_tie).all(), f"{int((~same & ~near_tie).sum())} tokens routed differently"
    assert int((~same).sum()) <= max(1, len(same) // 100)
    torch.testing.assert_close(w[:, :k].gather(1, order)[same], ref_w[:, :k].gather(1, ref_order)[same],
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w[:, k:], ref_w[:, k:], rtol=1e-5, atol=1e-6)  # the shared slot, if any
    assert torch.equal(ids[:, k:], ref_ids[:, k:])


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("T", [1, 2, 7, 64, 65, 1000, 8192])
@pytest.mark.parametrize("name", list(SHAPES))
def test_router_matches_reference(name, T, shared):
    _, E, k, _ = SHAPES[name]
    x, w_gate, w_shared_gate = router_inputs(name, T, seed=T)
    w_sg = w_shared_gate if shared else None
    got = moe_router(x, w_gate, k, True, w_sg)
    assert got[0].shape == got[1].shape == (T, k + shared)
    assert_same_routing(got, moe_router_ref(x, w_gate, k, True, w_sg), x, w_gate, k)


@pytest.mark.parametrize("T", [1, 4, 8, 64])
def test_folded_shared_expert_matches_separate_shared_swiglu(T):
    """Expert E = the shared expert, slot k = its sigmoid gate: fused_moe == routed + gated shared."""
    name = "qwen3.5-35b-a3b"
    H, E, k, I = SHAPES[name]
    w13, w2 = weights(name)
    x, w_gate, w_shared_gate = router_inputs(name, T, seed=T)
    g = torch.Generator(device="cuda").manual_seed(1)
    shared13 = (torch.randn(1, 2 * I, H, device="cuda", generator=g) * H**-0.5).bfloat16()
    shared2 = (torch.randn(1, H, I, device="cuda", generator=g) * I**-0.5).bfloat16()
    w13f, w2f = torch.cat([w13, shared13]), torch.cat([w2, shared2])  # [E + 1, ...]
    topk_weights, topk_ids = moe_router(x, w_gate, k, True, w_shared_gate)  # [T, k + 1]
    out = fused_moe(x, w13f, w2f, topk_weights, topk_ids)
    routed = fused_moe_ref(x, w13, w2, topk_weights[:, :k], topk_ids[:, :k]).float()
    gu = x.float() @ shared13[0].float().t()
    shared = (torch.nn.functional.silu(gu[:, :I]) * gu[:, I:]) @ shared2[0].float().t()
    ref = routed + torch.sigmoid(x.float() @ w_shared_gate.float().t()) * shared
    assert rel_err(out, ref) < 1e-2, rel_err(out, ref)


@pytest.mark.parametrize("T", [1, 8, 64])
def test_router_and_folded_moe_replay_in_a_cuda_graph(T):
    """The router's counters reset themselves: replays with new inputs keep matching the references."""
    from deltaserve.ops.arrival import counters

    name = "qwen3.5-35b-a3b"
    _, _, k, _ = SHAPES[name]
    w13, w2 = weights(name)
    x, w_gate, w_shared_gate = router_inputs(name, T, seed=0)
    w13f, w2f = w13[: w13.shape[0] - 1], w2[: w2.shape[0] - 1]  # the last expert plays the shared one
    w_gate = w_gate[: w13f.shape[0] - 1]

    def block():
        tw, ti = moe_router(x, w_gate, k, True, w_shared_gate)
        return tw, ti, fused_moe(x, w13f, w2f, tw, ti)

    graph, (tw, ti, out) = capture(block)
    for seed in (1, 2, 3):
        x.copy_(router_inputs(name, T, seed=seed)[0])
        graph.replay()
        ref = moe_router_ref(x, w_gate, k, True, w_shared_gate)
        assert_same_routing((tw, ti), ref, x, w_gate, k)
        assert rel_err(out, fused_moe_ref(x, w13f, w2f, tw, ti)) < 1e-2
    torch.cuda.synchronize()
    assert not counters(x.device, 1).any()


def copy_bandwidth_gbs() -> float:
    """Measured device-to-device copy bandwidth (bytes read + written), the realistic ceiling."""
    import triton

    src = torch.empty(1 << 29, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / ms / 1e6


def bench_graph_us(fn) -> float:
    """Median time of one CUDA-graph replay of ``fn`` with L2 flushed between replays (cold weights)."""
    import triton

    graph, _ = capture(fn)
    return 1e3 * triton.testing.do_bench(graph.replay, warmup=20, rep=200, return_mode="median")


@pytest.mark.parametrize("name", list(SHAPES))
def test_bench_fused_moe(name):
    """Prints T, experts touched, weight bytes of those experts, time, GB/s and % of copy bandwidth."""
    H, E, k, I = SHAPES[name]
    w13, w2 = weights(name)
    bw = copy_bandwidth_gbs()
    expert_bytes = 3 * H * I * w13.element_size()
    print(f"\n{name} (H={H} E={E} k={k} I={I}); copy bandwidth {bw:.0f} GB/s")
    print(f"{'T':>6} {'touched':>8} {'MB':>8} {'us':>9} {'GB/s':>7} {'%copy':>6} {'TFLOP/s':>8} config")
    for T in T_LIST:
        x, topk_weights, topk_ids = routed_inputs(name, T, seed=T)
        us = bench_graph_us(lambda: fused_moe(x, w13, w2, topk_weights, topk_ids))  # noqa: B023
        touched = topk_ids.unique().numel()
        mb = touched * expert_bytes / 1e6
        tflops = 6 * T * k * H * I / us / 1e6
        cfg = fmt.pick_config(T * k, H, I)
        print(
            f"{T:>6} {touched:>8} {mb:>8.1f} {us:>9.1f} {mb / us * 1e3:>7.0f} "
            f"{100 * mb / us * 1e3 / bw:>5.0f}% {tflops:>8.1f} {cfg}"
        )


@pytest.mark.parametrize("T", [1, 16, 3000])
@pytest.mark.parametrize("shared", [True, False])
def test_route_logits_kernel_real_shapes(T, shared):
    """``--moe-router gemm``'s top-k launch at E=256, k=8 == the reference, from bf16 logits."""
    from deltaserve.ops.moe_router import moe_route_logits

    g = torch.Generator(device="cuda").manual_seed(T)
    logits = torch.randn(T, 256 + shared, device="cuda", generator=g).to(torch.bfloat16)
    got_w, got_ids = moe_route_logits(logits, 8, True, shared)
    want_w, want_ids = moe_route_logits(logits.cpu(), 8, True, shared)
    # bf16 logits tie exactly in about one row of five (8 of 256 normal samples, bf16's 8-bit mantissa),
    # and tied experts may come in either order or either of two tied experts may be chosen: the ids
    # must be k distinct experts whose logits are exactly the k largest, and the weights must agree.
    ids = got_ids.cpu().long()
    routed = ids[:, :8]
    assert ((routed >= 0) & (routed < 256)).all()
    assert (routed.sort(-1).values.diff(dim=-1) > 0).all(), "an expert chosen twice"
    chosen = logits.cpu().float().gather(1, routed).sort(-1, descending=True).values
    torch.testing.assert_close(chosen, logits.cpu().float()[:, :256].topk(8, -1).values, rtol=0, atol=0)
    if shared:
        assert (ids[:, 8] == 256).all() and (want_ids[:, 8] == 256).all()
    torch.testing.assert_close(got_w.cpu().sort(-1).values, want_w.sort(-1).values, rtol=1e-5, atol=1e-6)
