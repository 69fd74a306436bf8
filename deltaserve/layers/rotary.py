"""Partial NeoX rotary embedding: the layer's ``inv_freq`` (the rotation itself is ``ops/qk_norm_rope.py``).

Qwen3.5 declares interleaved M-RoPE (``mrope_section``); for text-only input its three position rows
are equal, every section then sees the same angle, and it reduces exactly to 1-D RoPE on the first
``rotary_dim`` dims of each head. cos/sin are computed from the positions on the fly (in the fused
q/k kernel), so no ``max_position_embeddings``-sized table is allocated and CUDA graphs need no extra
buffers.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Holds ``inv_freq [rotary_dim / 2]`` fp32 = ``1 / theta ** (2i / rotary_dim)``, computed as HF does."""

    def __init__(self, rotary_dim: int, theta: float):
        super().__init__()
        self.rotary_dim = rotary_dim
        self.theta = theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        exps = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32) / self.rotary_dim
        return 1.0 / (self.theta**exps)

    def reset_buffers(self) -> None:
        """Recompute the buffer after a meta-device init."""
        self.inv_freq = self._inv_freq().to(self.inv_freq.device)
