"""``bench step-ab`` on the CPU with the built-in demo model: the paired samples and verdict it writes,
the engine it leaves as it found it, and the errors for values it cannot run with."""

from __future__ import annotations

import json

import pytest

import deltaserve.engine.engine as engine_module
from deltaserve.bench.step_ab import forced_strategy
from deltaserve.cli import main
from deltaserve.layers.inproj import InProjPlan


def test_step_ab_writes_paired_samples_per_batch_size_and_restores_the_engine(tmp_path, capsys, monkeypatch):
    engines = []

    class RecordingEngine(engine_module.LLMEngine):
        def __init__(self, cfg):
            super().__init__(cfg)
            engines.append(self)

    monkeypatch.setattr(engine_module, "LLMEngine", RecordingEngine)
    out = tmp_path / "step-ab.json"
    assert main(["--log-level", "warning", "bench", "step-ab", "--a", "serial", "--b", "dual", "--batch", "1,2",
                 "--trials", "3", "--replays", "2", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (report["a"], report["b"], report["trials"]) == ("serial", "dual", 3)
    assert [r["n"] for r in report["results"]] == [1, 2]
    for r in report["results"]:
        assert len(r["a_ms"]) == len(r["b_ms"]) == 3 and min(r["a_ms"] + r["b_ms"]) > 0
        c = r["comparison"]
        assert c["scale"] == "paired log" and c["a"]["n"] == c["b"]["n"] == 3
        assert c["verdict"] in ("A faster", "B faster", "no difference resolved")
        assert 0 < r["a_fraction"] == pytest.approx(r["floor_ms"] / r["a_mean_ms"])
    printed = capsys.readouterr().out
    assert "A = serial, B = dual" in printed and "3 interleaved pairs of 2 steps per N" in printed
    rows = [line.split() for line in printed.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert [row[0] for row in rows] == ["1", "2"] and all("%" in row[3] for row in rows)
    (engine,) = engines
    assert engine.runner.plan.strategy == "fused"  # the engine's own (neither side is auto), not the last forced
    assert engine.runner.states.num_free == engine.cfg.max_num_seqs  # the rows' state slots are back


def test_forced_strategy_restores_the_plan_also_when_the_block_raises():
    plan = InProjPlan("auto")
    plan.set_table({16: "fused_gemv", 2048: "fused"})
    with forced_strategy(plan, "serial"):
        assert plan.choose(1) == "serial"
    assert plan.strategy == "auto" and plan.choose(1) == "fused_gemv"
    with pytest.raises(RuntimeError), forced_strategy(plan, "dual"):
        assert plan.choose(100) == "dual"
        raise RuntimeError("a capture failed")
    assert plan.strategy == "auto" and plan.choose(100) == "fused"


@pytest.mark.parametrize("argv,message", [
    (["--a", "fused", "--b", "fused"], "--a and --b are both 'fused': give two different strategies"),
    (["--a", "nope"], "--a 'nope' is not an in_proj strategy: use one of serial, dual, fused, fused_gemv, auto"),
    (["--b", "gemv"], "--b 'gemv' is not an in_proj strategy"),
    (["--trials", "1"], "--trials 1 is too small: use a value >= 2"),
    (["--replays", "0"], "--replays 0 is too small: use a value >= 1"),
    (["--batch", "0,2"], "--batch 0 is too small: use a value >= 1"),
    (["--batch", "1,x"], "--batch '1,x': give comma-separated batch sizes"),
])
def test_step_ab_names_a_value_it_cannot_run_with(capsys, argv, message):
    assert main(["bench", "step-ab", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
