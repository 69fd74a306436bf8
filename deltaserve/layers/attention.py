"""Gated full attention (``self_attn.*``) over the paged KV cache.

``q_proj`` emits ``[q | gate]`` per head; q and k get a zero-centred RMSNorm over head_dim, then
partial NeoX RoPE; the attention output is scaled by ``sigmoid(gate)`` before ``o_proj``.

At decode the layer is four or five launches: the merged q/k/v GEMM (``qkv_proj``, loaded from the
checkpoint's q_proj, k_proj and v_proj), one kernel for q/k norm + RoPE + the KV-cache write
(``ops/qk_norm_rope.py``), the paged attention kernel with the gate in its epilogue (plus its split
reduce when flash-decoding splits), and ``o_proj``.
"""

from __future__ import annotations

import torch
from torch import nn

from deltaserve.forward_context import get_batch
from deltaserve.layers.layer_ref import LayerRef, define_layer_op, layer_arg, layer_op
from deltaserve.layers.linear import QKVParallelLinear, RowParallelLinear
from deltaserve.layers.norm import RMSNorm
from deltaserve.layers.rotary import RotaryEmbedding
from deltaserve.models.config import ModelConfig


class GatedAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str):
        super().__init__()
        H, D = cfg.hidden_size, cfg.head_dim
        if cfg.attention_bias:
            from deltaserve.errors import UnsupportedModelError

            raise UnsupportedModelError("attention_bias=True is not supported (no Qwen3.5 / Qwen3-Next model uses it)")
        self.qkv_proj = QKVParallelLinear(H, cfg.num_attention_heads, cfg.num_key_value_heads, D)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads  # per rank
        self.head_dim, self.scale = D, D**-0.5
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * D, H, what="num_attention_heads * head_dim",
                                        skinny=True)
        self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta)
        self.layer = layer_arg(self, prefix, {"heads": self.num_heads, "head_dim": D})
        self.k_cache: torch.Tensor | None = None  # [blocks, block_size, Hkv, D], bound by the KV cache
        self.v_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (2Hq + 2Hkv) D]: per head [q | gate], then k, v
        o = layer_op("attention_core", self.layer)(qkv, positions, self.layer)  # [T, Hq, D], gated
        return self.o_proj(o.view(T, self.num_heads * self.head_dim))


def _attention_core(qkv: torch.Tensor, positions: torch.Tensor, ref: LayerRef) -> torch.Tensor:
    """qkv ``[T, (2Hq + 2Hkv) D]``, positions ``[T]`` -> ``attention(q, k, v) * sigmoid(gate)`` ``[T, Hq, D]``.

    Stores this step's k, v in the layer's cache first (normed and rotated, at the batch's slot_mapping).
    """
    from deltaserve.ops.paged_attention import paged_attention_decode, paged_attention_prefill
    from deltaserve.ops.qk_norm_rope import gate_view, qk_norm_rope_store

    attn: GatedAttention = ref.module
    meta = get_batch()
    q = qk_norm_rope_store(qkv, positions, attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps,
                           attn.rotary_emb.inv_freq, attn.k_cache, attn.v_cache, meta.slot_mapping)  # [T, Hq, D]
    gate = gate_view(qkv, attn.num_heads, attn.head_dim)  # [T, Hq, D], a view
    T, nd = q.shape[0], meta.num_decodes
    parts = []
    if nd:
        parts.append(paged_attention_decode(q[:nd], attn.k_cache, attn.v_cache, meta.block_tables[:nd],
                                            meta.seq_lens[:nd], attn.scale, gate=gate[:nd]))
    if T > nd:
        pv = meta.prefill
        parts.append(paged_attention_prefill(q[nd:], attn.k_cache, attn.v_cache, pv.block_tables,
                                             pv.query_start_loc, pv.seq_lens, attn.scale, meta.max_query_len,
                                             gate=gate[nd:]))
    return parts[0] if len(parts) == 1 else torch.cat(parts)  # no copy unless the step mixes both


def _attention_core_fake(qkv, positions, ref: LayerRef) -> torch.Tensor:
    return qkv.new_empty(qkv.shape[0], ref.sizes["heads"], ref.sizes["head_dim"])


define_layer_op("attention_core", "Tensor qkv, Tensor positions", "Tensor", _attention_core, _attention_core_fake)
