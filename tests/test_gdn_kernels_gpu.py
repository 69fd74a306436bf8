"""GDN kernels against their references at the real Qwen3.5 / Qwen3-Next shapes (GPU only).

Hk=16, Hv in {32, 64}, Dk=Dv=128, W=4, conv_dim = 2*16*128 + Hv*128; bf16 activations with fp32
and bf16 state pools; decode batches {1, 7, 16, 64}; prefill lengths {1, 63, 64, 65, 300}.
"""

from __future__ import annotations

import pytest
import torch

from deltaserve.ops.causal_conv1d import causal_conv1d_ref, causal_conv1d_update_ref
from deltaserve.ops.gated_delta_rule import gdn_decode_ref

pytestmark = pytest.mark.gpu

HK, DK, DV, W = 16, 128, 128, 4
BF16, I32 = torch.bfloat16, torch.int32
DEV = "cuda"


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max error relative to the largest expected magnitude (NaN anywhere fails)."""
    assert actual.shape == expected.shape
    a, e = actual.float(), expected.float()
    assert not a.isnan().any(), "NaN in the kernel's result"
    return (a - e).abs().max().item() / max(e.abs().max().item(), 1e-6)


def rms_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """RMS error relative to the RMS of the expected values (fla-core's test metric)."""
    a, e = actual.float(), expected.float()
    assert not a.isnan().any(), "NaN in the kernel's result"
    return ((a - e).pow(2).mean().sqrt() / e.pow(2).mean().sqrt().clamp_min(1e-6)).item()


def gates(T: int, Hv: int):
    a, b = torch.randn(T, Hv, device=DEV, dtype=BF16), torch.randn(T, Hv, device=DEV, dtype=BF16)
    A_log = torch.empty(Hv, device=DEV).uniform_(-1.0, 0.5)
    dt_bias = 0.5 * torch.randn(Hv, device=DEV)
    return a, b, A_log, dt_bias


def scattered_slots(n: int) -> tuple[torch.Tensor, int]:
    """n distinct slots, out of order, with gaps; and the pool size they need."""
    slots = torch.randperm(2 * n + 3)[:n]
    return slots.to(DEV, I32), 2 * n + 3


def conv_prefill_ref(x, w, cu, ctx, states, idx):
    """causal_conv1d_ref on CPU copies (its ring write mixes CPU and CUDA tensors); states copied back."""
    cpu_states = states.cpu()
    out = causal_conv1d_ref(x.cpu(), w.cpu(), cu.cpu(), ctx.cpu(), cpu_states, idx.cpu())
    states.copy_(cpu_states)
    return out.to(x.device)


def unfused_step(x, a, b, w, conv, ssm, slots, pos, A_log, dt_bias):
    B, Hv = a.shape
    y = causal_conv1d_update_ref(x, w, conv, slots, pos)
    q, k, v = y.split([HK * DK, HK * DK, Hv * DV], dim=-1)
    return gdn_decode_ref(q.view(B, HK, DK), k.view(B, HK, DK), v.view(B, Hv, DV), a, b, A_log, dt_bias, ssm, slots)


# ------------------------------------------------------------------------------------------- conv


@pytest.mark.parametrize("Hv", [32, 64])
@pytest.mark.parametrize("state_dtype", [BF16, torch.float32])
def test_conv_prefill_real_shapes(Hv, state_dtype):
    from deltaserve.ops.conv1d_triton import causal_conv1d_prefill

    torch.manual_seed(0)
    D = 2 * HK * DK + Hv * DV
    lens, ctx = [1, 63, 64, 65, 300], [0, 5, 0, 2, 130]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=I32, device=DEV)
    x = torch.randn(int(cu[-1]), D, device=DEV, dtype=BF16)
    w = torch.randn(D, W, device=DEV, dtype=BF16)
    slots, S = scattered_slots(len(lens))
    states = torch.randn(S, W, D, device=DEV).to(state_dtype)
    ref_states = states.clone()
    ctx_t = torch.tensor(ctx, dtype=I32, device=DEV)
    out = causal_conv1d_prefill(x, w, cu, ctx_t, states, slots)
    ref = conv_prefill_ref(x, w, cu, ctx_t, ref_states, slots)
    assert max_err(out, ref) < 1e-2
    assert torch.equal(states, ref_states)


@pytest.mark.parametrize("Hv", [32, 64])
@pytest.mark.parametrize("B", [1, 7, 16, 64])
def test_conv_update_real_shapes(Hv, B):
    from deltaserve.ops.conv1d_triton import causal_conv1d_update

    torch.manual_seed(1)
    D = 2 * HK * DK + Hv * DV
    w = torch.randn(D, W, device=DEV, dtype=BF16)
    slots, S = scattered_slots(B)
    states = torch.randn(S, W, D, device=DEV, dtype=BF16)
    ref_states = states.clone()
    pos = torch.randint(0, 50, (B,), device=DEV)
    for s in range(W + 2):  # wraps the ring
        x = torch.randn(B, D, device=DEV, dtype=BF16)
        out = causal_conv1d_update(x, w, states, slots, pos + s)
        assert max_err(out, causal_conv1d_update_ref(x, w, ref_states, slots, pos + s)) < 1e-2
        assert torch.equal(states, ref_states)


