"""Gated full attention (``self_attn.*``) over the paged KV cache.

``q_proj`` emits ``[q | gate]`` per head; q and k get a zero-centred RMSNorm over head_dim, then
partial NeoX RoPE; the attention output is scaled by ``sigmoid(gate)`` before ``o_proj``.
"""

from __future__ import annotations

import torch
from torch import nn

from deltaserve.distributed import divide, tp_size
from deltaserve.forward_context import get_batch
from deltaserve.layers.layer_ref import LayerRef, define_layer_op, layer_arg, layer_op
from deltaserve.layers.linear import ColumnParallelLinear, HeadParallelLinear, RowParallelLinear
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
        self.num_heads = divide(cfg.num_attention_heads, tp_size(), "num_attention_heads")
        self.head_dim, self.scale = D, D**-0.5
        self.q_proj = ColumnParallelLinear(H, cfg.num_attention_heads * D * 2, "num_attention_heads")
        self.k_proj = HeadParallelLinear(H, cfg.num_key_value_heads, D)
        self.v_proj = HeadParallelLinear(H, cfg.num_key_value_heads, D)
        self.num_kv_heads = self.k_proj.heads_per_rank
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * D, H, what="num_attention_heads * head_dim")
        self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta)
        self.layer = layer_arg(self, prefix, {"heads": self.num_heads, "head_dim": D})
        self.k_cache: torch.Tensor | None = None  # [blocks, block_size, Hkv, D], bound by the KV cache
        self.v_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        T, D = x.shape[0], self.head_dim
        q, gate = self.q_proj(x).view(T, self.num_heads, 2, D).unbind(2)  # per head [q | gate]
        k = self.k_proj(x).view(T, self.num_kv_heads, D)
        v = self.v_proj(x).view(T, self.num_kv_heads, D)
        q, k = self.rotary_emb(positions, self.q_norm(q), self.k_norm(k))
        o = layer_op("attention_core", self.layer)(q, k, v, self.layer)  # [T, Hq, D]
        o = o * torch.sigmoid(gate)
        return self.o_proj(o.reshape(T, self.num_heads * D))


def _attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ref: LayerRef) -> torch.Tensor:
    from deltaserve.ops.paged_attention import paged_attention_decode, paged_attention_prefill, store_kv

    attn: GatedAttention = ref.module
    meta = get_batch()
    store_kv(k, v, attn.k_cache, attn.v_cache, meta.slot_mapping)
    T, nd = q.shape[0], meta.num_decodes
    parts = []
    if nd:
        parts.append(paged_attention_decode(q[:nd], attn.k_cache, attn.v_cache, meta.block_tables[:nd],
                                            meta.seq_lens[:nd], attn.scale))
    if T > nd:
        pv = meta.prefill
        parts.append(paged_attention_prefill(q[nd:], attn.k_cache, attn.v_cache, pv.block_tables,
                                             pv.query_start_loc, pv.seq_lens, attn.scale, meta.max_query_len))
    return parts[0] if len(parts) == 1 else torch.cat(parts)  # no copy unless the step mixes both


def _attention_core_fake(q, k, v, ref: LayerRef) -> torch.Tensor:
    return torch.empty_like(q)


define_layer_op("attention_core", "Tensor q, Tensor k, Tensor v", "Tensor", _attention_core, _attention_core_fake)
