"""The per-step prefill view: fla's chunk table built once from the host offsets."""

from __future__ import annotations

import random

import torch

from deltaserve.forward_context import PrefillView


def _expected(lens: list[int]) -> list[list[int]]:
    return [[s, c] for s, n in enumerate(lens) for c in range(-(-n // 64))]


def test_chunk_indices_cover_every_64_token_chunk_of_every_sequence():
    rng = random.Random(0)
    for _ in range(100):
        lens = [rng.choice([0, 1, 5, 63, 64, 65, 127, 128, 129, 300]) for _ in range(rng.randint(1, 6))]
        qsl = torch.tensor([0, *torch.cumsum(torch.tensor(lens), 0).tolist()], dtype=torch.int32)
        view = PrefillView(qsl, qsl, None, None, None, None, None, None)
        assert view.chunk_indices.tolist() == _expected(lens)
        assert view.chunk_indices.dtype == torch.int64 and view.cu_seqlens_long.dtype == torch.int64
        assert view.chunk_indices is view.chunk_indices  # built once per step, shared by every layer
