"""Turn the scheduled sequences of one step into the model's inputs and :class:`BatchMeta`.

Host-side work is a handful of list concatenations and one ``torch.tensor`` per field; the device
copies are non-blocking from pinned memory on CUDA, so building a step never waits for the one in flight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltaserve.forward_context import BatchMeta
from deltaserve.host import to_device


@dataclass
class SeqInput:
    token_ids: list[int]  # the tokens computed this step (1 for a decode)
    context_len: int  # tokens already in the cache / state before this step
    state_slot: int
    block_table: list[int]


def previous_samples(prev: torch.Tensor | None) -> torch.Tensor:
    """``prev``, which a step whose inputs hold placeholders must have been given."""
    if prev is None:
        raise RuntimeError("a step's inputs name a pending token, but no previous step's samples were given")
    return prev


def resolve_placeholders(ids: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
    """``ids`` (on the device) with each placeholder ``-1 - row`` replaced by ``prev[row]``: the previous
    step's sample, which the host has not seen yet (async scheduling)."""
    return torch.where(ids >= 0, ids, previous_samples(prev)[(-1 - ids).clamp_(min=0)])


def build_batch(seqs: list[SeqInput], block_size: int, device: torch.device, pad_block: int = 0,
                prev: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, BatchMeta]:
    """Decodes must come first: ``num_decodes`` counts the leading one-token sequences with context.
    A negative token id is a placeholder for row ``-1 - id`` of ``prev`` (:func:`resolve_placeholders`)."""
    num_decodes = 0
    for s in seqs:
        if len(s.token_ids) == 1 and s.context_len > 0:
            num_decodes += 1
        else:
            break
    ids, positions, slot_mapping, qsl = [], [], [], [0]
    for s in seqs:
        n = len(s.token_ids)
        ids += s.token_ids
        pos = range(s.context_len, s.context_len + n)
        positions += pos
        slot_mapping += [s.block_table[p // block_size] * block_size + p % block_size for p in pos]
        qsl.append(qsl[-1] + n)
    max_blocks = max(1, max(len(s.block_table) for s in seqs))
    tables = [s.block_table + [pad_block] * (max_blocks - len(s.block_table)) for s in seqs]
    ctx = [s.context_len for s in seqs]
    seq_lens = [s.context_len + len(s.token_ids) for s in seqs]

    def t(x, dtype):
        return to_device(x, dtype, device)

    qsl_cpu, ctx_cpu = torch.tensor(qsl, dtype=torch.int32), torch.tensor(ctx, dtype=torch.int32)
    meta = BatchMeta(
        num_decodes=num_decodes,
        query_start_loc=t(qsl_cpu, torch.int32),
        seq_lens=t(seq_lens, torch.int32),
        context_lens=t(ctx_cpu, torch.int32),
        state_slots=t([s.state_slot for s in seqs], torch.int32),
        block_tables=t(tables, torch.int32),
        slot_mapping=t(slot_mapping, torch.int64),
        positions=t(positions, torch.int64),
        max_query_len=max(len(s.token_ids) for s in seqs),
        query_start_loc_cpu=qsl_cpu,
        context_lens_cpu=ctx_cpu,
    )
    ids_dev = t(ids, torch.int64)
    if any(i < 0 for i in ids):
        ids_dev = resolve_placeholders(ids_dev, prev)
    return ids_dev, meta.positions, meta
