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
import itertools
import json

import torch
import torch.nn.functional as F
import triton

from deltaserve.bench.roofline import measure_copy_bandwidth
from deltaserve.layers.inproj_tune import time_graph
from deltaserve.ops import pdl
from deltaserve.ops.skinny_gemm import GemvConfig, launch_grid, pick_config, skinny_linear

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
# 128-row tiles for 32-64 tokens: every program re-reads the whole [M, K] input from L2 (at M=64 and
# 32-row tiles, 386 x 256 KB = 100 MB of L2 reads for a 50 MB weight on the 35B-A3B in_proj), so wider
# tiles cut that traffic, and split-K keeps enough programs. Tried with --wide.
WIDE_GRID = [GemvConfig(128, bk, 8, s, sk) for bk, s, sk in itertools.product((64, 128), (3, 4), (1, 2))]
# 256-row tiles read x a quarter as often as 64-row ones (12.5 MB at M=64 on the 35B-A3B in_proj), at the
# price of half the programs of the 128-row tile (49: each SM then streams ~1 MB of weights).
WIDE_GRID += [GemvConfig(256, 64, 8, s) for s in (3, 4)]
# --swap: the weight tile as the MMA's row side (Triton then emits Hopper's wgmma from shared memory), with
# the 32-row tile of the non-swapped kernel as the reference.
SWAP_GRID = [GemvConfig(32, 128, 4, 3)] + [GemvConfig(bn, bk, w, s, swap=True) for bn, bk, w, s in
                                           [(64, 128, 4, 3), (64, 128, 4, 4), (64, 64, 4, 4), (128, 64, 4, 3),
                                            (128, 64, 8, 3), (128, 128, 4, 3), (128, 128, 8, 3)]]
# ... and split K two ways: a 12352-row weight in 64- or 128-row tiles is 193 or 97 programs for 132 SMs, so
# some SMs stream twice what others do; the 128-row tile read x half as often (the L2 traffic above).
SWAP_GRID += [GemvConfig(bn, bk, w, s, 2, swap=True) for bn, bk, w, s in
              [(64, 128, 4, 3), (128, 64, 4, 4), (128, 64, 8, 4), (128, 128, 8, 3)]]

# --group: `group` adjacent row tiles per program against one load of the tokens, so that a row tile need not
# be a power of two: 3 x 32 = 96 rows is 129 programs for a 12,352-row in_proj, one per SM of a 132-SM card,
# each reading the [M, K] input once (33 MB of L2 reads at M=64, against 49 MB for 64-row tiles, and no SM
# streaming twice what another does, as with the 193 programs of 64 rows). The 128-row tile of the 64-token
# sweeps is the reference.
GROUP_GRID = [GemvConfig(128, 128, 8, 4)]
GROUP_GRID += [GemvConfig(bn, 128, 4, s, group=g) for bn, g in [(16, 3), (16, 4), (32, 2), (32, 3), (32, 4), (64, 2),
                                                               (64, 3)] for s in (3, 4)]
GROUP_GRID += [GemvConfig(bn, bk, w, 4, group=g) for bn, bk, w, g in [(32, 128, 8, 3), (32, 128, 8, 4),
                                                                      (64, 128, 8, 2), (32, 64, 4, 3), (32, 64, 4, 4)]]
GROUP_GRID += [GemvConfig(bn, 128, 4, s, group=g, swap=True) for bn, g in [(64, 2), (64, 3), (32, 3)] for s in (3, 4)]
# Filling the gap between two launches (docs/perf/2026-12-07.md: at 64 tokens each GEMM costs a constant ~3.3 us
# over its streaming time). With 2 stages a grouped program leaves room on its SM for one program of the next
# GEMM, so under the early PDL trigger the next grid is resident at once and its L2 weight prefetch (before its
# wait) runs while this one drains, instead of after it.
GROUP_GRID += [GemvConfig(32, 128, 4, 2, late_trigger=False, prefetch_k=pf, group=3) for pf in (0, 256, 512)]
GROUP_GRID += [GemvConfig(32, 128, 4, 3, late_trigger=False, prefetch_k=256, group=3),
               GemvConfig(64, 128, 4, 2, late_trigger=False, prefetch_k=256, group=2)]

