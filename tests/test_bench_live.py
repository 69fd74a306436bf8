"""The serving benchmarks end to end against real ``deltaserve serve`` subprocesses on the tiny model.

Each benchmark runs in-process through the real CLI parser (``deltaserve bench ...``); the servers it
talks to are subprocesses. Small on purpose (max_tokens 16, N = 1, 2, few rounds): the whole file
takes a few minutes on two CPU cores, most of it server start-ups.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deltaserve.bench.ab import equivalence, first_difference
from deltaserve.bench.startup import ServerProcess
from deltaserve.cli import build_parser
from deltaserve.models.make_model import make_model

MAX_TOKENS = 16
SMALL_SWEEP = ["--concurrency", "1,2", "--max-tokens", str(MAX_TOKENS), "--repeats", "2", "--warmups", "1",
               "--ignore-eos"]
VLLM_KEYS = ["completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
             "output_throughput", "total_token_throughput"] + [
    f"{stat}_{metric}_ms" for metric in ("ttft", "tpot", "itl", "e2el")
    for stat in ("mean", "median", "std", "p90", "p95", "p99")]


def bench(*argv: str) -> int:
    args = build_parser().parse_args(["bench", *argv])
    return args.func(args)


@pytest.fixture(scope="module", autouse=True)
def one_thread_servers():
    """Servers (and this process) with one OpenMP thread. On a small shared CPU box, a server's
    2-thread pool spin-waiting against another process's stretches a tiny model's step from ~5 ms
    to hundreds of ms at random, which would swamp the 40 ms per-step difference the A/B must see."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model("tiny", tmp_path_factory.mktemp("model") / "tiny")


class TestOneServer:
    """sweep and ttft against one server, stopped before the A/B tests start their own."""

    @pytest.fixture(scope="class")
    def url(self, model_dir, tmp_path_factory):
        server = ServerProcess(str(model_dir), ["--max-num-seqs", "4"], tmp_path_factory.mktemp("log") / "serve.log")
        try:
            asyncio.run(server.wait_ready(180))
            yield server.url
        finally:
            status = server.stop()
        assert status == 0  # SIGTERM: a clean drain and exit

    def test_sweep_counts_tokens_and_writes_a_complete_report(self, url, tmp_path):
        out = tmp_path / "sweep.json"
        assert bench("sweep", "--url", url, *SMALL_SWEEP, "--output", str(out)) == 0
        report = json.loads(out.read_text())
        assert out.with_suffix(".png").stat().st_size > 10_000
        assert {"date", "card", "torch", "commit", "command"} <= report["environment"].keys()
        assert report["args"]["max_tokens"] == MAX_TOKENS and report["model"]
        assert [lv["concurrency"] for lv in report["levels"]] == [1, 2]
        for lv in report["levels"]:
            n = lv["concurrency"]
            assert all(lv[k] is not None for k in VLLM_KEYS), [k for k in VLLM_KEYS if lv[k] is None]
            assert (lv["completed"], lv["failed"], lv["warmup_rounds"], lv["rounds"]) == (2 * n, 0, 1, 2)
            assert lv["samples"]["ttft"] == 2 * n and lv["samples"]["itl"] > 0 and lv["samples"]["combined_tok_s"] == 2
            combined = []
            for rd in lv["round_records"]:
                assert len(rd["requests"]) == n
                assert [r["completion_tokens"] for r in rd["requests"]] == [MAX_TOKENS] * n  # ignore_eos honoured
                assert all(0 < r["ttft_s"] < r["e2e_s"] < rd["wall_s"] for r in rd["requests"])
                # combined tok/s is recomputed from the raw records, not trusted
                combined.append(sum(r["completion_tokens"] for r in rd["requests"]) / rd["wall_s"])
                assert rd["combined_tok_s"] == pytest.approx(combined[-1])
            assert lv["combined_tok_s"]["mean"] == pytest.approx(sum(combined) / len(combined))
            assert lv["total_output_tokens"] == 2 * n * MAX_TOKENS
            assert lv["output_throughput"] == pytest.approx(2 * n * MAX_TOKENS / lv["duration"])
            assert lv["median_tpot_ms"] > 0 and lv["p99_ttft_ms"] >= lv["median_ttft_ms"] > 0

    def test_ttft_counts_its_samples(self, url, tmp_path):
        out = tmp_path / "ttft.json"
        assert bench("ttft", "--url", url, "--warmups", "2", "--requests", "6", "--output", str(out)) == 0
        report = json.loads(out.read_text())
        s = report["summary"]
        short = s["prompt_tokens_mean"]
        longer = tmp_path / "long.json"
        assert bench("ttft", "--url", url, "--warmups", "0", "--requests", "2", "--output", str(longer),
                     "--prompt-template", "Name one fact about the {} and say why it matters to its herd.") == 0
        assert json.loads(longer.read_text())["summary"]["prompt_tokens_mean"] > short > 0
        assert (s["n"], s["failed"], len(report["requests"])) == (6, 0, 6)
        assert 0 < s["min_ms"] <= s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"] <= s["max_ms"]
        assert s["stddev_ms"] >= 0


