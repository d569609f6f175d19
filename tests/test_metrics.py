"""Tests for surgvqa.metrics: the strict rule's tricky cases, K-ACC, text metrics, Wilson, summaries, real data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from surgvqa.metrics import (
    AMBIGUOUS_LABEL,
    NONE_LABEL,
    UNTYPED,
    bleu4,
    build_candidates,
    exact_match_hit,
    k_acc_hit,
    mcnemar_exact_p,
    meteor,
    meteor_unavailable_reason,
    paired_comparison,
    paired_difference_interval,
    predicted_label,
    rouge_l,
    score_record,
    stated_answers,
    strict_hit,
    substring_hit,
    summarize,
    wilson_interval,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "real-colon-vqa"
METRIC_MODULES = REPO / "surgvqa" / "metrics_modules"

YN = ["no", "yes"]
MOTION = ["down", "left", "right", "stable", "up"]
POSITION = ["lower-left", "lower-right", "upper-left", "upper-right"]
TOOLS = ["catheter", "forceps", "snare"]
FLUID = ["absent", "complete"]
SIZE = ["<5"]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _real(name: str) -> list[dict]:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real REAL-Colon-VQA annotations not found at {path} (shared/ is not checked out here)")
    return _read_jsonl(path)


# ---------------------------------------------------------------- candidates


def test_build_candidates_per_type_sorted_dedup_and_yes_no_completion():
    cands = build_candidates(
        [
            ("dye", "no"),
            ("dye", "No"),
            ("pos", "upper-left"),
            ("pos", "lower-right"),
            ("pos", "upper-left"),
            (None, "snare"),
            ("light", "NBI"),
        ]
    )
    assert cands["pos"] == ["lower-right", "upper-left"]
    # A yes/no type whose gold is all "no" is still a yes/no question with both answers.
    assert cands["dye"] == ["no", "yes"]
    assert cands[UNTYPED] == ["snare"]
    assert cands["light"] == ["NBI"]


# ---------------------------------------------------------------- strict rule: tricky cases


@pytest.mark.parametrize(
    ("prediction", "gold", "candidates", "expected"),
    [
        # leading yes/no word decides yes/no types
        ("No, the scope is not advancing.", "no", YN, True),
        ("Yes.", "yes", YN, True),
        ("  **Yes**, it is.", "yes", YN, True),
        ("yes", "no", YN, False),
        ("Not visible.", "no", YN, False),  # "not" is not "no"
        ("Nothing is visible.", "no", YN, False),
        ("The scope is not moving; no.", "no", YN, False),  # only the leading word counts
        ("", "no", YN, False),
        ("   \n ", "yes", YN, False),
        (None, "yes", YN, False),
        # word boundaries: "up" inside "upper-left" is not "up"
        ("The lesion is in the upper-left quadrant.", "up", MOTION, False),
        ("The lesion appears in the upper-left quadrant.", "upper-left", POSITION, True),
        ("The lesion is at the upper right of the screen.", "upper-right", POSITION, True),
        ("Top-left quadrant.", "upper-left", POSITION, True),
        ("The lesion appears in the upper-left quadrant.", "upper-right", POSITION, False),
        # morphological variants
        ("The lesion shifts downward across the frames.", "down", MOTION, True),
        ("It moves upwards.", "up", MOTION, True),
        ("It drifts leftward.", "left", MOTION, True),
        ("Fluid occlusion completely obscures the view.", "complete", FLUID, True),
        ("The scope withdraws.", "withdrawing", ["advancing", "withdrawing"], True),
        # <5 and its spellings; a different number is not <5
        ("The lesion is <5 mm.", "<5", SIZE, True),
        ("The lesion is < 5 mm.", "<5", SIZE, True),
        ("It is less than 5 mm.", "<5", SIZE, True),
        ("Under 5 mm in size.", "<5", SIZE, True),
        ("The lesion is <50 mm.", "<5", SIZE, False),
        ("The lesion is about 5 mm.", "<5", SIZE, False),
        # two different candidates stated = wrong; the same one twice is fine
        ("The lesion moves up and then down.", "up", MOTION, False),
        ("Forceps and a snare are visible.", "forceps", TOOLS, False),
        ("Forceps, yes, forceps.", "forceps", TOOLS, True),
        # negated mentions do not count
        ("The lesion moves up, not down.", "up", MOTION, True),
        ("Forceps rather than a snare.", "forceps", TOOLS, True),
        ("There is no snare; forceps are visible.", "forceps", TOOLS, True),
        ("The scope is not advancing.", "advancing", ["advancing", "withdrawing"], False),
        # case and a candidate not stated at all
        ("nbi light is on.", "NBI", ["NBI"], True),
        ("WL light is on.", "NBI", ["NBI"], False),
    ],
)
def test_strict_hit_tricky_cases(prediction, gold, candidates, expected):
    assert strict_hit(prediction, gold, candidates) is expected


def test_stated_answers_and_labels():
    assert stated_answers("The lesion moves up and then down.", MOTION) == ["up", "down"]
    assert stated_answers("upper right, lower left", POSITION) == ["upper-right", "lower-left"]
    # "upper right" in a motion type is a compound position, not "right" nor "up"
    assert stated_answers("It moves to the upper right.", MOTION) == []
    assert predicted_label("Snare and forceps", TOOLS) == AMBIGUOUS_LABEL
    assert predicted_label("I cannot tell.", TOOLS) == NONE_LABEL
    assert predicted_label("No, it is not.", YN) == "no"


def test_strict_hit_accepts_gold_outside_given_candidates():
    # the gold answer is always matchable, even if the caller's candidate list misses it
    assert strict_hit("Snare is visible.", "snare", ["forceps"])


# ---------------------------------------------------------------- K-ACC and substring


def test_k_acc_rule_exactly_as_the_paper():
    assert k_acc_hit("No, the scope is not advancing.", "no") is True
    assert k_acc_hit("Not visible.", "no") is False  # \bno\b does not match "not"
    assert k_acc_hit("Fluid occlusion completely obscures the view.", "complete") is False
    assert k_acc_hit("The lesion shifts downward.", "down") is False
    assert k_acc_hit("The lesion is <5 mm.", "<5") is False  # \b before "<" needs a word char
    assert k_acc_hit("The lesion moves UP.", "up") is True
    assert k_acc_hit("in the upper-left quadrant", "upper-left") is True
    assert k_acc_hit("moves up, not down", "down") is True  # blind to negation
    # phrases match by plain substring, multi-keyword samples are not counted
    assert k_acc_hit("the sigmoid colon", "sigmoid colon") is True
    assert k_acc_hit("xsigmoid colonx", "sigmoid colon") is True
    assert k_acc_hit("forceps and snare", "forceps,snare") is None
    assert k_acc_hit(None, "yes") is False


def test_substring_is_lenient():
    assert substring_hit("Not visible.", "no") is True  # why it is for comparison only
    assert substring_hit("upper-left", "up") is True
    assert substring_hit("Snare", "forceps") is False


def test_exact_match_normalization():
    assert exact_match_hit("  No,  the scope is ADVANCING.. ", "No, the scope is advancing.")
    assert not exact_match_hit("No, the scope is advancing!", "No, the scope is advancing.")
    assert not exact_match_hit("", "No.")


# ---------------------------------------------------------------- text metrics


def test_bleu_and_rouge_identical_and_disjoint():
    refs = ["the lesion shifts downward across the frames", "forceps are visible on screen"]
    assert bleu4(refs, refs) == pytest.approx(1.0)
    assert rouge_l(refs, refs) == pytest.approx(1.0)
    disjoint = ["alpha beta gamma delta epsilon", "one two three four five"]
    assert bleu4(disjoint, refs) == pytest.approx(0.0)
    assert rouge_l(disjoint, refs) == pytest.approx(0.0)
    partial = rouge_l(["the lesion shifts upward"], ["the lesion shifts downward"])
    assert partial == pytest.approx(0.75)
    assert bleu4([], []) == 0.0
    with pytest.raises(ValueError):
        bleu4(["a"], [])
    with pytest.raises(ValueError):
        rouge_l(["a"], ["b", "c"])


def test_meteor_is_none_with_reason_when_nltk_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "nltk", None)
    monkeypatch.setitem(sys.modules, "nltk.corpus", None)
    monkeypatch.setitem(sys.modules, "nltk.translate.meteor_score", None)
    assert "nltk" in (meteor_unavailable_reason() or "")
    assert meteor(["a b"], ["a b"]) is None


def test_meteor_real_value_or_explicitly_unavailable():
    reason = meteor_unavailable_reason()
    value = meteor(["the lesion shifts downward"], ["the lesion shifts downward"])
    if reason is None:
        assert value is not None and value > 0.9
    else:
        assert value is None and reason


# ---------------------------------------------------------------- Wilson


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [(5, 10, 0.2366, 0.7634), (0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0), (81, 100, 0.7222, 0.8749)],
)
def test_wilson_known_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got[0] == pytest.approx(lo, abs=1e-4)
    assert got[1] == pytest.approx(hi, abs=1e-4)


def test_wilson_edge_cases():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    narrow = wilson_interval(500, 1000)
    assert narrow[1] - narrow[0] < 0.07
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


# ---------------------------------------------------------------- records and summaries


def _rec(qtype, short, prediction, answer=None, vid="v1", idx=0, eos=True):
    return {
        "video_id": vid,
        "id": f"q{idx}",
        "question_type": qtype,
        "question": "?",
        "answer": answer if answer is not None else f"The answer is {short}.",
        "short_answer": short,
        "prediction": prediction,
        "stopped_by_eos": eos,
        "new_tokens": 7,
        "latency_ms": 12.5,
    }


def _records():
    recs = []
    # yes/no type: gold 6 no / 4 yes; the model always says "No" -> 6/10, majority 6/10
    for i in range(10):
        gold = "no" if i < 6 else "yes"
        recs.append(_rec("scope_motion", gold, "No, the scope is still.", idx=i))
    # motion type: gold up/down/left/right, 2 each; model right on 6, ambiguous on 1, silent on 1
    golds = ["up", "up", "down", "down", "left", "left", "right", "right"]
    preds = [
        "It moves up.",
        "upward",
        "downward",
        "up and down",
        "left",
        "I cannot tell.",
        "rightward",
        "left",
    ]
    for i, (g, p) in enumerate(zip(golds, preds, strict=True)):
        recs.append(_rec("motion", g, p, idx=100 + i, eos=i != 0))
    return recs


def test_score_record_returns_every_hit():
    cands = {"scope_motion": YN}
    hits = score_record(
        _rec("scope_motion", "no", "No, the scope is still.", answer="No, the scope is still."), cands
    )
    assert hits == {"accuracy": True, "k_acc": True, "substring": True, "exact_match": True}
    hits = score_record(_rec("scope_motion", "no", "Not moving."), cands)
    assert hits["accuracy"] is False and hits["substring"] is True and hits["k_acc"] is False
    assert score_record(_rec("tools", "forceps,snare", "forceps"), {})["k_acc"] is None


REQUIRED_KEYS = {
    "n",
    "accuracy",
    "accuracy_ci95",
    "k_acc",
    "k_acc_n",
    "substring_acc",
    "exact_match",
    "bleu4",
    "rouge_l",
    "meteor",
    "meteor_unavailable",
    "baseline",
    "baseline_kind",
    "delta_vs_baseline",
    "per_type",
    "collapsed_types",
    "no_eos",
}
PER_TYPE_KEYS = {
    "n",
    "accuracy",
    "ci95",
    "majority_baseline",
    "chance_baseline",
    "predicted_distribution",
    "collapse",
}


def test_summarize_keys_and_numbers():
    s = summarize(_records())
    assert REQUIRED_KEYS <= set(s)
    assert s["n"] == 18
    for t in s["per_type"].values():
        assert PER_TYPE_KEYS <= set(t)
    sm = s["per_type"]["scope_motion"]
    assert sm["accuracy"] == pytest.approx(0.6)
    assert sm["majority_baseline"] == pytest.approx(0.6)
    assert sm["chance_baseline"] == pytest.approx(0.5)
    assert sm["predicted_distribution"] == {"no": 10}
    mo = s["per_type"]["motion"]
    assert mo["accuracy"] == pytest.approx(5 / 8)  # up, upward, downward, left, rightward
    assert mo["predicted_distribution"] == {
        "left": 2,
        "up": 2,
        AMBIGUOUS_LABEL: 1,
        NONE_LABEL: 1,
        "down": 1,
        "right": 1,
    }
    assert mo["majority_baseline"] == pytest.approx(2 / 8)
    assert mo["chance_baseline"] == pytest.approx(1 / 4)
    assert s["accuracy"] == pytest.approx(11 / 18)
    assert s["accuracy_ci95"] == pytest.approx(list(wilson_interval(11, 18)))
    # overall majority baseline = sum over types of the majority count / n = (6 + 2) / 18
    assert s["baseline_kind"] == "majority"
    assert s["baseline"] == pytest.approx(8 / 18)
    assert s["delta_vs_baseline"] == pytest.approx(11 / 18 - 8 / 18)
    assert s["chance_baseline"] == pytest.approx((10 * 0.5 + 8 * 0.25) / 18)
    assert s["no_eos"] == 1
    assert s["k_acc_n"] == 18
    assert 0.0 <= s["bleu4"] <= 1.0 and 0.0 <= s["rouge_l"] <= 1.0
    assert (s["meteor"] is None) == (s["meteor_unavailable"] is not None)


def test_collapse_flag():
    s = summarize(_records())
    # always "no" where gold has 2 distinct answers -> collapse; the motion type does not collapse
    assert s["per_type"]["scope_motion"]["collapse"] is True
    assert s["per_type"]["motion"]["collapse"] is False
    assert s["collapsed_types"] == ["scope_motion"]
    # one gold answer only: answering it always is not collapse
    single = summarize([_rec("size", "<5", "It is <5 mm.", idx=i) for i in range(5)])
    assert single["collapsed_types"] == []
    # 9 of 10 is not > 90 %
    recs = [_rec("yn", "no" if i % 2 else "yes", "No." if i < 9 else "Yes.", idx=i) for i in range(10)]
    assert summarize(recs)["per_type"]["yn"]["collapse"] is False
    recs = [_rec("yn", "no" if i % 2 else "yes", "No." if i < 20 else "Yes.", idx=i) for i in range(21)]
    assert summarize(recs)["per_type"]["yn"]["collapse"] is True


def test_summarize_baselines_and_errors():
    s = summarize(_records(), baseline=0.5)
    assert s["baseline_kind"] == "fixed" and s["baseline"] == 0.5
    assert s["delta_vs_baseline"] == pytest.approx(11 / 18 - 0.5)
    s = summarize(_records(), baseline="chance")
    assert s["baseline"] == pytest.approx(s["chance_baseline"])
    with pytest.raises(ValueError):
        summarize(_records(), baseline="median")
    with pytest.raises(ValueError):
        summarize([])


def test_summarize_ignores_stored_hits_and_uses_given_candidates():
    recs = _records()
    for r in recs:
        r["accuracy"] = True
        r["exact_match"] = True
    assert summarize(recs)["accuracy"] == pytest.approx(11 / 18)
    # with a wider closed set for the motion type the chance baseline follows the given candidates
    cands = build_candidates((r["question_type"], r["short_answer"]) for r in recs)
    cands["motion"] = MOTION
    s = summarize(recs, candidates=cands)
    assert s["per_type"]["motion"]["chance_baseline"] == pytest.approx(1 / 5)


# ---------------------------------------------------------------- real REAL-Colon-VQA annotations


@pytest.mark.parametrize("name", ["in_template.jsonl", "out_template.jsonl"])
def test_gold_long_answers_score_100_percent_strict(name):
    rows = _real(name)
    assert len(rows) == 5200
    cands = build_candidates((r["question_type"], r["short_answer"]) for r in rows)
    misses = [r for r in rows if not strict_hit(r["answer"], r["short_answer"], cands[r["question_type"]])]
    assert misses == []
    # and no gold answer states a second candidate
    assert all(len(stated_answers(r["answer"], cands[r["question_type"]])) == 1 for r in rows)


def test_gold_long_answers_k_acc_93_08_on_in_template():
    rows = _real("in_template.jsonl")
    results = [k_acc_hit(r["answer"], r["short_answer"]) for r in rows]
    counted = [h for h in results if h is not None]
    assert len(counted) == 5200
    assert round(100 * sum(counted) / len(counted), 2) == 93.08


def test_summarize_gold_as_predictions_on_real_data():
    rows = _real("in_template.jsonl")
    recs = [dict(r, prediction=r["answer"], stopped_by_eos=True) for r in rows]
    s = summarize(recs)
    assert s["n"] == 5200
    assert s["accuracy"] == 1.0
    assert round(100 * s["k_acc"], 2) == 93.08
    assert s["exact_match"] == 1.0
    assert s["bleu4"] == pytest.approx(1.0) and s["rouge_l"] == pytest.approx(1.0)
    assert len(s["per_type"]) == 20
    assert s["collapsed_types"] == []
    assert s["baseline"] < s["accuracy"]


# ---------------------------------------------------------------- evaluate modules, offline


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return pytest.importorskip("evaluate")


def test_evaluate_modules_match_pure_functions(offline):
    evaluate = offline
    recs = _records() + [
        _rec("size", "<5", "It is less than 5 mm.", idx=900),
        _rec("tools", "forceps,snare", "x"),
    ]
    preds = [r["prediction"] for r in recs]
    refs = [r["short_answer"] for r in recs]
    types = [r["question_type"] for r in recs]

    acc = evaluate.load(str(METRIC_MODULES / "surgvqa_accuracy"))
    out = acc.compute(predictions=preds, references=refs, question_types=types)
    pure = summarize(recs)
    assert out["n"] == len(recs)
    assert out["accuracy"] == pytest.approx(pure["accuracy"])
    assert out["ci95"] == pytest.approx(pure["accuracy_ci95"])

    kacc = evaluate.load(str(METRIC_MODULES / "k_acc"))
    out = kacc.compute(predictions=preds, references=refs)
    assert out["n_counted"] == pure["k_acc_n"] == len(recs) - 1
    assert out["k_acc"] == pytest.approx(pure["k_acc"])


def test_empty_gold_never_matches():
    assert strict_hit("anything at all", "", ["", "forceps"]) is False
    assert stated_answers("anything", ["", "forceps"]) == []


# ---------------------------------------------------------------- paired comparison


def test_mcnemar_exact_p_values():
    # two-sided exact binomial on the discordant pairs: 2 * P(X <= min(b, c)), X ~ Bin(b + c, 1/2)
    assert mcnemar_exact_p(0, 10) == pytest.approx(2 / 1024)
    assert mcnemar_exact_p(10, 0) == pytest.approx(2 / 1024)
    assert mcnemar_exact_p(3, 10) == pytest.approx(2 * (1 + 13 + 78 + 286) / 8192)
    assert mcnemar_exact_p(5, 5) == 1.0
    assert mcnemar_exact_p(0, 0) == 1.0
    # thousands of discordant pairs: no float underflow (0.5 ** 3000 == 0.0)
    assert 0 < mcnemar_exact_p(1400, 1600) < 0.001
    assert mcnemar_exact_p(0, 3000) < 1e-300
    with pytest.raises(ValueError):
        mcnemar_exact_p(-1, 2)


def test_paired_interval_values_and_properties():
    # Newcombe method 10 pinned on two tables (both, run_only, reference_only, neither):
    # (1, 1, 7, 12) -> -0.2857 [-0.5069, -0.0256]; (59, 6, 16, 80) -> -0.0621 [-0.1186, -0.0046]
    lo, hi = paired_difference_interval(1, 1, 7, 12)
    assert (lo, hi) == pytest.approx((-0.50692, -0.02555), abs=1e-4)
    lo, hi = paired_difference_interval(59, 6, 16, 80)
    assert (lo, hi) == pytest.approx((-0.11862, -0.00462), abs=1e-4)
    # identical outcomes at an extreme: the interval is not a point (Wald would give [0, 0])
    lo, hi = paired_difference_interval(50, 0, 0, 0)
    assert lo < 0 < hi
    # swapping the roles mirrors the interval
    a = paired_difference_interval(30, 12, 3, 5)
    b = paired_difference_interval(30, 3, 12, 5)
    assert a == pytest.approx((-b[1], -b[0]))
    # bounded, and always contains the estimate
    lo, hi = paired_difference_interval(0, 0, 50, 0)
    assert lo == -1.0 and hi < -0.8
    assert paired_difference_interval(0, 0, 0, 0) == (-1.0, 1.0)


def test_paired_interval_coverage_by_simulation():
    """Seeded Monte Carlo: the 95 % interval covers the true paired difference close to 95 % of the time."""
    import random

    rng = random.Random(0)
    # cell probabilities: both right, run only, reference only, neither (true difference = 0.10 - 0.25)
    probs = (0.55, 0.10, 0.25, 0.10)
    truth = probs[1] - probs[2]
    covered = 0
    trials = 2000
    for _ in range(trials):
        cells = [0, 0, 0, 0]
        for _ in range(60):
            u, acc = rng.random(), 0.0
            for i, p in enumerate(probs):
                acc += p
                if u < acc:
                    cells[i] += 1
                    break
            else:
                cells[3] += 1
        lo, hi = paired_difference_interval(*cells)
        covered += lo <= truth <= hi
    assert 0.92 <= covered / trials <= 0.985


def _pair_rec(vid, idx, qtype, short, prediction):
    return {"video_id": vid, "id": f"q{idx}", "question_type": qtype, "short_answer": short,
            "answer": f"{short}.", "prediction": prediction}


def _colour_runs(n_per_type=20, ablated_right=0):
    """A reference that is always right and an ablated run that answers 'no' to every lighting question."""
    ref, run = [], []
    for i in range(n_per_type):
        gold = "yes" if i % 2 else "no"
        ref.append(_pair_rec("v1", i, "nbi_on", gold, f"{gold.capitalize()}, it is."))
        pred = gold if i < ablated_right else "no"
        run.append(_pair_rec("v1", i, "nbi_on", gold, f"{pred.capitalize()}, it is."))
    for i in range(n_per_type):
        gold = ["up", "down"][i % 2]
        ref.append(_pair_rec("v2", i, "motion", gold, f"It moves {gold}."))  # same id, other video
        run.append(_pair_rec("v2", i, "motion", gold, f"It moves {gold}."))
    return run, ref


def test_paired_comparison_numbers_per_type_and_verdict():
    run, ref = _colour_runs()
    before = json.dumps([run, ref])
    result = paired_comparison(run, ref, removed="video")
    assert json.dumps([run, ref]) == before  # inputs untouched
    assert result["keys_match"] and result["n_paired"] == 40
    nbi = result["per_type"]["nbi_on"]
    assert (nbi["n"], nbi["run_accuracy"], nbi["reference_accuracy"]) == (20, 0.5, 1.0)
    assert (nbi["both_right"], nbi["b"], nbi["c"], nbi["both_wrong"]) == (10, 10, 0, 0)
    assert nbi["drop"] == pytest.approx(0.5) and nbi["difference"] == pytest.approx(-0.5)
    assert nbi["p_value"] == pytest.approx(2 / 1024)
    lo, hi = nbi["difference_ci95"]
    assert lo < -0.5 < hi < 0
    assert nbi["verdict"].startswith("video carries 50.0 pts, p = 0.002")
    motion = result["per_type"]["motion"]
    assert (motion["b"], motion["c"], motion["p_value"]) == (0, 0, 1.0)
    assert motion["verdict"].startswith("no measurable drop without video")
    overall = result["overall"]
    assert (overall["n"], overall["run_hits"], overall["reference_hits"]) == (40, 30, 40)
    assert result["verdict"] == overall["verdict"] and result["verdict"].startswith("video carries 25.0 pts")
    assert "Newcombe" in result["method"]["interval"] and "McNemar" in result["method"]["test"]


def test_paired_comparison_without_a_label_and_a_gain():
    run, ref = _colour_runs()
    result = paired_comparison(ref, run)  # roles swapped: the "run" is the better one
    assert result["overall"]["difference"] == pytest.approx(0.25)
    assert result["verdict"].startswith("the run scores 25.0 pts higher")
    assert paired_comparison(run, ref, removed="video")["per_type"]["nbi_on"]["c"] == 0
    swapped = paired_comparison(ref, run, removed="video")
    assert swapped["verdict"].startswith("removing video RAISES accuracy")


def test_paired_comparison_reports_mismatched_keys_and_gold():
    run, ref = _colour_runs()
    run = run[3:]  # three samples missing from the run
    ref = ref + [_pair_rec("v3", 0, "motion", "up", "up")]
    ref[20] = {**ref[20], "short_answer": "left"}  # same key, different gold (another data file)
    result = paired_comparison(run, ref, removed="video")
    assert not result["keys_match"]
    assert result["only_in_run"]["n"] == 0
    assert result["only_in_reference"]["n"] == 4
    assert ["v3", "q0"] in result["only_in_reference"]["examples"]
    assert result["gold_differs"] == {"n": 1, "examples": [["v2", "q0"]]}
    assert result["n_paired"] == 36
    assert result["verdict"].startswith("WARNING: the files do not hold the same samples")


def test_paired_comparison_uses_given_candidates_and_refuses_duplicates():
    ref = [_pair_rec("v", i, "tool", "snare", "A snare and forceps.") for i in range(4)]
    run = [_pair_rec("v", i, "tool", "snare", "A snare.") for i in range(4)]
    # with forceps in the closed set, the reference states two candidates (wrong); without, it is right
    with_forceps = paired_comparison(run, ref, {"tool": ["forceps", "snare"]})
    assert with_forceps["overall"]["reference_accuracy"] == 0.0
    assert paired_comparison(run, ref, {"tool": ["snare"]})["overall"]["reference_accuracy"] == 1.0
    with pytest.raises(ValueError, match="two records for"):
        paired_comparison(run + run[:1], ref)


def test_summarize_never_mutates_and_line_order_never_changes_a_score():
    recs = [
        {"question_type": "tool", "short_answer": "snare", "answer": "A snare.", "prediction": "A snare."},
        {"question_type": "tool", "short_answer": "forceps", "answer": "Forceps.", "prediction": "Forceps."},
        {"question_type": "tool", "short_answer": "catheter", "answer": "A catheter.",
         "prediction": "A catheter and a snare."},
        {"question_type": "tool", "short_answer": "snare", "answer": "A snare.", "prediction": "Snare, forceps."},
    ]
    given = {"tool": ["snare"]}  # the golds forceps/catheter are missing from the closed set
    frozen = json.dumps([recs, given])
    forward = summarize(recs, candidates=given)
    assert json.dumps([recs, given]) == frozen
    backward = summarize(list(reversed(recs)), candidates=given)
    assert backward == forward
    # every gold joins the closed set before scoring: the third and fourth predictions state two candidates
    assert forward["per_type"]["tool"]["candidates"] == ["catheter", "forceps", "snare"]
    assert forward["accuracy_hits"] == 2


def test_a_type_whose_gold_answers_are_all_blank_scores_zero_without_crashing():
    """Files of the original toolkit may hold blank short answers; such a type has no closed set: every line is a
    miss (a blank gold never scores), and the summary still lists the type."""
    recs = _records() + [_rec("unlabelled", "", "Yes.", idx=200 + i) for i in range(3)]
    s = summarize(recs)
    assert s["per_type"]["unlabelled"]["n"] == 3
    assert s["per_type"]["unlabelled"]["accuracy"] == 0.0
    assert s["per_type"]["unlabelled"]["chance_baseline"] == 0.0
