"""Greedy outputs at tensor-parallel size 1 against size N on one checkpoint (the GPU check of TP).

Each size runs in its own process (a clean GPU between them): the same prompts, greedy, ignore_eos.
Prints, per prompt, the first position where the two token streams differ (or "equal") and the
largest |logprob| difference of the chosen tokens up to there; writes everything as JSON.

    python scripts/tp_compare.py MODEL_DIR --tp 2 --prompts 8 --max-tokens 32 --output tp.json

In bf16 the two sizes sum partial products in a different order (an all-reduce of per-rank partial
sums vs one GEMM), so a near-tie can flip a greedy token; fp32 runs are expected to be equal.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import subprocess
import sys
import tempfile
import time


def _run(model: str, tp: int, args: argparse.Namespace) -> dict:
    from deltaserve import LLM, SamplingParams

    rng = random.Random(args.seed)
    llm = LLM(model, tensor_parallel_size=tp, dtype=args.dtype, max_num_seqs=max(args.prompts, 1),
              gpu_memory_utilization=args.gpu_memory_utilization)
    vocab = min(llm.engine.model_config.vocab_size, llm.tokenizer.vocab_size)
    prompts = [[rng.randrange(10, vocab) for _ in range(rng.choice([7, 19, 33, 64]))] for _ in range(args.prompts)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True, logprobs=0)
    outs = llm.generate(prompts, params)
    logging.getLogger("tp_compare").info("tp=%d: generated; shutting down", tp)
    llm.shutdown()
    return {"tp": tp, "tokens": [o.token_ids for o in outs],
            "logprobs": [[_chosen(lp) for lp in (o.logprobs or [])] for o in outs]}


def _chosen(entry: dict) -> float:
    """The sampled token's logprob from one position's entry ``{"token", "logprob", "top"}``."""
    return float(entry["logprob"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--output", default=None)
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:  # one tensor-parallel size, in this process; its log on stderr
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        print(json.dumps(_run(args.model, args.worker, args)))
        return 0
    results = {}
    t0 = time.perf_counter()
    for tp in (1, args.tp):
        print(f"[{time.perf_counter() - t0:6.1f} s] tp={tp}: starting", file=sys.stderr, flush=True)
        with tempfile.TemporaryFile("w+") as out:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", str(tp)]
            rc = subprocess.run(cmd, stdout=out).returncode
            if rc != 0:
                print(f"tp={tp} run failed with exit code {rc}")
                return 1
            out.seek(0)
            results[tp] = json.loads(out.read().strip().splitlines()[-1])
        print(f"[{time.perf_counter() - t0:6.1f} s] tp={tp}: done", file=sys.stderr, flush=True)
    a, b = results[1], results[args.tp]
    rows = []
    for i, (ta, tb) in enumerate(zip(a["tokens"], b["tokens"])):
        first = next((j for j, (x, y) in enumerate(zip(ta, tb)) if x != y), None)
        upto = len(ta) if first is None else first
        la, lb = a["logprobs"][i][:upto], b["logprobs"][i][:upto]
        dlp = max((abs(x - y) for x, y in zip(la, lb)), default=0.0)
        rows.append({"prompt": i, "first_divergence": first, "max_logprob_diff_before": dlp})
        print(f"prompt {i}: {'equal' if first is None else f'first divergence at token {first}'} "
              f"(max |dlogprob| before it {dlp:.2e})")
    equal = sum(r["first_divergence"] is None for r in rows)
    print(f"tp=1 vs tp={args.tp}: {equal}/{len(rows)} prompts give identical greedy tokens "
          f"({args.max_tokens} tokens, dtype {args.dtype})")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "tp1": a, f"tp{args.tp}": b}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
