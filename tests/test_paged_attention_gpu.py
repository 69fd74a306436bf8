"""Paged attention kernels at real shapes on the GPU (bf16, head_dim 256, block 16).

Qwen3.5-35B-A3B / Qwen3-Next: Hq=16, Hkv=2; Qwen3.5-122B/397B: Hq=32, Hkv=2. The fp32-softmax
PyTorch references are the oracle; bf16 kernels must match within a relative error of 1e-2.
"""

from __future__ import annotations

import pytest
import torch

from deltaserve.ops.paged_attention import (
    paged_attention_decode,
    paged_attention_decode_ref,
    paged_attention_prefill,
    paged_attention_prefill_ref,
    store_kv,
)
from deltaserve.ops.qk_norm_rope import gate_view

pytestmark = pytest.mark.gpu

D, BLOCK = 256, 16
SCALE = D**-0.5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def make_cache(lens: list[int], Hkv: int, seed: int = 0, max_model_len: int = 8192):
    """A bf16 cache holding ``lens`` tokens per sequence in shuffled blocks, plus table and lengths."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    width = -(-max_model_len // BLOCK)
    need = [-(-n // BLOCK) for n in lens]
    num_blocks = sum(need) + 8
    kc = torch.randn(num_blocks, BLOCK, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
    vc = torch.randn(num_blocks, BLOCK, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
    ids = torch.randperm(num_blocks, device="cuda", generator=g).int()
    bt = torch.zeros(len(lens), width, dtype=torch.int32, device="cuda")
    used = 0
    for b, n in enumerate(need):
        bt[b, :n] = ids[used : used + n]
        used += n
    return kc, vc, bt, torch.tensor(lens, dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("Hq", [16, 32])
@pytest.mark.parametrize("B", [1, 8, 64])
def test_decode_matches_reference(B: int, Hq: int):
    g = torch.Generator().manual_seed(B)
    lens = torch.randint(1, 8193, (B,), generator=g).tolist()
    lens[0] = 8192
    if B > 1:
        lens[1] = 1
    kc, vc, bt, sl = make_cache(lens, 2)
    q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16)
    ref = paged_attention_decode_ref(q, kc, vc, bt, sl, SCALE)
    for splits in (None, 1):
        o = paged_attention_decode(q, kc, vc, bt, sl, SCALE, num_splits=splits)
        assert o.dtype == torch.bfloat16 and o.shape == q.shape
        errs = [rel_err(o[b], ref[b]) for b in range(B)]
        assert max(errs) < 1e-2, (splits, max(errs))


def layer_gate(T: int, Hq: int) -> torch.Tensor:
    """A gate laid out as the layer's: the second half of each q_proj head of a merged qkv output."""
    qkv = torch.randn(T, (2 * Hq + 4) * D, device="cuda", dtype=torch.bfloat16)
    return gate_view(qkv, Hq, D)


@pytest.mark.parametrize("Hq", [16, 32])
@pytest.mark.parametrize("B", [1, 8, 64])
def test_gated_decode_matches_reference(B: int, Hq: int):
    g = torch.Generator().manual_seed(B)
    lens = torch.randint(1, 8193, (B,), generator=g).tolist()
    kc, vc, bt, sl = make_cache(lens, 2)
    q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16)
    gate = layer_gate(B, Hq)
    ref = paged_attention_decode_ref(q, kc, vc, bt, sl, SCALE, gate)
    for splits in (None, 1):  # the gate in the reduce kernel's epilogue, then in the decode kernel's
        o = paged_attention_decode(q, kc, vc, bt, sl, SCALE, gate=gate, num_splits=splits)
        assert max(rel_err(o[b], ref[b]) for b in range(B)) < 1e-2, splits


@pytest.mark.parametrize("Hq", [16, 32])
def test_gated_prefill_matches_reference(Hq: int):
    ctx, q_lens = [0, 4096, 7], [1000, 2000, 1]
    lens = [c + n for c, n in zip(ctx, q_lens, strict=True)]
    kc, vc, bt, sl = make_cache(lens, 2, seed=1)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q = torch.randn(int(cu[-1]), Hq, D, device="cuda", dtype=torch.bfloat16)
    gate = layer_gate(q.shape[0], Hq)
    o = paged_attention_prefill(q, kc, vc, bt, cu, sl, SCALE, max(q_lens), gate=gate)
    ref = paged_attention_prefill_ref(q, kc, vc, bt, cu, sl, SCALE, max(q_lens), gate)
    for n in range(len(lens)):
        lo, hi = int(cu[n]), int(cu[n + 1])
        assert rel_err(o[lo:hi], ref[lo:hi]) < 1e-2, n


@pytest.mark.parametrize("Hq", [16, 32])
def test_prefill_chunked_continuation_matches_reference(Hq: int):
    ctx = [0, 4096, 8000, 7, 1000]
    q_lens = [1000, 4096, 192, 1, 2500]  # seq lens up to 8192; chunked continuations after ctx tokens
    lens = [c + n for c, n in zip(ctx, q_lens, strict=True)]
    kc, vc, bt, sl = make_cache(lens, 2, seed=1)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q = torch.randn(int(cu[-1]), Hq, D, device="cuda", dtype=torch.bfloat16)
    o = paged_attention_prefill(q, kc, vc, bt, cu, sl, SCALE, max(q_lens))
    ref = paged_attention_prefill_ref(q, kc, vc, bt, cu, sl, SCALE, max(q_lens))
    for n in range(len(lens)):
        lo, hi = int(cu[n]), int(cu[n + 1])
        assert rel_err(o[lo:hi], ref[lo:hi]) < 1e-2, n


def test_store_kv_writes_slots_and_skips_padding():
    kc, vc, _, _ = make_cache([64], 2)
    before_k, before_v = kc.clone(), vc.clone()
    T = 40
    k = torch.randn(T, 2, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(T, 2, D, device="cuda", dtype=torch.bfloat16)
    slots = torch.randperm(kc.shape[0] * BLOCK, device="cuda")[:T]
    slots[::7] = -1
    store_kv(k, v, kc, vc, slots)
    want_k, want_v = before_k.flatten(0, 1), before_v.flatten(0, 1)
    keep = slots >= 0
    want_k[slots[keep]], want_v[slots[keep]] = k[keep], v[keep]
    assert torch.equal(kc.flatten(0, 1), want_k) and torch.equal(vc.flatten(0, 1), want_v)


@pytest.mark.parametrize("Hq", [16, 32])
def test_decode_cuda_graph_replays_with_new_seq_lens(Hq: int):
    B = 8
    kc, vc, bt, sl = make_cache([8192] * B, 2, seed=2)
    q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16)
    seq_lens = torch.ones(B, dtype=torch.int32, device="cuda")  # the graph's static inputs
    tables = bt.clone()
    paged_attention_decode(q, kc, vc, tables, seq_lens, SCALE)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_attention_decode(q, kc, vc, tables, seq_lens, SCALE)
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        lens = torch.randint(1, 8193, (B,), generator=g)
        if step == 1:
            lens[-1] = 0  # a padded batch entry: zeros, not NaN
        seq_lens.copy_(lens)
        tables.copy_(bt[torch.randperm(B, generator=g).cuda()])
        q.normal_()
        graph.replay()
        ref = paged_attention_decode_ref(q, kc, vc, tables, seq_lens, SCALE)
        for b in range(B):
            if lens[b] == 0:
                assert torch.equal(out[b], torch.zeros_like(out[b]))
            else:
                assert rel_err(out[b], ref[b]) < 1e-2, (step, b)
