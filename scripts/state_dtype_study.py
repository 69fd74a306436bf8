"""bf16 against fp32 GDN state: how far the outputs drift (the speed side is ``bench offline --state-dtype``).

Runs the same greedy requests twice on one checkpoint, ``--state-dtype float32`` then ``bfloat16``
(everything else equal), and reports per prompt the first position where the greedy tokens differ
and the mean / max |logprob difference| of the chosen tokens before it.

    python scripts/state_dtype_study.py MODEL_DIR [--prompts 4] [--max-tokens 128] [--output f.json]

Storing the recurrent state in bf16 rounds it once per token (~3 significant digits): the question
is whether that rounding accumulates over a long decode or stays bounded by the state's decay.
"""

from __future__ import annotations

import argparse
import json
import random
import sys


def run(model: str, state_dtype: str, args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    from deltaserve import LLM, SamplingParams

    llm = LLM(model, state_dtype=state_dtype, dtype=args.dtype, max_num_seqs=16,
              gpu_memory_utilization=args.gpu_memory_utilization)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True, logprobs=0)
    outs = llm.generate(prompts, params)
    result = {"tokens": [o.token_ids for o in outs],
              "logprobs": [[e["logprob"] for e in o.logprobs] for o in outs]}
    llm.shutdown()
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None)
    args = p.parse_args()
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(10, 2000) for _ in range(rng.choice([16, 40, 100]))] for _ in range(args.prompts)]
    fp32 = run(args.model, "float32", args, prompts)
    bf16 = run(args.model, "bfloat16", args, prompts)
    rows = []
    for i, (a, b) in enumerate(zip(fp32["tokens"], bf16["tokens"])):
        first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        upto = len(a) if first is None else first
        diffs = [abs(x - y) for x, y in zip(fp32["logprobs"][i][:upto], bf16["logprobs"][i][:upto])]
        rows.append({"prompt": i, "first_divergence": first, "mean_dlogprob": sum(diffs) / max(len(diffs), 1),
                     "max_dlogprob": max(diffs, default=0.0)})
        print(f"prompt {i} ({len(prompts[i])} tokens): "
              f"{'same ' + str(len(a)) + ' tokens' if first is None else f'first divergence at token {first}'}; "
              f"|dlogprob| before it: mean {rows[-1]['mean_dlogprob']:.2e}, max {rows[-1]['max_dlogprob']:.2e}")
    if args.output:
        with open(args.output, "w") as fh:
            json.dump({"args": vars(args), "rows": rows, "fp32": fp32, "bf16": bf16}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
