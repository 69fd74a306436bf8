"""Vocab-parallel embedding and LM head: each rank holds ``vocab / tp`` rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltaserve.distributed import all_gather, all_reduce, tp_rank, tp_size
from deltaserve.layers.linear import check_shape, copy_checked


def _pad_vocab(vocab: int, tp: int) -> int:
    return (vocab + tp - 1) // tp * tp


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.per_rank = _pad_vocab(vocab_size, tp_size()) // tp_size()
        self.start = tp_rank() * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard=None, name: str = "") -> None:
        check_shape(name, loaded, (self.vocab_size, param.shape[1]))
        end = min(self.start + self.per_rank, self.vocab_size)
        param.data[end - self.start :].zero_()
        copy_checked(param.data[: end - self.start], loaded[self.start : end], name)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        mine = (local >= 0) & (local < self.per_rank)
        out = F.embedding(local.clamp(0, self.per_rank - 1), self.weight) * mine[:, None].to(self.weight.dtype)
        return all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """``hidden @ W.T`` over this rank's vocab rows, gathered to full-vocab logits (padding cut off)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        return all_gather(logits, dim=-1)[..., : self.vocab_size]
