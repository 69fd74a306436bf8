"""Paged attention: references vs a dense causal oracle; Triton (interpreter on CPU) vs references.

Sequences are scattered into the cache through shuffled, non-contiguous block ids, so a kernel
that ignores the block table (or reads a neighbour's block) fails. Outputs allocated with
``torch.empty`` come back NaN-filled under the ``nan_empty`` fixture, so a row a kernel forgets to
write shows up as NaN rather than as a lucky zero.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from deltaserve.ops.paged_attention import (
    paged_attention_decode,
    paged_attention_decode_ref,
    paged_attention_prefill,
    paged_attention_prefill_ref,
    store_kv,
    store_kv_ref,
)

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)


@pytest.fixture(autouse=True)
def nan_empty():
    """Make ``torch.empty`` return NaN-filled float tensors for the duration of a test."""
    det, fill = (
        torch.are_deterministic_algorithms_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
    )
    torch.use_deterministic_algorithms(True, warn_only=True)  # warn_only: cuBLAS would refuse otherwise
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(det)
    torch.utils.deterministic.fill_uninitialized_memory = fill


class Paged:
    """Dense per-sequence K/V ``[S, Hkv, D]`` plus the same data in a shuffled paged cache."""

    def __init__(self, lens, Hkv, D, block_size, dtype=torch.float32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.lens, self.block_size = list(lens), block_size
        self.k = [torch.randn(n, Hkv, D, generator=g).to(dtype) for n in lens]
        self.v = [torch.randn(n, Hkv, D, generator=g).to(dtype) for n in lens]
        need = [math.ceil(n / block_size) for n in lens]
        width = max(need) + 1  # one spare column: entries past the end must be ignored
        num_blocks = sum(need) + 3
        ids = torch.randperm(num_blocks, generator=g)
        self.k_cache = torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(dtype)  # garbage
        self.v_cache = torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(dtype)
        self.block_tables = torch.zeros(len(lens), width, dtype=torch.int32)
        used = 0
        for b, n in enumerate(lens):
            row = ids[used : used + need[b]]
            used += need[b]
            self.block_tables[b, : need[b]] = row.int()
            pad = torch.full((need[b] * block_size - n, Hkv, D), float("nan"), dtype=dtype)
            self.k_cache[row] = torch.cat([self.k[b], pad]).view(-1, block_size, Hkv, D)
            self.v_cache[row] = torch.cat([self.v[b], pad]).view(-1, block_size, Hkv, D)
        self.seq_lens = torch.tensor(lens, dtype=torch.int32)


def dense_oracle(q, k, v, scale, first_pos):
    """Causal attention in float64 with SDPA on unpaged k, v ``[S, Hkv, D]``; q ``[L, Hq, D]``."""
    L, Hq, _ = q.shape
    S, Hkv, _ = k.shape
    kk = k.double().repeat_interleave(Hq // Hkv, dim=1).transpose(0, 1)  # [Hq, S, D]
    vv = v.double().repeat_interleave(Hq // Hkv, dim=1).transpose(0, 1)
    visible = torch.arange(S)[None, :] <= (first_pos + torch.arange(L))[:, None]  # [L, S]
    o = F.scaled_dot_product_attention(q.double().transpose(0, 1), kk, vv, attn_mask=visible, scale=scale)
    return o.transpose(0, 1)  # [L, Hq, D]


def varlen_q(paged, q_lens, Hq, D, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return torch.randn(int(cu[-1]), Hq, D, generator=g).to(dtype), cu


# ---------------------------------------------------------------------------------- references


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2), (8, 1)])
def test_decode_ref_matches_dense(block_size, Hq, Hkv):
    D, scale = 64, 0.125
    paged = Paged([1, 15, 16, 17, 100], Hkv, D, block_size)
    q = torch.randn(5, Hq, D, generator=torch.Generator().manual_seed(3))
    o = paged_attention_decode(q, paged.k_cache, paged.v_cache, paged.block_tables, paged.seq_lens, scale)
    for b, n in enumerate(paged.lens):
        want = dense_oracle(q[b : b + 1], paged.k[b], paged.v[b], scale, n - 1)[0]
        torch.testing.assert_close(o[b].double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2)])
def test_prefill_ref_matches_dense_with_chunked_continuation(block_size, Hq, Hkv):
    D, scale = 64, 0.1
    lens = [1, 15, 16, 17, 100, 100]
    q_lens = [1, 15, 3, 1, 100, 37]  # fresh prompts, a decode-like step, chunked continuations
    paged = Paged(lens, Hkv, D, block_size)
    q, cu = varlen_q(paged, q_lens, Hq, D)
    o = paged_attention_prefill(
        q, paged.k_cache, paged.v_cache, paged.block_tables, cu, paged.seq_lens, scale, max(q_lens)
    )
    for n, (seq_len, q_len) in enumerate(zip(lens, q_lens, strict=True)):
        lo, hi = int(cu[n]), int(cu[n + 1])
        want = dense_oracle(q[lo:hi], paged.k[n], paged.v[n], scale, seq_len - q_len)
        torch.testing.assert_close(o[lo:hi].double(), want, atol=1e-5, rtol=1e-5)


def gate_like(q, seed=9):
    """A gate ``[T, Hq, D]`` laid out as the layer's: the second half of each q_proj head (a strided view)."""
    from deltaserve.ops.qk_norm_rope import gate_view

    T, Hq, D = q.shape
    qkv = torch.randn(T, (2 * Hq + 2) * D, generator=torch.Generator().manual_seed(seed)).to(q.dtype)
    return gate_view(qkv.to(q.device), Hq, D)


