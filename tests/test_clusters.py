"""Clusters (segments, clips, videos) and the cluster-bootstrap intervals and clustered paired tests built on them."""

from __future__ import annotations

import random

import numpy as np
import pytest

from surgvqa.clusters import Clustering, assign, clustered_summary, frame_span, segments
from surgvqa.metrics import paired_comparison, summarize
from surgvqa.stats import (
    bootstrap_ratios,
    cluster_interval,
    clustered_mcnemar_p,
    expanded_tail,
    mcnemar_exact_p,
    resample_counts,
    t_quantile,
)


def _rec(video: str, qid: str, first: int, hit: bool = True, qtype: str = "nbi_status", **extra) -> dict:
    numbers = list(range(first, first + 8 * 4, 4))
    rec = {"video_id": video, "id": qid, "question_type": qtype, "short_answer": "yes", "answer": "Yes.",
           "prediction": "yes" if hit else "no", "frame_numbers": numbers,
           "frames": [f"{video}_{n}" for n in numbers]}
    rec.update(extra)
    return rec


def test_segments_join_overlapping_and_near_clips_of_one_video_only():
    # clips [0, 28], [20, 48] overlap; [70, 98] starts 22 frames after 48 (joined at gap 30, not at gap 10);
    # [200, 228] is far away; the same frames in another video are another segment
    recs = [_rec("v1", "a", 0), _rec("v1", "b", 20), _rec("v1", "c", 70), _rec("v1", "d", 200),
            _rec("v2", "a", 0)]
    found = assign(recs, Clustering(gap=30))
    assert found.unit == "segment" and found.fallback is None
    assert found.clusters == [("v1", 0), ("v1", 0), ("v1", 0), ("v1", 1), ("v2", 0)]
    assert assign(recs, Clustering(gap=10)).clusters[2] == ("v1", 1)
    assert segments([(50, 60), (0, 10), (12, 20)], gap=2) == [1, 0, 0]  # order of the clips does not matter


def test_frame_numbers_fall_back_to_frame_names_then_to_clips_then_to_questions():
    assert frame_span({"frames": ["002-003_3810", "002-003_3806"]}) == (3806, 3810)
    assert frame_span({"frames": ["a.jpg"]}) is None
    named = [{"video_id": "v", "id": str(i), "frames": [f"v_{100 * i}", f"v_{100 * i + 4}"]} for i in range(3)]
    assert assign(named, Clustering()).unit == "segment"
    unnumbered = [{"video_id": "v", "id": str(i), "frames": [f"clip{'ab'[i % 2]}.jpg"]} for i in range(4)]
    clips = assign(unnumbered, Clustering())
    assert clips.unit == "clip" and "4 of 4 records" in clips.fallback and "clips" in clips.fallback
    assert clips.clusters[0] == clips.clusters[2] != clips.clusters[1]
    bare = assign([{"video_id": "v", "id": str(i)} for i in range(3)], Clustering())
    assert bare.unit == "question" and "no frames list" in bare.fallback
    assert len(set(bare.clusters)) == 3


def test_bad_settings_are_refused():
    for bad in ({"by": "scene"}, {"gap": -1}, {"resamples": 10}):
        with pytest.raises(ValueError, match="--cluster_by|--cluster_gap|--bootstrap"):
            Clustering(**bad)
    assert Clustering(gap=5).given(bootstrap=500, cluster_by=None) == Clustering("segment", 5, 500, 0)
    assert Clustering().as_meta() == {"cluster_by": "segment", "cluster_gap": 30, "bootstrap": 2000,
                                      "bootstrap_seed": 0}


def test_a_single_segment_gets_no_clustered_interval_and_the_summary_says_why():
    recs = [_rec("v1", str(i), 4 * i, hit=i % 3 > 0) for i in range(30)]  # overlapping clips: one segment
    clustered = summarize(recs)["clustered"]
    assert clustered["accuracy"]["ci95"] is None and "one cluster only" in clustered["accuracy"]["reason"]
    assert "single segment" in clustered["note"] and "one video (v1)" in clustered["note"]
    assert "not new videos" in clustered["note"]


def _segmented_run(seed: int, per_segment_error: bool) -> list[dict]:
    """40 segments of 1-25 clips in 2 videos, 70 % right: errors by question or by whole segment."""
    rng = random.Random(seed)
    recs = []
    for s in range(40):
        wrong_segment = rng.random() < 0.3
        for c in range(rng.randint(1, 25)):
            hit = not wrong_segment if per_segment_error else rng.random() < 0.7
            recs.append(_rec(f"v{s % 2}", f"q{s}_{c}", 1000 * s + 4 * c, hit=hit))
    return recs


