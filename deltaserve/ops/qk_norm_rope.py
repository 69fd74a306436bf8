"""q/k norm + partial NeoX RoPE + KV-cache write of the gated attention layer, in one launch.

Input is the merged projection of one TP rank, a row of ``(2 Hq + 2 Hkv) D`` columns per token::

    qkv [T, (2 Hq + 2 Hkv) D] = [ Hq x (q D | gate D) | Hkv x k D | Hkv x v D ]

q and k get the zero-centred RMSNorm over head_dim (``x_hat * (1 + w)``, statistics in fp32, the result
rounded to the activation dtype as the eager norm does), then RoPE on their first ``rotary_dim`` dims
(NeoX halves: ``[x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]`` in fp32, rounded once). q comes back
contiguous ``[T, Hq, D]``; k and v go straight into the paged cache at ``slot_mapping`` (negative slots,
CUDA-graph padding rows, store nothing). The gate stays in ``qkv``: :func:`gate_view`.

cos/sin are computed in-kernel from ``positions * inv_freq`` in fp32, with ``inv_freq`` the layer's
``[rotary_dim / 2]`` buffer (HF's ``1 / theta ** (2i / rotary_dim)``): deriving it from theta in the kernel
(``exp2``) differs by ~1e-6 relative, an angle error growing with the position (~1e-4 rad by position
100), more than the fp32 parity tests allow.

Eagerly (bf16) this was 29 launches at decode: one kernel per norm, 26 small ones for RoPE (casts,
cos/sin, products, cats), the cache store. Here it is one, a program per token.
"""

from __future__ import annotations

import math

import torch

from deltaserve.ops.norms import rms_norm_ref
from deltaserve.ops.paged_attention import _check_cache, store_kv_ref
from deltaserve.ops.pdl import launch_args

try:
    import triton
    import triton.language as tl

    from deltaserve.ops.pdl import pdl_gate
except ImportError:  # pragma: no cover - CPU installs without triton use the reference
    triton = None


