"""ModelRunner: owns the model, its caches and the sampler; turns a scheduled step into tokens.

Start-up: load the weights, (optionally) compile the decoder layers, size the caches -- on the GPU
from ``gpu_memory_utilization`` after the weights and a warm-up forward at the step's token budget;
on the CPU from ``kv_cache_memory`` -- then tune ``inproj=auto`` and capture decode CUDA graphs. On
CUDA it first points fla at the repo's autotune configs for this GPU, if any (``deltaserve/fla_configs.py``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from deltaserve.config import EngineConfig
from deltaserve.distributed import min_over_ranks
from deltaserve.engine.batch import SeqInput, build_batch
from deltaserve.engine.cuda_graph import DecodeGraphs, PrefillGraphs
from deltaserve.engine.kv_cache import KVCache, kv_bytes_per_block
from deltaserve.engine.scheduler import Scheduled
from deltaserve.engine.state_cache import StateCache, state_bytes_per_slot
from deltaserve.errors import ConfigError
from deltaserve.fla_configs import use_shipped_fla_configs
from deltaserve.forward_context import forward_batch
from deltaserve.host import to_device
from deltaserve.layers.inproj import InProjPlan
from deltaserve.layers.layer_ref import layer_arg_mode
from deltaserve.layers.sampler import PendingSample, Sampler, SampleRow
from deltaserve.models.loader import load_model

logger = logging.getLogger(__name__)
GiB = 2**30


def warmup_batches(max_seqs: int, max_tokens: int, block_size: int) -> list[list[tuple[int, int]]]:
    """Step shapes worth compiling before serving: each a list of ``(tokens this step, context)`` per
    sequence, decodes (one token with context) first. Odd counts and multiples of 16, one and several
    sequences, short prompts alone, in bursts and beside decodes, and one long prompt per token-count
    bucket; each fits ``max_seqs`` and ``max_tokens``. Contexts stay within one block."""
    d = (1, min(5, block_size - 1))  # a decode
    shapes = [
        [(27, 0)], [(32, 0)], [(7, 0)],
        [d] * 3 + [(29, 0)], [d] * 2 + [(26, 0)] * 3,
        [(26, 0)] * 8, [(27, 0)] * 16, [(16, 0)] * 4,
        [(203, 0)], [(200, 0)] * 5, [(1001, 0)], [(1024, 0)], [(517, 0)] * 3, [(2047, 0)],
    ]
    return [b for b in shapes if len(b) <= max_seqs and sum(t for t, _ in b) <= max_tokens]


class ModelRunner:
    def __init__(self, cfg: EngineConfig, model_dir: str | Path):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.dtype = cfg.torch_dtype
        on_gpu = self.device.type == "cuda"
        if on_gpu and self.device.index is not None:
            torch.cuda.set_device(self.device)
        if on_gpu:  # before fla's first import (the first GDN prefill, in the warm-up forward)
            use_shipped_fla_configs(torch.cuda.get_device_name(self.device))
        t0 = time.perf_counter()
        self.plan = InProjPlan(cfg.inproj if on_gpu or cfg.inproj != "auto" else "fused")
        with layer_arg_mode(cfg.layer_arg):
            self.model = load_model(model_dir, self.dtype, self.device, cfg.load_format, self.plan, cfg.seed)
        self.model.set_moe_router(cfg.moe_router)
        if on_gpu:  # the split kernels' arrival counters, made before any CUDA-graph capture
            from deltaserve.ops.arrival import prepare

            prepare(self.device)
        self.apply_kernel_options(cfg)
        if on_gpu:
            late = {None: "by grid size", True: "always", False: "never"}[cfg.pdl_late_trigger]
            logger.info("programmatic dependent launch %s%s", "on" if cfg.pdl else "off",
                        f" (late trigger {late}; skinny GEMM prefetch {cfg.skinny_prefetch} columns; preload "
                        f"{'on' if cfg.pdl_preload else 'off'})" if cfg.pdl else "")
        self.model_config = self.model.config
        logger.info("loaded %s (%s, %s) in %.1f s", self.model_config.architecture, self.dtype, cfg.device,
                    time.perf_counter() - t0)
        if cfg.compile:
            from deltaserve.engine.compile import compile_layers

            compile_layers(self.model)
        self.block_size = cfg.block_size
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        self._allocate_caches()
        self.sampler = Sampler(self.device, cfg.seed)
        if on_gpu and cfg.inproj == "auto":
            from deltaserve.layers.inproj_tune import tune_inproj

            tune_inproj(self.model, self.plan, max_tokens=cfg.max_num_batched_tokens)
        sizes = cfg.graph_sizes()
        if sizes:
            t0 = time.perf_counter()
            self.graphs = DecodeGraphs(self.model, sizes, self.max_blocks_per_seq, self.block_size,
                                       self.states.scratch_slot, self.kv.scratch_block, self.device)
            self.graphs.capture()
            prefill_sizes = cfg.prefill_graph_sizes()
            if prefill_sizes:
                self.prefill_graphs = PrefillGraphs(self.model, prefill_sizes, self.max_blocks_per_seq,
                                                    self.block_size, self.graphs.pool, self.device)
                self.prefill_graphs.capture(self.states.scratch_slot, self.kv.scratch_block)
            logger.info("CUDA graphs captured in %.1f s", time.perf_counter() - t0)
        if cfg.compile:
            from deltaserve.engine.compile import compiled_graph_count

            logger.info("compiled graphs: %d", compiled_graph_count())  # read by `bench startup`

    # -- caches ---------------------------------------------------------------------------------------
    def apply_kernel_options(self, cfg: EngineConfig) -> None:
        """Set ``cfg``'s ``config.KERNEL_OPTIONS`` for every launch from here on (process-wide). They are read
        when a kernel is launched, so a CUDA graph keeps those of its capture: ``bench step-ab`` captures
        one graph set per side with its own."""
        from deltaserve.ops import pdl, skinny_gemm

        self.model.set_skinny(cfg.skinny_out_proj, cfg.skinny_dense)
        pdl.enable(cfg.pdl, self.device if self.device.type == "cuda" else None, cfg.pdl_late_trigger,
                   cfg.pdl_preload)
        skinny_gemm.set_pdl_prefetch(cfg.skinny_prefetch)

    def _allocate_caches(self) -> None:
        cfg, mc = self.cfg, self.model_config
        slot_bytes = state_bytes_per_slot(mc, self.dtype, cfg.torch_state_dtype, cfg.tensor_parallel_size)
        block_bytes = kv_bytes_per_block(mc, self.block_size, self.dtype, cfg.tensor_parallel_size)
        state_total = (cfg.max_num_seqs + 1) * slot_bytes
        if self.device.type == "cuda":
            free = self._gpu_budget()
            budget = free - state_total
            if budget < block_bytes * 2:
                raise ConfigError(
                    f"gpu_memory_utilization={cfg.gpu_memory_utilization} leaves {free / GiB:.2f} GiB after the "
                    f"weights and activations (and anything else this process holds on the GPU); the "
                    f"{cfg.max_num_seqs + 1} GDN state slots need {state_total / GiB:.2f} GiB plus room for a KV "
                    f"cache: raise gpu_memory_utilization, lower max_num_seqs or use state_dtype=bfloat16")
        else:
            budget = cfg.kv_cache_memory
        if block_bytes == 0:  # no full-attention layer: blocks are bookkeeping only, give every slot a full context
            num_blocks = cfg.max_num_seqs * -(-(cfg.max_model_len or mc.max_position_embeddings) // self.block_size)
        else:
            num_blocks = max(int(budget // block_bytes) - 1, 1)
        num_blocks = min_over_ranks(num_blocks)  # every rank must agree
        capacity = num_blocks * self.block_size
        if cfg.max_model_len is None:
            self.max_model_len = min(mc.max_position_embeddings, capacity)
        elif cfg.max_model_len > capacity:
            raise ConfigError(
                f"max_model_len={cfg.max_model_len} does not fit: the KV cache holds {capacity} tokens "
                f"({num_blocks} blocks of {self.block_size}); lower max_model_len or give the cache more memory")
        else:
            self.max_model_len = cfg.max_model_len
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        self.states = StateCache(self.model.gdn_layers(), cfg.max_num_seqs, self.dtype, cfg.torch_state_dtype,
                                 self.device)
        self.kv = KVCache(self.model.attention_layers(), num_blocks, self.block_size, self.dtype, self.device)
        logger.info("GDN state: %d slots x %.1f MiB; KV cache: %d blocks x %d tokens (%.2f GiB); max_model_len %d",
                    cfg.max_num_seqs, slot_bytes / 2**20, num_blocks, self.block_size,
                    num_blocks * block_bytes / GiB, self.max_model_len)

    def _gpu_budget(self) -> int:
        """Bytes left for state and KV after the weights and the activations of a full-budget prefill."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        n = min(self.cfg.max_num_batched_tokens, self.model_config.max_position_embeddings)
        # Throw-away caches (they bind to the layers; the real ones re-bind) for one warm-up sequence.
        StateCache(self.model.gdn_layers(), 1, self.dtype, self.cfg.torch_state_dtype, self.device)
        kv = KVCache(self.model.attention_layers(), -(-n // self.block_size), self.block_size, self.dtype, self.device)
        self._forward([SeqInput([0] * n, 0, 0, list(range(kv.num_blocks)))], sample_rows=[0])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        total = torch.cuda.get_device_properties(self.device).total_memory
        self._warm_step_shapes(n)
        # Keep 0.5 GiB for CUDA graphs, sampler buffers and library workspaces.
        return int(total * self.cfg.gpu_memory_utilization) - peak - GiB // 2

    def _warm_step_shapes(self, max_tokens: int) -> None:
        """Run the step shapes of :func:`warmup_batches` once, on throw-away caches, so that their
        kernels are compiled (and autotuned) at start-up rather than while a client waits: Triton
        specialises on integer arguments (1, multiples of 16, other) and our kernels pick their tiles by
        token-count bucket, so a first odd-sized burst of prompts used to stall its step by seconds."""
        t0 = time.perf_counter()
        batches = warmup_batches(self.cfg.max_num_seqs, max_tokens, self.block_size)
        if not batches:
            return
        slots = max(len(b) for b in batches)
        StateCache(self.model.gdn_layers(), slots, self.dtype, self.cfg.torch_state_dtype, self.device)
        kv = KVCache(self.model.attention_layers(), -(-max_tokens // self.block_size) + slots, self.block_size,
                     self.dtype, self.device)
        for batch in batches:
            seqs, next_block = [], 0
            for slot, (tokens, context) in enumerate(batch):
                nb = -(-(tokens + context) // self.block_size)
                seqs.append(SeqInput([0] * tokens, context, slot, list(range(next_block, next_block + nb))))
                next_block += nb
            assert next_block <= kv.num_blocks
            self._forward(seqs, sample_rows=list(range(len(seqs))))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        for layer in self.model.gdn_layers():
            layer.conv_state = layer.ssm_state = None
        for layer in self.model.attention_layers():
            layer.k_cache = layer.v_cache = None
        logger.info("warmed %d step shapes in %.1f s", len(batches), time.perf_counter() - t0)

    # -- one step -------------------------------------------------------------------------------------
    def _forward(self, seqs: list[SeqInput], sample_rows: list[int], prev: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """Logits of the last token of each sequence in ``sample_rows``. ``prev``: the previous step's
        sampled tokens on the device, read for placeholder ids (``request.placeholder``)."""
        if self.graphs is not None and self.graphs.can_run(seqs):
            return self._rows(self.graphs.run(seqs, prev), sample_rows)
        if self.prefill_graphs is not None and self.prefill_graphs.can_run(seqs):
            return self._rows(self.prefill_graphs.run(seqs), sample_rows)
        ids, positions, meta = build_batch(seqs, self.block_size, self.device, prev=prev)
        with torch.inference_mode(), forward_batch(meta):
            hidden = self.model(ids, positions)
            last = meta.query_start_loc_cpu[1:][sample_rows].to(torch.long) - 1
            return self.model.compute_logits(hidden[to_device(last, torch.long, self.device)])

    def _rows(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """``logits[rows]``. Leading rows are a view; other rows are gathered with a queued index copy
        (indexing a CUDA tensor with a Python list would wait for the device)."""
        if rows == list(range(len(rows))):
            return logits[: len(rows)]
        return logits[to_device(rows, torch.long, self.device)]

    def prepare(self, scheduled: list[Scheduled]) -> tuple[list[SeqInput], list[int]]:
        """The step's model inputs (what tensor-parallel rank 0 broadcasts) and the rows that sample."""
        seqs = [SeqInput(s.request.token_ids(s.request.num_computed, s.request.num_computed + s.num_tokens),
                         s.request.num_computed, s.request.state_slot, s.request.block_ids) for s in scheduled]
        return seqs, [i for i, s in enumerate(scheduled) if s.samples]

    @torch.inference_mode()
    def forward(self, seqs: list[SeqInput], sample_rows: list[int], prev: torch.Tensor | None = None
                ) -> torch.Tensor:
        return self._forward(seqs, sample_rows, prev)

    def sample(self, scheduled: list[Scheduled], sample_rows: list[int], logits: torch.Tensor) -> PendingSample:
        if not sample_rows:
            return PendingSample(torch.empty(0, dtype=torch.long, device=self.device))
        rows = []
        for i in sample_rows:
            r = scheduled[i].request
            history = None
            if r.params.repetition_penalty != 1.0:
                if r.pending:  # LLMEngine lands such a request's step before it schedules the next
                    raise RuntimeError(f"request {r.request_id}: a repetition penalty needs every earlier token "
                                       "on the host, and one is still in flight")
                history = r.prompt_token_ids + r.output_token_ids
            rows.append(SampleRow(r.params, history, r.num_generated, r.stop_ids, r.generator))
        return self.sampler(logits, rows)

    @torch.inference_mode()
    def launch(self, scheduled: list[Scheduled], prev: PendingSample | None = None) -> PendingSample:
        """Queue one step: its forward and its sampling. Returns without waiting for the device; the
        tokens of ``prev`` (the step before, maybe still running) feed this one's placeholder inputs."""
        seqs, sample_rows = self.prepare(scheduled)
        logits = self.forward(seqs, sample_rows, prev.tokens if prev is not None else None)
        return self.sample(scheduled, sample_rows, logits)

    def shutdown(self) -> None:
        """Release the decode graphs (a tensor-parallel rank must before it destroys its NCCL group)."""
        if self.prefill_graphs is not None:
            self.prefill_graphs.release()
            self.prefill_graphs = None
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None