# ----------------------------------------------------------------------------------------- decode


@pytest.mark.parametrize("Hv", [32, 64])
@pytest.mark.parametrize("B", [1, 7, 16, 64])
@pytest.mark.parametrize("state_dtype", [torch.float32, BF16])
def test_gdn_decode_real_shapes(Hv, B, state_dtype):
    from deltaserve.ops.gdn_decode import gdn_decode

    torch.manual_seed(2)
    q = torch.randn(B, HK, DK, device=DEV, dtype=BF16)
    k = torch.randn(B, HK, DK, device=DEV, dtype=BF16)
    v = torch.randn(B, Hv, DV, device=DEV, dtype=BF16)
    a, b, A_log, dt_bias = gates(B, Hv)
    slots, S = scattered_slots(B)
    pool = torch.randn(S, Hv, DK, DV, device=DEV).to(state_dtype)
    ref_pool = pool.clone()
    o = gdn_decode(q, k, v, a, b, A_log, dt_bias, pool, slots)
    ref = gdn_decode_ref(q, k, v, a, b, A_log, dt_bias, ref_pool, slots)
    assert o.dtype == BF16
    assert max_err(o, ref) < 1e-2
    assert max_err(pool, ref_pool) < (1e-5 if state_dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("Hv", [32, 64])
@pytest.mark.parametrize("B", [1, 7, 16, 64])
@pytest.mark.parametrize("state_dtype", [torch.float32, BF16])
def test_gdn_decode_fused_real_shapes(Hv, B, state_dtype):
    """W+2 steps (the ring wraps) with two padded rows sharing scratch slot 0 (CUDA-graph padding)."""
    from deltaserve.ops.gdn_decode import gdn_decode_fused

    torch.manual_seed(3)
    D = 2 * HK * DK + Hv * DV
    w = torch.randn(D, W, device=DEV, dtype=BF16)
    _, _, A_log, dt_bias = gates(1, Hv)
    slots, S = scattered_slots(B)
    slots = torch.cat([slots + 1, slots.new_zeros(2)])  # real slots >= 1, padding on slot 0
    conv = torch.randn(S + 1, W, D, device=DEV, dtype=BF16)
    ssm = torch.randn(S + 1, Hv, DK, DV, device=DEV).to(state_dtype)
    ref_conv, ref_ssm = conv.clone(), ssm.clone()
    pos = torch.cat([torch.randint(0, 3, (B,), device=DEV), torch.zeros(2, dtype=torch.int64, device=DEV)])
    for s in range(W + 2):
        x = torch.randn(B + 2, D, device=DEV, dtype=BF16)
        a, b, _, _ = gates(B + 2, Hv)
        o = gdn_decode_fused(x, a, b, w, conv, ssm, slots, pos + s, A_log, dt_bias, HK, DK, DV)
        ref = unfused_step(x[:B], a[:B], b[:B], w, ref_conv, ref_ssm, slots[:B], pos[:B] + s, A_log, dt_bias)
        assert max_err(o[:B], ref) < 2e-2
        assert torch.equal(conv[1:], ref_conv[1:])
        # fp32 states: the fused and unfused conv outputs are both rounded to bf16 and may differ by an
        # ulp (summation order, FMA), which moves a state element by ~1e-4 of the state's scale.
        assert max_err(ssm[1:], ref_ssm[1:]) < (1e-3 if state_dtype == torch.float32 else 2e-2)


def test_tuned_fused_decode_replays_in_a_cuda_graph():
    """Tuning happens before capture; the captured launch then matches the reference every replay."""
    from deltaserve.ops.gdn_decode import gdn_decode_fused, tune_gdn_decode_fused

    torch.manual_seed(4)
    Hv, B = 32, 16
    chosen = tune_gdn_decode_fused([1, B], HK, Hv, DK, DV, W, torch.float32)
    assert set(chosen) == {1, B}
    D = 2 * HK * DK + Hv * DV
    w = torch.randn(D, W, device=DEV, dtype=BF16)
    _, _, A_log, dt_bias = gates(1, Hv)
    slots, S = scattered_slots(B)
    conv = torch.randn(S, W, D, device=DEV, dtype=BF16)
    ssm = torch.randn(S, Hv, DK, DV, device=DEV)
    x = torch.randn(B, D, device=DEV, dtype=BF16)
    a, b, _, _ = gates(B, Hv)
    pos = torch.randint(3, 40, (B,), device=DEV)
    gdn_decode_fused(x, a, b, w, conv.clone(), ssm.clone(), slots, pos, A_log, dt_bias, HK, DK, DV)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o = gdn_decode_fused(x, a, b, w, conv, ssm, slots, pos, A_log, dt_bias, HK, DK, DV)
    # Capture does not run the kernel: the pools are still the pre-step states.
    ref_conv, ref_ssm = conv.clone(), ssm.clone()
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        a.copy_(torch.randn_like(a))
        pos += 1
        graph.replay()
        ref = unfused_step(x, a, b, w, ref_conv, ref_ssm, slots, pos, A_log, dt_bias)
        assert max_err(o, ref) < 2e-2
        assert torch.equal(conv, ref_conv)
        assert max_err(ssm, ref_ssm) < 1e-3


# ---------------------------------------------------------------------------------------- prefill


def prefill_inputs(lens: list[int], Hv: int, state_dtype: torch.dtype):
    T = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=I32, device=DEV)
    q = torch.randn(T, HK, DK, device=DEV, dtype=BF16)
    k = torch.randn(T, HK, DK, device=DEV, dtype=BF16)
    v = torch.randn(T, Hv, DV, device=DEV, dtype=BF16)
    a, b, A_log, dt_bias = gates(T, Hv)
    slots, S = scattered_slots(len(lens))
    pool = (0.1 * torch.randn(S, Hv, DK, DV, device=DEV)).to(state_dtype)
    return q, k, v, a, b, A_log, dt_bias, pool, slots, cu


