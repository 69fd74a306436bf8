"""Sparse MoE block of Qwen3.5-MoE / Qwen3-Next: routed SwiGLU experts plus a gated shared expert.

Tensor parallelism splits every expert's intermediate dimension (TP-MoE), not whole experts (EP):
at decode batch sizes EP would leave most ranks idle on the few experts a step touches and needs an
all-to-all; TP-MoE keeps every rank streaming 1/tp of each touched expert and needs only the one
all-reduce the block already ends with.
"""

from __future__ import annotations

import torch
from torch import nn

from deltaserve.distributed import all_reduce, divide, tp_rank, tp_size
from deltaserve.layers.linear import ReplicatedLinear, check_shape
from deltaserve.layers.mlp import SwiGLU
from deltaserve.models.config import ModelConfig


class Experts(nn.Module):
    """Stacked expert weights under the Qwen3.5-MoE release names.

    ``gate_up_proj [E, 2I, H]`` (gate rows, then up rows) and ``down_proj [E, H, I]``, ``I`` per rank.
    Per-expert checkpoint tensors (``experts.{e}.gate_proj.weight`` ...) load into the same tensors.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts, self.full_i = num_experts, intermediate_size
        self.i = divide(intermediate_size, tp_size(), "moe_intermediate_size")
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * self.i, hidden_size), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, self.i), requires_grad=False)
        self.gate_up_proj.weight_loader = self.load_gate_up
        self.down_proj.weight_loader = self.load_down

    def _cols(self) -> slice:
        return slice(tp_rank() * self.i, (tp_rank() + 1) * self.i)

    def load_gate_up(self, param, loaded, shard=None, name: str = "") -> None:
        """shard: None (stacked [E, 2I, H]) or (expert, "gate" | "up") for a per-expert [I, H] tensor."""
        H, c = param.shape[2], self._cols()
        if shard is None:
            check_shape(name, loaded, (self.num_experts, 2 * self.full_i, H))
            param.data[:, : self.i] = loaded[:, c]
            param.data[:, self.i :] = loaded[:, self.full_i + c.start : self.full_i + c.stop]
            return
        e, part = shard
        check_shape(name, loaded, (self.full_i, H))
        rows = slice(0, self.i) if part == "gate" else slice(self.i, 2 * self.i)
        param.data[e, rows] = loaded[c]

    def load_down(self, param, loaded, shard=None, name: str = "") -> None:
        """shard: None (stacked [E, H, I]) or (expert, "down") for a per-expert [H, I] tensor."""
        H, c = param.shape[1], self._cols()
        if shard is None:
            check_shape(name, loaded, (self.num_experts, H, self.full_i))
            param.data.copy_(loaded[:, :, c])
            return
        check_shape(name, loaded, (H, self.full_i))
        param.data[shard[0]] = loaded[:, c]


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H = cfg.hidden_size
        self.top_k, self.renormalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = ReplicatedLinear(H, cfg.num_experts)
        self.experts = Experts(cfg.num_experts, H, cfg.moe_intermediate_size)
        self.shared_expert = SwiGLU(H, cfg.shared_expert_intermediate_size, reduce=False)
        self.shared_expert_gate = ReplicatedLinear(H, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from deltaserve.ops.fused_moe import moe_route

        weights, ids = moe_route(self.gate(x), self.top_k, self.renormalize)  # [T, k] each
        routed = torch.ops.deltaserve.moe_experts(x, self.experts.gate_up_proj, self.experts.down_proj, weights, ids)
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return all_reduce(routed + shared)


# A custom op, so torch.compile sees one node (the CPU reference loops over the experts that were hit).
@torch.library.custom_op("deltaserve::moe_experts", mutates_args=())
def moe_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor) -> torch.Tensor:
    from deltaserve.ops.fused_moe import fused_moe

    return fused_moe(x, w13, w2, topk_weights, topk_ids)


@moe_experts.register_fake
def _(x, w13, w2, topk_weights, topk_ids):
    return torch.empty_like(x)
