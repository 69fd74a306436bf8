"""Causal depthwise conv1d with ring states: Triton kernels for varlen prefill and one-token decode.

Same contracts as :func:`deltaserve.ops.causal_conv1d.causal_conv1d_ref` and
:func:`~deltaserve.ops.causal_conv1d.causal_conv1d_update_ref`. A sequence's conv state is a ring of
``W`` entries (``conv_states [S, W, D]``, channel-last): the input of the token at absolute position
``t`` lives at entry ``t % W``, entries for negative positions hold zeros.

Prefill invariant (why one launch is race-free): a program owns one (sequence, time tile, channel
block). Only tile 0 reads the ring (its first ``W-1`` tokens look back into it); only the last tile
writes it. A write can clobber an entry that is still to be read only if the written position is
``< ctx + W - 1``, i.e. only when the chunk is shorter than ``2W - 2`` tokens -- and then it has a
single tile (``BT >= 2W - 2``), which reads before a barrier and writes after it. Ring entries that
already hold the right position (chunk shorter than ``W - 1`` with context) are left alone.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltaserve.ops.pdl import launch_args, pdl_gate

# Prefill tile: BT tokens x BD channels. BT must be >= 2W - 2 (see the module invariant).
_PREFILL_BT = 32
_PREFILL_BD = 128
_UPDATE_BD = 256


@triton.jit
def conv_decode_channels(x_row, w_ptr, ring, ch, mask, t, D: tl.constexpr, W: tl.constexpr):
    """One decode token's conv for channels ``ch`` (pre-activation, fp32) and its raw input.

    ``x_row`` points at the token's row, ``ring`` at its slot's ``[W, D]`` ring, ``t`` is the
    absolute position (int64). Reads entries ``t-W+1 .. t-1`` (zeros for negative positions).
    """
    # Oldest tap first, as the reference sums, so that bf16-rounded outputs rarely differ by an ulp.
    acc = tl.zeros(ch.shape, dtype=tl.float32)
    for j in tl.static_range(W - 1):
        p = t - (W - 1) + j
        entry = (p + W) % W  # p >= -(W-1) for t >= 0, so p + W > 0
        prev = tl.load(ring + entry * D + ch, mask=mask & (p >= 0), other=0.0)
        acc += prev.to(tl.float32) * tl.load(w_ptr + ch * W + j, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_row + ch, mask=mask, other=0.0)
    acc += x.to(tl.float32) * tl.load(w_ptr + ch * W + (W - 1), mask=mask, other=0.0).to(tl.float32)
    return acc, x


@triton.jit
def _conv1d_update_kernel(
    x_ptr, w_ptr, out_ptr, states_ptr, idx_ptr, pos_ptr,
    stride_x, stride_o,
    D: tl.constexpr, W: tl.constexpr, BD: tl.constexpr, ACTIVATION: tl.constexpr, PDL: tl.constexpr,
):
    pdl_gate(PDL)
    i_b = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1) * BD + tl.arange(0, BD)
    mask = ch < D
    slot = tl.load(idx_ptr + i_b).to(tl.int64)
    t = tl.load(pos_ptr + i_b).to(tl.int64)
    ring = states_ptr + slot * (W * D)
    acc, x = conv_decode_channels(x_ptr + i_b * stride_x, w_ptr, ring, ch, mask, t, D, W)
    # Entry t % W is the one entry this step does not read: no race with the loads above. The
    # double modulo keeps a (padding) row with a negative position inside its slot.
    tl.store(ring + ((t % W + W) % W) * D + ch, x.to(states_ptr.dtype.element_ty), mask=mask)
    if ACTIVATION:
        acc = acc * tl.sigmoid(acc)
    tl.store(out_ptr + i_b * stride_o + ch, acc.to(out_ptr.dtype.element_ty), mask=mask)


# N (the batch's sequence count) and the metadata's alignment (slices past a mixed step's decodes) vary per
# step; neither needs a specialisation (the metadata is read one entry at a time).
@triton.jit(do_not_specialize=["N"], do_not_specialize_on_alignment=["cu_ptr", "ctx_ptr", "idx_ptr"])
def _conv1d_prefill_kernel(
    x_ptr, w_ptr, out_ptr, cu_ptr, ctx_ptr, states_ptr, idx_ptr,
    N, stride_x, stride_o,
    D: tl.constexpr, W: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    WP: tl.constexpr, HAS_STATE: tl.constexpr, ACTIVATION: tl.constexpr, PDL: tl.constexpr,
):
    pdl_gate(PDL)
    pid = tl.program_id(0)
    # Map this program to (sequence, tile) on the device: every sequence has max(ceil(L/BT), 1)
    # tiles (an empty one still writes its ring), tiles are numbered sequence after sequence.
    o_n = tl.arange(0, NP)
    m_n = o_n < N
    lens = tl.load(cu_ptr + o_n + 1, mask=m_n, other=0) - tl.load(cu_ptr + o_n, mask=m_n, other=0)
    tiles = tl.where(m_n, tl.maximum((lens + BT - 1) // BT, 1), 0)
    first = tl.cumsum(tiles, 0) - tiles  # [NP] first tile of each sequence
    if pid >= tl.sum(tiles, 0):
        return
    seq = tl.sum((m_n & (first <= pid)).to(tl.int32), 0) - 1
    tb = pid - tl.sum(tl.where(o_n == seq, first, 0), 0)
    n_tiles = tl.sum(tl.where(o_n == seq, tiles, 0), 0)
    start = tl.load(cu_ptr + seq).to(tl.int64)
    L = tl.load(cu_ptr + seq + 1).to(tl.int64) - start

    ch = tl.program_id(1) * BD + tl.arange(0, BD)
    m_c = ch < D
    r = tb * BT + tl.arange(0, BT)  # [BT] positions relative to the chunk start
    m_r = r < L
    if HAS_STATE:
        ctx = tl.load(ctx_ptr + seq).to(tl.int64)
        ring = states_ptr + tl.load(idx_ptr + seq).to(tl.int64) * (W * D)

    acc = tl.zeros([BT, BD], dtype=tl.float32)
    for j in tl.static_range(W):
        s = r - (W - 1) + j  # [BT] chunk-relative position of tap j's input
        w_j = tl.load(w_ptr + ch * W + j, mask=m_c, other=0.0).to(tl.float32)
        m_x = (m_r & (s >= 0))[:, None] & m_c[None, :]
        val = tl.load(x_ptr + (start + s)[:, None] * stride_x + ch[None, :], mask=m_x, other=0.0).to(tl.float32)
        if HAS_STATE:
            p = ctx + s  # absolute position; the ring holds ctx-W+1 .. ctx-1
            m_ring = (m_r & (s < 0) & (p >= 0))[:, None] & m_c[None, :]
            prev = tl.load(ring + ((p + W) % W)[:, None] * D + ch[None, :], mask=m_ring, other=0.0)
            val += prev.to(tl.float32)
        acc += val * w_j[None, :]
    if ACTIVATION:
        acc = acc * tl.sigmoid(acc)
    m_out = m_r[:, None] & m_c[None, :]
    tl.store(out_ptr + (start + r)[:, None] * stride_o + ch[None, :], acc.to(out_ptr.dtype.element_ty), mask=m_out)

    if HAS_STATE:
        if tb == n_tiles - 1:
            tl.debug_barrier()  # every ring read of this program happens before the writes below
            o_m = tl.arange(0, WP)
            rel = L - (W - 1) + o_m  # the last W-1 positions, chunk-relative
            p_last = ctx + rel
            from_x = (o_m < W - 1) & (rel >= 0)
            zero = (o_m < W - 1) & (p_last < 0)  # positions before the sequence start
            last = tl.load(x_ptr + (start + rel)[:, None] * stride_x + ch[None, :],
                           mask=from_x[:, None] & m_c[None, :], other=0.0)
            tl.store(ring + ((p_last + W) % W)[:, None] * D + ch[None, :], last.to(states_ptr.dtype.element_ty),
                     mask=(from_x | zero)[:, None] & m_c[None, :])


def _check_common(x: torch.Tensor, weight: torch.Tensor, conv_states: torch.Tensor | None) -> int:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [T, D] with contiguous channels; got shape {tuple(x.shape)}, strides {x.stride()}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[1] or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous [D={x.shape[1]}, W]; got {tuple(weight.shape)}")
    W = weight.shape[1]
    if not 2 <= W <= _PREFILL_BT // 2 + 1:
        raise ValueError(f"conv kernel width W={W} must be in [2, {_PREFILL_BT // 2 + 1}]")
    if conv_states is not None:
        if conv_states.dim() != 3 or conv_states.shape[1:] != (W, x.shape[1]) or not conv_states.is_contiguous():
            raise ValueError(
                f"conv_states must be a contiguous [S, W={W}, D={x.shape[1]}]; got {tuple(conv_states.shape)}"
            )
        if conv_states.device != x.device:
            raise ValueError(f"conv_states is on {conv_states.device} but x is on {x.device}")
    return W


def _check_index(name: str, t: torch.Tensor, n: int) -> None:
    if t.shape != (n,) or t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be an int32/int64 tensor of shape [{n}]; got {t.dtype} {tuple(t.shape)}")


def causal_conv1d_prefill(
    x: torch.Tensor,
    weight: torch.Tensor,
    cu_seqlens: torch.Tensor,
    context_lens: torch.Tensor,
    conv_states: torch.Tensor | None,
    state_indices: torch.Tensor | None,
    activation: bool = True,
) -> torch.Tensor:
    """Varlen causal conv1d (prefill or prefill chunk) continuing from and updating ring states.

    x: ``[T, D]`` packed by ``cu_seqlens [N + 1]``; weight: ``[D, W]``; context_lens: ``[N]`` tokens
    already processed per sequence (the ring is read only where it is > 0); conv_states:
    ``[S, W, D]`` (or None: no state is read or written); state_indices: ``[N]`` slots.
    Every sequence leaves its last ``W - 1`` inputs in its ring. Returns ``silu(conv(x))``
    (``activation=True``) as ``[T, D]`` in x's dtype. One launch, no host synchronisation.
    """
    W = _check_common(x, weight, conv_states)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be [N + 1] with N >= 1; got {tuple(cu_seqlens.shape)}")
    n = cu_seqlens.numel() - 1
    _check_index("cu_seqlens", cu_seqlens, n + 1)
    _check_index("context_lens", context_lens, n)
    if conv_states is not None:
        if state_indices is None:
            raise ValueError("state_indices is required when conv_states is given")
        _check_index("state_indices", state_indices, n)
    T, D = x.shape
    out = torch.empty((T, D), dtype=x.dtype, device=x.device)
    has_state = conv_states is not None
    # At most ceil(T / BT) + N tiles exist; surplus programs return at once.
    grid = (triton.cdiv(T, _PREFILL_BT) + n, triton.cdiv(D, _PREFILL_BD))
    _conv1d_prefill_kernel[grid](
        x, weight, out, cu_seqlens, context_lens,
        conv_states if has_state else x, state_indices if has_state else cu_seqlens,
        n, x.stride(0), out.stride(0),
        D=D, W=W, NP=max(16, triton.next_power_of_2(n)), BT=_PREFILL_BT, BD=_PREFILL_BD,  # NP: few variants
        WP=triton.next_power_of_2(W - 1), HAS_STATE=has_state, ACTIVATION=activation, **launch_args(),
    )
    return out


def causal_conv1d_update(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_states: torch.Tensor,
    state_indices: torch.Tensor,
    positions: torch.Tensor,
    activation: bool = True,
) -> torch.Tensor:
    """One decode token per sequence. x: ``[B, D]`` (rows may be strided); weight: ``[D, W]``;
    conv_states: ``[S, W, D]``; state_indices, positions: ``[B]`` (slot, absolute position).

    Reads ring entries ``positions-W+1 .. positions-1`` and writes x at ``positions % W``.
    Returns ``silu(w . window)`` as ``[B, D]`` in x's dtype.
    """
    W = _check_common(x, weight, conv_states)
    B, D = x.shape
    _check_index("state_indices", state_indices, B)
    _check_index("positions", positions, B)
    out = torch.empty((B, D), dtype=x.dtype, device=x.device)
    if B == 0:
        return out
    _conv1d_update_kernel[(B, triton.cdiv(D, _UPDATE_BD))](
        x, weight, out, conv_states, state_indices, positions,
        x.stride(0), out.stride(0),
        D=D, W=W, BD=_UPDATE_BD, ACTIVATION=activation, **launch_args(),
    )
    return out
