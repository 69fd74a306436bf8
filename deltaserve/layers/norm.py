"""RMSNorms of Qwen3.5 / Qwen3-Next.

Every norm is zero-centred (``x_hat * (1 + w)``, weights stored around 0) except the GDN output norm,
``RMSNormGated``: plain ``x_hat * w``, then ``* silu(z)``. Statistics are computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: ``(x / rms(x)) * (1 + weight)``."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (_rms(x, self.eps) * (1.0 + self.weight.float())).to(x.dtype)


class RMSNormGated(nn.Module):
    """GDN output norm: ``weight * (o / rms(o)) * silu(z)`` per value head (``dim = Dv``)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # HF rounds the normalised value to the input dtype before the weight: match it for bf16 parity.
        y = self.weight * _rms(o, self.eps).to(o.dtype)
        return (y.float() * F.silu(z.float())).to(o.dtype)
