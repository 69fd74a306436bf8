"""The short-prefill recurrent GDN kernel against gdn_prefill_ref, and the layer's dispatch to it.

Small shapes under Triton's CPU interpreter (each token of each program is a serial step there, ~20 ms,
so the cases are picked to cover lengths {1, 3, 15, 64, 65}, GVA ratios 1/2/4, fp32 and bf16 pools,
several value blocks and masked head dims without repeating one another); the real 35B-A3B shape,
and the comparison with fla-core's chunked kernel, run on the GPU only.
"""

from __future__ import annotations

from dataclasses import fields
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

import deltaserve.layers.gdn as gdn_layer  # noqa: E402
from deltaserve.forward_context import PrefillView  # noqa: E402
from deltaserve.ops.gdn_prefill import gdn_prefill_ref  # noqa: E402
from deltaserve.ops.gdn_prefill_recurrent import gdn_prefill_recurrent  # noqa: E402
from tests.test_gdn_kernels import close, gates, poison, tol_for  # noqa: E402, F401 (poison: a fixture)

I32 = torch.int32


def offsets(lens: list[int], device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=I32, device=device)


def run_both(lens, has_init, Hk, Hv, Dk, Dv, state_dtype, device):
    """Kernel and reference on the same inputs; slots are scattered, fresh sequences' slots hold NaN."""
    T, n = sum(lens), len(lens)
    q, k, v = torch.randn(T, Hk, Dk, device=device), torch.randn(T, Hk, Dk, device=device), torch.randn(
        T, Hv, Dv, device=device)
    a, b, A_log, dt_bias = gates(T, Hv, device)
    slots = torch.randperm(2 * n + 1)[:n].to(device, I32)
    pool = torch.randn(2 * n + 1, Hv, Dk, Dv, device=device).to(state_dtype)
    init = torch.tensor(has_init, device=device)
    pool[slots[~init].long()] = float("nan")  # never read: the sequence starts from zeros
    ref_pool = pool.clone()
    cu = offsets(lens, device)
    o = gdn_prefill_recurrent(q, k, v, a, b, A_log, dt_bias, pool, slots, init, cu)
    ref = gdn_prefill_ref(q, k, v, a, b, A_log, dt_bias, ref_pool, slots, init, cu)
    return o, ref, pool, ref_pool, slots


@pytest.mark.parametrize(
    "lens,has_init,Hk,Hv,Dk,Dv,state_dtype",
    [
        ([1, 3, 15, 64, 65], [True, False, True, False, True], 2, 2, 16, 16, torch.float32),  # ratio 1
        ([3, 65, 15], [False, True, True], 1, 2, 16, 16, torch.bfloat16),  # ratio 2, bf16 pool
        ([1, 15], [True, False], 1, 4, 16, 32, torch.float32),  # ratio 4, two value blocks
        ([64], [False], 2, 4, 16, 16, torch.bfloat16),  # one sequence, no state, ratio 2
        ([3, 1], [True, True], 1, 2, 24, 20, torch.float32),  # head dims that need masks
    ],
)
@pytest.mark.usefixtures("poison")
def test_matches_ref(kernel_device, lens, has_init, Hk, Hv, Dk, Dv, state_dtype):
    torch.manual_seed(len(lens) * 10 + Hv)
    o, ref, pool, ref_pool, slots = run_both(lens, has_init, Hk, Hv, Dk, Dv, state_dtype, kernel_device)
    close(o, ref, 1e-5)
    close(pool, ref_pool, tol_for(state_dtype))  # whole pools: no NaN left in a fresh sequence's slot
    untouched = torch.ones(pool.shape[0], dtype=torch.bool, device=pool.device)
    untouched[slots.long()] = False
    assert torch.equal(pool[untouched], ref_pool[untouched])