def run_ab(model_dir: Path, out: Path, a: str, b: str, *extra: str) -> dict:
    assert bench("ab", str(model_dir), f"--a={a}", f"--b={b}", *SMALL_SWEEP, *extra, "--output", str(out)) == 0
    assert (out / "report.md").exists() and (out / "ab.png").stat().st_size > 10_000
    for side in "AB":
        assert (out / f"server-{side}-1.log").read_text()
    return json.loads((out / "ab.json").read_text())


def test_ab_identical_configs_resolve_no_difference(model_dir, tmp_path):
    # Same flags on both sides: only noise differs. At 99% confidence a correct interval declares a
    # difference in ~1% of runs per level; one resting on rounds instead of server starts (rounds of
    # one server are not independent), or a side-dependent bias, far more often. Three trials, not
    # two: with n = 2 the spread itself is one number, and by chance often a tiny one.
    report = run_ab(model_dir, tmp_path, "--max-num-seqs 4", "--max-num-seqs 4", "--trials", "3",
                    "--confidence", "0.99")
    assert [t["side"] + str(t["trial"]) for t in report["trials"]] == ["A1", "B1", "B2", "A2", "A3", "B3"]
    # every trial starts fresh servers, so every trial warms them up
    assert all(lv["warmup_rounds"] == 1 for t in report["trials"] for lv in t["levels"])
    for row in report["comparison"]:
        assert row["combined_tok_s"]["comparison"]["verdict"] == "no difference resolved", row
        assert len(row["combined_tok_s"]["a_trials"]) == 3 and row["failed"] == {"a": 0, "b": 0}
    # per-token gaps only in the level summaries (--save-detailed keeps the raw lists: test_ab_paired_...)
    reqs = [r for t in report["trials"] for lv in t["levels"] for rd in lv["round_records"] for r in rd["requests"]]
    assert reqs and all("itl_s" not in r and r["ttft_s"] > 0 for r in reqs)
    assert all(lv["samples"]["itl"] > 0 and lv["p99_itl_ms"] > 0 for t in report["trials"] for lv in t["levels"])
    assert len(report["equivalence"]) == 5
    for eq in report["equivalence"]:
        assert eq["equal"] and eq["a_reproducible"] and eq["b_reproducible"], eq
        assert len(set(eq["a_sha256"] + eq["b_sha256"])) == 1
    md = (tmp_path / "report.md").read_text()
    assert "no difference resolved" in md and "## Output equivalence" in md and "card:" in md