def gate_view(qkv: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """The output gate of each query head, a view ``[T, Hq, D]`` of ``qkv`` (no copy)."""
    return qkv[:, : 2 * num_heads * head_dim].unflatten(1, (num_heads, 2, head_dim))[:, :, 1]


def _split(qkv: torch.Tensor, Hq: int, Hkv: int, D: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = qkv[:, : 2 * Hq * D].unflatten(1, (Hq, 2, D))[:, :, 0]  # [T, Hq, D] views
    k = qkv[:, 2 * Hq * D : (2 * Hq + Hkv) * D].unflatten(1, (Hkv, D))
    v = qkv[:, (2 * Hq + Hkv) * D :].unflatten(1, (Hkv, D))
    return q, k, v


# -- reference (the CPU path, and what the kernel is tested against) ---------------------------------


def rope_ref(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Partial NeoX RoPE of ``x [T, H, D]`` on its first ``2 * len(inv_freq)`` dims, in fp32."""
    half = inv_freq.shape[0]
    freqs = positions.float()[:, None] * inv_freq[None]  # [T, rot/2]
    cos, sin = freqs.cos()[:, None], freqs.sin()[:, None]  # [T, 1, rot/2]
    x1, x2 = x[..., :half].float(), x[..., half : 2 * half].float()
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([rotated, x[..., 2 * half :]], dim=-1)


def qk_norm_rope_store_ref(qkv, positions, q_weight, k_weight, eps, inv_freq, k_cache, v_cache, slot_mapping):
    """What :func:`qk_norm_rope_store` computes, in eager PyTorch (q a fresh contiguous tensor)."""
    Hkv, D = k_cache.shape[2:]
    q, k, v = _split(qkv, qkv.shape[1] // (2 * D) - Hkv, Hkv, D)
    q = rope_ref(rms_norm_ref(q, q_weight, eps), positions, inv_freq)
    k = rope_ref(rms_norm_ref(k, k_weight, eps), positions, inv_freq)
    store_kv_ref(k, v, k_cache, v_cache, slot_mapping)
    return q


# -- kernel ---------------------------------------------------------------------------------------

if triton is not None:
    # 2*pi as a sum of three fp32 constants, the first two with <= 8 significant bits: k * _2PI_A and
    # k * _2PI_B are exact for k < 2**16, i.e. angles below ~4e5 rad (positions up to 262,144 x inv_freq <= 1).
    _2PI_A = tl.constexpr(6.28125)
    _2PI_B = tl.constexpr(253 / 131072)
    _2PI_C = tl.constexpr(2 * math.pi - 6.28125 - 253 / 131072)
    _INV_2PI = tl.constexpr(0.5 / math.pi)

    @triton.jit
    def _cos_sin(angle):
        # Reduce to [-pi, pi] first (Cody-Waite): tl.cos / tl.sin may lower to the hardware's approximate
        # instructions, whose error grows with |x|, and RoPE angles reach ~2.6e5 rad.
        k = tl.floor(angle * _INV_2PI + 0.5)
        r = ((angle - k * _2PI_A) - k * _2PI_B) - k * _2PI_C
        return tl.cos(r), tl.sin(r)

    @triton.jit
    def _qk_norm_rope_kernel(
        qkv_ptr, pos_ptr, qw_ptr, kw_ptr, inv_freq_ptr, q_ptr, kc_ptr, vc_ptr, slot_ptr,
        stride_qkv, stride_qt, stride_qh,
        stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, eps,
        HQ: tl.constexpr, HKV: tl.constexpr, H_PAD: tl.constexpr, HKV_PAD: tl.constexpr,
        D: tl.constexpr, D_PAD: tl.constexpr, ROT: tl.constexpr, PAGE: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        pdl_gate(PDL)
        # One program per token. Rows h < HQ of the tile are its query heads, rows HQ .. HQ + HKV - 1 its
        # KV heads: both get norm + RoPE; q rows go to q, k rows (and v) to the cache.
        t = tl.program_id(0).to(tl.int64)
        HALF: tl.constexpr = ROT // 2
        h = tl.arange(0, H_PAD)[:, None]
        d = tl.arange(0, D_PAD)[None, :]
        is_q = h < HQ
        mask = (h < HQ + HKV) & (d < D)
        is_rot = d < ROT
        first = d < HALF
        partner = tl.where(is_rot, tl.where(first, d + HALF, d - HALF), d)  # the other half's dim
        inv_freq = tl.load(inv_freq_ptr + tl.where(first, d, d - HALF), mask=is_rot, other=0.0)
        cos, sin = _cos_sin(tl.load(pos_ptr + t).to(tl.float32) * inv_freq)  # [1, D_PAD]
        sin = tl.where(first, -sin, sin)

        src = qkv_ptr + t * stride_qkv + tl.where(is_q, h * 2 * D, (HQ + h) * D)  # q at 2hD, k after all q|gate
        x = tl.load(src + d, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
        w = tl.where(is_q, tl.load(qw_ptr + d, mask=d < D, other=0.0), tl.load(kw_ptr + d, mask=d < D, other=0.0))
        out_dtype = q_ptr.dtype.element_ty
        n = (x * rstd * (1.0 + w.to(tl.float32))).to(out_dtype).to(tl.float32)  # rounded like the eager norm
        # Each rotated dim's partner, normalised the same way.
        pmask = mask & is_rot
        xp = tl.load(src + partner, mask=pmask, other=0.0).to(tl.float32)
        wp = tl.where(is_q, tl.load(qw_ptr + partner, mask=is_rot, other=0.0),
                      tl.load(kw_ptr + partner, mask=is_rot, other=0.0))  # fmt: skip
        npart = (xp * rstd * (1.0 + wp.to(tl.float32))).to(out_dtype).to(tl.float32)
        y = tl.where(is_rot, n * cos + npart * sin, n).to(out_dtype)  # [H_PAD, D_PAD]
        tl.store(q_ptr + t * stride_qt + h * stride_qh + d, y, mask=mask & is_q)

        slot = tl.load(slot_ptr + t)
        if slot >= 0:  # negative: a padding token, leave the cache alone
            blk = slot // PAGE
            off = slot % PAGE
            kvh = h - HQ  # negative on q rows, which the mask drops
            tl.store(kc_ptr + blk * stride_kcb + off * stride_kcs + kvh * stride_kch + d,
                     y.to(kc_ptr.dtype.element_ty), mask=mask & ~is_q)  # fmt: skip
            hv = tl.arange(0, HKV_PAD)[:, None]
            vmask = (hv < HKV) & (d < D)
            v = tl.load(qkv_ptr + t * stride_qkv + (2 * HQ + HKV + hv) * D + d, mask=vmask)
            tl.store(vc_ptr + blk * stride_vcb + off * stride_vcs + hv * stride_vch + d,
                     v.to(vc_ptr.dtype.element_ty), mask=vmask)  # fmt: skip


# -- public ---------------------------------------------------------------------------------------


def qk_norm_rope_store(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    inv_freq: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    force_triton: bool = False,
) -> torch.Tensor:
    """Norm + RoPE q and k, store k and v in the paged cache; return q ``[T, Hq, D]`` (contiguous).

    qkv ``[T, (2 Hq + 2 Hkv) D]`` (rows may be strided, columns contiguous); positions ``[T]`` int;
    q_weight, k_weight ``[D]``; inv_freq ``[rotary_dim / 2]`` fp32; k_cache, v_cache
    ``[blocks, block_size, Hkv, D]``; slot_mapping ``[T]`` int64 (< 0: not stored). Hkv and D come from
    the cache, Hq from qkv's width. Runs the Triton kernel on CUDA tensors (or with ``force_triton``),
    the reference otherwise.
    """
    _check_cache(k_cache, v_cache)
    Hkv, D = k_cache.shape[2:]
    if qkv.dim() != 2 or qkv.stride(-1) != 1 or qkv.shape[1] % (2 * D) or qkv.shape[1] // (2 * D) <= Hkv:
        raise ValueError(f"qkv must be [T, (2 Hq + 2 Hkv={2 * Hkv}) * D={D}] with contiguous columns; "
                         f"got {tuple(qkv.shape)} strides {tuple(qkv.stride())}")  # fmt: skip
    T, Hq = qkv.shape[0], qkv.shape[1] // (2 * D) - Hkv
    if positions.shape != (T,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int [T={T}]; got {positions.dtype} {tuple(positions.shape)}")
    if slot_mapping.shape != (T,) or slot_mapping.dtype != torch.int64:
        raise ValueError(f"slot_mapping must be int64 [T={T}]; got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")  # fmt: skip
    if q_weight.shape != (D,) or k_weight.shape != (D,):
        raise ValueError(f"q_weight and k_weight must be [D={D}]; got {tuple(q_weight.shape)}, "
                         f"{tuple(k_weight.shape)}")  # fmt: skip
    rot = 2 * inv_freq.shape[0]
    if inv_freq.dim() != 1 or inv_freq.dtype != torch.float32 or not 0 < rot <= D:
        raise ValueError(f"inv_freq must be fp32 [rotary_dim / 2] with 0 < rotary_dim <= D={D}; got "
                         f"{inv_freq.dtype} {tuple(inv_freq.shape)}")  # fmt: skip
    if not (qkv.is_cuda or force_triton) or triton is None:
        return qk_norm_rope_store_ref(qkv, positions, q_weight, k_weight, eps, inv_freq, k_cache, v_cache,
                                      slot_mapping)  # fmt: skip
    q = torch.empty(T, Hq, D, dtype=qkv.dtype, device=qkv.device)
    if T:
        d_pad, h_pad = triton.next_power_of_2(D), triton.next_power_of_2(Hq + Hkv)
        _qk_norm_rope_kernel[(T,)](
            qkv, positions, q_weight, k_weight, inv_freq, q, k_cache, v_cache, slot_mapping,
            qkv.stride(0), q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), eps,
            HQ=Hq, HKV=Hkv, H_PAD=h_pad, HKV_PAD=triton.next_power_of_2(Hkv), D=D, D_PAD=d_pad, ROT=rot,
            PAGE=k_cache.shape[1], num_warps=min(max(h_pad * d_pad // 1024, 1), 16), **launch_args(),
        )  # fmt: skip
    return q
