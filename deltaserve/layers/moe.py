"""Sparse MoE block of Qwen3.5-MoE / Qwen3-Next: routed SwiGLU experts plus a gated shared expert.

``out = sum_k w_k · expert_{id_k}(x) + sigmoid(x · shared_expert_gate) · shared_expert(x)``. When the
shared expert is as wide as a routed one (every released checkpoint), it is stored as one more expert,
index E, and the router gives every token a slot k with that id and the sigmoid weight: the whole block
is then the router kernel and the experts' two GEMM launches (at a few tokens), plus the all-reduce.
Other widths keep a separate SwiGLU for the shared expert.

Tensor parallelism splits every expert's intermediate dimension (TP-MoE), not whole experts (EP):
at decode batch sizes EP would leave most ranks idle on the few experts a step touches and needs an
all-to-all; TP-MoE keeps every rank streaming 1/tp of each touched expert and needs only the one
all-reduce the block already ends with.
"""

from __future__ import annotations

import torch
from torch import nn

from deltaserve.distributed import all_reduce, divide, tp_rank, tp_size
from deltaserve.layers.layer_ref import CompileOp
from deltaserve.layers.linear import ReplicatedLinear, check_shape, linear
from deltaserve.layers.mlp import SwiGLU
from deltaserve.models.config import ModelConfig


def folds_shared_expert(cfg: ModelConfig) -> bool:
    """Whether the shared expert is stored as routed expert E (same width, so the same kernels)."""
    return cfg.shared_expert_intermediate_size == cfg.moe_intermediate_size