# --overlap: the next GEMM's weight stream started under this one's drain. A 2-stage (or 64-wide, 4-stage) grouped
# program takes 80 KB of shared memory at 64 tokens, so an SM holds it and one program of the next GEMM; with
# 3 x 32 rows the 35B-A3B / 9B in_proj is 129 programs, one per SM. The trigger fires `trigger_left` K steps
# before the end of the loop ("late": after it; "start": after the wait), the next grid lands beside this one
# and asks for the first prefetch_k columns of its weights in L2 before its wait. The picked tile and the
# 3-stage grouped tile (one program per SM, no room beside it) are the controls.
_TRIGGERS = {"start": dict(late_trigger=False), "late": dict(late_trigger=True),
             **{f"left{n}": dict(late_trigger=True, trigger_left=n) for n in (1, 2, 4)}}
OVERLAP_GRID = [GemvConfig(32, 128, 4, 2, group=3, prefetch_k=pf, **_TRIGGERS[t])
                for t in ("start", "late", "left1", "left2", "left4") for pf in (0, 256)]
OVERLAP_GRID += [GemvConfig(32, 64, 4, 4, group=3, prefetch_k=pf, **_TRIGGERS[t])
                 for t in ("late", "left2", "left4") for pf in (0, 256)]
OVERLAP_GRID += [GemvConfig(32, 128, 4, 2, group=3, prefetch_k=512, **_TRIGGERS["left2"]),
                 GemvConfig(32, 128, 4, 3, group=3, **_TRIGGERS["late"]),
                 GemvConfig(32, 128, 4, 3, group=3, prefetch_k=256, **_TRIGGERS["left2"])]

# --persistent: one or two programs per SM, each looping over row tiles in one flattened, pipelined loop (its next
# tile streams while it stores the last; no second wave). Deep pipelines, since one program is all an SM streams.
PERSISTENT_GRID = [GemvConfig(bn, bk, w, s, persistent=p, swap=sw) for bn, bk, w, s, p, sw in [
    (32, 128, 4, 4, 1, False), (32, 128, 4, 5, 1, False), (32, 128, 4, 6, 1, False), (32, 128, 4, 4, 2, False),
    (32, 64, 4, 6, 1, False), (32, 64, 4, 8, 1, False), (32, 64, 4, 4, 2, False),
    (64, 128, 4, 3, 1, False), (64, 128, 4, 4, 1, False), (64, 128, 4, 3, 2, False), (64, 128, 8, 4, 1, False),
    (16, 128, 4, 6, 1, False), (64, 128, 4, 3, 1, True), (64, 128, 4, 4, 1, True), (64, 64, 4, 6, 1, True),
    (128, 64, 8, 4, 1, True)]]
# ... and the plain 128-column, 4-warp tiles above, also with each PDL trigger forced
PERSISTENT_GRID += [GemvConfig(bn, 128, 4, s, persistent=p, late_trigger=late) for bn, s, p in
                    [(32, 4, 1), (32, 5, 1), (32, 6, 1), (32, 4, 2), (64, 3, 1), (64, 4, 1)] for late in (False, True)]

# --tma: the operands fetched by Hopper's TMA (bulk tensor copies, zero-filled past the edges) instead of cp.async:
# the picked tiles and their neighbours in depth, K step and warps, plain and swapped.
TMA_GRID = [GemvConfig(bn, bk, w, s, swap=sw, tma=True) for bn, bk, w, s, sw in [
    (32, 128, 4, 3, False), (32, 128, 4, 4, False), (32, 128, 4, 5, False), (32, 64, 4, 4, False),
    (32, 64, 4, 6, False), (64, 128, 4, 3, False), (64, 128, 4, 4, False), (64, 64, 4, 4, False),
    (64, 64, 4, 6, False), (64, 128, 8, 4, False), (128, 64, 8, 3, False), (128, 64, 8, 4, False),
    (64, 128, 4, 3, True), (64, 128, 4, 4, True), (64, 64, 4, 6, True), (128, 64, 8, 3, True), (128, 64, 8, 4, True),
    (128, 128, 8, 3, True)]]


def time_us(fn, weights, x, replays: int = 24) -> float:
    """Median µs per weight; inf for a config this card cannot run (too much shared memory)."""
    def run():
        for w in weights:
            fn(x, w)

    try:
        return time_graph(run, len(weights), replays)
    except triton.runtime.errors.OutOfResources:
        return float("inf")


