"""Tensor-parallel-aware linear layers (bias-free, as in every Qwen3.5 / Qwen3-Next projection).

Each weight is allocated at its per-rank size, computed from the config, and carries a
``weight_loader(param, loaded, shard=None)`` that copies this rank's part of a checkpoint tensor.
``loaded`` may be a lazy safetensors slice: loaders index it before materialising, so a rank reads
only its own rows. With ``tp_size == 1`` every layer is a plain ``F.linear``.

| layer | weight per rank | after forward |
|---|---|---|
| ReplicatedLinear | full | - |
| MergedColumnParallelLinear | each logical shard's rows split separately | - (outputs stay sharded) |
| QKVParallelLinear | q heads split; K/V heads split, or replicated when fewer than ranks | - |
| RowParallelLinear | columns split | all-reduce |

A layer whose ``skinny`` flag is set runs batches of at most ``SKINNY_MAX_TOKENS`` tokens on CUDA through
our skinny GEMM (``ops/skinny_gemm.py``) instead of cuBLAS. The GDN out_proj and the attention o_proj
(2048 or 4096 output rows, split-K) are made with it on: 8.2 against 9.7 us on the 35B-A3B shape (H200).
The model's ``set_skinny`` switches them and, with ``--skinny-dense`` (on by default), the dense MLP's
gate_up and down_proj (the 9B down_proj: 27.3 us against cuBLAS's 27.5 plus a 1.8 us split-K reduce
launch) and the MoE router GEMM.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deltaserve.distributed import all_reduce, divide, tp_rank, tp_size
from deltaserve.errors import CheckpointError
from deltaserve.layers.layer_ref import CompileOp

SKINNY_MAX_TOKENS = 16  # where the split-K skinny GEMM beat cuBLAS on both out_proj shapes measured


@CompileOp.define("deltaserve::skinny_linear")
def skinny_linear_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear`` by our decode GEMM (``ops/skinny_gemm.py``; at most 64 rows, CUDA)."""
    from deltaserve.ops.skinny_gemm import skinny_linear

    return skinny_linear(x, weight)


@skinny_linear_op.register_fake
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0])


def skinny_fits(x: torch.Tensor, max_tokens: int) -> bool:
    """Whether the skinny GEMM serves this batch: on CUDA, 1 to ``max_tokens`` rows."""
    return x.is_cuda and 0 < x.shape[0] <= max_tokens


def linear(x: torch.Tensor, weight: torch.Tensor, skinny: bool) -> torch.Tensor:
    """``F.linear``; with ``skinny``, batches of at most ``SKINNY_MAX_TOKENS`` rows on CUDA go through our
    skinny GEMM instead of cuBLAS (the same function, one fp32-accumulated rounding per output)."""
    if skinny and skinny_fits(x, SKINNY_MAX_TOKENS):
        return skinny_linear_op(x, weight)
    return F.linear(x, weight)


def copy_checked(dst: torch.Tensor, src, name: str) -> None:
    """Copy a (possibly lazy) checkpoint tensor into ``dst`` after checking its shape."""
    src = src[:] if not isinstance(src, torch.Tensor) else src
    if tuple(src.shape) != tuple(dst.shape):
        raise CheckpointError(f"{name}: expected shape {tuple(dst.shape)} on this rank, got {tuple(src.shape)}")
    dst.copy_(src)


def shape_of(loaded) -> tuple[int, ...]:
    """Shape of a tensor or of a lazy safetensors slice (without reading it)."""
    return tuple(loaded.shape) if isinstance(loaded, torch.Tensor) else tuple(loaded.get_shape())


def check_shape(name: str, loaded, expected) -> None:
    if shape_of(loaded) != tuple(expected):
        raise CheckpointError(f"{name}: expected shape {tuple(expected)}, got {shape_of(loaded)}")


def rank_rows(loaded, total: int, name: str, start: int = 0):
    """This rank's block of the ``total`` rows starting at ``start`` (split evenly over ranks).

    Only that block is read when ``loaded`` is a lazy safetensors slice.
    """
    per = total // tp_size()
    return loaded[start + tp_rank() * per : start + (tp_rank() + 1) * per]


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int):
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.skinny = False  # few-token batches on our skinny GEMM (``linear``); the model's set_skinny sets it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.skinny)

    def weight_loader(self, param: nn.Parameter, loaded, shard=None, name: str = "") -> None:
        raise NotImplementedError


class ReplicatedLinear(LinearBase):
    def weight_loader(self, param, loaded, shard=None, name=""):
        copy_checked(param.data, loaded, name)


