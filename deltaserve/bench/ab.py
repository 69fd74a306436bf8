"""``bench ab``: two server configurations, interleaved A B B A A B ..., compared with confidence intervals.

Each trial starts a fresh ``deltaserve serve MODEL <flags> --port <free>``, waits for /health, runs
one sweep (``bench sweep``'s flags; the same prompts in the same order every trial), asks for the
greedy output of the first ``--equiv-prompts`` prompts one at a time, and stops the server with
SIGTERM. Interleaving spreads slow drifts of the machine (clocks, temperature, other tenants) over
both sides; alternating which side opens each pair (A1 B1, B2 A2, A3 B3, ...) also cancels a steady
drift, which plain A B A B would hand to B, always the later of each pair.

The unit of comparison is the trial: per N, each trial contributes its mean combined tok/s over its
rounds and its median TTFT, because rounds on one server share that server's state (allocator,
caches, placement) and are not independent samples of the configuration. Per N the report gives
mean and std per side, delta % of B vs A with a Welch t interval, and the verdict: "B faster",
"A faster", or "no difference resolved" when the interval of the difference contains 0.

``--paired`` answers a narrower question more precisely, for effects smaller than the machine's drift
between server starts (a few % on an H200): both servers start once, on the same GPU (give each a
``--gpu-memory-utilization`` share; a model that fits twice), and stay up; each trial sweeps A then B
(B then A in even trials) back to back, while the other server idles (warm-up rounds in the first
trial only). A trial is then a pair measured at nearly the same time, and the interval is the paired
t interval of the per-trial log ratio B / A (n - 1 degrees of freedom): drift common to both sides
cancels. What it does not sample is the variation between server starts, so it suits configurations
whose start-up is deterministic (fixed kernels, no autotuning), and the report says which mode
produced it.

A run can end early and still report: ``--time-budget S`` starts no trial that the longest one so far
says would end past S seconds, and SIGTERM (``timeout``, a scheduler) stops the run at once; either way
the report covers the trials that completed both sides (at least two), and says how many of how many.
``ab.json`` is rewritten after every trial, so even a run killed outright leaves its raw trials behind.

Output equivalence (greedy, temperature 0, sequential): for every prompt the sha256 of the text
under each trial. A configuration whose own trials disagree is not deterministic, and then an A/B
mismatch says nothing about the change; the table says so instead of blaming it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from deltaserve.bench import stats
from deltaserve.bench.client import chat_payload, first_model, make_session, stream_chat
from deltaserve.bench.env import environment, format_environment
from deltaserve.bench.report import markdown_table, num, plot_ab, text_table, write_json
from deltaserve.bench.startup import ServerError, ServerProcess, kill_live_servers
from deltaserve.bench.sweep import add_workload_args, check_args, parse_levels, run_sweep, vars_of
from deltaserve.bench.workload import PromptSource

SIDES = ("A", "B")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model directory, passed to `deltaserve serve`")
    p.add_argument("--a", default="", help='serve flags of A, one string: --a "--inproj serial" (a single flag '
                                           'without a value: --a=--compile)')
    p.add_argument("--b", default="", help="serve flags of B, one string")
    p.add_argument("--trials", type=int, default=3, help="server starts per side (the unit of the statistics); "
                                                           "with --paired, back-to-back A/B sweep pairs")
    p.add_argument("--paired", action="store_true", help="start A and B once, side by side on one GPU, and "
                                                         "compare back-to-back sweeps pairwise (see the module doc)")
    add_workload_args(p)
    p.add_argument("--equiv-prompts", type=int, default=5, help="prompts in the output-equivalence check")
    p.add_argument("--equiv-max-tokens", type=int, default=None, help="their max_tokens (default --max-tokens)")
    p.add_argument("--server-timeout", type=float, default=1200.0, help="seconds to wait for /health 200")
    p.add_argument("--time-budget", type=float, default=None, help="seconds for the whole run: start no trial "
                   "that would end past it (judged by the longest so far) and report the trials completed")
    p.add_argument("--output", default="ab-report", help="directory for report.md, ab.json, ab.png, server logs")
    p.add_argument("--save-detailed", action="store_true", help="keep every request's per-token gaps (itl_s) in "
                   "ab.json; without it each request keeps its TTFT, latency and token counts, and the ITL "
                   "percentiles stay in each level's summary (the gaps are ~90%% of the file: 37 MB for 24 pairs "
                   "of 36 requests of 512 tokens)")


async def greedy_outputs(url: str, model: str, prompts: list[str], max_tokens: int, ignore_eos: bool,
                         timeout: float, api_key: str | None = None) -> list[dict]:
    out = []
    async with make_session(timeout, api_key) as session:
        for p in prompts:  # one at a time: batch composition must not be a variable
            r = await stream_chat(session, url, chat_payload(model, p, max_tokens, 0.0, ignore_eos, seed=0))
            out.append({"prompt": p, "ok": r.ok, "error": r.error, "text": r.text,
                        "completion_tokens": r.completion_tokens,
                        "sha256": hashlib.sha256(r.text.encode()).hexdigest() if r.ok else None})
    return out


async def measure(server: ServerProcess, side: str, trial: int, args: argparse.Namespace) -> dict:
    """One sweep and the greedy outputs against a ready server: one trial's record (no exit status yet)."""
    async with make_session(30, args.api_key) as session:  # --api-key: for a server started with one
        name = await first_model(session, server.url)
    source = PromptSource(args.prompts)  # the same sequence for every trial of both sides
    levels = await run_sweep(server.url, name, args, source, desc=f"{side}{trial}")
    if not args.save_detailed:  # the summaries above were computed from the gaps: only the raw lists go
        for lv in levels:
            for rd in lv["round_records"]:
                for req in rd["requests"]:
                    req.pop("itl_s", None)
    outputs = await greedy_outputs(server.url, name, [source.prompt(i) for i in range(args.equiv_prompts)],
                                   args.equiv_max_tokens or args.max_tokens, args.ignore_eos,
                                   args.request_timeout, args.api_key)
    return {"side": side, "trial": trial, "command": shlex.join(server.command), "levels": levels,
            "outputs": outputs}