def cases(args: argparse.Namespace):
    """``(name, N, K, M, weights, x)`` for every selected shape and M; each shape's 24 weights are freed
    before the next shape's are made."""
    for name, (n, k) in SHAPES.items():
        if args.shapes and not any(w in name for w in args.shapes.split(",")):
            continue
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(24)]
        for m in (int(v) for v in args.m.split(",")):
            yield name, n, k, m, weights, torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        del weights
        torch.cuda.empty_cache()


def save(args: argparse.Namespace, bw: float, rows: list[dict]) -> None:
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_bandwidth": bw, "rows": rows}, f, indent=2)


def pdl_ab(args: argparse.Namespace) -> None:
    """The picked tile with and without PDL, interleaved twice, with its grid size in programs."""
    bw = measure_copy_bandwidth(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:.0f} GB/s; "
          f"{torch.cuda.get_device_properties(0).multi_processor_count} SMs")
    rows = []
    for name, n, k, m, weights, x in cases(args):
        cfg = pick_config(m, n, k)
        times = {False: [], True: []}
        for on in (False, True, False, True):
            pdl.enable(on, "cuda")
            times[on].append(time_us(lambda a, w: skinny_linear(a, w), weights, x))
        pdl.enable(False, "cuda")
        n_tiles, split_k, _ = launch_grid(n, k, cfg)
        rows.append({"shape": name, "N": n, "K": k, "M": m, "config": dataclasses.asdict(cfg),
                     "programs": n_tiles * split_k, "floor_us": n * k * 2 / bw * 1e6, "no_pdl_us": times[False],
                     "pdl_us": times[True]})
        print(f"{name:<28} M={m:<3} {n_tiles * split_k:>5} programs  no PDL {times[False][0]:6.2f} "
              f"{times[False][1]:6.2f}  PDL {times[True][0]:6.2f} {times[True][1]:6.2f}")
    save(args, bw, rows)


# (name, PDL, late trigger, prefetch columns) for --chain-ab; "start/0" is what the engine runs now.
CHAIN_VARIANTS = [("no PDL", False, False, 0), ("start/0", True, False, 0), ("late/0", True, True, 0),
                  ("start/128", True, False, 128), ("late/128", True, True, 128), ("late/256", True, True, 256),
                  ("late/512", True, True, 512)]


def chain_ab(args: argparse.Namespace) -> None:
    """The picked tile with PDL off, on as the engine runs it, and with a late trigger and/or an L2 weight
    prefetch before the wait, in a chain of 24 distinct weights (each GEMM's tail meets the next one's
    start), interleaved forwards then backwards. ``--with-norm`` puts our RMSNorm kernel before every GEMM
    (the engine's order for the in_proj): the GEMM's input then comes from a short kernel."""
    from deltaserve.ops.norms import rms_norm

    bw = measure_copy_bandwidth(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:.0f} GB/s; chain of 24 weights"
          f"{', RMSNorm before each GEMM' if args.with_norm else ''}")
    rows = []
    for name, n, k, m, weights, x in cases(args):
        base = dataclasses.replace(pick_config(m, n, k), tma=False)  # the prefetch is a cp.async-kernel option
        gamma = torch.zeros(k, device="cuda", dtype=torch.bfloat16)
        times = {v[0]: [] for v in CHAIN_VARIANTS}
        for variant in CHAIN_VARIANTS + CHAIN_VARIANTS[::-1]:
            label, on, late, pf = variant
            cfg = dataclasses.replace(base, late_trigger=late, prefetch_k=pf)
            pdl.enable(on, "cuda")
            if args.with_norm:
                fn = lambda a, w, c=cfg, g=gamma: skinny_linear(rms_norm(a, g, 1e-6), w, c)  # noqa: E731
            else:
                fn = lambda a, w, c=cfg: skinny_linear(a, w, c)  # noqa: E731
            times[label].append(time_us(fn, weights, x))
        pdl.enable(False, "cuda")
        n_tiles, split_k, _ = launch_grid(n, k, base)
        floor_us = n * k * 2 / bw * 1e6
        rows.append({"shape": name, "N": n, "K": k, "M": m, "config": dataclasses.asdict(base),
                     "programs": n_tiles * split_k, "floor_us": floor_us, "with_norm": args.with_norm,
                     "us": times})
        cells = "  ".join(f"{lab} {sum(t) / 2:6.2f}" for lab, t in times.items())
        print(f"{name:<28} M={m:<3} {n_tiles * split_k:>5} programs floor {floor_us:6.2f}  {cells}")
    save(args, bw, rows)


