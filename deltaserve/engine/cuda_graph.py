"""Decode steps replayed from CUDA graphs, one graph per padded batch size.

Every tensor a decode step reads lives in a static buffer sized for ``max_bs``; a graph of size
``bs`` is captured over the first ``bs`` rows. At replay the live rows are copied in and the padding
rows point at the scratch state slot and scratch KV block (``slot_mapping = -1``: nothing stored),
so the kernels need no padding branch. Logits are computed inside the graph too.
"""

from __future__ import annotations

import bisect
import logging

import torch

from deltaserve.engine.batch import SeqInput
from deltaserve.forward_context import BatchMeta, forward_batch

logger = logging.getLogger(__name__)


class DecodeGraphs:
    def __init__(self, model, sizes: list[int], max_blocks: int, block_size: int, scratch_slot: int,
                 scratch_block: int, device: torch.device):
        self.model, self.sizes, self.block_size = model, sorted(sizes), block_size
        self.scratch_slot, self.scratch_block = scratch_slot, scratch_block
        n = self.max_bs = self.sizes[-1]
        i32 = dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, **i32)
        self.context_lens = torch.zeros(n, **i32)
        self.state_slots = torch.full((n,), scratch_slot, **i32)
        self.block_tables = torch.full((n, max_blocks), scratch_block, **i32)
        self.query_start_loc = torch.arange(n + 1, **i32)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._live = 0  # rows holding a live request since the last reset
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
            for _ in range(2):  # warm-up outside the graph: Triton autotuning, lazy inits
                self._forward(bs)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.logits[bs] = self._forward(bs)
            self.pool = graph.pool()
            self.graphs[bs] = graph
        self._reset_padding(0)
        torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs (batch sizes %s)", len(self.sizes), self.sizes)

    def release(self) -> None:
        """Drop the graphs and their memory pool. NCCL keeps a communicator whose kernels a live graph
        holds from being destroyed (its destroy waits for the graph), so tensor-parallel ranks release
        their graphs before they destroy the process group."""
        torch.cuda.synchronize()
        self.graphs.clear()
        self.logits.clear()
        self.pool = None
        torch.cuda.synchronize()

    def _reset_padding(self, start: int) -> None:
        self.slot_mapping[start:].fill_(-1)
        self.state_slots[start:].fill_(self.scratch_slot)
        self.block_tables[start:].fill_(self.scratch_block)
        self.seq_lens[start:].fill_(1)
        self.context_lens[start:].fill_(0)
        self.positions[start:].fill_(0)

    def can_run(self, seqs: list[SeqInput]) -> bool:
        return 0 < len(seqs) <= self.max_bs and all(len(s.token_ids) == 1 and s.context_len > 0 for s in seqs)

    def run(self, seqs: list[SeqInput]) -> torch.Tensor:
        """Logits ``[B, V]`` for a decode-only batch (a view into the graph's output: use before the next run)."""
        B = len(seqs)
        bs = self.sizes[bisect.bisect_left(self.sizes, B)]
        pos = [s.context_len for s in seqs]
        bsz = self.block_size
        width = max(len(s.block_table) for s in seqs)
        table = torch.tensor([s.block_table + [self.scratch_block] * (width - len(s.block_table)) for s in seqs],
                             dtype=torch.int32)
        host = torch.tensor([[s.token_ids[0] for s in seqs], pos,
                             [s.block_table[p // bsz] * bsz + p % bsz for s, p in zip(seqs, pos)]], dtype=torch.int64)
        small = torch.tensor([[s.state_slot for s in seqs], [p + 1 for p in pos], pos], dtype=torch.int32)
        host, small = host.pin_memory().to(self.input_ids.device, non_blocking=True), small.pin_memory().to(
            self.input_ids.device, non_blocking=True)
        self.input_ids[:B], self.positions[:B], self.slot_mapping[:B] = host[0], host[1], host[2]
        self.state_slots[:B], self.seq_lens[:B], self.context_lens[:B] = small[0], small[1], small[2]
        self.block_tables[:B, :width] = table.to(self.block_tables.device, non_blocking=True)
        if self._live > B:  # rows a larger batch used last time become padding again
            self._reset_padding(B)
        self._live = B
        self.graphs[bs].replay()
        return self.logits[bs][:B]
