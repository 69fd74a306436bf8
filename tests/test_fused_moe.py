"""Routed-expert MoE on the CPU: routing and the reference against naive loops, and the Triton kernels
(under Triton's interpreter when there is no GPU) against the reference at small, odd shapes.

Every Triton workspace is handed out poisoned (NaN floats, plausible-looking ints) and the weights of
experts nobody routes to are NaN, so a kernel that reads an unwritten row or an untouched expert
shows up as a NaN or a wrong value, never as a lucky zero.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltaserve.ops import fused_moe_triton as fmt
from deltaserve.ops.fused_moe import fused_moe, fused_moe_ref
from deltaserve.ops.moe_router import moe_route, moe_router_ref
from tests.conftest import needs_triton

H, E = 64, 8
SMALL = fmt.MoeConfig(
    block_m=16, block_n1=32, block_k1=32, block_n2=32, block_k2=32, num_warps=4, num_stages=2
)
GEMV = fmt.MoeConfig(0, 32, 32, 32, 32, num_warps=4, gemv=True)


@pytest.fixture
def poisoned_workspaces(monkeypatch):
    """Every workspace the Triton path allocates starts as garbage: NaN floats, ints equal to 3."""

    def empty(*size, dtype, device):
        return torch.full(size, float("nan") if dtype.is_floating_point else 3, dtype=dtype, device=device)

    monkeypatch.setattr(fmt, "_empty", empty)


def make_weights(I: int, dtype: torch.dtype, device: str, seed: int = 0, E: int = E):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, generator=g) * H**-0.5
    w2 = torch.randn(E, H, I, generator=g) * I**-0.5
    return w13.to(device, dtype), w2.to(device, dtype)


def random_routing(T: int, k: int, seed: int = 1, E: int = E, never: tuple[int, ...] = ()):
    """Duplicate-free top-k ids over the experts not in ``never``, and positive weights."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    logits[:, list(never)] = -1e9
    weights, ids = moe_route(logits, k, renormalize=True)
    return weights, ids


def poison_experts(w13, w2, experts):
    for e in experts:
        w13[e] = float("nan")
        w2[e] = float("nan")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


# --------------------------------------------------------------------------- routing and reference


def naive_moe(x, w13, w2, topk_weights, topk_ids):
    """Token by token, slot by slot, fp64."""
    I = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            gu = w13[e].double() @ x[t].double()
            out[t] += float(topk_weights[t, j]) * (w2[e].double() @ (F.silu(gu[:I]) * gu[I:]))
    return out


@pytest.mark.parametrize("T,k", [(1, 2), (5, 3), (9, 1)])
def test_fused_moe_ref_matches_naive_loop(T, k):
    w13, w2 = make_weights(48, torch.float32, "cpu")
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(7))
    weights, ids = random_routing(T, k)
    out = fused_moe_ref(x, w13, w2, weights, ids)
    torch.testing.assert_close(out.double(), naive_moe(x, w13, w2, weights, ids), rtol=1e-5, atol=1e-5)