def fit_k(args: argparse.Namespace) -> None:
    """Split a GEMM's time into a per-launch constant and a streaming rate: the picked tile of a 12,352-row
    weight (the 35B-A3B / 9B in_proj rows, so the grid stays 193-386 programs) at K = 512 ... 8192, PDL on,
    24 distinct weights per CUDA graph, and per M the least-squares line ``t = c + bytes / rate``. A rate
    near the copy bandwidth says the K loop streams well, and ``c`` is what a launch costs whatever its
    bytes: the fill before the first MMA, the drain after the last, the output store. At 64 tokens the
    in_proj sweep put ``c`` at 3.3 µs on an H100 (docs/perf/2026-12-07.md)."""
    import numpy as np

    pdl.enable(args.pdl, "cuda")
    bw = measure_copy_bandwidth(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:.0f} GB/s; PDL {'on' if args.pdl else 'off'}")
    n, ks, rows = 12352, (512, 1024, 2048, 4096, 8192), []
    for k in ks:
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(24)]
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            us = time_us(lambda a, w: skinny_linear(a, w), weights, x)
            rows.append({"M": m, "N": n, "K": k, "bytes": n * k * 2, "us": us,
                         "config": dataclasses.asdict(pick_config(m, n, k))})
        del weights
        torch.cuda.empty_cache()
    fits = []
    for m in sorted({r["M"] for r in rows}):
        pts = [r for r in rows if r["M"] == m]
        b, t = np.array([r["bytes"] for r in pts], dtype=float), np.array([r["us"] for r in pts])
        slope, const = np.polyfit(b, t, 1)  # us per byte, us
        resid = t - (const + slope * b)
        fits.append({"M": m, "constant_us": const, "rate_bytes_per_s": 1e6 / slope,
                     "rate_of_copy_bw": 1e6 / slope / bw, "max_residual_us": float(abs(resid).max())})
        print(f"M={m:<3} " + "  ".join(f"K={r['K']} {r['us']:6.2f}" for r in pts) +
              f"  ->  {const:5.2f} us + bytes / {1e6 / slope / 1e12:.3f} TB/s ({1e6 / slope / bw:.1%} of copy), "
              f"max residual {abs(resid).max():.2f} us")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_bandwidth": bw, "rows": rows, "fits": fits},
                      f, indent=2)


def copy_fit(args: argparse.Namespace) -> None:
    """The same fit for a plain device-to-device copy (torch's), in the same harness: a chain of 24 copies
    between distinct buffers in one CUDA graph, 6.25 ... 100 MB read per copy. Its constant is what one
    launch of a bandwidth-bound kernel that moves those bytes costs on this card, before any GEMM; its
    rate the card's copy bandwidth, read plus written."""
    import numpy as np

    bw = measure_copy_bandwidth(torch.device("cuda"))
    rows = []
    for mb in (6.25, 12.5, 25, 50, 100):
        n = int(mb * 2**20) // 2
        src = [torch.randn(n, device="cuda", dtype=torch.bfloat16) for _ in range(24)]
        dst = [torch.empty_like(t) for t in src]

        def run(pairs=tuple(zip(src, dst))):
            for a, b in pairs:
                b.copy_(a)

        rows.append({"read_bytes": 2 * n, "us": time_graph(run, 24, 24)})
        del src, dst, run
        torch.cuda.empty_cache()
    b = np.array([2 * r["read_bytes"] for r in rows], dtype=float)  # read + written
    t = np.array([r["us"] for r in rows])
    slope, const = np.polyfit(b, t, 1)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:.0f} GB/s (2 GiB copy)")
    print("  ".join(f"{r['read_bytes'] / 2**20:g} MB {r['us']:6.2f}" for r in rows) +
          f"  ->  {const:5.2f} us + bytes / {1e6 / slope / 1e12:.3f} TB/s ({1e6 / slope / bw:.1%} of the 2 GiB copy), "
          f"max residual {abs(t - const - slope * b).max():.2f} us")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_bandwidth": bw, "rows": rows,
                       "constant_us": const, "rate_bytes_per_s": 1e6 / slope}, f, indent=2)


