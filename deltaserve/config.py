"""EngineConfig: every engine switch in one place, each with its help text, validated once.

The CLI's flags are generated from these fields (``--max-num-seqs`` for ``max_num_seqs``), so there is
no second list of defaults. Validation errors name the field, the value and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from deltaserve.errors import ConfigError
from deltaserve.layers.inproj import STRATEGIES

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Options read when a kernel is launched, not when the engine starts (``ModelRunner.apply_kernel_options``):
# a CUDA graph keeps those of its capture, so one process can hold graphs captured under different ones.
KERNEL_OPTIONS = ("skinny_out_proj", "skinny_dense", "pdl", "pdl_late_trigger", "pdl_preload", "skinny_prefetch")


def _f(default: Any, help: str, **kw) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class EngineConfig:
    model: str | None = _f(None, "Model directory (HF format). None: the built-in demo model.", positional=True)
    dtype: str = _f("auto", "Weight and activation dtype: auto (bfloat16 on GPU, float32 on CPU), float32, "
                            "bfloat16, float16.", choices=list(DTYPES))
    device: str = _f("auto", "auto (cuda if available, else cpu), cuda, cuda:N or cpu.")
    load_format: str = _f("auto", "auto/safetensors: read the checkpoint; dummy: random weights made on the "
                                  "device (benchmarks at real shapes from a config-only directory).",
                          choices=["auto", "safetensors", "dummy"])
    max_num_seqs: int = _f(64, "Most requests running at once; also the number of GDN state slots and the "
                               "largest CUDA-graph batch.")
    max_model_len: int | None = _f(None, "Context length (prompt + completion). Default: the model's, capped by "
                                         "what the KV cache can hold.")
    max_num_batched_tokens: int = _f(2048, "Token budget of one step (decodes + prefill chunks); longer prompts "
                                           "are prefilled in chunks.")
    gpu_memory_utilization: float = _f(0.90, "Fraction of GPU memory deltaserve may use (weights, activations, "
                                             "state slots and KV cache).")
    kv_cache_memory: int = _f(256 * 2**20, "KV cache size in bytes on the CPU (on GPU it is sized from "
                                           "gpu_memory_utilization).")
    block_size: int = _f(16, "Tokens per KV-cache block.")
    state_dtype: str = _f("float32", "GDN recurrent state dtype: float32 (what Qwen3.5 configs ask) or bfloat16 "
                                     "(half the state traffic).", choices=list(STATE_DTYPES))
    inproj: str = _f("auto", "GDN input projection: serial (two GEMMs), dual (ba GEMM on a second CUDA stream), "
                             "fused (one GEMM), auto (measured per token count at start-up; fused on CPU).",
                     choices=list(STRATEGIES))
    skinny_out_proj: bool = _f(True, "The GDN out_proj and attention o_proj at <= 16 tokens on CUDA by our split-K "
                                     "skinny GEMM instead of cuBLAS.")
    skinny_dense: bool = _f(True, "Also the dense MLP (gate_up, down_proj) and the MoE router GEMM (2-16 tokens) "
                                  "at <= 16 tokens on CUDA by our skinny GEMM instead of cuBLAS: 9B decode 5% "
                                  "faster at N = 1 and 4 (H200).")
    moe_router: str = _f("gemm", "MoE router on the GPU: gemm (a cuBLAS GEMM for the logits, then a top-k "
                                 "launch; logits rounded to the model dtype as in transformers; the faster one "
                                 "measured) or kernel (one fused launch: gate GEMV, softmax, top-k, shared-expert "
                                 "gate).",
                         choices=["kernel", "gemm"])
    pdl: bool | None = _f(None, "Programmatic dependent launch for deltaserve's Triton kernels: each kernel's launch "
                                "overlaps the previous kernel's execution (2-4% faster decode, H200). Default: on "
                                "where it can run (CUDA, compute capability >= 9.0, not Triton's interpreter).")
    pdl_late_trigger: bool | None = _f(None, "With PDL: the GEMM kernels (skinny GEMM, MoE experts) let the next "
                                             "kernel launch after their K loop instead of at their start. Default: "
                                             "only for a grid that fills over half of what the GPU holds at once "
                                             "(MoE experts: > 512 programs; docs/perf/2026-11-28g.md); "
                                             "--pdl-late-trigger / --no-pdl-late-trigger force it.")
    pdl_preload: bool = _f(False, "With PDL: kernels read before their wait what was written before the previous "
                                  "kernel started: the GDN decode kernel its state tile; the MoE down-projection "
                                  "its experts' weights where its w13 grid is small enough. Off: measured no "
                                  "faster (H100, 35B-A3B: -0.2% at N=1, +0.4-0.8% at N=2-16; "
                                  "docs/perf/2026-12-06.md).")
    skinny_prefetch: int = _f(0, "With PDL: the skinny GEMM asks for the first N columns of its weight rows in L2 "
                                 "before it waits on the previous kernel (0: off, the default; a power of two >= 64). "
                                 "After a norm kernel 128 columns saved 0.2-0.3 us a GEMM, between GEMMs it cost "
                                 "0.3-0.7; not measured end to end.")
    enforce_eager: bool = _f(False, "Never use CUDA graphs.")
    compile: bool = _f(False, "torch.compile each decoder layer (regional compilation).")
    layer_arg: str = _f("auto", "How custom ops name their layer: opaque (one compiled graph shared by all layers "
                                "of a kind; torch >= 2.11), string (a layer name: --compile recompiles every "
                                "layer; kept to measure that), auto (opaque where torch has it).",
                        choices=["auto", "opaque", "string"])
    cuda_graph_sizes: list[int] | None = _f(None, "Decode batch sizes to capture (default 1, 2, 4, 8, 16, 24, "
                                                  "... up to max_num_seqs).")
    prefill_cuda_graphs: bool = _f(True, "Also replay prefill steps of one fresh prompt of < 64 tokens from CUDA "
                                         "graphs (16, 32, 64 padded tokens): the host time of an eager prefill "
                                         "is most of a short prompt's time to first token (57 -> 11 ms on the "
                                         "35B-A3B shape, H200).")
    seed: int = _f(0, "Seed of the sampler's default generator and of dummy weights.")
    tensor_parallel_size: int = _f(1, "Processes/GPUs the model is split over (gloo on CPU, NCCL on GPU).")
    async_scheduling: bool | None = _f(None, "Schedule and launch step t+1 while the GPU runs step t: its "
                                             "decodes read step t's tokens on the device, and the host handles "
                                             "step t's outputs while step t+1 runs, so the GPU does not idle "
                                             "between steps (H100: -5.9% a 35B-A3B step at N=1, -2.2% on the "
                                             "9B). Outputs reach callers one step later; a request "
                                             "that stops on a token or string costs one dropped row. Default: "
                                             "on with a CUDA device and one rank (tensor parallelism needs "
                                             "every token on the host).")
    debug_step_delay_ms: float = _f(0.0, "TEST ONLY: sleep this long in every engine step (to check that "
                                         "benchmarks detect a slower server).")

    def __post_init__(self) -> None:
        self._check(self.dtype in DTYPES, "dtype", self.dtype, f"use one of {list(DTYPES)}")
        self._check(self.state_dtype in STATE_DTYPES, "state_dtype", self.state_dtype,
                    f"use one of {list(STATE_DTYPES)}")
        self._check(self.inproj in STRATEGIES, "inproj", self.inproj, f"use one of {list(STRATEGIES)}")
        self._check(self.load_format in ("auto", "safetensors", "dummy"), "load_format", self.load_format,
                    "use auto, safetensors or dummy")
        self._check(self.max_num_seqs >= 1, "max_num_seqs", self.max_num_seqs, "use a value >= 1")
        self._check(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", self.max_num_batched_tokens,
                    "use a value >= 1")
        self._check(self.max_model_len is None or self.max_model_len >= 1, "max_model_len", self.max_model_len,
                    "use a value >= 1 or leave it unset")
        self._check(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization",
                    self.gpu_memory_utilization, "use a fraction in (0, 1]")
        self._check(self.kv_cache_memory > 0, "kv_cache_memory", self.kv_cache_memory, "use a positive byte count")
        self._check(self.block_size in (8, 16, 32, 64, 128), "block_size", self.block_size,
                    "use 8, 16, 32, 64 or 128")
        self._check(self.moe_router in ("kernel", "gemm"), "moe_router", self.moe_router, "use kernel or gemm")
        self._check(self.layer_arg in ("auto", "opaque", "string"), "layer_arg", self.layer_arg,
                    "use auto, opaque or string")
        if self.layer_arg == "opaque":
            from deltaserve.layers.layer_ref import HAS_OPAQUE

            self._check(HAS_OPAQUE, "layer_arg", self.layer_arg,
                        f"torch {torch.__version__} has no opaque objects: use auto or string")
        self._check(self.tensor_parallel_size >= 1, "tensor_parallel_size", self.tensor_parallel_size,
                    "use a value >= 1")
        self._check(self.debug_step_delay_ms >= 0, "debug_step_delay_ms", self.debug_step_delay_ms, "use >= 0")
        if self.cuda_graph_sizes is not None:
            self._check(all(isinstance(s, int) and s >= 1 for s in self.cuda_graph_sizes), "cuda_graph_sizes",
                        self.cuda_graph_sizes, "use positive integers")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self._check(self.device == "cpu" or self.device.startswith("cuda"), "device", self.device,
                    "use auto, cpu, cuda or cuda:N")
        if self.device.startswith("cuda"):
            self._check(torch.cuda.is_available(), "device", self.device, "no CUDA device is visible: use cpu")
        if self.async_scheduling is None:
            self.async_scheduling = self._async_default()
        self._check(not self.async_scheduling or self.tensor_parallel_size == 1, "async_scheduling",
                    self.async_scheduling, "only rank 0 holds the sampled tokens: use --no-async-scheduling with "
                    "tensor_parallel_size > 1")
        from deltaserve.ops.pdl import unavailable

        why = unavailable(self.device)
        if self.pdl is None:
            self.pdl = why is None
        self._check(not self.pdl or why is None, "pdl", self.pdl, why)
        p = self.skinny_prefetch
        self._check(p == 0 or (p & (p - 1) == 0 and p >= 64), "skinny_prefetch", p,
                    "use 0 (off) or a power of two >= 64")
        for name in ("skinny_prefetch", "pdl_late_trigger", "pdl_preload"):
            self._check(getattr(self, name) in (None, False, 0) or self.pdl, name, getattr(self, name),
                        "it changes only how a kernel overlaps its neighbours under PDL: it needs PDL (a Hopper "
                        "GPU, without --no-pdl)")

    def _async_default(self) -> bool:
        """Async scheduling where it overlaps anything and every rank can read the samples: one CUDA rank."""
        return self.device.startswith("cuda") and self.tensor_parallel_size == 1

    @staticmethod
    def _check(ok: bool, name: str, value: Any, fix: str) -> None:
        if not ok:
            raise ConfigError(f"{name}={value!r} is invalid: {fix}")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        return DTYPES[self.dtype]

    @property
    def torch_state_dtype(self) -> torch.dtype:
        return STATE_DTYPES[self.state_dtype]

    def graph_sizes(self) -> list[int]:
        if self.enforce_eager or not self.device.startswith("cuda"):
            return []
        sizes = self.cuda_graph_sizes or [1, 2, 4, 8] + list(range(16, 1025, 8))
        return sorted({s for s in sizes if s <= self.max_num_seqs} | {min(self.max_num_seqs, max(sizes))})

    def prefill_graph_sizes(self) -> list[int]:
        """Padded token counts of the prefill graphs (``prefill_cuda_graphs``); none on the CPU or eager."""
        from deltaserve.layers.gdn import RECURRENT_PREFILL_MAX_TOKENS

        if not self.prefill_cuda_graphs or not self.graph_sizes():
            return []
        limit = min(RECURRENT_PREFILL_MAX_TOKENS, self.max_num_batched_tokens)
        return [s for s in (16, 32, 64) if s <= limit] or [limit]

    def non_defaults(self) -> dict[str, Any]:
        resolved = ("device", "pdl", "async_scheduling")  # set at init from the machine
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if getattr(self, f.name) != f.default and f.name not in resolved}
        if self.async_scheduling != self._async_default():
            out["async_scheduling"] = self.async_scheduling  # set against what this machine would default to
        return out

    # -- CLI ----------------------------------------------------------------------------------------
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
        """One flag per field, named like vLLM's (``--max-num-seqs``); defaults come from the dataclass."""
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            meta, flag = dict(f.metadata), "--" + f.name.replace("_", "-")
            meta["help"] = meta["help"].replace("%", "%%")  # argparse %-formats help strings
            if meta.get("positional"):
                parser.add_argument(f.name, nargs="?", default=f.default, help=meta["help"])
            elif f.type in ("bool", bool, "bool | None"):
                # --flag / --no-flag: a flag on by default can still be turned off
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                    help=meta["help"])
            elif f.name == "cuda_graph_sizes":
                parser.add_argument(flag, type=lambda s: [int(x) for x in s.split(",")], default=None,
                                    help=meta["help"] + " Comma-separated.")
            else:
                typ = {"int": int, "float": float, "int | None": int}.get(str(f.type), str)
                parser.add_argument(flag, type=typ, default=f.default, choices=meta.get("choices"),
                                    help=meta["help"])

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})
