"""Gated delta rule: the plain-PyTorch reference (chunked and recurrent).

The recurrence, per sequence and value head, with state ``S [Dk, Dv]``::

    S <- exp(g_t) * S
    delta_t = beta_t * (v_t - k_t^T S)
    S <- S + k_t (x) delta_t
    o_t = q_t^T S

q and k are L2-normalised per head (``use_qk_l2norm``) and q is scaled by ``Dk ** -0.5``.
With GVA (``Hv = r * Hk``) value head ``h`` reads q/k head ``h // r``.

Tensors follow fla-core's layout: ``q, k [B, T, Hk, Dk]``, ``v [B, T, Hv, Dv]``,
``g, beta [B, T, Hv]``; variable-length batches are packed with ``B == 1`` and
``cu_seqlens [N + 1]``. States are ``[N, Hv, Dk, Dv]`` float32. Everything here runs on any device
and is what the GPU kernels are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim (the fla-core / HF convention)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def gdn_gating(
    a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``g = -exp(A_log) * softplus(a + dt_bias)`` and ``beta = sigmoid(b)``, both float32.

    a, b: ``[..., Hv]``; A_log, dt_bias: ``[Hv]``.
    """
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    return g, b.float().sigmoid()


def _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens) -> tuple[int, int]:
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, Hk, Dk]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, T, Hk, Dk = q.shape
    if v.dim() != 4 or v.shape[:2] != (B, T):
        raise ValueError(f"v must be [B, T, Hv, Dv] with B={B}, T={T}; got {tuple(v.shape)}")
    Hv = v.shape[2]
    if Hv % Hk:
        raise ValueError(f"Hv={Hv} value heads must be a multiple of Hk={Hk} key heads")
    for name, t in (("g", g), ("beta", beta)):
        if t.shape != (B, T, Hv):
            raise ValueError(f"{name} must be [B, T, Hv] = {(B, T, Hv)}; got {tuple(t.shape)}")
    n = B if cu_seqlens is None else len(cu_seqlens) - 1
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"varlen input (cu_seqlens given) must be packed with B == 1; got B={B}")
    if initial_state is not None and initial_state.shape != (n, Hv, Dk, v.shape[3]):
        raise ValueError(
            f"initial_state must be [N, Hv, Dk, Dv] = {(n, Hv, Dk, v.shape[3])}; got {tuple(initial_state.shape)}"
        )
    return n, Hv // Hk


def _sequences(q, cu_seqlens):
    """Yield (sequence index, batch row, time slice) for each sequence."""
    if cu_seqlens is None:
        for i in range(q.shape[0]):
            yield i, i, slice(None)
    else:
        bounds = cu_seqlens.tolist()
        for i in range(len(bounds) - 1):
            yield i, 0, slice(bounds[i], bounds[i + 1])


def _prepare(q, k, v, g, beta, ratio, scale, use_qk_l2norm):
    """One sequence ``[T, H, D]`` -> head-major float32 ``[Hv, T, D]`` with GVA expanded."""
    q, k = q.float(), k.float()
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = q * scale
    q = q.repeat_interleave(ratio, dim=1).transpose(0, 1)  # [Hv, T, Dk]
    k = k.repeat_interleave(ratio, dim=1).transpose(0, 1)  # [Hv, T, Dk]
    return q, k, v.float().transpose(0, 1), g.float().transpose(0, 1), beta.float().transpose(0, 1)