def test_cpu_dispatch_runs_the_reference(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the CPU path must not launch Triton")

    monkeypatch.setattr(fmt, "fused_moe_triton", boom)
    w13, w2 = make_weights(32, torch.float32, "cpu")
    x = torch.randn(3, H)
    weights, ids = random_routing(3, 2)
    assert torch.equal(fused_moe(x, w13, w2, weights, ids), fused_moe_ref(x, w13, w2, weights, ids))


def test_fused_moe_validates_shapes():
    w13, w2 = make_weights(32, torch.float32, "cpu")
    x = torch.randn(3, H)
    weights, ids = random_routing(3, 2)
    with pytest.raises(ValueError, match="w13 must be"):
        fused_moe(x, w13[:, :40], w2, weights, ids)
    with pytest.raises(ValueError, match="topk_ids and topk_weights"):
        fused_moe(x, w13, w2, weights[:2], ids[:2])
    with pytest.raises(ValueError, match="share a dtype"):
        fused_moe(x.bfloat16(), w13, w2, weights, ids)
    with pytest.raises(ValueError, match="int32 or int64"):
        fused_moe(x, w13, w2, weights, ids.float())


# --------------------------------------------------------------------------- alignment


def check_alignment(ids, sorted_ids, expert_ids, num_post, block_m: int, num_experts: int = E) -> None:
    """Each pair exactly once, inside a block of its expert, experts in order; padding is M."""
    flat = ids.reshape(-1).cpu().long()
    M = flat.numel()
    sorted_ids, expert_ids = sorted_ids.cpu().long(), expert_ids.cpu().long()
    total = int(num_post)
    counts = torch.bincount(flat, minlength=num_experts)
    assert total == int(((counts + block_m - 1) // block_m * block_m).sum())
    used = sorted_ids[:total]
    real = used[used < M]
    assert sorted(real.tolist()) == list(range(M))
    assert (used[used >= M] == M).all()
    blocks = torch.arange(total) // block_m
    assert (flat[real] == expert_ids[blocks[used < M]]).all()
    assert (expert_ids[total // block_m :] == -1).all()
    assert (expert_ids[: total // block_m] >= 0).all()
    assert (expert_ids[: total // block_m].diff() >= 0).all()


@needs_triton
@pytest.mark.parametrize("block_m", [16, 32])
@pytest.mark.parametrize("T,k", [(1, 2), (3, 3), (17, 3), (40, 2)])
def test_align_triton_matches_torch(T, k, block_m, kernel_device, poisoned_workspaces):
    _, ids = random_routing(T, k, seed=T)
    ids = ids.to(kernel_device)
    got = fmt.moe_align_triton(ids, E, block_m)
    ref = fmt.moe_align_torch(ids, E, block_m)
    check_alignment(ids, *got, block_m)
    check_alignment(ids, *ref, block_m)
    # Block layout and length are determined; the order inside a segment is not (GPU atomics).
    assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])


@needs_triton
def test_align_all_pairs_on_one_expert(kernel_device, poisoned_workspaces):
    ids = torch.full((37, 1), 5, dtype=torch.int32, device=kernel_device)  # 3 blocks of expert 5
    got = fmt.moe_align_triton(ids, E, 16)
    check_alignment(ids, *got, 16)
    assert got[1][:3].tolist() == [5, 5, 5]


# --------------------------------------------------------------------------- Triton vs reference


def run_triton_vs_ref(T, k, I, dtype, device, ids=None, never=(), config=SMALL, seed=0):
    w13, w2 = make_weights(I, torch.float32, "cpu", seed=seed)
    poison_experts(w13, w2, never)  # never routed to: a read would poison the output
    w13, w2 = w13.to(device, dtype), w2.to(device, dtype)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    weights, rand_ids = random_routing(T, k, seed=seed + 2, never=never)
    ids = rand_ids if ids is None else ids
    weights, ids = weights.to(device), ids.to(device)
    out = fused_moe(x, w13, w2, weights, ids, force_triton=True, config=config)
    ref = fused_moe_ref(x.cpu().float(), w13.cpu().float(), w2.cpu().float(), weights.cpu(), ids.cpu())
    assert out.shape == (T, H) and out.dtype == dtype
    assert torch.isfinite(out).all()
    return rel_err(out.cpu(), ref)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("I", [32, 48])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("T", [1, 3, 17])
def test_fused_moe_triton_matches_reference(T, k, I, dtype, kernel_device, poisoned_workspaces):
    # Experts 0 and 6 are never hit and hold NaN weights; I = 48 exercises the N and K masks.
    err = run_triton_vs_ref(T, k, I, dtype, kernel_device, never=(0, 6), seed=T + k)
    assert err < (1e-4 if dtype == torch.float32 else 1e-2), err


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("I,k", [(32, 2), (48, 3)])
@pytest.mark.parametrize("T", [1, 3, 5])  # the table uses it for T·k <= 40 only
def test_gemv_path_matches_reference(T, I, k, dtype, kernel_device, poisoned_workspaces):
    err = run_triton_vs_ref(T, k, I, dtype, kernel_device, never=(1, 3), seed=T + k, config=GEMV)
    assert err < (1e-4 if dtype == torch.float32 else 1e-2), err


@needs_triton
@pytest.mark.parametrize("T,I,k", [(1, 32, 2), (3, 64, 3)])
def test_gemv_preload_variant_gives_the_same_bits(T, I, k, kernel_device, poisoned_workspaces, monkeypatch):
    """``--pdl-preload``'s w2 variant (ids, weights and the first weight chunk read before the PDL wait,
    run here without PDL; I = 64 has a second chunk) sums in the same order: bit-identical output."""
    from deltaserve.ops import pdl

    outs = []
    for preload in (False, True):
        monkeypatch.setattr(pdl, "_preload", preload)
        w13, w2 = make_weights(I, torch.float32, "cpu", seed=3)
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(4))
        weights, ids = random_routing(T, k, seed=5)
        dev = [t.to(kernel_device) for t in (x, w13, w2, weights, ids)]
        outs.append(fused_moe(*dev, force_triton=True, config=GEMV))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_tokens_on_one_expert(dtype, kernel_device, poisoned_workspaces):
    # Expert 5 takes slot 0 of all 17 tokens (two M-blocks); the other slot is spread over the rest.
    T = 17
    second = torch.arange(T) % 7
    second[second == 5] = 7  # keep rows duplicate-free
    ids = torch.stack([torch.full((T,), 5), second], 1).int()
    err = run_triton_vs_ref(T, 2, 48, dtype, kernel_device, ids=ids)
    assert err < (1e-4 if dtype == torch.float32 else 1e-2), err


@needs_triton
@pytest.mark.parametrize(
    "config",
    [
        fmt.MoeConfig(32, 16, 64, 64, 16, 4, 2),  # BLOCK_M 32, one K tile over H
        fmt.MoeConfig(64, 64, 16, 16, 64, 4, 2),  # BLOCK_M 64, BLOCK_K2 > I
        None,  # the default table (prefill-sized tiles would not fit these shapes exactly)
    ],
)
def test_other_tiles(config, kernel_device, poisoned_workspaces):
    assert run_triton_vs_ref(17, 3, 48, torch.float32, kernel_device, never=(2,), config=config) < 1e-4


@needs_triton
def test_torch_alignment_path(monkeypatch, kernel_device, poisoned_workspaces):
    """Prefill-sized M switches the alignment to torch ops; force that switch at a small M."""
    monkeypatch.setattr(fmt, "ALIGN_TRITON_MAX_PAIRS", 0)
    assert run_triton_vs_ref(17, 3, 48, torch.float32, kernel_device, never=(4,)) < 1e-4


def swiglu_ref(x, w13_e, w2_e):
    """One expert (or the shared expert) in fp64: ``down(silu(gate x) · up x)``."""
    I = w2_e.shape[1]
    gu = x.double() @ w13_e.double().t()
    return (F.silu(gu[:, :I]) * gu[:, I:]) @ w2_e.double().t()


@needs_triton
@pytest.mark.parametrize("config", [GEMV, SMALL, "reference"], ids=["gemv", "sorted", "reference"])
@pytest.mark.parametrize("T", [1, 5])
def test_folded_shared_expert_is_routed_plus_gated_shared(T, config, kernel_device, poisoned_workspaces):
    """Expert E holds the shared expert and every token's slot k routes to it with weight sigmoid(x·g):
    one fused_moe call computes routed + sigmoid(x·g) · shared(x) (the HF block)."""
    k = 2
    w13, w2 = make_weights(32, torch.float32, "cpu", seed=T, E=E + 1)
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, H, generator=g)
    w_gate, w_shared_gate = torch.randn(E, H, generator=g) * 0.3, torch.randn(1, H, generator=g) * 0.3
    weights, ids = moe_router_ref(x, w_gate, k, True, w_shared_gate)  # [T, k + 1]
    assert (ids[:, k] == E).all()
    routed = naive_moe(x, w13[:E], w2[:E], weights[:, :k], ids[:, :k])
    shared = torch.sigmoid(x.double() @ w_shared_gate.double().t()) * swiglu_ref(x, w13[E], w2[E])
    if config == "reference":
        out = fused_moe(x, w13, w2, weights, ids)
    else:
        dev = kernel_device
        out = fused_moe(x.to(dev), w13.to(dev), w2.to(dev), weights.to(dev), ids.to(dev), force_triton=True,
                        config=config)
    assert rel_err(out.cpu(), routed + shared) < 1e-5


@needs_triton
def test_int64_ids_and_empty_batch(kernel_device):
    w13, w2 = make_weights(32, torch.float32, kernel_device)
    x = torch.randn(3, H, device=kernel_device)
    weights, ids = random_routing(3, 2)
    weights, ids = weights.to(kernel_device), ids.to(kernel_device)
    out = fused_moe(x, w13, w2, weights, ids.long(), force_triton=True, config=SMALL)
    assert rel_err(out.cpu(), fused_moe_ref(x.cpu(), w13.cpu(), w2.cpu(), weights.cpu(), ids.cpu())) < 1e-4
    empty = fused_moe(x[:0], w13, w2, weights[:0], ids[:0], force_triton=True)
    assert empty.shape == (0, H)


def test_padded_sizes_bound_the_worst_routing():
    # T = 1: every pair its own block; many tokens: each hit expert wastes < BLOCK_M slots.
    assert fmt.padded_sizes(8, 256, 16) == (128, 8)
    assert fmt.padded_sizes(4096, 256, 64) == (20224, 316)  # 4096 + 256 · 63 = 316 · 64
