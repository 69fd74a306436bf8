"""Skinny GEMM for decode: ``y [M, N] = x [M, K] @ w [N, K]^T`` with M <= 64 (a few tokens).

At decode a linear layer is a matrix-vector product: its time is the time to stream ``w`` once.
cuBLAS reaches ~3.2 TB/s on the 50 MB fused GDN in_proj of the 35B-A3B shape on an H200 (1.3x its
bandwidth floor); this kernel's job is to get closer by keeping many narrow row tiles in flight:
one program per ``BLOCK_N`` rows of ``w``, each streaming its rows' full K in ``BLOCK_K`` steps
(software-pipelined ``num_stages`` deep). The tokens ride along as a 16-, 32- or 64-row ``tl.dot``
operand (padding rows masked), so the multiply is on tensor cores and costs nothing next to the loads:
at 64 rows a bf16 weight byte still feeds only 64 FLOPs, far below the tensor cores' ridge point.

fp32 inputs use IEEE dots (exact enough for the fp32 parity tests); bf16/fp16 accumulate in fp32 and
round once on the store. :func:`skinny_linear_ref` is the reference (``torch.nn.functional.linear``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_M = 64


@dataclass(frozen=True)
class GemvConfig:
    # The default won scripts/bench_gemv.py's sweep on an H200 (2026-11-28, docs/perf/2026-11-28c.md) on
    # every GDN in_proj shape at M = 1, 4, 16: 35B-A3B 14.6 us (1.21x the floor; cuBLAS 16.0, the old
    # 16 x 256 / 4 stages 20.2), 9B 26.1 us (1.08x; cuBLAS 28.9), 122B-A10B 31.6 us (1.04x; cuBLAS 33.6).
    block_n: int = 32
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 3
    # split_k > 1 splits K over that many programs per row tile, for shapes with too few row tiles to
    # fill the card (the 2048-row out_proj: 64 tiles of 32 rows for 132 SMs). Each writes an fp32 partial;
    # the last to finish (an atomic counter per tile) sums the partials in split order and stores y.
    split_k: int = 1


DEFAULT = GemvConfig()


@triton.jit(do_not_specialize=["M"])  # M only masks rows: one binary per BLOCK_M
def _skinny_gemm_kernel(
    x_ptr, r_ptr, g_ptr, w_ptr, y_ptr, h_ptr, ws_ptr, sq_ptr, cnt_ptr,
    M, N, K, K_SPLIT, stride_xm, stride_rm, stride_wn, stride_ym, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    NORM: tl.constexpr, HAS_RES: tl.constexpr, HAS_G: tl.constexpr, RES_IN_LOOP: tl.constexpr,
    SPLIT_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # y = x @ w.T; with NORM, y = rmsnorm(h) @ w.T for h = x (+ r), see skinny_norm_linear.
    # Program (pid, pid_k) computes rows [pid * BLOCK_N, +BLOCK_N) of y over K in [pid_k * K_SPLIT, +K_SPLIT).
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(K, k_lo + K_SPLIT)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    if NORM and HAS_RES and not RES_IN_LOOP:
        if pid == 0:  # h = x + r (the next residual), rounded as the norm kernel rounds it, in its own pass
            for k in range(k_lo, k_hi, BLOCK_K):
                hk = k + offs_k
                h_mask = m_ok[:, None] & (hk < K)[None, :]
                xh = tl.load(x_ptr + offs_m[:, None] * stride_xm + hk[None, :], mask=h_mask, other=0.0)
                rh = tl.load(r_ptr + offs_m[:, None] * stride_rm + hk[None, :], mask=h_mask, other=0.0)
                hh = (xh.to(tl.float32) + rh.to(tl.float32)).to(h_ptr.dtype.element_ty)
                tl.store(h_ptr + offs_m[:, None] * K + hk[None, :], hh, mask=h_mask)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_lo + offs_k)[None, :]  # [BM, BK]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + (k_lo + offs_k)[None, :]  # [BN, BK], K contiguous
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        # Masks constant along K when K is a multiple of BLOCK_K, so that the loads stay vectorised.
        if EVEN_K:
            x_mask = m_ok[:, None]
            w_mask = n_ok[:, None]
        else:
            k_ok = (k + offs_k) < K
            x_mask = m_ok[:, None] & k_ok[None, :]
            w_mask = n_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptrs, mask=x_mask, other=0.0)
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        if NORM:
            if HAS_RES:
                r = tl.load(r_ptr + offs_m[:, None] * stride_rm + (k + offs_k)[None, :], mask=x_mask, other=0.0)
                x = (x.to(tl.float32) + r.to(tl.float32)).to(h_ptr.dtype.element_ty)
                if RES_IN_LOOP:
                    tl.store(h_ptr + offs_m[:, None] * K + (k + offs_k)[None, :], x, mask=x_mask & (pid == 0))
            hf = x.to(tl.float32)
            sumsq += tl.sum(hf * hf, axis=1)
            if HAS_G:
                if EVEN_K:
                    g = tl.load(g_ptr + k + offs_k)
                else:
                    g = tl.load(g_ptr + k + offs_k, mask=(k + offs_k) < K, other=0.0)
                x = (hf * (g.to(tl.float32) + 1.0)[None, :]).to(w_ptr.dtype.element_ty)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        if NORM:
            acc = acc * (1.0 / tl.sqrt(sumsq / K + eps))[:, None]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        # Partials: ws [SPLIT_K, BLOCK_M, N] fp32 and sq [SPLIT_K, n_tiles, BLOCK_M] (the norm's partial sums).
        tl.store(ws_ptr + (pid_k * BLOCK_M + offs_m)[:, None] * N + offs_n[None, :], acc, mask=y_mask)
        if NORM:
            tl.store(sq_ptr + (pid_k * tl.num_programs(0) + pid) * BLOCK_M + offs_m, sumsq)
        tl.debug_barrier()  # every thread's partial is written before the release below
        done = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
        if done == SPLIT_K - 1:  # the last program of this row tile: sum the partials in split order
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            sq = tl.zeros([BLOCK_M], dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(ws_ptr + (s * BLOCK_M + offs_m)[:, None] * N + offs_n[None, :], mask=y_mask,
                                 other=0.0, cache_modifier=".cg")
                if NORM:
                    sq += tl.load(sq_ptr + (s * tl.num_programs(0) + pid) * BLOCK_M + offs_m, cache_modifier=".cg")
            if NORM:
                total = total * (1.0 / tl.sqrt(sq / K + eps))[:, None]
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=y_mask)
            tl.atomic_xchg(cnt_ptr + pid, 0)  # ready for the next launch (and the next graph replay)


def skinny_linear(x: torch.Tensor, w: torch.Tensor, config: GemvConfig | None = None) -> torch.Tensor:
    """``x [M, K]`` (M <= 64, unit stride along K), ``w [N, K]`` (row-major rows, unit stride along K)
    -> ``y [M, N]`` in x's dtype. One launch, no host sync, CUDA-graph safe."""
    _check("skinny_linear", x, w, "F.linear")
    y = x.new_empty(x.shape[0], w.shape[0])
    _launch(x, None, None, w, y, y, 0.0, config or DEFAULT, norm=False)
    return y


