"""Statistics for benchmark reports: percentiles, means with confidence intervals, A/B comparisons.

Pure Python (no numpy/scipy at run time), so every number a report prints can be traced to a few
lines here. What each figure rests on:

- ``percentile``: linear interpolation between order statistics (numpy's default ``linear``
  method, Hyndman & Fan type 7). A tail percentile is only as good as the samples beyond it: with
  n samples, p99 has n/100 of them; for n < 100 it is essentially the maximum.
- ``mean_ci``: Student-t interval ``mean +- t(1 - alpha/2, n - 1) * s / sqrt(n)``. Rests on the
  samples being independent and the *mean* being roughly normal (true for sums of many small
  effects such as per-round throughputs; not for a handful of heavy-tailed latencies).
- ``compare`` (A/B), linear scale: Welch's unequal-variance t interval for ``mean(B) - mean(A)``
  with the Welch-Satterthwaite degrees of freedom; same assumptions per side, no equal-variance
  assumption. Delta % and its interval are that interval divided by ``mean(A)`` (A's mean taken as
  a fixed reference: fine when each side's coefficient of variation is a few %).
- ``compare(..., log=True)``: the same Welch interval on the logarithms, i.e. for the ratio of the
  geometric means; delta % = ``100 * (exp(d) - 1)`` with the interval's ends mapped the same way,
  so the denominator's uncertainty is included. It rests on log-normal noise, the natural model
  for positive multiplicative quantities (throughput, latency): noise proportional to the level
  gives both sides similar log-variances even when B is 10x slower, which keeps the degrees of
  freedom (and the power) up where the linear scale would drop to df ~ 1.
- Verdict: if the interval of the difference (of means, or of mean logs) contains 0, no
  difference is resolved at this confidence.
- ``t_ppf``: the Student-t quantile, by bisection on the exact CDF (the regularized incomplete beta
  function, continued fraction as in Numerical Recipes 6.4), so it also serves Welch's fractional
  degrees of freedom. Checked in the tests against the printed t table.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

NO_DIFFERENCE = "no difference resolved"


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation, like ``numpy.percentile``."""
    if not xs:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q={q} is outside [0, 100]")
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def std(xs: list[float], ddof: int = 1) -> float:
    """Standard deviation; ``ddof=1`` (sample) by default, ``ddof=0`` is numpy's/vLLM's ``np.std``."""
    if len(xs) <= ddof:
        return math.nan
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - ddof))


# -- Student t ------------------------------------------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    # The continued fraction converges fast for x < (a+1)/(a+b+2); use the symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` (possibly fractional) degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_ppf(p: float, df: float) -> float:
    """The p-quantile of Student's t (e.g. ``t_ppf(0.975, 10) = 2.228``)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_ppf: p={p} is outside (0, 1)")
    if not df > 0:
        raise ValueError(f"t_ppf: df={df} must be positive")
    if df > 1e7:
        return NormalDist().inv_cdf(p)
    if p < 0.5:
        return -t_ppf(1.0 - p, df)
    hi = 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    lo = 0.0
    for _ in range(200):  # bisection: 200 halvings reach float precision from any bracket
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# -- intervals ------------------------------------------------------------------------------------
@dataclass
class MeanCI:
    """A mean with its two-sided Student-t interval; ``low``/``high`` are NaN when n < 2."""

    n: int
    mean: float
    std: float
    low: float
    high: float
    confidence: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def to_dict(self) -> dict:
        return asdict(self)


def mean_ci(xs: list[float], confidence: float = 0.95) -> MeanCI:
    n, m, s = len(xs), mean(xs), std(xs)
    if n < 2:
        return MeanCI(n, m, math.nan, math.nan, math.nan, confidence)
    h = t_ppf(0.5 + confidence / 2, n - 1) * s / math.sqrt(n)
    return MeanCI(n, m, s, m - h, m + h, confidence)


@dataclass
class Comparison:
    """B versus A: the difference (of means, or of mean logs), delta % of A, the intervals, the verdict."""

    a: MeanCI
    b: MeanCI
    scale: str  # "linear": diff is mean(B) - mean(A); "log": diff is mean(ln B) - mean(ln A)
    diff: float
    diff_low: float
    diff_high: float
    delta_pct: float
    delta_pct_low: float
    delta_pct_high: float
    df: float
    verdict: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["a"], d["b"] = self.a.to_dict(), self.b.to_dict()
        return d


def welch_interval(a: list[float], b: list[float], confidence: float = 0.95) -> tuple[float, float, float, float]:
    """(diff, low, high, df) for ``mean(b) - mean(a)``, Welch's t with Welch-Satterthwaite df."""
    na, nb = len(a), len(b)
    diff = mean(b) - mean(a)
    if na < 2 or nb < 2:
        return diff, math.nan, math.nan, math.nan
    va, vb = std(a) ** 2 / na, std(b) ** 2 / nb
    se2 = va + vb
    if se2 == 0.0:  # both sides constant: the difference is exact
        return diff, diff, diff, math.inf
    df = se2**2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
    h = t_ppf(0.5 + confidence / 2, df) * math.sqrt(se2)
    return diff, diff - h, diff + h, df


