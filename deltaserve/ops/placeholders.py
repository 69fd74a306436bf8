"""Pending-token placeholders resolved in place, in one launch.

Under async scheduling a decode input whose token the host has not seen yet is the placeholder
``-1 - row``: row ``row`` of the previous step's sampled tokens, still on the device. The reference,
:func:`deltaserve.engine.batch.resolve_placeholders`, is five small PyTorch kernels (negate, clamp,
gather, compare, select); each costs a few microseconds of GPU time between two decode steps, which is
where a small-active MoE step has none to spare. This kernel is one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 256


@triton.jit
def _resolve_kernel(ids_ptr, prev_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    ids = tl.load(ids_ptr + offs, mask=ok, other=0)
    pending = ok & (ids < 0)
    sampled = tl.load(prev_ptr + tl.where(pending, -1 - ids, 0), mask=pending, other=0)
    tl.store(ids_ptr + offs, sampled.to(ids.dtype), mask=pending)


def resolve_placeholders_(ids: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Replace each ``-1 - row`` of the 1-D int64 ``ids`` by ``prev[row]``, in place; returns ``ids``.
    No host sync: safe to queue behind the step that writes ``prev`` and inside a CUDA graph."""
    if ids.dim() != 1 or not ids.is_contiguous() or prev.dim() != 1:
        raise ValueError(f"resolve_placeholders_ needs contiguous 1-D ids and 1-D prev; got {tuple(ids.shape)} "
                         f"(contiguous={ids.is_contiguous()}) and {tuple(prev.shape)}")
    n = ids.numel()
    if n:
        _resolve_kernel[(triton.cdiv(n, BLOCK),)](ids, prev, n, BLOCK=BLOCK)
    return ids
