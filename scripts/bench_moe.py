"""GPU micro-benchmark of a sparse-MoE block at decode sizes: the router kernel, fused_moe, and both.

Each measurement is one CUDA graph that runs the op once for each of ``--layers`` distinct layers
(distinct weights and routing), so that nothing a real decode step reads from HBM is served from L2;
the time printed is per layer. The floor is the bytes the op must read (the gate weight for the
router; every touched expert's w13 and w2 rows for the experts, the folded shared expert included)
over the measured copy bandwidth, and over the datasheet peak on an H100 / H200.

  PYTHONPATH=$PWD python scripts/bench_moe.py                          # 35B-A3B, the shipped tile tables
  PYTHONPATH=$PWD python scripts/bench_moe.py --sweep                  # + GEMV and router tile sweeps
  PYTHONPATH=$PWD python scripts/bench_moe.py --shape qwen3-next-80b --layers 4 --T 1,2,4,8

Columns: ``router`` / ``experts`` / ``block`` (router + experts in one graph: the decode MoE block at
tp=1, whose launches are 1 + 2 at T·(k+1) <= 40, else 1 + 4), ``eager`` (the same block as it was
before the router and the shared-expert fold: gate GEMM, torch routing, fused_moe over k slots, the
shared SwiGLU's three launches and the sigmoid gate), each with its fraction of the floor.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
import triton

from deltaserve.bench.roofline import measure_copy_bandwidth
from deltaserve.ops import fused_moe_triton as fmt
from deltaserve.ops.fused_moe import fused_moe
from deltaserve.ops.moe_router import RouterConfig, moe_route, moe_router, pick_router_config
from deltaserve.ops.norms import silu_and_mul

# name: (H, E, k, I); the shared expert is as wide as a routed one in all three.
SHAPES = {
    "qwen3.5-35b-a3b": (2048, 256, 8, 512),
    "qwen3.5-122b-a10b": (3072, 256, 8, 1024),
    "qwen3-next-80b": (2048, 512, 10, 512),
}
PEAK_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}


class Layer:
    """One MoE layer's weights at real shapes (bf16): expert E of w13/w2 is the shared expert."""

    def __init__(self, H: int, E: int, I: int, seed: int):
        g = torch.Generator(device="cuda").manual_seed(seed)

        def randn(*shape, scale):
            return (torch.randn(*shape, device="cuda", generator=g) * scale).bfloat16()

        self.w13 = randn(E + 1, 2 * I, H, scale=H**-0.5)
        self.w2 = randn(E + 1, H, I, scale=I**-0.5)
        self.w_gate = randn(E, H, scale=H**-0.5)
        self.w_shared_gate = randn(1, H, scale=H**-0.5)


def graph_us(fns: list) -> float:
    """Median time of one CUDA-graph replay that calls every fn once, divided by len(fns) (us)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:
            fn()  # compile and allocate outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    ms = triton.testing.do_bench(graph.replay, warmup=10, rep=100, return_mode="median")
    return 1e3 * ms / len(fns)


class Case:
    """One token count: per-layer inputs, the router's outputs, and the bytes each op must read."""

    def __init__(self, layers: list[Layer], T: int, k: int, seed: int):
        self.layers, self.T, self.k = layers, T, k
        g = torch.Generator(device="cuda").manual_seed(seed)
        H = layers[0].w_gate.shape[1]
        self.x = [torch.randn(T, H, device="cuda", generator=g).bfloat16() for _ in layers]
        self.routes = [moe_router(x, L.w_gate, k, True, L.w_shared_gate) for x, L in zip(self.x, layers)]
        L0 = layers[0]
        expert_bytes = 3 * L0.w2.shape[1] * L0.w2.shape[2] * L0.w2.element_size()
        touched = sum(ids.unique().numel() for _, ids in self.routes) / len(layers)
        self.expert_bytes = touched * expert_bytes
        self.router_bytes = (L0.w_gate.numel() + L0.w_shared_gate.numel()) * L0.w_gate.element_size()

    def router(self, config: RouterConfig | None = None) -> float:
        return graph_us([lambda x=x, L=L: moe_router(x, L.w_gate, self.k, True, L.w_shared_gate, config=config)
                         for x, L in zip(self.x, self.layers)])

    def experts(self, config: fmt.MoeConfig | None = None) -> float:
        return graph_us([lambda x=x, L=L, r=r: fused_moe(x, L.w13, L.w2, *r, config=config)
                         for x, L, r in zip(self.x, self.layers, self.routes)])

    def block(self) -> float:
        def run(x, L):
            return fused_moe(x, L.w13, L.w2, *moe_router(x, L.w_gate, self.k, True, L.w_shared_gate))

        return graph_us([lambda x=x, L=L: run(x, L) for x, L in zip(self.x, self.layers)])

    def eager_block(self) -> float:
        """The block before this change: ~15 launches at T=1."""

        def run(x, L):
            E = L.w_gate.shape[0]
            weights, ids = moe_route(F.linear(x, L.w_gate), self.k, True)
            routed = fused_moe(x, L.w13[:E], L.w2[:E], weights, ids)
            shared = F.linear(silu_and_mul(F.linear(x, L.w13[E])), L.w2[E])
            return routed + torch.sigmoid(F.linear(x, L.w_shared_gate)) * shared

        return graph_us([lambda x=x, L=L: run(x, L) for x, L in zip(self.x, self.layers)])


def frac(bytes_: float, us: float, bw: float) -> str:
    return f"{100 * bytes_ / bw / (us * 1e-6):3.0f}%"