def verdict(low: float, high: float, diff: float, higher_is_better: bool) -> str:
    """"A faster" / "B faster" when the interval of B - A excludes 0, else "no difference resolved"."""
    if math.isnan(low) or math.isnan(high):
        return NO_DIFFERENCE + " (too few samples for an interval)"
    if low <= 0.0 <= high:
        return NO_DIFFERENCE
    b_better = (diff > 0) == higher_is_better
    return "B faster" if b_better else "A faster"


def compare(a: list[float], b: list[float], higher_is_better: bool = True, confidence: float = 0.95,
            log: bool = False) -> Comparison:
    """Compare two independent samples (e.g. per-trial throughputs of servers A and B)."""
    if log:
        if min(a + b, default=1.0) <= 0:
            raise ValueError("compare(log=True) needs positive values")
        diff, low, high, df = welch_interval([math.log(x) for x in a], [math.log(x) for x in b], confidence)
        pct = [100.0 * math.expm1(x) for x in (diff, low, high)]
    else:
        diff, low, high, df = welch_interval(a, b, confidence)
        ma = mean(a)
        pct = [100.0 * x / ma if ma else math.nan for x in (diff, low, high)]
    return Comparison(mean_ci(a, confidence), mean_ci(b, confidence), "log" if log else "linear", diff, low, high,
                      *pct, df, verdict(low, high, diff, higher_is_better))


def compare_paired(a: list[float], b: list[float], higher_is_better: bool = True, confidence: float = 0.95) -> Comparison:
    """Compare paired samples (``a[i]`` and ``b[i]`` measured side by side): the Student t interval of the
    mean log ratio ``ln(b[i] / a[i])`` with n - 1 degrees of freedom. What the pairs share (the machine's
    state at that time) cancels, which independent samples cannot exploit."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths; got {len(a)} and {len(b)}")
    if min(a + b, default=1.0) <= 0:
        raise ValueError("compare_paired needs positive values")
    d = [math.log(y) - math.log(x) for x, y in zip(a, b)]
    ci = mean_ci(d, confidence)
    diff, low, high = ci.mean, ci.low, ci.high
    pct = [100.0 * math.expm1(x) for x in (diff, low, high)]
    return Comparison(mean_ci(a, confidence), mean_ci(b, confidence), "paired log", diff, low, high, *pct,
                      float(len(d) - 1), verdict(low, high, diff, higher_is_better))


# -- summaries ------------------------------------------------------------------------------------
def summarize(xs: list[float], confidence: float = 0.95) -> dict:
    """n, mean (with its interval), sample std, median, p90/p95/p99, min, max of one sample."""
    ci = mean_ci(xs, confidence)
    return {"n": len(xs), "confidence": confidence, "mean": ci.mean, "ci_low": ci.low, "ci_high": ci.high,
            "std": ci.std,
            "median": percentile(xs, 50), "p90": percentile(xs, 90), "p95": percentile(xs, 95),
            "p99": percentile(xs, 99), "min": min(xs) if xs else math.nan, "max": max(xs) if xs else math.nan}
