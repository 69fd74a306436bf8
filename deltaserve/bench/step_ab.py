"""``bench step-ab``: two GDN in_proj strategies on the whole decode step, interleaved in one process.

``bench ab`` compares two servers over HTTP; on one GPU its trials differ by 2-4% (server starts,
clocks, host jitter), too much to tell ``serial`` from ``fused`` at N = 2 or 16. Here one engine
captures the decode step once per strategy (``--a``, ``--b``: a ``DecodeGraphs`` set each, both kept
alive) and times them alternately on the same GPU: trial i times A then B (even i) or B then A (odd
i), so drift common to a pair cancels, and a steady drift does not favour the side that always runs
second. A sample is the mean ms/step over ``--replays`` consecutive steps; the ``--trials`` pairs per
N give the paired log-ratio interval of ``stats.compare_paired``.

What it measures: the GPU's decode step as the engine replays it (CUDA events around graph replays;
on the CPU, wall time around eager steps). What it does not: host scheduling, sampling and HTTP --
none depends on the in_proj strategy. Every row decodes at position 1 over one cached token (the
values ``DecodeGraphs.capture`` records with) on the scratch KV block, storing nothing; attention
over a short context, which the in_proj does not depend on. Each row has its own GDN state slot,
taken from the engine's free slots (no request runs) and handed back at the end, so the step reads
and writes the state bytes of a real N-batch; rows sharing the scratch slot would serve the state from
L2 and understate the step. The rows decode distinct random tokens, so an MoE routes them to
different experts as in a real N-batch (identical rows would all touch the same k experts: in the
first H100 run, before this, the step at N=16 took 2.97 ms against 7.90 in ``bench offline``). Both
graph sets are captured in this process, on the same weights.

``auto`` is the engine's own per-bucket choice, tuned at start-up: the engine starts with
``--inproj auto`` when either side is ``auto``, else with ``--inproj fused`` (the strategy of the
engine does not matter otherwise: each side forces its own).

``--a-flags`` / ``--b-flags`` give a side engine options of its own, limited to those read when a
kernel is launched (``config.KERNEL_OPTIONS``: PDL, its trigger and preload, the skinny-GEMM choices
and prefetch), which a graph keeps from its capture. So the same strategy under two kernel options
(``--a fused --b fused --b-flags=--pdl-preload``) is an A/B of that option on the whole step, in the
same process, where ``bench offline`` runs in separate passes differ by 2-6%.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import time
from collections.abc import Callable, Iterator

import torch

from deltaserve.bench.env import environment, format_environment
from deltaserve.bench.offline import resolve_model
from deltaserve.bench.roofline import decode_step_bytes, measure_copy_bandwidth
from deltaserve.bench.stats import compare_paired, mean
from deltaserve.layers.inproj import FUSED_GEMV

STRATEGIES = ("serial", "dual", "fused", FUSED_GEMV, "auto")
CONTEXT_LEN = 1  # tokens cached before the step: every row decodes at position 1


def add_args(p: argparse.ArgumentParser) -> None:
    from deltaserve.config import EngineConfig

    EngineConfig.add_cli_args(p)
    p.add_argument("--preset", default=None,
                   help="benchmark a make-model preset (config only, --load-format dummy)")
    p.add_argument("--layers", type=int, default=None, help="with --preset: override the layer count")
    p.add_argument("--a", default="serial", help=f"strategy A, one of {', '.join(STRATEGIES)} (auto: the engine's "
                                                 "tuned per-bucket choice; --inproj is then auto, else fused)")
    p.add_argument("--b", default="fused", help="strategy B (the same choices); deltas are B against A")
    p.add_argument("--a-flags", default="", help="engine options of side A alone, from those read at kernel "
                                                 "launch (e.g. --a-flags=--no-pdl); the others are shared")
    p.add_argument("--b-flags", default="", help="engine options of side B alone (e.g. --b-flags=--pdl-preload)")
    p.add_argument("--batch", default="1,2,4,8,16", help="comma-separated batch sizes N")
    p.add_argument("--trials", type=int, default=30, help="A/B pairs per N (alternating which runs first)")
    p.add_argument("--replays", type=int, default=20, help="decode steps timed per sample")
    p.add_argument("--output", default=None, help="write the results as JSON here")


def check_args(args: argparse.Namespace) -> list[int]:
    """Validate before the engine loads; returns the batch sizes, ascending."""
    from deltaserve.errors import ConfigError

    for flag, value in (("--a", args.a), ("--b", args.b)):
        if value not in STRATEGIES:
            raise ConfigError(f"{flag} {value!r} is not an in_proj strategy: "
                              f"use one of {', '.join(STRATEGIES)}")
    try:
        batches = sorted({int(b) for b in args.batch.split(",")})
    except ValueError:
        raise ConfigError(f"--batch {args.batch!r}: give comma-separated batch sizes, e.g. 1,2,4") from None
    for flag, value, low in (("--batch", batches[0], 1), ("--trials", args.trials, 2),
                             ("--replays", args.replays, 1)):
        if value < low:
            raise ConfigError(f"{flag} {value} is too small: use a value >= {low}")
    if args.tensor_parallel_size != 1:
        raise ConfigError(f"--tensor-parallel-size {args.tensor_parallel_size}: bench step-ab times one process "
                          "on one device; use 1")
    return batches


class _SideFlagParser(argparse.ArgumentParser):
    """Parses one side's ``--a-flags`` / ``--b-flags``; a bad flag is a ConfigError naming the side."""

    def __init__(self, side: str):
        super().__init__(prog=f"--{side}-flags", add_help=False)
        self.side = side

    def error(self, message: str):
        from deltaserve.errors import ConfigError

        raise ConfigError(f"--{self.side}-flags: {message}")


