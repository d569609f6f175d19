"""Statistics of hit counts: the Wilson interval of an accuracy, the cluster bootstrap, and the paired comparison
of two runs (per question and clustered).

Pure functions of counts, (run hit, reference hit) pairs and cluster labels; they know nothing of records, answers
or question types (``surgvqa.metrics`` scores the records and pairs them, ``surgvqa.clusters`` finds the
clusters). This module imports nothing from surgvqa and needs only numpy. The methods are written out in
EVAL_STRATEGY.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from statistics import NormalDist
from typing import Any

import numpy as np

PAIRED_ALPHA = 0.05
PAIRED_INTERVAL = "Newcombe (1998) method 10: hybrid Wilson score interval for a difference of paired proportions"
PAIRED_TEST = "exact McNemar: two-sided binomial test on the discordant pairs (b, c), p = 1/2"
#: how ``resample_counts`` draws a bootstrap set, by scheme (the statistic is hits / questions of the set)
BOOTSTRAP_SCHEMES = {
    "flat": "seeded cluster bootstrap, expanded percentile interval (Hesterberg 2015): the clusters (of all videos) "
            "drawn with replacement",
    "nested": "seeded cluster bootstrap, expanded percentile interval (Hesterberg 2015): the videos drawn with "
              "replacement, then the clusters within each drawn video",
}
CLUSTERED_TEST = ("clustered McNemar, exact cluster sign-flip randomization test: p = P(|sum_k s_k (b_k - c_k)| >= "
                  "|sum_k (b_k - c_k)|) over all 2^K signs s_k = +-1 of the clusters k (exact McNemar when each "
                  "cluster holds at most one discordant pair)")


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


# ------------------------------------------------------------------------------------------- cluster bootstrap
def resample_counts(groups: Sequence[Any], resamples: int, seed: int, scheme: str = "flat") -> np.ndarray:
    """How often each cluster is drawn in each of ``resamples`` bootstrap sets: a (resamples, clusters) integer
    array; ``groups[k]`` is cluster k's video. ``scheme`` (see BOOTSTRAP_SCHEMES): "flat" draws as many clusters
    as there are, from all of them; "nested" first draws the videos, then for each draw of a video as many of its
    clusters as it has (m draws of a video with g clusters = one multinomial of m * g over its clusters)."""
    if scheme not in BOOTSTRAP_SCHEMES:
        raise ValueError(f"resample_counts: scheme must be one of {', '.join(BOOTSTRAP_SCHEMES)}, got {scheme!r}")
    labels = list(groups)
    rng = np.random.default_rng(seed)
    g_total = len(labels)
    if scheme == "flat":
        return rng.multinomial(g_total, np.full(g_total, 1.0 / g_total), size=resamples)
    videos = sorted(set(labels), key=str)
    index = {v: i for i, v in enumerate(videos)}
    of_video = np.array([index[v] for v in labels])
    draws = rng.multinomial(len(videos), np.full(len(videos), 1.0 / len(videos)), size=resamples)
    counts = np.zeros((resamples, g_total), dtype=np.int64)
    for j in range(len(videos)):
        members = np.flatnonzero(of_video == j)
        counts[:, members] = rng.multinomial(draws[:, j] * len(members), np.full(len(members), 1 / len(members)))
    return counts


def bootstrap_ratios(sums: Sequence[float], sizes: Sequence[int], counts: np.ndarray) -> np.ndarray:
    """sum of ``sums`` / sum of ``sizes`` in each resampled set (resampled sets without a question dropped)."""
    num = counts @ np.asarray(sums, dtype=np.float64)
    den = counts @ np.asarray(sizes, dtype=np.float64)
    keep = den > 0
    return num[keep] / den[keep]


def _t_cdf(t: float, df: int) -> float:
    """Student's t distribution function for a whole number of degrees of freedom, in closed form (Abramowitz &
    Stegun 26.7.3-4: a finite series in theta = atan(t / sqrt(df)))."""
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2:  # odd: (2 / pi) (theta + sin cos (1 + 2/3 cos^2 + (2 4)/(3 5) cos^4 + ...))
        term, series = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= (2 * k) / (2 * k + 1) * c * c
            series += term
        central = 2 / math.pi * (theta + s * c * series)
    else:  # even: sin (1 + 1/2 cos^2 + (1 3)/(2 4) cos^4 + ...)
        term = series = 1.0
        for k in range(1, df // 2):
            term *= (2 * k - 1) / (2 * k) * c * c
            series += term
        central = s * series
    return 0.5 + central / 2


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile for a whole number ``df`` >= 1 of degrees of freedom, to machine precision: closed
    forms for 1 and 2, else Newton steps on the exact distribution function from Hill's (1970) Cornish-Fisher
    expansion (which alone is off by 4e-3 at df = 3, p = 0.975)."""
    if not 0 < p < 1 or df < 1:
        raise ValueError(f"t_quantile: needs 0 < p < 1 and df >= 1, got p={p}, df={df}")
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = NormalDist().inv_cdf(p)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    t = z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    for _ in range(20):
        density = math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))
        step = (_t_cdf(t, df) - p) / density
        t -= step
        if abs(step) < 1e-13 * max(1.0, abs(t)):
            break
    return t