async def run_trial(side: str, trial: int, flags: list[str], args: argparse.Namespace, out_dir: Path) -> dict:
    server = ServerProcess(args.model, flags, out_dir / f"server-{side}-{trial}.log")
    try:
        ready_s = await server.wait_ready(args.server_timeout)
        record = await measure(server, side, trial, args)
    finally:
        status = server.stop()
    return {**record, "ready_s": ready_s, "exit_status": status}


class Stopped(BaseException):
    """SIGTERM mid-run: the trials completed so far are reported. A BaseException, as KeyboardInterrupt
    is, so that no ``except Exception`` on the way (a request's error handling) takes it for a failure."""


class Budget:
    """``--time-budget``: whether another trial (both sides) fits, judged by the longest one so far."""

    def __init__(self, seconds: float | None):
        self.seconds, self.start, self.longest = seconds, time.monotonic(), 0.0

    def allows_another(self) -> bool:
        return self.seconds is None or time.monotonic() - self.start + self.longest <= self.seconds

    def timed(self, began: float) -> None:
        self.longest = max(self.longest, time.monotonic() - began)


async def run_paired(flags: dict[str, list[str]], args: argparse.Namespace, out_dir: Path, record,
                     budget: Budget) -> None:
    """``--paired``: both servers up at once (started one after the other, so their start-ups do not
    compete), then up to ``args.trials`` back-to-back pairs, A first in odd trials and B first in even
    ones; ``record`` gets each side's trial as it completes. The ``--warmups`` rounds run in the first
    trial only: the servers stay up, so later trials would warm what is already warm (a third of a
    trial's time at two warm-up-plus-timed rounds per level)."""
    servers: dict[str, ServerProcess] = {}
    ready: dict[str, float] = {}
    mine: list[dict] = []
    try:
        for side in SIDES:
            servers[side] = ServerProcess(args.model, flags[side], out_dir / f"server-{side}.log")
            ready[side] = await servers[side].wait_ready(args.server_timeout)
        for trial in range(1, args.trials + 1):
            if not budget.allows_another():
                break
            began = time.monotonic()
            trial_args = args if trial == 1 else argparse.Namespace(**{**vars(args), "warmups": 0})
            for side in SIDES if trial % 2 else SIDES[::-1]:
                print(f"trial {trial}, {side}", file=sys.stderr)
                mine.append({**await measure(servers[side], side, trial, trial_args), "ready_s": ready[side]})
                record(mine[-1])
            budget.timed(began)
    finally:
        status = {side: server.stop() for side, server in servers.items()}
        for t in mine:  # the same dicts as the caller's: each gets its server's exit status
            t["exit_status"] = status[t["side"]]


