"""``bench layer``: the GDN in_proj micro-benchmark (serial / dual / fused per token count).

Builds ``--layers`` GDN layers at a preset's real shapes with distinct random weights, and times each
strategy over all of them inside one CUDA graph (``layers/inproj_tune.py``); ``gemv`` is the fused GEMM
computed by our skinny-GEMM kernel (M <= 64). The floor is the bytes one layer's projection must move
(its weight, the input and the outputs) at the copy bandwidth of this card.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

from deltaserve.bench.env import environment, format_environment
from deltaserve.bench.roofline import measure_copy_bandwidth


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="qwen3.5-35b-a3b", help="make-model preset whose GDN shapes to use")
    p.add_argument("--layers", type=int, default=36, help="distinct GDN layers timed per replay")
    p.add_argument("--m", default="1,2,4,8,16,32,64,256,2048", help="token counts")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--replays", type=int, default=30)
    p.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=None,
                   help="programmatic dependent launch for our kernels, as the engine runs them (default: on where "
                        "the GPU has it, compute capability 9.0+)")
    p.add_argument("--gemv-tiles", default=None, metavar="JSON",
                   help="a scripts/bench_gemv.py --output file: also time the skinny GEMM with that sweep's best tile "
                        "for each (N, K, M) it covers (column gemv*), beside pick_config's (column gemv)")
    p.add_argument("--output", default=None, help="write the results as JSON here")


def build_layers(preset: str, n: int, dtype: torch.dtype) -> list:
    from deltaserve.layers.gdn import GatedDeltaNet
    from deltaserve.layers.inproj import InProjPlan
    from deltaserve.models.config import load_model_config
    from deltaserve.models.make_model import make_model

    cfg = load_model_config(make_model(preset, tempfile.mkdtemp(prefix="deltaserve-layer-"), layers=4,
                                       no_weights=True))
    plan = InProjPlan("fused")
    layers = []
    with torch.device("cuda"):
        for i in range(n):
            layer = GatedDeltaNet(cfg, f"bench.{i}.linear_attn", plan).to(dtype)
            torch.nn.init.normal_(layer.in_proj.weight, std=0.02)
            layers.append(layer)
    return layers


def sweep_tiles(path: str) -> dict:
    """``{(N, K, M): GemvConfig}``: the best tile of every row of a ``bench_gemv.py --output`` file."""
    from deltaserve.errors import ConfigError
    from deltaserve.ops.skinny_gemm import GemvConfig

    try:
        with open(path) as f:
            rows = json.load(f)["rows"]
        return {(r["N"], r["K"], r["M"]): GemvConfig(**r["best_config"]) for r in rows if "best_config" in r}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--gemv-tiles {path}: not a bench_gemv.py --output file with best tiles ({e})") from e


def time_with_tiles(layers: list, m: int, tiles: dict, replays: int) -> float | None:
    """``fused_gemv`` with the sweep's tile for this shape and M in place of pick_config's (None: not covered)."""
    from deltaserve.layers.inproj_tune import time_inproj
    from deltaserve.ops import skinny_gemm

    n, k = layers[0].in_proj.weight.shape
    tile = tiles.get((n, k, m))
    if tile is None:
        return None
    picked = skinny_gemm.pick_config
    skinny_gemm.pick_config = lambda M, N, K: tile if (N, K, M) == (n, k, m) else picked(M, N, K)
    try:
        return time_inproj(layers, m, "fused_gemv", replays)
    finally:
        skinny_gemm.pick_config = picked


def main(args: argparse.Namespace) -> int:
    from deltaserve.errors import ConfigError
    from deltaserve.layers.inproj_tune import CONCRETE, GEMV_MAX_TOKENS, time_inproj
    from deltaserve.ops import pdl

    if not torch.cuda.is_available():
        raise ConfigError("bench layer times CUDA graphs and needs a CUDA device; none is visible")
    why = pdl.unavailable("cuda")
    if args.pdl and why:
        raise ConfigError(f"--pdl: {why}")
    pdl.enable(why is None if args.pdl is None else args.pdl, "cuda")
    tiles = sweep_tiles(args.gemv_tiles) if args.gemv_tiles else {}
    dtype = getattr(torch, args.dtype)
    layers = build_layers(args.preset, args.layers, dtype)
    bw = measure_copy_bandwidth("cuda")
    w = layers[0].in_proj.weight
    rows = []
    for m in [int(x) for x in args.m.split(",")]:
        floor_bytes = w.numel() * w.element_size() + m * (w.shape[1] + w.shape[0]) * w.element_size()
        floor_us = floor_bytes / bw * 1e6
        t = {s: time_inproj(layers, m, s, args.replays) for s in CONCRETE if s != "fused_gemv" or m <= GEMV_MAX_TOKENS}
        if tiles and m <= GEMV_MAX_TOKENS and (tiled := time_with_tiles(layers, m, tiles, args.replays)) is not None:
            t["fused_gemv_tiles"] = tiled
        rows.append({"m": m, **t, "floor_us": floor_us, "bytes": floor_bytes})
    env = environment()
    print(format_environment(env))
    print(f"preset {args.preset}: in_proj {tuple(w.shape)} {args.dtype}, {args.layers} distinct layers per graph; "
          f"copy bandwidth {bw / 1e9:.0f} GB/s; PDL {'on' if pdl.enabled() else 'off'}")
    print(f"{'M':>6} {'serial':>8} {'dual':>8} {'fused':>8} {'gemv':>8}{'   gemv*' if tiles else ''} {'floor':>7}  "
          f"best-fused/floor  fused/serial{'  gemv*/floor' if tiles else ''}")
    for r in rows:
        gemv, tiled = r.get("fused_gemv"), r.get("fused_gemv_tiles")
        best = min(r["fused"], gemv or r["fused"])
        gemv_s = f"{gemv:8.2f}" if gemv else "       -"
        tiled_s = (f"{tiled:8.2f}" if tiled else "       -") if tiles else ""
        tiled_ratio = f"{tiled / r['floor_us']:>13.2f}" if tiled else ""
        print(f"{r['m']:>6} {r['serial']:>8.2f} {r['dual']:>8.2f} {r['fused']:>8.2f} {gemv_s}{tiled_s} "
              f"{r['floor_us']:>7.2f}  {best / r['floor_us']:>16.2f}  {r['fused'] / r['serial']:>12.3f}{tiled_ratio}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"environment": env, "preset": args.preset, "copy_bandwidth": bw, "pdl": pdl.enabled(),
                       "results": rows}, f, indent=2)
    return 0