def test_ab_detects_a_slower_server(model_dir, tmp_path):
    report = run_ab(model_dir, tmp_path, "--max-num-seqs 4", "--max-num-seqs 4 --debug-step-delay-ms 40",
                    "--trials", "3", "--equiv-prompts", "1")
    for row in report["comparison"]:
        c = row["combined_tok_s"]["comparison"]
        assert c["verdict"] == "A faster", row
        assert c["delta_pct_high"] < 0
    # a slower server is not a different one: the greedy outputs still match
    assert report["equivalence"][0]["equal"]


def test_ab_paired_runs_both_servers_once_and_detects_a_slower_one(model_dir, tmp_path):
    out = tmp_path / "paired"
    assert bench("ab", str(model_dir), "--a=--max-num-seqs 4", "--b=--max-num-seqs 4 --debug-step-delay-ms 40",
                 *SMALL_SWEEP, "--paired", "--trials", "3", "--equiv-prompts", "1", "--save-detailed",
                 "--output", str(out)) == 0
    report = json.loads((out / "ab.json").read_text())
    assert sorted(p.name for p in out.glob("server-*.log")) == ["server-A.log", "server-B.log"]  # one start each
    reqs = [r for t in report["trials"] for lv in t["levels"] for rd in lv["round_records"] for r in rd["requests"]]
    assert reqs and all(0 < len(r["itl_s"]) < r["completion_tokens"] for r in reqs)  # --save-detailed
    assert [t["side"] + str(t["trial"]) for t in report["trials"]] == ["A1", "B1", "B2", "A2", "A3", "B3"]
    # warm-up rounds in the first trial only: the servers stay up between trials
    assert [{lv["warmup_rounds"] for lv in t["levels"]} for t in report["trials"]] == [{1}, {1}] + [{0}] * 4
    for row in report["comparison"]:
        c = row["combined_tok_s"]["comparison"]
        assert c["scale"] == "paired log" and c["df"] == 2.0
        assert c["verdict"] == "A faster" and c["delta_pct_high"] < 0, row
    assert report["equivalence"][0]["equal"] and report["equivalence"][0]["a_reproducible"]
    assert "Paired mode" in (out / "report.md").read_text()


def test_equivalence_locates_the_first_difference(model_dir):
    assert first_difference("abcd", "abxd") == 2
    assert first_difference("abc", "abc") is None
    assert first_difference("abc", "abcd") == 3
    assert first_difference([1, 2, 3], [1, 2, 4]) == 2

    def trial(side: str, k: int, text: str) -> dict:
        return {"side": side, "trial": k, "outputs": [{"prompt": "p", "text": text, "sha256": str(hash(text))}]}

    same, other = "the cat sat on the mat", "the cat sat on a hat"
    rows = equivalence([trial("A", 1, same), trial("B", 1, other), trial("A", 2, same), trial("B", 2, same)],
                       str(model_dir))
    r = rows[0]
    assert r["a_reproducible"] and not r["b_reproducible"] and not r["equal"]
    assert r["first_diff_char"] == same.index("the mat")
    assert isinstance(r["first_diff_token"], int) and 0 < r["first_diff_token"] <= r["first_diff_char"]


def test_startup_smoke(model_dir, tmp_path):
    out = tmp_path / "startup.json"
    assert bench("startup", str(model_dir), "--max-num-seqs", "4", "--cold", "--runs", "1",
                 "--log-dir", str(tmp_path), "--output", str(out)) == 0
    report = json.loads(out.read_text())
    assert report["serve_flags"] == ["--max-num-seqs", "4"] and report["cold"]
    [run] = report["runs"]
    assert 0 < run["health_s"] < run["first_token_s"]
    assert run["exit_status"] == 0 and run["compiled_graphs"] is None  # no --compile
    assert report["summary"]["health_s"]["n"] == 1