def test_clustered_interval_is_seeded_and_widens_with_correlated_errors():
    independent = summarize(_segmented_run(0, per_segment_error=False))
    block = independent["clustered"]["accuracy"]
    assert block["n_clusters"] == 40 and 0.6 < block["design_effect"] < 1.6
    lo, hi = independent["accuracy_ci95"]
    clo, chi = block["ci95"]
    assert (chi - clo) < 1.3 * (hi - lo)
    again = summarize(list(reversed(_segmented_run(0, per_segment_error=False))))["clustered"]["accuracy"]
    assert again == block  # same seed, any order of the lines: the same numbers
    other = summarize(_segmented_run(0, per_segment_error=False), clustering=Clustering(seed=1))
    assert other["clustered"]["accuracy"]["ci95"] != block["ci95"]

    correlated = summarize(_segmented_run(0, per_segment_error=True))
    cblock = correlated["clustered"]["accuracy"]
    assert cblock["design_effect"] > 5 and cblock["effective_n"] < correlated["n"] / 5
    lo, hi = correlated["accuracy_ci95"]
    assert cblock["ci95"][1] - cblock["ci95"][0] > 2 * (hi - lo)
    per_video = correlated["clustered"]["per_video"]
    assert set(per_video) == {"v0", "v1"} and sum(v["n"] for v in per_video.values()) == correlated["n"]
    assert correlated["clustered"]["across_videos"]["ci95"] is not None
    assert set(correlated["clustered"]["per_type"]) == {"nbi_status"}


def test_cluster_by_video_and_none():
    recs = _segmented_run(1, per_segment_error=True)
    by_video = summarize(recs, clustering=Clustering(by="video"))["clustered"]
    assert by_video["accuracy"]["n_clusters"] == 2 and by_video["clustering"]["unit"] == "video"
    plain = summarize(recs, clustering=Clustering(by="none"))["clustered"]
    assert plain["accuracy"]["n_clusters"] == len(recs) and plain["accuracy"]["design_effect"] < 1.3


def test_resample_counts_draw_as_many_clusters_as_there_are():
    counts = resample_counts(["a", "a", "b", "b", "b"], 200, seed=3, scheme="flat")
    assert counts.shape == (200, 5) and (counts.sum(axis=1) == 5).all()
    nested = resample_counts(["a", "a", "b", "b", "b"], 200, seed=3, scheme="nested")
    # two videos drawn: a+a (4 clusters), b+b (6) or a+b (5)
    assert set(nested.sum(axis=1)) <= {4, 5, 6}
    with pytest.raises(ValueError):
        resample_counts(["a"], 10, 0, scheme="strata")
    assert cluster_interval([1, 1], [1, 1], ["a", "b"], 200, 0)["reason"].startswith("every answer")


def test_clustered_mcnemar_is_the_exact_cluster_sign_flip_test():
    # three clusters, each with b_k - c_k = 2: of the 8 sign vectors, 2 reach |sum| = 6
    assert clustered_mcnemar_p([2, 3, 2], [0, 1, 0]) == pytest.approx(0.25)
    # |d| = (3, 1): sums +-4 (1/2), +-2 (1/2); observed 2 (d = 3, -1) -> 1, observed 4 (d = 3, 1) -> 1/2
    assert clustered_mcnemar_p([3, 0], [0, 1]) == pytest.approx(1.0)
    assert clustered_mcnemar_p([3, 1], [0, 0]) == pytest.approx(0.5)
    assert clustered_mcnemar_p([3, 0], [0, 1]) == clustered_mcnemar_p([0, 1], [3, 0])
    assert clustered_mcnemar_p([1, 0], [1, 0]) == 1.0
    # at most one discordant pair per cluster: exactly the exact McNemar test
    rng = random.Random(0)
    for _ in range(200):
        b = [rng.randint(0, 1) for _ in range(rng.randint(1, 30))]
        c = [0 if x else rng.randint(0, 1) for x in b]
        assert clustered_mcnemar_p(b, c) == pytest.approx(mcnemar_exact_p(sum(b), sum(c)), abs=1e-12)


def test_four_wins_in_four_of_twenty_segments_are_not_significant():
    # 20 questions, one per segment, the run wins 4 and loses none: exact McNemar p = 0.125; the clustered test
    # must not call it significant (an asymptotic chi-square gives 0.0455)
    ref = [_rec("v1", f"q{s}", 100 * s, hit=s >= 4) for s in range(20)]
    run = [_rec("v1", f"q{s}", 100 * s, hit=True) for s in range(20)]
    overall = paired_comparison(run, ref)["overall"]
    assert overall["clustered"]["unit"] == "segment" and overall["clustered"]["n_clusters"] == 20
    assert overall["p_value"] == pytest.approx(0.125)
    assert overall["clustered"]["p_value"] == pytest.approx(0.125)
    assert overall["verdict"].startswith("no measurable difference (clustered p = 0.12")


