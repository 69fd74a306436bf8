"""``bench ttft``: time to first token of short streamed chat requests, one at a time.

Sequential on purpose: with one request in flight, TTFT is the server's own latency (tokenize,
schedule, one prefill step, the first streamed chunk) and not queueing behind other requests.
``--warmups`` requests are sent and discarded first. Each prompt is unique (~10 tokens), so a
prefix cache cannot make later requests cheaper than earlier ones. Percentiles are linear
interpolation over the ``--requests`` samples; p99 of fewer than 100 samples is close to the max.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import aiohttp

from deltaserve.bench import stats
from deltaserve.bench.client import RequestResult, chat_payload, first_model, make_session, stream_chat
from deltaserve.bench.env import environment, format_environment
from deltaserve.bench.report import num, text_table, with_n, write_json
from deltaserve.bench.workload import SHORT_TEMPLATE, PromptSource


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server root (without /v1)")
    p.add_argument("--model", default=None, help="model name (default: first id of GET /v1/models)")
    p.add_argument("--warmups", type=int, default=5, help="requests sent first and discarded")
    p.add_argument("--requests", type=int, default=30, help="measured requests")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--prompt-template", default=SHORT_TEMPLATE,
                   help="prompt with one {} (an animal, so every prompt is unique); longer text, longer prompts")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--output", default=None, help="write the samples and the summary as JSON here")


async def measure(url: str, model: str | None, warmups: int, requests: int, max_tokens: int,
                  timeout: float = 120.0, api_key: str | None = None,
                  template: str = SHORT_TEMPLATE) -> tuple[str, list[RequestResult]]:
    """(model, the measured requests' results); warm-ups are not returned."""
    source = PromptSource("animals", template=template)
    results = []
    async with make_session(timeout, api_key) as session:
        model = model or await first_model(session, url)
        for k in range(warmups + requests):
            r = await stream_chat(session, url, chat_payload(model, source.take(1)[0], max_tokens, 0.0, False))
            if k >= warmups:
                results.append(r)
    return model, results


def summary(results: list[RequestResult]) -> dict:
    ttft = [1e3 * r.ttft_s for r in results if r.ok]
    s = stats.summarize(ttft)
    prompt_tokens = [r.prompt_tokens for r in results if r.ok and r.prompt_tokens]
    return {"n": len(ttft), "prompt_tokens_mean": sum(prompt_tokens) / len(prompt_tokens) if prompt_tokens else None,
            "failed": sum(not r.ok for r in results), "p50_ms": s["median"], "p90_ms": s["p90"],
            "p99_ms": s["p99"], "mean_ms": s["mean"], "stddev_ms": s["std"], "ci_low_ms": s["ci_low"],
            "ci_high_ms": s["ci_high"], "min_ms": s["min"], "max_ms": s["max"],
            "errors": [r.error for r in results if not r.ok]}


def main(args: argparse.Namespace) -> int:
    if args.requests < 1 or args.warmups < 0:
        print("error: --requests must be >= 1 and --warmups >= 0", file=sys.stderr)
        return 2
    url = args.url.rstrip("/")
    try:
        if args.prompt_template.count("{}") != 1:
            print("error: --prompt-template must contain exactly one {}", file=sys.stderr)
            return 2
        model, results = asyncio.run(measure(url, args.model, args.warmups, args.requests, args.max_tokens,
                                             args.request_timeout, args.api_key, args.prompt_template))
    except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError) as e:
        print(f"error: {url}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    s = summary(results)
    env = environment()
    print(format_environment(env))
    print(f"server {url}, model {model}: {args.warmups} warm-up + {args.requests} sequential streamed requests, "
          f"max_tokens {args.max_tokens}, prompt tokens (chat template included) "
          f"{num(s['prompt_tokens_mean'], 1) if s['prompt_tokens_mean'] else 'n/a'}")
    n = s["n"]
    print(text_table(["samples", "failed", "p50 ms", "p90 ms", "p99 ms", "stddev ms", "mean ms (95% CI)"],
                     [[str(n), str(s["failed"]), with_n(s["p50_ms"], n, 2), with_n(s["p90_ms"], n, 2),
                       with_n(s["p99_ms"], n, 2), num(s["stddev_ms"], 2),
                       f"{num(s['mean_ms'], 2)} [{num(s['ci_low_ms'], 2)}, {num(s['ci_high_ms'], 2)}]"]]))
    for e in s["errors"]:
        print(f"FAILED: {e}")
    if args.output:
        write_json(Path(args.output), {"environment": env, "url": url, "model": model,
                                       "args": {k: v for k, v in vars(args).items() if not callable(v)
                                                and k != "api_key"},
                                       "summary": s, "requests": [r.to_dict() for r in results]})
    return 1 if s["failed"] else 0