def expanded_tail(clusters: int, alpha: float = 0.05) -> float:
    """The lower percentile (as a fraction) of Hesterberg's (2015) expanded percentile interval over ``clusters``
    clusters: the plain percentile interval is too narrow for few clusters (its variance is (G - 1) / G of the
    truth and it uses z, not t); the expanded one takes the percentiles at Phi(-sqrt(G / (G - 1)) t_{G-1})."""
    if clusters < 2:
        raise ValueError(f"expanded_tail: needs at least 2 clusters, got {clusters}")
    t = t_quantile(1 - alpha / 2, clusters - 1)
    return NormalDist().cdf(-math.sqrt(clusters / (clusters - 1)) * t)


def cluster_interval(
    sums: Sequence[float], sizes: Sequence[int], groups: Sequence[Any], resamples: int, seed: int,
    scheme: str = "flat", proportion: bool = True,
) -> dict[str, Any]:
    """95 % expanded-percentile cluster-bootstrap interval of sum(sums) / sum(sizes) (an accuracy, or a paired
    difference with ``proportion=False``), with the design effect (bootstrap variance / the binomial variance
    p(1-p)/n) and the effective number of questions n / design effect. The expansion counts the units drawn at the
    top level: clusters ("flat"), videos ("nested": few videos give a wide interval, one video none). ``ci95`` is
    None, with ``reason``, when there is one cluster only or every question has the same outcome (nothing for
    resampling to vary)."""
    n = int(sum(sizes))
    total = float(sum(sums))
    estimate = total / n if n else None
    out: dict[str, Any] = {"ci95": None, "n_clusters": len(sizes), "design_effect": None, "effective_n": None,
                           "se": None, "reason": None}
    if len(sizes) < 2:
        out["reason"] = ("one cluster only: the questions cannot be resampled as independent units, so no clustered "
                         "interval exists (Wilson alone treats them as independent)")
        return out
    if proportion and estimate in (0.0, 1.0):
        out["reason"] = "every answer has the same outcome: resampling has nothing to vary (Wilson alone applies)"
        return out
    means = np.asarray(sums, dtype=np.float64) / np.maximum(np.asarray(sizes, dtype=np.float64), 1)
    if np.all(means == means[0]):
        out["reason"] = (f"all {len(sizes)} clusters have the same mean: resampling them has nothing to vary (the "
                         "clusters are too few or too alike to show the spread)")
        return out
    # the expansion counts the units drawn at the top level: the clusters (flat), the videos (nested)
    units = len(set(groups)) if scheme == "nested" else len(sizes)
    if units < 2:
        out["reason"] = ("one video only: drawing videos has nothing to vary (the interval over its clusters "
                         "covers other stretches of this video, not new videos)")
        return out
    ratios = bootstrap_ratios(sums, sizes, resample_counts(groups, resamples, seed, scheme))
    tail = expanded_tail(units)
    lo, hi = np.quantile(ratios, [tail, 1 - tail])
    se = float(np.std(ratios, ddof=1))
    out.update(ci95=[float(lo), float(hi)], se=se)
    if proportion and estimate is not None:
        binomial = estimate * (1 - estimate) / n
        deff = se * se / binomial
        out.update(design_effect=deff, effective_n=n / deff if deff > 0 else None)
    return out


