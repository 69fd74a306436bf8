"""``deltaserve bench <kind>``: each benchmark lives in its own module (``step-ab``: ``step_ab.py``) with
``add_args`` and ``main``."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "offline": "decode tok/s per batch size in-process, against the memory roofline of this card",
    "sweep": "concurrency sweep against any OpenAI-compatible server (the seed's workload)",
    "ab": "interleaved A/B of two deltaserve server configurations, with confidence intervals",
    "ttft": "time to first token of short streamed requests",
    "startup": "seconds from process start to /health and to the first token, cold and warm",
    "layer": "the GDN in_proj micro-benchmark: serial / dual / fused per token count",
    "profile": "per-op-class breakdown of one decode step against the bytes each class must move",
    "step-ab": "two GDN in_proj strategies on the whole decode step, interleaved in one process, paired CIs",
}


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True)
    for name, help in BENCHMARKS.items():
        module = importlib.import_module(f"deltaserve.bench.{name.replace('-', '_')}")
        p = sub.add_parser(name, help=help, description=help)
        module.add_args(p)
        p.set_defaults(func=module.main)
