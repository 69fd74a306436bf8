"""Tensor parallelism over the GPUs (or CPU processes) of one host.

Rank 0 lives in the engine's process and owns the scheduler; ranks 1..N-1 are spawned worker
processes. Every step, rank 0 broadcasts the step's model inputs (a list of :class:`SeqInput`, a few
hundred bytes) over a gloo group, every rank runs the same forward on its shard of the weights
(collectives inside the model: NCCL on GPUs, gloo on the CPU), and rank 0 alone samples from the
all-gathered logits. A ``None`` broadcast stops the workers.

Workers die with their parent (a watchdog polls the parent pid), and rank 0 reports a dead worker
instead of waiting on it forever.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import multiprocessing as mp
import os
import socket
import threading
import time
import traceback
from pathlib import Path

from deltaserve.config import EngineConfig
from deltaserve.engine.scheduler import Scheduled
from deltaserve.errors import EngineDeadError
from deltaserve.layers.sampler import PendingSample

logger = logging.getLogger(__name__)


def check_divisible(mc, tp: int) -> None:
    """Fail before spawning anything if ``tp`` cannot split the model's heads or widths evenly."""
    from deltaserve.distributed import divide
    from deltaserve.errors import ConfigError

    checks = [("num_attention_heads", mc.num_attention_heads), ("linear_num_key_heads", mc.linear_num_key_heads),
              ("linear_num_value_heads", mc.linear_num_value_heads)]
    if "dense" in mc.mlp_types:
        checks.append(("intermediate_size", mc.intermediate_size))
    if mc.is_moe:
        checks += [("moe_intermediate_size", mc.moe_intermediate_size),
                   ("shared_expert_intermediate_size", mc.shared_expert_intermediate_size)]
    for name, value in checks:
        divide(value, tp, name)
    kv = mc.num_key_value_heads
    if kv % tp and tp % kv:
        raise ConfigError(f"num_key_value_heads={kv} and tensor_parallel_size={tp}: one must divide the other "
                          f"(KV heads are split, or replicated when there are fewer than ranks)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_config(cfg: EngineConfig, rank: int) -> EngineConfig:
    device = f"cuda:{rank}" if cfg.device.startswith("cuda") else "cpu"
    return dataclasses.replace(cfg, device=device)


def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(1)  # the engine process is gone: never outlive it
        time.sleep(0.5)


def _worker(rank: int, cfg: EngineConfig, model_dir: str, port: int, parent: int, errors) -> None:
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    try:
        from deltaserve.distributed import broadcast_object, init_tp, shutdown_tp
        from deltaserve.engine.runner import ModelRunner

        init_tp(rank, cfg.tensor_parallel_size, port, cfg.device)
        runner = ModelRunner(cfg, model_dir)
        while (msg := broadcast_object()) is not None:
            seqs, sample_rows = msg
            runner.forward(seqs, sample_rows)
        runner.shutdown()  # graphs first: NCCL's destroy waits for graphs that hold its kernels
        shutdown_tp()
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    if not cfg.device.startswith("cuda"):  # gloo, where the abort was seen; NCCL ranks: not yet run on 2 GPUs
        from deltaserve.distributed import exit_worker

        exit_worker()  # no interpreter teardown after the process group (see exit_worker)


class TPExecutor:
    """Rank 0's runner plus the worker processes; quacks like a :class:`ModelRunner`."""

    def __init__(self, cfg: EngineConfig, model_dir: str | Path):
        from deltaserve.distributed import init_tp
        from deltaserve.engine.runner import ModelRunner
        from deltaserve.models.config import load_model_config

        n = cfg.tensor_parallel_size
        check_divisible(load_model_config(model_dir), n)
        if cfg.device.startswith("cuda"):
            import torch

            if torch.cuda.device_count() < n:
                from deltaserve.errors import ConfigError

                raise ConfigError(f"tensor_parallel_size={n} needs {n} GPUs; {torch.cuda.device_count()} visible")
        port, ctx = _free_port(), mp.get_context("spawn")
        self.errors = ctx.Queue()
        self.workers = [ctx.Process(target=_worker, name=f"deltaserve-tp{r}", daemon=True,
                                    args=(r, _rank_config(cfg, r), str(model_dir), port, os.getpid(), self.errors))
                        for r in range(1, n)]
        for w in self.workers:
            w.start()
        self._closed = False
        atexit.register(self.shutdown)
        try:
            init_tp(0, n, port, cfg.device)
            self.runner = ModelRunner(_rank_config(cfg, 0), model_dir)
        except BaseException:
            self._raise_worker_error()
            self.shutdown()
            raise
        logger.info("tensor parallel: %d ranks ready", n)

    def __getattr__(self, name):  # kv, states, model_config, max_model_len, device, dtype, graphs, ...
        return getattr(self.__dict__["runner"], name)

    def _raise_worker_error(self) -> None:
        dead = [w for w in self.workers if not w.is_alive()]
        if dead or not self.errors.empty():
            detail = self.errors.get(timeout=1) if not self.errors.empty() else None
            names = ", ".join(f"{w.name} (exit code {w.exitcode})" for w in dead)
            raise EngineDeadError(f"tensor-parallel worker failed: {names or 'see below'}"
                                  + (f"\n{detail[1]}" if detail else ""))

    def launch(self, scheduled: list[Scheduled], prev: PendingSample | None = None) -> PendingSample:
        """Broadcast the step, run rank 0's share and sample. Only rank 0 has the samples, so the workers
        cannot read pending tokens: ``EngineConfig`` keeps async scheduling off with more than one rank."""
        from deltaserve.distributed import broadcast_object

        if prev is not None:
            raise RuntimeError("tensor-parallel steps take every input token from the host (no async scheduling)")
        self._raise_worker_error()
        seqs, sample_rows = self.runner.prepare(scheduled)
        broadcast_object((seqs, sample_rows))
        logits = self.runner.forward(seqs, sample_rows)
        return self.runner.sample(scheduled, sample_rows, logits)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        from deltaserve.distributed import broadcast_object, shutdown_tp

        alive = all(w.is_alive() for w in self.workers)
        try:
            if alive:
                broadcast_object(None)  # the workers leave their loop and destroy the group too
        except Exception:  # a dead peer: nothing to tell
            alive = False
        # Destroy alongside the workers (NCCL's destroy is collective), then reap them. With a peer
        # gone there is nobody to destroy with: the group is abandoned after a short wait. The decode
        # graphs go first: NCCL's destroy waits for every graph that holds its kernels.
        if "runner" in self.__dict__:
            self.runner.shutdown()
        shutdown_tp(timeout=30.0 if alive else 1.0)
        for w in self.workers:
            w.join(timeout=10)
            if w.is_alive():
                w.kill()
