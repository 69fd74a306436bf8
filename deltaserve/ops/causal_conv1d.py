"""Causal depthwise conv1d with state: the plain-PyTorch reference.

The GDN mixer convolves ``[q|k|v]`` (``D = conv_dim`` channels) with a width-``W`` causal kernel.
A sequence's conv state is a **ring of W entries** indexed by absolute token position: the input of
the token at position ``t`` lives at ``t % W``. A decode step at position ``t`` reads entries
``t-W+1 .. t-1`` and writes its own input at ``t % W`` -- the one entry nobody reads in that step --
so a fused kernel whose programs each recompute part of the convolution never races with itself,
and no state is shifted. Entries for negative positions hold zeros.

Pools are channel-last, ``[num_slots, W, D]``, so a kernel reads a block of channels contiguously.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(x: torch.Tensor, weight: torch.Tensor, conv_states: torch.Tensor | None) -> int:
    if x.dim() != 2:
        raise ValueError(f"x must be [T, D]; got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"weight must be [D={x.shape[1]}, W]; got {tuple(weight.shape)}")
    W = weight.shape[1]
    if conv_states is not None and conv_states.shape[1:] != (W, x.shape[1]):
        raise ValueError(f"conv_states must be [S, W={W}, D={x.shape[1]}]; got {tuple(conv_states.shape)}")
    return W


def ring_read(conv_states: torch.Tensor, slot: int, end: int) -> torch.Tensor:
    """The ``W-1`` inputs before absolute position ``end`` (oldest first) as ``[W-1, D]``."""
    W = conv_states.shape[1]
    pos = torch.arange(end - W + 1, end, device=conv_states.device)
    out = conv_states[slot, pos % W].clone()
    out[pos < 0] = 0
    return out


def ring_write(conv_states: torch.Tensor, slot: int, end: int, last: torch.Tensor) -> None:
    """Store ``last [W-1, D]`` (the inputs at positions ``end-W+1 .. end-1``) into the ring."""
    W = conv_states.shape[1]
    pos = torch.arange(end - W + 1, end, device=conv_states.device)
    conv_states[slot, pos % W] = torch.where((pos >= 0)[:, None], last, 0).to(conv_states.dtype)


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    cu_seqlens: torch.Tensor,
    context_lens: torch.Tensor,
    conv_states: torch.Tensor | None = None,
    state_indices: torch.Tensor | None = None,
    activation: bool = True,
) -> torch.Tensor:
    """Varlen prefill (or prefill chunk). x: ``[T, D]`` packed by ``cu_seqlens [N + 1]``.

    ``context_lens [N]``: tokens of each sequence already processed (0 for a fresh prompt). With
    ``conv_states [S, W, D]`` and ``state_indices [N]`` a sequence with context continues from its
    slot's ring, and every sequence leaves its last ``W - 1`` inputs there.
    Returns ``silu(conv(x))`` (``activation=True``) as ``[T, D]`` in x's dtype.
    """
    W = _check(x, weight, conv_states)
    bounds = cu_seqlens.tolist()
    n = len(bounds) - 1
    if conv_states is not None and (state_indices is None or state_indices.shape != (n,)):
        raise ValueError(f"state_indices must be [N={n}] when conv_states is given")
    out = torch.empty_like(x)
    w = weight.float()[:, None, :]  # [D, 1, W]
    for i in range(n):
        ctx = int(context_lens[i])
        xs = x[bounds[i] : bounds[i + 1]].float()  # [L, D]
        prev = xs.new_zeros(W - 1, x.shape[1])
        if conv_states is not None and ctx > 0:
            prev = ring_read(conv_states, int(state_indices[i]), ctx).float()
        full = torch.cat([prev, xs])  # [W-1+L, D]
        y = F.conv1d(full.t()[None], w, groups=x.shape[1])[0].t()  # [L, D]
        out[bounds[i] : bounds[i + 1]] = (F.silu(y) if activation else y).to(x.dtype)
        if conv_states is not None:
            ring_write(conv_states, int(state_indices[i]), ctx + len(xs), full[-(W - 1) :])
    return out


def causal_conv1d_update_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_states: torch.Tensor,
    state_indices: torch.Tensor,
    positions: torch.Tensor,
    activation: bool = True,
) -> torch.Tensor:
    """One decode token per sequence. x: ``[B, D]``; ``positions [B]``: each token's absolute position.

    Reads ring entries ``positions-W+1 .. positions-1`` of each slot and writes x at ``positions % W``.
    Returns ``silu(w . window)`` as ``[B, D]`` in x's dtype.
    """
    W = _check(x, weight, conv_states)
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        slot, t = int(state_indices[b]), int(positions[b])
        window = torch.cat([ring_read(conv_states, slot, t).float(), x[b, None].float()])  # [W, D]
        y = (window * weight.float().t()).sum(0)
        conv_states[slot, t % W] = x[b].to(conv_states.dtype)
        out[b] = (F.silu(y) if activation else y).to(x.dtype)
    return out