def test_gated_refs_match_dense_oracle_times_sigmoid_gate():
    paged = Paged([40, 9], 2, 32, 16)
    q, cu = varlen_q(paged, [40, 9], 4, 32)
    gate = gate_like(q)
    args = (paged.k_cache, paged.v_cache, paged.block_tables)
    pre = paged_attention_prefill(q, *args, cu, paged.seq_lens, 0.2, 40, gate=gate)
    last = cu[1:].long() - 1
    dec = paged_attention_decode(q[last], *args, paged.seq_lens, 0.2, gate=gate[last])
    for n, (lo, hi) in enumerate(((0, 40), (40, 49))):
        want = dense_oracle(q[lo:hi], paged.k[n], paged.v[n], 0.2, 0) * torch.sigmoid(gate[lo:hi].double())
        torch.testing.assert_close(pre[lo:hi].double(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dec[n].double(), want[-1], atol=1e-5, rtol=1e-5)


def test_decode_ref_equals_last_row_of_prefill():
    paged = Paged([40, 9], 2, 32, 16)
    q, cu = varlen_q(paged, [40, 9], 4, 32)
    args = (paged.k_cache, paged.v_cache, paged.block_tables)
    pre = paged_attention_prefill_ref(q, *args, cu, paged.seq_lens, 0.2, 40)
    dec = paged_attention_decode_ref(q[cu[1:].long() - 1], *args, paged.seq_lens, 0.2)
    torch.testing.assert_close(dec, pre[cu[1:].long() - 1])


@pytest.mark.parametrize("triton_path", [False, pytest.param(True, marks=needs_triton)])
def test_store_kv_skips_negative_slots(triton_path, request, kernel_device):
    dev = kernel_device if triton_path else "cpu"
    g = torch.Generator().manual_seed(0)
    k_cache, v_cache = torch.randn(2, 6, 2, 4, 16, generator=g).to(
        dev
    )  # [blocks 6, block_size 2, Hkv 4, D 16]
    before_k, before_v = k_cache.clone(), v_cache.clone()
    k, v = torch.randn(2, 4, 4, 16, generator=g).to(dev)  # T = 4
    slots = torch.tensor([7, -1, 0, 4], device=dev)  # (block 3, off 1), pad, (block 0, off 0), (2, 0)
    store_kv(k, v, k_cache, v_cache, slots, force_triton=triton_path)
    want_k, want_v = before_k.clone(), before_v.clone()
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            want_k[s // 2, s % 2], want_v[s // 2, s % 2] = k[i], v[i]
    torch.testing.assert_close(k_cache, want_k, rtol=0, atol=0)
    torch.testing.assert_close(v_cache, want_v, rtol=0, atol=0)
    assert not torch.equal(k_cache, before_k)


def test_store_kv_ref_writes_through_a_non_contiguous_cache():
    kv = torch.zeros(3, 4, 2, 1, 8)  # [blocks, block_size, K|V, Hkv, D]: each cache is a strided view
    k, v = torch.randn(2, 2, 1, 8)
    store_kv_ref(k, v, kv[:, :, 0], kv[:, :, 1], torch.tensor([5, 2]))
    torch.testing.assert_close(kv[1, 1, 0], k[0])  # slot 5 = block 1, offset 1
    torch.testing.assert_close(kv[0, 2, 1], v[1])  # slot 2 = block 0, offset 2
    assert kv.count_nonzero() == 4 * 8


def test_inputs_are_validated():
    paged = Paged([5], 2, 64, 16)
    args = (paged.k_cache, paged.v_cache, paged.block_tables, paged.seq_lens, 1.0)
    with pytest.raises(ValueError, match="multiple of Hkv=2"):
        paged_attention_decode(torch.randn(1, 3, 64), *args)
    with pytest.raises(ValueError, match="multiple of 16"):
        kc = torch.randn(2, 16, 2, 40)
        paged_attention_decode(torch.randn(1, 2, 40), kc, kc, *args[2:])
    with pytest.raises(ValueError, match="seq_lens must be torch.int32"):
        paged_attention_decode(torch.randn(1, 4, 64), *args[:3], paged.seq_lens.long(), 1.0)
    with pytest.raises(ValueError, match="gate must match q"):
        paged_attention_decode(torch.randn(1, 4, 64), *args, gate=torch.randn(1, 2, 64))
    with pytest.raises(ValueError, match="slot_mapping must be int64"):
        store_kv(
            torch.randn(1, 2, 64), torch.randn(1, 2, 64), *args[:2], torch.tensor([0], dtype=torch.int32)
        )


# ---------------------------------------------------------------------- Triton (interpreter on CPU)


@needs_triton
@pytest.mark.parametrize(
    "Hq,Hkv,D,block_size,dtype",
    [(4, 2, 64, 16, torch.float32), (8, 1, 64, 16, torch.float32), (4, 2, 80, 32, torch.float16)],
)
@pytest.mark.parametrize("num_splits", [None, 1, 3, 20])
def test_triton_decode_matches_ref(Hq, Hkv, D, block_size, dtype, num_splits, kernel_device):
    paged = Paged([17, 1, 70], Hkv, D, block_size, dtype)
    to = {"device": kernel_device}
    kc, vc, bt, sl = (t.to(**to) for t in (paged.k_cache, paged.v_cache, paged.block_tables, paged.seq_lens))
    # q as a strided view, as it comes out of a fused projection
    q = torch.randn(3, Hq + 2, D, generator=torch.Generator().manual_seed(5)).to(dtype=dtype, **to)[
        :, 1 : Hq + 1
    ]
    o = paged_attention_decode(q, kc, vc, bt, sl, 0.125, num_splits=num_splits, force_triton=True)
    ref = paged_attention_decode_ref(q, kc, vc, bt, sl, 0.125)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(o.float(), ref.float(), atol=tol, rtol=tol)


@needs_triton
def test_triton_decode_with_more_than_16_live_splits(kernel_device):
    """20 splits that all hold tokens (the reduce's 64-wide split vector, masked past the live ones)."""
    paged = Paged([2550, 5], 2, 64, 16, torch.float32)  # 40 tiles of 64: 2 per split, 20 live
    to = {"device": kernel_device}
    kc, vc, bt, sl = (t.to(**to) for t in (paged.k_cache, paged.v_cache, paged.block_tables, paged.seq_lens))
    q = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(6)).to(**to)
    o = paged_attention_decode(q, kc, vc, bt, sl, 0.125, num_splits=20, force_triton=True)
    torch.testing.assert_close(o, paged_attention_decode_ref(q, kc, vc, bt, sl, 0.125), atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_gated_decode_matches_ref(dtype, num_splits, kernel_device):
    """The gate is applied in the epilogue of the decode kernel (1 split) or of the split reduce (3)."""
    paged = Paged([17, 1, 70], 2, 64, 16, dtype)
    kc, vc, bt, sl = (t.to(kernel_device) for t in (paged.k_cache, paged.v_cache, paged.block_tables, paged.seq_lens))
    q = torch.randn(3, 8, 64, generator=torch.Generator().manual_seed(5)).to(dtype=dtype, device=kernel_device)
    gate = gate_like(q)
    o = paged_attention_decode(q, kc, vc, bt, sl, 0.125, gate=gate, num_splits=num_splits, force_triton=True)
    ref = paged_attention_decode_ref(q, kc, vc, bt, sl, 0.125, gate)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(o.float(), ref.float(), atol=tol, rtol=tol)


@needs_triton
def test_triton_decode_padded_slot_gives_zeros(kernel_device):
    paged = Paged([0, 33], 2, 64, 16)  # seq_len 0: a padded CUDA-graph batch entry
    args = tuple(
        t.to(kernel_device) for t in (paged.k_cache, paged.v_cache, paged.block_tables, paged.seq_lens)
    )
    q = torch.randn(2, 4, 64, device=kernel_device)
    for splits in (1, 4):
        o = paged_attention_decode(q, *args, 0.125, num_splits=splits, force_triton=True)
        assert torch.equal(o[0], torch.zeros_like(o[0])) and o[1].isfinite().all()


@needs_triton
@pytest.mark.parametrize(
    "Hq,Hkv,D,block_size,dtype",
    [(4, 2, 64, 16, torch.float32), (8, 1, 64, 32, torch.float32), (4, 4, 80, 16, torch.float16)],
)
def test_triton_prefill_matches_ref(Hq, Hkv, D, block_size, dtype, kernel_device):
    lens, q_lens = [1, 50, 70], [1, 20, 35]  # fresh, and two chunked continuations (ctx 30 and 35)
    paged = Paged(lens, Hkv, D, block_size, dtype)
    q, cu = varlen_q(paged, q_lens, Hq, D, dtype)
    to = {"device": kernel_device}
    q, cu, kc, vc, bt, sl = (
        t.to(**to) for t in (q, cu, paged.k_cache, paged.v_cache, paged.block_tables, paged.seq_lens)
    )
    o = paged_attention_prefill(q, kc, vc, bt, cu, sl, 0.125, max(q_lens), force_triton=True)
    ref = paged_attention_prefill_ref(q, kc, vc, bt, cu, sl, 0.125, max(q_lens))
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(o.float(), ref.float(), atol=tol, rtol=tol)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_gated_prefill_matches_ref(dtype, kernel_device):
    lens, q_lens = [1, 50, 70], [1, 20, 35]
    paged = Paged(lens, 1, 64, 16, dtype)
    q, cu = varlen_q(paged, q_lens, 4, 64, dtype)
    gate = gate_like(q)
    q, gate, cu, kc, vc, bt, sl = (
        t.to(kernel_device) for t in (q, gate, cu, paged.k_cache, paged.v_cache, paged.block_tables, paged.seq_lens)
    )
    o = paged_attention_prefill(q, kc, vc, bt, cu, sl, 0.125, max(q_lens), gate=gate, force_triton=True)
    ref = paged_attention_prefill_ref(q, kc, vc, bt, cu, sl, 0.125, max(q_lens), gate)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(o.float(), ref.float(), atol=tol, rtol=tol)


@needs_triton
def test_triton_store_then_decode_round_trip(kernel_device):
    """store_kv (kernel) then decode (kernel) on a fresh cache == the dense oracle."""
    Hq, Hkv, D, bs = 4, 2, 64, 16
    g = torch.Generator().manual_seed(7)
    k, v = torch.randn(2, 20, Hkv, D, generator=g)
    k_cache = torch.full((4, bs, Hkv, D), float("nan"))
    v_cache = k_cache.clone()
    bt = torch.tensor([[3, 1]], dtype=torch.int32)
    slots = torch.tensor([3 * bs + i if i < bs else bs + i - bs for i in range(20)])
    dev = {"device": kernel_device}
    k_cache, v_cache = k_cache.to(**dev), v_cache.to(**dev)
    store_kv(k.to(**dev), v.to(**dev), k_cache, v_cache, slots.to(**dev), force_triton=True)
    q = torch.randn(1, Hq, D, generator=g)
    o = paged_attention_decode(
        q.to(**dev), k_cache, v_cache, bt.to(**dev), torch.tensor([20], dtype=torch.int32, **dev), 0.125,
        force_triton=True,
    )  # fmt: skip
    torch.testing.assert_close(o.cpu().double(), dense_oracle(q, k, v, 0.125, 19), atol=1e-5, rtol=1e-5)
