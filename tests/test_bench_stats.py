"""The benchmarks' statistics on data with known answers (numpy, the printed t table, hand-worked
intervals), plus the pure helpers around them: unique prompts, per-level summaries, flags."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from deltaserve.bench import stats
from deltaserve.bench.client import RequestResult, Round
from deltaserve.bench.report import json_safe, with_n
from deltaserve.bench.sweep import summarize_level
from deltaserve.bench.workload import ANIMALS, PromptSource, read_prompt_file

# t(0.975, df) and t(0.995, df) from the printed table (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 60: 2.000, 100: 1.984}
T995 = {1: 63.657, 2: 9.925, 5: 4.032, 10: 3.169, 30: 2.750, 100: 2.626}


@pytest.mark.parametrize("df,t", sorted(T975.items()))
def test_t_quantile_975_matches_table(df, t):
    assert stats.t_ppf(0.975, df) == pytest.approx(t, abs=6e-4)
    assert stats.t_ppf(0.025, df) == pytest.approx(-t, abs=6e-4)


@pytest.mark.parametrize("df,t", sorted(T995.items()))
def test_t_quantile_995_matches_table(df, t):
    assert stats.t_ppf(0.995, df) == pytest.approx(t, abs=6e-4)


def test_t_distribution_limits_and_fractional_df():
    assert stats.t_ppf(0.5, 3) == pytest.approx(0.0, abs=1e-9)
    assert stats.t_ppf(0.975, 1e9) == pytest.approx(1.959964, abs=1e-5)  # the normal limit
    assert stats.t_ppf(0.975, 1e4) == pytest.approx(1.9602, abs=1e-4)
    # Welch's df is fractional: the quantile lies between its integer neighbours and inverts the CDF.
    t = stats.t_ppf(0.975, 3.5)
    assert T975[4] < t < T975[3]
    assert stats.t_cdf(t, 3.5) == pytest.approx(0.975, abs=1e-10)
    with pytest.raises(ValueError):
        stats.t_ppf(1.0, 3)


def test_percentiles_match_numpy_linear():
    rng = random.Random(0)
    for n in (1, 2, 3, 7, 20, 101):
        xs = [rng.lognormvariate(3, 1) for _ in range(n)]
        for q in (0, 1, 25, 50, 90, 95, 99, 100):
            assert stats.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)
    assert math.isnan(stats.percentile([], 50))


def test_mean_std_match_numpy():
    xs = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    assert stats.mean(xs) == pytest.approx(np.mean(xs))
    assert stats.std(xs) == pytest.approx(np.std(xs, ddof=1))
    assert stats.std(xs, ddof=0) == pytest.approx(np.std(xs))


def test_mean_ci_by_hand():
    # [10, 12, 14]: mean 12, s = 2, n = 3 -> 12 +- 4.303 * 2 / sqrt(3) = 12 +- 4.9687
    ci = stats.mean_ci([10.0, 12.0, 14.0])
    assert (ci.mean, ci.std) == (12.0, 2.0)
    assert ci.half_width == pytest.approx(4.303 * 2 / math.sqrt(3), abs=1e-3)
    assert (ci.low, ci.high) == pytest.approx((7.0313, 16.9687), abs=1e-3)
    # one sample has no interval, and says so instead of inventing one
    one = stats.mean_ci([5.0])
    assert one.mean == 5.0 and math.isnan(one.low)


def test_welch_interval_equal_variances_by_hand():
    # s = 1 each, n = 3: se = sqrt(2/3), df = 4, t = 2.776 -> 10 +- 2.2667
    diff, lo, hi, df = stats.welch_interval([100.0, 101.0, 99.0], [110.0, 111.0, 109.0])
    assert diff == 10.0 and df == pytest.approx(4.0)
    assert (lo, hi) == pytest.approx((10 - 2.776 * math.sqrt(2 / 3), 10 + 2.776 * math.sqrt(2 / 3)), abs=1e-3)


def test_welch_satterthwaite_df_unequal():
    # var(a) = 2.5 (n 5), var(b) = 4 (n 3): se^2 = 0.5 + 4/3; df = se^4 / (0.5^2/4 + (4/3)^2/2) = 3.5328
    a, b = [1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 4.0, 6.0]
    diff, lo, hi, df = stats.welch_interval(a, b)
    se2 = 0.5 + 4 / 3
    assert df == pytest.approx(se2**2 / (0.25 / 4 + (4 / 3) ** 2 / 2), rel=1e-12)
    assert df == pytest.approx(3.5328, abs=1e-4)
    assert hi - diff == pytest.approx(stats.t_ppf(0.975, df) * math.sqrt(se2))
    assert diff == pytest.approx(1.0) and lo < 0 < hi


def test_paired_interval_by_hand_and_where_it_beats_welch():
    # A drifts 90 -> 110 over the trials; B is 2% faster in every pair. Log ratios: ln 1.02 each but one,
    # ln(1.03); n = 4, df = 3. Welch on the unpaired samples cannot see the 2% under the drift.
    a = [90.0, 100.0, 105.0, 110.0]
    b = [91.8, 102.0, 108.15, 112.2]
    c = stats.compare_paired(a, b)
    d = [math.log(y / x) for x, y in zip(a, b)]
    h = stats.t_ppf(0.975, 3) * stats.std(d) / 2
    assert c.scale == "paired log" and c.df == 3.0
    assert c.diff == pytest.approx(stats.mean(d)) and (c.diff_low, c.diff_high) == pytest.approx((c.diff - h, c.diff + h))
    assert c.delta_pct == pytest.approx(100 * math.expm1(stats.mean(d)))
    assert c.verdict == "B faster" and c.delta_pct_low > 1.0
    assert stats.compare(a, b, log=True).verdict == "no difference resolved"
    assert stats.compare_paired(b, a, higher_is_better=True).verdict == "A faster"
    assert stats.compare_paired([1.0], [2.0]).verdict.startswith("no difference resolved (too few")
    with pytest.raises(ValueError, match="equal lengths"):
        stats.compare_paired([1.0, 2.0], [1.0])


def test_delta_pct_and_its_interval_linear():
    c = stats.compare([100.0, 101.0, 99.0], [110.0, 111.0, 109.0])
    assert c.delta_pct == pytest.approx(10.0)
    assert (c.delta_pct_low, c.delta_pct_high) == pytest.approx((c.diff_low, c.diff_high))  # mean(A) = 100
    assert c.verdict == "B faster"


def test_delta_pct_log_scale_is_ratio_of_geometric_means():
    a = [100.0, 101.0, 99.0]
    c = stats.compare(a, [2 * x for x in a], log=True)
    assert c.delta_pct == pytest.approx(100.0)  # B is exactly twice A
    assert c.delta_pct_low < 100.0 < c.delta_pct_high
    # exp maps a symmetric log interval to an asymmetric % interval, wider above
    assert c.delta_pct_high - 100.0 > 100.0 - c.delta_pct_low
    assert c.verdict == "B faster"
    with pytest.raises(ValueError):
        stats.compare([1.0, 0.0], [1.0, 2.0], log=True)


def test_verdicts():
    fast, slow = [200.0, 202.0, 198.0, 201.0], [100.0, 101.0, 99.0, 100.5]
    assert stats.compare(fast, slow).verdict == "A faster"  # throughput: higher is better
    assert stats.compare(slow, fast).verdict == "B faster"
    assert stats.compare(slow, fast, higher_is_better=False).verdict == "A faster"  # latency: lower is better
    assert stats.compare(fast, list(fast)).verdict == stats.NO_DIFFERENCE
    assert stats.compare([5.0, 5.0], [5.0, 5.0]).verdict == stats.NO_DIFFERENCE  # exact, zero difference
    assert stats.compare([5.0, 5.0], [6.0, 6.0]).verdict == "B faster"  # exact, non-zero difference
    # overlapping noisy samples whose means differ: the interval straddles 0
    assert stats.compare([100.0, 90.0, 110.0], [104.0, 94.0, 114.0], log=True).verdict == stats.NO_DIFFERENCE
    assert stats.compare([1.0], [2.0, 3.0]).verdict.startswith(stats.NO_DIFFERENCE + " (too few")


def test_summarize_flags_and_json():
    s = stats.summarize([1.0, 2.0, 3.0, 4.0])
    assert s["n"] == 4 and s["median"] == 2.5 and s["max"] == 4.0
    assert with_n(1.234, 12) == "1.2 (n=12, low)"
    assert with_n(1.234, 20) == "1.2"
    # NaN (no interval) must not reach the JSON file as a bare NaN
    assert json.loads(json.dumps(json_safe(stats.summarize([1.0]))))["ci_low"] is None


# -- workload ---------------------------------------------------------------------------------------
def test_animal_prompts_unique_across_a_run():
    assert len(set(ANIMALS)) == len(ANIMALS) >= 64
    src = PromptSource("animals")
    prompts = [p for _ in range(31) for p in src.take(16)]  # levels 1..16, 2 warm-ups + 3 repeats, and more
    assert len(set(prompts)) == len(prompts) == 496
    assert prompts[0] == "Write a 1000-word story about an orange tabby cat."
    src.reset()
    assert src.take(2) == prompts[:2]  # A/B trials replay the same sequence


def test_prompt_file_lines_and_jsonl(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("first prompt\n\n{\"prompt\": \"second\"}\n")
    assert read_prompt_file(f) == ["first prompt", "second"]
    f.write_text("{\"text\": 1}\n")
    with pytest.raises(ValueError, match="prompt"):
        read_prompt_file(f)


# -- per-level summary --------------------------------------------------------------------------------
def _req(ttft: float, e2e: float, n: int, ok: bool = True) -> RequestResult:
    gaps = [(e2e - ttft) / (n - 1)] * (n - 1) if n > 1 else []
    return RequestResult(prompt="p", ok=ok, error=None if ok else "HTTP 500", ttft_s=ttft, e2e_s=e2e,
                         itl_s=gaps if ok else [], prompt_tokens=10, completion_tokens=n if ok else 0)


def test_summarize_level_numbers_rest_on_the_right_samples():
    rounds = [Round([_req(0.1, 1.1, 11), _req(0.2, 2.2, 11)], wall_s=2.5),
              Round([_req(0.1, 1.1, 11), _req(0.0, 0.0, 1, ok=False)], wall_s=2.0)]
    lv = summarize_level(2, rounds, warmups=[Round([_req(0.0, 0.0, 1, ok=False)], 1.0)], confidence=0.95)
    assert (lv["completed"], lv["failed"], lv["warmup_failed"]) == (3, 1, 1)
    assert lv["errors"] == [{"prompt": "p", "error": "HTTP 500"}]
    assert [r["combined_tok_s"] for r in lv["round_records"]] == pytest.approx([22 / 2.5, 11 / 2.0])
    assert lv["combined_tok_s"]["mean"] == pytest.approx((22 / 2.5 + 11 / 2.0) / 2)
    assert lv["output_throughput"] == pytest.approx(33 / 4.5)
    assert lv["total_token_throughput"] == pytest.approx((33 + 30) / 4.5)
    assert lv["samples"] == {"ttft": 3, "tpot": 3, "itl": 30, "e2el": 3, "decode_tok_s": 3, "combined_tok_s": 2}
    assert lv["median_tpot_ms"] == pytest.approx(100.0)  # (1.1 - 0.1) / 10
    assert lv["decode_tok_s"]["median"] == pytest.approx(10.0)
    assert lv["std_ttft_ms"] == pytest.approx(float(np.std([100, 200, 100])))  # vLLM's population std
