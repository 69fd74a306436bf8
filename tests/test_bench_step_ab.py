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
    (["--a", "fused", "--b", "fused"], "--a and --b are both 'fused' with the same options: give two different"),
    (["--a", "fused", "--b", "fused", "--b-flags=--skinny-dense"], "--a and --b are both 'fused' with the same"),
    (["--b-flags=--max-num-seqs 4"], "--b-flags '--max-num-seqs 4' changes max_num_seqs, fixed when the engine "
                                     "starts: a side may only change the options read at kernel launch"),
    (["--a-flags=--bogus"], "--a-flags: unrecognized arguments: --bogus"),
    (["--b-flags=--pdl-preload"], "pdl_preload=True is invalid"),
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


def test_side_flags_apply_their_kernel_options_to_their_side_only(tmp_path, monkeypatch):
    """``--b-flags``: B's steps run with B's kernel options, A's with the engine's; the engine's are back
    afterwards. The shared options (here the preset's model) stay shared."""
    import deltaserve.engine.runner as runner_module

    seen = []
    original = runner_module.ModelRunner.apply_kernel_options

    def recording(self, cfg):
        seen.append(cfg.skinny_dense)
        original(self, cfg)

    monkeypatch.setattr(runner_module.ModelRunner, "apply_kernel_options", recording)
    out = tmp_path / "step-ab.json"
    # a --preset (a model path shared by both sides, which a side's flags must not reset)
    assert main(["--log-level", "warning", "bench", "step-ab", "--preset", "tiny", "--a", "fused", "--b", "fused",
                 "--b-flags=--no-skinny-dense", "--batch", "1", "--trials", "2", "--replays", "1",
                 "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (report["a_flags"], report["b_flags"]) == ("", "--no-skinny-dense")
    assert seen[0] is True  # the engine's own, at start-up
    assert seen.count(False) == 3  # B's warm-up sample and its two trials, each restored afterwards
    assert seen[-1] is True


def test_rows_decode_distinct_tokens(monkeypatch):
    """Each row gets its own input token (an MoE routes identical rows to the same k experts, which would
    understate an N-batch's step), fixed by the seed."""
    import deltaserve.bench.step_ab as step_ab

    tokens = step_ab.row_tokens(16, 1000)
    assert tokens.equal(step_ab.row_tokens(16, 1000)) and len(set(tokens.tolist())) > 8
    assert 10 <= int(tokens.min()) and int(tokens.max()) < 1000
    written = []
    original = step_ab.decode_at_position_one

    def recording(graphs, slots, tokens):
        original(graphs, slots, tokens)
        written.append(graphs.input_ids.tolist())

    monkeypatch.setattr(step_ab, "decode_at_position_one", recording)
    assert main(["--log-level", "warning", "bench", "step-ab", "--batch", "1,4", "--trials", "2", "--replays", "1"]) == 0
    assert len(written) == 2 and written[0] == written[1] and len(set(written[0])) == 4
