"""Skinny GEMM for decode: ``y [M, N] = x [M, K] @ w [N, K]^T`` with M <= 64 (a few tokens).

At decode a linear layer is a matrix-vector product: its time is the time to stream ``w`` once.
cuBLAS reaches ~3.2 TB/s on the 50 MB fused GDN in_proj of the 35B-A3B shape on an H200 (1.3x its
bandwidth floor); this kernel's job is to get closer by keeping many narrow row tiles in flight:
one program per ``BLOCK_N`` rows of ``w``, each streaming its rows' full K in ``BLOCK_K`` steps
(software-pipelined ``num_stages`` deep). The tokens ride along as a 16-, 32- or 64-row ``tl.dot``
operand (padding rows masked), so the multiply is on tensor cores and costs nothing next to the loads:
at 64 rows a bf16 weight byte still feeds only 64 FLOPs, far below the tensor cores' ridge point.
A narrow weight (the 2048-row out_proj) has too few row tiles to fill the card, so K is split too
(``split_k``): the partials meet in an fp32 workspace and the last program of each tile sums them.

fp32 inputs use IEEE dots (exact enough for the fp32 parity tests); bf16/fp16 accumulate in fp32 and
round once on the store. :func:`skinny_linear_ref` is the reference (``torch.nn.functional.linear``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from deltaserve.ops import pdl
from deltaserve.ops.arrival import counters
from deltaserve.ops.pdl import launch_args, pdl_trigger, pdl_wait, prefetch_l2

MAX_M = 64


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 32
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3
    # split_k > 1 splits K over that many programs per row tile, for shapes with too few row tiles to
    # fill the card (the 2048-row out_proj: 32 tiles of 64 rows for 132 SMs). Each writes an fp32 partial;
    # the last to finish (an atomic counter per tile) sums the partials in split order and stores y.
    split_k: int = 1
    # Under PDL only (bench_gemv.py --chain-ab measures them; the defaults are what the engine runs):
    # late_trigger lets the next kernel launch after this one's K loop instead of at its start, and
    # prefetch_k asks for the first prefetch_k columns of this program's weight rows in L2 before it
    # waits for the previous kernel, so that the weight stream starts during that kernel's tail.
    late_trigger: bool | None = None  # None: pdl.late_trigger, by how much of the GPU the grid fills
    prefetch_k: int = 0
    # swap computes y^T = w x^T: the weight tile is the MMA's row side (BLOCK_N rows: 64-128 fill Hopper's
    # 64-row warpgroup MMA) and the tokens its column side, instead of padding the tokens to the row side.
    swap: bool = False
    # group > 1: one program streams `group` adjacent BLOCK_N-row tiles, each with its own accumulator, against
    # one load of the token tile per K step. A row tile of group x block_n rows need not be a power of two
    # (3 x 32 = 96 rows: 129 programs for the 12,352-row 35B-A3B in_proj, one per SM of a 132-SM card), so the
    # grid can match the card while each program reads the token tile only once. Measured (H100,
    # docs/perf/2026-12-07.md): no faster than the picked tiles on the 35B-A3B and 9B in_proj at 16-64 tokens;
    # the sweep's (bench_gemv.py --group), not pick_config's.
    group: int = 1
    # With the late trigger: fire it this many K steps before the end of the K loop instead of after it, so
    # that the next kernel launches (and, with prefetch_k, starts its weight stream into L2) while this one
    # still streams its last steps. Measured (H200, docs/perf/2026-12-07b.md): 0.2-0.6 us slower on the picked
    # 35B-A3B in_proj tiles at 16-64 tokens, and the 2-stage grouped tiles that leave room on an SM for the next
    # kernel's program stream at half speed; the sweep's (bench_gemv.py --overlap), not pick_config's.
    trigger_left: int = 0
    # persistent > 0: that many programs per SM, each looping over row tiles (pid, pid + programs, ...) in one
    # flattened, software-pipelined loop, so that a program's next tile starts streaming while it stores the last
    # one, and no SM waits on a second wave. Plain tiles only (no split_k, group or prefetch). Measured (H100,
    # docs/perf/2026-12-07c.md): 0.4-1.4 us slower than the picked tiles on the 35B-A3B in_proj at every M; the
    # sweep's (bench_gemv.py --persistent), not pick_config's.
    persistent: int = 0
    # tma: the loads are Hopper's TMA (one bulk tensor copy per operand and K step, out-of-bounds rows and
    # columns zero-filled by the copy engine) instead of per-thread cp.async with masks: fewer instructions
    # per byte, no address arithmetic. Plain and swapped tiles only (no split_k, group, prefetch or
    # persistent). Operands whose base or row stride is not 16-byte aligned, or a GPU older than Hopper, take
    # the pointer kernel. pick_config's tile for wide weights (docs/perf/2026-12-07c.md).
    tma: bool = False

    def __post_init__(self):
        if not 1 <= self.group <= 4:
            raise ValueError(f"group={self.group} must be 1, 2, 3 or 4 row tiles per program")
        if self.group > 1 and self.split_k > 1:
            raise ValueError(f"group={self.group} needs split_k=1 (got {self.split_k}): a grouped tile is for wide "
                             "weights, which have row tiles to spare")
        if self.prefetch_k and (self.prefetch_k & (self.prefetch_k - 1) or self.prefetch_k < 64):
            raise ValueError(f"prefetch_k={self.prefetch_k} must be 0 or a power of two >= 64 (columns)")
        if self.persistent and (self.persistent < 0 or self.split_k > 1 or self.group > 1 or self.prefetch_k):
            raise ValueError(f"persistent={self.persistent} must be >= 0 and takes plain tiles only (got "
                             f"split_k={self.split_k}, group={self.group}, prefetch_k={self.prefetch_k})")
        if self.tma and (self.split_k > 1 or self.group > 1 or self.prefetch_k or self.persistent or
                         self.trigger_left):
            raise ValueError(f"tma=True takes plain or swapped tiles only (got split_k={self.split_k}, group="
                             f"{self.group}, prefetch_k={self.prefetch_k}, persistent={self.persistent}, "
                             f"trigger_left={self.trigger_left})")
        if self.trigger_left < 0 or (self.trigger_left and self.late_trigger is False):
            raise ValueError(f"trigger_left={self.trigger_left} must be >= 0, and 0 unless the trigger is late "
                             f"(late_trigger={self.late_trigger})")


_prefetch_k = 0


def set_pdl_prefetch(prefetch_k: int) -> None:
    """Process-wide ``prefetch_k`` for every launch that takes :func:`pick_config`'s tile with cp.async loads
    (the engine's ``--skinny-prefetch``; no effect without PDL, nor on the wide weights' TMA tiles)."""
    global _prefetch_k
    GemvConfig(prefetch_k=prefetch_k)  # validates
    _prefetch_k = prefetch_k


def pick_config(M: int, N: int, K: int) -> GemvConfig:
    """The tile for a shape, from scripts/bench_gemv.py's sweeps (docs/perf/2026-11-28d.md onwards).

    Wide weights (the GDN in_proj, N >= 8192) have row tiles to spare. Their operands arrive by TMA, which
    beat the same tiles' cp.async loads on the 35B-A3B and 122B-A10B in_proj at every M measured (H100,
    docs/perf/2026-12-07c.md; `bench layer`, 36 / 24 distinct layers: 35B-A3B 18.16-19.57 us, 1.09-1.13x
    the floor, against 18.27-20.12; 122B-A10B 42.55-46.62 us, 1.02-1.09x, against 43.00-49.83). The tile:
    64 rows x 128 K per step, 3 stages, swapped (y^T = w x^T: the weight rows on the wgmma's 64-row side)
    up to 32 tokens; 32 rows, not swapped, at 33-64 tokens (35B-A3B M=64: 19.65 us; 122B-A10B 46.46, against
    49.61 with cp.async). The PDL trigger is not part of the tile: see :func:`pdl.late_trigger`.
    Narrow ones (the out_proj, N = 2048 or 4096) split K four ways at M <= 16 (35B-A3B 8.2 us, cuBLAS 9.7
    with its split-K reduce; 9B 11.9, cuBLAS 13.4), two ways above. The MoE router GEMM (N = 257) has so
    few rows that K splits eight ways over 32-row tiles: 4.1-4.2 us at M <= 16, against 5.6-5.8 with the
    out_proj tile and 7.6-7.9 for cuBLAS at 4-16 tokens (docs/perf/2026-11-28e.md)."""
    if N <= 512:
        return GemvConfig(block_n=32 if M <= 16 else 16, block_k=128, num_stages=3, split_k=8 if M <= 16 else 4)
    if N >= 8192:
        if M <= 32:
            return GemvConfig(block_n=64, block_k=128, num_stages=3, swap=True, tma=True)
        return GemvConfig(block_n=32, block_k=128, num_stages=3, tma=True)
    if M <= 16:
        return GemvConfig(block_n=64, block_k=128, num_stages=5 if N <= 2048 else 3, split_k=4)
    return GemvConfig(block_n=32, block_k=128, num_stages=5, split_k=2)


@triton.jit
def _zero_acc(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP: tl.constexpr):
    if SWAP:
        return tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        return tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)


@triton.jit
def _mma(x, w, acc, SWAP: tl.constexpr, PRECISION: tl.constexpr):
    if SWAP:  # y^T = w x^T: the weight rows are the MMA's M side, the tokens its N side
        return tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
    else:
        return tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)


@triton.jit
def _store_tile(y_ptrs, acc, mask, SWAP: tl.constexpr):
    if SWAP:
        acc = tl.trans(acc)
    tl.store(y_ptrs, acc.to(y_ptrs.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])  # M only masks rows: one binary per BLOCK_M
def _skinny_gemm_kernel(
    x_ptr, w_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, K_SPLIT, stride_xm, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    SPLIT_K: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr, LATE_TRIGGER: tl.constexpr,
    PREFETCH_K: tl.constexpr, LINE: tl.constexpr, SWAP: tl.constexpr, GROUP: tl.constexpr,
    TRIGGER_LEFT: tl.constexpr,
):  # fmt: skip
    # Program (pid, pid_k): rows [pid * GROUP * BLOCK_N, +GROUP * BLOCK_N) of y, as GROUP tiles of BLOCK_N rows
    # (masks n_ok, n_ok1..3; accumulators acc, acc1..3), over K in [pid_k * K_SPLIT, +K_SPLIT).
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(K, k_lo + K_SPLIT)
    offs_n = pid * (GROUP * BLOCK_N) + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    n_ok1 = (offs_n + BLOCK_N) < N
    n_ok2 = (offs_n + 2 * BLOCK_N) < N
    n_ok3 = (offs_n + 3 * BLOCK_N) < N
    if PDL and PREFETCH_K > 0:  # weights only (the previous kernel never writes them), one hint per LINE columns
        offs_pf = k_lo + tl.arange(0, PREFETCH_K // LINE) * LINE
        for g in tl.static_range(GROUP):
            pf_ptrs = w_ptr + (offs_n + g * BLOCK_N).to(tl.int64)[:, None] * stride_wn + offs_pf[None, :]
            pf_ok = ((offs_n + g * BLOCK_N) < N)[:, None] & (offs_pf < k_hi)[None, :]
            prefetch_l2(tl.where(pf_ok, pf_ptrs, w_ptr))
    pdl_wait(PDL)  # x may come from the previous kernel: nothing but weight hints before this
    if not LATE_TRIGGER:
        pdl_trigger(PDL)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_lo + offs_k)[None, :]  # [BM, BK]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + (k_lo + offs_k)[None, :]  # [BN, BK], K contiguous
    w_tile = BLOCK_N * stride_wn  # from one row tile of the group to the next
    acc = _zero_acc(BLOCK_M, BLOCK_N, SWAP)
    acc1 = _zero_acc(BLOCK_M, BLOCK_N, SWAP)
    acc2 = _zero_acc(BLOCK_M, BLOCK_N, SWAP)
    acc3 = _zero_acc(BLOCK_M, BLOCK_N, SWAP)
    # the late trigger's step: TRIGGER_LEFT steps before the last (the first step if there are fewer)
    k_trigger = k_lo + tl.maximum(tl.cdiv(k_hi - k_lo, BLOCK_K) - TRIGGER_LEFT, 0) * BLOCK_K
    for k in range(k_lo, k_hi, BLOCK_K):
        if LATE_TRIGGER and TRIGGER_LEFT > 0:
            if k == k_trigger:
                pdl_trigger(PDL)
        # Masks constant along K when K is a multiple of BLOCK_K, so that the loads stay vectorised.
        if EVEN_K:
            x_mask = m_ok[:, None]
            w_mask, w_mask1, w_mask2, w_mask3 = n_ok[:, None], n_ok1[:, None], n_ok2[:, None], n_ok3[:, None]
        else:
            k_ok = ((k + offs_k) < K)[None, :]
            x_mask = m_ok[:, None] & k_ok
            w_mask, w_mask1 = n_ok[:, None] & k_ok, n_ok1[:, None] & k_ok
            w_mask2, w_mask3 = n_ok2[:, None] & k_ok, n_ok3[:, None] & k_ok
        x = tl.load(x_ptrs, mask=x_mask, other=0.0)  # once for the whole group
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        acc = _mma(x, w, acc, SWAP, PRECISION)
        if GROUP > 1:
            acc1 = _mma(x, tl.load(w_ptrs + w_tile, mask=w_mask1, other=0.0), acc1, SWAP, PRECISION)
        if GROUP > 2:
            acc2 = _mma(x, tl.load(w_ptrs + 2 * w_tile, mask=w_mask2, other=0.0), acc2, SWAP, PRECISION)
        if GROUP > 3:
            acc3 = _mma(x, tl.load(w_ptrs + 3 * w_tile, mask=w_mask3, other=0.0), acc3, SWAP, PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if LATE_TRIGGER and TRIGGER_LEFT == 0:  # only the stores are left: the next kernel's launch overlaps them
        pdl_trigger(PDL)
    if SWAP:
        acc = tl.trans(acc)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = m_ok[:, None] & n_ok[None, :]
    if GROUP > 1:
        _store_tile(y_ptrs + BLOCK_N, acc1, m_ok[:, None] & n_ok1[None, :], SWAP)
    if GROUP > 2:
        _store_tile(y_ptrs + 2 * BLOCK_N, acc2, m_ok[:, None] & n_ok2[None, :], SWAP)
    if GROUP > 3:
        _store_tile(y_ptrs + 3 * BLOCK_N, acc3, m_ok[:, None] & n_ok3[None, :], SWAP)
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        # This split's partial into ws [SPLIT_K, BLOCK_M, N] (fp32); then count the tile's arrivals.
        tl.store(ws_ptr + (pid_k * BLOCK_M + offs_m)[:, None] * N + offs_n[None, :], acc, mask=y_mask)
        tl.debug_barrier()  # every thread's partial is written before the release below
        arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:  # the tile's last program: sum the partials in split order (deterministic)
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(ws_ptr + (s * BLOCK_M + offs_m)[:, None] * N + offs_n[None, :], mask=y_mask,
                                 other=0.0, cache_modifier=".cg")
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=y_mask)
            tl.atomic_xchg(cnt_ptr + pid, 0)  # ready for the next launch (and the next graph replay)


@triton.jit(do_not_specialize=["M"])
def _skinny_gemm_persistent_kernel(
    x_ptr, w_ptr, y_ptr, M, N, K, n_tiles, programs, stride_xm, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr, PDL: tl.constexpr, LATE_TRIGGER: tl.constexpr, SWAP: tl.constexpr,
):  # fmt: skip
    # Program pid: row tiles pid, pid + programs, ... of y, each over all of K; the tile and K loops are one
    # flattened loop, so the pipeline runs on from one tile's last K step into the next tile's first.
    pid = tl.program_id(0)
    pdl_wait(PDL)
    if not LATE_TRIGGER:
        pdl_trigger(PDL)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    for tile in tl.range(pid, n_tiles, programs, flatten=True):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        acc = _zero_acc(BLOCK_M, BLOCK_N, SWAP)
        for k in range(0, K, BLOCK_K):
            if EVEN_K:
                x_mask = m_ok[:, None]
                w_mask = n_ok[:, None]
            else:
                k_ok = ((k + offs_k) < K)[None, :]
                x_mask = m_ok[:, None] & k_ok
                w_mask = n_ok[:, None] & k_ok
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k + offs_k)[None, :], mask=x_mask, other=0.0)
            w = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + (k + offs_k)[None, :], mask=w_mask,
                        other=0.0)
            acc = _mma(x, w, acc, SWAP, PRECISION)
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        _store_tile(y_ptrs, acc, m_ok[:, None] & n_ok[None, :], SWAP)
    if LATE_TRIGGER:
        pdl_trigger(PDL)


@triton.jit(do_not_specialize=["M"])
def _skinny_gemm_tma_kernel(
    x_desc, w_desc, y_ptr, M, N, K, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    PDL: tl.constexpr, LATE_TRIGGER: tl.constexpr, SWAP: tl.constexpr,
):  # fmt: skip
    # Program pid: rows [pid * BLOCK_N, +BLOCK_N) of y over all of K, the operands fetched by TMA: the
    # descriptors' boxes are [BLOCK_M, BLOCK_K] of x and [BLOCK_N, BLOCK_K] of w, zero beyond M, N and K.
    pid = tl.program_id(0)
    pdl_wait(PDL)
    if not LATE_TRIGGER:
        pdl_trigger(PDL)
    off_n = pid * BLOCK_N
    acc = _zero_acc(BLOCK_M, BLOCK_N, SWAP)
    for k in range(0, K, BLOCK_K):
        acc = _mma(x_desc.load([0, k]), w_desc.load([off_n, k]), acc, SWAP, PRECISION)
    if LATE_TRIGGER:
        pdl_trigger(PDL)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    _store_tile(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc, (offs_m < M)[:, None] & (offs_n < N)[None, :],
                SWAP)


SMEM_PER_SM = 228 * 1024  # Hopper (H100, H200): per SM, of which 1 KB per resident program is reserved


def resident_per_sm(cfg: GemvConfig, block_m: int, elt: int) -> int:
    """Programs of this tile one SM holds at once. Shared memory binds for every decode tile: the pipeline
    keeps num_stages - 1 ``[BLOCK_M + group x BLOCK_N, BLOCK_K]`` buffers (num_stages where Triton emits
    Hopper's wgmma: where the MMA's row side, the tokens or a swapped tile's weight rows, is 64 or more), checked
    against the compiler's own figure on the CPU (tests/test_kernel_compile.py); registers (46-96 per
    thread) would allow 5-10 programs per SM."""
    wgmma = (cfg.block_n if cfg.swap else block_m) >= 64
    buffers = cfg.num_stages if wgmma else max(cfg.num_stages - 1, 1)
    smem = buffers * (block_m + cfg.group * cfg.block_n) * cfg.block_k * elt
    return max(1, min(SMEM_PER_SM // (smem + 1024), 64 // cfg.num_warps))


_sm_count: dict[torch.device, int] = {}


def _sms(device: torch.device) -> int:
    if device not in _sm_count:
        _sm_count[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sm_count[device]


def _capacity(cfg: GemvConfig, block_m: int, x: torch.Tensor) -> int | None:
    """Programs of this tile the whole GPU holds at once (None off CUDA)."""
    if x.device.type != "cuda":
        return None
    return _sms(x.device) * resident_per_sm(cfg, block_m, x.element_size())


def _late_trigger(cfg: GemvConfig, programs: int, block_m: int, x: torch.Tensor) -> bool:
    """The tile's PDL trigger, or where it leaves it open, by how much of the GPU the grid fills (only matters
    under PDL)."""
    late = cfg.late_trigger
    return bool(pdl.late_trigger(programs, _capacity(cfg, block_m, x)) if late is None else late)


def _precision(x: torch.Tensor) -> str:
    """The dots' input precision: IEEE for fp32 inputs (exact enough for the parity tests), else tensor cores."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def launch_grid(N: int, K: int, cfg: GemvConfig) -> tuple[int, int, int]:
    """``(row tiles, K splits, columns per split)`` of a launch: each split covers a whole number of
    BLOCK_K steps, so a short K gets fewer splits than ``cfg.split_k`` asks for."""
    k_split = triton.cdiv(triton.cdiv(K, cfg.split_k), cfg.block_k) * cfg.block_k
    return triton.cdiv(N, cfg.group * cfg.block_n), triton.cdiv(K, k_split), k_split


