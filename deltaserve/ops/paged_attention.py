"""Attention over the paged KV cache of the full-attention layers: references and dispatch.

Cache layout, per attention layer::

    k_cache, v_cache  [num_blocks, block_size, Hkv, D]    model dtype
    block_tables      [B, max_blocks_per_seq]  int32     entries past a sequence's end: any valid id
    seq_lens          [B]  int32                         cached tokens INCLUDING this step's
    slot_mapping      [T]  int64                         block_id * block_size + offset; < 0: padding

Token ``t`` of sequence ``b`` lives at ``k_cache[block_tables[b, t // block_size], t % block_size]``.
GQA: query head ``h`` reads KV head ``h // (Hq / Hkv)``. The softmax runs in fp32; outputs come
back in q's dtype. With a ``gate`` (the gated attention layer's, ``[T, Hq, D]``, any row/head strides)
the output is ``o * sigmoid(gate)``, rounded as the eager ``o.to(dtype) * torch.sigmoid(gate)`` is; the
kernels apply it in their epilogue, so it costs no launch of its own.

The public functions validate shapes and dtypes (never values: that would sync the GPU), then send
CUDA tensors to the Triton kernels in ``paged_attention_triton`` and CPU tensors to the plain
PyTorch references below (the engine's CPU path). ``force_triton=True`` runs the kernels on CPU
tensors too, under ``TRITON_INTERPRET=1``, which is how CI tests them.
"""

from __future__ import annotations

import torch

_INDEX_DTYPES = {"block_tables": torch.int32, "seq_lens": torch.int32, "cu_seqlens_q": torch.int32}
# The references build [Hkv, rows, S] fp32 score matrices; bound one chunk to about this many
# elements (256 MiB) so a long prefill on the reference path does not need O(L * S) memory at once.
_REF_SCORE_ELEMS = 1 << 26


# --------------------------------------------------------------------------------------- checks


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be [num_blocks, block_size, Hkv, D]; got {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(
            f"v_cache must match k_cache {tuple(k_cache.shape)} {k_cache.dtype}; "
            f"got {tuple(v_cache.shape)} {v_cache.dtype}"
        )
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must be contiguous in head_dim (stride(-1) == 1)")


def _check_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, **index) -> None:
    _check_cache(k_cache, v_cache)
    if q.dim() != 3:
        raise ValueError(f"q must be [tokens, Hq, D]; got {tuple(q.shape)}")
    Hq, D = q.shape[1:]
    Hkv = k_cache.shape[2]
    if D != k_cache.shape[3]:
        raise ValueError(f"q head_dim {D} != cache head_dim {k_cache.shape[3]}")
    if D % 16:
        raise ValueError(f"head_dim must be a multiple of 16 (tensor-core tiles); got {D}")
    if Hq % Hkv:
        raise ValueError(f"Hq={Hq} query heads must be a multiple of Hkv={Hkv} KV heads")
    if q.dtype != k_cache.dtype:
        raise ValueError(f"q dtype {q.dtype} must equal the cache dtype {k_cache.dtype}")
    if q.stride(-1) != 1:
        raise ValueError("q must be contiguous in head_dim (stride(-1) == 1)")
    for name, t in index.items():
        if t.dtype != _INDEX_DTYPES[name]:
            raise ValueError(f"{name} must be {_INDEX_DTYPES[name]}; got {t.dtype}")
        if t.device != q.device or k_cache.device != q.device:
            raise ValueError(f"{name}, q and the caches must share a device; got {t.device}, {q.device}, "
                             f"{k_cache.device}")  # fmt: skip
    bt = index["block_tables"]
    if bt.dim() != 2 or bt.stride(1) != 1:
        raise ValueError(f"block_tables must be a row-contiguous [B, max_blocks]; got {tuple(bt.shape)}")


def _check_gate(gate: torch.Tensor | None, q: torch.Tensor) -> None:
    if gate is None:
        return
    if gate.shape != q.shape or gate.dtype != q.dtype or gate.device != q.device:
        raise ValueError(f"gate must match q {tuple(q.shape)} {q.dtype} on {q.device}; got "
                         f"{tuple(gate.shape)} {gate.dtype} on {gate.device}")  # fmt: skip
    if gate.stride(-1) != 1:
        raise ValueError("gate must be contiguous in head_dim (stride(-1) == 1)")


