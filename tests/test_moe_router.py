"""MoE routing: the reference against per-row loops, and the one-launch Triton router (under Triton's
interpreter when there is no GPU) against the reference at small, odd shapes.

The router's workspaces and outputs are handed out poisoned (NaN floats, ints equal to 3), so a
partial logit that is read before it is written, or an output slot left unwritten, shows up.
"""

from __future__ import annotations

import pytest
import torch

from deltaserve.ops import moe_router as mr
from deltaserve.ops.arrival import counters
from deltaserve.ops.moe_router import RouterConfig, moe_route, moe_router, moe_router_ref
from tests.conftest import needs_triton

H = 48  # not a multiple of the K tiles below: exercises the masks


@pytest.fixture
def poisoned_workspaces(monkeypatch):
    def empty(*size, dtype, device):
        return torch.full(size, float("nan") if dtype.is_floating_point else 3, dtype=dtype, device=device)

    monkeypatch.setattr(mr, "_empty", empty)


def gate_weights(E: int, shared: bool, seed: int = 0, dtype=torch.float32):
    """Random gate weights; random logits are tie-free (with probability 1), so ids compare exactly."""
    g = torch.Generator().manual_seed(seed)
    w_gate = (torch.randn(E, H, generator=g) * 0.3).to(dtype)
    w_shared = (torch.randn(1, H, generator=g) * 0.3).to(dtype) if shared else None
    return w_gate, w_shared


# --------------------------------------------------------------------------- reference


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("logit_dtype", [torch.float32, torch.bfloat16])
def test_moe_route_matches_per_row_sort(renormalize, logit_dtype):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(13, 10, generator=g).to(logit_dtype)
    weights, ids = moe_route(logits, 3, renormalize)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    for t in range(13):
        p = torch.exp(logits[t].double()) / torch.exp(logits[t].double()).sum()  # fp64 softmax
        order = sorted(range(10), key=lambda e: -p[e].item())[:3]
        expect = p[order] / (p[order].sum() if renormalize else 1.0)
        assert ids[t].tolist() == order
        torch.testing.assert_close(weights[t].double(), expect, rtol=1e-5, atol=1e-7)


def test_moe_route_ties_follow_torch_topk():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])
    weights, ids = moe_route(logits, 2, renormalize=False)
    expect = torch.topk(torch.softmax(logits, -1), 2, dim=-1)
    assert ids.tolist() == expect.indices.tolist()
    torch.testing.assert_close(weights, expect.values)


def test_router_validates_inputs():
    w_gate, w_shared = gate_weights(8, shared=True)
    x = torch.randn(3, H)
    with pytest.raises(ValueError, match="top_k"):
        moe_route(torch.randn(2, 4), 5, True)
    with pytest.raises(ValueError, match="top_k must be in"):
        moe_router(x, w_gate, 9, True)
    with pytest.raises(ValueError, match=r"w_gate must be \[E, H=48\]"):
        moe_router(x, w_gate[:, :40], 2, True)
    with pytest.raises(ValueError, match=r"w_shared_gate must be \[1, H=48\]"):
        moe_router(x, w_gate, 2, True, w_shared.t())
    with pytest.raises(ValueError, match="share a dtype"):
        moe_router(x.bfloat16(), w_gate, 2, True)


def test_router_ref_appends_the_shared_slot():
    w_gate, w_shared = gate_weights(8, shared=True)
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(1))
    weights, ids = moe_router_ref(x, w_gate, 3, True, w_shared)
    routed_w, routed_ids = moe_route(x @ w_gate.t(), 3, True)
    assert weights.shape == ids.shape == (5, 4)
    assert torch.equal(ids[:, :3], routed_ids) and (ids[:, 3] == 8).all()
    torch.testing.assert_close(weights[:, :3], routed_w)
    torch.testing.assert_close(weights[:, 3], torch.sigmoid(x @ w_shared[0]))


# --------------------------------------------------------------------------- Triton vs reference


def check_router(T, E, k, renormalize, shared, device, config=None, dtype=torch.float32, seed=0):
    w_gate, w_shared = gate_weights(E, shared, seed, dtype)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    ref_w, ref_ids = moe_router_ref(x, w_gate, k, renormalize, w_shared)
    args = [t.to(device) if t is not None else None for t in (x, w_gate, w_shared)]
    weights, ids = moe_router(args[0], args[1], k, renormalize, args[2], force_triton=True, config=config)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.shape == ids.shape == (T, k + shared)
    assert torch.equal(ids.cpu(), ref_ids)
    torch.testing.assert_close(weights.cpu(), ref_w, rtol=1e-5, atol=1e-6)
    return weights, ids


