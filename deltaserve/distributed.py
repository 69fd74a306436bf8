"""Tensor-parallel process group: rank, size and the two collectives the model needs.

With ``tp_size == 1`` (the default) every collective is the identity and nothing is initialised, so
layers are written TP-aware from day one at no cost to single-GPU runs.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class TPGroup:
    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None  # model collectives (NCCL on GPU, gloo on CPU)
    control: dist.ProcessGroup | None = None  # gloo: step broadcasts and small host-side agreements


_TP = TPGroup()
logger = logging.getLogger(__name__)


def tp_rank() -> int:
    return _TP.rank


def tp_size() -> int:
    return _TP.size


def set_tp(rank: int, size: int, group: dist.ProcessGroup | None = None,
           control: dist.ProcessGroup | None = None) -> None:
    """Install the tensor-parallel group (once per process, before the model is built)."""
    global _TP
    _TP = TPGroup(rank, size, group, control)


def init_tp(rank: int, size: int, port: int, device: str) -> None:
    """Join the TP process group over TCP on localhost: NCCL for CUDA devices, gloo for the CPU."""
    import datetime

    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(minutes=10))
    control = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    set_tp(rank, size, dist.group.WORLD, control)


def shutdown_tp(timeout: float = 30.0) -> None:
    """Destroy the TP process groups. Every rank calls this at about the same time: NCCL's destroy is
    collective (a rank that destroys alone waits for its peers). If it has not returned within
    ``timeout`` seconds -- a peer died -- the groups are abandoned with a warning instead of hanging."""
    if dist.is_initialized():
        done = threading.Thread(target=dist.destroy_process_group, name="deltaserve-tp-destroy", daemon=True)
        done.start()
        done.join(timeout)
        if done.is_alive():
            logger.warning("tensor-parallel process group not destroyed within %.0f s (a peer is gone); "
                           "abandoning it", timeout)
    set_tp(0, 1)


def exit_worker(status: int = 0) -> None:
    """End a TP worker process after :func:`shutdown_tp`, skipping the interpreter's teardown.

    After a clean destroy, a gloo rank still aborted now and then at exit ("terminate called without an
    active exception", SIGABRT: once in a CI run and once in 16 local runs of tests/test_tp.py, a 2-core box;
    none in 12 runs since). The likely cause is C++ state of the process group freed while the interpreter is
    torn down (pytorch/pytorch#179291 describes that mechanism). A worker has nothing left to do at that
    point, so it flushes its logs and stdio and leaves with ``os._exit``, the way multiprocessing's forked
    children end."""
    import os
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or redirected to something gone
            pass
    os._exit(status)


def broadcast_object(obj=None):
    """Rank 0 sends ``obj``; every rank returns it."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_TP.control)
    return box[0]


def min_over_ranks(value: int) -> int:
    """The smallest of the ranks' values (e.g. cache blocks that fit on every GPU)."""
    if _TP.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_TP.control)
    return int(t.item())


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
