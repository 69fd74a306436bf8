"""RMSNorms of Qwen3.5 / Qwen3-Next.

Every norm is zero-centred (``x_hat * (1 + w)``, weights stored around 0) except the GDN output norm,
``RMSNormGated``: plain ``x_hat * w``, then ``* silu(z)``. Statistics are computed in float32. On the GPU
each is one fused kernel (``ops/norms.py``), the residual add included; the ops are registered as
custom ops so torch.compile treats them as single nodes.
"""

from __future__ import annotations

import torch
from torch import nn

from deltaserve.layers.layer_ref import CompileOp
from deltaserve.ops import norms


@CompileOp.define("deltaserve::rms_norm")
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return norms.rms_norm(x, weight, eps)


@_rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@CompileOp.define("deltaserve::add_rms_norm")
def _add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return norms.rms_norm(x, weight, eps, residual=residual)


@_add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


@CompileOp.define("deltaserve::rms_norm_gated")
def _rms_norm_gated(o: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return norms.rms_norm_gated(o, z, weight, eps)


@_rms_norm_gated.register_fake
def _(o, z, weight, eps):
    return torch.empty_like(o)


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: ``(x / rms(x)) * (1 + weight)``.

    With ``residual``: returns ``(norm(x + residual), x + residual)`` -- the add fused into the norm.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return _rms_norm(x, self.weight, self.eps)
        return _add_rms_norm(x, residual, self.weight, self.eps)

    def with_residual(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A decoder layer's input norm: ``(norm(x + residual), x + residual)``; at layer 0 (no residual
        yet) ``(norm(x), x)``."""
        return (self(x), x) if residual is None else self(x, residual)


class RMSNormGated(nn.Module):
    """GDN output norm: ``weight * (o / rms(o)) * silu(z)`` per value head (``dim = Dv``)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return _rms_norm_gated(o, z, self.weight, self.eps)