class MergedColumnParallelLinear(LinearBase):
    """Several logical projections in one weight: ``output_sizes`` full sizes, each split over ranks.

    ``shard`` in the loader is one index, or a tuple of consecutive indices when one checkpoint tensor
    holds several shards (e.g. Qwen3.5's ``in_proj_qkv`` -> shards 0, 1, 2 of the GDN in_proj).
    """

    def __init__(self, input_size: int, output_sizes: Sequence[int], what: str = "output features"):
        self.full_sizes = list(output_sizes)
        self.rank_sizes = [divide(s, tp_size(), what) for s in self.full_sizes]
        self.offsets = [sum(self.rank_sizes[:i]) for i in range(len(self.rank_sizes))]
        super().__init__(input_size, sum(self.rank_sizes))

    def weight_loader(self, param, loaded, shard=None, name=""):
        shards = (shard,) if isinstance(shard, int) else tuple(shard)
        expected = sum(self.full_sizes[s] for s in shards)
        if shape_of(loaded)[0] != expected:
            raise CheckpointError(f"{name}: expected {expected} rows, got shape {shape_of(loaded)}")
        row = 0
        for s in shards:
            rows = rank_rows(loaded, self.full_sizes[s], name, start=row)
            copy_checked(param.data[self.offsets[s] : self.offsets[s] + self.rank_sizes[s]], rows, name)
            row += self.full_sizes[s]

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(y, self.rank_sizes, dim=-1)


class QKVParallelLinear(LinearBase):
    """Gated attention's q_proj, k_proj and v_proj as one weight: one GEMM per layer.

    Rows per rank: ``[Hq x (q D | gate D) | Hkv x k D | Hkv x v D]`` (q_proj keeps its per-head
    ``[q | gate]`` layout). Query heads split over ranks; KV heads split too, or -- when there are fewer
    than ranks -- each rank holds the one KV head its query heads read (rank ``r``: head ``r * Hkv // tp``).
    The loader's ``shard`` is ``"q"``, ``"k"`` or ``"v"``: the checkpoint's q_proj, k_proj, v_proj.
    """

    def __init__(self, input_size: int, num_heads: int, num_kv_heads: int, head_dim: int):
        tp = tp_size()
        self.num_heads = divide(num_heads, tp, "num_attention_heads")  # per rank
        if num_kv_heads >= tp:
            self.num_kv_heads = divide(num_kv_heads, tp, "num_key_value_heads")
            first_kv_head = tp_rank() * self.num_kv_heads
        else:
            divide(tp, num_kv_heads, "tensor_parallel_size over num_key_value_heads")
            self.num_kv_heads, first_kv_head = 1, tp_rank() * num_kv_heads // tp
        self.head_dim = head_dim
        q_rows, kv_rows = 2 * self.num_heads * head_dim, self.num_kv_heads * head_dim
        # shard -> (rows in the checkpoint tensor, first row this rank reads, offset in our weight, rows)
        self.shards = {
            "q": (2 * num_heads * head_dim, tp_rank() * q_rows, 0, q_rows),
            "k": (num_kv_heads * head_dim, first_kv_head * head_dim, q_rows, kv_rows),
            "v": (num_kv_heads * head_dim, first_kv_head * head_dim, q_rows + kv_rows, kv_rows),
        }
        super().__init__(input_size, q_rows + 2 * kv_rows)

    def weight_loader(self, param, loaded, shard=None, name=""):
        full, start, offset, rows = self.shards[shard]
        check_shape(name, loaded, (full, self.input_size))
        copy_checked(param.data[offset : offset + rows], loaded[start : start + rows], name)


class RowParallelLinear(LinearBase):
    """Input features split over ranks; the partial products are summed with an all-reduce."""

    def __init__(self, input_size: int, output_size: int, reduce: bool = True, what: str = "input features",
                 skinny: bool = False):
        self.full_input_size, self.reduce = input_size, reduce
        super().__init__(divide(input_size, tp_size(), what), output_size)
        self.skinny = skinny

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.skinny)
        return all_reduce(y) if self.reduce else y

    def weight_loader(self, param, loaded, shard=None, name=""):
        shape = shape_of(loaded)
        if len(shape) != 2 or shape[1] != self.full_input_size:
            raise CheckpointError(f"{name}: expected {self.full_input_size} columns, got shape {shape}")
        per = self.input_size
        copy_checked(param.data, loaded[:, tp_rank() * per : (tp_rank() + 1) * per], name)
