"""``bench offline``: in-process decode throughput per batch size, against the memory roofline.

For each N: N requests with ``--input-len`` random prompt tokens decode ``--output-len`` tokens
(ignore_eos). Decode tok/s counts the tokens after each request's first one over the time from the
last first-token to the end, so prefill is excluded. After one short warm-up pass, each N is timed
``--repeats`` times in a row and the median pass is reported (every pass's ms/step is in the JSON):
a single pass of a few hundred milliseconds moves by a few percent with the host's load. The
roofline is N over the time the step's bytes (weights incl. touched experts, GDN state read+write,
KV read: ``bench/roofline.py``) take at the copy bandwidth measured on this device.

``--async-ab`` measures what async scheduling buys: the same engine times each N with it off and on,
passes interleaved in pairs, and reports the paired log-ratio interval (``stats.compare_paired``).
"""

from __future__ import annotations

import argparse
import json
import random
import time

from deltaserve.bench.env import environment, format_environment
from deltaserve.bench.roofline import decode_step_bytes, measure_copy_bandwidth
from deltaserve.bench.stats import compare_paired


def add_args(p: argparse.ArgumentParser) -> None:
    from deltaserve.config import EngineConfig

    EngineConfig.add_cli_args(p)
    p.add_argument("--preset", default=None, help="benchmark a make-model preset (config only, --load-format dummy)")
    p.add_argument("--layers", type=int, default=None, help="with --preset: override the layer count")
    p.add_argument("--batch", default="1,2,4,8,16", help="comma-separated batch sizes N")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed passes per N; the median is reported")
    p.add_argument("--async-ab", action="store_true",
                   help="time every N with async scheduling off and on, passes interleaved in this one process "
                        "(off, on, then on, off, ...): --repeats pairs; the table adds the synchronous ms/step and "
                        "the paired interval of async against it")
    p.add_argument("--output", default=None, help="write the results as JSON here")


def resolve_model(args: argparse.Namespace) -> None:
    """--preset: write a config-only model dir and load random weights on the device."""
    if args.preset is None:
        return
    import tempfile

    from deltaserve.models.make_model import make_model

    args.model = str(make_model(args.preset, tempfile.mkdtemp(prefix="deltaserve-bench-"), layers=args.layers,
                                no_weights=True))
    args.load_format = "dummy"


def run_batch(engine, n: int, input_len: int, output_len: int, seed: int) -> dict:
    from deltaserve.sampling import SamplingParams

    rng = random.Random(seed)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    vocab = min(engine.model_config.vocab_size, engine.tokenizer.vocab_size)
    reqs = [engine.make_request([rng.randrange(10, vocab) for _ in range(input_len)], params) for _ in range(n)]
    t0 = time.perf_counter()
    for r in reqs:
        engine.add_request(r)
    first_done = None
    while engine.has_unfinished():
        engine.step()
        if first_done is None and all(r.output_token_ids for r in reqs):
            first_done = time.perf_counter()
    end = time.perf_counter()
    steps = output_len - 1
    return {"n": n, "prefill_s": first_done - t0, "decode_s": end - first_done, "ms_per_step": 1e3 * (end - first_done) / steps,
            "decode_tok_s": n * steps / (end - first_done)}


