"""``deltaserve`` command line: serve, generate, make-model, bench."""

from __future__ import annotations

import argparse
import logging
import sys

from deltaserve.errors import DeltaServeError


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _cmd_generate(args: argparse.Namespace) -> int:
    from deltaserve.config import EngineConfig
    from deltaserve.llm import LLM
    from deltaserve.sampling import SamplingParams

    cfg = EngineConfig.from_cli_args(args)
    llm = LLM(**vars(cfg))
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.sampling_seed, ignore_eos=args.ignore_eos)
    if args.chat is not None:
        kwargs = {"enable_thinking": False} if args.no_thinking else None
        out = llm.chat([{"role": "user", "content": args.chat}], params, chat_template_kwargs=kwargs)[0]
    else:
        out = llm.generate([args.prompt], params)[0]
    print(out.text)
    m = out.metrics or {}
    print(f"[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}, ttft {1000 * (m.get('ttft') or 0):.1f} ms,"
          f" e2e {1000 * m.get('e2e', 0):.1f} ms]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from deltaserve.config import EngineConfig

    parser = argparse.ArgumentParser(prog="deltaserve", description=__doc__)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    from deltaserve.server.cli import add_serve_args, main_serve

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (no MODEL: the built-in demo model)")
    add_serve_args(serve)
    serve.set_defaults(func=main_serve)

    gen = sub.add_parser("generate", help="one prompt, offline (no MODEL: the built-in demo model)")
    EngineConfig.add_cli_args(gen)
    what = gen.add_mutually_exclusive_group()
    what.add_argument("--prompt", default="Write a 1000-word story about a cat.", help="raw completion prompt")
    what.add_argument("--chat", default=None, help="a user message, formatted with the chat template")
    gen.add_argument("--no-thinking", action="store_true", help="chat_template_kwargs enable_thinking=false")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.set_defaults(func=_cmd_generate)

    from deltaserve.models.make_model import add_make_model_args, main_make_model

    mm = sub.add_parser("make-model", help="write an HF checkpoint with random weights at real shapes")
    add_make_model_args(mm)
    mm.set_defaults(func=main_make_model)

    from deltaserve.bench.cli import add_bench_args

    bench = sub.add_parser("bench", help="benchmarks: offline, sweep, ab, ttft, startup, layer, profile, step-ab")
    add_bench_args(bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return int(args.func(args) or 0)
    except DeltaServeError as e:  # a bad option, model or input: the message names it and the fix
        logging.getLogger("deltaserve").debug("traceback", exc_info=True)
        print(f"deltaserve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