def skinny_linear(x: torch.Tensor, w: torch.Tensor, config: GemvConfig | None = None) -> torch.Tensor:
    """``x [M, K]`` (M <= 64, unit stride along K), ``w [N, K]`` (row-major rows, unit stride along K)
    -> ``y [M, N]`` in x's dtype. One launch, no host sync, CUDA-graph safe (split-K: after
    ``arrival.prepare``). ``config`` defaults to :func:`pick_config` for the shape."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"skinny_linear needs x [M, K] and w [N, K]; got {tuple(x.shape)} and {tuple(w.shape)}")
    (M, K), N = x.shape, w.shape[0]
    if not 1 <= M <= MAX_M:
        raise ValueError(f"skinny_linear handles 1 <= M <= {MAX_M} rows; got M={M} (use F.linear)")
    if x.dtype != w.dtype:
        raise ValueError(f"x and w must share a dtype; got {x.dtype} and {w.dtype}")
    for name, t in (("x", x), ("w", w)):
        if t.stride(1) != 1:
            raise ValueError(f"{name} needs unit stride along K (call .contiguous() first)")
    cfg = config or pick_config(M, N, K)
    if config is None and _prefetch_k and not cfg.tma:  # --skinny-prefetch: a pointer-kernel option
        cfg = dataclasses.replace(cfg, prefetch_k=_prefetch_k)
    y = x.new_empty(M, N)
    block_m = max(16, triton.next_power_of_2(M))
    if cfg.persistent:
        return _launch_persistent(x, w, y, cfg, block_m)
    if cfg.tma and tma_usable(x, w):
        return _launch_tma(x, w, y, cfg, block_m)
    n_tiles, split_k, k_split = launch_grid(N, K, cfg)
    line = 128 // w.element_size()  # columns per 128-byte line: prefetch_k >= 64 covers whole lines of any dtype
    late = _late_trigger(cfg, n_tiles * split_k, block_m, x)
    if split_k > 1:
        ws, cnt = torch.empty(split_k * block_m * N, dtype=torch.float32, device=x.device), counters(x.device, n_tiles)
    else:
        ws = cnt = y  # unused
    _skinny_gemm_kernel[(n_tiles, split_k)](
        x, w, y, ws, cnt, M, N, K, k_split, x.stride(0), w.stride(0), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=K % cfg.block_k == 0,
        SPLIT_K=split_k, PRECISION=_precision(x), LATE_TRIGGER=late,
        PREFETCH_K=min(cfg.prefetch_k, max(line, triton.next_power_of_2(k_split))), LINE=line, SWAP=cfg.swap,
        GROUP=cfg.group, TRIGGER_LEFT=cfg.trigger_left if late else 0, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **launch_args(),
    )  # fmt: skip
    return y


def persistent_programs(n_tiles: int, cfg: GemvConfig, device: torch.device) -> int:
    """Programs of a persistent launch: ``cfg.persistent`` per SM, at most one per row tile (off CUDA, where
    there are no SMs: up to 3, so that the interpreter's programs loop over several tiles)."""
    return min(n_tiles, _sms(device) * cfg.persistent if device.type == "cuda" else 3)


def _launch_persistent(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, cfg: GemvConfig, block_m: int):
    """:func:`skinny_linear` for a ``persistent`` tile: ``cfg.persistent`` programs per SM over all row tiles."""
    (M, K), N = x.shape, w.shape[0]
    n_tiles = triton.cdiv(N, cfg.block_n)
    programs = persistent_programs(n_tiles, cfg, x.device)
    late = _late_trigger(cfg, programs, block_m, x)
    _skinny_gemm_persistent_kernel[(programs,)](
        x, w, y, M, N, K, n_tiles, programs, x.stride(0), w.stride(0), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=K % cfg.block_k == 0,
        PRECISION=_precision(x), LATE_TRIGGER=late, SWAP=cfg.swap,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_args(),
    )  # fmt: skip
    return y


_tma_devices: dict[torch.device, bool] = {}


def _has_tma(device: torch.device) -> bool:
    """A GPU of compute capability 9.0 (Hopper) or newer, or Triton's CPU interpreter, which emulates TMA."""
    if device.type != "cuda":
        return True
    if device not in _tma_devices:
        _tma_devices[device] = torch.cuda.get_device_capability(device)[0] >= 9
    return _tma_devices[device]


def tma_usable(*tensors: torch.Tensor) -> bool:
    """Whether TMA can fetch these operands: 16-byte aligned base addresses and row strides, on a device that
    has TMA (:func:`_has_tma`)."""
    return _has_tma(tensors[0].device) and all(t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0 for t in tensors)


def _launch_tma(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, cfg: GemvConfig, block_m: int):
    """:func:`skinny_linear` for a ``tma`` tile: host-built tensor descriptors (a kernel parameter each, so a
    CUDA graph keeps them with the launch)."""
    (M, K), N = x.shape, w.shape[0]
    n_tiles = triton.cdiv(N, cfg.block_n)
    late = _late_trigger(cfg, n_tiles, block_m, x)
    _skinny_gemm_tma_kernel[(n_tiles,)](
        TensorDescriptor.from_tensor(x, [block_m, cfg.block_k]), TensorDescriptor.from_tensor(w, [cfg.block_n, cfg.block_k]),
        y, M, N, K, y.stride(0), BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        PRECISION=_precision(x), LATE_TRIGGER=late,
        SWAP=cfg.swap, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_args(),
    )  # fmt: skip
    return y


def skinny_linear_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)
