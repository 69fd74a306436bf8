"""Tensor-parallel process group: rank, size and the two collectives the model needs.

With ``tp_size == 1`` (the default) every collective is the identity and nothing is initialised, so
layers are written TP-aware from day one at no cost to single-GPU runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class TPGroup:
    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None


_TP = TPGroup()


def tp_rank() -> int:
    return _TP.rank


def tp_size() -> int:
    return _TP.size


def set_tp(rank: int, size: int, group: dist.ProcessGroup | None = None) -> None:
    """Install the tensor-parallel group (called once per worker process after ``init_process_group``)."""
    global _TP
    _TP = TPGroup(rank, size, group)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over the TP group (after each row-parallel layer); identity when tp_size == 1."""
    if _TP.size == 1:
        return x
    dist.all_reduce(x, group=_TP.group)
    return x


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate the ranks' shards of ``x`` along ``dim`` (vocab-parallel logits)."""
    if _TP.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_TP.size)]
    dist.all_gather(parts, x.contiguous(), group=_TP.group)
    return torch.cat(parts, dim=dim)


def divide(total: int, parts: int, what: str) -> int:
    """``total / parts`` or a ConfigError naming both counts (e.g. heads not divisible by tp)."""
    from deltaserve.errors import ConfigError

    if total % parts:
        raise ConfigError(
            f"{what}={total} is not divisible by tensor_parallel_size={parts}; "
            f"choose a tensor_parallel_size that divides {total}"
        )
    return total // parts
