"""Triton kernels for the routed experts of a MoE block: two paths, every size fixed by
``(T, k, E, BLOCK_M)`` and no host sync anywhere, so both capture in CUDA graphs.

**Sorted path** (decode batches and prefill), four launches:

1. ``_moe_align_kernel`` (one program): group the ``M = T·k`` (token, slot) *pairs* by expert and pad
   each expert's segment to a multiple of ``BLOCK_M`` -> ``sorted_ids [max_padded]`` (a pair index,
   or the sentinel ``M`` on padding), ``expert_ids [max_blocks]`` (the expert of each M-block, -1
   past the end) and ``num_post [1]`` (the padded length, read by the GEMMs to skip unused blocks).
   Past ``ALIGN_TRITON_MAX_PAIRS`` the same outputs come from torch ops (``moe_align_torch``, also
   the reference): one program would walk 10^5 pairs serially.
2. ``_w13_silu_kernel``: grid ``(max_blocks, cdiv(I, BN1))``; each program gathers its block's
   token rows of ``x``, multiplies by the gate *and* up rows ``[n, n+BN1)`` of its expert's ``w13``
   (two accumulators, one pass over ``H``) and writes ``silu(gate)·up`` to ``inter [M, I]`` at the
   pair's row. Only touched experts' weights are read; each weight tile once per M-block.
3. ``_w2_kernel``: grid ``(max_blocks, cdiv(H, BN2))``; ``inter @ w2[e].T`` scaled by the pair's
   routing weight, written to ``out_k [M, H]`` (pair-major, i.e. ``[T, k, H]``).
4. ``out_k.view(T, k, H).sum(1)``. We write ``[T, k, H]`` and sum rather than atomically adding into
   an fp32 ``[T, H]``: atomics need a zeroed buffer and a cast (the same launch count), and make the
   output order-dependent (run-to-run bit differences); every ``out_k`` row is written exactly once.

Grid axis 0 is the M-block so that consecutive programs (same N-tile, neighbouring M-blocks, mostly
the same expert at prefill) reuse a weight tile from L2.

**GEMV path** (a few tokens, ``T·k <= 40``), two launches and no workspace but ``inter``:
``_gemv_w13_silu_kernel`` over (pair, N-tile) and ``_gemv_w2_kernel`` over (token, N-tile), which
loads the token's k experts' tiles at once and so also does the k-sum. An expert shared by two tokens
is read twice, which at T <= 4 costs less than the align and sum launches (see the table below).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from deltaserve.ops import pdl
from deltaserve.ops.pdl import launch_args, pdl_gate, pdl_trigger, pdl_wait

# Workspaces go through this hook so that tests can hand out poisoned (NaN / garbage) buffers and
# prove that nothing is read before it is written.
_empty = torch.empty

# Above this many pairs the alignment runs as torch ops: the one-program kernel walks the pairs
# serially (H200, E=256: 3 us at M=8, 6 us at 512, 93 us at 16K, 396 us at 64K; torch ops 44-134 us).
ALIGN_TRITON_MAX_PAIRS = 16384


@dataclass(frozen=True)
class MoeConfig:
    """Tile sizes. Kernel 1 tiles N over I and K over H; kernel 2 tiles N over H and K over I.

    ``gemv``: per-pair GEMV kernels instead (no sort, no k-sum launch; ``block_m`` unused). Meant for
    a token or two, where the sorted path's extra launches cost more than re-reading an expert that
    two tokens share.
    """

    block_m: int
    block_n1: int
    block_k1: int
    block_n2: int
    block_k2: int
    num_warps: int = 4
    num_stages: int = 3
    gemv: bool = False


# Chosen from a per-kernel sweep on an H200 (L2 flushed, all three model shapes; tests/
# test_fused_moe_gpu.py prints the end-to-end table). The first bucket with M = T·k <= bound wins
# (k counts the folded shared expert's slot). scripts/bench_moe.py times the table and a sweep of GEMV
# tiles on the device.
# - M <= 40 (a few tokens): the GEMV pair, 2 launches; the sorted path's align + k-sum launches
#   cost ~5 us there (T=1, 35B-A3B: 30 us vs 33 us with the former GEMV tiles). At T=1 the 57 MB
#   are limited by the bytes in flight, so each program issues all of its weight reads at once:
#   w13 a [4, 2048] gate tile and an up tile (32 KB; 1152 programs at T=1, 8+1 experts), w2 one
#   [k, 2, 512] tile over all k experts (18 KB; 1024 programs). The former tiles ([4, 256] in 8 steps
#   over H, and a loop over the k experts) made each program wait on ~8-9 dependent DRAM round trips,
#   which fits the 29.6 us (41% of the floor) measured at T=1. 8 warps keep the wide tiles out of
#   register spills. Timed on an H200 (scripts/bench_moe.py --sweep, 2026-11-28, docs/perf/2026-11-28c.md):
#   these tiles with [4, 2048] w13 tiles and 8 warps took 21.9 us at T=1 (61% of the floor); [2, 2048]
#   w13 tiles with 4 warps won the sweep, 20.4 us (65%), and are within 1% of the best at T=2 and 4.
# - decode batches: BLOCK_M 16 (tl.dot's minimum), narrow N tiles so that the touched experts give
#   several programs per SM, long K tiles for wide weight loads.
# - prefill: BLOCK_M 32-64; 120-180 TFLOP/s end to end at T=2048 (far from the tensor-core peak;
#   correctness first there).
# (M bucket, H, I) entries in _CONFIGS override the defaults for one model.
_CONFIGS: dict[tuple[int, int, int], MoeConfig] = {
    # 122B-A10B: H = 3072 is not a multiple of 2048; I = 1024 in two w2 steps.
    (40, 3072, 1024): MoeConfig(16, 4, 1024, 2, 512, num_warps=8, num_stages=1, gemv=True),
}
_DEFAULT_BUCKETS: list[tuple[int, MoeConfig]] = [
    (40, MoeConfig(16, 2, 2048, 2, 512, num_warps=4, num_stages=1, gemv=True)),
    (160, MoeConfig(16, 32, 256, 32, 128, num_warps=4, num_stages=3)),
    (1024, MoeConfig(16, 64, 256, 128, 128, num_warps=4, num_stages=3)),
    (8192, MoeConfig(32, 128, 128, 128, 128, num_warps=4, num_stages=3)),
    (1 << 62, MoeConfig(64, 64, 64, 128, 64, num_warps=4, num_stages=3)),
]


def pick_config(num_pairs: int, H: int, I: int) -> MoeConfig:
    """The config for ``num_pairs = T·k``: the (M bucket, H, I) table first, else the defaults."""
    for bound, cfg in _DEFAULT_BUCKETS:
        if num_pairs <= bound:
            return _CONFIGS.get((bound, H, I), cfg)
    raise AssertionError("unreachable: the last bucket is unbounded")


def align_chunk(num_pairs: int) -> int:
    """``_moe_align_kernel``'s CHUNK (pairs per loop step, a constexpr): two sizes, not one per power of two,
    so that the batch sizes of a server's life compile the kernel twice (a decode batch of <= 16 tokens at
    k = 8 is one 128-pair step: 4 warps are 128 lanes, so a narrower chunk would not be faster)."""
    return 128 if num_pairs <= 128 else 1024


def padded_sizes(num_pairs: int, num_experts: int, block_m: int) -> tuple[int, int]:
    """``(max_padded, max_blocks)``: every hit expert pads by < BLOCK_M, and at most min(E, M) are hit."""
    max_blocks = (num_pairs + min(num_experts, num_pairs) * (block_m - 1)) // block_m
    return max_blocks * block_m, max_blocks


@triton.jit(do_not_specialize=["num_pairs", "max_padded", "max_blocks"])
def _moe_align_kernel(
    ids_ptr, sorted_ptr, expert_ids_ptr, num_post_ptr, cursor_ptr,
    num_pairs, max_padded, max_blocks,
    BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, FILL: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_gate(PDL)
    # One program. Invariant: expert e owns [starts[e], starts[e] + padded[e]); each of its pairs
    # takes one slot at the front through an atomic cursor, everything else is the sentinel M.
    # The order of pairs inside a segment is thus arbitrary; results are not (every row of a tile is
    # computed on its own). While loops, not range(): M varies per call (a constexpr would recompile
    # per batch size), and Triton's interpreter cannot range() over a run-time int under numpy 2.4.
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    c0 = 0
    while c0 < num_pairs:
        offs = c0 + tl.arange(0, CHUNK)
        ok = offs < num_pairs
        ids = tl.load(ids_ptr + offs, mask=ok, other=0).to(tl.int32)
        counts += tl.histogram(ids, BLOCK_E, mask=ok)
        c0 += CHUNK
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)  # [BLOCK_E], inclusive
    tl.store(cursor_ptr + tl.arange(0, BLOCK_E), ends - padded)
    tl.store(num_post_ptr, tl.sum(padded, axis=0))
    f0 = 0
    while f0 < max_padded:
        offs = f0 + tl.arange(0, FILL)
        tl.store(sorted_ptr + offs, tl.full([FILL], 0, tl.int32) + num_pairs, mask=offs < max_padded)
        tl.store(expert_ids_ptr + offs, tl.full([FILL], -1, tl.int32), mask=offs < max_blocks)
        f0 += FILL
    tl.debug_barrier()  # the cursors and the fill above must land before the scatter below

    c0 = 0
    while c0 < num_pairs:
        offs = c0 + tl.arange(0, CHUNK)
        ok = offs < num_pairs
        ids = tl.load(ids_ptr + offs, mask=ok, other=0).to(tl.int32)
        dest = tl.atomic_add(cursor_ptr + ids, 1, mask=ok)  # the old cursor is this pair's slot
        tl.store(sorted_ptr + dest, offs, mask=ok)
        tl.store(expert_ids_ptr + dest // BLOCK_M, ids, mask=ok)  # same value from each pair of a block
        c0 += CHUNK


def moe_align_triton(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids ``[T, k]`` -> ``(sorted_ids [max_padded], expert_ids [max_blocks], num_post [1])``, int32.

    Segments in expert order, each padded to a multiple of ``block_m``; pairs inside a segment in
    no particular order. One launch.
    """
    M = topk_ids.numel()
    max_padded, max_blocks = padded_sizes(M, num_experts, block_m)
    dev = topk_ids.device
    block_e = triton.next_power_of_2(num_experts)
    sorted_ids = _empty(max_padded, dtype=torch.int32, device=dev)
    expert_ids = _empty(max_blocks, dtype=torch.int32, device=dev)
    num_post = _empty(1, dtype=torch.int32, device=dev)
    cursor = _empty(block_e, dtype=torch.int32, device=dev)
    _moe_align_kernel[(1,)](
        topk_ids.reshape(-1), sorted_ids, expert_ids, num_post, cursor, M, max_padded, max_blocks,
        BLOCK_E=block_e, BLOCK_M=block_m, CHUNK=align_chunk(M),
        FILL=1024, num_warps=4, **launch_args(),
    )  # fmt: skip
    return sorted_ids, expert_ids, num_post


