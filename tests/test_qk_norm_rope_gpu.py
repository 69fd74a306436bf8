"""The fused q/k norm + RoPE + KV store kernel at real shapes on the GPU, and inside a CUDA graph.

Qwen3.5 / Qwen3-Next attention: head_dim 256, rotary_dim 64, Hq 16 or 32 (per rank), Hkv 2; positions
up to the 262,144-token context (RoPE angles up to ~2.6e5 rad, where approximate sin/cos would drift).
"""

from __future__ import annotations

import pytest
import torch

from deltaserve.ops.paged_attention import paged_attention_decode, paged_attention_decode_ref
from deltaserve.ops.qk_norm_rope import gate_view, qk_norm_rope_store, qk_norm_rope_store_ref

pytestmark = pytest.mark.gpu

D, ROT, HKV, BLOCK = 256, 64, 2, 16


def inputs(T: int, Hq: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(T, (2 * Hq + 2 * HKV) * D, device="cuda", generator=g).to(dtype)
    qw, kw = (torch.randn(2, D, device="cuda", generator=g) * 0.3).to(dtype)
    inv_freq = 1.0 / 1e7 ** (torch.arange(0, ROT, 2, dtype=torch.float32, device="cuda") / ROT)
    blocks = T // BLOCK + 4
    kc, vc = torch.randn(2, blocks, BLOCK, HKV, D, device="cuda", generator=g).to(dtype)
    slots = torch.randperm(blocks * BLOCK, device="cuda", generator=g)[:T]
    slots[::5] = -1  # padding rows
    pos = torch.randint(0, 262144, (T,), device="cuda", generator=g)
    return qkv, qw, kw, inv_freq, kc, vc, slots, pos


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Hq", [16, 32])
@pytest.mark.parametrize("T", [1, 64, 3000])
def test_kernel_matches_reference(T: int, Hq: int, dtype: torch.dtype):
    qkv, qw, kw, inv_freq, kc, vc, slots, pos = inputs(T, Hq, dtype)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q = qk_norm_rope_store(qkv, pos, qw, kw, 1e-6, inv_freq, kc, vc, slots)
    q_ref = qk_norm_rope_store_ref(qkv, pos, qw, kw, 1e-6, inv_freq, kc_ref, vc_ref, slots)
    tol = {"rtol": 1e-5, "atol": 5e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(q, q_ref, **tol)
    torch.testing.assert_close(kc, kc_ref, **tol)
    assert torch.equal(vc, vc_ref)


def test_norm_rope_store_and_gated_decode_replay_in_a_cuda_graph():
    """The layer's decode path (fused kernel, gated attention) captured once, replayed with new positions,
    slots and lengths, including padding rows (slot -1, as the engine's graphs pad)."""
    B, Hq, max_len = 8, 16, 4096
    blocks_per_seq = max_len // BLOCK
    qkv, qw, kw, inv_freq, kc, vc, _, _ = inputs(B, Hq, torch.bfloat16)
    kc = torch.randn(B * blocks_per_seq + 1, BLOCK, HKV, D, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    tables = torch.arange(B * blocks_per_seq, device="cuda", dtype=torch.int32).view(B, blocks_per_seq)
    pos = torch.zeros(B, dtype=torch.int64, device="cuda")
    slots = torch.full((B,), -1, dtype=torch.int64, device="cuda")
    seq_lens = torch.ones(B, dtype=torch.int32, device="cuda")

    def step():
        q = qk_norm_rope_store(qkv, pos, qw, kw, 1e-6, inv_freq, kc, vc, slots)
        return paged_attention_decode(q, kc, vc, tables, seq_lens, D**-0.5, gate=gate_view(qkv, Hq, D))

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        lens = torch.randint(1, max_len, (B,), generator=g)
        live = torch.rand(B, generator=g) < 0.75
        p = (lens - 1).cuda()
        pos.copy_(p)
        slot = tables.gather(1, (p // BLOCK)[:, None]).squeeze(1) * BLOCK + p % BLOCK
        slots.copy_(torch.where(live.cuda(), slot, -1))
        seq_lens.copy_(lens)
        qkv.normal_()
        kc_ref, vc_ref = kc.clone(), vc.clone()
        q_ref = qk_norm_rope_store_ref(qkv, pos, qw, kw, 1e-6, inv_freq, kc_ref, vc_ref, slots)
        graph.replay()
        assert torch.equal(vc, vc_ref)
        torch.testing.assert_close(kc, kc_ref, rtol=2e-2, atol=2e-2)
        ref = paged_attention_decode_ref(q_ref, kc_ref, vc_ref, tables, seq_lens, D**-0.5, gate_view(qkv, Hq, D))
        rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        assert rel < 1e-2