def completed(trials: list[dict]) -> list[dict]:
    """The trials whose number has both sides (a run stopped mid-pair drops its last, lone side)."""
    sides: dict[int, set] = {}
    for t in trials:
        sides.setdefault(t["trial"], set()).add(t["side"])
    return [t for t in trials if sides[t["trial"]] == set(SIDES)]


def compare_levels(trials: list[dict], confidence: float, paired: bool = False) -> list[dict]:
    """Per N: per-trial values of each side and their comparison (Welch; with ``paired``, per trial pair)."""
    rows = []
    for i, n in enumerate(lv["concurrency"] for lv in trials[0]["levels"]):
        per = {s: [t["levels"][i] for t in trials if t["side"] == s] for s in SIDES}
        row: dict = {"concurrency": n, "failed": {s.lower(): sum(lv["failed"] for lv in per[s]) for s in SIDES}}
        for key, value, higher in (("combined_tok_s", lambda lv: lv["combined_tok_s"]["mean"], True),
                                   ("ttft_ms", lambda lv: lv["median_ttft_ms"], False)):
            # A trial whose level had no completed request has no value (NaN or 0 tok/s): it is left
            # out of the interval (n shrinks, which widens it) and shows in the "failed" column.
            if paired:  # a trial whose level failed on either side drops out as a pair
                pairs = [(x, y) for x, y in zip(map(value, per["A"]), map(value, per["B"]))
                         if all(math.isfinite(v) and v > 0 for v in (x, y))]
                a, b = [x for x, _ in pairs], [y for _, y in pairs]
                c = stats.compare_paired(a, b, higher_is_better=higher, confidence=confidence)
            else:
                a, b = ([v for v in map(value, per[s]) if math.isfinite(v) and v > 0] for s in SIDES)
                c = stats.compare(a, b, higher_is_better=higher, confidence=confidence, log=True)
            row[key] = {"a_trials": a, "b_trials": b, "a": c.a.to_dict(), "b": c.b.to_dict(), "comparison": c.to_dict()}
        rows.append(row)
    return rows


def first_difference(x: Sequence, y: Sequence) -> int | None:
    """The first index where two strings (or token-id lists) differ; None if they are equal."""
    return next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None if len(x) == len(y) else min(len(x), len(y)))


def equivalence(trials: list[dict], model: str) -> list[dict]:
    """Per prompt: each side's hashes over its trials, and where A's first output and B's first differ."""
    tok = None
    rows = []
    for i, first in enumerate(trials[0]["outputs"]):
        outs = {s: [t["outputs"][i] for t in trials if t["side"] == s] for s in SIDES}
        hashes = {s: [o["sha256"] for o in outs[s]] for s in SIDES}
        a, b = outs["A"][0]["text"], outs["B"][0]["text"]
        row = {"prompt": first["prompt"], "a_sha256": hashes["A"], "b_sha256": hashes["B"],
               "a_reproducible": len(set(hashes["A"])) == 1 and None not in hashes["A"],
               "b_reproducible": len(set(hashes["B"])) == 1 and None not in hashes["B"],
               "equal": hashes["A"][0] is not None and hashes["A"][0] == hashes["B"][0],
               "first_diff_char": None, "first_diff_token": None}
        if not row["equal"] and None not in (hashes["A"][0], hashes["B"][0]):
            row["first_diff_char"] = first_difference(a, b)
            try:
                if tok is None:
                    from deltaserve.tokenizer import Tokenizer

                    tok = Tokenizer(model)
                row["first_diff_token"] = first_difference(tok.encode(a), tok.encode(b))
            except Exception as e:  # noqa: BLE001 - a model without a loadable tokenizer: report chars only
                row["first_diff_token"] = f"n/a ({type(e).__name__})"
        rows.append(row)
    return rows


