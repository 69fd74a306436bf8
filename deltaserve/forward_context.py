"""Per-step batch metadata, handed to the layers through one guarded context.

A step's tokens are packed (no padding between sequences): the first ``num_decodes`` sequences
decode exactly one token each, the rest are prefills or prefill chunks. Layers whose work depends on
the batch (GDN state, paged attention) read :func:`get_batch` inside their custom ops, so neither
every ``forward`` signature nor ``torch.compile``'s graphs carry it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass
class BatchMeta:
    num_decodes: int  # sequences [0, num_decodes) decode one token each
    query_start_loc: torch.Tensor  # [B + 1] int32: token offsets of each sequence
    seq_lens: torch.Tensor  # [B] int32: tokens in the cache after this step
    context_lens: torch.Tensor  # [B] int32: tokens computed before this step
    state_slots: torch.Tensor  # [B] int32: each sequence's GDN state slot
    block_tables: torch.Tensor  # [B, max_blocks] int32: each sequence's KV blocks
    slot_mapping: torch.Tensor  # [T] int64: flat KV slot of each new token (< 0: padding)
    positions: torch.Tensor  # [T] int64: absolute position of each token
    max_query_len: int  # host-side bound for prefill kernels
    # Host copies for the CPU reference path and for building prefill views (never used in graphs).
    query_start_loc_cpu: torch.Tensor | None = None
    context_lens_cpu: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return self.state_slots.shape[0]

    @property
    def num_prefills(self) -> int:
        return self.num_seqs - self.num_decodes

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes

    @cached_property
    def prefill(self) -> PrefillView:
        """The prefill sequences' metadata, re-based to start at token ``num_decodes`` (built once per step)."""
        d = self.num_decodes
        qsl = self.query_start_loc[d:] - d
        qsl_cpu = self.query_start_loc_cpu[d:] - d if self.query_start_loc_cpu is not None else qsl.cpu()
        ctx_cpu = self.context_lens_cpu[d:] if self.context_lens_cpu is not None else self.context_lens[d:].cpu()
        return PrefillView(
            query_start_loc=qsl,
            query_start_loc_cpu=qsl_cpu,
            context_lens=self.context_lens[d:],
            context_lens_cpu=ctx_cpu,
            seq_lens=self.seq_lens[d:],
            state_slots=self.state_slots[d:],
            block_tables=self.block_tables[d:],
            has_initial_state=self.context_lens[d:] > 0,
        )


@dataclass
class PrefillView:
    query_start_loc: torch.Tensor  # [P + 1] int32, starting at 0
    query_start_loc_cpu: torch.Tensor
    context_lens: torch.Tensor  # [P]
    context_lens_cpu: torch.Tensor
    seq_lens: torch.Tensor  # [P]
    state_slots: torch.Tensor  # [P]
    block_tables: torch.Tensor  # [P, max_blocks]
    has_initial_state: torch.Tensor  # [P] bool

    @cached_property
    def max_query_len(self) -> int:
        """Longest prefill sequence of the step (tokens), from the host copy: no device read."""
        return int(torch.diff(self.query_start_loc_cpu).max()) if self.query_start_loc_cpu.numel() > 1 else 0

    @cached_property
    def cu_seqlens_long(self) -> torch.Tensor:
        """``query_start_loc`` as int64, one tensor for every GDN layer of the step (fla caches per tensor)."""
        return self.query_start_loc.long()

    @cached_property
    def chunk_indices(self) -> torch.Tensor:
        """fla's ``[num_chunks, 2]`` (sequence, chunk-in-sequence) table for 64-token chunks, built once per
        step from the host copy of the offsets. Left to fla, every GDN layer rebuilds it from the device
        offsets, a device-to-host read that stalls the CPU until the GPU has caught up, 30 times a step."""
        lens = torch.diff(self.query_start_loc_cpu.long())
        chunks = (lens + 63) // 64
        seq = torch.repeat_interleave(torch.arange(len(chunks)), chunks)
        first = torch.repeat_interleave(torch.cumsum(chunks, 0) - chunks, chunks)
        table = torch.stack([seq, torch.arange(int(chunks.sum())) - first], 1)
        return table.to(self.query_start_loc.device, non_blocking=True)


_current: BatchMeta | None = None


@contextlib.contextmanager
def forward_batch(meta: BatchMeta) -> Iterator[BatchMeta]:
    """Make ``meta`` the current batch for the duration of one forward. Not re-entrant."""
    global _current
    if _current is not None:
        raise RuntimeError("forward_batch() is already active: forwards do not nest")
    _current = meta
    try:
        yield meta
    finally:
        _current = None


def get_batch() -> BatchMeta:
    if _current is None:
        raise RuntimeError("no forward_batch() is active: run the model inside `with forward_batch(meta):`")
    return _current
