"""Where a cold start's seconds go: imports, each start-up phase, and every Triton compile (GPU only).

Starts an engine the way ``deltaserve serve`` does (``--preset``: a config-only model on random weights)
with an empty Triton cache, after wrapping Triton's ``compile`` so that each compilation is timed and
attributed to its kernel; then generates one short request. Prints the import times, the start-up
timeline (from the engine's own log lines, with ms since process start) and the kernels that spent
the most time compiling, with how many specialisations each compiled.

    python scripts/cold_start_profile.py --preset qwen3.5-35b-a3b [--layers 24] [--output f.json]
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

COMPILES: list[dict] = []


def since_start() -> float:
    return time.perf_counter() - T0


def wrap_triton_compile() -> float:
    """Wrap ``triton.compiler.compile`` (each JITFunction looks it up there at its first launch, in
    ``create_binder``; this runs before any kernel launches). Returns the seconds ``import triton`` took."""
    t = time.perf_counter()
    import triton.compiler as compiler

    took = time.perf_counter() - t
    real = compiler.compile

    def timed(src, *args, **kwargs):
        start = since_start()
        try:
            return real(src, *args, **kwargs)
        finally:
            fn = getattr(src, "fn", None)
            name = getattr(fn, "__name__", None) or getattr(src, "name", "?")
            COMPILES.append({"kernel": name, "module": getattr(fn, "__module__", "?"), "start_s": start,
                             "seconds": since_start() - start, "key": specialisation(src)})

    compiler.compile = timed
    return took


def specialisation(src) -> dict[str, str]:
    """What this compile was specialised on, per argument name: constexpr values, and the attributes
    Triton inferred for plain arguments (``tt.divisibility`` 16 for aligned pointers and multiples of 16)."""
    names = list(getattr(getattr(src, "fn", None), "arg_names", []))

    def arg(path) -> str:
        i = path[0] if isinstance(path, tuple) and path else path
        return names[i] if isinstance(i, int) and i < len(names) else str(path)

    key = {arg(p): f"={v}" for p, v in (getattr(src, "constants", None) or {}).items()}
    for p, attrs in (getattr(src, "attrs", None) or {}).items():
        key[arg(p)] = key.get(arg(p), "") + "".join(f"[{a}={v}]" for a, v in attrs)
    return key


def timed_import(name: str, table: dict[str, float]) -> None:
    t = time.perf_counter()
    __import__(name)
    table[name] = time.perf_counter() - t


def main() -> int:
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="deltaserve-cold-triton-"))
    imports = {"triton": wrap_triton_compile()}
    for name in ("torch", "transformers", "deltaserve.engine.engine", "deltaserve.server.app", "uvicorn"):
        timed_import(name, imports)

    from deltaserve.bench.offline import resolve_model
    from deltaserve.config import EngineConfig
    from deltaserve.engine.engine import LLMEngine
    from deltaserve.sampling import SamplingParams

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    EngineConfig.add_cli_args(p)
    p.add_argument("--preset", default="qwen3.5-35b-a3b", help="a make-model preset (config only, dummy weights)")
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--output", default=None, help="write the compile events and timings as JSON")
    args = p.parse_args()

    timeline: list[tuple[float, str]] = []

    class Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            timeline.append((since_start(), record.getMessage().splitlines()[0]))

    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[Recorder()])
    import torch

    if not torch.cuda.is_available():
        print("error: needs a CUDA device", file=sys.stderr)
        return 2
    resolve_model(args)
    timeline.append((since_start(), "engine start"))
    engine = LLMEngine(EngineConfig.from_cli_args(args))
    timeline.append((since_start(), "engine ready"))
    req = engine.make_request(list(range(100, 126)), SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    engine.add_request(req)
    while engine.has_unfinished():
        engine.step()
    timeline.append((since_start(), "first token"))
    engine.shutdown()

    print(f"{torch.cuda.get_device_name()}: cold start {timeline[-1][0]:.1f} s "
          f"(Triton cache {os.environ['TRITON_CACHE_DIR']})")
    print("imports (s): " + ", ".join(f"{k} {v:.2f}" for k, v in imports.items()))
    print("\ntimeline (s since process start)")
    for t, msg in timeline:
        print(f"  {t:7.2f}  {msg[:110]}")
    by_kernel: dict[str, list[float]] = collections.defaultdict(list)
    for c in COMPILES:
        by_kernel[f"{c['module'].split('.')[0]}:{c['kernel']}"].append(c["seconds"])
    total = sum(c["seconds"] for c in COMPILES)
    print(f"\nTriton compiles: {len(COMPILES)}, {total:.1f} s in all "
          f"(deltaserve {sum(sum(v) for k, v in by_kernel.items() if k.startswith('deltaserve')):.1f} s, "
          f"fla {sum(sum(v) for k, v in by_kernel.items() if k.startswith('fla')):.1f} s)")
    marks = [t for t, _ in timeline]
    names = [m for _, m in timeline]
    print("compile seconds per phase (the phase ends at the log line named)")
    for (a, _), (b, name) in zip(timeline, timeline[1:]):
        s = sum(c["seconds"] for c in COMPILES if a <= c["start_s"] < b)
        if s > 0.05:
            print(f"  {s:6.1f} s of {b - a:6.1f} s  -> {name[:90]}")
    print("\nkernel                                                    compiles  seconds")
    for k, v in sorted(by_kernel.items(), key=lambda kv: -sum(kv[1]))[:40]:
        print(f"  {k:<56} {len(v):8d} {sum(v):8.2f}")
    print("\nwhat differs between one kernel's compiles (argument: its values)")
    for k in sorted(by_kernel, key=lambda k: -sum(by_kernel[k])):
        keys = [c["key"] for c in COMPILES if f"{c['module'].split('.')[0]}:{c['kernel']}" == k]
        if len(keys) < 2:
            continue
        varying = {a: sorted({kk.get(a, "-") for kk in keys}) for a in set().union(*keys)}
        varying = {a: v for a, v in varying.items() if len(v) > 1}
        print(f"  {k} ({len(keys)}): " + "; ".join(f"{a}: {' | '.join(v)}" for a, v in sorted(varying.items())))
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"imports": imports, "timeline": list(zip(marks, names)), "compiles": COMPILES}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
