"""Skinny-GEMM tiles against cuBLAS on the decode shapes that matter (GPU only).

For each weight shape, 24 distinct weights (so none stays in L2) are multiplied by an M-row input
inside one CUDA graph; µs per weight is the median replay over 24. Prints cuBLAS, the default
skinny config and the best of a small grid, each with its GB/s and its ratio to the bandwidth floor
(weight bytes / measured copy bandwidth). Out_proj shapes (few row tiles) also try split-K.

    python scripts/bench_gemv.py [--m 1,4,16,64] [--output gemv.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json

import torch
import torch.nn.functional as F
import triton

from deltaserve.bench.roofline import measure_copy_bandwidth
from deltaserve.layers.inproj_tune import time_graph
from deltaserve.ops import pdl
from deltaserve.ops.norms import rms_norm_gated, silu_and_mul
from deltaserve.ops.skinny_gemm import (
    GemvConfig,
    pick_config,
    skinny_gated_norm_linear,
    skinny_linear,
    skinny_silu_mul_linear,
)

SHAPES = {  # name: (N, K)
    "35B-A3B GDN in_proj": (12352, 2048),
    "35B-A3B GDN out_proj": (2048, 4096),
    "9B GDN in_proj": (12352, 4096),
    "9B GDN out_proj": (4096, 4096),
    "122B-A10B GDN in_proj": (20608, 3072),
    "9B MLP down_proj": (4096, 12288),
    "9B MLP gate_up_proj": (24576, 4096),
    "35B-A3B attention qkv_proj": (9216, 2048),
    "35B-A3B router + shared gate": (257, 2048),
}
GRID = [GemvConfig(bn, bk, w, s) for bn, bk, w, s in itertools.product((16, 32, 64), (128, 256, 512), (4,), (3, 5))]
GRID += [GemvConfig(64, bk, 8, 4) for bk in (128, 256)]
GRID += [GemvConfig(32, bk, 4, s, 2) for bk in (128, 256) for s in (3, 5)]
SPLIT_GRID = [GemvConfig(bn, bk, 4, s, sk) for bn, bk, s, sk in
              itertools.product((16, 32, 64), (128, 256), (3, 5), (2, 4, 8))]


def time_us(fn, weights, x, replays: int = 24) -> float:
    """Median µs per weight; inf for a config this card cannot run (too much shared memory)."""
    def run():
        for w in weights:
            fn(x, w)

    try:
        return time_graph(run, len(weights), replays)
    except triton.runtime.errors.OutOfResources:
        return float("inf")


PROLOGUE_SHAPES = {  # name: (N, K, prologue): the GEMMs --fuse-prologues changes
    "9B MLP down_proj (silu * up)": (4096, 12288, "silu"),
    "9B GDN out_proj (gated norm)": (4096, 4096, "norm"),
    "35B-A3B GDN out_proj (gated norm)": (2048, 4096, "norm"),
}


def prologue_fns(kind: str, k: int, nw: torch.Tensor):
    """(separate, fused) for one prologue: x is ``[M, 2K]``, [gate | up] or [o | z]."""
    if kind == "silu":
        return (lambda a, w: skinny_linear(silu_and_mul(a), w),
                lambda a, w, c=None: skinny_silu_mul_linear(a, w, c))

    def separate(a, w):
        o, z = a[:, :k].unflatten(1, (-1, nw.numel())), a[:, k:].unflatten(1, (-1, nw.numel()))
        return skinny_linear(rms_norm_gated(o, z, nw, 1e-6).flatten(1), w)

    return separate, lambda a, w, c=None: skinny_gated_norm_linear(a[:, :k], a[:, k:], nw, 1e-6, w, c)


def prologues(bw: float, ms: list[int]) -> list[dict]:
    """The op before the GEMM as its own launch, then inside the GEMM (pick_config's tile, and the best
    split-K tile of 128-column steps): µs per layer, so that a fusion's gain or loss shows apart from the
    end-to-end noise."""
    rows = []
    nw = torch.rand(128, device="cuda", dtype=torch.bfloat16) + 0.5
    for name, (n, k, kind) in PROLOGUE_SHAPES.items():
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(24)]
        separate, fused = prologue_fns(kind, k, nw)
        for m in ms:
            x = torch.randn(m, 2 * k, device="cuda", dtype=torch.bfloat16)
            sep_us, picked = time_us(separate, weights, x), time_us(fused, weights, x)
            tried = {c: time_us(functools.partial(fused, c=c), weights, x) for c in SPLIT_GRID if c.block_k == 128}
            best = min(tried, key=tried.get)
            floor_us = n * k * 2 / bw * 1e6
            rows.append({"shape": name, "N": n, "K": k, "M": m, "floor_us": floor_us, "separate_us": sep_us,
                         "fused_us": picked, "best_us": tried[best], "best_config": dataclasses.asdict(best)})
            print(f"{name:<34} M={m:<3} floor {floor_us:6.2f}  separate {sep_us:6.2f}  fused {picked:6.2f}  "
                  f"best fused {tried[best]:6.2f} {best}")
        del weights
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--m", default="1,4,16,64")
    p.add_argument("--output", default=None)
    p.add_argument("--shapes", default=None, help="only the shapes whose name contains one of these (comma-separated)")
    p.add_argument("--prologues", action="store_true", help="time --fuse-prologues' GEMMs (separate vs fused) only")
    p.add_argument("--split", action="store_true", help="try the split-K tiles on every shape (default: narrow ones)")
    p.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=False,
                   help="launch the skinny kernels with programmatic dependent launch, as the engine does on Hopper")
    args = p.parse_args()
    pdl.enable(args.pdl, "cuda")
    bw = measure_copy_bandwidth(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:.0f} GB/s; PDL {'on' if args.pdl else 'off'}")
    if args.prologues:
        rows = prologues(bw, [int(v) for v in args.m.split(",")])
        if args.output:
            with open(args.output, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "copy_bandwidth": bw, "rows": rows}, f, indent=2)
        return
    rows = []
    for name, (n, k) in SHAPES.items():
        if args.shapes and not any(w in name for w in args.shapes.split(",")):
            continue
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(24)]
        floor_us = n * k * 2 / bw * 1e6
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            cublas = time_us(F.linear, weights, x)
            default = time_us(lambda a, w: skinny_linear(a, w), weights, x)  # pick_config
            grid = GRID + (SPLIT_GRID if args.split or n <= 4096 or k >= 8192 else [])
            tried = {c: time_us(lambda a, w, c=c: skinny_linear(a, w, c), weights, x) for c in grid}
            best = min(tried, key=tried.get)
            row = {"shape": name, "N": n, "K": k, "M": m, "floor_us": floor_us, "cublas_us": cublas,
                   "default_us": default, "default_config": dataclasses.asdict(pick_config(m, n, k)), "best_us": tried[best], "best_config": dataclasses.asdict(best)}
            rows.append(row)
            print(f"{name:<24} M={m:<3} floor {floor_us:6.2f}  cuBLAS {cublas:6.2f} ({cublas / floor_us:.2f}x)  "
                  f"skinny picked {default:6.2f} ({default / floor_us:.2f}x)  best {tried[best]:6.2f} "
                  f"({tried[best] / floor_us:.2f}x) {best}")
        del weights
        torch.cuda.empty_cache()
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_bandwidth": bw, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
