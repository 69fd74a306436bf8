"""Gated DeltaNet prefill over a packed varlen batch with slot-indexed recurrent states.

:func:`gdn_prefill` is the GPU path (fla-core's chunked kernel); :func:`gdn_prefill_ref` has the
same contract on the plain-PyTorch chunked reference and is what the GPU path is tested against.
Both gather each sequence's initial state from the pool (zeros where it has none), run the chunked
gated delta rule with q/k L2 norm, and scatter the final states back in the pool's dtype.
"""

from __future__ import annotations

import torch

from deltaserve.ops.gated_delta_rule import chunk_gated_delta_rule_ref, gdn_gating


def _check(q, k, v, a, b, A_log, dt_bias, ssm_states, state_indices, has_initial_state, cu_seqlens) -> None:
    if q.dim() != 3 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [T, Hk, Dk]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    T, Hk, Dk = q.shape
    if v.dim() != 3 or v.shape[0] != T:
        raise ValueError(f"v must be [T={T}, Hv, Dv]; got {tuple(v.shape)}")
    Hv, Dv = v.shape[1:]
    if Hv % Hk:
        raise ValueError(f"Hv={Hv} value heads must be a multiple of Hk={Hk} key heads")
    for name, t in (("a", a), ("b", b)):
        if t.shape != (T, Hv):
            raise ValueError(f"{name} must be [T={T}, Hv={Hv}]; got {tuple(t.shape)}")
    for name, t in (("A_log", A_log), ("dt_bias", dt_bias)):
        if t.shape != (Hv,):
            raise ValueError(f"{name} must be [Hv={Hv}]; got {tuple(t.shape)}")
    if ssm_states.dim() != 4 or ssm_states.shape[1:] != (Hv, Dk, Dv):
        raise ValueError(f"ssm_states must be [S, Hv={Hv}, Dk={Dk}, Dv={Dv}]; got {tuple(ssm_states.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be an int32/int64 [N + 1] with N >= 1; got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    n = cu_seqlens.numel() - 1
    if state_indices.shape != (n,) or state_indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"state_indices must be an int32/int64 [N={n}]; got {state_indices.dtype} "
                         f"{tuple(state_indices.shape)}")
    if has_initial_state.shape != (n,) or has_initial_state.dtype != torch.bool:
        raise ValueError(f"has_initial_state must be a bool [N={n}]; got {has_initial_state.dtype} "
                         f"{tuple(has_initial_state.shape)}")


def _initial_states(ssm_states: torch.Tensor, idx: torch.Tensor, has_initial_state: torch.Tensor) -> torch.Tensor:
    """``[N, Hv, Dk, Dv]`` fp32; masked_fill (not a multiply) so a stale slot's NaNs cannot leak in."""
    init = ssm_states[idx].float()
    return init.masked_fill_(~has_initial_state[:, None, None, None], 0.0)


def gdn_prefill(
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
    chunk_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Chunked gated delta rule for a packed varlen batch on the GPU (fla-core), states in place.

    q, k: ``[T, Hk, Dk]``, v: ``[T, Hv, Dv]`` (post-conv); a, b: ``[T, Hv]`` raw gates; A_log,
    dt_bias: ``[Hv]``; ssm_states: ``[S, Hv, Dk, Dv]`` pool (fp32 or bf16); state_indices,
    has_initial_state: ``[N]``; cu_seqlens: ``[N + 1]``; chunk_indices: fla's 64-token chunk table
    for ``cu_seqlens`` (pass one per step, see ``PrefillView.chunk_indices``; None: fla builds it,
    reading ``cu_seqlens`` back to the host). Returns ``o [T, Hv, Dv]`` in q's dtype.
    """
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # GPU-only dependency

    _check(q, k, v, a, b, A_log, dt_bias, ssm_states, state_indices, has_initial_state, cu_seqlens)
    g, beta = gdn_gating(a, b, A_log, dt_bias)  # [T, Hv] fp32 each
    idx = state_indices.long()
    o, final = chunk_gated_delta_rule(
        q[None], k[None], v[None], g[None], beta[None],
        scale=scale,
        initial_state=_initial_states(ssm_states, idx, has_initial_state),  # fla reads fp32 states
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
        cu_seqlens=cu_seqlens.long(),
        chunk_indices=chunk_indices,
    )
    ssm_states.index_copy_(0, idx, final.to(ssm_states.dtype))  # fla returns fp32 final states
    return o[0]


def gdn_prefill_ref(
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
    chunk_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as :func:`gdn_prefill` on the plain-PyTorch chunked reference (any device), so either
    can stand in for the other; ``chunk_indices`` (fla's chunk table) is accepted and unused.

    Returns ``o [T, Hv, Dv]`` in v's dtype.
    """
    _check(q, k, v, a, b, A_log, dt_bias, ssm_states, state_indices, has_initial_state, cu_seqlens)
    g, beta = gdn_gating(a, b, A_log, dt_bias)
    idx = state_indices.long()
    o, final = chunk_gated_delta_rule_ref(
        q[None], k[None], v[None], g[None], beta[None], scale,
        initial_state=_initial_states(ssm_states, idx, has_initial_state),
        cu_seqlens=cu_seqlens,
    )
    ssm_states.index_copy_(0, idx, final.to(ssm_states.dtype))
    return o[0]