class Experts(nn.Module):
    """Stacked expert weights under the Qwen3.5-MoE release names.

    ``gate_up_proj [E', 2I, H]`` (gate rows, then up rows) and ``down_proj [E', H, I]``, ``I`` per rank;
    ``E' = E + 1`` with ``shared_slot`` (index E holds the shared expert), else ``E``. Per-expert
    checkpoint tensors (``experts.{e}.gate_proj.weight`` ..., and the shared expert's, as ``e = E``) load
    into the same tensors, as do the stacked ``experts.gate_up_proj`` / ``down_proj`` (rows ``[0, E)``).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, shared_slot: bool = False):
        super().__init__()
        self.num_experts, self.full_i = num_experts, intermediate_size
        self.i = divide(intermediate_size, tp_size(), "moe_intermediate_size")
        slots = num_experts + shared_slot
        self.gate_up_proj = nn.Parameter(torch.empty(slots, 2 * self.i, hidden_size), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(slots, hidden_size, self.i), requires_grad=False)
        self.gate_up_proj.weight_loader = self.load_gate_up
        self.down_proj.weight_loader = self.load_down

    def _cols(self) -> slice:
        return slice(tp_rank() * self.i, (tp_rank() + 1) * self.i)

    def load_gate_up(self, param, loaded, shard=None, name: str = "") -> None:
        """shard: None (stacked [E, 2I, H]) or (expert, "gate" | "up") for a per-expert [I, H] tensor."""
        H, c, E = param.shape[2], self._cols(), self.num_experts
        if shard is None:
            check_shape(name, loaded, (E, 2 * self.full_i, H))
            param.data[:E, : self.i] = loaded[:, c]
            param.data[:E, self.i :] = loaded[:, self.full_i + c.start : self.full_i + c.stop]
            return
        e, part = shard
        check_shape(name, loaded, (self.full_i, H))
        rows = slice(0, self.i) if part == "gate" else slice(self.i, 2 * self.i)
        param.data[e, rows] = loaded[c]

    def load_down(self, param, loaded, shard=None, name: str = "") -> None:
        """shard: None (stacked [E, H, I]) or (expert, "down") for a per-expert [H, I] tensor."""
        H, c, E = param.shape[1], self._cols(), self.num_experts
        if shard is None:
            check_shape(name, loaded, (E, H, self.full_i))
            param.data[:E].copy_(loaded[:, :, c])
            return
        check_shape(name, loaded, (H, self.full_i))
        param.data[shard[0]] = loaded[:, c]


ROUTERS = ("kernel", "gemm")
# The router GEMM ([E + 1, H], 1 MB on the 35B-A3B shape) by cuBLAS: 3.0 us at one token but 7.6-7.9 at
# 4-16 (a poor kernel choice for 257 rows); the split-K skinny GEMM: 4.1-4.2 at all of them (H200,
# docs/perf/2026-11-28e.md). So with skinny_router the skinny GEMM takes 2 tokens and up.
ROUTER_SKINNY_MIN_TOKENS = 2


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H = cfg.hidden_size
        self.top_k, self.renormalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.fold_shared = folds_shared_expert(cfg)
        self.gate = ReplicatedLinear(H, cfg.num_experts)
        self.experts = Experts(cfg.num_experts, H, cfg.moe_intermediate_size, shared_slot=self.fold_shared)
        if not self.fold_shared:
            self.shared_expert = SwiGLU(H, cfg.shared_expert_intermediate_size, reduce=False)
        self.shared_expert_gate = ReplicatedLinear(H, 1)
        self.router = "kernel"
        self.router_weight: torch.Tensor | None = None  # [E (+1), H], only for router="gemm"
        # router="gemm" at ROUTER_SKINNY_MIN_TOKENS..SKINNY_MAX_TOKENS tokens on our skinny GEMM (split-K)
        self.skinny_router = False

    def set_router(self, impl: str) -> None:
        """``kernel``: the fused router launch (``ops/moe_router.moe_router``). ``gemm``: one GEMM over
        ``[w_gate; w_shared_gate]`` -- concatenated here once, after loading: one extra expert row of
        memory -- then the per-token top-k launch (``moe_route_logits``)."""
        if impl not in ROUTERS:
            raise ValueError(f"MoE router {impl!r} must be one of {ROUTERS}")
        self.router = impl
        rows = [self.gate.weight] + ([self.shared_expert_gate.weight] if self.fold_shared else [])
        self.router_weight = torch.cat(rows) if impl == "gemm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.router == "gemm":
            skinny = self.skinny_router and x.shape[0] >= ROUTER_SKINNY_MIN_TOKENS
            weights, ids = moe_route_logits_op(linear(x, self.router_weight, skinny), self.top_k,
                                                                 self.renormalize, self.fold_shared)
        else:
            shared_gate = self.shared_expert_gate.weight if self.fold_shared else None
            weights, ids = moe_router_op(x, self.gate.weight, shared_gate, self.top_k,
                                                           self.renormalize)  # [T, k (+1)] each
        out = moe_experts(x, self.experts.gate_up_proj, self.experts.down_proj, weights, ids)
        if not self.fold_shared:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return all_reduce(out)


# Custom ops, so torch.compile sees one node each (the Triton launches and the CPU references stay opaque).
@CompileOp.define("deltaserve::moe_router")
def moe_router_op(x: torch.Tensor, w_gate: torch.Tensor, w_shared_gate: torch.Tensor | None, top_k: int,
                  renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from deltaserve.ops.moe_router import moe_router

    return moe_router(x, w_gate, top_k, renormalize, w_shared_gate)


@moe_router_op.register_fake
def _(x, w_gate, w_shared_gate, top_k, renormalize):
    k = top_k + (w_shared_gate is not None)
    return x.new_empty(x.shape[0], k, dtype=torch.float32), x.new_empty(x.shape[0], k, dtype=torch.int32)


@CompileOp.define("deltaserve::moe_route_logits")
def moe_route_logits_op(logits: torch.Tensor, top_k: int, renormalize: bool,
                        has_shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from deltaserve.ops.moe_router import moe_route_logits

    return moe_route_logits(logits, top_k, renormalize, has_shared)


@moe_route_logits_op.register_fake
def _(logits, top_k, renormalize, has_shared):
    k = top_k + has_shared
    return (logits.new_empty(logits.shape[0], k, dtype=torch.float32),
            logits.new_empty(logits.shape[0], k, dtype=torch.int32))


@CompileOp.define("deltaserve::moe_experts")
def moe_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor) -> torch.Tensor:
    from deltaserve.ops.fused_moe import fused_moe

    return fused_moe(x, w13, w2, topk_weights, topk_ids)


@moe_experts.register_fake
def _(x, w13, w2, topk_weights, topk_ids):
    return torch.empty_like(x)
