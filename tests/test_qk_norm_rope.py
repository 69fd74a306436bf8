"""q/k norm + partial RoPE + KV store: the Triton kernel (interpreter on CPU) == the reference == HF's math."""

from __future__ import annotations

import pytest
import torch

from deltaserve.ops.qk_norm_rope import gate_view, qk_norm_rope_store, qk_norm_rope_store_ref

pytest.importorskip("triton")

BLOCK = 4


def inv_freq(rot: int, theta: float = 1e7) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)


def varlen_positions(T: int) -> torch.Tensor:
    """A packed batch: a decode at 300, a fresh prompt, a chunk continuing at 1000 -- not monotonic."""
    pos = [300, *range(min(T - 1, 8))] + list(range(1000, 1000 + max(0, T - 9)))
    return torch.tensor(pos[:T], dtype=torch.int64)


def make_inputs(T, Hq, Hkv, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = (2 * Hq + 2 * Hkv) * D
    qkv = (torch.randn(T, width + 16, generator=g) * 2).to(dtype)[:, 8 : 8 + width]  # row-strided, as a GEMM view
    qw, kw = (torch.randn(2, D, generator=g) * 0.3).to(dtype)
    blocks = T // BLOCK + 3
    k_cache, v_cache = torch.randn(2, blocks, BLOCK, Hkv, D, generator=g).to(dtype)
    slots = torch.randperm(blocks * BLOCK, generator=g)[:T]
    if T > 1:
        slots[T // 2] = -1  # a CUDA-graph padding row
    return [t.to(device) for t in (qkv, qw, kw, k_cache, v_cache, slots)]


# (head_dim, rotary_dim, Hq, Hkv): ratios 1, 2, 8; rotary 16, 64 and all of head_dim
SHAPES = [(64, 16, 2, 2), (64, 64, 4, 2), (256, 64, 16, 2), (256, 256, 8, 1), (256, 16, 2, 1)]
F32, BF16 = torch.float32, torch.bfloat16
# Every shape in both dtypes at T = 3; T = 1 (one decode) and T = 17 on a few (the interpreter is slow).
CASES = [(3, *shape, dt) for shape in SHAPES for dt in (F32, BF16)] + [
    (1, *SHAPES[0], F32), (1, *SHAPES[2], BF16), (17, *SHAPES[1], BF16), (17, *SHAPES[3], F32)]


@pytest.mark.parametrize("T,D,rot,Hq,Hkv,dtype", CASES)
def test_kernel_matches_reference(T, D, rot, Hq, Hkv, dtype, kernel_device):
    qkv, qw, kw, kc, vc, slots = make_inputs(T, Hq, Hkv, D, dtype, kernel_device)
    pos, freqs = varlen_positions(T).to(kernel_device), inv_freq(rot).to(kernel_device)
    kc_ref, vc_ref, before = kc.clone(), vc.clone(), kc.clone()
    q = qk_norm_rope_store(qkv, pos, qw, kw, 1e-6, freqs, kc, vc, slots, force_triton=True)
    q_ref = qk_norm_rope_store_ref(qkv, pos, qw, kw, 1e-6, freqs, kc_ref, vc_ref, slots)
    assert q.shape == (T, Hq, D) and q.is_contiguous()
    # bf16: the kernel's and torch's fp32 sums of squares may round the normed value to neighbouring bf16
    # numbers, and RoPE's difference of products can cancel: allow ~1 bf16 ulp of the |x| ~ 1..4 values.
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(q, q_ref, **tol)
    torch.testing.assert_close(kc, kc_ref, **tol)
    torch.testing.assert_close(vc, vc_ref, rtol=0, atol=0)
    written = torch.zeros(kc.shape[:2], dtype=torch.bool, device=kernel_device).view(-1)
    written[slots[slots >= 0]] = True
    untouched = ~written.view(kc.shape[:2])
    assert torch.equal(kc[untouched], before[untouched])  # the padded row stored nothing
    assert not torch.equal(kc[~untouched], before[~untouched])


def test_reference_is_transformers_norm_and_rope():
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNorm, apply_rotary_pos_emb

    T, Hq, Hkv, D, rot = 5, 4, 2, 64, 16
    qkv, qw, kw, kc, vc, _ = make_inputs(T, Hq, Hkv, D, torch.float32, "cpu")
    slots = torch.arange(T)
    pos, freqs = varlen_positions(T), inv_freq(rot)
    q = qk_norm_rope_store_ref(qkv, pos, qw, kw, 1e-6, freqs, kc, vc, slots)

    def hf_norm(x, w):
        norm = Qwen3NextRMSNorm(D, eps=1e-6)
        norm.weight.data.copy_(w)
        return norm(x)

    q_in = qkv[:, : 2 * Hq * D].view(T, Hq, 2, D)[:, :, 0]
    k_in = qkv[:, 2 * Hq * D : (2 * Hq + Hkv) * D].view(T, Hkv, D)
    emb = torch.cat([pos[:, None].float() * freqs] * 2, dim=-1)[None]  # [1, T, rot], as HF's rotary embedding
    heads_first = [hf_norm(x, w).transpose(0, 1)[None] for x, w in ((q_in, qw), (k_in, kw))]  # [1, H, T, D]
    want_q, want_k = apply_rotary_pos_emb(*heads_first, emb.cos(), emb.sin())
    torch.testing.assert_close(q, want_q[0].transpose(0, 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kc.view(-1, Hkv, D)[:T], want_k[0].transpose(0, 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(vc.view(-1, Hkv, D)[:T], qkv[:, (2 * Hq + Hkv) * D :].view(T, Hkv, D))


def test_gate_view_is_the_second_half_of_each_q_proj_head():
    T, Hq, Hkv, D = 2, 3, 1, 16
    qkv = torch.arange(T * (2 * Hq + 2 * Hkv) * D, dtype=torch.float32).view(T, -1)
    gate = gate_view(qkv, Hq, D)
    assert gate.data_ptr() == qkv[:, D:].data_ptr()  # a view, no copy
    assert torch.equal(gate[1, 2], qkv[1, (2 * 2 + 1) * D : (2 * 2 + 2) * D])


def test_inputs_are_validated():
    qkv, qw, kw, kc, vc, slots = make_inputs(3, 2, 1, 64, torch.float32, "cpu")
    pos, freqs = varlen_positions(3), inv_freq(16)
    with pytest.raises(ValueError, match="qkv must be"):
        qk_norm_rope_store(qkv[:, :-64], pos, qw, kw, 1e-6, freqs, kc, vc, slots)
    with pytest.raises(ValueError, match="inv_freq must be fp32"):
        qk_norm_rope_store(qkv, pos, qw, kw, 1e-6, freqs.double(), kc, vc, slots)
    with pytest.raises(ValueError, match="slot_mapping must be int64"):
        qk_norm_rope_store(qkv, pos, qw, kw, 1e-6, freqs, kc, vc, slots.int())
