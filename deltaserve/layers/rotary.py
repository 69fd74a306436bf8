"""Partial NeoX rotary embedding (the first ``rotary_dim`` of each head's dims rotate).

Qwen3.5 declares interleaved M-RoPE (``mrope_section``); for text-only input its three position rows
are equal, every section then sees the same angle, and it reduces exactly to this 1-D RoPE.
cos/sin are computed from the positions on the fly (a few thousand flops), so no
``max_position_embeddings``-sized table is allocated and CUDA graphs need no extra buffers.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
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

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions ``[T]``; q ``[T, Hq, D]``, k ``[T, Hk, D]`` -> rotated q, k (same shapes and dtype)."""
        freqs = positions.float()[:, None] * self.inv_freq[None]  # [T, rot/2]
        cos, sin = freqs.cos()[:, None], freqs.sin()[:, None]  # [T, 1, rot/2]
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = self.rotary_dim // 2
        x1, x2 = x[..., :half].float(), x[..., half : self.rotary_dim].float()
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
        return torch.cat([rotated, x[..., self.rotary_dim :]], dim=-1)
