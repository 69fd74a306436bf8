"""Skinny-GEMM tiles against cuBLAS on the decode shapes that matter (GPU only).

For each weight shape, 24 distinct weights (so none stays in L2) are multiplied by an M-row input
inside one CUDA graph; µs per weight is the median replay over 24. Prints cuBLAS, the default
skinny config and the best of a small grid, each with its GB/s and its ratio to the bandwidth floor
(weight bytes / measured copy bandwidth). Out_proj shapes (few row tiles) also try split-K.

``--norm`` adds the input-norm prologue's variants on the in_proj shapes (the norm kernel then the plain
GEMM; the norm in the prologue with and without a residual, with the residual stored inside the main
loop or in its own pass, with ``1 + g`` applied in the kernel or folded into w).

    python scripts/bench_gemv.py [--m 1,4,16,64] [--norm] [--output gemv.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json

import torch
import torch.nn.functional as F
import triton

from deltaserve.bench.roofline import measure_copy_bandwidth
from deltaserve.layers.inproj_tune import time_graph
from deltaserve.ops.norms import rms_norm
from deltaserve.ops.skinny_gemm import DEFAULT, GemvConfig, skinny_linear, skinny_norm_linear

SHAPES = {  # name: (N, K)
    "35B-A3B GDN in_proj": (12352, 2048),
    "35B-A3B GDN out_proj": (2048, 4096),
    "9B GDN in_proj": (12352, 4096),
    "9B GDN out_proj": (4096, 4096),
    "122B-A10B GDN in_proj": (20608, 3072),
}
GRID = [GemvConfig(bn, bk, w, s) for bn, bk, w, s in itertools.product((16, 32, 64), (128, 256, 512), (4,), (3, 5))]
GRID += [GemvConfig(64, bk, 8, 4) for bk in (128, 256)]
GRID += [GemvConfig(32, bk, 4, s, 2) for bk in (128, 256) for s in (3, 5)]
SPLIT_GRID = [GemvConfig(bn, bk, 4, s, sk) for bn, bk, s, sk in
              itertools.product((16, 32, 64), (128, 256), (3, 5), (2, 4, 8))]


def norm_variants(eps: float = 1e-6):
    """name -> fn(x, r, g, w): the ways to compute rmsnorm(x + r) @ w.T at decode."""
    return {
        "plain GEMM (no norm)": lambda x, r, g, w: skinny_linear(x, w),
        "norm kernel + GEMM": lambda x, r, g, w: skinny_linear(rms_norm(x, g, eps, r)[0], w),
        "prologue, no residual": lambda x, r, g, w: skinny_norm_linear(x, None, g, eps, w),
        "prologue, no residual, folded g": lambda x, r, g, w: skinny_norm_linear(x, None, None, eps, w),
        "prologue + residual, store in loop": lambda x, r, g, w: skinny_norm_linear(x, r, g, eps, w, res_in_loop=True),
        "prologue + residual, own pass": lambda x, r, g, w: skinny_norm_linear(x, r, g, eps, w),
        "prologue + residual, own pass, folded g": lambda x, r, g, w: skinny_norm_linear(x, r, None, eps, w),
    }


def time_us(fn, weights, x, replays: int = 24) -> float:
    """Median µs per weight; inf for a config this card cannot run (too much shared memory)."""
    def run():
        for w in weights:
            fn(x, w)

    try:
        return time_graph(run, len(weights), replays)
    except triton.runtime.errors.OutOfResources:
        return float("inf")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--m", default="1,4,16,64")
    p.add_argument("--norm", action="store_true", help="also time the input-norm prologue's variants")
    p.add_argument("--output", default=None)
    args = p.parse_args()
    bw = measure_copy_bandwidth(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:.0f} GB/s")
    rows = []
    for name, (n, k) in SHAPES.items():
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(24)]
        floor_us = n * k * 2 / bw * 1e6
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            cublas = time_us(F.linear, weights, x)
            default = time_us(lambda a, w: skinny_linear(a, w, DEFAULT), weights, x)
            grid = GRID + (SPLIT_GRID if n <= 4096 else [])
            tried = {c: time_us(lambda a, w, c=c: skinny_linear(a, w, c), weights, x) for c in grid}
            best = min(tried, key=tried.get)
            row = {"shape": name, "N": n, "K": k, "M": m, "floor_us": floor_us, "cublas_us": cublas,
                   "default_us": default, "best_us": tried[best], "best_config": dataclasses.asdict(best)}
            rows.append(row)
            print(f"{name:<24} M={m:<3} floor {floor_us:6.2f}  cuBLAS {cublas:6.2f} ({cublas / floor_us:.2f}x)  "
                  f"skinny default {default:6.2f} ({default / floor_us:.2f}x)  best {tried[best]:6.2f} "
                  f"({tried[best] / floor_us:.2f}x) {best}")
        if args.norm and "in_proj" in name:
            g = torch.randn(k, device="cuda", dtype=torch.bfloat16) * 0.1
            for m in (1, 16):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                r = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                for variant, fn in norm_variants().items():
                    us = time_us(lambda a, w, fn=fn, r=r, g=g: fn(a, r, g, w), weights, x)
                    rows.append({"shape": name, "N": n, "K": k, "M": m, "norm_variant": variant, "us": us,
                                 "floor_us": floor_us})
                    print(f"{name:<24} M={m:<3} {variant:<42} {us:7.2f} us ({us / floor_us:.2f}x the floor)")
        del weights
        torch.cuda.empty_cache()
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_bandwidth": bw, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
