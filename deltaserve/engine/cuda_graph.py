"""Decode steps replayed from CUDA graphs, one graph per padded batch size.

Every tensor a decode step reads lives in a static buffer sized for ``max_bs``; a graph of size
``bs`` is captured over the first ``bs`` rows. At replay the live rows are copied in and the padding
rows point at the scratch state slot and scratch KV block (``slot_mapping = -1``: nothing stored),
so the kernels need no padding branch. Logits are computed inside the graph too.
"""

from __future__ import annotations

import bisect
import functools
import logging

import torch

from deltaserve.engine.batch import SeqInput, previous_samples
from deltaserve.forward_context import BatchMeta, forward_batch
from deltaserve.host import pinned, to_device

logger = logging.getLogger(__name__)


def capture_graph(forward, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Run ``forward`` twice outside a graph (Triton compiles and autotuning, lazy inits), then capture
    it in ``pool``; returns the graph and its output tensor (rewritten by every replay)."""
    for _ in range(2):
        forward()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = forward()
    return graph, out


class _GraphSet:
    """Graphs keyed by size, their output tensors and their shared memory pool."""

    graphs: dict[int, torch.cuda.CUDAGraph]
    logits: dict[int, torch.Tensor]
    pool: object

    def release(self) -> None:
        """Drop the graphs and their memory pool. NCCL keeps a communicator whose kernels a live graph
        holds from being destroyed (its destroy waits for the graph), so tensor-parallel ranks release
        their graphs before they destroy the process group."""
        torch.cuda.synchronize()
        self.graphs.clear()
        self.logits.clear()
        self.pool = None
        torch.cuda.synchronize()


class DecodeGraphs(_GraphSet):
    """Per replay the host queues two copies before the graph: the step's int64 rows (token ids,
    positions, KV slots) and its int32 rows (state slots, sequence and context lengths), both straight
    into the graph's buffers, padding rows included, so no copy kernels. Only when needed: the block
    table when it changed (a copy and a copy kernel), a fill of the block-table rows a larger batch
    left, and one kernel for pending-token placeholders (async scheduling). Each queued operation costs
    a few microseconds of GPU time between two steps."""

    def __init__(self, model, sizes: list[int], max_blocks: int, block_size: int, scratch_slot: int,
                 scratch_block: int, device: torch.device):
        from deltaserve.ops.placeholders import resolve_placeholders_  # triton: CUDA installs only

        self._resolve = resolve_placeholders_
        self.model, self.sizes, self.block_size = model, sorted(sizes), block_size
        self.scratch_slot, self.scratch_block = scratch_slot, scratch_block
        n = self.max_bs = self.sizes[-1]
        i32 = dict(dtype=torch.int32, device=device)
        # Row r of a buffer is batch row r. The padding values: token 0 at position 0 with no context,
        # stored nowhere (slot -1), on the scratch state slot and the scratch KV block.
        self._i64 = torch.zeros(3, n, dtype=torch.int64, device=device)
        self.input_ids, self.positions, self.slot_mapping = self._i64.unbind(0)
        self._i32 = torch.zeros(3, n, **i32)
        self.state_slots, self.seq_lens, self.context_lens = self._i32.unbind(0)
        self._pad64, self._pad32 = (0, 0, -1), (scratch_slot, 1, 0)
        self.block_tables = torch.full((n, max_blocks), scratch_block, **i32)
        self._tables: list[list[int]] | None = None  # what block_tables[:B, :width] holds now, if known
        self.query_start_loc = torch.arange(n + 1, **i32)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._live = 0  # block-table rows holding a live request since the last reset
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None

    def _meta(self, bs: int) -> BatchMeta:
        return BatchMeta(
            num_decodes=bs, query_start_loc=self.query_start_loc[: bs + 1], seq_lens=self.seq_lens[:bs],
            context_lens=self.context_lens[:bs], state_slots=self.state_slots[:bs],
            block_tables=self.block_tables[:bs], slot_mapping=self.slot_mapping[:bs], positions=self.positions[:bs],
            max_query_len=1,
        )

    def _forward(self, bs: int) -> torch.Tensor:
        with forward_batch(self._meta(bs)):
            hidden = self.model(self.input_ids[:bs], self.positions[:bs])
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture the largest size first so smaller graphs reuse its memory pool."""
        self.positions.fill_(1)  # position 1 with context 1: every path of a real decode runs
        self.context_lens.fill_(1)
        self.seq_lens.fill_(2)
        for bs in reversed(self.sizes):
            self.graphs[bs], self.logits[bs] = capture_graph(functools.partial(self._forward, bs), self.pool)
            self.pool = self.graphs[bs].pool()
        self._reset_padding(0)
        torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs (batch sizes %s)", len(self.sizes), self.sizes)

    def _reset_padding(self, start: int) -> None:
        for row, value in zip(self._i64, self._pad64):
            row[start:].fill_(value)
        for row, value in zip(self._i32, self._pad32):
            row[start:].fill_(value)
        self.block_tables[start:].fill_(self.scratch_block)
        self._tables = None

    def can_run(self, seqs: list[SeqInput]) -> bool:
        return 0 < len(seqs) <= self.max_bs and all(len(s.token_ids) == 1 and s.context_len > 0 for s in seqs)

    def run(self, seqs: list[SeqInput], prev: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, V]`` for a decode-only batch (a view into the graph's output: use before the next run).
        A placeholder token id reads its value from ``prev``, the previous step's samples on the device.
        Only queued copies: the host never waits here, so it may prepare this step while the last one runs."""
        B = len(seqs)
        bs = self.sizes[bisect.bisect_left(self.sizes, B)]
        device, bsz, pad = self.input_ids.device, self.block_size, self.max_bs - B
        pos = [s.context_len for s in seqs]
        ids = [s.token_ids[0] for s in seqs]
        slots = [s.block_table[p // bsz] * bsz + p % bsz for s, p in zip(seqs, pos)]
        rows64 = [ids, pos, slots]
        rows32 = [[s.state_slot for s in seqs], [p + 1 for p in pos], pos]
        if pad:
            rows64 = [r + [v] * pad for r, v in zip(rows64, self._pad64)]
            rows32 = [r + [v] * pad for r, v in zip(rows32, self._pad32)]
        self._i64.copy_(pinned(rows64, torch.int64), non_blocking=True)
        self._i32.copy_(pinned(rows32, torch.int32), non_blocking=True)
        if min(ids) < 0:
            self._resolve(self.input_ids[:B], previous_samples(prev))
        width = max(len(s.block_table) for s in seqs)
        tables = [s.block_table + [self.scratch_block] * (width - len(s.block_table)) for s in seqs]
        if tables != self._tables:  # a decode row crosses into a new KV block once every block_size steps
            self.block_tables[:B, :width] = to_device(tables, torch.int32, device)
        if self._live > B:  # block-table rows a larger batch used last time become padding again
            self.block_tables[B:self._live].fill_(self.scratch_block)
        self._live, self._tables = B, tables
        self.graphs[bs].replay()
        return self.logits[bs][:B]


class PrefillGraphs(_GraphSet):
    """Prefill steps of one fresh short prompt, replayed from CUDA graphs (one per padded token count).

    Time to first token at low load is one such step, and run eagerly it is mostly host time: ~35
    launches per layer behind Python (an H200 runs the kernels of a 30-token prompt on the 40-layer
    35B-A3B shape in 8.8 ms of a 122 ms step). A graph replays them with no Python in between.

    What makes a prefill capturable: every kernel of the path reads its sequence bounds from device
    buffers and sizes its grid from host bounds fixed per graph (the padded token count ``size``):
    the conv kernel and paged attention by ``cu_seqlens``, the GDN core by the one-launch recurrent
    kernel (``ops/gdn_prefill_recurrent.py``, chosen for prefills of at most
    ``RECURRENT_PREFILL_MAX_TOKENS``; fla's chunked path builds host-side chunk tables, so sizes stop
    there).

    The prompt's ``T`` tokens are rows ``[0, T)``; the padding rows ``[T, size)`` are a second, dummy
    sequence (``size`` is strictly larger than ``T``, so it is never empty) on the scratch state slot
    and scratch KV block, never stored (``slot_mapping = -1``). Every row so holds finite values --
    uninitialised rows could carry NaNs into the MoE router, whose expert ids index weights. The
    logits are those of row ``T - 1``, gathered inside the graph with a device index.
    """

    def __init__(self, model, sizes: list[int], max_blocks: int, block_size: int, pool, device: torch.device):
        self.model, self.sizes, self.block_size, self.pool = model, sorted(sizes), block_size, pool
        n = self.sizes[-1]
        i32 = dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.query_start_loc = torch.zeros(3, **i32)  # [0, T, size]: the prompt, then the padding
        self.seq_lens = torch.zeros(2, **i32)  # [T, size - T] (fresh: no context)
        self.context_lens = torch.zeros(2, **i32)
        self.state_slots = torch.zeros(2, **i32)  # [the prompt's slot, scratch]
        self.block_tables = torch.zeros(2, max_blocks, **i32)  # row 1: scratch
        self.last = torch.zeros(1, dtype=torch.int64, device=device)  # row T - 1
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def _meta(self, size: int) -> BatchMeta:
        return BatchMeta(
            num_decodes=0, query_start_loc=self.query_start_loc, seq_lens=self.seq_lens,
            context_lens=self.context_lens, state_slots=self.state_slots, block_tables=self.block_tables,
            slot_mapping=self.slot_mapping[:size], positions=self.positions[:size], max_query_len=size,
            # Host copies: bounds fixed per graph (they pick the recurrent GDN path and size grids).
            query_start_loc_cpu=torch.tensor([0, size, size], dtype=torch.int32),
            context_lens_cpu=torch.zeros(2, dtype=torch.int32),
        )

    def _forward(self, size: int) -> torch.Tensor:
        with forward_batch(self._meta(size)):
            hidden = self.model(self.input_ids[:size], self.positions[:size])
        return self.model.compute_logits(hidden[self.last])

    @torch.inference_mode()
    def capture(self, scratch_slot: int, scratch_block: int) -> None:
        """Capture every size; while capturing, both sequences use the scratch slot and block."""
        self.state_slots.fill_(scratch_slot)
        self.block_tables.fill_(scratch_block)
        for size in reversed(self.sizes):
            self._set_lengths(size // 2, size)
            self.graphs[size], self.logits[size] = capture_graph(functools.partial(self._forward, size), self.pool)
            self.pool = self.graphs[size].pool()
        torch.cuda.synchronize()
        logger.info("captured %d prefill CUDA graphs (padded token counts %s)", len(self.sizes), self.sizes)

    def _set_lengths(self, t: int, size: int) -> None:
        """Device-side lengths for a prompt of ``t`` tokens in a graph of ``size`` (nothing stored)."""
        lengths = to_device([0, t, size, t, size - t, t - 1], torch.int64, self.input_ids.device)
        self.query_start_loc.copy_(lengths[:3])
        self.seq_lens.copy_(lengths[3:5])
        self.last.copy_(lengths[5:])
        self.slot_mapping.fill_(-1)
        self.positions[t:size] = torch.arange(size - t, device=self.positions.device)  # the padding's own positions
        self.input_ids[t:size] = 0

    def can_run(self, seqs: list[SeqInput]) -> bool:
        """One fresh prompt (no context, no pending token), shorter than the largest size, whose blocks fit
        the table."""
        return (len(seqs) == 1 and seqs[0].context_len == 0 and 0 < len(seqs[0].token_ids) < self.sizes[-1]
                and len(seqs[0].block_table) <= self.block_tables.shape[1] and min(seqs[0].token_ids) >= 0)

    def run(self, seqs: list[SeqInput]) -> torch.Tensor:
        """Logits ``[1, V]`` of the prompt's last token (a view into the graph's output: use before the next run)."""
        (s,) = seqs
        t = len(s.token_ids)
        size = self.sizes[bisect.bisect_right(self.sizes, t)]  # strictly larger: the padding is never empty
        self._set_lengths(t, size)
        bsz = self.block_size
        device = self.input_ids.device
        host = to_device([s.token_ids, list(range(t)), [s.block_table[p // bsz] * bsz + p % bsz for p in range(t)]],
                         torch.int64, device)
        self.input_ids[:t], self.positions[:t], self.slot_mapping[:t] = host[0], host[1], host[2]
        self.state_slots[:1] = s.state_slot
        self.block_tables[0, : len(s.block_table)] = to_device(s.block_table, torch.int32, device)
        self.graphs[size].replay()
        return self.logits[size]
