"""Shared output of the serving benchmarks: text and Markdown tables, JSON files, and plots.

Every printed figure says how many samples it rests on; a figure from fewer than ``LOW_N`` is
flagged "low" (the seed's tables printed a "p95" of a single request without saying so).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

LOW_N = 20  # fewer samples than this: the figure is printed with "(n=.., low)"


def num(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def with_n(x: float | None, n: int, digits: int = 1, always: bool = False) -> str:
    """``12.3`` if n is enough, ``12.3 (n=12, low)`` if not; ``always`` prints n regardless."""
    if n < LOW_N:
        return f"{num(x, digits)} (n={n}, low)"
    return f"{num(x, digits)} (n={n})" if always else num(x, digits)


def mean_pm(summary: dict, digits: int = 1) -> str:
    """``mean ± half-width (n=k)`` of a ``stats.summarize`` dict; the interval shows what n buys."""
    lo, hi = summary.get("ci_low"), summary.get("ci_high")
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return f"{num(summary['mean'], digits)} (n={summary['n']}, no CI)"
    return f"{num(summary['mean'], digits)} ± {num((hi - lo) / 2, digits)} (n={summary['n']})"


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    """A right-aligned plain-text table (first column left-aligned)."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    def esc(c: Any) -> str:
        return str(c).replace("|", "\\|")

    out = ["| " + " | ".join(esc(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def json_safe(obj: Any) -> Any:
    """NaN and infinities become null: ``json.dump`` would write bare NaN, which is not JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(obj), indent=2) + "\n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on benchmark hosts
    import matplotlib.pyplot as plt

    return plt


def _errbar(summary: dict) -> float:
    lo, hi = summary.get("ci_low"), summary.get("ci_high")
    return 0.0 if lo is None or hi is None or math.isnan(lo) else (hi - lo) / 2


def plot_sweep(levels: list[dict], path: str | Path, title: str) -> None:
    """Combined tok/s (mean, 95% CI over rounds) and TTFT (median, p95) against concurrency."""
    plt = _pyplot()
    ns = [lv["concurrency"] for lv in levels]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.errorbar(ns, [lv["combined_tok_s"]["mean"] for lv in levels],
                 yerr=[_errbar(lv["combined_tok_s"]) for lv in levels], marker="o", capsize=4)
    ax1.set(xlabel="concurrent requests N", ylabel="combined tok/s (mean, 95% CI)", xscale="log", xticks=ns)
    ax2.plot(ns, [lv["median_ttft_ms"] for lv in levels], marker="o", label="median")
    ax2.plot(ns, [lv["p95_ttft_ms"] for lv in levels], marker="s", linestyle="--", label="p95")
    ax2.set(xlabel="concurrent requests N", ylabel="TTFT (ms)", xscale="log", xticks=ns)
    ax2.legend()
    for ax in (ax1, ax2):
        ax.minorticks_off()  # log axis: only the measured levels get a tick
        ax.set_xticklabels([str(n) for n in ns])
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ab(rows: list[dict], path: str | Path, title: str) -> None:
    """A and B side by side per N: bars are means over trials, dots the trials themselves (with n = 2
    or 3 a t interval is wide; the dots show the spread it comes from)."""
    plt = _pyplot()
    ns = [r["concurrency"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "combined_tok_s", "combined tok/s"), (axes[1], "ttft_ms", "median TTFT (ms)")):
        for k, side in enumerate(("a", "b")):
            xs = [i + (k - 0.5) * 0.38 for i in range(len(ns))]
            ax.bar(xs, [r[key][side]["mean"] for r in rows], width=0.38, alpha=0.6, color=f"C{k}",
                   label=f"{side.upper()} (mean)")
            for x, r in zip(xs, rows):
                vals = r[key][f"{side}_trials"]
                ax.scatter([x] * len(vals), vals, color=f"C{k}", edgecolor="black", zorder=3, s=18)
        ax.set(xticks=list(range(len(ns))), xlabel="concurrent requests N", ylabel=f"{label}, per trial")
        ax.set_xticklabels([str(n) for n in ns])
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