def moe_align_torch(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The PyTorch reference of ``moe_align_triton`` (a stable sort; capture-safe, ~15 launches)."""
    flat = topk_ids.reshape(-1).long()  # [M]
    M = flat.numel()
    max_padded, max_blocks = padded_sizes(M, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)  # [E]
    sorted_e, order = torch.sort(flat, stable=True)
    rank = torch.arange(M, device=flat.device) - (counts.cumsum(0) - counts)[sorted_e]
    sorted_ids = torch.full((max_padded,), M, dtype=torch.int32, device=flat.device)
    sorted_ids.scatter_(0, (ends - padded)[sorted_e] + rank, order.to(torch.int32))
    pos = torch.arange(max_blocks, device=flat.device) * block_m
    expert_ids = torch.searchsorted(ends, pos, right=True).clamp_(max=num_experts - 1)
    expert_ids = torch.where(pos < ends[-1], expert_ids, -1).to(torch.int32)
    return sorted_ids, expert_ids, ends[-1:].to(torch.int32)


@triton.jit(do_not_specialize=["num_pairs"])
def _w13_silu_kernel(
    x_ptr, w13_ptr, inter_ptr, sorted_ptr, expert_ids_ptr, num_post_ptr,
    num_pairs,
    stride_xt, stride_we, stride_wn, stride_it,
    H: tl.constexpr, I: tl.constexpr, TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr,
    LATE_TRIGGER: tl.constexpr,
):  # fmt: skip
    """inter[pair, n] = silu(x[token] · w13[e, n]) · (x[token] · w13[e, I + n]) for the block's pairs."""
    pdl_wait(PDL)
    if not LATE_TRIGGER:
        pdl_trigger(PDL)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_post_ptr):
        return  # past the last padded segment: this launch size covers the worst routing
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + offs_m)
    row_ok = pair < num_pairs  # padding rows carry the sentinel num_pairs
    token = (pair // TOP_K).to(tl.int64)
    e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)  # int64: e · stride_we overflows int32
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < I
    a_ptrs = x_ptr + token[:, None] * stride_xt + offs_k[None, :]  # [BM, BK]
    g_ptrs = w13_ptr + e * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BK, BN]
    u_ptrs = g_ptrs + I * stride_wn
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K and EVEN_N:  # the real shapes: weight loads without predicates
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            g = tl.load(g_ptrs)
            u = tl.load(u_ptrs)
        else:
            k_ok = offs_k < H - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc_g = tl.dot(a, g, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, u, acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    if LATE_TRIGGER:  # only the epilogue is left
        pdl_trigger(PDL)
    h = acc_g * tl.sigmoid(acc_g) * acc_u  # SwiGLU in fp32, rounded once on the store
    i_ptrs = inter_ptr + pair.to(tl.int64)[:, None] * stride_it + offs_n[None, :]
    tl.store(i_ptrs, h.to(inter_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["num_pairs"])
def _w2_kernel(
    inter_ptr, w2_ptr, out_ptr, weights_ptr, sorted_ptr, expert_ids_ptr, num_post_ptr,
    num_pairs,
    stride_it, stride_we, stride_wn, stride_ot,
    H: tl.constexpr, I: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr,
    LATE_TRIGGER: tl.constexpr,
):  # fmt: skip
    """out_k[pair, n] = w[pair] · (inter[pair] · w2[e, n]) for the block's pairs."""
    pdl_wait(PDL)
    if not LATE_TRIGGER:
        pdl_trigger(PDL)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_post_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + offs_m)
    row_ok = pair < num_pairs
    pair64 = pair.to(tl.int64)
    e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < H
    a_ptrs = inter_ptr + pair64[:, None] * stride_it + offs_k[None, :]  # [BM, BK]
    b_ptrs = w2_ptr + e * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BK, BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        if EVEN_K and EVEN_N:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs)
        else:
            k_ok = offs_k < I - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if LATE_TRIGGER:  # only the epilogue is left
        pdl_trigger(PDL)
    w = tl.load(weights_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
    o_ptrs = out_ptr + pair64[:, None] * stride_ot + offs_n[None, :]
    tl.store(o_ptrs, (acc * w[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _gemv_w13_silu_kernel(
    x_ptr, w13_ptr, inter_ptr, ids_ptr,
    stride_xt, stride_we, stride_wn, stride_it,
    H: tl.constexpr, I: tl.constexpr, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN: tl.constexpr, PDL: tl.constexpr, LATE_TRIGGER: tl.constexpr,
):  # fmt: skip
    """Grid (T·k, I / BLOCK_N): inter[pair, n] = silu(w13[e, n] · x[t]) · (w13[e, I + n] · x[t])."""
    pdl_wait(PDL)
    if not LATE_TRIGGER:
        pdl_trigger(PDL)
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    token = (pair // TOP_K).to(tl.int64)
    e = tl.load(ids_ptr + pair).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < I
    x_ptrs = x_ptr + token * stride_xt + offs_k  # [BK]
    g_ptrs = w13_ptr + e * stride_we + offs_n[:, None] * stride_wn + offs_k[None, :]  # [BN, BK]
    u_ptrs = g_ptrs + I * stride_wn
    acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if EVEN:
            xk = tl.load(x_ptrs)
            g = tl.load(g_ptrs)
            u = tl.load(u_ptrs)
        else:
            k_ok = offs_k < H - k0
            xk = tl.load(x_ptrs, mask=k_ok, other=0.0)
            g = tl.load(g_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        xf = xk.to(tl.float32)[None, :]
        acc_g += tl.sum(g.to(tl.float32) * xf, axis=1)
        acc_u += tl.sum(u.to(tl.float32) * xf, axis=1)
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    if LATE_TRIGGER:  # only the epilogue is left
        pdl_trigger(PDL)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(inter_ptr + pair * stride_it + offs_n, h.to(inter_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _w2_routes(ids_ptr, weights_ptr, w2_ptr, pair, j_ok, offs_n, offs_k, stride_we, stride_wn,
               CACHE: tl.constexpr):
    """The k slots' gate weights ``[KP]`` (fp32) and their experts' w2 tile pointers ``[KP, BN, BK]``."""
    e = tl.load(ids_ptr + pair, mask=j_ok, other=0, cache_modifier=CACHE).to(tl.int64)
    w = tl.load(weights_ptr + pair, mask=j_ok, other=0.0, cache_modifier=CACHE).to(tl.float32)
    return w, w2_ptr + e[:, None, None] * stride_we + offs_n[None, :, None] * stride_wn + offs_k[None, None, :]


@triton.jit
def _gemv_w2_kernel(
    inter_ptr, w2_ptr, out_ptr, weights_ptr, ids_ptr,
    stride_it, stride_we, stride_wn, stride_ot,
    H: tl.constexpr, I: tl.constexpr, TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN: tl.constexpr, PDL: tl.constexpr, LATE_TRIGGER: tl.constexpr,
    PRELOAD: tl.constexpr,
):  # fmt: skip
    """Grid (T, H / BLOCK_N): out[t, n] = sum_j w[t, j] · (w2[e_j, n] · inter[t·k + j]), in one program.

    The k experts' tiles are one ``[K_PAD, BLOCK_N, BLOCK_K]`` load, so all their reads are in flight
    at once (a loop over the experts would wait for each in turn); slots past k are masked off.
    With PRELOAD (``pdl.preload``, EVEN shapes only) the ids, the weights and the first weight chunk are
    read before the PDL wait: the router wrote them two kernels back; only ``inter`` comes from w13.
    """
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_j = tl.arange(0, K_PAD)
    j_ok = offs_j < TOP_K
    pair = (t * TOP_K + offs_j).to(tl.int64)  # [KP]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < H
    if PRELOAD:  # .cg: from L2, where the router's stores landed
        w, b_ptrs = _w2_routes(ids_ptr, weights_ptr, w2_ptr, pair, j_ok, offs_n, offs_k, stride_we, stride_wn, ".cg")
        b_first = tl.load(b_ptrs, mask=j_ok[:, None, None], other=0.0)
    pdl_wait(PDL)
    if not LATE_TRIGGER:
        pdl_trigger(PDL)
    if not PRELOAD:
        w, b_ptrs = _w2_routes(ids_ptr, weights_ptr, w2_ptr, pair, j_ok, offs_n, offs_k, stride_we, stride_wn, "")
    a_ptrs = inter_ptr + pair[:, None] * stride_it + offs_k[None, :]  # [KP, BK]
    acc = tl.zeros([K_PAD, BLOCK_N], dtype=tl.float32)
    k_start = 0
    if PRELOAD:  # the first chunk, as the loop below would do it (the same summation order)
        a = tl.load(a_ptrs, mask=j_ok[:, None], other=0.0)
        acc += tl.sum(b_first.to(tl.float32) * a.to(tl.float32)[:, None, :], axis=2)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
        k_start = BLOCK_K
    for k0 in range(k_start, I, BLOCK_K):
        if EVEN:
            a = tl.load(a_ptrs, mask=j_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=j_ok[:, None, None], other=0.0)
        else:
            k_ok = offs_k < I - k0
            a = tl.load(a_ptrs, mask=j_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=j_ok[:, None, None] & n_ok[None, :, None] & k_ok[None, None, :], other=0.0)
        acc += tl.sum(b.to(tl.float32) * a.to(tl.float32)[:, None, :], axis=2)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if LATE_TRIGGER:  # only the epilogue is left
        pdl_trigger(PDL)
    out = tl.sum(acc * w[:, None], axis=0)  # [BN]: the k-sum, in slot order
    tl.store(out_ptr + t * stride_ot + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_ok)


def _fused_moe_gemv(x, w13, w2, topk_weights, topk_ids, cfg: MoeConfig) -> torch.Tensor:
    """Two launches: grid (T·k, I/BN1) then (T, H/BN2); the k-sum happens in the second."""
    T, H = x.shape
    I, k = w2.shape[2], topk_ids.shape[1]
    inter = _empty(T * k, I, dtype=x.dtype, device=x.device)  # [T·k, I]
    out = _empty(T, H, dtype=x.dtype, device=x.device)
    even2 = I % cfg.block_k2 == 0 and H % cfg.block_n2 == 0
    w13_late = pdl.late_trigger(T * k * triton.cdiv(I, cfg.block_n1))
    # w2 reads its weights before the wait only where w13 may let it launch early: a w13 grid too large to
    # share the GPU (every decode size of the released shapes) keeps its late trigger, and w2 no preload.
    # Forcing it (H100, 35B-A3B, 8 layers) cost +3% a block at T=1 and +28% at T=4 (docs/perf/2026-12-06.md).
    preload = pdl.preload() and even2 and not w13_late
    _gemv_w13_silu_kernel[(T * k, triton.cdiv(I, cfg.block_n1))](
        x, w13, inter, topk_ids, x.stride(0), w13.stride(0), w13.stride(1), inter.stride(0),
        H=H, I=I, TOP_K=k, BLOCK_N=cfg.block_n1, BLOCK_K=cfg.block_k1,
        EVEN=H % cfg.block_k1 == 0 and I % cfg.block_n1 == 0, num_warps=cfg.num_warps,
        LATE_TRIGGER=w13_late and not preload, **launch_args(),
    )  # fmt: skip
    _gemv_w2_kernel[(T, triton.cdiv(H, cfg.block_n2))](
        inter, w2, out, topk_weights, topk_ids, inter.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
        H=H, I=I, TOP_K=k, K_PAD=triton.next_power_of_2(k), BLOCK_N=cfg.block_n2, BLOCK_K=cfg.block_k2,
        EVEN=even2, num_warps=cfg.num_warps, LATE_TRIGGER=pdl.late_trigger(T * triton.cdiv(H, cfg.block_n2)),
        PRELOAD=preload, **launch_args(),
    )  # fmt: skip
    return out


def fused_moe_triton(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    config: MoeConfig | None = None,
) -> torch.Tensor:
    """x ``[T, H]``, w13 ``[E, 2I, H]``, w2 ``[E, H, I]``, topk ``[T, k]`` -> ``[T, H]`` (x's dtype).

    Inputs are assumed validated (``fused_moe`` does it), contiguous topk, unit stride in last dims.
    """
    T, H = x.shape
    E, I = w2.shape[0], w2.shape[2]
    k = topk_ids.shape[1]
    M = T * k
    cfg = config or pick_config(M, H, I)
    if cfg.gemv:
        return _fused_moe_gemv(x, w13, w2, topk_weights, topk_ids, cfg)
    align = moe_align_triton if M <= ALIGN_TRITON_MAX_PAIRS else moe_align_torch
    sorted_ids, expert_ids, num_post = align(topk_ids, E, cfg.block_m)
    max_blocks = expert_ids.numel()
    inter = _empty(M, I, dtype=x.dtype, device=x.device)  # [T·k, I], pair-major
    out_k = _empty(M, H, dtype=x.dtype, device=x.device)  # [T·k, H]
    # fp32 inputs: full-precision dots (Triton's default for fp32 would be TF32); ignored for bf16.
    launch = dict(PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)  # fmt: skip
    _w13_silu_kernel[(max_blocks, triton.cdiv(I, cfg.block_n1))](
        x, w13, inter, sorted_ids, expert_ids, num_post, M,
        x.stride(0), w13.stride(0), w13.stride(1), inter.stride(0),
        H=H, I=I, TOP_K=k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n1, BLOCK_K=cfg.block_k1,
        EVEN_K=H % cfg.block_k1 == 0, EVEN_N=I % cfg.block_n1 == 0,
        LATE_TRIGGER=pdl.late_trigger(max_blocks * triton.cdiv(I, cfg.block_n1)), **launch, **launch_args(),
    )  # fmt: skip
    _w2_kernel[(max_blocks, triton.cdiv(H, cfg.block_n2))](
        inter, w2, out_k, topk_weights.reshape(-1), sorted_ids, expert_ids, num_post, M,
        inter.stride(0), w2.stride(0), w2.stride(1), out_k.stride(0),
        H=H, I=I, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n2, BLOCK_K=cfg.block_k2,
        EVEN_K=I % cfg.block_k2 == 0, EVEN_N=H % cfg.block_n2 == 0,
        LATE_TRIGGER=pdl.late_trigger(max_blocks * triton.cdiv(H, cfg.block_n2)), **launch, **launch_args(),
    )  # fmt: skip
    if k == 1:
        return out_k
    return out_k.view(T, k, H).sum(dim=1)  # fp32 accumulation inside, x's dtype out
