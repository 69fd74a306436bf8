"""Triton GDN kernels (conv prefill/update, decode, fused decode) against their PyTorch references.

Small odd shapes, so that the whole file runs under Triton's CPU interpreter in CI; the same
equalities at the real shapes live in test_gdn_kernels_gpu.py. Outputs allocated by the kernels are
NaN-poisoned (``torch.empty`` is patched) and state slots that must not be read hold NaN, so an
unwritten element or a stray read shows up as a mismatch.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from deltaserve.ops.causal_conv1d import causal_conv1d_ref, causal_conv1d_update_ref  # noqa: E402
from deltaserve.ops.conv1d_triton import causal_conv1d_prefill, causal_conv1d_update  # noqa: E402
from deltaserve.ops.gated_delta_rule import gdn_decode_ref  # noqa: E402
from deltaserve.ops.gdn_decode import gdn_decode, gdn_decode_fused  # noqa: E402
from deltaserve.ops.gdn_prefill import gdn_prefill_ref  # noqa: E402

I32 = torch.int32


@pytest.fixture
def poison(monkeypatch):
    """Make ``torch.empty`` return NaN-filled float tensors for the duration of a test."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Max error relative to the largest expected magnitude; NaN must match NaN."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    a, e = actual.float(), expected.float()
    assert torch.equal(a.isnan(), e.isnan()), "NaN pattern differs (an element was not written, or read stray)"
    a, e = a.nan_to_num(), e.nan_to_num()
    err = (a - e).abs().max().item() / max(e.abs().max().item(), 1e-6)
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def gates(T: int, Hv: int, device: str):
    a, b = torch.randn(T, Hv, device=device), torch.randn(T, Hv, device=device)
    A_log = torch.empty(Hv, device=device).uniform_(-1.0, 0.5)  # decay per step ~ 0.3 .. 0.9
    dt_bias = 0.5 * torch.randn(Hv, device=device)
    return a, b, A_log, dt_bias


