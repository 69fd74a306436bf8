"""The plain-PyTorch reference ops agree with themselves in every form the engine uses."""

from __future__ import annotations

import pytest
import torch

from deltaserve.ops.causal_conv1d import causal_conv1d_ref, causal_conv1d_update_ref
from deltaserve.ops.gated_delta_rule import (
    chunk_gated_delta_rule_ref,
    gdn_decode_ref,
    recurrent_gated_delta_rule_ref,
)

TOL = dict(rtol=1e-5, atol=1e-5)


def inputs(T: int, B: int = 1, Hk: int = 2, Hv: int = 4, Dk: int = 16, Dv: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hk, Dk, generator=g)
    k = torch.randn(B, T, Hk, Dk, generator=g)
    v = torch.randn(B, T, Hv, Dv, generator=g)
    gate = -torch.rand(B, T, Hv, generator=g) * 2  # log-decay <= 0
    beta = torch.rand(B, T, Hv, generator=g)
    h0 = torch.randn(B, Hv, Dk, Dv, generator=g)
    return q, k, v, gate, beta, h0


@pytest.mark.parametrize("T", [1, 3, 15, 63, 64, 65, 300])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_recurrent(T, with_state):
    q, k, v, g, beta, h0 = inputs(T, B=2)
    init = h0 if with_state else None
    o_r, s_r = recurrent_gated_delta_rule_ref(q, k, v, g, beta, initial_state=init)
    o_c, s_c = chunk_gated_delta_rule_ref(q, k, v, g, beta, initial_state=init)
    torch.testing.assert_close(o_c, o_r, **TOL)
    torch.testing.assert_close(s_c, s_r, **TOL)


def test_varlen_equals_a_loop_over_sequences():
    lens = [1, 63, 65, 7, 130]
    seqs = [inputs(n, seed=i) for i, n in enumerate(lens)]
    packed = [torch.cat([s[j] for s in seqs], dim=1) for j in range(5)]
    h0 = torch.cat([s[5] for s in seqs])
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    for fn in (chunk_gated_delta_rule_ref, recurrent_gated_delta_rule_ref):
        o, states = fn(*packed, initial_state=h0, cu_seqlens=cu)
        for i, s in enumerate(seqs):
            o_i, st_i = fn(*s[:5], initial_state=s[5])
            torch.testing.assert_close(o[:, cu[i] : cu[i + 1]], o_i, **TOL)
            torch.testing.assert_close(states[i], st_i[0], **TOL)


@pytest.mark.parametrize("fn", [chunk_gated_delta_rule_ref, recurrent_gated_delta_rule_ref])
def test_gva_equals_explicitly_repeated_heads(fn):
    q, k, v, g, beta, h0 = inputs(70, Hk=2, Hv=6)
    o, s = fn(q, k, v, g, beta, initial_state=h0)
    o_rep, s_rep = fn(q.repeat_interleave(3, dim=2), k.repeat_interleave(3, dim=2), v, g, beta, initial_state=h0)
    torch.testing.assert_close(o, o_rep, **TOL)
    torch.testing.assert_close(s, s_rep, **TOL)


def test_chunked_prefill_then_decode_steps_equals_one_pass():
    """Split a sequence into a chunk, another chunk and single decode steps, carrying the state."""
    q, k, v, g, beta, _ = inputs(100)
    full, final = chunk_gated_delta_rule_ref(q, k, v, g, beta)
    a, s = chunk_gated_delta_rule_ref(q[:, :40], k[:, :40], v[:, :40], g[:, :40], beta[:, :40])
    b, s = chunk_gated_delta_rule_ref(q[:, 40:90], k[:, 40:90], v[:, 40:90], g[:, 40:90], beta[:, 40:90],
                                      initial_state=s)
    steps = []
    for t in range(90, 100):
        o, s = recurrent_gated_delta_rule_ref(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], g[:, t : t + 1],
                                              beta[:, t : t + 1], initial_state=s)
        steps.append(o)
    torch.testing.assert_close(torch.cat([a, b, *steps], dim=1), full, **TOL)
    torch.testing.assert_close(s, final, **TOL)


def test_slot_decode_updates_only_its_slots():
    q, k, v, _, _, _ = inputs(1, B=3)
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    A_log, dt_bias = torch.rand(4, generator=g), torch.rand(4, generator=g)
    pool = torch.randn(6, 4, 16, 24, generator=g)
    before = pool.clone()
    slots = torch.tensor([4, 0, 2])
    o = gdn_decode_ref(q[:, 0], k[:, 0], v[:, 0], a, b, A_log, dt_bias, pool, slots)
    from deltaserve.ops.gated_delta_rule import gdn_gating

    gg, bb = gdn_gating(a, b, A_log, dt_bias)
    o_ref, s_ref = recurrent_gated_delta_rule_ref(q, k, v, gg[:, None], bb[:, None], initial_state=before[slots])
    torch.testing.assert_close(o, o_ref[:, 0], **TOL)
    torch.testing.assert_close(pool[slots], s_ref, **TOL)
    untouched = [1, 3, 5]
    assert torch.equal(pool[untouched], before[untouched])


def test_conv_prefill_chunks_and_decode_steps_equal_one_pass():
    """The ring state carries a sequence across prefill chunks and one-token updates."""
    D, W, T = 40, 4, 23
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=g)
    w = torch.randn(D, W, generator=g)
    one = causal_conv1d_ref(x, w, torch.tensor([0, T]), torch.tensor([0]))
    states = torch.full((3, W, D), float("nan"))
    slot = torch.tensor([1])
    first = causal_conv1d_ref(x[:2], w, torch.tensor([0, 2]), torch.tensor([0]), states, slot)  # shorter than W-1
    second = causal_conv1d_ref(x[2:15], w, torch.tensor([0, 13]), torch.tensor([2]), states, slot)
    steps = [causal_conv1d_update_ref(x[t : t + 1], w, states, slot, torch.tensor([t])) for t in range(15, T)]
    torch.testing.assert_close(torch.cat([first, second, *steps]), one, **TOL)
    assert torch.isnan(states[0]).all() and torch.isnan(states[2]).all()  # other slots untouched


def test_conv_varlen_equals_a_loop():
    D, W = 24, 4
    lens, ctx = [5, 1, 17], [0, 3, 9]
    g = torch.Generator().manual_seed(1)
    w = torch.randn(D, W, generator=g)
    x = torch.randn(sum(lens), D, generator=g)
    cu = torch.tensor([0, 5, 6, 23])
    states = torch.randn(4, W, D, generator=g)
    loop_states = states.clone()
    slots = torch.tensor([3, 0, 2])
    out = causal_conv1d_ref(x, w, cu, torch.tensor(ctx), states, slots)
    for i in range(3):
        o = causal_conv1d_ref(x[cu[i] : cu[i + 1]], w, torch.tensor([0, lens[i]]), torch.tensor([ctx[i]]),
                              loop_states, slots[i : i + 1])
        torch.testing.assert_close(out[cu[i] : cu[i + 1]], o, **TOL)
    torch.testing.assert_close(states, loop_states, **TOL)
