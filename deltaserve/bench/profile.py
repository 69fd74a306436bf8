"""``bench profile``: where one decode step's time goes, per op class, against the bytes it must move.

``--prefill-tokens N`` profiles prefill steps instead (one fresh N-token prompt each, to its first
token: the engine's share of TTFT); the wall time per step, measured unprofiled, against the kernel
time shows how much of it is host-side.

Runs ``--batch`` requests into steady decode, then profiles ``--steps`` decode steps eagerly (no CUDA
graphs, so every kernel is visible; kernel durations are the same inside a graph, the launch gaps are
not). Kernels are grouped by name into classes; each class's time per step is set against the bytes
that class must move (from ``bench/roofline.py``'s model), giving its achieved bandwidth.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import time
from collections import defaultdict

from deltaserve.bench.env import environment, format_environment
from deltaserve.bench.offline import resolve_model

# First match wins. GPU kernel names (cuBLAS / Triton / ATen) and CPU aten op names.
CLASSES = [
    ("in_proj (dual)", r"gdn_in_proj"),
    ("gdn (conv + delta rule)", r"gdn|gated_delta|chunk_|fused_recurrent|conv1d|causal_conv|recompute_w_u|solve_tril"),
    ("attention", r"paged|attention|store_kv|qk_norm_rope|_attn|flash"),
    ("moe experts", r"moe_experts|_w13|_w2_kernel|moe_align"),
    ("gemm (linear layers)", r"gemm|gemv|cublas|cutlass|xmma|nvjet|aten::linear|aten::mm|aten::addmm|splitk"),
    ("norms + activation", r"rms_norm|silu_and_mul|_norm"),
    ("routing + sampling", r"router|softmax|topk|sort|argmax|exponential|multinomial"),
    ("elementwise + copies", r"elementwise|vectorized|reduce|copy|cat|index|fill|where|aten::"),
]


def classify(name: str) -> str:
    low = name.lower()
    for cls, pattern in CLASSES:
        if re.search(pattern, low):
            return cls
    return "other"


def _is_op(name: str) -> bool:
    return name.startswith(("aten::", "deltaserve::"))


def _top_level_op(e) -> bool:
    """A CPU op not called by another op (custom ops count whole, their internals not again)."""
    if not _is_op(e.name):
        return False
    p = e.cpu_parent
    while p is not None:
        if _is_op(p.name):
            return False
        p = p.cpu_parent
    return True


def add_args(p: argparse.ArgumentParser) -> None:
    from deltaserve.config import EngineConfig

    EngineConfig.add_cli_args(p)
    p.add_argument("--preset", default=None, help="profile a make-model preset (config only, --load-format dummy)")
    p.add_argument("--layers", type=int, default=None, help="with --preset: override the layer count")
    p.add_argument("--batch", type=int, default=1, help="decoding requests in the profiled steps")
    p.add_argument("--steps", type=int, default=5, help="decode steps profiled")
    p.add_argument("--prefill-tokens", type=int, default=0,
                   help="profile prefill steps instead: each admits one fresh prompt of this many tokens and "
                        "returns its first token (the engine's part of TTFT)")
    p.add_argument("--top", type=int, default=30, help="list this many kernels (by total time) by name")
    p.add_argument("--cprofile", type=int, default=0, metavar="N",
                   help="also run the steps under cProfile and list the N Python functions with the most "
                        "cumulative and own time: where the host side of a step goes")
    p.add_argument("--output", default=None, help="write the breakdown as JSON here")


def _decode_class_bytes(mc, batch: int, dt: int, state_dt: int) -> dict[str, float]:
    """Bytes one decode step must move per op class (``bench/roofline.py``'s model)."""
    from deltaserve.bench.roofline import decode_step_bytes, param_counts
    from deltaserve.layers.moe import folds_shared_expert

    b = decode_step_bytes(mc, batch, 20, dt, state_dt)
    c = param_counts(mc)
    expert_bytes = b.weights - (c["gdn"] + c["attention"] + c["dense_mlp"] + c["moe_fixed"] + mc.vocab_size * mc.hidden_size) * dt
    if mc.is_moe and folds_shared_expert(mc):  # the shared expert is read by the expert kernels
        expert_bytes += mc.mlp_types.count("moe") * 3 * mc.hidden_size * mc.shared_expert_intermediate_size * dt
    return {"gemm (linear layers)": b.weights - expert_bytes, "moe experts": expert_bytes,
            "gdn (conv + delta rule)": b.state, "attention": b.kv}


def _host_profile(step, sync, steps: int, top: int) -> None:
    """Run `steps` steps under cProfile; print the `top` functions by cumulative, then by own time."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    sync()
    prof.disable()
    for order in ("cumulative", "tottime"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(order).print_stats(top)
        print(f"\nhost profile of {steps} steps (cProfile, by {order} time; seconds are for all {steps}):")
        print(buf.getvalue().split("\n", 4)[-1].rstrip())  # drop pstats' header lines


def main(args: argparse.Namespace) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from deltaserve.config import EngineConfig
    from deltaserve.engine.engine import LLMEngine
    from deltaserve.layers.layer_ref import dispatch_custom_ops
    from deltaserve.sampling import SamplingParams

    resolve_model(args)
    args.enforce_eager = True
    cfg = EngineConfig.from_cli_args(args)
    cfg.max_num_seqs = max(cfg.max_num_seqs, args.batch)
    engine = LLMEngine(cfg)
    on_gpu = engine.runner.device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    if args.prefill_tokens:
        # One step = one fresh request of --prefill-tokens distinct tokens, prefilled whole and finished
        # with its first token: the server-side core of TTFT.
        first_token = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        counter = iter(range(10**9))
        vocab = min(engine.model_config.vocab_size, engine.tokenizer.vocab_size) - 10

        def step() -> None:
            i = next(counter)
            prompt = [10 + (7919 * i + 31 * j) % vocab for j in range(args.prefill_tokens)]
            engine.add_request(engine.make_request(prompt, first_token))
            engine.step()
    else:
        params = SamplingParams(temperature=0, max_tokens=10**6, ignore_eos=True)
        for i in range(args.batch):
            engine.add_request(engine.make_request([10 + i] * 16, params))
        step = engine.step
    for _ in range(4):  # warm every kernel (and, for decode, get the batch past its prefill)
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    wall_ms = 1e3 * (time.perf_counter() - t0) / args.steps  # unprofiled
    if args.cprofile:
        _host_profile(step, sync, args.steps, args.cprofile)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    # On the CPU the breakdown is by top-level op name: keep our ops visible as ops (see CompileOp).
    with profile(activities=acts) as prof, dispatch_custom_ops() if not on_gpu else contextlib.nullcontext():
        for _ in range(args.steps):
            step()
        sync()
    times: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])  # kernel name -> [count, us], all steps
    for e in prof.events():
        if on_gpu and e.device_type.name == "CUDA":
            us = e.device_time
        elif not on_gpu and _top_level_op(e):
            us = e.cpu_time_total
        else:
            continue
        times[classify(e.name)] += us / args.steps
        counts[classify(e.name)] += 1
        by_name[e.name][0] += 1
        by_name[e.name][1] += us
    for req_id in list(engine.requests):
        engine.abort(req_id)
    mc, dt = engine.model_config, engine.runner.dtype.itemsize
    class_bytes = {} if args.prefill_tokens else _decode_class_bytes(mc, args.batch, dt, cfg.torch_state_dtype.itemsize)
    total = sum(times.values())
    env = environment()
    print(format_environment(env))
    what = (f"{args.steps} prefill steps of one fresh {args.prefill_tokens}-token prompt" if args.prefill_tokens
            else f"batch {args.batch}, {args.steps} eager decode steps")
    print(f"{mc.architecture}, {mc.num_hidden_layers} layers, {what} profiled; "
          f"{'kernel' if on_gpu else 'top-level op'} time per step {total / 1e3:.3f} ms, "
          f"wall time per step {wall_ms:.3f} ms (unprofiled)")
    print(f"{'class':<24} {'kernels/step':>12} {'us/step':>9} {'share':>6} {'GB/step':>8} {'GB/s':>7}")
    rows = []
    for cls in sorted(times, key=times.get, reverse=True):
        t, nb = times[cls], class_bytes.get(cls)
        rows.append({"class": cls, "kernels_per_step": counts[cls] / args.steps, "us_per_step": t, "bytes": nb})
        bw = f"{nb / (t * 1e-6) / 1e9:7.0f}" if nb and t else "      -"
        gb = f"{nb / 1e9:8.3f}" if nb else "       -"
        print(f"{cls:<24} {counts[cls] / args.steps:>12.1f} {t:>9.1f} {100 * t / total:>5.1f}% {gb} {bw}")
    top = sorted(by_name.items(), key=lambda kv: kv[1][1], reverse=True)[: args.top]
    kernels = [{"name": name, "class": classify(name), "per_step": n / args.steps, "us_per_step": us / args.steps,
                "us_each": us / n} for name, (n, us) in top]
    print(f"\ntop {len(kernels)} kernels by time: per step, us per step, us each")
    for k in kernels:
        print(f"{k['per_step']:>6.1f} {k['us_per_step']:>9.1f} {k['us_each']:>7.2f}  {k['name'][:110]}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"environment": env, "batch": args.batch, "prefill_tokens": args.prefill_tokens,
                       "wall_ms_per_step": wall_ms, "rows": rows, "kernel_us_per_step": total,
                       "kernels": kernels}, f, indent=2)
    return 0