def test_a_terminated_benchmark_takes_its_servers_down(model_dir, tmp_path):
    """Servers run in their own sessions, so `timeout` stopping a benchmark does not reach them: the
    benchmark kills them itself (one left behind held 126 GB of an H200 and broke the next runs)."""
    script = (
        "import sys, time\n"
        "from deltaserve.bench.startup import ServerProcess\n"
        f"s = ServerProcess({str(model_dir)!r}, [], {str(tmp_path / 'server.log')!r})\n"
        "print(s.proc.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    bench_proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    server_pid = int(bench_proc.stdout.readline())
    os.kill(server_pid, 0)  # alive
    bench_proc.send_signal(signal.SIGTERM)
    assert bench_proc.wait(timeout=30) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(server_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"server {server_pid} outlived the benchmark")


def test_a_stopped_ab_reports_the_pairs_it_completed(model_dir, tmp_path):
    """SIGTERM mid-run (`timeout` ending a device call): `bench ab` kills its servers, drops the lone side
    of an unfinished pair and reports the completed pairs, saying it ended early. ab.json is rewritten
    after every trial, so the trials are on disk before the signal."""
    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "deltaserve.cli", "bench", "ab", str(model_dir), "--a=--max-num-seqs 4",
           "--b=--max-num-seqs 4", *SMALL_SWEEP, "--paired", "--trials", "1000", "--equiv-prompts", "1",
           "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len(json.loads((out / "ab.json").read_text())["trials"]) >= 5:  # 2 pairs and a half
                break
        except (OSError, ValueError):  # not written yet, or caught mid-write
            pass
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-2000:]
    report = json.loads((out / "ab.json").read_text())
    n = len(report["trials"]) // 2
    assert n >= 2 and len(report["trials"]) == 2 * n and "partial" not in report
    assert report["stopped"] == f"stopped by signal SIGTERM: {n} of 1000 trials completed both sides"
    assert all(len(row["combined_tok_s"]["a_trials"]) == n for row in report["comparison"])
    assert "The run ended early" in (out / "report.md").read_text()


def test_a_stop_whose_exception_python_dropped_still_reads_as_the_stop(monkeypatch, tmp_path, capsys):
    """A SIGTERM landing while a weakref callback runs: Python prints and drops the handler's Stopped, the
    run goes on against the servers the handler killed, and the connection error that follows is the stop,
    not a failure of the benchmark (the flake this reproduces deterministically)."""
    import aiohttp

    from deltaserve.bench import ab

    async def run_paired(flags, args, out_dir, record, budget):
        try:
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # the handler, its exception lost
        except ab.Stopped:
            pass
        raise aiohttp.ClientConnectionError("Cannot connect to host 127.0.0.1:1")

    monkeypatch.setattr(ab, "run_paired", run_paired)
    monkeypatch.setattr(ab, "kill_live_servers", lambda: None)
    assert bench("ab", str(tmp_path), "--paired", "--trials", "3", "--output", str(tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert "stopped by signal SIGTERM: 0 of 3 trials completed both sides; an interval needs at least 2" in err
    assert "ClientConnectionError" not in err
    assert json.loads((tmp_path / "out" / "ab.json").read_text())["error"].startswith("stopped by signal SIGTERM")


def test_time_budget_starts_no_trial_it_cannot_finish(monkeypatch):
    from deltaserve.bench import ab

    now = [100.0]
    monkeypatch.setattr(ab.time, "monotonic", lambda: now[0])
    budget = ab.Budget(60.0)
    assert budget.allows_another()  # nothing measured yet
    now[0] += 25  # the first trial took 25 s
    budget.timed(100.0)
    assert budget.allows_another()  # 25 + 25 <= 60
    began, now[0] = now[0], now[0] + 20
    budget.timed(began)
    assert budget.longest == 25 and not budget.allows_another()  # 45 + 25 > 60
    assert ab.Budget(None).allows_another()
    assert bench("ab", "/nonexistent", "--time-budget", "0") == 2  # refused before any server starts
    trials = [{"side": s, "trial": k} for k, s in [(1, "A"), (1, "B"), (2, "B"), (2, "A"), (3, "A")]]
    assert [(t["side"], t["trial"]) for t in ab.completed(trials)] == [("A", 1), ("B", 1), ("B", 2), ("A", 2)]
