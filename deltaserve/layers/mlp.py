"""Dense SwiGLU MLP: ``down(silu(gate(x)) * up(x))`` with gate and up merged into one GEMM."""

from __future__ import annotations

import torch
from torch import nn

from deltaserve.layers.layer_ref import CompileOp
from deltaserve.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from deltaserve.ops.norms import silu_and_mul


class SwiGLU(nn.Module):
    """``reduce=False`` leaves the row-parallel sum to the caller (the MoE block reduces once)."""

    def __init__(self, hidden_size: int, intermediate_size: int, reduce: bool = True):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, "intermediate_size")
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, reduce=reduce, what="intermediate_size")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_silu_and_mul(self.gate_up_proj(x)))


@CompileOp.define("deltaserve::silu_and_mul")
def _silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return silu_and_mul(gate_up)  # one kernel on the GPU (ops/norms.py)


@_silu_and_mul.register_fake
def _(gate_up):
    return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)