@pytest.mark.parametrize("Hv", [32, 64])
@pytest.mark.parametrize("state_dtype", [torch.float32, BF16])
def test_gdn_prefill_matches_ref(Hv, state_dtype):
    from deltaserve.ops.gdn_prefill import gdn_prefill, gdn_prefill_ref

    torch.manual_seed(5)
    lens = [1, 63, 64, 65, 300]
    q, k, v, a, b, A_log, dt_bias, pool, slots, cu = prefill_inputs(lens, Hv, state_dtype)
    has_init = torch.tensor([True, False, True, True, False], device=DEV)
    pool[slots[~has_init].long()] = float("nan")  # slots without an initial state are never read
    ref_pool = pool.clone()
    o = gdn_prefill(q, k, v, a, b, A_log, dt_bias, pool, slots, has_init, cu)
    ref = gdn_prefill_ref(q, k, v, a, b, A_log, dt_bias, ref_pool, slots, has_init, cu)
    assert rms_err(o, ref) < 1e-2
    assert rms_err(pool[slots.long()], ref_pool[slots.long()]) < 1e-2
    untouched = torch.ones(pool.shape[0], dtype=torch.bool, device=DEV)
    untouched[slots.long()] = False
    assert torch.equal(pool[untouched], ref_pool[untouched])


@pytest.mark.parametrize("state_dtype", [torch.float32, BF16])
def test_decode_after_prefill_chain(state_dtype):
    """conv prefill + GDN prefill on prompts, then fused decode steps == the reference chain."""
    from deltaserve.ops.conv1d_triton import causal_conv1d_prefill
    from deltaserve.ops.gdn_decode import gdn_decode_fused
    from deltaserve.ops.gdn_prefill import gdn_prefill, gdn_prefill_ref

    torch.manual_seed(6)
    Hv, lens, steps = 32, [5, 70, 1], 6
    D = 2 * HK * DK + Hv * DV
    N, T = len(lens), sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=I32, device=DEV)
    w = torch.randn(D, W, device=DEV, dtype=BF16)
    a, b, A_log, dt_bias = gates(T + steps * N, Hv)
    slots, S = scattered_slots(N)
    conv = torch.randn(S, W, D, device=DEV, dtype=BF16)
    ssm = torch.randn(S, Hv, DK, DV, device=DEV).to(state_dtype)
    ref_conv, ref_ssm = conv.clone(), ssm.clone()
    x = torch.randn(T, D, device=DEV, dtype=BF16)
    zeros, fresh = torch.zeros(N, dtype=I32, device=DEV), torch.zeros(N, dtype=torch.bool, device=DEV)

    def split(y):
        q, k, v = y.split([HK * DK, HK * DK, Hv * DV], dim=-1)
        return q.reshape(-1, HK, DK), k.reshape(-1, HK, DK), v.reshape(-1, Hv, DV)

    y = causal_conv1d_prefill(x, w, cu, zeros, conv, slots)
    o = gdn_prefill(*split(y), a[:T], b[:T], A_log, dt_bias, ssm, slots, fresh, cu)
    y_ref = conv_prefill_ref(x, w, cu, zeros, ref_conv, slots)
    o_ref = gdn_prefill_ref(*split(y_ref), a[:T], b[:T], A_log, dt_bias, ref_ssm, slots, fresh, cu)
    assert rms_err(o, o_ref) < 1e-2
    pos = torch.tensor(lens, device=DEV)
    for s in range(steps):
        xs = torch.randn(N, D, device=DEV, dtype=BF16)
        rows = slice(T + s * N, T + (s + 1) * N)
        o = gdn_decode_fused(xs, a[rows], b[rows], w, conv, ssm, slots, pos + s, A_log, dt_bias, HK, DK, DV)
        ref = unfused_step(xs, a[rows], b[rows], w, ref_conv, ref_ssm, slots, pos + s, A_log, dt_bias)
        assert rms_err(o, ref) < 2e-2
    assert torch.equal(conv, ref_conv)
    assert rms_err(ssm, ref_ssm) < 2e-2
