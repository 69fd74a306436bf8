"""``bench offline`` on the CPU with the built-in demo model: the table and JSON it writes, the median of
its timed passes, and the errors for values it cannot run with."""

from __future__ import annotations

import json

import pytest

from deltaserve.cli import main


def test_offline_reports_the_median_pass_per_batch_size(tmp_path, capsys):
    out = tmp_path / "offline.json"
    assert main(["--log-level", "warning", "bench", "offline", "--batch", "1,2", "--input-len", "4",
                 "--output-len", "6", "--repeats", "3", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["n"] for r in report["results"]] == [1, 2]
    for r in report["results"]:
        passes = r["ms_per_step_passes"]
        assert len(passes) == 3 and r["ms_per_step"] == sorted(passes)[1]
        assert r["decode_tok_s"] == pytest.approx(r["n"] * 1e3 / r["ms_per_step"])
        assert r["bytes_per_step"] > r["weight_bytes"] > 0 and 0 < r["fraction"] == pytest.approx(
            r["decode_tok_s"] / r["roofline_tok_s"])
    printed = capsys.readouterr().out
    assert "the built-in demo model" in printed and "median of 3 passes per N" in printed


@pytest.mark.parametrize("flag,value,message", [
    ("--batch", "1,x", "--batch '1,x': give comma-separated batch sizes"),
    ("--batch", "0", "--batch 0 is too small: use a value >= 1"),
    ("--output-len", "1", "--output-len 1 is too small: use a value >= 2"),
    ("--repeats", "0", "--repeats 0 is too small: use a value >= 1"),
])
def test_offline_names_a_value_it_cannot_run_with(capsys, flag, value, message):
    assert main(["bench", "offline", flag, value]) == 2
    assert message in capsys.readouterr().err


def test_async_ab_interleaves_both_modes_in_one_engine(tmp_path, capsys, monkeypatch):
    from deltaserve.bench import offline

    modes, run_batch = [], offline.run_batch

    def spy(engine, n, *a, **kw):
        modes.append((n, engine.async_scheduling))
        return run_batch(engine, n, *a, **kw)

    monkeypatch.setattr(offline, "run_batch", spy)
    out = tmp_path / "ab.json"
    assert main(["--log-level", "warning", "bench", "offline", "--batch", "1,3", "--input-len", "4",
                 "--output-len", "5", "--repeats", "3", "--async-ab", "--output", str(out)]) == 0
    # Per N: a warm-up in the engine's own mode (off on the CPU), then off/on, on/off, off/on.
    timed = [False, True, True, False, False, True]
    assert modes == [(1, False)] + [(1, m) for m in timed] + [(3, False)] + [(3, m) for m in timed]
    for r in json.loads(out.read_text())["results"]:
        assert len(r["ms_per_step_passes"]) == len(r["sync"]["ms_per_step_passes"]) == 3
        c = r["async_vs_sync"]
        assert c["scale"] == "paired log" and c["delta_pct_low"] <= c["delta_pct"] <= c["delta_pct_high"]
    printed = capsys.readouterr().out
    assert "async vs sync [95% CI]" in printed and "3 interleaved pairs per N" in printed


def test_async_ab_refuses_tensor_parallelism(capsys):
    assert main(["bench", "offline", "--async-ab", "--tensor-parallel-size", "2", "--no-async-scheduling"]) == 2
    assert "--async-ab: async scheduling needs tensor_parallel_size 1" in capsys.readouterr().err