def test_names_bad_inputs(kernel_device):
    T, Hk, Hv, D = 3, 1, 2, 16
    q, v = torch.randn(T, Hk, D, device=kernel_device), torch.randn(T, Hv, D, device=kernel_device)
    a, b, A_log, dt_bias = gates(T, Hv, kernel_device)
    pool = torch.zeros(2, Hv, D, D, device=kernel_device)
    slots, init = torch.zeros(1, dtype=I32, device=kernel_device), torch.ones(1, dtype=torch.bool, device=kernel_device)
    cu = offsets([T], kernel_device)
    with pytest.raises(ValueError, match="has_initial_state"):
        gdn_prefill_recurrent(q, q, v, a, b, A_log, dt_bias, pool, slots, init.int(), cu)
    with pytest.raises(ValueError, match="ssm_states"):
        gdn_prefill_recurrent(q, q, v, a, b, A_log, dt_bias, pool.transpose(2, 3), slots, init, cu)
    with pytest.raises(ValueError, match="contiguous heads"):
        gdn_prefill_recurrent(q, q, v.transpose(1, 2).contiguous().transpose(1, 2), a, b, A_log, dt_bias, pool,
                              slots, init, cu)


# --------------------------------------------------------------------------------------- dispatch


def fake_layer(Hk, Hv, Dk, Dv, W, slots, device):
    """The attributes of a GatedDeltaNet that the prefill path reads, with random weights and states."""
    conv_dim = 2 * Hk * Dk + Hv * Dv
    return SimpleNamespace(
        num_k_heads=Hk, num_v_heads=Hv, head_k_dim=Dk, head_v_dim=Dv, key_dim=Hk * Dk, value_dim=Hv * Dv,
        conv_dim=conv_dim, conv1d=SimpleNamespace(weight=torch.randn(conv_dim, 1, W, device=device)),
        A_log=torch.empty(Hv, device=device).uniform_(-1.0, 0.5), dt_bias=0.5 * torch.randn(Hv, device=device),
        conv_state=torch.randn(slots, W, conv_dim, device=device), ssm_state=torch.randn(slots, Hv, Dk, Dv, device=device),
    )


def prefill_view(lens, ctx, slots, device) -> PrefillView:
    qsl, ctx = offsets(lens, "cpu"), torch.tensor(ctx, dtype=I32)
    return PrefillView(
        query_start_loc=qsl.to(device), query_start_loc_cpu=qsl, context_lens=ctx.to(device), context_lens_cpu=ctx,
        seq_lens=(ctx + torch.tensor(lens, dtype=I32)).to(device),
        state_slots=torch.tensor(slots, dtype=I32, device=device), block_tables=None,
        has_initial_state=(ctx > 0).to(device),
    )


def layer_prefill_both(lens, ctx, device):
    """The layer's kernel path and its reference path on clones of one fake layer; returns both sides."""
    Hk, Hv, D, W = 2, 4, 16, 4
    ref = fake_layer(Hk, Hv, D, D, W, 6, "cpu")  # on the CPU, the layer takes the reference path
    gdn = SimpleNamespace(**{n: to(x, device) for n, x in vars(ref).items()})
    gdn.conv1d = SimpleNamespace(weight=ref.conv1d.weight.to(device))
    T = sum(lens)
    wide = torch.randn(T, ref.conv_dim + 8)  # qkv: a row-strided view of the projection, as in the layer
    qkv = wide[:, : ref.conv_dim]
    a, b = torch.randn(T, Hv), torch.randn(T, Hv)
    pv = prefill_view(lens, ctx, [4, 1, 3][: len(lens)], "cpu")
    o_ref = gdn_layer._prefill(ref, qkv, b, a, pv)
    w = gdn.conv1d.weight.view(gdn.conv_dim, -1)
    o = gdn_layer._prefill_kernels(gdn, w, wide.to(device)[:, : ref.conv_dim], to(b, device), to(a, device),
                                   PrefillView(**{f.name: getattr(pv, f.name) if f.name.endswith("_cpu")
                                                  else to(getattr(pv, f.name), device) for f in fields(pv)}))
    return (o, gdn.ssm_state, gdn.conv_state), (o_ref, ref.ssm_state, ref.conv_state)


def to(x, device):
    """A copy on ``device`` (never the same storage: the two paths update their states in place)."""
    return x.to(device, copy=True) if isinstance(x, torch.Tensor) else x


