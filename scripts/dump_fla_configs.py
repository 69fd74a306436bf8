"""Record the configs fla's autotuners pick on this GPU, for ``deltaserve/configs/fla/<GPU>/``.

Starts an engine (``--preset``: a config-only model on random weights, as ``bench offline`` does), whose
start-up runs the warm-up forward at the step's token budget and the warm-up step shapes, i.e. every
fla prefill kernel at the keys a server meets; then writes each kernel's ``key -> best config`` in
fla's JSON schema (``deltaserve/fla_configs.py``), merged into files already there from the same
Triton version, and lists what it wrote. fla's lookups are disabled for the run (unless
``FLA_CACHE_MODE`` is set), so the configs are tuned afresh. With tensor parallelism only rank 0's
keys (its per-rank head counts) are recorded.

    python scripts/dump_fla_configs.py --preset qwen3.5-35b-a3b [--layers 24] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def main() -> int:
    os.environ.setdefault("FLA_CACHE_MODE", "disabled")  # before fla's first import: autotune every key
    from deltaserve.bench.offline import resolve_model
    from deltaserve.config import EngineConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    EngineConfig.add_cli_args(p)
    p.add_argument("--preset", default=None, help="a make-model preset (config only, --load-format dummy)")
    p.add_argument("--layers", type=int, default=None, help="with --preset: override the layer count")
    p.add_argument("--out", default=None, help="directory to write (default: deltaserve/configs/fla/<GPU name>)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch

    from deltaserve import fla_configs
    from deltaserve.engine.engine import LLMEngine

    if not torch.cuda.is_available():
        print("error: needs a CUDA device (fla's kernels only autotune on a GPU)", file=sys.stderr)
        return 2
    resolve_model(args)
    engine = LLMEngine(EngineConfig.from_cli_args(args))
    gpu = torch.cuda.get_device_name(engine.runner.device)
    out = args.out or fla_configs.SHIPPED_ROOT / fla_configs.sanitize_gpu_name(gpu)
    cached, plain = fla_configs.find_fla_autotuners()
    written = fla_configs.dump_fla_configs(out, cached)
    print(f"{gpu}: {len(written)} kernel config files in {out}")
    for path in written:
        n = len(json.loads(path.read_text())["autotune_entries"])
        print(f"  {path.name}: {n} keys")
    ran = [t for t in plain if getattr(t, "cache", None)]
    if ran:
        print("autotuned, not recordable (plain triton.autotune, fla reads no configs for them): "
              + ", ".join(sorted({fla_configs.kernel_name(t) for t in ran})))
    engine.shutdown()
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