def sweep_gemv(case: Case, bw: float, top: int) -> None:
    """Every GEMV tile combination below, fastest first (only the kernels' own time differs)."""
    H = case.layers[0].w_gate.shape[1]
    results = []
    for bn1, bk1, bn2, bk2, warps in itertools.product((2, 4, 8), (1024, 2048), (1, 2, 4), (256, 512), (4, 8)):
        if bk1 > triton.next_power_of_2(H):
            continue
        cfg = fmt.MoeConfig(16, bn1, bk1, bn2, bk2, num_warps=warps, num_stages=1, gemv=True)
        results.append((case.experts(cfg), cfg))
    results.sort(key=lambda r: r[0])
    table = fmt.pick_config(case.T * (case.k + 1), H, case.layers[0].w2.shape[2])
    print(f"  GEMV sweep at T={case.T} (table: {table})")
    for us, cfg in results[:top]:
        print(f"    {us:7.1f} us {frac(case.expert_bytes, us, bw)}  {cfg}")


def sweep_router(case: Case, top: int) -> None:
    E, H = case.layers[0].w_gate.shape
    results = []
    for be, bk, sk in itertools.product((16, 32), (128, 256, 512), (1, 2, 4, 8)):
        if sk * bk > H:
            continue
        cfg = RouterConfig(block_t=16, block_e=be, block_k=bk, split_k=sk)
        results.append((case.router(cfg), cfg))
    results.sort(key=lambda r: r[0])
    print(f"  router sweep at T={case.T} (table: {pick_router_config(case.T, E, H)})")
    for us, cfg in results[:top]:
        print(f"    {us:7.1f} us  {cfg}")


def pdl_ab(layers: list[Layer], Ts: list[int], k: int) -> None:
    """The experts and the whole block (router + experts) with PDL off, on with every kernel's trigger at
    its start, on with the trigger after the main loop, and on with ``--pdl-preload`` and every trigger
    early (w2 reads its weights before its wait; by grid size the engine's w13 triggers late at every
    decode size of the released shapes, and w2 then does not preload), interleaved forwards then
    backwards."""
    from deltaserve.ops import pdl

    variants = [("no PDL", False, None, False), ("early", True, False, False), ("late", True, True, False),
                ("preload", True, False, True)]
    print(f"{'T':>4} " + "  ".join(f"{v[0] + ' experts/block us':>26}" for v in variants))
    for T in Ts:
        case = Case(layers, T, k, seed=T)
        times = {v[0]: [] for v in variants}
        for name, on, late, preload in variants + variants[::-1]:
            pdl.enable(on, "cuda", late, preload)
            times[name].append((case.experts(), case.block()))
        pdl.enable(False, "cuda")
        cells = "  ".join(f"{sum(t[0] for t in ts) / 2:>12.2f} / {sum(t[1] for t in ts) / 2:>9.2f}"
                          for ts in times.values())
        print(f"{T:>4} {cells}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3.5-35b-a3b", choices=list(SHAPES))
    p.add_argument("--T", default="1,2,4,8,16,64", help="token counts")
    p.add_argument("--layers", type=int, default=8, help="distinct layers per graph (35B: 1.6 GB each)")
    p.add_argument("--sweep", action="store_true", help="also sweep GEMV tiles (T <= 4) and router tiles")
    p.add_argument("--top", type=int, default=5, help="rows per sweep")
    p.add_argument("--pdl-ab", action="store_true", help="only: PDL off / early trigger / late trigger / preload, "
                   "interleaved")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_moe times CUDA graphs and needs a CUDA device; none is visible")
    H, E, k, I = SHAPES[args.shape]
    layers = [Layer(H, E, I, seed) for seed in range(args.layers)]
    if args.pdl_ab:
        print(f"{torch.cuda.get_device_name()} {args.shape}: {args.layers} layers/graph, us per layer")
        pdl_ab(layers, [int(t) for t in args.T.split(",")], k)
        return 0
    bw = measure_copy_bandwidth("cuda")
    name = torch.cuda.get_device_name()
    peak = next((v for key, v in PEAK_BYTES_PER_S.items() if key in name), None)
    print(f"{name}: copy bandwidth {bw / 1e9:.0f} GB/s" + (f", peak {peak / 1e9:.0f} GB/s" if peak else ""))
    print(f"{args.shape}: H={H} E={E} k={k} I={I}, shared expert folded (k+1 slots), {args.layers} layers/graph")
    print("fractions: floor (bytes / copy bandwidth) over time"
          + ("; [peak]: the block's, at the datasheet peak" if peak else ""))
    print(f"{'T':>4} {'touched':>8} {'MB':>6} {'router us':>11} {'experts us':>15} {'block us':>15} {'eager us':>9}"
          f"{'  [peak]' if peak else ''}  experts config")
    for T in [int(t) for t in args.T.split(",")]:
        case = Case(layers, T, k, seed=T)
        r_us, x_us, b_us, e_us = case.router(), case.experts(), case.block(), case.eager_block()
        total = case.router_bytes + case.expert_bytes
        touched = case.expert_bytes / (3 * H * I * 2)
        peak_col = f"  [{frac(total, b_us, peak)}]" if peak else ""
        print(f"{T:>4} {touched:>8.1f} {case.expert_bytes / 1e6:>6.1f}"
              f" {r_us:>7.1f} {frac(case.router_bytes, r_us, bw)}"
              f" {x_us:>10.1f} {frac(case.expert_bytes, x_us, bw)} {b_us:>10.1f} {frac(total, b_us, bw)}"
              f" {e_us:>9.1f}{peak_col}  {fmt.pick_config(T * (k + 1), H, I)}")
        if args.sweep and T * (k + 1) <= 40:
            sweep_gemv(case, bw, args.top)
        if args.sweep and T <= 64:
            sweep_router(case, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