def ci_text(c: dict) -> str:
    return f"{c['delta_pct']:+.1f}% [{num(c['delta_pct_low'])}, {num(c['delta_pct_high'])}]"


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    conf = f"{100 * rows[0]['combined_tok_s']['a']['confidence']:.0f}% CI" if rows else "CI"
    headers = ["N", "A tok/s mean (std)", "B tok/s mean (std)", f"B vs A tok/s, {conf}", "verdict (tok/s)",
               "A TTFT ms mean (std)", "B TTFT ms mean (std)", f"B vs A TTFT, {conf}", "verdict (TTFT)", "failed A/B"]
    out = []
    for r in rows:
        cells = [str(r["concurrency"])]
        for key in ("combined_tok_s", "ttft_ms"):
            m = r[key]
            cells += [f"{num(m['a']['mean'])} ({num(m['a']['std'])})", f"{num(m['b']['mean'])} ({num(m['b']['std'])})",
                      ci_text(m["comparison"]), m["comparison"]["verdict"]]
        out.append([*cells, f"{r['failed']['a']}/{r['failed']['b']}"])
    return headers, out


def equivalence_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    def h(xs: list[str | None]) -> str:
        return ", ".join((x or "failed")[:12] for x in xs)

    headers = ["prompt", "A sha256 (per trial)", "B sha256 (per trial)", "A repeatable", "B repeatable", "A == B",
               "first diff char", "first diff token"]
    return headers, [[r["prompt"][:48], h(r["a_sha256"]), h(r["b_sha256"]), "yes" if r["a_reproducible"] else "NO",
                      "yes" if r["b_reproducible"] else "NO", "yes" if r["equal"] else "NO",
                      "" if r["first_diff_char"] is None else str(r["first_diff_char"]),
                      "" if r["first_diff_token"] is None else str(r["first_diff_token"])] for r in rows]


def markdown(env: dict, args: argparse.Namespace, trials: list[dict], rows: list[dict], eq: list[dict],
             stopped: str | None = None) -> str:
    conf = f"{100 * args.confidence:.0f}%"
    if args.paired:
        method = (f"**Paired mode**: both servers ran side by side on one GPU for the whole run (started once: "
                  f"A ready in {trials[0]['ready_s']:.1f} s), and each trial swept A and B back to back. Delta = "
                  f"the geometric mean of the per-trial ratios B / A - 1, with the {conf} paired t interval of "
                  "their logarithms (n - 1 degrees of freedom); variation between server starts is not sampled.")
    else:
        method = (f"Delta = geometric mean of B / geometric mean of A - 1, with a {conf} Welch t interval computed "
                  "on the logarithms (noise in rates and latencies is proportional to their level).")
    order = " ".join(f"{t['side']}{t['trial']} (ready {t['ready_s']:.1f} s)" for t in trials)
    per_trial = [[str(r["concurrency"]), side, ", ".join(num(v) for v in r["combined_tok_s"][f"{side.lower()}_trials"]),
                  ", ".join(num(v) for v in r["ttft_ms"][f"{side.lower()}_trials"])] for r in rows for side in SIDES]
    notes = [f"**The run ended early** ({stopped})."] if stopped else []
    if any(r["failed"]["a"] or r["failed"]["b"] for r in rows):
        notes.append("**Some requests failed** (column 'failed A/B'; the errors are in ab.json): "
                     "the throughput of a side with failures is not comparable.")
    if not all(r["a_reproducible"] and r["b_reproducible"] for r in eq):
        notes.append("**A configuration did not reproduce its own greedy output across trials**: an A/B mismatch "
                     "on those prompts says nothing about the change.")
    return "\n".join([
        f"# A/B: `{args.model}`", "", "## Environment", "", "```", format_environment(env), "```", "",
        "## Commands", "", f"- A: `{trials[0]['command']}`",
        f"- B: `{next(t['command'] for t in trials if t['side'] == 'B')}`",
        f"- workload: prompts `{args.prompts}`, concurrency {args.concurrency}, max_tokens {args.max_tokens}, "
        f"ignore_eos {args.ignore_eos}, temperature {args.temperature}; per trial and N: {args.warmups} warm-up "
        f"rounds{' (first trial only: the servers stay up)' if args.paired else ''}, then {args.repeats} timed "
        "rounds", f"- order: {order}", "",
        "## Throughput and TTFT", "",
        f"One sample per trial (n = {len(trials) // 2} per side): the trial's mean combined tok/s over its rounds, and "
        f"its median TTFT. {method} The verdict is \"no difference resolved\" when that interval contains 0: the "
        "trials cannot tell the two apart, whatever the point estimate says.", "", markdown_table(*table(rows)), "",
        *notes, "", "### Per-trial values", "",
        markdown_table(["N", "side", "combined tok/s per trial", "median TTFT ms per trial"], per_trial), "",
        "## Output equivalence", "",
        f"Greedy (temperature 0, seed 0) chat completions of {len(eq)} prompts, one at a time, max_tokens "
        f"{args.equiv_max_tokens or args.max_tokens}. Positions compare A's and B's first trials; the token "
        "position comes from re-tokenizing both texts with the model's tokenizer.", "",
        markdown_table(*equivalence_table(eq)), "", "![A/B](ab.png)", ""])


