"""The host side of a decode-graph replay, on the CPU: what lands in the graph's input buffers.

``DecodeGraphs.run`` fills the buffers the captured graph reads -- two whole-buffer copies with the
padding rows, the block table only when it changed, the pending-token placeholders resolved by a kernel --
and replays. Here the graph is a stand-in that snapshots the buffers at replay, so every row the real
graph would read is checked: live rows, padding rows, rows a larger batch left behind.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from deltaserve.engine import cuda_graph  # noqa: E402
from deltaserve.engine.batch import SeqInput  # noqa: E402
from deltaserve.engine.request import placeholder  # noqa: E402

SCRATCH_SLOT, SCRATCH_BLOCK, BLOCK = 9, 99, 4


class SnapshotGraph:
    def __init__(self, graphs: cuda_graph.DecodeGraphs, bs: int, seen: list):
        self.graphs, self.bs, self.seen = graphs, bs, seen

    def replay(self) -> None:
        g, bs = self.graphs, self.bs
        self.seen.append({name: getattr(g, name)[:bs].tolist() for name in
                          ("input_ids", "positions", "slot_mapping", "state_slots", "seq_lens", "context_lens")}
                         | {"block_tables": g.block_tables[:bs].tolist()})


@pytest.fixture
def graphs(monkeypatch):
    monkeypatch.setattr(cuda_graph, "pinned", lambda values, dtype: torch.tensor(values, dtype=dtype))
    table_copies = []
    real = cuda_graph.to_device
    monkeypatch.setattr(cuda_graph, "to_device", lambda v, d, dev: table_copies.append(v) or real(v, d, dev))
    g = cuda_graph.DecodeGraphs(None, [1, 2, 4], max_blocks=5, block_size=BLOCK, scratch_slot=SCRATCH_SLOT,
                                scratch_block=SCRATCH_BLOCK, device=torch.device("cpu"))
    g._reset_padding(0)  # what capture() leaves
    seen: list[dict] = []
    g.graphs = {bs: SnapshotGraph(g, bs, seen) for bs in g.sizes}
    g.logits = {bs: torch.zeros(bs, 3) for bs in g.sizes}
    return g, seen, table_copies


def pad_row(width: int = 5) -> list[int]:
    return [SCRATCH_BLOCK] * width


def test_live_rows_padding_rows_and_rows_a_larger_batch_left(graphs):
    g, seen, table_copies = graphs
    three = [SeqInput([5], 4, 0, [10, 11]), SeqInput([6], 9, 1, [12, 13, 14]), SeqInput([7], 1, 2, [15])]
    assert g.run(three).shape == (3, 3)
    s = seen[-1]  # padded to the size-4 graph
    assert s["input_ids"] == [5, 6, 7, 0] and s["positions"] == [4, 9, 1, 0]
    assert s["slot_mapping"] == [11 * BLOCK + 0, 14 * BLOCK + 1, 15 * BLOCK + 1, -1]
    assert s["state_slots"] == [0, 1, 2, SCRATCH_SLOT]
    assert s["seq_lens"] == [5, 10, 2, 1] and s["context_lens"] == [4, 9, 1, 0]
    assert s["block_tables"] == [[10, 11, SCRATCH_BLOCK, SCRATCH_BLOCK, SCRATCH_BLOCK],
                                 [12, 13, 14, SCRATCH_BLOCK, SCRATCH_BLOCK],
                                 [15, SCRATCH_BLOCK, SCRATCH_BLOCK, SCRATCH_BLOCK, SCRATCH_BLOCK], pad_row()]
    assert len(table_copies) == 1

    # One request left, its input a placeholder for row 2 of the previous step's samples: size-1 graph,
    # and the rows the three-row batch used are padding again for the larger graphs.
    one = [SeqInput([placeholder(2)], 10, 1, [12, 13, 14])]
    g.run(one, prev=torch.tensor([40, 41, 42]))
    s = seen[-1]
    assert s["input_ids"] == [42] and s["slot_mapping"] == [14 * BLOCK + 2] and s["seq_lens"] == [11]
    assert g.block_tables[1:].tolist() == [pad_row()] * 3
    assert g.input_ids[1:].tolist() == [0, 0, 0] and g.slot_mapping[1:].tolist() == [-1, -1, -1]
    assert g.state_slots[1:].tolist() == [SCRATCH_SLOT] * 3

    # Same request, same blocks: the block table is not copied again; a new block: it is.
    copies = len(table_copies)
    g.run([SeqInput([8], 11, 1, [12, 13, 14])])
    assert len(table_copies) == copies and seen[-1]["block_tables"] == [[12, 13, 14, SCRATCH_BLOCK, SCRATCH_BLOCK]]
    g.run([SeqInput([9], 12, 1, [12, 13, 14, 16])])
    assert len(table_copies) == copies + 1
    assert seen[-1]["block_tables"] == [[12, 13, 14, 16, SCRATCH_BLOCK]]
    assert seen[-1]["slot_mapping"] == [16 * BLOCK + 0]


def test_a_placeholder_without_samples_is_refused(graphs):
    g, _, _ = graphs
    with pytest.raises(RuntimeError, match="pending token"):
        g.run([SeqInput([placeholder(0)], 3, 0, [1])])
