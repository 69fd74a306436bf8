"""Test helpers: tiny HF checkpoints and running our model on sequences with real caches."""

from __future__ import annotations

import torch

from deltaserve.engine.batch import SeqInput, build_batch
from deltaserve.engine.kv_cache import KVCache
from deltaserve.engine.state_cache import StateCache
from deltaserve.forward_context import forward_batch

TINY_TEXT = dict(
    vocab_size=96, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
    linear_value_head_dim=16, linear_conv_kernel_dim=4, max_position_embeddings=512, rms_norm_eps=1e-6,
    layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
)
# The shared expert as wide as a routed one, as in every release: it is folded in as expert E.
TINY_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)


def randomize_(hf_model, seed: int = 0) -> None:
    """Make every weight matter: HF inits norms at 0/1 and A_log/dt_bias at fixed values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(0, 2.5, generator=g))
            elif p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if name.endswith("linear_attn.norm.weight") else 0))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)


class Runner:
    """Minimal single-process driver: one state slot and a private block table per sequence."""

    def __init__(self, model, max_seqs: int = 8, num_blocks: int = 64, block_size: int = 16,
                 state_dtype: torch.dtype = torch.float32):
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        self.model, self.device, self.block_size = model, device, block_size
        self.states = StateCache(model.gdn_layers(), max_seqs, dtype, state_dtype, device)
        self.kv = KVCache(model.attention_layers(), num_blocks, block_size, dtype, device)

    def new_seq(self, max_len: int) -> dict:
        return {"slot": self.states.alloc(), "blocks": self.kv.alloc(self.kv.blocks_needed(max_len)), "ctx": 0}

    def step(self, work: list[tuple[dict, list[int]]]) -> torch.Tensor:
        """Run one step; ``work`` is (seq, new tokens) pairs, decodes first. Returns logits of every token."""
        seqs = [SeqInput(toks, s["ctx"], s["slot"], s["blocks"]) for s, toks in work]
        ids, pos, meta = build_batch(seqs, self.block_size, self.device)
        with torch.no_grad(), forward_batch(meta):
            hidden = self.model(ids, pos)
        for s, toks in work:
            s["ctx"] += len(toks)
        return self.model.compute_logits(hidden)

    def prefill(self, ids: list[int]) -> tuple[dict, torch.Tensor]:
        seq = self.new_seq(len(ids) + 64)
        return seq, self.step([(seq, ids)])


def add_demo_tokenizer(model_dir, max_len: int = 512) -> None:
    """HF-saved test checkpoints carry no tokenizer; the engine needs one (its ids fit any vocab >= 96)."""
    from deltaserve.models.demo_tokenizer import train_tokenizer, write_tokenizer

    write_tokenizer(train_tokenizer(), model_dir, max_len)