def _check(fn: str, x: torch.Tensor, w: torch.Tensor, instead: str, residual: torch.Tensor | None = None) -> None:
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"{fn} needs x [M, K] and w [N, K]; got {tuple(x.shape)} and {tuple(w.shape)}")
    M = x.shape[0]
    if not 1 <= M <= MAX_M:
        raise ValueError(f"{fn} handles 1 <= M <= {MAX_M} rows; got M={M} (use {instead})")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    if x.dtype != w.dtype:
        raise ValueError(f"x and w must share a dtype; got {x.dtype} and {w.dtype}")
    for name, t in (("x", x), ("w", w), ("residual", residual)):
        if t is not None and t.stride(1) != 1:
            raise ValueError(f"{name} needs unit stride along K (call .contiguous() first)")


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _tile_counters(device: torch.device, n_tiles: int) -> torch.Tensor:
    """The split-K arrival counters, one per row tile, zero between launches (each tile's last program
    resets its own). One buffer per device, grown outside CUDA-graph capture only: a buffer made inside
    a capture would hold garbage until that graph first replays. Kernels on one stream share it safely;
    split-K launches must not run concurrently on two streams (ours run on the compute stream only)."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n_tiles:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"skinny GEMM split-K needs {n_tiles} tile counters on {device}; call it once outside CUDA-graph "
                "capture first (the engine's eager warm-up does)")
        buf = torch.zeros(max(n_tiles, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


def _launch(x, r, g, w, y, h, eps: float, cfg: GemvConfig, norm: bool, res_in_loop: bool = False) -> None:
    M, K = x.shape
    N = w.shape[0]
    has_res = r is not None
    r = r if has_res else x  # unused without a residual (as g without NORM)
    block_m = max(16, triton.next_power_of_2(M))
    n_tiles = triton.cdiv(N, cfg.block_n)
    # Each split covers a whole number of BLOCK_K steps; fewer splits where K is short.
    k_split = triton.cdiv(triton.cdiv(K, cfg.split_k), cfg.block_k) * cfg.block_k
    split_k = triton.cdiv(K, k_split)
    if split_k > 1:
        ws = torch.empty(split_k * block_m * N + split_k * n_tiles * block_m, dtype=torch.float32, device=x.device)
        sq, cnt = ws[split_k * block_m * N:], _tile_counters(x.device, n_tiles)
    else:
        ws = sq = cnt = y  # unused
    _skinny_gemm_kernel[(n_tiles, split_k)](
        x, r, g if g is not None else x, w, y, h, ws, sq, cnt,
        M, N, K, k_split, x.stride(0), r.stride(0), w.stride(0), y.stride(0), eps,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        EVEN_K=K % cfg.block_k == 0, NORM=norm, HAS_RES=has_res, HAS_G=g is not None, RES_IN_LOOP=res_in_loop,
        SPLIT_K=split_k, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def skinny_linear_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


# -- the decoder layer's input norm in the GEMM's prologue -------------------------------------------
#
# ``y = rmsnorm(x [+ r]) @ w.T`` with the zero-centred RMSNorm ``h / rms(h) * (1 + g)``. The per-row scale
# 1 / rms(h) commutes with the GEMM, so each program streams h once along K, accumulating both
# ``(h * (1 + g)) @ w.T`` and ``sum(h^2)``, and applies the scale to its [M, BLOCK_N] result at the end:
# no second pass over K, no norm launch, no normalised activation in memory. Program 0 also writes
# ``h = x + r`` (the next residual), rounded to x's dtype as the separate norm kernel rounds it.
# Rounding differs from norm-then-GEMM in one place: the GEMM operand is ``h * (1 + g)`` rounded to
# the weight dtype, where the two-launch path rounds ``h / rms(h) * (1 + g)``; the scale is applied in
# fp32 after. Both are one bf16 rounding of the same value up to a per-row factor.


def skinny_norm_linear(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float, w: torch.Tensor,
    config: GemvConfig | None = None, res_in_loop: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rmsnorm(h) @ w.T, h)`` with ``h = x + residual`` (or ``x``), the zero-centred RMSNorm of weight
    ``norm_weight [K]``: the decoder layer's input norm and a projection in one launch (M <= 64).
    ``norm_weight=None`` is the unit-weight norm ``h / rms(h)`` (for a ``w`` with ``1 + g`` folded into
    its columns). Without a residual the returned ``h`` is ``x`` itself. ``res_in_loop`` stores ``h``
    inside the main loop instead of in its own pass (kept to measure the two against each other)."""
    _check("skinny_norm_linear", x, w, "the norm and F.linear", residual)
    M, K = x.shape
    if norm_weight is not None and norm_weight.shape != (K,):
        raise ValueError(f"norm_weight must be [{K}]; got {tuple(norm_weight.shape)}")
    y = x.new_empty(M, w.shape[0])
    h = x.new_empty(M, K) if residual is not None else x
    _launch(x, residual, norm_weight, w, y, h, eps, config or DEFAULT, norm=True, res_in_loop=res_in_loop)
    return y, h


def skinny_norm_linear_ref(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two-launch composition it replaces: the fused add + RMSNorm, then the GEMM."""
    from deltaserve.ops.norms import rms_norm_ref

    if norm_weight is None:
        norm_weight = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    if residual is None:
        return F.linear(rms_norm_ref(x, norm_weight, eps), w), x
    y, h = rms_norm_ref(x, norm_weight, eps, residual)
    return F.linear(y, w), h
