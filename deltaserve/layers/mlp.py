"""Dense SwiGLU MLP: ``down(silu(gate(x)) * up(x))`` with gate and up merged into one GEMM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltaserve.layers.linear import MergedColumnParallelLinear, RowParallelLinear


class SwiGLU(nn.Module):
    """``reduce=False`` leaves the row-parallel sum to the caller (the MoE block reduces once)."""

    def __init__(self, hidden_size: int, intermediate_size: int, reduce: bool = True):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, "intermediate_size")
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, reduce=reduce, what="intermediate_size")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj.split(self.gate_up_proj(x))
        return self.down_proj(F.silu(gate) * up)