def main(args: argparse.Namespace) -> int:
    try:
        parse_levels(args.concurrency)
        check_args(args)
        PromptSource(args.prompts)
        if args.trials < 1 or args.equiv_prompts < 0:
            raise ValueError("--trials must be >= 1 and --equiv-prompts >= 0")
        if args.time_budget is not None and args.time_budget <= 0:
            raise ValueError(f"--time-budget {args.time_budget:g} must be > 0 seconds (leave it out for no limit)")
        flags = {"A": shlex.split(args.a), "B": shlex.split(args.b)}
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    trials: list[dict] = []

    def record(trial: dict) -> None:
        trials.append(trial)
        write_json(out_dir / "ab.json", {"partial": True, "args": vars_of(args), "trials": trials})

    signalled: list[str] = []

    def stop(signum, frame):
        signalled.append(f"stopped by signal {signal.Signals(signum).name}")
        kill_live_servers()  # at once, as the benchmarks do on SIGTERM: its sender will not wait for a drain
        # Python drops an exception raised while a weakref callback or __del__ runs: then the run goes on
        # against dead servers, and the connection error below is read as this stop (`signalled`).
        raise Stopped(signalled[-1])

    budget, stopped = Budget(args.time_budget), None
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        if args.paired:
            asyncio.run(run_paired(flags, args, out_dir, record, budget))
        else:
            for trial in range(1, args.trials + 1):
                if not budget.allows_another():
                    break
                began = time.monotonic()
                for side in SIDES if trial % 2 else SIDES[::-1]:
                    print(f"trial {trial}, {side}: deltaserve serve {args.model} {shlex.join(flags[side])}",
                          file=sys.stderr)
                    record(asyncio.run(run_trial(side, trial, flags[side], args, out_dir)))
                budget.timed(began)
    except Stopped as e:
        stopped = str(e)
    except (ServerError, ValueError, aiohttp.ClientError, asyncio.TimeoutError, RuntimeError) as e:
        if signalled:  # the servers were killed by the stop, and the Stopped raised there was lost
            stopped = signalled[-1]
        else:
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
            write_json(out_dir / "ab.json", {"error": str(e), "args": vars_of(args), "trials": trials})
            return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    trials = completed(trials)
    n = len(trials) // 2
    if n < args.trials:
        stopped = (f"{stopped or f'--time-budget {args.time_budget:g} s reached'}: {n} of {args.trials} trials "
                   "completed both sides")
        print(f"note: {stopped}", file=sys.stderr)
    if n < 2:
        write_json(out_dir / "ab.json", {"error": f"{stopped}; an interval needs at least 2",
                                         "args": vars_of(args), "trials": trials})
        print(f"error: {stopped}; an interval needs at least 2", file=sys.stderr)
        return 1
    rows = compare_levels(trials, args.confidence, args.paired)
    eq = equivalence(trials, args.model)
    env = environment()
    write_json(out_dir / "ab.json", {"environment": env, "args": vars_of(args), "flags": flags, "comparison": rows,
                                     "equivalence": eq, "stopped": stopped, "trials": trials})
    plot_ab(rows, out_dir / "ab.png", f"A: {args.a or '(defaults)'}   B: {args.b or '(defaults)'}   {env['card']}")
    (out_dir / "report.md").write_text(markdown(env, args, trials, rows, eq, stopped))
    print(format_environment(env))
    print(text_table(*table(rows)))
    print(text_table(*equivalence_table(eq)))
    print(f"wrote {out_dir / 'report.md'}, {out_dir / 'ab.json'}, {out_dir / 'ab.png'}")
    return 1 if any(r["failed"]["a"] or r["failed"]["b"] for r in rows) else 0