def side_config(args: argparse.Namespace, side: str, flags: str):
    """The engine config of one side: the shared ``args`` with ``flags`` on top, which may change only
    ``config.KERNEL_OPTIONS`` (the rest is fixed when the engine starts)."""
    from deltaserve.config import KERNEL_OPTIONS, EngineConfig
    from deltaserve.errors import ConfigError

    parser = _SideFlagParser(side)
    EngineConfig.add_cli_args(parser)
    given = {k: v for k, v in vars(parser.parse_args(shlex.split(flags))).items() if v != parser.get_default(k)}
    fixed = [name for name in given if name not in KERNEL_OPTIONS]
    if fixed:
        allowed = ", ".join("--" + o.replace("_", "-") for o in KERNEL_OPTIONS)
        raise ConfigError(f"--{side}-flags {flags!r} changes {', '.join(fixed)}, fixed when the engine starts: "
                          f"a side may only change the options read at kernel launch ({allowed}); give the "
                          "others once, for both sides")
    return EngineConfig.from_cli_args(argparse.Namespace(**{**vars(args), **given}))


@contextlib.contextmanager
def kernel_options(runner, cfg) -> Iterator[None]:
    """Kernels launch with ``cfg``'s kernel options inside the block, with the engine's own afterwards."""
    runner.apply_kernel_options(cfg)
    try:
        yield
    finally:
        runner.apply_kernel_options(runner.cfg)


@contextlib.contextmanager
def forced_strategy(plan, strategy: str) -> Iterator[None]:
    """Every GDN layer projects with ``strategy`` inside the block; the plan's own strategy (and its
    tuned table, which ``auto`` reads) is back afterwards, also when the block raises."""
    previous = plan.strategy
    plan.strategy = strategy
    try:
        yield
    finally:
        plan.strategy = previous


