"""Statistics of hit counts: the Wilson interval of an accuracy and the paired comparison of two runs.

Pure functions of counts and (run hit, reference hit) pairs; they know nothing of records, answers or question
types (``surgvqa.metrics`` scores the records and pairs them). This module imports nothing from surgvqa. The
methods are written out in EVAL_STRATEGY.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

PAIRED_ALPHA = 0.05
PAIRED_INTERVAL = "Newcombe (1998) method 10: hybrid Wilson score interval for a difference of paired proportions"
PAIRED_TEST = "exact McNemar: two-sided binomial test on the discordant pairs (b, c), p = 1/2"


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials; (0.0, 1.0) when n == 0."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval: k={k} not in [0, n={n}]")
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: P(a Binomial(b + c, 1/2) is at least as far from (b + c)/2 as b); 1.0
    when there is no discordant pair. Computed with integers, so it stays exact for thousands of pairs."""
    if b < 0 or c < 0:
        raise ValueError(f"mcnemar_exact_p: counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, float(Fraction(2 * tail, 2**n)))


def paired_difference_interval(
    both: int, run_only: int, reference_only: int, neither: int, z: float = 1.96
) -> tuple[float, float]:
    """95 % interval for run accuracy − reference accuracy on the same samples (Newcombe 1998, method 10).

    ``both``/``neither``: pairs both runs got right/wrong; ``run_only``/``reference_only``: the discordant pairs.
    Combines each accuracy's Wilson interval with the correlation (phi) of the paired outcomes, so it stays inside
    [-1, 1] and behaves at 0 % and 100 %, where the Wald interval on paired differences collapses to a point.
    """
    n = both + run_only + reference_only + neither
    if n <= 0:
        return (-1.0, 1.0)
    run_k, ref_k = both + run_only, both + reference_only
    p1, p2 = run_k / n, ref_k / n
    l1, u1 = wilson_interval(run_k, n, z)
    l2, u2 = wilson_interval(ref_k, n, z)
    denom = run_k * (n - run_k) * ref_k * (n - ref_k)
    # Newcombe's phi: the correlation of the paired outcomes, its positive part shrunk by n/2 (as in the paper)
    cross = both * neither - run_only * reference_only
    if denom == 0 or 0 <= cross <= n / 2:
        phi = 0.0
    elif cross > n / 2:
        phi = (cross - n / 2) / math.sqrt(denom)
    else:
        phi = cross / math.sqrt(denom)
    delta = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    eps = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    diff = p1 - p2
    return (max(-1.0, diff - delta), min(1.0, diff + eps))


def _pts(x: float) -> str:
    return f"{100 * x:.1f}"


def paired_verdict(stats: Mapping[str, Any], removed: str | None, alpha: float) -> str:
    """One sentence for ``paired_stats``: what ``removed`` carries (or that nothing measurable is lost)."""
    if stats["n"] == 0:
        return "no paired samples"
    drop, p = stats["drop"], stats["p_value"]
    lo, hi = stats["difference_ci95"]
    ci = f"95% CI of run - reference [{_pts(lo)}, {_pts(hi)}] pts"
    p_text = f"p = {p:.2g}" if p >= 1e-4 else f"p = {p:.1e}"
    significant = p < alpha
    if removed:
        if significant and drop > 0:
            return f"{removed} carries {_pts(drop)} pts, {p_text} ({ci}, n = {stats['n']})"
        if significant and drop < 0:
            return (
                f"removing {removed} RAISES accuracy by {_pts(-drop)} pts, {p_text} ({ci}, n = {stats['n']}); "
                "check the runs"
            )
        return (
            f"no measurable drop without {removed} ({p_text} >= {alpha:g}): observed drop {_pts(drop)} pts "
            f"({ci}, n = {stats['n']})"
        )
    if significant:
        better = "reference" if drop > 0 else "run"
        return f"the {better} scores {_pts(abs(drop))} pts higher, {p_text} ({ci}, n = {stats['n']})"
    return (
        f"no measurable difference ({p_text} >= {alpha:g}): run - reference {_pts(-drop)} pts "
        f"({ci}, n = {stats['n']})"
    )


def paired_stats(pairs: Sequence[tuple[bool, bool]], removed: str | None, alpha: float) -> dict[str, Any]:
    """Accuracies, 2x2 table, paired interval, exact McNemar p-value and verdict of (run hit, reference hit)
    pairs; see ``surgvqa.metrics.paired_comparison`` for the fields."""
    n = len(pairs)
    both = sum(1 for run, ref in pairs if run and ref)
    neither = sum(1 for run, ref in pairs if not run and not ref)
    b = sum(1 for run, ref in pairs if ref and not run)  # reference right, run wrong: a loss
    c = sum(1 for run, ref in pairs if run and not ref)  # run right, reference wrong: a gain
    stats: dict[str, Any] = {
        "n": n,
        "run_hits": both + c,
        "reference_hits": both + b,
        "run_accuracy": (both + c) / n if n else None,
        "reference_accuracy": (both + b) / n if n else None,
        "both_right": both,
        "both_wrong": neither,
        "b": b,
        "c": c,
        "difference": (c - b) / n if n else None,
        "drop": (b - c) / n if n else None,
        "difference_ci95": list(paired_difference_interval(both, c, b, neither)),
        "p_value": mcnemar_exact_p(b, c),
    }
    stats["verdict"] = paired_verdict(stats, removed, alpha)
    return stats