def occupancy(args: argparse.Namespace) -> None:
    """The picked tile of every shape and M as compiled: registers per thread, shared memory per program,
    the programs one SM can hold by each, and the grid against what the card holds at once."""
    import deltaserve.ops.skinny_gemm as sg

    compiled, real = [], sg._skinny_gemm_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(*a, **kw):
                compiled.append((grid, kw, real[grid](*a, **kw)))
                return compiled[-1][2]
            return launch

    sg._skinny_gemm_kernel = Recorder()
    props = triton.runtime.driver.active.utils.get_device_properties(torch.cuda.current_device())
    sms = props["multiprocessor_count"]
    print(f"{torch.cuda.get_device_name()}: {sms} SMs, {props}")
    rows = []
    for name, _n, _k, m, weights, x in cases(args):
        skinny_linear(x, weights[0])
        torch.cuda.synchronize()
        grid, kw, kern = compiled[-1]
        if not hasattr(kern, "n_regs"):
            raise SystemExit(f"this Triton's launch returned {type(kern).__name__}, not the compiled kernel")
        warps, shared, regs = kern.metadata.num_warps, kern.metadata.shared, kern.n_regs
        by_smem = sg.SMEM_PER_SM // (shared + 1024)  # 1 KB reserved per program
        by_regs = 65536 // (((regs * 32 + 255) // 256) * 256 * warps)
        per_sm = min(by_smem, by_regs, 64 // warps, 32)
        programs = grid[0] * grid[1]
        rows.append({"shape": name, "M": m, "programs": programs, "num_warps": warps, "shared": shared,
                     "regs": regs, "per_sm": per_sm, "waves": programs / (per_sm * sms),
                     "late_trigger": kw["LATE_TRIGGER"]})
        print(f"{name:<28} M={m:<3} {programs:>5} programs  {warps} warps  {regs:>3} regs  {shared:>6} B smem  "
              f"-> {per_sm} per SM (smem {by_smem}, regs {by_regs}): {programs / (per_sm * sms):.2f} waves  "
              f"late={kw['LATE_TRIGGER']}")
    sg._skinny_gemm_kernel = real
    save(args, 0.0, rows)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--m", default="1,4,16,64")
    p.add_argument("--output", default=None)
    p.add_argument("--shapes", default=None, help="only the shapes whose name contains one of these (comma-separated)")
    p.add_argument("--split", action="store_true", help="try the split-K tiles on every shape (default: narrow ones)")
    p.add_argument("--wide", action="store_true", help="also try 128-row tiles (8 warps, split-K 1 or 2)")
    p.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=False,
                   help="launch the skinny kernels with programmatic dependent launch, as the engine does on Hopper")
    p.add_argument("--pdl-ab", action="store_true", help="only the picked tile, PDL off / on / off / on (interleaved) "
                   "per shape and M: does PDL slow a grid of several waves?")
    p.add_argument("--swap", action="store_true", help="only the swapped (y^T = w x^T) tiles and one reference tile")
    p.add_argument("--group", action="store_true", help="only the grouped tiles (several row tiles per program) "
                   "and the 128-row reference tile")
    p.add_argument("--overlap", action="store_true", help="only the tiles that start the next GEMM's weight stream "
                   "under this one's drain (2-stage grouped tiles, trigger K steps before the end, L2 prefetch) and "
                   "the picked tile, each timed twice (forwards, then backwards) and listed")
    p.add_argument("--persistent", action="store_true", help="only the persistent tiles (one or two programs per "
                   "SM looping over row tiles) and the picked tile, each timed twice (forwards, then backwards)")
    p.add_argument("--tma", action="store_true", help="only the TMA tiles (bulk tensor copies instead of cp.async) "
                   "and the picked tile with and without TMA, each timed twice (forwards, then backwards)")
    p.add_argument("--copy-fit", action="store_true", help="only: the per-launch constant and the rate of a plain "
                   "copy in the same harness (24 copies of 6.25 ... 100 MB in one CUDA graph)")
    p.add_argument("--late", action="store_true", help="with --pdl: try every tile with the early and the late "
                   "PDL trigger")
    p.add_argument("--occupancy", action="store_true", help="only: the picked tiles' registers, shared memory and "
                   "waves")
    p.add_argument("--chain-ab", action="store_true", help="only the picked tile: PDL off, on, and on with a late "
                   "trigger and/or an L2 weight prefetch before the wait (interleaved), per shape and M")
    p.add_argument("--with-norm", action="store_true", help="--chain-ab: our RMSNorm kernel before every GEMM")
    p.add_argument("--fit-k", action="store_true", help="only: the picked tile of a 12352-row weight at K = 512 ... "
                   "8192, and per M the fit t = constant + bytes / rate (the per-launch cost and the streaming rate)")
    args = p.parse_args()
    if args.occupancy:
        return occupancy(args)
    if args.chain_ab:
        return chain_ab(args)
    if args.pdl_ab:
        return pdl_ab(args)
    if args.fit_k:
        return fit_k(args)
    if args.copy_fit:
        return copy_fit(args)
    pdl.enable(args.pdl, "cuda")
    bw = measure_copy_bandwidth(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:.0f} GB/s; PDL {'on' if args.pdl else 'off'}")
    rows = []
    for name, n, k, m, weights, x in cases(args):
        floor_us = n * k * 2 / bw * 1e6
        cublas = time_us(F.linear, weights, x)
        default = time_us(lambda a, w: skinny_linear(a, w), weights, x)  # pick_config
        grid = GRID + (SPLIT_GRID if args.split or n <= 4096 or k >= 8192 else []) + (WIDE_GRID if args.wide else [])
        if args.swap or args.group or args.overlap or args.persistent or args.tma:  # only these: checked, then timed
            grid = list(SWAP_GRID if args.swap else GROUP_GRID if args.group else OVERLAP_GRID if args.overlap
                        else PERSISTENT_GRID if args.persistent else TMA_GRID)
            if args.persistent:
                grid.append(pick_config(m, n, k))
            if args.tma:  # the picked tile both ways
                grid += [dataclasses.replace(pick_config(m, n, k), tma=t) for t in (False, True)]
            if args.overlap:  # the picked tile (with its own trigger) and its late-trigger variants as controls
                base = dataclasses.replace(pick_config(m, n, k), tma=False)  # trigger_left: cp.async kernel only
                grid += [base] + [dataclasses.replace(base, late_trigger=True, trigger_left=t, prefetch_k=pf)
                                  for t, pf in ((0, 0), (2, 256), (4, 256))]
            ref = F.linear(x, weights[0]).float()
            for c in list(grid):
                try:
                    err = ((skinny_linear(x, weights[0], c).float() - ref).norm() / ref.norm()).item()
                except triton.runtime.errors.OutOfResources:  # more shared memory than this card has
                    grid.remove(c)
                    continue
                if not err < 1e-2:
                    raise SystemExit(f"{c}: relative error {err:.2e} against F.linear")
        if args.late:  # every tile with the PDL trigger at the start and after the K loop
            grid = [dataclasses.replace(c, late_trigger=late) for c in grid for late in (False, True)]
        grid = list(dict.fromkeys(grid))
        tried = {c: time_us(lambda a, w, c=c: skinny_linear(a, w, c), weights, x) for c in grid}
        if args.overlap or args.persistent or args.tma:  # a second pass in reverse order, averaged: drift over the sweep cancels
            for c in grid[::-1]:
                tried[c] = (tried[c] + time_us(lambda a, w, c=c: skinny_linear(a, w, c), weights, x)) / 2
            for c, us in sorted(tried.items(), key=lambda kv: kv[1]):
                print(f"    {us:6.2f} ({us / floor_us:.3f}x)  {c}")
        best = min(tried, key=tried.get)
        rows.append({"shape": name, "N": n, "K": k, "M": m, "floor_us": floor_us, "cublas_us": cublas,
                     "default_us": default, "default_config": dataclasses.asdict(pick_config(m, n, k)),
                     "best_us": tried[best], "best_config": dataclasses.asdict(best),
                     "tried": [[dataclasses.asdict(c), us] for c, us in tried.items()]})
        print(f"{name:<24} M={m:<3} floor {floor_us:6.2f}  cuBLAS {cublas:6.2f} ({cublas / floor_us:.2f}x)  "
              f"skinny picked {default:6.2f} ({default / floor_us:.2f}x)  best {tried[best]:6.2f} "
              f"({tried[best] / floor_us:.2f}x) {best}")
    save(args, bw, rows)


if __name__ == "__main__":
    main()