def _use_triton(x: torch.Tensor, force_triton: bool) -> bool:
    return x.is_cuda or force_triton


# ----------------------------------------------------------------------------------- references


def _gather_kv(cache: torch.Tensor, table_row: torch.Tensor, n: int) -> torch.Tensor:  # [n, Hkv, D]
    block_size = cache.shape[1]
    blocks = table_row[: -(-n // block_size)].long()
    return cache[blocks].flatten(0, 1)[:n]


def _attend_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, first_pos: int
) -> torch.Tensor:
    """Causal GQA attention in fp32. q ``[L, Hq, D]`` at positions ``first_pos + i``; k, v ``[S, Hkv, D]``.

    Returns ``[L, Hq, D]`` fp32. Query heads are grouped per KV head, so K/V are never repeated.
    """
    L, Hq, D = q.shape
    S, Hkv = k.shape[:2]
    G = Hq // Hkv
    kf = k.float().permute(1, 2, 0)  # [Hkv, D, S]
    vf = v.float().transpose(0, 1)  # [Hkv, S, D]
    qg = q.float().view(L, Hkv, G, D).transpose(0, 1)  # [Hkv, L, G, D]
    out = q.new_empty(L, Hq, D, dtype=torch.float32)
    step = max(1, _REF_SCORE_ELEMS // max(1, Hkv * G * S))
    kpos = torch.arange(S, device=q.device)
    for i in range(0, L, step):
        rows = qg[:, i : i + step].reshape(Hkv, -1, D)  # [Hkv, l * G, D]
        scores = (rows @ kf) * scale  # [Hkv, l * G, S]
        qpos = first_pos + torch.arange(i, i + rows.shape[1] // G, device=q.device)
        if first_pos + i < S - 1:  # some keys lie after this chunk's first query (not decode)
            hidden = (kpos[None, :] > qpos[:, None]).repeat_interleave(G, dim=0)  # [l * G, S]
            scores.masked_fill_(hidden, float("-inf"))
        o = scores.softmax(dim=-1) @ vf  # [Hkv, l * G, D]
        out[i : i + step] = o.view(Hkv, -1, G, D).transpose(0, 1).reshape(-1, Hq, D)
    return out


def _gated(o: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return o if gate is None else o * torch.sigmoid(gate)


def store_kv_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write ``k, v [T, Hkv, D]`` token ``i`` to flat slot ``slot_mapping[i]``; negative slots are skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    block_size = k_cache.shape[1]
    blk, off = slots // block_size, slots % block_size
    # Index by (block, offset) rather than through a flattened view: a view of a non-contiguous
    # cache would be a copy and the write would be lost.
    k_cache[blk, off] = k[keep].to(k_cache.dtype)
    v_cache[blk, off] = v[keep].to(v_cache.dtype)


def paged_attention_decode_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence at position ``seq_lens[b] - 1``. q ``[B, Hq, D]`` -> ``[B, Hq, D]``."""
    out = torch.zeros_like(q)  # a sequence with seq_len 0 (padding) gets zeros, as in the kernel
    for b, n in enumerate(seq_lens.tolist()):
        if n > 0:
            k = _gather_kv(k_cache, block_tables[b], n)
            v = _gather_kv(v_cache, block_tables[b], n)
            out[b] = _attend_ref(q[b : b + 1], k, v, scale, n - 1)[0].to(q.dtype)
    return _gated(out, gate)


def paged_attention_prefill_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Varlen causal attention of packed ``q [T, Hq, D]`` over the cache; see ``paged_attention_prefill``."""
    out = torch.zeros_like(q)
    bounds = cu_seqlens_q.tolist()
    for n, seq_len in enumerate(seq_lens.tolist()):
        lo, hi = bounds[n], bounds[n + 1]
        if hi > lo:
            k = _gather_kv(k_cache, block_tables[n], seq_len)
            v = _gather_kv(v_cache, block_tables[n], seq_len)
            out[lo:hi] = _attend_ref(q[lo:hi], k, v, scale, seq_len - (hi - lo)).to(q.dtype)
    return _gated(out, gate)


# ----------------------------------------------------------------------------------- public ops


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    force_triton: bool = False,
) -> None:
    """Write this step's ``k, v [T, Hkv, D]`` into the paged cache at ``slot_mapping [T]`` (int64).

    Negative slots mark padding tokens and are not stored. CUDA-graph capturable on the GPU path.
    """
    _check_cache(k_cache, v_cache)
    want = (k.shape[0], *k_cache.shape[2:])
    if k.dim() != 3 or k.shape[1:] != k_cache.shape[2:] or v.shape != k.shape:
        raise ValueError(f"k and v must be [T, Hkv, D] = {want}; got {tuple(k.shape)}, {tuple(v.shape)}")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("k and v must be contiguous in head_dim (stride(-1) == 1)")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype != torch.int64:
        raise ValueError(f"slot_mapping must be int64 [T={k.shape[0]}]; got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")  # fmt: skip
    if _use_triton(k, force_triton):
        from deltaserve.ops import paged_attention_triton

        paged_attention_triton.store_kv(k, v, k_cache, v_cache, slot_mapping)
    else:
        store_kv_ref(k, v, k_cache, v_cache, slot_mapping)


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    gate: torch.Tensor | None = None,
    num_splits: int | None = None,
    force_triton: bool = False,
) -> torch.Tensor:
    """Decode attention: q ``[B, Hq, D]``, one token per sequence -> o ``[B, Hq, D]`` in q's dtype.

    Sequence ``b``'s query sits at position ``seq_lens[b] - 1`` and attends to all ``seq_lens[b]``
    cached tokens (its own K/V stored already); ``seq_lens[b] == 0`` gives zeros (padded slots).
    ``num_splits``: flash-decoding programs per (sequence, KV head); default from static shapes
    (``paged_attention_triton.decode_num_splits``), fixed per batch size so a CUDA graph can be
    captured and replayed with new ``seq_lens``. ``gate [B, Hq, D]``: return ``o * sigmoid(gate)``.
    """
    _check_attention(q, k_cache, v_cache, block_tables=block_tables, seq_lens=seq_lens)
    _check_gate(gate, q)
    B = q.shape[0]
    if block_tables.shape[0] != B or seq_lens.shape != (B,):
        raise ValueError(f"block_tables must be [B={B}, *] and seq_lens [B={B}]; got "
                         f"{tuple(block_tables.shape)}, {tuple(seq_lens.shape)}")  # fmt: skip
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1; got {num_splits}")
    if _use_triton(q, force_triton):
        from deltaserve.ops import paged_attention_triton

        return paged_attention_triton.paged_attention_decode(
            q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits, gate=gate
        )
    return paged_attention_decode_ref(q, k_cache, v_cache, block_tables, seq_lens, scale, gate)


def paged_attention_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
    *,
    gate: torch.Tensor | None = None,
    force_triton: bool = False,
) -> torch.Tensor:
    """Varlen (chunked) prefill: q ``[T, Hq, D]`` packed by ``cu_seqlens_q [N + 1]`` -> o ``[T, Hq, D]``.

    Sequence ``n`` has ``q_len = cu[n+1] - cu[n]`` new tokens whose K/V are already in the cache,
    after ``ctx = seq_lens[n] - q_len`` earlier tokens; its query ``i`` (position ``ctx + i``) sees
    cache positions ``0 .. ctx + i``. ``max_query_len`` (a host int >= every q_len) sizes the grid.
    ``gate [T, Hq, D]``: return ``o * sigmoid(gate)``.
    """
    _check_attention(
        q, k_cache, v_cache, block_tables=block_tables, seq_lens=seq_lens, cu_seqlens_q=cu_seqlens_q
    )
    _check_gate(gate, q)
    N = seq_lens.shape[0]
    if cu_seqlens_q.shape != (N + 1,) or block_tables.shape[0] != N:
        raise ValueError(f"cu_seqlens_q must be [N+1={N + 1}] and block_tables [N={N}, *]; got "
                         f"{tuple(cu_seqlens_q.shape)}, {tuple(block_tables.shape)}")  # fmt: skip
    if max_query_len < 0:
        raise ValueError(f"max_query_len must be >= 0; got {max_query_len}")
    if _use_triton(q, force_triton):
        from deltaserve.ops import paged_attention_triton

        return paged_attention_triton.paged_attention_prefill(
            q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, max_query_len, gate=gate
        )
    return paged_attention_prefill_ref(
        q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, max_query_len, gate
    )