def _median_pass(passes: list[dict], b, n: int, bw: float) -> dict:
    """The median pass (lower middle) with every pass's ms/step, against the roofline of ``b``'s bytes."""
    r = sorted(passes, key=lambda p: p["ms_per_step"])[(len(passes) - 1) // 2]
    r = {**r, "ms_per_step_passes": [p["ms_per_step"] for p in passes]}
    r.update(bytes_per_step=b.total, weight_bytes=b.weights, state_bytes=b.state, kv_bytes=b.kv,
             roofline_tok_s=n * bw / b.total)
    r["fraction"] = r["decode_tok_s"] / r["roofline_tok_s"]
    r["achieved_GBps"] = b.total / (r["ms_per_step"] / 1e3) / 1e9
    return r


def main(args: argparse.Namespace) -> int:
    from deltaserve.config import EngineConfig
    from deltaserve.engine.engine import LLMEngine
    from deltaserve.errors import ConfigError

    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        raise ConfigError(f"--batch {args.batch!r}: give comma-separated batch sizes, e.g. 1,2,4") from None
    for name, value, low in (("--batch", min(batches), 1), ("--input-len", args.input_len, 1),
                             ("--output-len", args.output_len, 2), ("--repeats", args.repeats, 1)):
        if value < low:
            raise ConfigError(f"{name} {value} is too small: use a value >= {low}")
    resolve_model(args)
    cfg = EngineConfig.from_cli_args(args)
    if args.async_ab and cfg.tensor_parallel_size > 1:
        raise ConfigError("--async-ab: async scheduling needs tensor_parallel_size 1 (only rank 0 holds the "
                          "sampled tokens); drop --async-ab or --tensor-parallel-size")
    if max(batches) > cfg.max_num_seqs:
        cfg.max_num_seqs = max(batches)
    t0 = time.perf_counter()
    engine = LLMEngine(cfg)
    startup_s = time.perf_counter() - t0
    bw = measure_copy_bandwidth(engine.runner.device)
    mc = engine.model_config
    dbytes, sbytes = engine.runner.dtype.itemsize, cfg.torch_state_dtype.itemsize
    rows = []
    for n in batches:
        run_batch(engine, n, args.input_len, min(16, args.output_len), seed=n)  # warm-up
        b = decode_step_bytes(mc, n, args.input_len + args.output_len // 2, dbytes, sbytes, cfg.tensor_parallel_size)

        def timed(mode: bool | None = None, n: int = n) -> dict:
            """One pass; ``mode``: async scheduling off / on for it (the engine is idle between passes)."""
            if mode is not None:
                engine.async_scheduling = mode
            return run_batch(engine, n, args.input_len, args.output_len, seed=1000 + n)

        if args.async_ab:
            passes = {False: [], True: []}
            for i in range(args.repeats):
                for mode in (False, True) if i % 2 == 0 else (True, False):
                    passes[mode].append(timed(mode))
            engine.async_scheduling = cfg.async_scheduling
            r = _median_pass(passes[True], b, n, bw)
            r["sync"] = _median_pass(passes[False], b, n, bw)
            r["async_vs_sync"] = compare_paired(r["sync"]["ms_per_step_passes"], r["ms_per_step_passes"],
                                                higher_is_better=False).to_dict()
        else:
            r = _median_pass([timed() for _ in range(args.repeats)], b, n, bw)
        rows.append(r)
    env = environment()
    print(format_environment(env))
    print(f"model: {mc.architecture} ({args.preset or cfg.model or 'the built-in demo model'}), {mc.num_hidden_layers} layers, dtype {engine.runner.dtype}, "
          f"state {cfg.state_dtype}, inproj {cfg.inproj}, graphs {'off' if not engine.runner.graphs else 'on'}")
    graphs = ""
    if cfg.compile:
        from deltaserve.engine.compile import compiled_graph_count

        graphs = f", {compiled_graph_count()} compiled graphs"
    print(f"engine start-up {startup_s:.1f} s{graphs}; copy bandwidth: {bw / 1e9:.0f} GB/s (read + write); "
          f"median of {args.repeats} passes per N")
    if args.async_ab:
        print(f"async scheduling off and on, {args.repeats} interleaved pairs per N: the columns before 'sync' are "
              "the async passes' median")
    print(f"{'N':>4} {'ms/step':>9} {'tok/s':>9} {'GB/step':>8} {'GB/s':>7} {'roofline':>9} {'fraction':>8}  "
          "ms/step range" + (f"  {'sync ms':>8} {'sync fr.':>8}  {'async vs sync [95% CI]':>26}  verdict"
                             if args.async_ab else ""))
    for r in rows:
        line = (f"{r['n']:>4} {r['ms_per_step']:>9.3f} {r['decode_tok_s']:>9.1f} {r['bytes_per_step'] / 1e9:>8.3f} "
                f"{r['achieved_GBps']:>7.0f} {r['roofline_tok_s']:>9.1f} {100 * r['fraction']:>7.1f}%  "
                f"{min(r['ms_per_step_passes']):.3f}-{max(r['ms_per_step_passes']):.3f}")
        if args.async_ab:
            c = r["async_vs_sync"]
            delta = f"{c['delta_pct']:+.2f}% [{c['delta_pct_low']:+.2f}, {c['delta_pct_high']:+.2f}]"
            line += (f"  {r['sync']['ms_per_step']:>8.3f} {100 * r['sync']['fraction']:>7.1f}%  {delta:>26}  "
                     + c["verdict"].replace("A faster", "sync faster").replace("B faster", "async faster"))
        print(line)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"environment": env, "copy_bandwidth": bw, "startup_s": startup_s, "config": {k: str(v) for k, v in vars(cfg).items()},
                       "results": rows}, f, indent=2)
    return 0