@needs_triton
@pytest.mark.parametrize("E,k", [(8, 1), (8, 2), (8, 8), (64, 1), (64, 2), (64, 8)])
@pytest.mark.parametrize("T", [1, 3, 17])
def test_router_matches_reference(T, E, k, kernel_device, poisoned_workspaces):
    # Each shape once with and once without renormalisation and the shared slot, crosswise.
    for renormalize, shared in [(True, True), (False, False)] if T != 3 else [(True, False), (False, True)]:
        check_router(T, E, k, renormalize, shared, kernel_device, seed=T + E + k)


@needs_triton
@pytest.mark.parametrize(
    "config",
    [
        RouterConfig(block_t=16, block_e=16, block_k=16, split_k=3),  # 3 H slices, partials summed
        RouterConfig(block_t=16, block_e=32, block_k=32, split_k=2, num_warps=2),
        RouterConfig(block_t=16, block_e=64, block_k=16, split=False),  # one program per token block
        RouterConfig(block_t=32, block_e=16, block_k=64, split=False),  # several expert blocks in-program
    ],
)
def test_router_other_tiles(config, kernel_device, poisoned_workspaces):
    check_router(19, 64, 8, True, True, kernel_device, config=config)


@needs_triton
@pytest.mark.parametrize("T", [70, 1030])
def test_router_table_configs_in_bf16(T, kernel_device, poisoned_workspaces):
    """The larger-T rows of the table (split 32-token blocks; one program per token block past 1024),
    with bf16 inputs, which accumulate in fp32."""
    assert mr.pick_router_config(T, 64, H).split == (T <= 1024)
    check_router(T, 64, 8, True, True, kernel_device, dtype=torch.bfloat16)


@needs_triton
def test_router_counters_reset_between_launches(kernel_device):
    """The split path's last program zeroes its counter: a second launch (new inputs) is right too."""
    check_router(17, 64, 2, True, True, kernel_device, seed=1)
    assert not counters(kernel_device, 1).any()
    check_router(17, 64, 2, True, True, kernel_device, seed=2)


@needs_triton
def test_router_ties_go_to_the_lowest_index(kernel_device):
    # Experts 2, 5 and 6 have the same gate row, so the same logit, the largest of the row.
    w_gate = torch.randn(8, H, generator=torch.Generator().manual_seed(3)) * 0.1
    w_gate[[5, 6]] = w_gate[2] = w_gate[2].abs()
    x = torch.ones(1, H, device=kernel_device)
    weights, ids = moe_router(x, w_gate.to(kernel_device), 2, False, force_triton=True)
    assert ids.tolist() == [[2, 5]]
    assert weights[0, 0] == weights[0, 1]


@needs_triton
def test_router_empty_batch(kernel_device):
    w_gate, w_shared = gate_weights(8, shared=True)
    weights, ids = moe_router(torch.empty(0, H, device=kernel_device), w_gate.to(kernel_device), 2, True,
                              w_shared.to(kernel_device), force_triton=True)
    assert weights.shape == ids.shape == (0, 3)


# --------------------------------------------------------------------------- the two-launch router


@needs_triton
@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize("E,k", [(8, 1), (8, 2), (64, 8)])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_logits_kernel_matches_reference(kernel_device, poisoned_workspaces, T, E, k, shared, renormalize):
    """The per-token top-k launch of ``--moe-router gemm`` == ``moe_route`` + the shared slot."""
    g = torch.Generator().manual_seed(T * 100 + E + k)
    logits = torch.randn(T, E + shared, generator=g).to(kernel_device)
    got_w, got_ids = mr.moe_route_logits(logits, k, renormalize, shared, force_triton=True)
    want_w, want_ids = mr.moe_route_logits(logits.cpu(), k, renormalize, shared)  # the reference path
    assert got_ids.cpu().tolist() == want_ids.tolist()
    torch.testing.assert_close(got_w.cpu(), want_w, rtol=1e-5, atol=1e-6)
    if shared:
        assert (got_ids[:, k] == E).all()
        torch.testing.assert_close(got_w[:, k].cpu(), torch.sigmoid(logits[:, E].cpu()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shared", [True, False])
def test_route_logits_reference_equals_the_fused_router_reference(shared):
    """Logits from ``[w_gate; w_shared_gate]`` through ``moe_route_logits`` == ``moe_router_ref``."""
    w_gate, w_shared = gate_weights(16, shared)
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(1))
    w = torch.cat([w_gate, w_shared]) if shared else w_gate
    got = mr.moe_route_logits(x @ w.t(), 4, True, shared)
    want = moe_router_ref(x, w_gate, 4, True, w_shared)
    assert got[1].tolist() == want[1].tolist()
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-7)


def test_route_logits_rejects_bad_input():
    with pytest.raises(ValueError, match="top_k must be in"):
        mr.moe_route_logits(torch.zeros(2, 5), 5, True, True)  # E = 4 with the shared column
    with pytest.raises(ValueError, match="logits must be"):
        mr.moe_route_logits(torch.zeros(5), 1, True, False)