def test_dispatch_predicate_reads_host_metadata():
    cpu_only = dict(query_start_loc=None, context_lens=None, context_lens_cpu=None, seq_lens=None, state_slots=None,
                    block_tables=None, has_initial_state=None)  # no device tensor to read
    limit = gdn_layer.RECURRENT_PREFILL_MAX_TOKENS
    for lens, short in (([1], True), ([3, limit, 2], True), ([limit + 1], False), ([5, limit + 1, 1], False)):
        pv = PrefillView(query_start_loc_cpu=offsets(lens, "cpu"), **cpu_only)
        assert pv.max_query_len == max(lens)
        assert gdn_layer.use_recurrent_prefill(pv) is short


def test_short_prefill_takes_the_recurrent_kernel(kernel_device, monkeypatch):
    """Kernel path (conv + recurrent GDN) == the CPU reference path; fla's entry point must not run."""
    import deltaserve.ops.gdn_prefill as fla_entry

    def no_fla(*args, **kwargs):
        raise AssertionError("a short prefill went to fla's chunked kernel")

    monkeypatch.setattr(fla_entry, "gdn_prefill", no_fla)
    torch.manual_seed(3)
    got, want = layer_prefill_both([5, 2, 9], [0, 7, 2], kernel_device)
    for g, w in zip(got, want, strict=True):
        close(g.cpu(), w, 1e-5)


def test_long_prefill_keeps_fla(kernel_device, monkeypatch):
    import deltaserve.ops.gdn_prefill as fla_entry
    import deltaserve.ops.gdn_prefill_recurrent as recurrent

    calls = []

    def fake_fla(*args, chunk_indices=None):
        calls.append(chunk_indices)
        return gdn_prefill_ref(*args)

    def no_recurrent(*args, **kwargs):
        raise AssertionError("a 65-token prefill went to the recurrent kernel")

    monkeypatch.setattr(fla_entry, "gdn_prefill", fake_fla)
    monkeypatch.setattr(recurrent, "gdn_prefill_recurrent", no_recurrent)
    torch.manual_seed(4)
    got, want = layer_prefill_both([2, gdn_layer.RECURRENT_PREFILL_MAX_TOKENS + 1], [3, 0], kernel_device)
    assert len(calls) == 1 and calls[0] is not None  # the step's chunk table is passed, not rebuilt by fla
    for g, w in zip(got, want, strict=True):
        close(g.cpu(), w, 1e-5)


# ------------------------------------------------------------------------------------ real shapes


@pytest.mark.gpu
@pytest.mark.parametrize("lens", [[1], [30], [64], [1, 30, 64, 7]])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_real_shape_matches_ref_and_fla(lens, state_dtype):
    """Qwen3.5-35B-A3B's GDN shape (Hk=16, Hv=32, Dk=Dv=128), bf16 activations."""
    from tests.test_gdn_kernels_gpu import prefill_inputs, rms_err

    torch.manual_seed(len(lens) + lens[0])
    q, k, v, a, b, A_log, dt_bias, pool, slots, cu = prefill_inputs(lens, 32, state_dtype)
    has_init = torch.arange(len(lens), device="cuda") % 2 == 1
    pool[slots[~has_init].long()] = float("nan")  # slots without an initial state are never read
    ref_pool, fla_pool = pool.clone(), pool.clone()
    o = gdn_prefill_recurrent(q, k, v, a, b, A_log, dt_bias, pool, slots, has_init, cu)
    ref = gdn_prefill_ref(q, k, v, a, b, A_log, dt_bias, ref_pool, slots, has_init, cu)
    assert o.dtype == q.dtype
    assert rms_err(o, ref) < 1e-2
    assert rms_err(pool[slots.long()], ref_pool[slots.long()]) < 1e-2
    untouched = torch.ones(pool.shape[0], dtype=torch.bool, device="cuda")
    untouched[slots.long()] = False
    assert torch.equal(pool[untouched].isnan(), ref_pool[untouched].isnan())
    assert torch.equal(pool[untouched].nan_to_num(), ref_pool[untouched].nan_to_num())
    try:
        from deltaserve.ops.gdn_prefill import gdn_prefill

        fla_o = gdn_prefill(q, k, v, a, b, A_log, dt_bias, fla_pool, slots, has_init, cu)
    except ImportError:
        return
    assert rms_err(o, fla_o) < 1e-2
    assert rms_err(pool[slots.long()], fla_pool[slots.long()]) < 1e-2