def clustered_mcnemar_p(b_by_cluster: Sequence[int], c_by_cluster: Sequence[int]) -> float:
    """Two-sided clustered McNemar p-value from each cluster's discordant counts (b_k: reference right and run
    wrong, c_k: the reverse): the cluster sign-flip randomization test. Under "no difference" the two runs'
    labels are exchangeable within a cluster, so each d_k = b_k - c_k is as likely as -d_k, independently across
    clusters; p = P(|sum_k s_k d_k| >= |sum_k d_k|) over all 2^K sign vectors. Computed exactly for any number of
    clusters by convolving the (integer) d_k one at a time, so it needs no seed and no large-sample theory; with at
    most one discordant pair per cluster it is exactly ``mcnemar_exact_p``. 1.0 without any discordant pair."""
    d = np.abs(np.asarray(b_by_cluster, dtype=np.int64) - np.asarray(c_by_cluster, dtype=np.int64))
    d = d[d > 0]
    if d.size == 0:
        return 1.0
    observed = abs(int(np.sum(np.asarray(b_by_cluster, dtype=np.int64) - np.asarray(c_by_cluster,
                                                                                      dtype=np.int64))))
    reach = int(d.sum())
    dist = np.zeros(2 * reach + 1)  # dist[reach + x] = P(sum of the signed d_k == x)
    dist[reach] = 1.0
    for dk in d.tolist():  # the sum stays within +-reach, so np.roll never wraps a non-zero entry
        dist = 0.5 * (np.roll(dist, dk) + np.roll(dist, -dk))
    values = np.abs(np.arange(-reach, reach + 1))
    return min(1.0, float(dist[values >= observed].sum()))


def _pts(x: float) -> str:
    return f"{100 * x:.1f}"


def paired_verdict(stats: Mapping[str, Any], removed: str | None, alpha: float) -> str:
    """One sentence for ``paired_stats``: what ``removed`` carries (or that nothing measurable is lost)."""
    if stats["n"] == 0:
        return "no paired samples"
    drop, p = stats["drop"], stats["p_value"]
    lo, hi = stats["difference_ci95"]
    ci = f"95% CI of run - reference [{_pts(lo)}, {_pts(hi)}] pts"
    clustered = stats.get("clustered")
    which = ""
    # the clusters decide (when there are clusters of several questions); the per-question test stays a line
    if clustered and clustered["unit"] != "question":
        p, which = clustered["p_value"], "clustered "
        if clustered.get("ci95") is None:
            ci = f"no clustered interval over {clustered['n_clusters']} {clustered['unit']}s: {clustered['reason']}"
        else:
            lo, hi = clustered["ci95"]
            ci = (f"clustered 95% CI of run - reference [{_pts(lo)}, {_pts(hi)}] pts over "
                  f"{clustered['n_clusters']} {clustered['unit']}s")
    p_text = f"{which}p = {p:.2g}" if p >= 1e-4 else f"{which}p = {p:.1e}"
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


def clustered_paired(
    pairs: Sequence[tuple[bool, bool]], clusters: Sequence[tuple[Any, Any]], unit: str, resamples: int, seed: int,
    scheme: str = "flat",
) -> dict[str, Any]:
    """The clustered paired comparison: the clustered McNemar p-value (cluster sign-flip test) and the
    cluster-bootstrap interval of run − reference. ``clusters[i]`` = (video, cluster) of pair i."""
    order = {key: k for k, key in enumerate(sorted(set(clusters)))}  # fixed positions, whatever the pairs' order
    b = np.zeros(len(order), dtype=np.int64)
    c = np.zeros(len(order), dtype=np.int64)
    sizes = np.zeros(len(order), dtype=np.int64)
    for (run, ref), key in zip(pairs, clusters, strict=True):
        k = order[key]
        sizes[k] += 1
        b[k] += bool(ref and not run)
        c[k] += bool(run and not ref)
    interval = cluster_interval(c - b, sizes, [v for v, _ in order], resamples, seed, scheme, proportion=False)
    return {"unit": unit, "n_clusters": len(order), "p_value": clustered_mcnemar_p(b, c), "ci95": interval["ci95"],
            "reason": interval["reason"], "test": CLUSTERED_TEST, "interval": BOOTSTRAP_SCHEMES[scheme]}


def paired_stats(
    pairs: Sequence[tuple[bool, bool]], removed: str | None, alpha: float,
    clustered: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Accuracies, 2x2 table, paired interval, exact McNemar p-value and verdict of (run hit, reference hit)
    pairs; see ``surgvqa.metrics.paired_comparison`` for the fields. ``clustered`` (from
    :func:`clustered_paired`), when given, is kept under "clustered" and its p-value decides the verdict whenever
    its unit is not the single question (segments, clips or videos), with or without a clustered interval."""
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
    if clustered is not None:
        stats["clustered"] = dict(clustered)
    stats["verdict"] = paired_verdict(stats, removed, alpha)
    return stats
