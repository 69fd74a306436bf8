"""Triton kernels for the paged KV cache: store, flash-decoding decode, varlen prefill.

Callers go through ``deltaserve.ops.paged_attention`` (which validates inputs); the launchers here
assume validated tensors. Layout: ``k_cache, v_cache [num_blocks, block_size, Hkv, D]``; token
``t`` of sequence ``b`` lives in block ``block_tables[b, t // block_size]`` at offset
``t % block_size``. A KV tile of ``BLOCK_N`` tokens may span several cache blocks: each row looks
its block id up on its own, so any block size (1, 16, 32, ...) works with the same tile.

Every attention program owns one KV head and all ``G = Hq / Hkv`` query heads that read it, so a
K/V tile is loaded once per GQA group. Scores are computed in the log2 domain
(``scale * log2(e)`` folded in once) and the softmax runs in fp32; P is cast to the cache dtype
for the P @ V product, as flash attention does. An optional output gate (``o * sigmoid(gate)``) is
applied in the epilogue of whichever kernel writes ``o``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from deltaserve.ops.pdl import launch_args, pdl_gate

_LOG2E = 1.4426950408889634

# Flash-decoding split policy, tuned on an H200 at Hq=16, Hkv=2, D=256, bf16 (CUDA-graph timings):
# B=1 wants 32-64 splits, B=8 about 16, B=64 about 3-4 (there the grid already fills the GPU and
# more splits only add partial-result traffic). "Two programs per SM" reproduces that.
_PROGRAMS_PER_SM = 2
# No split shorter than this many tokens of max_model_len (a 2048-token model at B=1 still gets 32).
_MIN_TOKENS_PER_SPLIT = 64
_MAX_SPLITS = 64


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_num_splits(batch: int, num_kv_heads: int, max_model_len: int, num_sms: int = 132) -> int:
    """How many programs share one (sequence, KV head) in ``paged_attention_decode``.

    A function of static sizes only (never of the live ``seq_lens``), so a captured CUDA graph keeps
    a fixed grid. Enough splits to put ``_PROGRAMS_PER_SM`` programs on every SM, no split shorter
    than ``_MIN_TOKENS_PER_SPLIT`` tokens of ``max_model_len``, at most ``_MAX_SPLITS``.
    """
    want = triton.cdiv(_PROGRAMS_PER_SM * num_sms, batch * num_kv_heads)
    cap = max(1, max_model_len // _MIN_TOKENS_PER_SPLIT)
    return max(1, min(want, cap, _MAX_SPLITS))


def default_num_splits(q: torch.Tensor, k_cache: torch.Tensor, block_tables: torch.Tensor) -> int:
    """``decode_num_splits`` with max_model_len = table width x block size (static shapes only)."""
    if not q.is_cuda:
        return decode_num_splits(q.shape[0], k_cache.shape[2], block_tables.shape[1] * k_cache.shape[1])
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    sms = _num_sms(index)
    return decode_num_splits(q.shape[0], k_cache.shape[2], block_tables.shape[1] * k_cache.shape[1], sms)


def _pow2(n: int, at_least: int = 1) -> int:
    return max(at_least, triton.next_power_of_2(n))


def _dot_precision(q: torch.Tensor) -> str:
    # fp32 caches (the CPU-dtype engine run on a GPU, tests) must not silently drop to tf32.
    return "ieee" if q.dtype == torch.float32 else "tf32"


@triton.jit
def _epilogue(out, gate_ptrs, mask, HAS_GATE: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """fp32 ``out`` in the output dtype, times ``sigmoid(gate)``, each rounded where the eager
    ``o.to(dtype) * torch.sigmoid(gate)`` rounds."""
    out = out.to(OUT_DTYPE)
    if HAS_GATE:
        g = tl.sigmoid(tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)).to(OUT_DTYPE)
        out = (out.to(tl.float32) * g.to(tl.float32)).to(OUT_DTYPE)
    return out


# --------------------------------------------------------------------------------------- store


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    HKV: tl.constexpr, HKV_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_gate(PDL)
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding token: leave the cache alone
        return
    blk = slot // PAGE
    off = slot % PAGE
    h = tl.arange(0, HKV_PAD)[:, None]
    d = tl.arange(0, D_PAD)[None, :]
    mask = (h < HKV) & (d < D)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(kc_ptr + blk * stride_kcb + off * stride_kcs + h * stride_kch + d,
             k.to(kc_ptr.dtype.element_ty), mask=mask)  # fmt: skip
    tl.store(vc_ptr + blk * stride_vcb + off * stride_vcs + h * stride_vch + d,
             v.to(vc_ptr.dtype.element_ty), mask=mask)  # fmt: skip


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """One program per token writes all its KV heads; padding tokens (slot < 0) return at once."""
    T, Hkv, D = k.shape
    if T == 0:
        return
    _store_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HKV=Hkv, HKV_PAD=_pow2(Hkv), D=D, D_PAD=_pow2(D), PAGE=k_cache.shape[1],
        num_warps=4 if Hkv * D >= 1024 else 2, **launch_args(),
    )  # fmt: skip


# --------------------------------------------------------------------------------------- decode


# The split count and the block-table width are run-time arguments, not specialised: they change with the
# batch size, and as constexprs they compiled the decode kernel once per captured batch size (9 times at
# start-up on the 35B-A3B shape). SPLIT (num_splits > 1) picks the code path.
@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _decode_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, seq_lens_ptr, o_ptr, gate_ptr, part_o_ptr, part_m_ptr, part_l_ptr,
    scale_log2, num_splits,
    stride_qb, stride_qh, stride_ob, stride_oh, stride_gb, stride_gh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, stride_bt,
    HQ: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, DOT_PREC: tl.constexpr,
    HAS_GATE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_gate(PDL)
    # Invariant: split s of a sequence covers KV tiles [s * per, min((s + 1) * per, n_tiles)) with
    # per = max(1, cdiv(n_tiles, num_splits)) computed from the live seq_len; the reduce kernel
    # recomputes the same bounds, so splits past the end write nothing and are never read.
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    n_tiles = tl.cdiv(seq_len, BLOCK_N)
    per = tl.maximum(tl.cdiv(n_tiles, num_splits), 1)
    tile_lo = split * per
    tile_hi = tl.minimum(tile_lo + per, n_tiles)
    if SPLIT:
        if tile_lo >= tile_hi:
            return

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    heads = kvh * G + g
    gmask = g < G
    dmask = d < D
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)  # fmt: skip
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    for tile in range(tile_lo, tile_hi):
        tok = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        tmask = tok < seq_len
        blk = tl.load(bt_row + tok // PAGE, mask=tmask, other=0).to(tl.int64)
        k_off = blk * stride_kcb + (tok % PAGE) * stride_kcs + kvh * stride_kch
        v_off = blk * stride_vcb + (tok % PAGE) * stride_vcs + kvh * stride_vch
        kvmask = tmask[:, None] & dmask[None, :]
        k = tl.load(kc_ptr + k_off[:, None] + d[None, :], mask=kvmask, other=0.0)  # [BLOCK_N, D_PAD]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2  # [G_PAD, BLOCK_N]
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile has >= 1 live token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vc_ptr + v_off[:, None] + d[None, :], mask=kvmask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    omask = gmask[:, None] & dmask[None, :]
    if not SPLIT:
        # seq_len == 0 (a padded CUDA-graph slot) leaves l_i == 0: write zeros, not NaN.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        g_ptrs = gate_ptr + b * stride_gb + heads[:, None] * stride_gh + d[None, :]
        out = _epilogue(out, g_ptrs, omask, HAS_GATE, o_ptr.dtype.element_ty)
        tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out, mask=omask)
    else:
        row = (b * HQ + heads).to(tl.int64) * num_splits + split  # part_m/l [B, Hq, S]
        tl.store(part_m_ptr + row, m_i, mask=gmask)
        tl.store(part_l_ptr + row, l_i, mask=gmask)
        tl.store(part_o_ptr + row[:, None] * D + d[None, :], acc, mask=omask)  # part_o [B, Hq, S, D]


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    part_o_ptr, part_m_ptr, part_l_ptr, seq_lens_ptr, o_ptr, gate_ptr, num_splits,
    stride_ob, stride_oh, stride_gb, stride_gh,
    HQ: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    S_PAD: tl.constexpr, HAS_GATE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_gate(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    n_tiles = tl.cdiv(seq_len, BLOCK_N)
    per = tl.maximum(tl.cdiv(n_tiles, num_splits), 1)
    active = tl.cdiv(n_tiles, per)  # splits that wrote a partial result
    base = (b * HQ + h).to(tl.int64) * num_splits
    s = tl.arange(0, S_PAD)
    m = tl.load(part_m_ptr + base + s, mask=s < active, other=float("-inf"))
    l = tl.load(part_l_ptr + base + s, mask=s < active, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(active > 0, m_max, 0.0)
    w = tl.where(s < active, tl.exp2(m - m_max), 0.0)  # [S_PAD]
    l_tot = tl.sum(w * l, 0)
    d = tl.arange(0, D_PAD)
    acc = tl.zeros([D_PAD], tl.float32)
    for i in range(0, active):
        w_i = tl.exp2(tl.load(part_m_ptr + base + i) - m_max)
        acc += w_i * tl.load(part_o_ptr + (base + i) * D + d, mask=d < D, other=0.0)
    out = acc / tl.where(l_tot > 0, l_tot, 1.0)
    out = _epilogue(out, gate_ptr + b * stride_gb + h * stride_gh + d, d < D, HAS_GATE, o_ptr.dtype.element_ty)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + d, out, mask=d < D)


def paged_attention_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float, num_splits: int | None = None, block_n: int | None = None,
    num_warps: int | None = None, num_stages: int = 2, gate: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Grid ``(B, Hkv, splits)``, then a ``(B, Hq)`` reduce when ``splits > 1``; the last applies ``gate``.

    ``block_n`` / ``num_warps`` / ``num_stages`` override the tuned tiles (for sweeps).
    """
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    o = torch.empty_like(q)
    if B == 0:
        return o
    splits = num_splits or default_num_splits(q, k_cache, block_tables)
    # Many short splits (small batches) like wide tiles and 8 warps; a full grid of long splits
    # (large batches) streams best with 32-token tiles and 4 warps (H200 sweep, D=256).
    wide = splits >= 8 or D <= 128
    block_n = block_n or (64 if wide else 32)
    num_warps = num_warps or (8 if wide and D > 128 else 4)
    if splits > 1:
        part_o = torch.empty(B, Hq, splits, D, device=q.device, dtype=torch.float32)
        part_m = torch.empty(B, Hq, splits, device=q.device, dtype=torch.float32)
        part_l = torch.empty_like(part_m)
    else:
        part_o = part_m = part_l = o  # unused
    g = gate if gate is not None else o  # unused without a gate
    _decode_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, o, g, part_o, part_m, part_l,
        scale * _LOG2E, splits,
        q.stride(0), q.stride(1), o.stride(0), o.stride(1), g.stride(0), g.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        HQ=Hq, G=G, G_PAD=_pow2(G, 16), D=D, D_PAD=_pow2(D), PAGE=k_cache.shape[1],
        BLOCK_N=block_n, SPLIT=splits > 1, DOT_PREC=_dot_precision(q), HAS_GATE=gate is not None,
        num_warps=num_warps, num_stages=num_stages, **launch_args(),
    )  # fmt: skip
    if splits > 1:
        _decode_reduce_kernel[(B, Hq)](
            part_o, part_m, part_l, seq_lens, o, g, splits, o.stride(0), o.stride(1), g.stride(0), g.stride(1),
            HQ=Hq, D=D, D_PAD=_pow2(D), BLOCK_N=block_n, S_PAD=16 if splits <= 16 else _pow2(_MAX_SPLITS),
            HAS_GATE=gate is not None, num_warps=2, **launch_args(),
        )  # fmt: skip
    return o


