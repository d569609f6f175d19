"""evaluate_checkpoint.py end to end on the tiny trained adapter: streaming output, summary, resume, re-scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from surgvqa.evaluate import main, parse_args, parse_baseline

SUMMARY_KEYS = {"n", "accuracy", "k_acc", "substring_acc", "exact_match", "bleu4", "rouge_l", "baseline", "per_type"}
RECORD_KEYS = {"video_id", "id", "question_type", "question", "answer", "short_answer", "prediction", "accuracy",
               "k_acc", "substring", "exact_match", "stopped_by_eos", "new_tokens", "latency_ms"}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def evaluated(trained_adapter, test_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "preds.jsonl"
    code = main([
        "--checkpoint_path", str(trained_adapter), "--eval_data_path", str(test_set / "out_002-001.jsonl"),
        "--frames_dir", str(test_set / "frames"), "--output_file", str(out), "--batch_size", "8",
        "--max_new_tokens", "24", "--device", "cpu",
    ])
    assert code == 0
    return out


def test_output_file_and_summary(evaluated, test_set):
    records = _lines(evaluated)
    assert len(records) == 50
    assert all(RECORD_KEYS <= set(r) for r in records)
    assert len({(r["video_id"], r["id"]) for r in records}) == 50
    summary = json.loads(evaluated.with_name("preds.summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["n"] == 50
    assert all(0.0 <= summary[k] <= 1.0 for k in ("accuracy", "k_acc", "substring_acc", "exact_match", "rouge_l"))
    # the summary is a pure function of the file: recount accuracy from the per-sample hits
    assert summary["accuracy"] == pytest.approx(sum(bool(r["accuracy"]) for r in records) / 50)
    # preprocessing came from the adapter's surgvqa_config.json (56 px frames), not the 384 px default
    assert summary["frame_size"] == 56
    gold = {(json.loads(x)["video_id"], json.loads(x)["id"]): json.loads(x)["answer"]
            for x in (test_set / "out_002-001.jsonl").read_text().splitlines()}
    assert all(gold[(r["video_id"], r["id"])] == r["answer"] for r in records)


def test_score_predictions_reproduces_summary(evaluated, tmp_path):
    copy = tmp_path / "copy.jsonl"
    copy.write_text(evaluated.read_text())
    assert main(["--score_predictions", str(copy)]) == 0
    original = json.loads(evaluated.with_name("preds.summary.json").read_text())
    rescored = json.loads((tmp_path / "copy.summary.json").read_text())
    for key in ("n", "accuracy", "k_acc", "substring_acc", "exact_match", "bleu4", "rouge_l", "baseline"):
        assert rescored[key] == pytest.approx(original[key]), key
    assert rescored["per_type"].keys() == original["per_type"].keys()


def test_resume_after_kill_has_no_duplicates(evaluated, trained_adapter, test_set, tmp_path):
    partial = tmp_path / "partial.jsonl"
    lines = evaluated.read_text().splitlines()
    # 20 finished lines plus a line cut mid-write by a kill
    partial.write_text("\n".join(lines[:20]) + "\n" + lines[20][:30])
    code = main([
        "--checkpoint_path", str(trained_adapter), "--eval_data_path", str(test_set / "out_002-001.jsonl"),
        "--frames_dir", str(test_set / "frames"), "--output_file", str(partial), "--resume", "True",
        "--batch_size", "8", "--max_new_tokens", "24", "--device", "cpu",
    ])
    assert code == 0
    records = _lines(partial)
    keys = [(r["video_id"], r["id"]) for r in records]
    assert len(keys) == 50 and len(set(keys)) == 50
    # greedy decoding: resumed predictions equal the uninterrupted run's
    first = {(r["video_id"], r["id"]): r["prediction"] for r in _lines(evaluated)}
    assert all(first[(r["video_id"], r["id"])] == r["prediction"] for r in records)


def test_ablate_video_and_compare(evaluated, trained_adapter, test_set, tmp_path, capsys):
    out = tmp_path / "blind.jsonl"
    code = main([
        "--checkpoint_path", str(trained_adapter), "--eval_data_path", str(test_set / "out_002-001.jsonl"),
        "--frames_dir", str(test_set / "frames"), "--output_file", str(out), "--ablate", "video",
        "--compare", str(evaluated.with_name("preds.summary.json")), "--limit", "16", "--baseline", "0.46",
        "--max_new_tokens", "24", "--device", "cpu",
    ])
    assert code == 0
    summary = json.loads(out.with_name("blind.summary.json").read_text())
    assert summary["ablate"] == "video" and summary["n"] == 16
    assert summary["baseline"] == pytest.approx(0.46)
    comparison = summary["comparison"]
    assert comparison["reference"] == str(evaluated.resolve())  # found from the summary path
    # 16 of the reference's 50 samples were evaluated: the other 34 are reported, not silently dropped
    assert comparison["n_paired"] == 16 and comparison["only_in_reference"]["n"] == 34
    assert comparison["verdict"].startswith("WARNING: the files do not hold the same samples")
    assert {"b", "c", "p_value", "difference_ci95"} <= set(comparison["overall"])
    assert "paired comparison: ablate=video vs reference" in capsys.readouterr().out


def test_baseline_parsing_and_required_flags(tmp_path):
    assert parse_baseline("majority") == "majority"
    assert parse_baseline("0.46") == pytest.approx(0.46)
    with pytest.raises(ValueError, match="fraction"):
        parse_baseline("46")
    with pytest.raises(ValueError, match="majority"):
        parse_baseline("mode")
    assert main(["--eval_data_path", "x.jsonl"]) == 2  # a user error: one line, exit 2
    args = parse_args(["--checkpoint_path", "c", "--eval_data_path", "e", "--output_file", "o", "--limit", "3"])
    assert args.limit == 3 and args.baseline == "majority"


def test_missing_frame_is_an_error_naming_the_sample(trained_adapter, test_set, tmp_path, capsys):
    data = tmp_path / "eval.jsonl"
    record = json.loads((test_set / "out_002-001.jsonl").read_text().splitlines()[0])
    record["frames"][3] = "002-001_0"
    data.write_text(json.dumps(record) + "\n")
    code = main(["--checkpoint_path", str(trained_adapter), "--eval_data_path", str(data),
                 "--frames_dir", str(test_set / "frames"), "--output_file", str(tmp_path / "p.jsonl")])
    assert code == 2
    err = capsys.readouterr().err
    assert "002-001_0" in err and record["id"] in err
