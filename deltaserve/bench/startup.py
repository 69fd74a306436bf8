"""``bench startup``: seconds from launching ``deltaserve serve`` to /health 200 and to a first token.

Each run launches ``deltaserve serve MODEL <serve flags> --port <free>``, polls /health every 20 ms,
then streams one short request: "first token" is the time from process start to its first content
chunk. ``--cold`` gives every run a fresh, empty compile cache (``TORCHINDUCTOR_CACHE_DIR`` and
``TRITON_CACHE_DIR`` in a new temp dir); the default (warm) shares one cache dir across runs and runs
once more first, untimed, to fill it. With ``--compile`` among the serve flags the server's log line
``compiled graphs: N`` is reported (``n/a`` if the server does not print it).

Usage: ``deltaserve bench startup MODEL [serve flags...] [--cold] [--runs 3]``; the benchmark's own
flags may come before or after MODEL, everything else is passed to ``serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp

from deltaserve.bench import stats
from deltaserve.bench.client import chat_payload, first_model, health_ok, make_session, stream_chat
from deltaserve.bench.env import environment, format_environment
from deltaserve.bench.report import num, text_table, write_json
from deltaserve.bench.workload import SHORT_TEMPLATE, animal

GRAPHS_RE = re.compile(r"compiled graphs:\s*(\d+)")


class ServerError(RuntimeError):
    """The server exited or did not become ready; the message ends with the tail of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_LIVE: set[ServerProcess] = set()  # servers started and not yet stopped, killed if the benchmark dies
_guarded = False


def kill_live_servers() -> None:
    for server in list(_LIVE):
        server.kill()


def _sigterm_unwinds(signum, frame) -> None:
    kill_live_servers()  # at once: whoever sent SIGTERM will not wait for a graceful drain
    raise SystemExit(128 + signum)


def _guard_servers() -> None:
    """Servers run in their own sessions (so a stuck one can be killed with its TP workers), which also
    means a signal to the benchmark's group does not reach them: a benchmark stopped by ``timeout`` or
    Ctrl-C must kill them itself, or they keep their GPU memory after it is gone."""
    global _guarded
    if _guarded:
        return
    atexit.register(kill_live_servers)
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm_unwinds)
    _guarded = True


