#!/usr/bin/env python
"""Do the printed 95 % intervals cover? Wilson vs the segment-clustered bootstrap, and the paired tests' type-I error.

    python benchmarks/interval_coverage.py [--quick] [--strict] [--sets 2000] [--resamples 2000] [--seed 0]
    python benchmarks/interval_coverage.py --real_data ../shared/data/real-colon-vqa/in_template.jsonl

Simulation (``--sets`` test sets per row): 40 segments of 1-25 questions each (sizes drawn per set), one video;
each segment's accuracy drawn from a beta distribution with mean 0.7 and between-segment intra-class correlation
ICC (0 = every question independent), each question right with its segment's accuracy. Coverage: the share of sets
whose interval holds 0.7; width: mean width. The clustered interval is exactly what a summary prints
(``surgvqa.stats.cluster_interval`` over the segments, ``--resamples`` resamples); the plain percentile interval
(2.5 / 97.5 % of the same resamples) is shown for comparison.

Paired null: two runs of the same accuracy on the same questions, each run's right/wrong drawn as above
(independently per run, so each run's errors cluster in segments with the given ICC, and the discordant pairs do
too): the share of sets where exact McNemar (per question) and the clustered tests (the clustered McNemar test, an
exact cluster sign-flip test; the cluster-bootstrap interval of the difference excluding 0) reject at alpha = 0.05.

``--real_data``: the real annotations, gold answers taken as predictions and made wrong (a) for a seeded 30 % of the
questions, (b) for every question of a seeded 30 % of the segments: per video (and all videos) the segment count,
design effect and the width of the clustered and the Wilson interval.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import log, print_table  # noqa: E402

from surgvqa.clusters import Clustering, assign  # noqa: E402
from surgvqa.stats import (  # noqa: E402
    bootstrap_ratios,
    cluster_interval,
    clustered_paired,
    mcnemar_exact_p,
    resample_counts,
    wilson_interval,
)

TRUE_ACCURACY = 0.7
SEGMENTS = 40
MAX_CLIPS = 25
ICCS = (0.0, 0.2, 0.5)
ALPHA = 0.05
COVERAGE_GOAL = (93.0, 97.0)  # clustered coverage, % at every ICC
WIDTH_GOAL = 1.15  # clustered / Wilson width at ICC 0
TYPE_I_GOAL = (3.5, 6.5)  # clustered McNemar rejections under the null, %


def _segment_accuracies(rng: np.random.Generator, icc: float) -> np.ndarray:
    """Beta(a, b) with mean TRUE_ACCURACY and intra-class correlation 1 / (a + b + 1)."""
    if icc == 0:
        return np.full(SEGMENTS, TRUE_ACCURACY)
    total = 1 / icc - 1
    return rng.beta(TRUE_ACCURACY * total, (1 - TRUE_ACCURACY) * total, SEGMENTS)


def _test_set(rng: np.random.Generator, icc: float, sizes: np.ndarray) -> np.ndarray:
    """Hits per segment."""
    return rng.binomial(sizes, _segment_accuracies(rng, icc))


def coverage(sets: int, resamples: int, seed: int) -> list[tuple]:
    rows = []
    for icc in ICCS:
        rng = np.random.default_rng([seed, int(icc * 1000)])
        wilson_in = clustered_in = plain_in = 0
        wilson_width = clustered_width = 0.0
        deffs = []
        started = time.perf_counter()
        for k in range(sets):
            sizes = rng.integers(1, MAX_CLIPS + 1, SEGMENTS)
            hits = _test_set(rng, icc, sizes)
            n, h = int(sizes.sum()), int(hits.sum())
            lo, hi = wilson_interval(h, n)
            wilson_in += lo <= TRUE_ACCURACY <= hi
            wilson_width += hi - lo
            block = cluster_interval(hits.tolist(), sizes.tolist(), ["v"] * SEGMENTS, resamples, seed + k)
            if block["ci95"] is None:  # every answer right or wrong: the summary shows Wilson alone
                clo, chi = plo, phi = lo, hi
            else:
                clo, chi = block["ci95"]
                deffs.append(block["design_effect"])
            clustered_in += clo <= TRUE_ACCURACY <= chi
            clustered_width += chi - clo
            if block["ci95"] is not None:  # the plain percentile interval of the same resamples (same seed)
                ratios = bootstrap_ratios(hits, sizes, resample_counts(["v"] * SEGMENTS, resamples, seed + k))
                plo, phi = np.quantile(ratios, [0.025, 0.975])
            plain_in += plo <= TRUE_ACCURACY <= phi
        log(f"coverage ICC {icc}: {time.perf_counter() - started:.0f} s")
        rows.append((f"{icc:.1f}", sets, f"{100 * wilson_in / sets:.1f} %", f"{100 * clustered_in / sets:.1f} %",
                     f"{100 * plain_in / sets:.1f} %", f"{100 * wilson_width / sets:.1f}",
                     f"{100 * clustered_width / sets:.1f}",
                     f"{clustered_width / wilson_width:.2f}", f"{np.median(deffs):.2f}"))
    return rows


def paired_null(sets: int, resamples: int, seed: int) -> list[tuple]:
    rows = []
    for icc in ICCS:
        rng = np.random.default_rng([seed, 7, int(icc * 1000)])
        exact = clustered = boot = 0
        for k in range(sets):
            sizes = rng.integers(1, MAX_CLIPS + 1, SEGMENTS)
            run_p, ref_p = _segment_accuracies(rng, icc), _segment_accuracies(rng, icc)
            pairs, clusters = [], []
            for s, size in enumerate(sizes):
                run = rng.random(size) < run_p[s]
                ref = rng.random(size) < ref_p[s]
                pairs += list(zip(run.tolist(), ref.tolist(), strict=True))
                clusters += [("v", s)] * int(size)
            b = sum(1 for r, f in pairs if f and not r)
            c = sum(1 for r, f in pairs if r and not f)
            exact += mcnemar_exact_p(b, c) < ALPHA
            result = clustered_paired(pairs, clusters, "segment", resamples, seed + k)
            clustered += result["p_value"] < ALPHA
            ci = result["ci95"]
            boot += ci is not None and not ci[0] <= 0 <= ci[1]
        rows.append((f"{icc:.1f}", sets, f"{100 * exact / sets:.1f} %", f"{100 * clustered / sets:.1f} %",
                     f"{100 * boot / sets:.1f} %"))
    return rows


def real_annotations(path: Path, resamples: int, seed: int) -> list[tuple]:
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    found = assign(records, Clustering())
    segments = sorted(set(found.clusters))
    rng = random.Random(seed)
    wrong_questions = set(rng.sample(range(len(records)), round(0.3 * len(records))))
    wrong_segments = set(rng.sample(segments, round(0.3 * len(segments))))
    cases = {
        "(a) 30 % of questions": [i not in wrong_questions for i in range(len(records))],
        "(b) 30 % of segments": [found.clusters[i] not in wrong_segments for i in range(len(records))],
    }
    videos = sorted({r["video_id"] for r in records})
    rows = []
    for case, hits in cases.items():
        for video in [*videos, "all"]:
            members = [i for i, r in enumerate(records) if video in ("all", r["video_id"])]
            sums: dict[tuple, int] = {}
            sizes: dict[tuple, int] = {}
            for i in members:
                sums[found.clusters[i]] = sums.get(found.clusters[i], 0) + hits[i]
                sizes[found.clusters[i]] = sizes.get(found.clusters[i], 0) + 1
            keys = sorted(sizes)
            block = cluster_interval([sums[k] for k in keys], [sizes[k] for k in keys], [k[0] for k in keys],
                                     resamples, seed)
            n, h = len(members), sum(hits[i] for i in members)
            lo, hi = wilson_interval(h, n)
            clo, chi = block["ci95"]
            rows.append((case, video, n, len(keys), f"{100 * h / n:.1f}", f"{block['design_effect']:.2f}",
                         f"{block['effective_n']:.0f}", f"{100 * (chi - clo):.1f}", f"{100 * (hi - lo):.1f}",
                         f"{(chi - clo) / (hi - lo):.2f}"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", type=int, default=2000)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="200 sets and 500 resamples (noisy: a smoke run)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    parser.add_argument("--real_data", type=Path, default=None,
                        help="REAL-Colon-VQA JSONL: print the real-annotation table instead of the simulation")
    args = parser.parse_args(argv)
    if args.quick:
        args.sets, args.resamples = 200, 500
    if args.real_data:
        print_table(("case", "video", "n", "segments", "acc %", "design effect", "effective n",
                     "clustered width (pts)", "Wilson width (pts)", "width ratio"),
                    real_annotations(args.real_data, args.resamples, args.seed),
                    title=f"{args.real_data}: gold answers made wrong, segments at gap 30 frames, "
                          f"{args.resamples} resamples, seed {args.seed}")
        return 0
    cover = coverage(args.sets, args.resamples, args.seed)
    print_table(("ICC", "sets", "Wilson coverage", "clustered coverage", "plain percentile coverage",
                 "Wilson width (pts)", "clustered width (pts)", "width ratio", "median design effect"), cover,
                title=f"95 % intervals, true accuracy {TRUE_ACCURACY}, {SEGMENTS} segments x 1-{MAX_CLIPS} questions, "
                      f"{args.resamples} resamples")
    null = paired_null(args.sets, args.resamples, args.seed)
    print_table(("ICC", "sets", "exact McNemar", "clustered McNemar (sign-flip)", "cluster-bootstrap CI excludes 0"),
                null, title=f"type-I error at alpha = {ALPHA} under a null with segment-correlated errors")
    goals = [
        (f"clustered coverage in {COVERAGE_GOAL[0]:g}-{COVERAGE_GOAL[1]:g} % at every ICC",
         all(COVERAGE_GOAL[0] <= float(r[3].rstrip(" %")) <= COVERAGE_GOAL[1] for r in cover)),
        (f"clustered / Wilson width at ICC 0 <= {WIDTH_GOAL}", float(cover[0][7]) <= WIDTH_GOAL),
        (f"clustered McNemar type-I error in {TYPE_I_GOAL[0]:g}-{TYPE_I_GOAL[1]:g} % at every ICC",
         all(TYPE_I_GOAL[0] <= float(r[3].rstrip(" %")) <= TYPE_I_GOAL[1] for r in null)),
    ]
    print()
    for text, met in goals:
        print(f"goal: {text}: {'MET' if met else 'MISSED'}")
    return 1 if args.strict and not all(met for _, met in goals) else 0


if __name__ == "__main__":
    raise SystemExit(main())
