"""Paged KV cache for the full-attention layers only (GDN layers keep fixed-size state instead).

Per attention layer ``k_cache, v_cache [num_blocks + 1, block_size, Hkv, D]``. Block ``num_blocks`` is
a scratch block that padded CUDA-graph rows point at; it is never handed out.
"""

from __future__ import annotations

import torch

from deltaserve.models.config import ModelConfig


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype, tp: int = 1) -> int:
    kv_heads = max(cfg.num_key_value_heads // tp, 1)
    return cfg.num_attention_layers * 2 * block_size * kv_heads * cfg.head_dim * dtype.itemsize


class KVCache:
    def __init__(self, attention_layers: list, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.scratch_block = num_blocks
        for layer in attention_layers:
            shape = (num_blocks + 1, block_size, layer.num_kv_heads, layer.head_dim)
            layer.k_cache = torch.zeros(shape, dtype=dtype, device=device)
            layer.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free)} free (the scheduler checks first)")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