def recurrent_gated_delta_rule_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token gated delta rule. Returns ``o`` (like ``v``) and the final states ``[N, Hv, Dk, Dv]``."""
    n, ratio = _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    Dk, Dv = q.shape[-1], v.shape[-1]
    scale = Dk**-0.5 if scale is None else scale
    o = torch.empty_like(v)
    states = []
    for i, bi, t in _sequences(q, cu_seqlens):
        qs, ks, vs, gs, bs = _prepare(q[bi, t], k[bi, t], v[bi, t], g[bi, t], beta[bi, t], ratio, scale, use_qk_l2norm)
        S = q.new_zeros(vs.shape[0], Dk, Dv, dtype=torch.float32) if initial_state is None else initial_state[i].float()
        out = torch.empty_like(vs)  # [Hv, T, Dv]
        for s in range(vs.shape[1]):
            S = S * gs[:, s, None, None].exp()
            delta = (vs[:, s] - torch.einsum("hk,hkv->hv", ks[:, s], S)) * bs[:, s, None]
            S = S + ks[:, s, :, None] * delta[:, None, :]
            out[:, s] = torch.einsum("hk,hkv->hv", qs[:, s], S)
        o[bi, t] = out.transpose(0, 1).to(o.dtype)
        states.append(S)
    return o, torch.stack(states)


def chunk_gated_delta_rule_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked (WY) form of the gated delta rule; same contract as :func:`recurrent_gated_delta_rule_ref`.

    Within a chunk with entry state ``S0`` and inclusive cumulative log-decay ``c_t``, the delta rule's
    corrections solve a unit lower-triangular system::

        (I + A) delta = beta*v - (beta*exp(c)*k) S0,   A[t, j] = beta_t exp(c_t - c_j) k_t.k_j  (j < t)
        O   = (exp(c)*q) S0 + (M * q k^T) delta,       M[t, j] = exp(c_t - c_j)                (j <= t)
        S_C = exp(c_C) S0 + (exp(c_C - c) * k)^T delta
    """
    n, ratio = _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    Dk, Dv = q.shape[-1], v.shape[-1]
    scale = Dk**-0.5 if scale is None else scale
    C = chunk_size
    o = torch.empty_like(v)
    states = []
    lower_strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    lower_incl = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    eye = torch.eye(C, device=q.device)
    for i, bi, t in _sequences(q, cu_seqlens):
        qs, ks, vs, gs, bs = _prepare(q[bi, t], k[bi, t], v[bi, t], g[bi, t], beta[bi, t], ratio, scale, use_qk_l2norm)
        H, T = vs.shape[:2]
        pad = (-T) % C
        # Padding tokens have k = v = beta = g = 0: they neither decay nor write the state.
        qs, ks, vs = (F.pad(x, (0, 0, 0, pad)) for x in (qs, ks, vs))
        gs, bs = F.pad(gs, (0, pad)), F.pad(bs, (0, pad))
        nc = (T + pad) // C
        qs, ks, vs = (x.view(H, nc, C, -1) for x in (qs, ks, vs))  # [H, nc, C, D]
        c = gs.view(H, nc, C).cumsum(-1)  # [H, nc, C]
        bs = bs.view(H, nc, C)
        diff = c[..., :, None] - c[..., None, :]  # [H, nc, C, C]: c_t - c_j
        decay_incl = diff.masked_fill(~lower_incl, float("-inf")).exp()
        decay_strict = diff.masked_fill(~lower_strict, float("-inf")).exp()
        A = bs[..., :, None] * decay_strict * (ks @ ks.transpose(-1, -2))
        system = eye + A
        U = torch.linalg.solve_triangular(system, bs[..., None] * vs, upper=False, unitriangular=True)
        W = torch.linalg.solve_triangular(
            system, (bs * c.exp())[..., None] * ks, upper=False, unitriangular=True
        )
        attn = decay_incl * (qs @ ks.transpose(-1, -2))  # [H, nc, C, C]
        q_decay = c.exp()[..., None] * qs
        k_tail = (c[..., -1:] - c).exp()[..., None] * ks  # decay from t to the chunk's end
        S = q.new_zeros(H, Dk, Dv, dtype=torch.float32) if initial_state is None else initial_state[i].float()
        out = torch.empty(H, nc, C, Dv, dtype=torch.float32, device=q.device)
        for j in range(nc):
            delta = U[:, j] - W[:, j] @ S  # [H, C, Dv]
            out[:, j] = q_decay[:, j] @ S + attn[:, j] @ delta
            S = c[:, j, -1, None, None].exp() * S + k_tail[:, j].transpose(-1, -2) @ delta
        o[bi, t] = out.view(H, nc * C, Dv)[:, :T].transpose(0, 1).to(o.dtype)
        states.append(S)
    return o, torch.stack(states)


def gdn_decode_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """One decode step for ``B`` sequences, each updating its own slot of ``state_pool`` in place.

    q, k: ``[B, Hk, Dk]``; v: ``[B, Hv, Dv]``; a, b: ``[B, Hv]`` (raw, before gating);
    state_pool: ``[num_slots, Hv, Dk, Dv]`` (float32 or bfloat16); state_indices: ``[B]``.
    Gating, q/k L2-norm and the recurrent step are fused here as in the GPU kernel.
    Returns ``o [B, Hv, Dv]`` in v's dtype.
    """
    if state_indices.shape != (q.shape[0],):
        raise ValueError(f"state_indices must be [B={q.shape[0]}]; got {tuple(state_indices.shape)}")
    g, beta = gdn_gating(a, b, A_log, dt_bias)
    idx = state_indices.long()
    o, final = recurrent_gated_delta_rule_ref(
        q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None], scale,
        initial_state=state_pool[idx].float(),
    )
    state_pool[idx] = final.to(state_pool.dtype)
    return o[:, 0]
