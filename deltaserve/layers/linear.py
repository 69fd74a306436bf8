"""Tensor-parallel-aware linear layers (bias-free, as in every Qwen3.5 / Qwen3-Next projection).

Each weight is allocated at its per-rank size, computed from the config, and carries a
``weight_loader(param, loaded, shard=None)`` that copies this rank's part of a checkpoint tensor.
``loaded`` may be a lazy safetensors slice: loaders index it before materialising, so a rank reads
only its own rows. With ``tp_size == 1`` every layer is a plain ``F.linear``.

| layer | weight per rank | after forward |
|---|---|---|
| ReplicatedLinear | full | - |
| ColumnParallelLinear | rows split | - (outputs stay sharded) |
| MergedColumnParallelLinear | each logical shard's rows split separately | - |
| RowParallelLinear | columns split | all-reduce |
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deltaserve.distributed import all_reduce, divide, tp_rank, tp_size
from deltaserve.errors import CheckpointError


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def weight_loader(self, param: nn.Parameter, loaded, shard=None, name: str = "") -> None:
        raise NotImplementedError


class ReplicatedLinear(LinearBase):
    def weight_loader(self, param, loaded, shard=None, name=""):
        copy_checked(param.data, loaded, name)


class ColumnParallelLinear(LinearBase):
    """Output features split evenly over ranks (e.g. q_proj: whole heads per rank)."""

    def __init__(self, input_size: int, output_size: int, what: str = "output features"):
        self.full_output_size = output_size
        super().__init__(input_size, divide(output_size, tp_size(), what))

    def weight_loader(self, param, loaded, shard=None, name=""):
        if shape_of(loaded)[0] != self.full_output_size:
            raise CheckpointError(f"{name}: expected {self.full_output_size} rows, got shape {shape_of(loaded)}")
        copy_checked(param.data, rank_rows(loaded, self.full_output_size, name), name)


class HeadParallelLinear(LinearBase):
    """K/V projections: heads split over ranks, replicated when there are fewer heads than ranks."""

    def __init__(self, input_size: int, num_heads: int, head_dim: int):
        tp = tp_size()
        if num_heads >= tp:
            self.heads_per_rank = divide(num_heads, tp, "num_key_value_heads")
            self.first_head = tp_rank() * self.heads_per_rank
        else:
            divide(tp, num_heads, "tensor_parallel_size over num_key_value_heads")
            self.heads_per_rank, self.first_head = 1, tp_rank() * num_heads // tp
        self.num_heads, self.head_dim = num_heads, head_dim
        super().__init__(input_size, self.heads_per_rank * head_dim)

    def weight_loader(self, param, loaded, shard=None, name=""):
        if shape_of(loaded)[0] != self.num_heads * self.head_dim:
            raise CheckpointError(f"{name}: expected {self.num_heads * self.head_dim} rows, got {shape_of(loaded)}")
        start = self.first_head * self.head_dim
        copy_checked(param.data, loaded[start : start + self.output_size], name)


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


class RowParallelLinear(LinearBase):
    """Input features split over ranks; the partial products are summed with an all-reduce."""

    def __init__(self, input_size: int, output_size: int, reduce: bool = True, what: str = "input features"):
        self.full_input_size, self.reduce = input_size, reduce
        super().__init__(divide(input_size, tp_size(), what), output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        return all_reduce(y) if self.reduce else y

    def weight_loader(self, param, loaded, shard=None, name=""):
        shape = shape_of(loaded)
        if len(shape) != 2 or shape[1] != self.full_input_size:
            raise CheckpointError(f"{name}: expected {self.full_input_size} columns, got shape {shape}")
        per = self.input_size
        copy_checked(param.data, loaded[:, tp_rank() * per : (tp_rank() + 1) * per], name)
