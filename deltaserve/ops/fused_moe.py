"""Routed experts of a sparse MoE block (Qwen3.5-MoE, Qwen3-Next): reference and dispatch.

The block computes ``sum_k w_k · expert_{id_k}(x)`` per token, each expert a SwiGLU
``down(silu(gate(x)) · up(x))`` of width ``I``. Weights are stacked: ``w13 [E, 2I, H]`` (the gate
rows, then the up rows) and ``w2 [E, H, I]``. A shared expert of the same width folds in as one more
expert that every token routes to (``layers/moe.py``); the routing comes from ``ops/moe_router.py``.

On CUDA ``fused_moe`` runs the Triton kernels of ``fused_moe_triton`` (two launches for a few tokens,
four for larger batches; no host sync, CUDA-graph safe); on the CPU it runs ``fused_moe_ref`` unless
``force_triton`` (tests run Triton's interpreter that way).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from deltaserve.ops.fused_moe_triton import MoeConfig


def _check(x, w13, w2, topk_weights, topk_ids) -> None:
    """Shape/dtype/device checks only: reading the ids' values would sync the host."""
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H]; got {tuple(x.shape)}")
    T, H = x.shape
    if w2.dim() != 3 or w2.shape[1] != H:
        raise ValueError(f"w2 must be [E, H={H}, I]; got {tuple(w2.shape)}")
    E, I = w2.shape[0], w2.shape[2]
    if w13.shape != (E, 2 * I, H):
        raise ValueError(f"w13 must be [E={E}, 2I={2 * I}, H={H}]; got {tuple(w13.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T or topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_ids and topk_weights must both be [T={T}, k]; got {tuple(topk_ids.shape)} "
            f"and {tuple(topk_weights.shape)}"
        )
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32 or int64; got {topk_ids.dtype}")
    if not (x.dtype == w13.dtype == w2.dtype):
        raise ValueError(f"x, w13, w2 must share a dtype; got {x.dtype}, {w13.dtype}, {w2.dtype}")
    devices = {t.device for t in (x, w13, w2, topk_weights, topk_ids)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device; got {sorted(map(str, devices))}")


def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Reference: loop over the experts that were hit, fp32 math. Shapes as ``fused_moe``."""
    _check(x, w13, w2, topk_weights, topk_ids)
    I = w2.shape[2]
    xf = x.float()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, H]
    for e in topk_ids.unique().tolist():
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)  # [n], [n]
        gu = xf[tok] @ w13[e].float().t()  # [n, 2I]
        h = F.silu(gu[:, :I]) * gu[:, I:]  # [n, I]
        y = h @ w2[e].float().t()  # [n, H]
        out.index_add_(0, tok, y * topk_weights[tok, slot].float()[:, None])
    return out.to(x.dtype)


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    force_triton: bool = False,
    config: MoeConfig | None = None,
) -> torch.Tensor:
    """Routed experts: ``out[t] = sum_k topk_weights[t, k] · expert_{topk_ids[t, k]}(x[t])``.

    x ``[T, H]``; w13 ``[E, 2I, H]`` (gate rows then up rows); w2 ``[E, H, I]``;
    topk_weights ``[T, k]`` (any float dtype); topk_ids ``[T, k]`` int32/int64, each in ``[0, E)``
    and distinct within a row (as ``torch.topk`` gives; not checked, that would sync the host).
    Returns ``[T, H]`` in x's dtype. ``config`` (a ``MoeConfig``) overrides the tile table.
    On CUDA (or with ``force_triton``) this runs the Triton kernels: no host sync, graph-capturable.
    """
    _check(x, w13, w2, topk_weights, topk_ids)
    if not (x.is_cuda or force_triton):
        return fused_moe_ref(x, w13, w2, topk_weights, topk_ids)
    from deltaserve.ops.fused_moe_triton import fused_moe_triton  # triton is a GPU extra

    if x.shape[0] == 0:
        return x.new_empty(x.shape)
    # The kernels index the last dim with unit stride; these are no-ops for the usual layouts.
    x, w13, w2 = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, w13, w2))
    return fused_moe_triton(x, w13, w2, topk_weights.contiguous(), topk_ids.contiguous(), config)
