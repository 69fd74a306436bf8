"""``bench sweep``: the seed's concurrency sweep, repeated, against any OpenAI-compatible server.

Per concurrency level N: ``--warmups`` untimed rounds *at that N* (so the first timed round does not
pay for a batch size the server has not seen: CUDA-graph capture, allocator growth, compile), then
``--repeats`` timed rounds of N streaming chat requests started together. Every request has its own
prompt. What each number rests on:

- TTFT, TPOT = (e2e - ttft)/(n - 1), E2E and per-request decode tok/s = (n - 1)/(e2e - ttft): one
  sample per completed request (N x repeats); ITL: one sample per gap between content chunks.
- combined tok/s: one sample per round (all completion tokens / the round's wall time); its mean
  and 95% CI are over rounds. ``output_throughput`` (vLLM's key) pools instead: all tokens / the
  summed wall time of the timed rounds.
- vLLM-compatible ``std_*_ms`` keys are population std (``np.std``) as vLLM computes them; the
  ``*_ms`` summary dicts carry the sample std and the CI of the mean.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import aiohttp

from deltaserve.bench import stats
from deltaserve.bench.client import Round, chat_payload, first_model, make_session, run_round
from deltaserve.bench.env import environment, format_environment
from deltaserve.bench.report import mean_pm, plot_sweep, text_table, with_n, write_json
from deltaserve.bench.workload import PromptSource


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """The flags of one sweep (shared with ``bench ab``)."""
    p.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated concurrency levels N")
    p.add_argument("--max-tokens", type=int, default=512, help="max_tokens of every request")
    p.add_argument("--prompts", default="animals",
                   help="'animals' (the seed's 1000-word story prompts, unique per request) or a FILE: one "
                        "prompt per line, or JSONL with a \"prompt\" field")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per level")
    p.add_argument("--warmups", type=int, default=2, help="untimed rounds per level, at that level, first")
    p.add_argument("--ignore-eos", action="store_true", help="decode exactly --max-tokens (vLLM's extra)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request fails")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server root (without /v1)")
    p.add_argument("--model", default=None, help="model name in requests (default: first id of GET /v1/models)")
    add_workload_args(p)
    p.add_argument("--output", default=None, help="write FILE.json (and FILE.png beside it)")


def parse_levels(spec: str) -> list[int]:
    try:
        levels = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"--concurrency {spec!r}: use comma-separated integers like 1,2,4") from e
    if not levels or min(levels) < 1:
        raise ValueError(f"--concurrency {spec!r}: levels must be >= 1")
    return levels


def check_args(args: argparse.Namespace) -> None:
    if args.repeats < 1 or args.warmups < 0 or args.max_tokens < 1:
        raise ValueError("--repeats must be >= 1, --warmups >= 0 and --max-tokens >= 1")
    if not 0 < args.confidence < 1:
        raise ValueError(f"--confidence {args.confidence}: use a fraction such as 0.95")


def _vllm_keys(name: str, xs: list[float]) -> dict:
    return {f"mean_{name}_ms": stats.mean(xs), f"median_{name}_ms": stats.percentile(xs, 50),
            f"std_{name}_ms": stats.std(xs, ddof=0),
            **{f"p{q}_{name}_ms": stats.percentile(xs, q) for q in (90, 95, 99)}}


def summarize_level(n: int, rounds: list[Round], warmups: list[Round], confidence: float) -> dict:
    """One level's figures (see the module docstring for what each rests on) and its raw records."""
    reqs = [r for rd in rounds for r in rd.results]
    ok = [r for r in reqs if r.ok]
    series = {"ttft": [1e3 * r.ttft_s for r in ok], "tpot": [1e3 * r.tpot_s for r in ok if r.tpot_s is not None],
              "itl": [1e3 * x for r in ok for x in r.itl_s], "e2el": [1e3 * r.e2e_s for r in ok]}
    decode = [r.decode_tok_s for r in ok if r.decode_tok_s is not None]
    duration = sum(rd.wall_s for rd in rounds)
    out_tokens, in_tokens = sum(rd.completion_tokens for rd in rounds), sum(rd.prompt_tokens for rd in rounds)
    level = {"concurrency": n, "rounds": len(rounds), "warmup_rounds": len(warmups),
             "completed": len(ok), "failed": len(reqs) - len(ok),
             "warmup_failed": sum(not r.ok for rd in warmups for r in rd.results),
             "errors": [{"prompt": r.prompt, "error": r.error} for r in reqs if not r.ok],
             "duration": duration, "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
             "request_throughput": len(ok) / duration if duration else 0.0,
             "output_throughput": out_tokens / duration if duration else 0.0,
             "total_token_throughput": (in_tokens + out_tokens) / duration if duration else 0.0}
    for name, xs in series.items():
        level.update(_vllm_keys(name, xs))
    level["samples"] = {**{k: len(v) for k, v in series.items()}, "decode_tok_s": len(decode),
                        "combined_tok_s": len(rounds)}
    level.update({f"{k}_ms": stats.summarize(v, confidence) for k, v in series.items()})
    level["decode_tok_s"] = stats.summarize(decode, confidence)
    level["combined_tok_s"] = stats.summarize([rd.combined_tok_s for rd in rounds], confidence)
    level["round_records"] = [{"wall_s": rd.wall_s, "completion_tokens": rd.completion_tokens,
                               "prompt_tokens": rd.prompt_tokens, "combined_tok_s": rd.combined_tok_s,
                               "requests": [r.to_dict() for r in rd.results]} for rd in rounds]
    return level