def test_paired_verdict_uses_the_clustered_test_when_segments_exist():
    ref = _segmented_run(2, per_segment_error=False)
    # the run loses every question of 6 whole segments: many discordant pairs, but few independent ones
    lost = {f"q{s}_" for s in range(6)}
    run = [dict(r, prediction="no") if any(r["id"].startswith(p) for p in lost) else dict(r) for r in ref]
    result = paired_comparison(run, ref, removed="video")
    overall = result["overall"]
    assert result["clustering"]["unit"] == "segment"
    assert overall["clustered"]["n_clusters"] == 40 and overall["clustered"]["unit"] == "segment"
    assert overall["clustered"]["p_value"] > overall["p_value"]  # per question, the same pairs look far surer
    assert "clustered p = " in overall["verdict"] and "over 40 segments" in overall["verdict"]
    assert overall["clustered"]["ci95"][0] <= overall["difference"] <= overall["clustered"]["ci95"][1]
    bare = [{k: v for k, v in r.items() if k not in ("frames", "frame_numbers")} for r in (*run, *ref)]
    plain = paired_comparison(bare[: len(run)], bare[len(run):], removed="video")["overall"]
    assert "clustered" not in plain["verdict"]  # no clusters of several questions: the per-question test decides


def test_clustered_summary_is_a_function_of_the_records_alone():
    recs = _segmented_run(3, per_segment_error=True)
    scores = [{"accuracy": r["prediction"] == "yes", "k_acc": None, "substring": r["prediction"] == "yes"}
              for r in recs]
    out = clustered_summary(recs, scores, ["t"] * len(recs), Clustering(resamples=300))
    assert out["k_acc"]["ci95"] is None and out["substring"] == out["accuracy"]
    assert out["clustering"]["bootstrap"] == 300


def test_old_predictions_files_rescore_with_the_default_clustering():
    from surgvqa.report import PredictionsMeta, summarize_run

    recs = _segmented_run(4, per_segment_error=True)
    old_meta = {"format": 1, "scoring": "surgvqa-strict-1"}  # written before the clustering was recorded
    assert PredictionsMeta.from_dict(old_meta, "old").clustering == Clustering()
    assert summarize_run(recs, PredictionsMeta.from_dict(old_meta, "old"))["clustered"] == \
        summarize_run(recs, None)["clustered"]
    later = PredictionsMeta.from_dict({**old_meta, "cluster_gap": 0, "bootstrap_seed": 5}, "later")
    recorded = summarize_run(recs, later)["clustered"]
    assert recorded["clustering"]["cluster_gap"] == 0 and recorded["clustering"]["bootstrap_seed"] == 5


def test_printed_tables_lead_with_the_clustered_interval():
    from surgvqa.report import format_paired_comparison, format_table

    ref = _segmented_run(5, per_segment_error=True)
    summary = summarize(ref)
    table = format_table(summary)
    lo, hi = summary["clustered"]["accuracy"]["ci95"]
    assert f"[{100 * lo:.1f}, {100 * hi:.1f}] clustered, Wilson" in table
    assert "design effect" in table and "\nvideo " in table  # the per-video table (two videos)
    run = [dict(r, prediction="no") if r["id"].startswith("q1_") else dict(r) for r in ref]
    printed = format_paired_comparison(paired_comparison(run, ref, removed="video"), label="ablated")
    assert "clustered [95% CI]" in printed and "clustered p" in printed and "over 40 segments" in printed


@pytest.mark.parametrize(("df", "table"), [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (5, 2.5706),
                                           (10, 2.2281), (30, 2.0423)])
def test_t_quantile_matches_the_table_to_1e_4(df, table):
    assert t_quantile(0.975, df) == pytest.approx(table, abs=1e-4)
    assert t_quantile(0.025, df) == pytest.approx(-table, abs=1e-4)


def test_nested_interval_expands_by_the_number_of_videos_not_of_segments():
    # 4 videos x 10 segments: the expanded percentile interval of the videos-then-segments bootstrap takes its
    # percentiles at expanded_tail(4 videos), far out in the tails, not at expanded_tail(40 segments)
    rng = random.Random(1)
    groups = [f"v{v}" for v in range(4) for _ in range(10)]
    sizes = [rng.randint(1, 10) for _ in groups]
    sums = [rng.randint(0, n) for n in sizes]
    nested = cluster_interval(sums, sizes, groups, 2000, seed=5, scheme="nested")
    ratios = bootstrap_ratios(sums, sizes, resample_counts(groups, 2000, 5, "nested"))
    assert nested["ci95"] == pytest.approx(list(np.quantile(ratios, [expanded_tail(4), 1 - expanded_tail(4)])))
    assert nested["ci95"] != pytest.approx(list(np.quantile(ratios, [expanded_tail(40), 1 - expanded_tail(40)])))
    one_video = cluster_interval(sums[:10], sizes[:10], groups[:10], 2000, seed=5, scheme="nested")
    assert one_video["ci95"] is None and one_video["reason"].startswith("one video only")
