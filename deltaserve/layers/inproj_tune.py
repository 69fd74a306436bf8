"""Timing the three in_proj strategies under CUDA graphs (``inproj=auto`` and ``bench layer``).

Each measurement runs the in_proj of *every* GDN layer once, inside one CUDA graph -- distinct
weights per layer, as in a real step, so no layer's weight is still in L2 when its turn comes --
and reports the median replay time divided by the number of layers.

``inproj=auto`` and ``bench layer`` time the projection alone (the seed thread's question). Running
the decoder layer's input norm inside the skinny GEMM's prologue was tried and measured 2.5-5x slower
than the norm kernel then the GEMM (docs/perf/2026-11-28d.md), so the norm stays its own launch.
"""

from __future__ import annotations

import logging

import torch

from deltaserve.layers.inproj import FUSED_GEMV, GEMV_MAX_TOKENS, InProjPlan, project

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
CONCRETE = ("serial", "dual", "fused", FUSED_GEMV)


def time_graph(run, per: int = 1, replays: int = 20) -> float:
    """Capture ``run()`` in one CUDA graph (after two warm-up calls off the capture) and return the
    median replay time in microseconds divided by ``per``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (cuBLAS handles, the aux stream, Triton compiles)
        run()
        run()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / per)
    del graph
    return sorted(times)[len(times) // 2]


@torch.inference_mode()
def time_inproj(layers: list, m: int, strategy: str, replays: int = 20) -> float:
    """Median microseconds per layer for ``m`` tokens through every layer's in_proj."""
    w = layers[0].in_proj.weight
    x = torch.randn(m, w.shape[1], device=w.device, dtype=w.dtype)

    def run() -> None:
        for layer in layers:
            project(x, layer.in_proj.weight, layer.qkvz_size, strategy, layer.layer)

    return time_graph(run, len(layers), replays)


def tune_inproj(model, plan: InProjPlan, max_tokens: int) -> dict[int, dict[str, float]]:
    """Measure every bucket up to ``max_tokens``, then dispatch each bucket to its fastest strategy."""
    from triton.runtime.errors import OutOfResources

    layers = model.gdn_layers()
    results: dict[int, dict[str, float]] = {}
    for m in BUCKETS:
        if m > max(max_tokens, 1) and results:
            break
        results[m] = {}
        for s in CONCRETE:
            if s == FUSED_GEMV and m > GEMV_MAX_TOKENS:
                continue
            try:
                results[m][s] = time_inproj(layers, m, s)
            except OutOfResources as e:  # the skinny GEMM's tiles may not fit a small-shared-memory card
                if s != FUSED_GEMV:
                    raise
                logger.info("inproj=auto: fused_gemv at %d tokens does not fit this GPU (%s); not used", m, e)
    plan.set_table({m: min(t, key=t.get) for m, t in results.items()})
    lines = [f"{m:>6} " + " ".join(f"{t[s]:8.2f}" if s in t else "       -" for s in CONCRETE)
             + f"  -> {min(t, key=t.get)}" for m, t in results.items()]
    logger.info("inproj=auto (us per layer, CUDA graphs)\n"
                " tokens   serial     dual    fused  fused_gemv\n%s",
                "\n".join(lines))
    return results
