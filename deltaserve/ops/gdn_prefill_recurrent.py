"""Gated DeltaNet prefill for short prompts: one recurrent Triton kernel, states in registers.

Same contract as :func:`deltaserve.ops.gdn_prefill.gdn_prefill` (and ``gdn_prefill_ref``). fla-core's
chunked path costs ~8 kernel launches per layer, each behind Python wrappers and autotuner look-ups:
~2.3 ms of host time per GDN layer for a 30-token prompt whose GPU work is a few microseconds. Here
one program owns one (sequence, value head, block of ``BV`` value columns): it loads its ``[Dk, BV]``
state tile once (zeros, without reading the slot, where the sequence has no initial state), walks the
sequence's tokens doing the decode kernel's rank-1 update in fp32 registers, and stores the tile once.

Grid ``(N, Hv, cdiv(Dv, BV))``: token counts are read from ``cu_seqlens`` on the device, so neither
the grid nor the specialisation depends on the prompt lengths (capturable in a CUDA graph, no
recompiles per length). Each token is a serial step, so the kernel is only the right choice for short
prefills; see ``RECURRENT_PREFILL_MAX_TOKENS`` in :mod:`deltaserve.layers.gdn`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltaserve.ops.conv1d_triton import _check_index
from deltaserve.ops.gdn_decode import (
    _check_gates,
    _check_pool,
    _check_rows,
    _delta_rule_update,
    _gating,
    _l2norm,
)
from deltaserve.ops.gdn_prefill import _check
from deltaserve.ops.pdl import launch_args, pdl_gate


# Per-sequence metadata (slots, flags, bounds) is read one entry at a time: no alignment specialisation.
@triton.jit(do_not_specialize_on_alignment=["idx_ptr", "init_ptr", "cu_ptr"])
def _gdn_prefill_recurrent_kernel(
    q_ptr, k_ptr, v_ptr, a_ptr, b_ptr, A_log_ptr, dt_bias_ptr, state_ptr, idx_ptr, init_ptr, cu_ptr, o_ptr,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sa_t, sb_t, scale,
    HV: tl.constexpr, R: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PDL: tl.constexpr,
):
    pdl_gate(PDL)
    i_n = tl.program_id(0)
    i_h = tl.program_id(1)
    i_hk = i_h // R  # GVA: value head h reads key head h // R
    o_k = tl.arange(0, BK)
    m_k = o_k < DK
    o_v = tl.program_id(2) * BV + tl.arange(0, BV)
    m_v = o_v < DV
    s_mask = m_k[:, None] & m_v[None, :]

    start = tl.load(cu_ptr + i_n).to(tl.int64)
    end = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    slot = tl.load(idx_ptr + i_n).to(tl.int64)
    has_init = tl.load(init_ptr + i_n) != 0
    s_ptrs = state_ptr + (slot * HV + i_h) * (DK * DV) + o_k[:, None] * DV + o_v[None, :]
    # A fresh sequence's slot is never read (masked load), so stale contents, NaNs included, cannot leak.
    S = tl.load(s_ptrs, mask=s_mask & has_init, other=0.0).to(tl.float32)
    A_log = tl.load(A_log_ptr + i_h).to(tl.float32)
    dt_bias = tl.load(dt_bias_ptr + i_h).to(tl.float32)

    for t in range(start, end):
        q = tl.load(q_ptr + t * sq_t + i_hk * sq_h + o_k, mask=m_k, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + t * sk_t + i_hk * sk_h + o_k, mask=m_k, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + t * sv_t + i_h * sv_h + o_v, mask=m_v, other=0.0).to(tl.float32)
        g, beta = _gating(
            tl.load(a_ptr + t * sa_t + i_h).to(tl.float32), tl.load(b_ptr + t * sb_t + i_h).to(tl.float32),
            A_log, dt_bias,
        )
        S, o = _delta_rule_update(S, _l2norm(q, 1e-6) * scale, _l2norm(k, 1e-6), v, g, beta)
        tl.store(o_ptr + (t * HV + i_h) * DV + o_v, o.to(o_ptr.dtype.element_ty), mask=m_v)

    # Rounded to the pool's dtype once, at the end, as the reference does (not once per token).
    tl.store(s_ptrs, S.to(state_ptr.dtype.element_ty), mask=s_mask)


def _config(N: int, Hv: int, Dk: int, Dv: int) -> tuple[int, int]:
    """(BV, num_warps). BV as the decode kernel's untuned rule: enough programs (>= 256) to spread the
    state over every SM. The tile lives in registers for the whole loop, so warps grow with it: ~64
    fp32 state registers per thread (1 warp for 128 x 16), and few warps keep the per-token
    reductions over Dk mostly inside a warp, which is what each serial step waits on."""
    bv = next((bv for bv in (64, 32) if N * Hv * triton.cdiv(Dv, bv) >= 256), 16)
    bv = min(bv, triton.next_power_of_2(Dv))
    return bv, max(1, min(8, triton.next_power_of_2(Dk) * bv // (32 * 64)))


def gdn_prefill_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    ssm_states: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Recurrent gated delta rule for a packed varlen batch, one launch, states in place.

    q, k: ``[T, Hk, Dk]``, v: ``[T, Hv, Dv]`` (post-conv; rows may be strided views, heads
    contiguous); a, b: ``[T, Hv]`` raw gates; A_log, dt_bias: ``[Hv]``; ssm_states:
    ``[S, Hv, Dk, Dv]`` contiguous pool (fp32 or bf16); state_indices, has_initial_state (bool):
    ``[N]``; cu_seqlens: ``[N + 1]`` int32/int64 on the inputs' device (never read by the host).
    A sequence without an initial state starts from zeros and does not read its slot; every
    sequence's final state is written to its slot, in the pool's dtype. Equals ``gdn_prefill_ref``.
    Returns ``o [T, Hv, Dv]`` in q's dtype.
    """
    _check(q, k, v, a, b, A_log, dt_bias, ssm_states, state_indices, has_initial_state, cu_seqlens)
    T, Hk, Dk = q.shape
    Hv, Dv = v.shape[1:]
    n = cu_seqlens.numel() - 1
    _check_rows("q", q, (T, Hk, Dk))
    _check_rows("k", k, (T, Hk, Dk))
    _check_rows("v", v, (T, Hv, Dv))
    _check_gates(a, b, A_log, dt_bias, T, Hv)
    _check_pool("ssm_states", ssm_states, (Hv, Dk, Dv), q.device)
    _check_index("state_indices", state_indices, n)
    for name, t in (("state_indices", state_indices), ("has_initial_state", has_initial_state),
                    ("cu_seqlens", cu_seqlens)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, inputs on {q.device}: pass the device copy")
    o = torch.empty((T, Hv, Dv), dtype=q.dtype, device=q.device)
    bv, warps = _config(n, Hv, Dk, Dv)
    _gdn_prefill_recurrent_kernel[(n, Hv, triton.cdiv(Dv, bv))](
        q, k, v, a, b, A_log, dt_bias, ssm_states, state_indices, has_initial_state, cu_seqlens, o,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), a.stride(0), b.stride(0),
        Dk**-0.5 if scale is None else scale,
        HV=Hv, R=Hv // Hk, DK=Dk, DV=Dv, BK=triton.next_power_of_2(Dk), BV=bv, num_warps=warps, **launch_args(),
    )
    return o
