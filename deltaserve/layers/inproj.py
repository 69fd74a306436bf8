"""The GDN input projection, three ways (the question of the seed thread).

Every GDN layer owns ONE merged weight ``W [k, k, v, v, Hv, Hv] x H`` (per TP rank). Row blocks of a
row-major weight are themselves contiguous weights, so the three strategies share it at no memory
cost and compute the same function by construction:

* ``serial``: ``x @ W[:qkvz].T`` then ``x @ W[qkvz:].T`` -- vLLM's default, two GEMMs;
* ``dual``:   the same two GEMMs, the small ``ba`` one on a process-wide auxiliary CUDA stream,
  fenced by two events per layer (``deltaserve::gdn_in_proj``, a custom op so compile sees one node);
* ``fused``:  one GEMM over the whole ``W``, then a split;
* ``auto``:   per token-count bucket, whichever measured fastest at start-up
  (:func:`deltaserve.layers.inproj_tune.tune_inproj`); on the CPU it is ``fused``. On CUDA ``auto``
  also times ``fused_gemv`` for buckets of at most 64 tokens: the same single GEMM computed by our
  skinny-GEMM kernel (``ops/skinny_gemm.py``) instead of cuBLAS.
"""

from __future__ import annotations

import bisect

import torch
import torch.nn.functional as F

from deltaserve.layers.layer_ref import LayerRef, define_layer_op, layer_op
from deltaserve.layers.linear import skinny_fits, skinny_linear_op

STRATEGIES = ("serial", "dual", "fused", "auto")  # what a user may ask for
FUSED_GEMV = "fused_gemv"  # fused, by the skinny-GEMM kernel: only ``auto`` picks it, for few tokens
GEMV_MAX_TOKENS = 64  # the skinny-GEMM kernel's limit (ops.skinny_gemm.MAX_M; a test keeps them equal)


_aux_stream: torch.cuda.Stream | None = None


def aux_stream() -> torch.cuda.Stream:
    """The one auxiliary stream every layer's ``ba`` GEMM runs on (created on first use)."""
    global _aux_stream
    if _aux_stream is None:
        _aux_stream = torch.cuda.Stream()
    return _aux_stream


def _dual_impl(x: torch.Tensor, ref: LayerRef) -> tuple[torch.Tensor, torch.Tensor]:
    gdn = ref.module
    w_qkvz, w_ba = gdn.inproj_weights()
    if not x.is_cuda:  # no second stream off CUDA: the serial order computes the same thing
        return F.linear(x, w_qkvz), F.linear(x, w_ba)
    main, aux = torch.cuda.current_stream(), aux_stream()
    start, done = gdn.inproj_events()
    start.record(main)
    qkvz = F.linear(x, w_qkvz)
    with torch.cuda.stream(aux):
        aux.wait_event(start)
        ba = F.linear(x, w_ba)
        done.record(aux)
    main.wait_event(done)
    ba.record_stream(main)  # allocated on aux, consumed on main: keep the allocator honest
    return qkvz, ba


def _dual_fake(x: torch.Tensor, ref: LayerRef) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape[0], ref.sizes["qkvz"]), x.new_empty(x.shape[0], ref.sizes["ba"])


define_layer_op("gdn_in_proj", "Tensor x", "(Tensor, Tensor)", _dual_impl, _dual_fake)


class InProjPlan:
    """Which strategy serves which token count. ``auto`` fills ``table`` at start-up."""

    def __init__(self, strategy: str = "fused"):
        if strategy not in STRATEGIES:
            raise ValueError(f"inproj={strategy!r} is not one of {STRATEGIES}")
        self.strategy = strategy
        self.bounds: list[int] = []  # bucket upper bounds, ascending
        self.choices: list[str] = []

    def set_table(self, table: dict[int, str]) -> None:
        self.bounds = sorted(table)
        self.choices = [table[b] for b in self.bounds]

    def choose(self, num_tokens: int) -> str:
        if self.strategy != "auto":
            return self.strategy
        if not self.bounds:
            return "fused"
        i = min(bisect.bisect_left(self.bounds, num_tokens), len(self.bounds) - 1)
        return self.choices[i]


def skinny_serves(strategy: str, x: torch.Tensor) -> bool:
    """Whether our skinny GEMM computes this projection: ``fused_gemv`` chosen, few rows, on CUDA."""
    return strategy == FUSED_GEMV and skinny_fits(x, GEMV_MAX_TOKENS)


def project(x: torch.Tensor, weight: torch.Tensor, qkvz_size: int, strategy: str, arg) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [T, H]`` -> ``(qkvz [T, 2k+2v], ba [T, 2Hv])`` using ``strategy``."""
    if skinny_serves(strategy, x):
        y = skinny_linear_op(x, weight)  # the same one GEMM, by our decode kernel
        return y[:, :qkvz_size], y[:, qkvz_size:]
    if strategy in ("fused", FUSED_GEMV):
        y = F.linear(x, weight)  # [T, 2k+2v+2Hv]: one GEMM
        return y[:, :qkvz_size], y[:, qkvz_size:]
    if strategy == "serial":
        return F.linear(x, weight[:qkvz_size]), F.linear(x, weight[qkvz_size:])
    return layer_op("gdn_in_proj", arg)(x, arg)
