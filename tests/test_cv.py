"""``surgvqa cv``: folds, the interval over folds, and (slow) three short folds on synthetic videos, killed and
resumed without redoing a finished fold."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from surgvqa.clusters import Clustering
from surgvqa.cv import across_folds, main, parse_args, plan_folds, pooled, select
from surgvqa.errors import UserError
from surgvqa.plan import cv_line
from surgvqa.report import read_predictions, read_predictions_meta, summarize_run
from surgvqa.stats import t_quantile

REPO = Path(__file__).resolve().parents[1]


def test_each_fold_tests_one_video_validates_on_the_next_and_trains_on_the_rest(tmp_path):
    folds = plan_folds(["a", "b", "c", "d"], tmp_path, "next")
    assert [(f.test, f.val, f.train) for f in folds] == [
        ("a", "b", ["c", "d"]), ("b", "c", ["a", "d"]), ("c", "d", ["a", "b"]), ("d", "a", ["b", "c"])]
    assert folds[2].directory == tmp_path / "fold-03-c"
    assert [(f.val, f.train) for f in plan_folds(["a", "b"], tmp_path, "none")] == [(None, ["b"]), (None, ["a"])]
    with pytest.raises(UserError, match="at least 3 videos"):
        plan_folds(["a", "b"], tmp_path, "next")
    assert [f.test for f in select(folds, "c,1")] == ["c", "a"]
    with pytest.raises(UserError, match="neither a video"):
        select(folds, "x")


def test_interval_over_folds_is_the_t_interval_of_the_per_video_accuracies():
    out = across_folds([{"accuracy": a} for a in (0.6, 0.7, 0.8)])
    half = t_quantile(0.975, 2) * 0.1 / 3**0.5
    assert out["mean"] == pytest.approx(0.7) and out["sd"] == pytest.approx(0.1)
    assert out["t_ci95"] == pytest.approx([0.7 - half, 0.7 + half])
    assert across_folds([{"accuracy": 0.5}])["t_ci95"] is None


def _fold_file(path: Path, video: str, gold: str, candidates: list[str], predictions: list[str]) -> Path:
    meta = {"surgvqa_meta": {"candidates": {"colour": candidates}}}
    lines = [meta] + [{"video_id": video, "id": f"q{i}", "question_type": "colour", "short_answer": gold,
                       "answer": f"It is {gold}.", "prediction": p, "frame_numbers": [100 * i, 100 * i + 8]}
                      for i, p in enumerate(predictions)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_pooled_accuracy_is_the_n_weighted_mean_of_the_folds_each_scored_with_its_own_answer_sets(tmp_path):
    # "red blue" names one candidate of fold 1's set (red) and one of fold 2's (blue); scored with both sets at
    # once it names two candidates, which is wrong
    files = [_fold_file(tmp_path / "f1.jsonl", "a", "red", ["red"], ["red blue"] * 5 + ["green"]),
             _fold_file(tmp_path / "f2.jsonl", "b", "blue", ["blue"], ["red blue"] * 6)]
    results = []
    for f in files:
        summary = summarize_run(read_predictions(f), read_predictions_meta(f))
        results.append({"predictions": str(f), "n": summary["n"], "accuracy": summary["accuracy"]})
    assert [r["accuracy"] for r in results] == pytest.approx([5 / 6, 1.0])
    out = pooled(results, Clustering(resamples=200))
    assert out["n"] == 12
    assert out["accuracy"] == pytest.approx(sum(r["n"] * r["accuracy"] for r in results) / 12)
    assert out["accuracy_hits"] == 11 and out["clustered"]["n_clusters"] == 12


def test_training_flags_that_cv_sets_itself_are_refused():
    args, flags = parse_args(["--data_path", "d.jsonl", "--output_dir", "o", "--", "--max_steps", "3"])
    assert args.val_policy == "next" and flags == ["--max_steps", "3"]
    with pytest.raises(UserError, match="--output_dir"):
        parse_args(["--data_path", "d.jsonl", "--output_dir", "o", "--", "--output_dir=x"])


def test_a_recipe_that_sets_what_cv_sets_itself_is_refused_naming_the_keys(tmp_path):
    shipped = REPO / "configs" / "a100_qwen2_5_omni.yaml"
    with pytest.raises(UserError, match="eval_audio_dir, eval_data_path, frames_dir, output_dir") as err:
        parse_args(["--data_path", "d.jsonl", "--output_dir", "o", "--", str(shipped), "--max_steps", "3"])
    assert str(shipped) in str(err.value)
    clean = tmp_path / "recipe.yaml"
    clean.write_text("model_name_or_path: m\nlearning_rate: 1.0e-4\n")
    assert parse_args(["--data_path", "d.jsonl", "--output_dir", "o", "--", str(clean)])[1] == [str(clean)]
    (tmp_path / "own.json").write_text(json.dumps({"eval_frames_dir": "f", "max_steps": 3}))
    with pytest.raises(UserError, match="eval_frames_dir"):
        parse_args(["--data_path", "d.jsonl", "--output_dir", "o", "--", str(tmp_path / "own.json")])


def test_an_edited_recipe_is_refused_like_changed_flags(tmp_path, monkeypatch, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"video_id": v, "id": "q", "frames": ["f_1"], "question": "?",
                                        "answer": "yes", "short_answer": "yes"}) + "\n" for v in "abc"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model_name_or_path: m\nlearning_rate: 1.0e-4\n")
    out = tmp_path / "cv"

    def no_training(fold, *_args):
        raise UserError(f"fold {fold.number} not trained here")

    monkeypatch.setattr("surgvqa.cv.run_fold", no_training)
    argv = ["--data_path", str(data), "--output_dir", str(out), "--folds", "a", "--", str(recipe)]
    assert main(argv) == 2 and "fold 1 not trained here" in capsys.readouterr().err
    settings = json.loads((out / "cv_settings.json").read_text())
    assert settings["recipe_sha256"] == hashlib.sha256(recipe.read_bytes()).hexdigest()
    assert main(argv) == 2 and "fold 1 not trained here" in capsys.readouterr().err  # same recipe: accepted
    recipe.write_text("model_name_or_path: m\nlearning_rate: 2.0e-4\n")  # same flags, another recipe
    assert main(argv) == 2 and "holds a cross-validation with other settings" in capsys.readouterr().err
    assert json.loads((out / "cv_settings.json").read_text()) == settings


def test_plan_states_the_cost_of_the_folds_and_never_guesses_hours():
    assert "6 trainings" in cv_line(6, None, None) and "never guesses" in cv_line(6, None, None)
    assert "= 1.5 h" in cv_line(6, 500, 1.8)


def _cv_argv(data: Path, out: Path, model: Path) -> list[str]:
    return ["--data_path", str(data / "in_template.jsonl"), "--frames_dir", str(data / "frames"),
            "--output_dir", str(out), "--eval_batch_size", "16", "--max_new_tokens", "8", "--device", "cpu",
            "--bootstrap", "500", "--",
            "--model_name_or_path", str(model), "--frame_size", "56", "--max_steps", "3",
            "--per_device_train_batch_size", "4", "--save_strategy", "no", "--logging_steps", "1",
            "--use_cpu", "True", "--seed", "0", "--disable_tqdm", "True"]


@pytest.mark.slow
def test_three_folds_killed_and_resumed_without_redoing_a_finished_fold(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_synthetic_dataset.py"), "--output_dir", str(data),
                    "--seed", "3", "--num_clips", "24", "--video_ids", "002-011,002-012,002-013",
                    "--question_types", "nbi_status,tool_catheter_check", "--no_audio"],
                   check=True, capture_output=True)
    out = tmp_path / "cv"
    argv = _cv_argv(data, out, tiny_model_dir)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen([sys.executable, "-m", "surgvqa", "cv", *argv], env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "fold-01-002-011" / "fold.json"
    deadline = time.monotonic() + 600
    while not first.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.exists(), "the first fold did not finish"
    os.killpg(child.pid, signal.SIGKILL)  # the cross-validation and its running fold, at once
    child.wait()
    stamps = {p: p.stat().st_mtime_ns for p in first.parent.rglob("*") if p.is_file()}

    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # the finished fold was not touched
    report = json.loads((out / "cv.json").read_text())
    assert report["finished"] == report["n_folds"] == 3
    accs = [f["accuracy"] for f in report["folds"]]
    assert [f["test_video"] for f in report["folds"]] == ["002-011", "002-012", "002-013"]
    assert report["across_folds"]["mean"] == pytest.approx(sum(accs) / 3)
    assert report["across_folds"]["t_ci95"] is not None
    for fold in report["folds"]:
        preds = [json.loads(line) for line in Path(fold["predictions"]).read_text().splitlines()[1:]]
        assert {p["video_id"] for p in preds} == {fold["test_video"]}  # tested on its own video only
        train = Path(fold["run_dir"]).parent / "data" / "train.jsonl"
        assert fold["test_video"] not in {json.loads(line)["video_id"] for line in train.read_text().splitlines()}
    assert report["pooled"]["n"] == sum(f["n"] for f in report["folds"])
    assert 'id="folds"' in (out / "cv.html").read_text()


def test_a_later_call_with_another_recipe_is_refused(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"video_id": v, "id": "q", "frames": ["f_1"], "question": "?",
                                        "answer": "yes", "short_answer": "yes"}) + "\n" for v in "abc"))
    out = tmp_path / "cv"
    out.mkdir()
    (out / "cv_settings.json").write_text(json.dumps({"train_flags": ["--max_steps", "3"]}))
    assert main(["--data_path", str(data), "--output_dir", str(out), "--folds", "a", "--", "--max_steps", "4"]) == 2
    assert json.loads((out / "cv_settings.json").read_text()) == {"train_flags": ["--max_steps", "3"]}