async def run_sweep(url: str, model: str, args: argparse.Namespace, source: PromptSource,
                    desc: str = "sweep") -> list[dict]:
    """All levels of one sweep against the server at ``url``; prompts come from ``source`` in order."""
    from tqdm import tqdm

    levels = parse_levels(args.concurrency)
    total = sum(n * (args.warmups + args.repeats) for n in levels)
    out = []
    async with make_session(args.request_timeout, args.api_key) as session:
        with tqdm(total=total, desc=desc, unit="req", file=sys.stderr, leave=False) as bar:
            for n in levels:
                rounds: dict[bool, list[Round]] = {True: [], False: []}
                for k in range(args.warmups + args.repeats):
                    warm = k < args.warmups
                    which = f"warm-up {k + 1}" if warm else f"round {k + 1 - args.warmups}"
                    bar.set_postfix_str(f"N={n} {which}")
                    payloads = [chat_payload(model, p, args.max_tokens, args.temperature, args.ignore_eos)
                                for p in source.take(n)]
                    rounds[warm].append(await run_round(session, url, payloads))
                    bar.update(n)
                out.append(summarize_level(n, rounds[False], rounds[True], args.confidence))
    return out


def level_rows(levels: list[dict]) -> tuple[list[str], list[list[str]]]:
    headers = ["N", "ok", "failed", "combined tok/s (mean ± CI)", "decode tok/s/req (median)", "TTFT ms median",
               "TTFT p95", "TTFT p99", "TPOT ms median", "ITL ms p99", "E2E ms median"]
    rows = []
    for lv in levels:
        s = lv["samples"]
        rows.append([str(lv["concurrency"]), str(lv["completed"]),
                     str(lv["failed"]) + (f" (+{lv['warmup_failed']} warm-up)" if lv["warmup_failed"] else ""),
                     mean_pm(lv["combined_tok_s"]), with_n(lv["decode_tok_s"]["median"], s["decode_tok_s"]),
                     with_n(lv["median_ttft_ms"], s["ttft"]), with_n(lv["p95_ttft_ms"], s["ttft"]),
                     with_n(lv["p99_ttft_ms"], s["ttft"]), with_n(lv["median_tpot_ms"], s["tpot"], 2),
                     with_n(lv["p99_itl_ms"], s["itl"], 2), with_n(lv["median_e2el_ms"], s["e2el"])])
    return headers, rows


def print_levels(levels: list[dict]) -> None:
    print(text_table(*level_rows(levels)))
    print("samples: combined tok/s = rounds; TTFT/TPOT/E2E/decode = completed requests; ITL = token gaps. "
          f"'low': fewer than 20 samples. Intervals: {100 * levels[0]['combined_tok_s'].get('confidence', 0.95):.0f}%"
          if levels else "no levels")
    for lv in levels:
        for e in lv["errors"]:
            print(f"  N={lv['concurrency']} FAILED: {e['error']} (prompt {e['prompt'][:60]!r})")


def main(args: argparse.Namespace) -> int:
    try:
        parse_levels(args.concurrency)
        check_args(args)
        source = PromptSource(args.prompts)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    url = args.url.rstrip("/")

    async def go() -> tuple[str, list[dict]]:
        model = args.model
        if model is None:
            async with make_session(30, args.api_key) as session:
                model = await first_model(session, url)
        return model, await run_sweep(url, model, args, source)

    try:
        model, levels = asyncio.run(go())
    except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError) as e:
        print(f"error: {url}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    env = environment()
    print(format_environment(env))
    print(f"server {url}, model {model}, max_tokens {args.max_tokens}, ignore_eos {args.ignore_eos}, "
          f"temperature {args.temperature}, {args.warmups} warm-up + {args.repeats} timed rounds per level")
    print_levels(levels)
    if args.output:
        path = Path(args.output)
        write_json(path, {"environment": env, "url": url, "model": model, "args": vars_of(args), "levels": levels})
        plot_sweep(levels, path.with_suffix(".png"), f"{model} @ {url}: {env['card']}, commit {env['commit']}")
        print(f"wrote {path} and {path.with_suffix('.png')}")
    failed = sum(lv["failed"] for lv in levels)
    if failed:
        print(f"{failed} timed requests FAILED (see above and 'errors' in the JSON)", file=sys.stderr)
    return 1 if failed else 0


def vars_of(args: argparse.Namespace) -> dict:
    """The run's arguments, JSON-safe (argparse puts the handler function in the namespace)."""
    return {k: v for k, v in vars(args).items() if not callable(v) and k != "api_key"}