def row_tokens(n: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """``n`` random token ids (fixed by ``seed``), so that the rows of a step are different inputs."""
    return torch.randint(min(10, vocab_size - 1), vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


def decode_at_position_one(graphs, slots: list[int], tokens: torch.Tensor) -> None:
    """Row i: token ``tokens[i]`` at position 1 over one cached token (as ``capture`` records), GDN state
    slot ``slots[i]``, reading the scratch KV block and storing nothing (``slot_mapping = -1``)."""
    graphs._reset_padding(0)
    graphs.input_ids.copy_(tokens)
    graphs.positions.fill_(1)
    graphs.context_lens.fill_(1)
    graphs.seq_lens.fill_(2)
    graphs.state_slots.copy_(torch.tensor(slots, dtype=torch.int32))


def build_step(runner, strategy: str, cfg, sizes: list[int], slots: list[int], tokens: torch.Tensor):
    """A ``DecodeGraphs`` set with ``strategy`` forced and ``cfg``'s kernel options: captured on CUDA,
    run eagerly on the CPU."""
    from deltaserve.engine.cuda_graph import DecodeGraphs

    graphs = DecodeGraphs(runner.model, sizes, runner.max_blocks_per_seq, runner.block_size,
                          runner.states.scratch_slot, runner.kv.scratch_block, runner.device)
    if runner.device.type == "cuda":
        with forced_strategy(runner.plan, strategy), kernel_options(runner, cfg):
            graphs.capture()
    decode_at_position_one(graphs, slots, tokens)
    return graphs


def step_timer(runner, graphs, strategy: str, cfg, replays: int) -> Callable[[int], float]:
    """``sample(n)``: mean ms per decode step of ``n`` rows over ``replays`` consecutive steps."""
    if runner.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def sample(n: int) -> float:
            graph = graphs.graphs[n]
            start.record()
            for _ in range(replays):
                graph.replay()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / replays
    else:
        @torch.inference_mode()
        def sample(n: int) -> float:
            # eager steps read the plan and the kernel options at every layer
            with forced_strategy(runner.plan, strategy), kernel_options(runner, cfg):
                t0 = time.perf_counter()
                for _ in range(replays):
                    graphs._forward(n)
                return 1e3 * (time.perf_counter() - t0) / replays
    return sample


def run_pairs(samplers: dict[str, Callable[[int], float]], n: int, trials: int) -> dict[str, list[float]]:
    """One untimed warm-up sample per side, then ``trials`` pairs: A B in even trials, B A in odd ones."""
    for sample in samplers.values():
        sample(n)
    ms: dict[str, list[float]] = {side: [] for side in samplers}
    for i in range(trials):
        for side in ("A", "B") if i % 2 == 0 else ("B", "A"):
            ms[side].append(samplers[side](n))
    return ms


def main(args: argparse.Namespace) -> int:
    from deltaserve.config import EngineConfig
    from deltaserve.engine.engine import LLMEngine
    from deltaserve.errors import ConfigError

    batches = check_args(args)
    resolve_model(args)
    args.inproj = "auto" if "auto" in (args.a, args.b) else "fused"
    args.enforce_eager = True  # the engine's own graphs are not the ones timed here
    args.max_num_seqs = max(args.max_num_seqs, batches[-1])
    cfg = EngineConfig.from_cli_args(args)
    configs = {"A": side_config(args, "a", args.a_flags), "B": side_config(args, "b", args.b_flags)}
    if args.a == args.b and configs["A"] == configs["B"]:
        raise ConfigError(f"--a and --b are both {args.a!r} with the same options: give two different "
                          "strategies, or different --a-flags / --b-flags")
    engine = LLMEngine(cfg)
    runner, on_gpu = engine.runner, engine.runner.device.type == "cuda"
    bw = measure_copy_bandwidth(runner.device)
    sides = {"A": args.a, "B": args.b}
    slots = [runner.states.alloc() for _ in range(batches[-1])]
    tokens = row_tokens(batches[-1], engine.model_config.vocab_size)
    sets = {}
    try:
        sets = {side: build_step(runner, s, configs[side], batches, slots, tokens) for side, s in sides.items()}
        samplers = {side: step_timer(runner, sets[side], s, configs[side], args.replays) for side, s in sides.items()}
        results = []
        for n in batches:
            ms = run_pairs(samplers, n, args.trials)
            results.append({"n": n, "a_ms": ms["A"], "b_ms": ms["B"]})
    finally:
        if on_gpu:
            for graphs in sets.values():
                graphs.release()
        for slot in slots:
            runner.states.free(slot)
    mc, dbytes, sbytes = engine.model_config, runner.dtype.itemsize, cfg.torch_state_dtype.itemsize
    for r in results:
        r["comparison"] = compare_paired(r["a_ms"], r["b_ms"], higher_is_better=False).to_dict()
        floor_ms = 1e3 * decode_step_bytes(mc, r["n"], CONTEXT_LEN, dbytes, sbytes).total / bw
        r.update(a_mean_ms=mean(r["a_ms"]), b_mean_ms=mean(r["b_ms"]), floor_ms=floor_ms)
        r.update(a_fraction=floor_ms / r["a_mean_ms"], b_fraction=floor_ms / r["b_mean_ms"])
    env = environment()
    print(format_environment(env))
    print(f"model: {mc.architecture} ({args.preset or cfg.model or 'the built-in demo model'}), "
          f"{mc.num_hidden_layers} layers, dtype {runner.dtype}, state {cfg.state_dtype}; engine inproj {cfg.inproj}")
    a, b = (f"{s}{f' ({flags})' if flags else ''}" for s, flags in ((args.a, args.a_flags), (args.b, args.b_flags)))
    print(f"A = {a}, B = {b}: {'CUDA-graph replays' if on_gpu else 'eager steps'}, {args.trials} "
          f"interleaved pairs of {args.replays} steps per N")
    print(f"roof: the step's bytes at the copy bandwidth ({bw / 1e9:.0f} GB/s, read + write) over its time")
    print(f"{'N':>4} {'A ms/step':>10} {'B ms/step':>10} {'B vs A [95% CI]':>26}  {'A roof':>6} {'B roof':>6}  "
          "verdict")
    for r in results:
        c = r["comparison"]
        delta = f"{c['delta_pct']:+.2f}% [{c['delta_pct_low']:+.2f}, {c['delta_pct_high']:+.2f}]"
        print(f"{r['n']:>4} {r['a_mean_ms']:>10.3f} {r['b_mean_ms']:>10.3f} {delta:>26}  "
              f"{100 * r['a_fraction']:>5.1f}% {100 * r['b_fraction']:>5.1f}%  {c['verdict']}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"environment": env, "a": args.a, "b": args.b, "a_flags": args.a_flags,
                       "b_flags": args.b_flags, "trials": args.trials,
                       "replays": args.replays, "context_len": CONTEXT_LEN, "copy_bandwidth": bw,
                       "config": {k: str(v) for k, v in vars(cfg).items()}, "results": results}, f, indent=2)
    return 0
