"""Fused norms and the SwiGLU activation: one launch each instead of six to ten eager kernels.

In a decode step every eager elementwise op is a kernel launch of a few microseconds whatever its
bytes; a zero-centred RMSNorm in bf16 is ~8 of them (cast, pow, mean, rsqrt, mul, add, mul, cast) and
the residual add one more. These kernels do one row per program and round intermediate values to the
activation dtype exactly where the eager reference does, so the two paths agree bit for bit in
practice and to rounding in theory.

* :func:`rms_norm`: ``y = norm(x [+ residual])``, zero-centred (``* (1 + w)``) or plain (``* w``); with a
  residual it also returns ``x + residual`` (the next layer's residual), like vLLM's fused add-norm.
* :func:`rms_norm_gated`: the GDN output norm ``w * norm(o) * silu(z)`` per value head.
* :func:`silu_and_mul`: ``silu(gate) * up`` of a merged ``[gate | up]`` projection.

Each public function runs the Triton kernel on CUDA tensors (or with ``force_triton=True``, e.g. under
Triton's CPU interpreter in tests) and the PyTorch reference otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deltaserve.ops.pdl import launch_args

try:
    import triton
    import triton.language as tl

    from deltaserve.ops.pdl import pdl_gate
except ImportError:  # pragma: no cover - CPU installs without triton use the references
    triton = None


# -- references (the CPU path, and what the kernels are tested against) ----------------------------


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm_ref(x, weight, eps, residual=None, zero_centered=True):
    if residual is not None:
        x = x + residual
    w = 1.0 + weight.float() if zero_centered else weight.float()
    y = (_rms(x, eps) * w).to(x.dtype)
    return y if residual is None else (y, x)


def rms_norm_gated_ref(o, z, weight, eps):
    # transformers rounds the normalised value to the input dtype before the weight: match it.
    y = weight * _rms(o, eps).to(o.dtype)
    return (y.float() * F.silu(z.float())).to(o.dtype)


def silu_and_mul_ref(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# -- kernels ---------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, stride_x, stride_r, N, eps,
                         HAS_RES: tl.constexpr, ZERO_CENTERED: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        pdl_gate(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RES:
            # The eager sum is rounded to the activation dtype before anyone reads it: do the same.
            x = (x.to(tl.float32) + tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32))
            x = x.to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + row * N + cols, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if ZERO_CENTERED:
            w = w + 1.0
        tl.store(y_ptr + row * N + cols, (xf * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_gated_kernel(o_ptr, z_ptr, w_ptr, y_ptr, stride_o, stride_z, N, eps, BLOCK: tl.constexpr, PDL: tl.constexpr):
        pdl_gate(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        o = tl.load(o_ptr + row * stride_o + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(o * o, axis=0) / N + eps)
        n = (o * rstd).to(y_ptr.dtype.element_ty)  # rounded, as transformers does
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        y = (w.to(tl.float32) * n.to(tl.float32)).to(y_ptr.dtype.element_ty).to(tl.float32)
        z = tl.load(z_ptr + row * stride_z + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * N + cols, (y * z * tl.sigmoid(z)).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, y_ptr, stride_x, I, BLOCK: tl.constexpr, PDL: tl.constexpr):
        pdl_gate(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < I
        g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * stride_x + I + cols, mask=mask, other=0.0).to(tl.float32)
        act = (g * tl.sigmoid(g)).to(y_ptr.dtype.element_ty).to(tl.float32)  # eager rounds silu's output
        tl.store(y_ptr + row * I + cols, (act * u).to(y_ptr.dtype.element_ty), mask=mask)


def _warps(block: int) -> int:
    return min(max(block // 256, 1), 16)


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim; got strides {tuple(x.stride())}")
    return x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x


# -- public ----------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             zero_centered: bool = True, force_triton: bool = False):
    """x (and residual) ``[T, N]``, weight ``[N]`` -> y ``[T, N]``, or ``(y, x + residual)`` with a residual."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must be [{x.shape[-1]}]; got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    if not (x.is_cuda or force_triton) or triton is None:
        return rms_norm_ref(x, weight, eps, residual, zero_centered)
    x2 = _rows(x, "x")
    N, block = x2.shape[1], triton.next_power_of_2(x2.shape[1])
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    h = torch.empty_like(y) if residual is not None else y
    r2 = _rows(residual, "residual") if residual is not None else x2
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, y, h, x2.stride(0), r2.stride(0), N, eps,
                                         HAS_RES=residual is not None, ZERO_CENTERED=zero_centered, BLOCK=block,
                                         num_warps=_warps(block), **launch_args())
    y = y.view(x.shape)
    return y if residual is None else (y, h.view(x.shape))


def rms_norm_gated(o: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float,
                   force_triton: bool = False) -> torch.Tensor:
    """o, z ``[..., Dv]`` (per value head), weight ``[Dv]`` -> ``weight * norm(o) * silu(z)``."""
    if o.shape != z.shape or weight.shape != (o.shape[-1],):
        raise ValueError(f"o {tuple(o.shape)} and z {tuple(z.shape)} must match, weight must be [{o.shape[-1]}]")
    if not (o.is_cuda or force_triton) or triton is None:
        return rms_norm_gated_ref(o, z, weight, eps)
    o2, z2 = _rows(o, "o"), _rows(z, "z")
    N, block = o2.shape[1], triton.next_power_of_2(o2.shape[1])
    y = torch.empty(o2.shape, dtype=o.dtype, device=o.device)
    if o2.shape[0]:
        _rms_norm_gated_kernel[(o2.shape[0],)](o2, z2, weight, y, o2.stride(0), z2.stride(0), N, eps, BLOCK=block,
                                               num_warps=_warps(block), **launch_args())
    return y.view(o.shape)


def silu_and_mul(gate_up: torch.Tensor, force_triton: bool = False) -> torch.Tensor:
    """gate_up ``[T, 2I]`` (gate columns, then up) -> ``silu(gate) * up`` ``[T, I]``."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dim must be even ([gate | up]); got {gate_up.shape[-1]}")
    if not (gate_up.is_cuda or force_triton) or triton is None:
        return silu_and_mul_ref(gate_up)
    x2 = _rows(gate_up, "gate_up")
    I = x2.shape[1] // 2
    y = torch.empty(x2.shape[0], I, dtype=gate_up.dtype, device=gate_up.device)
    block = min(triton.next_power_of_2(I), 1024)
    if x2.shape[0]:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(I, block))](x2, y, x2.stride(0), I, BLOCK=block,
                                                                   num_warps=_warps(block), **launch_args())
    return y.view(*gate_up.shape[:-1], I)