# --------------------------------------------------------------------------------------- prefill


# In a mixed step the prefill's metadata (block tables, lengths) are slices past the step's decodes, so
# their addresses are 16-byte aligned in some steps and not in others; read one entry at a time, they need
# no alignment specialisation (which compiled this kernel three times at start-up).
@triton.jit(do_not_specialize=["stride_bt"],
            do_not_specialize_on_alignment=["bt_ptr", "cu_ptr", "seq_lens_ptr"])
def _prefill_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, cu_ptr, seq_lens_ptr, o_ptr, gate_ptr,
    scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_gt, stride_gh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, stride_bt,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
    TOK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, HAS_GATE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_gate(PDL)
    # Invariant: a program owns query tokens [t0, t0 + TOK_M) of one sequence and all G query heads
    # of one KV head, as BLOCK_M = TOK_M * G_PAD rows (row r = token r // G_PAD, head r % G_PAD).
    # Query token i sits at position ctx + i and sees cache positions 0 .. ctx + i, so the KV loop
    # stops at the tile's last position; key 0 is visible to every row, so m_i is finite after the
    # first tile (no -inf - -inf).
    BLOCK_M: tl.constexpr = TOK_M * G_PAD
    tile = tl.num_programs(0) - 1 - tl.program_id(0)  # longest (last) tiles start first
    n = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(cu_ptr + n)
    q_len = tl.load(cu_ptr + n + 1) - q_start
    t0 = tile * TOK_M
    if t0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + n)
    ctx = seq_len - q_len

    r = tl.arange(0, BLOCK_M)
    tok = t0 + r // G_PAD
    g = r % G_PAD
    rmask = (tok < q_len) & (g < G)
    qpos = ctx + tok
    d = tl.arange(0, D_PAD)
    dmask = d < D
    q_rows = (q_start + tok).to(tl.int64) * stride_qt + (kvh * G + g) * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    bt_row = bt_ptr + n.to(tl.int64) * stride_bt
    kv_hi = tl.minimum(seq_len, ctx + t0 + TOK_M)
    for start in range(0, kv_hi, BLOCK_N):
        kpos = start + tl.arange(0, BLOCK_N)
        kmask = kpos < kv_hi
        blk = tl.load(bt_row + kpos // PAGE, mask=kmask, other=0).to(tl.int64)
        k_off = blk * stride_kcb + (kpos % PAGE) * stride_kcs + kvh * stride_kch
        v_off = blk * stride_vcb + (kpos % PAGE) * stride_vcs + kvh * stride_vch
        kvmask = kmask[:, None] & dmask[None, :]
        k = tl.load(kc_ptr + k_off[:, None] + d[None, :], mask=kvmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2  # [BLOCK_M, BLOCK_N]
        s = tl.where((kpos[None, :] <= qpos[:, None]) & kmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vc_ptr + v_off[:, None] + d[None, :], mask=kvmask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    omask = rmask[:, None] & dmask[None, :]
    g_rows = (q_start + tok).to(tl.int64) * stride_gt + (kvh * G + g) * stride_gh
    out = _epilogue(out, gate_ptr + g_rows[:, None] + d[None, :], omask, HAS_GATE, o_ptr.dtype.element_ty)
    o_rows = (q_start + tok).to(tl.int64) * stride_ot + (kvh * G + g) * stride_oh
    tl.store(o_ptr + o_rows[:, None] + d[None, :], out, mask=omask)


def paged_attention_prefill(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, scale: float, max_query_len: int,
    block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None, num_stages: int = 3,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Grid ``(cdiv(max_query_len, block_m / G_pad), N, Hkv)``; rows = query tokens x the GQA group."""
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    N = cu_seqlens_q.shape[0] - 1
    o = torch.empty_like(q)
    if T == 0 or N == 0 or max_query_len <= 0:
        return o
    g_pad = _pow2(G)
    # 128 x 64 tiles, 8 warps, 3 stages: 378 TFLOP/s on an H200 at D=256 (64 x 32 / 4 warps: 262).
    block_m = block_m or 128
    block_n = block_n or 64
    num_warps = num_warps or (8 if D > 128 else 4)
    tok_m = max(1, block_m // g_pad)
    gt = gate if gate is not None else o  # unused without a gate
    _prefill_kernel[(triton.cdiv(max_query_len, tok_m), N, Hkv)](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, o, gt,
        scale * _LOG2E,
        q.stride(0), q.stride(1), o.stride(0), o.stride(1), gt.stride(0), gt.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        G=G, G_PAD=g_pad, D=D, D_PAD=_pow2(D), PAGE=k_cache.shape[1],
        TOK_M=tok_m, BLOCK_N=block_n, DOT_PREC=_dot_precision(q), HAS_GATE=gate is not None,
        num_warps=num_warps, num_stages=num_stages, **launch_args(),
    )  # fmt: skip
    return o
