"""Tests for surgvqa.report: reading both predictions formats and the meta line, the run summary, table, plot,
the printed paired comparison."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from surgvqa.metrics import paired_comparison, summarize
from surgvqa.report import (
    META_KEY,
    PredictionsMeta,
    format_paired_comparison,
    format_table,
    partial_path_for,
    plot_per_type,
    predictions_path_for,
    read_predictions,
    read_predictions_meta,
    rescored_summary_path_for,
    summarize_run,
    summary_path_for,
    write_summary,
)


def _rec(qtype, short, prediction, vid="002-001", idx=0, eos=True):
    return {
        "video_id": vid,
        "id": f"qa_{idx:06d}",
        "question_type": qtype,
        "question": "?",
        "answer": f"The answer is {short}.",
        "short_answer": short,
        "prediction": prediction,
        "stopped_by_eos": eos,
        "new_tokens": 9,
        "latency_ms": 30.0,
    }


def _records():
    recs = [_rec("scope_motion", "no" if i < 6 else "yes", "No.", idx=i) for i in range(10)]
    golds = ["up", "down", "left", "right"] * 2
    preds = ["upward", "downward", "left", "up", "right", "down", "I cannot tell", "right"]
    recs += [
        _rec("motion", g, p, idx=100 + i, eos=i > 0)
        for i, (g, p) in enumerate(zip(golds, preds, strict=True))
    ]
    return recs


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _original(rec):
    return {
        "question_id": rec["id"],
        "question_type": rec["question_type"],
        "question": rec["question"],
        "ground_truth": rec["answer"],
        "short_answer": rec["short_answer"],
        "predicted_answer": rec["prediction"],
    }


# ---------------------------------------------------------------- reading


def test_read_predictions_our_format(tmp_path):
    recs = _records()
    path = tmp_path / "preds.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs[:3]) + "\n\n" + json.dumps(recs[3]) + "\n")
    got = read_predictions(path)
    assert got == recs[:4]


@pytest.mark.parametrize("as_list", [False, True])
def test_read_predictions_original_format(tmp_path, as_list):
    recs = _records()
    orig = [_original(r) for r in recs]
    path = tmp_path / ("orig.json" if as_list else "orig.jsonl")
    if as_list:
        path.write_text(json.dumps(orig, indent=2))
    else:
        _write_jsonl(path, orig)
    with pytest.warns(UserWarning, match="ids may collide"):
        got = read_predictions(path)
    assert len(got) == len(recs)
    assert got[0]["id"] == recs[0]["id"]
    assert got[0]["answer"] == recs[0]["answer"]
    assert got[0]["prediction"] == recs[0]["prediction"]
    assert "video_id" not in got[0] and "predicted_answer" not in got[0]
    # scored the same as our format (EOS is unknown there)
    ours, theirs = summarize(recs), summarize(got)
    assert theirs["accuracy"] == ours["accuracy"]
    assert theirs["no_eos"] == 0 and theirs["eos_unknown"] == len(recs)


def test_read_predictions_errors_name_file_and_line(tmp_path):
    good = json.dumps(_records()[0])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good + "\n" + '{"id": "x", "prediction": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
        read_predictions(bad)
    missing = tmp_path / "missing.jsonl"
    rec = _records()[0]
    del rec["short_answer"]
    missing.write_text(good + "\n" + good + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match=r"missing\.jsonl:3: missing field\(s\) short_answer"):
        read_predictions(missing)
    orig = _original(_records()[0])
    del orig["ground_truth"]
    orig_path = tmp_path / "orig.json"
    orig_path.write_text(json.dumps([orig]))
    with pytest.raises(ValueError, match=r"orig\.json\[item 0\]: missing field\(s\) ground_truth"):
        read_predictions(orig_path)
    not_obj = tmp_path / "list.jsonl"
    not_obj.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="expected a JSON object"):
        read_predictions(not_obj)


def test_read_predictions_warns_on_duplicate_keys(tmp_path):
    rec = _records()[0]
    path = _write_jsonl(tmp_path / "dup.jsonl", [rec, rec])
    with pytest.warns(UserWarning, match="duplicate"):
        assert len(read_predictions(path)) == 2


# ---------------------------------------------------------------- summaries


def test_summary_path_for():
    assert rescored_summary_path_for("runs/x/preds.jsonl") == Path("runs/x/preds.jsonl.rescored.summary.json")
    assert partial_path_for("runs/x/preds.jsonl") == Path("runs/x/preds.jsonl.partial")
    assert summary_path_for("runs/x/preds.jsonl") == Path("runs/x/preds.summary.json")
    assert summary_path_for("runs/x/preds.json") == Path("runs/x/preds.json.summary.json")
    assert summary_path_for("preds") == Path("preds.summary.json")


def test_meta_line_is_read_apart_from_the_records(tmp_path):
    recs = _records()
    meta = {"checkpoint": "/x", "candidates": {"motion": ["down", "left", "right", "up"]}, "baseline": 0.25}
    path = tmp_path / "preds.jsonl"
    path.write_text(json.dumps({META_KEY: meta}) + "\n" + "".join(json.dumps(r) + "\n" for r in recs))
    assert read_predictions_meta(path) == PredictionsMeta(checkpoint="/x", baseline=0.25, candidates=meta["candidates"])
    assert read_predictions(path) == recs
    # a file of the original toolkit (or an older surgvqa) has no meta
    plain = _write_jsonl(tmp_path / "plain.jsonl", recs)
    assert read_predictions_meta(plain) is None
    assert read_predictions_meta(_write_jsonl(tmp_path / "l.json", [])) is None
    # a partial file cut by a kill: the meta still reads
    cut = tmp_path / "cut.jsonl.partial"
    cut.write_text(path.read_text()[:-20])
    assert read_predictions_meta(cut) == read_predictions_meta(path)
    # the meta line belongs first
    late = tmp_path / "late.jsonl"
    late.write_text(json.dumps(recs[0]) + "\n" + json.dumps({META_KEY: meta}) + "\n")
    with pytest.raises(ValueError, match=r"late\.jsonl:2: a surgvqa_meta line must be the first line"):
        read_predictions(late)


def test_summarize_run_uses_the_meta_answer_sets_and_baseline():
    recs = _records()
    # the lines alone hold motion golds up/down/left/right; the run's closed set also had "stable"
    meta = {"candidates": {"motion": ["down", "left", "right", "stable", "up"], "scope_motion": ["no", "yes"]},
            "baseline": 0.25, "checkpoint": "/ckpt", "ablate": "video", "limit": 18}
    frozen = json.dumps(meta)
    with_meta = summarize_run(recs, PredictionsMeta.from_dict(meta, "meta"))
    assert json.dumps(meta) == frozen  # inputs untouched
    assert with_meta["per_type"]["motion"]["chance_baseline"] == pytest.approx(1 / 5)
    assert with_meta["baseline_kind"] == "fixed" and with_meta["baseline"] == 0.25
    assert (with_meta["checkpoint"], with_meta["ablate"], with_meta["limit"]) == ("/ckpt", "video", 18)
    assert with_meta["candidates_source"] == "meta"
    alone = summarize_run(recs, None)
    assert alone["per_type"]["motion"]["chance_baseline"] == pytest.approx(1 / 4)
    assert alone["candidates_source"] == "records" and alone["baseline_kind"] == "majority"
    assert summarize_run(recs, PredictionsMeta(**meta), baseline="chance")["baseline_kind"] == "chance"


def test_write_summary_round_trip(tmp_path):
    s = summarize(_records())
    path = write_summary(s, tmp_path / "a" / "b.summary.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(s))


def test_format_table_lists_types_flags_and_overall():
    s = summarize(_records())
    table = format_table(s)
    lines = table.splitlines()
    sm_line = next(line for line in lines if line.startswith("scope_motion"))
    assert "COLLAPSE" in sm_line and "no (100.0%)" in sm_line and "60.0%" in sm_line
    mo_line = next(line for line in lines if line.startswith("motion"))
    assert "COLLAPSE" not in mo_line
    assert "vs majority baseline" in table
    assert f"{100 * s['delta_vs_baseline']:+.1f} pts" in table
    assert "no EOS (loops / cut at max tokens): 1 / 18" in table
    assert "collapsed types: scope_motion" in table
    assert "METEOR" in table


def test_plot_per_type_writes_png(tmp_path):
    out = plot_per_type(summarize(_records()), tmp_path / "plots" / "per_type.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5000


def test_format_paired_comparison_rows_and_verdict():
    normal = _records()
    ablated = [dict(r, prediction="stable") if r["question_type"] == "motion" else r for r in _records()]
    text = format_paired_comparison(
        paired_comparison(ablated, normal, removed="video"), label="ablate=video", reference_label="normal"
    )
    lines = text.splitlines()
    assert lines[0].startswith("paired comparison: ablate=video vs normal")
    motion = next(line for line in lines if line.startswith("motion"))
    # 5 of 8 motion answers were right in the normal run and none is after ablation
    assert "62.5%" in motion and "0.0%" in motion and "-62.5" in motion
    assert next(line for line in lines if line.startswith("overall"))
    # 5 discordant pairs, all one way: exact McNemar p = 2/32 = 0.0625, not significant at 0.05 (the verdict
    # follows the exact test even though the approximate interval already excludes 0)
    assert lines[-1].startswith("verdict: no measurable drop without video (p = 0.062 >= 0.05)")
    # the same pattern on two videos: 10 discordant pairs, p = 2/1024
    def twice(recs):
        return recs + [dict(r, video_id="002-002") for r in recs]

    assert format_paired_comparison(paired_comparison(twice(ablated), twice(normal), removed="video")).endswith(
        "verdict: video carries 27.8 pts, p = 0.002 (95% CI of run - reference [-41.4, -11.5] pts, n = 36)"
    )
    fewer = paired_comparison(ablated[:-2], normal, removed="video")
    assert "only in reference: 2" in format_paired_comparison(fewer)


def test_predictions_path_for_summaries(tmp_path):
    preds = _write_jsonl(tmp_path / "p.jsonl", _records())
    assert predictions_path_for(preds) == preds
    assert predictions_path_for(write_summary({"n": 1}, tmp_path / "p.summary.json")) == preds
    other = _write_jsonl(tmp_path / "elsewhere.jsonl", _records())
    recorded = write_summary({"predictions_file": str(other)}, tmp_path / "q.summary.json")
    assert predictions_path_for(recorded) == other
    assert predictions_path_for(write_summary({}, tmp_path / "p.jsonl.rescored.summary.json")) == preds
    with pytest.raises(ValueError, match="predictions file is not there"):
        predictions_path_for(write_summary({}, tmp_path / "gone.summary.json"))
    with pytest.raises(ValueError, match="not found"):
        predictions_path_for(tmp_path / "nothing.jsonl")
    with pytest.raises(ValueError, match="is a directory"):
        predictions_path_for(tmp_path)