def tol_for(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-2


def conv_prefill_ref(x, w, cu, ctx, states, idx):
    """causal_conv1d_ref on CPU copies (its ring write mixes CPU and CUDA tensors); states copied back."""
    cpu_states = states.cpu()
    out = causal_conv1d_ref(x.cpu(), w.cpu(), cu.cpu(), ctx.cpu(), cpu_states, idx.cpu())
    states.copy_(cpu_states)
    return out.to(x.device)


# ------------------------------------------------------------------------------------------- conv


@pytest.mark.parametrize("W,D", [(4, 200), (3, 72)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_prefill_matches_ref(kernel_device, poison, W, D, dtype):
    torch.manual_seed(0)
    lens = [1, 2, 5, 40, 3, 1]
    ctx = [0, 3, 7, 1, 0, 1]  # fresh, continuing, and contexts shorter than W-1
    slots = [9, 0, 4, 11, 2, 7]  # out of order, with gaps
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=I32, device=kernel_device)
    x = torch.randn(int(cu[-1]), D, device=kernel_device).to(dtype)
    w = torch.randn(D, W, device=kernel_device)
    states = torch.randn(12, W, D, device=kernel_device).to(dtype)
    for s, c in zip(slots, ctx, strict=True):  # NaN in every entry the conv must not read
        for p in range(c - W, c):
            if c == 0 or p < 0 or p == c - W:  # fresh ring, before t=0, or the stale oldest entry
                states[s, p % W] = float("nan")
    ctx_t = torch.tensor(ctx, dtype=I32, device=kernel_device)
    idx = torch.tensor(slots, dtype=I32, device=kernel_device)
    ref_states = states.clone()

    out = causal_conv1d_prefill(x, w, cu, ctx_t, states, idx)
    ref = conv_prefill_ref(x, w, cu, ctx_t, ref_states, idx)
    close(out, ref, tol_for(dtype))
    close(states, ref_states, 0.0)  # ring writes are copies: exact, untouched slots included


def test_conv_prefill_empty_sequence_keeps_its_ring(kernel_device, poison):
    torch.manual_seed(1)
    cu = torch.tensor([0, 5, 5], dtype=I32, device=kernel_device)  # sequence 1 has no tokens
    x, w = torch.randn(5, 72, device=kernel_device), torch.randn(72, 4, device=kernel_device)
    states = torch.randn(3, 4, 72, device=kernel_device)
    before = states.clone()
    ctx = torch.tensor([0, 9], dtype=I32, device=kernel_device)
    idx = torch.tensor([0, 2], dtype=I32, device=kernel_device)
    out = causal_conv1d_prefill(x, w, cu, ctx, states, idx)
    close(out, causal_conv1d_ref(x, w, cu[:2], ctx[:1]), 1e-5)
    close(states[1:], before[1:], 0.0)


def test_conv_prefill_without_state(kernel_device, poison):
    torch.manual_seed(1)
    cu = torch.tensor([0, 33, 34, 70], dtype=I32, device=kernel_device)
    x, w = torch.randn(70, 96, device=kernel_device), torch.randn(96, 4, device=kernel_device)
    ctx = torch.zeros(3, dtype=I32, device=kernel_device)
    out = causal_conv1d_prefill(x, w, cu, ctx, None, None, activation=False)
    close(out, causal_conv1d_ref(x, w, cu, ctx, activation=False), 1e-5)


@pytest.mark.parametrize("W", [3, 4])
def test_conv_update_chain_matches_ref_and_full_sequence(kernel_device, poison, W):
    """Prefill a prefix, then 9 decode steps (the ring wraps twice); per-step and whole-sequence checks."""
    torch.manual_seed(2)
    D, steps = 72, 9
    prefix = [0, 1, 5]  # fresh at position 0, a 1-token prefix (< W-1), a longer prefix
    slots = torch.tensor([5, 0, 3], dtype=I32, device=kernel_device)
    w = torch.randn(D, W, device=kernel_device)
    seqs = [torch.randn(p + steps, D, device=kernel_device) for p in prefix]
    states = torch.full((7, W, D), float("nan"), device=kernel_device)
    states[[1, 2, 4, 6]] = torch.randn(4, W, D, device=kernel_device)  # other slots stay untouched
    # The fresh sequence (prefix 0) is not prefilled: its ring is NaN and must never be read.
    pre = [i for i, p in enumerate(prefix) if p > 0]
    cu = torch.tensor([0, *torch.tensor([prefix[i] for i in pre]).cumsum(0).tolist()], dtype=I32)
    causal_conv1d_prefill(
        torch.cat([seqs[i][: prefix[i]] for i in pre]), w, cu.to(kernel_device),
        torch.zeros(len(pre), dtype=I32, device=kernel_device), states, slots[pre],
    )
    ref_states = states.clone()
    outs = []
    for s in range(steps):
        x = torch.stack([seq[p + s] for seq, p in zip(seqs, prefix, strict=True)])  # [B, D]
        pos = torch.tensor(prefix, device=kernel_device) + s
        out = causal_conv1d_update(x, w, states, slots, pos)
        close(out, causal_conv1d_update_ref(x, w, ref_states, slots, pos), 1e-5)
        close(states, ref_states, 0.0)
        outs.append(out)
    for i, (seq, p) in enumerate(zip(seqs, prefix, strict=True)):
        full = causal_conv1d_ref(seq, w, torch.tensor([0, len(seq)], dtype=I32), torch.zeros(1, dtype=I32))
        close(torch.stack([o[i] for o in outs]), full[p:], 1e-5)


def test_conv_update_padding_rows_share_scratch_slot(kernel_device, poison):
    torch.manual_seed(3)
    D, W = 72, 4
    w = torch.randn(D, W, device=kernel_device)
    states = torch.randn(6, W, D, device=kernel_device)
    before = states.clone()
    x = torch.randn(4, D, device=kernel_device)
    slots = torch.tensor([3, 0, 0, 1], dtype=I32, device=kernel_device)  # rows 1, 2: padding -> scratch 0
    pos = torch.tensor([6, 0, 0, 9], device=kernel_device)
    out = causal_conv1d_update(x, w, states, slots, pos)
    ref_states = before.clone()
    real = torch.tensor([0, 3])
    ref = causal_conv1d_update_ref(x[real], w, ref_states, slots[real], pos[real])
    close(out[real], ref, 1e-5)
    close(states[1:], ref_states[1:], 0.0)


# ----------------------------------------------------------------------------------------- decode


def decode_inputs(B, Hk, Hv, Dk, Dv, num_slots, state_dtype, device):
    q, k = torch.randn(B, Hk, Dk, device=device), torch.randn(B, Hk, Dk, device=device)
    v = torch.randn(B, Hv, Dv, device=device)
    pool = torch.randn(num_slots, Hv, Dk, Dv, device=device).to(state_dtype)
    return q, k, v, pool


@pytest.mark.parametrize("ratio", [1, 2, 3])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_gdn_decode_matches_ref(kernel_device, poison, ratio, B, state_dtype):
    torch.manual_seed(4)
    Hk, Dk, Dv = 2, 72, 40  # Dv: 40 is not a multiple of the value block
    Hv = Hk * ratio
    q, k, v, pool = decode_inputs(B, Hk, Hv, Dk, Dv, 7, state_dtype, kernel_device)
    a, b, A_log, dt_bias = gates(B, Hv, kernel_device)
    slots = torch.tensor([5, 0, 3][:B], dtype=I32, device=kernel_device)
    ref_pool = pool.clone()
    o = gdn_decode(q, k, v, a, b, A_log, dt_bias, pool, slots)
    close(o, gdn_decode_ref(q, k, v, a, b, A_log, dt_bias, ref_pool, slots), 1e-5)
    close(pool, ref_pool, tol_for(state_dtype))


def test_gdn_decode_strided_views_and_padding(kernel_device, poison):
    """q/k/v as views of one fused row (as the model splits them); padded rows share scratch slot 0."""
    torch.manual_seed(5)
    B, Hk, Hv, Dk, Dv = 4, 1, 2, 24, 20
    qkv = torch.randn(B, 2 * Hk * Dk + Hv * Dv + 3, device=kernel_device)  # +3: row stride != width
    q = qkv[:, : Hk * Dk].view(B, Hk, Dk)
    k = qkv[:, Hk * Dk : 2 * Hk * Dk].view(B, Hk, Dk)
    v = qkv[:, 2 * Hk * Dk : -3].view(B, Hv, Dv)
    a, b, A_log, dt_bias = gates(B, Hv, kernel_device)
    pool = torch.randn(5, Hv, Dk, Dv, device=kernel_device)
    slots = torch.tensor([2, 0, 0, 4], dtype=I32, device=kernel_device)
    ref_pool = pool.clone()
    o = gdn_decode(q, k, v, a, b, A_log, dt_bias, pool, slots)
    real = torch.tensor([0, 3])
    ref = gdn_decode_ref(q[real], k[real], v[real], a[real], b[real], A_log, dt_bias, ref_pool, slots[real])
    close(o[real], ref, 1e-5)
    close(pool[1:], ref_pool[1:], 1e-5)


def unfused_step(x, a, b, w, conv, ssm, slots, pos, A_log, dt_bias, Hk, Dk, Dv):
    """The reference chain gdn_decode_fused must equal: conv update, split, decode."""
    B, Hv = a.shape
    y = causal_conv1d_update_ref(x, w, conv, slots, pos)
    q, k, v = y.split([Hk * Dk, Hk * Dk, Hv * Dv], dim=-1)
    return gdn_decode_ref(q.view(B, Hk, Dk), k.view(B, Hk, Dk), v.view(B, Hv, Dv), a, b, A_log, dt_bias, ssm, slots)


@pytest.mark.parametrize("preload", [False, True], ids=["", "preload"])
@pytest.mark.parametrize(
    "ratio,B,W,state_dtype",
    [(1, 3, 4, torch.float32), (2, 1, 3, torch.bfloat16), (3, 3, 4, torch.bfloat16)],
)
def test_gdn_decode_fused_matches_unfused(kernel_device, poison, ratio, B, W, state_dtype, preload, monkeypatch):
    """``preload``: the kernel variant that reads the slot and the state tile before its PDL wait
    (``--pdl-preload``), run here without PDL: the same results."""
    from deltaserve.ops import pdl

    monkeypatch.setattr(pdl, "_preload", preload)
    torch.manual_seed(6)
    Hk, Dk, Dv = 1, 24, 20
    Hv = Hk * ratio
    conv_dim = 2 * Hk * Dk + Hv * Dv
    x, w = torch.randn(B, conv_dim, device=kernel_device), torch.randn(conv_dim, W, device=kernel_device)
    a, b, A_log, dt_bias = gates(B, Hv, kernel_device)
    conv = torch.randn(6, W, conv_dim, device=kernel_device)
    ssm = torch.randn(6, Hv, Dk, Dv, device=kernel_device).to(state_dtype)
    slots = torch.tensor([4, 1, 2][:B], dtype=I32, device=kernel_device)
    pos = torch.tensor([1, 0, 13][:B], device=kernel_device)  # positions < W-1 read no ring entry before 0
    conv[4, 2:] = float("nan")  # slot 4 at position 1: entries of positions < 0
    conv[1] = float("nan")  # slot 1 at position 0: nothing is read
    ref_conv, ref_ssm = conv.clone(), ssm.clone()
    o = gdn_decode_fused(x, a, b, w, conv, ssm, slots, pos, A_log, dt_bias, Hk, Dk, Dv)
    ref = unfused_step(x, a, b, w, ref_conv, ref_ssm, slots, pos, A_log, dt_bias, Hk, Dk, Dv)
    close(o, ref, 1e-5)
    close(conv, ref_conv, 0.0)
    close(ssm, ref_ssm, tol_for(state_dtype))


def test_gdn_decode_fused_chain_with_padding(kernel_device, poison):
    """9 steps in a row (the ring wraps twice) with a padded row on the scratch slot each step."""
    torch.manual_seed(7)
    Hk, Hv, Dk, Dv, W, steps = 1, 2, 24, 12, 4, 9
    conv_dim = 2 * Hk * Dk + Hv * Dv
    w = torch.randn(conv_dim, W, device=kernel_device)
    _, _, A_log, dt_bias = gates(1, Hv, kernel_device)
    conv = torch.randn(5, W, conv_dim, device=kernel_device)
    ssm = torch.randn(5, Hv, Dk, Dv, device=kernel_device)
    conv[3] = float("nan")  # fresh sequence: its ring is never read before it is written
    slots = torch.tensor([3, 1, 0], dtype=I32, device=kernel_device)  # row 2: padding on scratch slot 0
    start = torch.tensor([0, 6, 0], device=kernel_device)
    ref_conv, ref_ssm = conv.clone(), ssm.clone()
    real = torch.tensor([0, 1])
    for s in range(steps):
        x = torch.randn(3, conv_dim, device=kernel_device)
        a, b, _, _ = gates(3, Hv, kernel_device)
        o = gdn_decode_fused(x, a, b, w, conv, ssm, slots, start + s, A_log, dt_bias, Hk, Dk, Dv)
        ref = unfused_step(x[real], a[real], b[real], w, ref_conv, ref_ssm, slots[real], start[real] + s,
                           A_log, dt_bias, Hk, Dk, Dv)
        close(o[real], ref, 1e-5)
        close(conv[1:], ref_conv[1:], 0.0)
        close(ssm[1:], ref_ssm[1:], 1e-5)


# ---------------------------------------------------------------------------------------- prefill


def test_gdn_prefill_ref_equals_token_by_token_decode():
    """Chunked prefill over a varlen batch with pooled initial states == per-token decode steps."""
    torch.manual_seed(8)
    Hk, Hv, Dk, Dv = 2, 4, 24, 20
    lens, slots, has_init = [1, 15, 65, 3], [6, 0, 3, 4], [True, False, True, False]
    T = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=I32)
    q, k, v = torch.randn(T, Hk, Dk), torch.randn(T, Hk, Dk), torch.randn(T, Hv, Dv)
    a, b, A_log, dt_bias = gates(T, Hv, "cpu")
    pool = torch.randn(8, Hv, Dk, Dv)
    pool[[0, 4]] = float("nan")  # slots of sequences without an initial state: never read
    ref_pool = pool.clone()
    ref_pool[[0, 4]] = 0.0
    o = gdn_prefill_ref(q, k, v, a, b, A_log, dt_bias, pool, torch.tensor(slots, dtype=I32),
                        torch.tensor(has_init), cu)
    for i, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        idx = torch.tensor([slots[i]], dtype=I32)
        for t in range(lo, hi):
            ref = gdn_decode_ref(q[t, None], k[t, None], v[t, None], a[t, None], b[t, None], A_log, dt_bias,
                                 ref_pool, idx)
            close(o[t], ref[0], 1e-4)
    close(pool, ref_pool, 1e-4)


def test_gdn_prefill_ref_takes_every_argument_of_gdn_prefill():
    """The GPU tests swap the reference in for fla's prefill (``gdn_prefill = gdn_prefill_ref``): the layer
    calls it with fla's keyword arguments, so the reference must accept all of them."""
    import inspect

    from deltaserve.ops.gdn_prefill import gdn_prefill

    fla_params = inspect.signature(gdn_prefill).parameters
    ref_params = inspect.signature(gdn_prefill_ref).parameters
    assert list(fla_params) == list(ref_params)


# ------------------------------------------------------------------------------------- validation


def test_entry_points_name_bad_inputs(kernel_device):
    x, w = torch.randn(3, 8, device=kernel_device), torch.randn(8, 4, device=kernel_device)
    states = torch.zeros(2, 4, 8, device=kernel_device)
    idx = torch.zeros(3, dtype=I32, device=kernel_device)
    with pytest.raises(ValueError, match="conv_states"):
        causal_conv1d_update(x, w, torch.zeros(2, 3, 8, device=kernel_device), idx, idx)
    with pytest.raises(ValueError, match="positions"):
        causal_conv1d_update(x, w, states, idx, idx.float())
    with pytest.raises(ValueError, match="context_lens"):
        causal_conv1d_prefill(x, w, torch.tensor([0, 3], dtype=I32), idx, states, idx[:1])
    q, v = torch.randn(1, 2, 8), torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="multiple of Hk"):
        gdn_decode(q, q, v, torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(3), torch.zeros(3),
                   torch.zeros(2, 3, 8, 8), torch.zeros(1, dtype=I32))
    with pytest.raises(ValueError, match="ssm_states"):
        gdn_decode_fused(torch.randn(1, 32), torch.zeros(1, 2), torch.zeros(1, 2), torch.randn(32, 4),
                         torch.zeros(2, 4, 32), torch.zeros(2, 2, 8, 7), torch.zeros(1, dtype=I32),
                         torch.zeros(1, dtype=I32), torch.zeros(2), torch.zeros(2), 1, 8, 8)
