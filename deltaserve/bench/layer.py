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
    dtype = getattr(torch, args.dtype)
    layers = build_layers(args.preset, args.layers, dtype)
    bw = measure_copy_bandwidth("cuda")
    w = layers[0].in_proj.weight
    rows = []
    for m in [int(x) for x in args.m.split(",")]:
        floor_bytes = w.numel() * w.element_size() + m * (w.shape[1] + w.shape[0]) * w.element_size()
        floor_us = floor_bytes / bw * 1e6
        t = {s: time_inproj(layers, m, s, args.replays) for s in CONCRETE if s != "fused_gemv" or m <= GEMV_MAX_TOKENS}
        rows.append({"m": m, **t, "floor_us": floor_us, "bytes": floor_bytes})
    env = environment()
    print(format_environment(env))
    print(f"preset {args.preset}: in_proj {tuple(w.shape)} {args.dtype}, {args.layers} distinct layers per graph; "
          f"copy bandwidth {bw / 1e9:.0f} GB/s; PDL {'on' if pdl.enabled() else 'off'}")
    print(f"{'M':>6} {'serial':>8} {'dual':>8} {'fused':>8} {'gemv':>8} {'floor':>7}  best-fused/floor  fused/serial")
    for r in rows:
        gemv = r.get("fused_gemv")
        best = min(r["fused"], gemv or r["fused"])
        print(f"{r['m']:>6} {r['serial']:>8.2f} {r['dual']:>8.2f} {r['fused']:>8.2f} "
              f"{f'{gemv:8.2f}' if gemv else '       -'} {r['floor_us']:>7.2f}  "
              f"{best / r['floor_us']:>16.2f}  {r['fused'] / r['serial']:>12.3f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"environment": env, "preset": args.preset, "copy_bandwidth": bw, "pdl": pdl.enabled(),
                       "results": rows}, f, indent=2)
    return 0