class ServerProcess:
    """One ``deltaserve serve`` subprocess, its own process group, its output in ``log_path``."""

    def __init__(self, model: str, flags: list[str], log_path: str | Path, env: dict | None = None):
        if any(f == "--port" or f.startswith("--port=") for f in flags):
            raise ValueError("serve flags must not set --port: the benchmark picks a free one")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "deltaserve.cli", "serve", model, *flags, "--port", str(self.port)]
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.t_start = time.perf_counter()
        # A new session: if SIGTERM is not enough, the whole group (TP workers too) can be killed.
        _guard_servers()
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        _LIVE.add(self)

    def kill(self) -> None:
        """SIGKILL the server's whole group (TP workers included) at once."""
        _LIVE.discard(self)
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def wait_ready(self, timeout: float) -> float:
        """Seconds from launch to the first /health 200."""
        async with make_session(5) as session:
            while True:
                if await health_ok(session, self.url):
                    return time.perf_counter() - self.t_start
                if self.proc.poll() is not None:
                    raise ServerError(f"the server exited with status {self.proc.returncode} before /health turned "
                                      f"200; {self.log_path}:\n{self.log_tail()}")
                if time.perf_counter() - self.t_start > timeout:
                    raise ServerError(f"/health was not 200 after {timeout:.0f} s; {self.log_path}:\n{self.log_tail()}")
                await asyncio.sleep(0.02)

    def stop(self, timeout: float = 60.0) -> int | str:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL the group; the exit status or "killed"."""
        status: int | str
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            status = "killed"
        self._log.close()
        _LIVE.discard(self)
        return status

    def compiled_graphs(self) -> int | None:
        matches = GRAPHS_RE.findall(self.log_path.read_text(errors="replace"))
        return int(matches[-1]) if matches else None


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model directory")
    p.add_argument("serve_flags", nargs=argparse.REMAINDER, help="flags for `deltaserve serve` (and ours, below)")
    _own_args(p)


def _own_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cold", action="store_true", help="a fresh, empty compile cache for every run")
    p.add_argument("--runs", type=int, default=3, help="measured runs")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds to wait for /health 200")
    p.add_argument("--log-dir", default=None, help="keep the server logs here (default: a temp dir)")
    p.add_argument("--output", default=None, help="write the runs and the summary as JSON here")


def split_flags(args: argparse.Namespace) -> None:
    """REMAINDER swallows our own flags when they follow MODEL: take them back out."""
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # no prefix-matching of serve flags
    _own_args(own)
    parsed, serve_flags = own.parse_known_args(args.serve_flags)
    defaults = vars(own.parse_args([]))
    for k, v in vars(parsed).items():
        if v != defaults[k]:
            setattr(args, k, v)
    args.serve_flags = serve_flags


async def one_run(model: str, flags: list[str], cache_dir: str, log: Path, timeout: float) -> dict:
    env = {"TORCHINDUCTOR_CACHE_DIR": os.path.join(cache_dir, "inductor"),
           "TRITON_CACHE_DIR": os.path.join(cache_dir, "triton")}
    server = ServerProcess(model, flags, log, env)
    try:
        health_s = await server.wait_ready(timeout)
        async with make_session(timeout) as session:
            name = await first_model(session, server.url)
            payload = chat_payload(name, SHORT_TEMPLATE.format(animal(0)), 8, 0.0, False)
            r = await stream_chat(session, server.url, payload)
        if not r.ok:
            raise ServerError(f"the first request failed: {r.error}")
        first_token_s = r.start + r.ttft_s - server.t_start
    finally:
        status = server.stop()
    return {"health_s": health_s, "first_token_s": first_token_s, "first_request_ttft_s": r.ttft_s,
            "compiled_graphs": server.compiled_graphs(), "exit_status": status, "log": str(log)}


def run_plan(args: argparse.Namespace, plan: list[str], log_dir: Path) -> list[dict] | None:
    """One server launch per entry of ``plan``; None (after saying why) if one fails."""
    shared_cache = tempfile.mkdtemp(prefix="deltaserve-cache-")
    runs = []
    try:
        for k, label in enumerate(plan):
            cache = tempfile.mkdtemp(prefix="deltaserve-cache-") if args.cold else shared_cache
            try:
                r = asyncio.run(one_run(args.model, args.serve_flags, cache, log_dir / f"server-{k}.log",
                                        args.timeout))
            except (ServerError, ValueError, aiohttp.ClientError, asyncio.TimeoutError) as e:
                print(f"error: run {k} ({label}): {e}", file=sys.stderr)
                return None
            finally:
                if args.cold:  # compile caches can be large
                    shutil.rmtree(cache, ignore_errors=True)
            runs.append({"run": k, "cache": label, **r})
            print(f"run {k} ({label}): /health {r['health_s']:.2f} s, first token {r['first_token_s']:.2f} s",
                  file=sys.stderr)
    finally:
        shutil.rmtree(shared_cache, ignore_errors=True)
    return runs


def main(args: argparse.Namespace) -> int:
    split_flags(args)
    if args.runs < 1:
        print("error: --runs must be >= 1", file=sys.stderr)
        return 2
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="deltaserve-startup-"))
    plan = ([] if args.cold else ["warm-up (discarded)"]) + [("cold" if args.cold else "warm")] * args.runs
    runs = run_plan(args, plan, log_dir)
    if runs is None:
        return 1
    kept = [r for r in runs if not r["cache"].startswith("warm-up")]
    compiling = "--compile" in args.serve_flags
    env = environment()
    print(format_environment(env))
    print(f"deltaserve serve {args.model} {' '.join(args.serve_flags)}: {len(kept)} {plan[-1]} runs"
          f"{'' if args.cold else ' after one discarded warm-up run'}; logs in {log_dir}")
    rows = [[str(r["run"]), r["cache"], num(r["health_s"], 2), num(r["first_token_s"], 2),
             str(r["compiled_graphs"]) if compiling and r["compiled_graphs"] is not None else "n/a"] for r in runs]
    summary = {k: stats.summarize([r[k] for r in kept]) for k in ("health_s", "first_token_s")}
    ci = {k: f"{num(s['mean'], 2)} [{num(s['ci_low'], 2)}, {num(s['ci_high'], 2)}]" for k, s in summary.items()}
    rows.append(["mean", f"95% CI, n={len(kept)}", ci["health_s"], ci["first_token_s"], ""])
    print(text_table(["run", "cache", "to /health s", "to first token s", "compiled graphs"], rows))
    if compiling and all(r["compiled_graphs"] is None for r in runs):
        print("compiled graphs: n/a (the server log has no 'compiled graphs: N' line)")
    if args.output:
        write_json(args.output, {"environment": env, "model": args.model, "serve_flags": args.serve_flags,
                                 "cold": args.cold, "runs": runs, "summary": summary})
    return 0
