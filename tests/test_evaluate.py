"""evaluate_checkpoint.py end to end on the tiny trained adapter: the self-describing predictions file, summary,
re-scoring that reproduces the run, output safety, resume, ablations and the paired comparison."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from surgvqa.clusters import Clustering
from surgvqa.evaluate import main, parse_args, parse_baseline
from surgvqa.report import META_KEY, read_predictions, read_predictions_meta, summarize_run
from surgvqa.run_config import CONFIG_NAME

REPO = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {"n", "accuracy", "k_acc", "substring_acc", "exact_match", "bleu4", "rouge_l", "baseline", "per_type"}
RECORD_KEYS = {"video_id", "id", "question_type", "question", "answer", "short_answer", "prediction", "accuracy",
               "k_acc", "substring", "exact_match", "stopped_by_eos", "new_tokens", "latency_ms"}
META_FIELDS = {"format", "checkpoint", "checkpoint_sha256", "eval_data_path", "eval_data_sha256", "ablate",
               "preprocessing", "preprocessing_source", "max_new_tokens", "scoring", "candidates", "clustering"}
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _lines(path: Path) -> list[dict]:
    """The prediction records of a file (its meta line skipped)."""
    return [r for r in (json.loads(x) for x in path.read_text().splitlines() if x.strip()) if META_KEY not in r]


def _without_latency(path: Path) -> list[dict]:
    """Every line, meta included, minus the one field that is a wall-clock measurement."""
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [{k: v for k, v in r.items() if k != "latency_ms"} for r in rows]


def _args(adapter, data, frames, out, *extra) -> list[str]:
    return ["--checkpoint_path", str(adapter), "--eval_data_path", str(data), "--frames_dir", str(frames),
            "--output_file", str(out), "--batch_size", "8", "--max_new_tokens", "24", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def evaluated(trained_adapter, test_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "preds.jsonl"
    assert main(_args(trained_adapter, test_set / "out_002-001.jsonl", test_set / "frames", out)) == 0
    return out


def test_output_file_meta_line_and_summary(evaluated, test_set, trained_adapter):
    first = json.loads(evaluated.read_text().splitlines()[0])
    assert list(first) == [META_KEY]
    assert META_FIELDS <= set(first[META_KEY]) and first[META_KEY]["format"] == 2
    meta = read_predictions_meta(evaluated)
    assert meta.checkpoint == str(trained_adapter.resolve()) and len(meta.checkpoint_sha256) == 64
    assert meta.eval_data_path == str((test_set / "out_002-001.jsonl").resolve())
    assert meta.ablate is None and meta.max_new_tokens == 24 and meta.preprocessing.question_modality == "text"
    assert meta.preprocessing_source == CONFIG_NAME
    assert meta.candidates["lesion_motion_direction"]  # the closed answer set per type the run used
    records = read_predictions(evaluated)
    assert records == _lines(evaluated) and len(records) == 50
    assert all(RECORD_KEYS <= set(r) for r in records)
    assert len({(r["video_id"], r["id"]) for r in records}) == 50
    assert not evaluated.with_name("preds.jsonl.partial").exists()  # renamed at the end
    summary = json.loads(evaluated.with_name("preds.summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["n"] == 50 and summary["candidates_source"] == "meta"
    assert all(0.0 <= summary[k] <= 1.0 for k in ("accuracy", "k_acc", "substring_acc", "exact_match", "rouge_l"))
    assert summary["accuracy"] == pytest.approx(sum(bool(r["accuracy"]) for r in records) / 50)
    # preprocessing came from the adapter's surgvqa_config.json (56 px frames), not the 384 px default
    assert summary["frame_size"] == 56 and meta.preprocessing.frame_size == 56
    # lines are in the data file's order, whatever the batches
    order = [(json.loads(x)["video_id"], json.loads(x)["id"])
             for x in (test_set / "out_002-001.jsonl").read_text().splitlines()]
    assert [(r["video_id"], r["id"]) for r in records] == order
    # every record carries its clip's frames and frame numbers, and the meta line the clustering, so re-scoring
    # finds the same segments and draws the same bootstrap sets from the file alone
    data = [json.loads(x) for x in (test_set / "out_002-001.jsonl").read_text().splitlines()]
    assert [r["frame_numbers"] for r in records] == [d["frame_numbers"] for d in data]
    assert [r["frames"] for r in records] == [d["frames"] for d in data]
    assert meta.clustering == Clustering("segment", 30, 2000, 0)
    assert summary["clustered"]["clustering"]["unit"] == "segment"


def _rescore(predictions: Path, *extra: str) -> dict:
    assert main(["--score_predictions", str(predictions), *extra]) == 0
    return json.loads(predictions.with_name(predictions.name + ".rescored.summary.json").read_text())


def _assert_same_summary(run: dict, rescored: dict) -> None:
    """Every number (and every other field) equal, except where the predictions file lives."""
    run = {k: v for k, v in run.items() if k != "predictions_file"}
    rescored = {k: v for k, v in rescored.items() if k != "predictions_file"}
    assert rescored == run


def test_score_predictions_reproduces_the_summary_exactly(evaluated, tmp_path):
    copy = tmp_path / "copy.jsonl"
    copy.write_text(evaluated.read_text())
    rescored = _rescore(copy)
    _assert_same_summary(json.loads(evaluated.with_name("preds.summary.json").read_text()), rescored)
    assert not (tmp_path / "copy.summary.json").exists()  # the run's summary name is never taken by a re-score
    # line order never changes a score
    lines = copy.read_text().splitlines()
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    _assert_same_summary(rescored, _rescore(shuffled))
    # --summary_file names the summary; --baseline overrides the run's
    target = tmp_path / "elsewhere.json"
    assert main(["--score_predictions", str(copy), "--summary_file", str(target), "--baseline", "chance"]) == 0
    assert json.loads(target.read_text())["baseline_kind"] == "chance"
    assert main(["--score_predictions", str(copy), "--summary_file", str(target)]) == 2  # exists: not replaced


@pytest.mark.parametrize("case", ["limit", "skip_bad_samples"])
def test_rescoring_equals_the_run_after_limit_and_skipped_samples(trained_adapter, test_set, tmp_path, case):
    """The closed answer sets come from the whole usable file; re-scoring uses the recorded ones, not the lines'."""
    data = tmp_path / "eval.jsonl"
    lines = (test_set / "out_002-001.jsonl").read_text().splitlines()
    extra = ["--limit", "7"]
    if case == "skip_bad_samples":
        bad = [json.loads(x) for x in lines[:3]]
        for record in bad:
            record["frames"][0] = "no_such_frame"
        lines = [json.dumps(r) for r in bad] + lines[3:12]
        extra = ["--skip_bad_samples", "True"]
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run.jsonl"
    assert main(_args(trained_adapter, data, test_set / "frames", out, *extra)) == 0
    run = json.loads((tmp_path / "run.summary.json").read_text())
    assert run["n"] == (7 if case == "limit" else 9)
    if case == "skip_bad_samples":
        assert run["skipped_bad_samples"] == 3
    if case == "limit":  # the 7 lines alone hold fewer answers: their own answer sets would give other numbers
        alone = summarize_run(read_predictions(out), None)
        assert alone["candidates"] != run["candidates"] and alone["chance_baseline"] != run["chance_baseline"]
    # the run's settings (skipped count, limit, checkpoint, ...) and every number come back from the file alone
    _assert_same_summary(run, _rescore(out))


def test_rescoring_refuses_flags_it_would_ignore(evaluated, tmp_path, capsys):
    for extra in (["--checkpoint_path", "x"], ["--eval_data_path", "x.jsonl"], ["--ablate", "video"],
                  ["--limit", "3"], ["--resume", "True"]):
        assert main(["--score_predictions", str(evaluated), *extra]) == 2
        assert f"{extra[0]} would be ignored" in capsys.readouterr().err
    assert main(["--score_predictions", str(evaluated), "--output_file", str(evaluated)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert main(["--score_predictions", str(tmp_path / "nope.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--score_predictions", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_rescoring_honours_compare(evaluated, tmp_path):
    copy = tmp_path / "copy.jsonl"
    copy.write_text(evaluated.read_text())
    rescored = _rescore(copy, "--compare", str(evaluated))
    assert rescored["comparison"]["keys_match"] and rescored["comparison"]["overall"]["b"] == 0
    assert rescored["comparison"]["verdict"].startswith("no measurable difference")


def test_scoring_an_original_toolkit_file_without_meta(tmp_path, evaluated):
    original = tmp_path / "orig.jsonl"
    original.write_text("".join(json.dumps({"question_id": r["id"], "question_type": r["question_type"],
                                            "ground_truth": r["answer"], "short_answer": r["short_answer"],
                                            "predicted_answer": r["prediction"]}) + "\n"
                                for r in read_predictions(evaluated)))
    with pytest.warns(UserWarning, match="no video_id"):
        summary = _rescore(original)
    assert summary["candidates_source"] == "records" and summary["checkpoint"] is None


# ---------------------------------------------------------------------------------- nothing lost, nothing mixed
def test_output_equal_to_an_input_is_refused(trained_adapter, test_set, tmp_path, capsys):
    data = tmp_path / "eval.jsonl"
    data.write_text((test_set / "out_002-001.jsonl").read_text())
    before = data.read_bytes()
    for extra in ([], ["--overwrite", "True"]):
        assert main(_args(trained_adapter, data, test_set / "frames", data, *extra)) == 2
        assert "would overwrite the input" in capsys.readouterr().err
        assert data.read_bytes() == before
    assert main(_args(trained_adapter, data, test_set / "frames", tmp_path)) == 2
    assert "is a directory" in capsys.readouterr().err


def test_existing_output_is_never_truncated(evaluated, trained_adapter, test_set, tmp_path, capsys):
    out = tmp_path / "preds.jsonl"
    out.write_text(evaluated.read_text())
    before = out.read_bytes()
    # no --overwrite: refused before anything is written
    assert main(_args(trained_adapter, test_set / "out_002-001.jsonl", test_set / "frames", out)) == 2
    assert "--overwrite True" in capsys.readouterr().err
    # --overwrite, but the run fails (a broken checkpoint): the old file stays byte-identical, no partial left
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in trained_adapter.iterdir():
        if f.is_file():
            (broken / f.name).write_bytes(f.read_bytes())
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError):  # a library's error inside the run: it keeps its traceback
        main(_args(broken, test_set / "out_002-001.jsonl", test_set / "frames", out, "--overwrite", "True"))
    assert out.read_bytes() == before
    assert not (tmp_path / "preds.jsonl.partial").exists()


def test_resume_refuses_another_run_naming_the_field(evaluated, trained_adapter, tiny_model_dir, test_set, tmp_path,
                                                     capsys):
    partial = tmp_path / "preds.jsonl.partial"
    lines = evaluated.read_text().splitlines()
    other_data = tmp_path / "in.jsonl"
    other_data.write_text((test_set / "in_002-001.jsonl").read_text())  # the same keys, other questions
    cases = {
        "eval_data_sha256": _args(trained_adapter, other_data, test_set / "frames", tmp_path / "preds.jsonl"),
        "ablate": _args(trained_adapter, test_set / "out_002-001.jsonl", test_set / "frames",
                        tmp_path / "preds.jsonl", "--ablate", "video"),
        "checkpoint_sha256": _args(tiny_model_dir, test_set / "out_002-001.jsonl", test_set / "frames",
                                   tmp_path / "preds.jsonl", "--frame_size", "56", "--question_modality", "text",
                                   "--frames_as", "video"),
        "frame_size": _args(trained_adapter, test_set / "out_002-001.jsonl", test_set / "frames",
                            tmp_path / "preds.jsonl", "--frame_size", "112"),
    }
    for field_name, args in cases.items():
        partial.write_text("\n".join(lines[:21]) + "\n")
        before = partial.read_bytes()
        assert main([*args, "--resume", "True"]) == 2
        err = capsys.readouterr().err
        assert f"{field_name} differs" in err, err
        assert partial.read_bytes() == before
    # a file without a meta line cannot be checked: refused too
    partial.write_text("\n".join(lines[1:21]) + "\n")
    assert main([*cases["frame_size"][:-2], "--resume", "True"]) == 2
    assert f"has no {META_KEY} line" in capsys.readouterr().err
    # and without --resume, a partial file is not silently discarded
    assert main(cases["frame_size"][:-2]) == 2
    assert "interrupted run" in capsys.readouterr().err


def test_resume_of_a_cut_partial_equals_the_uninterrupted_run(evaluated, trained_adapter, test_set, tmp_path):
    out = tmp_path / "preds.jsonl"
    lines = evaluated.read_text().splitlines()
    # the meta line, 16 finished lines, then a line cut mid-write by a kill. 16 = two batches of 8: the resumed
    # batches are the uninterrupted run's, so their padding and float rounding are too (the adapter is not
    # memorised: another batching could flip a near tie on some CPUs)
    (tmp_path / "preds.jsonl.partial").write_text("\n".join(lines[:17]) + "\n" + lines[17][:30])
    assert main(_args(trained_adapter, test_set / "out_002-001.jsonl", test_set / "frames", out,
                      "--resume", "True")) == 0
    assert _without_latency(out) == _without_latency(evaluated)
    assert not (tmp_path / "preds.jsonl.partial").exists()


@pytest.mark.slow
def test_kill_then_resume_equals_an_uninterrupted_run(evaluated, trained_adapter, test_set, tmp_path, caplog):
    """A real SIGKILL of evaluate_checkpoint.py mid-run, then --resume: the same lines, no duplicates.
    Batch size 1 for both runs: wherever the kill lands, every sample is computed as in the uninterrupted run."""
    out = tmp_path / "preds.jsonl"
    partial = tmp_path / "preds.jsonl.partial"
    args = [sys.executable, str(REPO / "evaluate_checkpoint.py"),
            *_args(trained_adapter, test_set / "out_002-001.jsonl", test_set / "frames", out)]
    args[args.index("--batch_size") + 1] = "1"
    reference = tmp_path / "reference.jsonl"
    assert main([*args[2:], "--output_file", str(reference)]) == 0  # the last --output_file counts
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (partial.is_file() and partial.read_text().count("\n") >= 11):
        assert proc.poll() is None, "the evaluation ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and partial.exists()
    with caplog.at_level("INFO", logger="surgvqa.evaluate"):
        assert main([*args[2:], "--resume", "True"]) == 0
    resumed = [r.getMessage() for r in caplog.records if "already in" in r.getMessage()]
    assert resumed and not resumed[0].startswith("resume: 0 of")  # it continued, it did not start over
    assert _without_latency(out) == _without_latency(reference)


def test_rescoring_summary_has_its_own_flag_and_the_old_spelling_warns(evaluated, tmp_path, capsys, caplog):
    copy = tmp_path / "copy.jsonl"
    copy.write_text(evaluated.read_text())
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "--summary_file" in capsys.readouterr().out
    old = tmp_path / "old-spelling.json"
    with caplog.at_level("WARNING", logger="surgvqa.evaluate"):
        assert main(["--score_predictions", str(copy), "--output_file", str(old)]) == 0
    assert json.loads(old.read_text())["n"] > 0  # still the summary, as before
    assert "--output_file with --score_predictions names the re-scored summary JSON" in caplog.text
    assert main(["--score_predictions", str(copy), "--output_file", str(old), "--summary_file",
                 str(tmp_path / "b.json")]) == 2
    assert "pass --summary_file only" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["directory", "foreign_file"])
def test_report_is_checked_before_the_evaluation_naming_its_flag(trained_adapter, test_set, tmp_path, monkeypatch,
                                                                 capsys, case):
    report = tmp_path / "report.html"
    if case == "directory":
        report.mkdir()
    else:
        report.write_text("my notes")
    monkeypatch.setattr("surgvqa.evaluate.load_for_inference", lambda *a, **k: pytest.fail("the model loaded"))
    out = tmp_path / "preds.jsonl"
    assert main(_args(trained_adapter, test_set / "out_002-001.jsonl", test_set / "frames", out,
                      "--report", str(report))) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --report {report} ") and "--output " not in err
    assert not out.exists() and not out.with_name("preds.jsonl.partial").exists()


def test_frame_cache_dir_without_a_disk_cache_is_refused(trained_adapter, test_set, tmp_path, monkeypatch, capsys):
    from surgvqa.train import main as train_main

    monkeypatch.setattr("surgvqa.evaluate.load_for_inference", lambda *a, **k: pytest.fail("the model loaded"))
    for mode in ("memory", "none"):
        assert main(_args(trained_adapter, test_set / "out_002-001.jsonl", test_set / "frames",
                          tmp_path / "preds.jsonl", "--frame_cache", mode, "--frame_cache_dir",
                          str(tmp_path / "X"))) == 2
        assert capsys.readouterr().err.startswith(f"error: --frame_cache {mode} keeps no files, so "
                                                  f"--frame_cache_dir {tmp_path / 'X'} would be ignored")
    assert train_main(["--model_name_or_path", str(tmp_path / "no-model"), "--train_data_path",
                       str(test_set / "in_002-001.jsonl"), "--frames_dir", str(test_set / "frames"),
                       "--output_dir", str(tmp_path / "run"), "--use_cpu", "True", "--frame_cache", "memory",
                       "--frame_cache_dir", str(tmp_path / "X")]) == 2
    assert "--frame_cache memory keeps no files" in capsys.readouterr().err
    assert not (tmp_path / "X").exists() and not (tmp_path / "run").exists()


def test_report_flag_calls_the_html_report_or_says_it_is_missing(evaluated, tmp_path, monkeypatch, capsys):
    import types

    copy = tmp_path / "copy.jsonl"
    copy.write_text(evaluated.read_text())
    monkeypatch.setitem(sys.modules, "surgvqa.html_report", None)  # not importable
    assert main(["--score_predictions", str(copy), "--report", str(tmp_path / "r.html")]) == 2
    assert "--report needs surgvqa.html_report" in capsys.readouterr().err
    calls, checked = [], []
    fake = types.ModuleType("surgvqa.html_report")
    fake.build_report = lambda predictions, output, **kw: calls.append((predictions, output, kw)) or Path(output)
    fake.check_output = lambda output, inputs, flag: checked.append((output, flag))  # before the run
    monkeypatch.setitem(sys.modules, "surgvqa.html_report", fake)
    assert main(["--score_predictions", str(copy), "--report", str(tmp_path / "r.html"),
                 "--compare", str(evaluated)]) == 0
    (predictions, output, kw), = calls
    assert predictions == copy and output == str(tmp_path / "r.html")
    assert kw["compare"] == [evaluated] and kw["frames_dir"] == read_predictions_meta(evaluated).frames_dir
    assert set(kw) == {"compare", "frames_dir", "audio_dir", "clustering"}
    assert checked == [(tmp_path / "r.html", "--report")]


def test_rescoring_report_shows_the_clustering_of_the_rescored_summary(evaluated, tmp_path):
    copy = tmp_path / "copy.jsonl"
    copy.write_text(evaluated.read_text())
    report = tmp_path / "r.html"
    summary = _rescore(copy, "--cluster_by", "clip", "--bootstrap", "300", "--bootstrap_seed", "7",
                       "--report", str(report))
    clustered = summary["clustered"]
    assert clustered["clustering"]["cluster_by"] == "clip" and clustered["clustering"]["bootstrap_seed"] == 7
    assert read_predictions_meta(copy).clustering.by != "clip"  # the run's own was another
    html = report.read_text()
    assert "--cluster_by clip" in html and "300 resamples, seed 7" in html
    assert f"{clustered['clustering']['n_clusters']} clips of" in html
    acc = clustered["accuracy"]
    assert (f"clustered 95 % CI [{100 * acc['ci95'][0]:.1f}, {100 * acc['ci95'][1]:.1f}] over "
            f"{acc['n_clusters']} clips" in html)


# -------------------------------------------------------------------------------------- ablation + comparison
@pytest.mark.parametrize("ablate", ["video", "video_shuffle"])
def test_ablate_video_and_compare(evaluated, trained_adapter, test_set, tmp_path, capsys, ablate):
    """The shipped test_set end to end under each video ablation, compared with the normal run."""
    out = tmp_path / "blind.jsonl"
    assert main(_args(trained_adapter, test_set / "out_002-001.jsonl", test_set / "frames", out, "--ablate", ablate,
                      "--compare", str(evaluated.with_name("preds.summary.json")), "--limit", "16",
                      "--baseline", "0.46")) == 0
    summary = json.loads(out.with_name("blind.summary.json").read_text())
    assert summary["ablate"] == ablate and summary["n"] == 16
    assert read_predictions_meta(out).ablate == ablate
    records = _lines(out)
    if ablate == "video_shuffle":  # one video in test_set: donors come from it, never the sample itself
        assert summary["ablation_seed"] == 0
        assert all(r["ablation_source"] != [r["video_id"], r["id"]] for r in records)
    else:
        assert all("ablation_source" not in r for r in records)
    assert summary["baseline"] == pytest.approx(0.46)
    comparison = summary["comparison"]
    assert comparison["reference"] == str(evaluated.resolve())  # found from the summary path
    # 16 of the reference's 50 samples were evaluated: the other 34 are reported, not silently dropped
    assert comparison["n_paired"] == 16 and comparison["only_in_reference"]["n"] == 34
    assert comparison["verdict"].startswith("WARNING: the files do not hold the same samples")
    assert {"b", "c", "p_value", "difference_ci95"} <= set(comparison["overall"])
    assert f"paired comparison: ablate={ablate} vs reference" in capsys.readouterr().out
    # re-scoring the ablated run reproduces it, its comparison included
    _assert_same_summary(summary, _rescore(out, "--compare", str(evaluated)))


def test_baseline_parsing_and_required_flags(tmp_path):
    assert parse_baseline("majority") == "majority"
    assert parse_baseline("0.46") == pytest.approx(0.46)
    with pytest.raises(ValueError, match="fraction"):
        parse_baseline("46")
    with pytest.raises(ValueError, match="majority"):
        parse_baseline("mode")
    assert main(["--eval_data_path", "x.jsonl"]) == 2  # a user error: one line, exit 2
    args = parse_args(["--checkpoint_path", "c", "--eval_data_path", "e", "--output_file", "o", "--limit", "3"])
    assert args.limit == 3 and args.baseline is None


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
    assert not (tmp_path / "p.jsonl").exists() and not (tmp_path / "p.jsonl.partial").exists()


# ------------------------------------------------------------------------------ a colour-only task (NBI tint)
NBI_RGB, WHITE_LIGHT_RGB = (40, 150, 140), (200, 90, 100)
NBI_ANSWERS = {"yes": "Yes, NBI light is on.", "no": "No, white light is on."}


def _write_colour_clips(root: Path, videos: list[str], per_video: int, seed: int) -> Path:
    """Clips whose only cue is the global tint: NBI green-blue vs white-light red-pink, under per-frame noise
    and a random blob, so no two frames are alike; half of each video's clips are NBI."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:56, :56]
    records = []
    for video in videos:
        for k in range(per_video):
            short = "yes" if k % 2 == 0 else "no"
            names = []
            for j in range(2):
                img = np.array(NBI_RGB if short == "yes" else WHITE_LIGHT_RGB, np.float32)
                img = img + rng.normal(0, 25, (56, 56, 1)) + rng.normal(0, 10, (56, 56, 3))
                cy, cx = rng.integers(8, 48, 2)
                img[(yy - cy) ** 2 + (xx - cx) ** 2 < 60] += rng.integers(-60, 60)
                name = f"{video}_{k}_{j}"
                path = root / "frames" / video / f"{name}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, quality=95)
                names.append(name)
            records.append({"id": f"qa_{k:04d}", "video_id": video, "frames": names,
                            "question": "Is NBI light on in these frames?", "question_type": "nbi_status",
                            "answer": NBI_ANSWERS[short], "short_answer": short})
    data = root / f"{videos[0][0]}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return data


@pytest.fixture(scope="module")
def colour_task(tiny_model_dir, tmp_path_factory):
    """A tiny adapter trained (with a wide margin: final loss ~1e-4) to answer 'is NBI on?' from the tint."""
    from surgvqa.train import main as train_main

    root = tmp_path_factory.mktemp("colour")
    train = _write_colour_clips(root, ["t1", "t2", "t3", "t4"], 16, seed=0)
    held_out = _write_colour_clips(root, ["e1", "e2", "e3"], 40, seed=1)
    adapter = root / "adapter"
    assert train_main([
        "--model_name_or_path", str(tiny_model_dir), "--train_data_path", str(train),
        "--frames_dir", str(root / "frames"), "--frame_size", "56", "--output_dir", str(adapter),
        "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--lr_scheduler_type", "constant",
        "--max_steps", "40", "--save_strategy", "no", "--logging_steps", "10", "--use_cpu", "True", "--seed", "0",
        "--disable_tqdm", "True",
    ]) == 0
    history = json.loads((adapter / "trainer_state.json").read_text())["log_history"]
    assert [h["loss"] for h in history if "loss" in h][-1] < 1e-2  # the wide margin the assertions below rely on
    return {"root": root, "adapter": adapter, "eval": held_out}


def _colour_eval(task, name: str, *extra: str) -> dict:
    out = task["root"] / f"{name}.jsonl"
    assert main([
        "--checkpoint_path", str(task["adapter"]), "--eval_data_path", str(task["eval"]),
        "--frames_dir", str(task["root"] / "frames"), "--output_file", str(out), "--batch_size", "16",
        "--max_new_tokens", "10", "--device", "cpu", *extra,
    ]) == 0
    return json.loads(out.with_name(f"{name}.summary.json").read_text())


def test_colour_task_ablations_remove_the_tint(colour_task):
    """The answer is the frames' colour: removing the video (one constant frame for all) or giving each sample
    another sample's frames must bring a >= 90 % model down to the majority baseline, with a paired p < 0.01."""
    normal = _colour_eval(colour_task, "normal")
    assert normal["n"] == 120 and normal["accuracy"] >= 0.90
    reference = str(colour_task["root"] / "normal.jsonl")
    for ablate in ("video", "video_shuffle"):
        # every frame name ends in 0 or 1, so each of the 3 held-out videos is one segment (too few for a clustered
        # test): the clips (one question each) are the clusters here
        ablated = _colour_eval(colour_task, ablate, "--ablate", ablate, "--compare", reference, "--cluster_by", "clip")
        assert ablated["majority_baseline"] == pytest.approx(0.5)
        assert abs(ablated["accuracy"] - ablated["majority_baseline"]) <= 0.05, (ablate, ablated["accuracy"])
        comparison = ablated["comparison"]
        assert comparison["keys_match"] and comparison["n_paired"] == 120
        assert comparison["overall"]["p_value"] < 0.01
        assert comparison["overall"]["drop"] >= 0.40
        assert "carries" in comparison["verdict"]
    # every shuffled sample saw another video's clip
    shuffled = _lines(colour_task["root"] / "video_shuffle.jsonl")
    assert all(r["ablation_source"][0] != r["video_id"] for r in shuffled)


def test_weights_hash_covers_sub_directories_but_not_training_checkpoints(tmp_path):
    from surgvqa.checkpoint import weights_sha256

    (tmp_path / "vl_model").mkdir()
    (tmp_path / "vl_model" / "model.safetensors").write_bytes(b"a")
    (tmp_path / "projector.safetensors").write_bytes(b"b")
    (tmp_path / "training_args.bin").write_bytes(b"not weights")
    first = weights_sha256(tmp_path)
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "adapter_model.safetensors").write_bytes(b"c")
    (tmp_path / "training_args.bin").write_bytes(b"changed")
    assert weights_sha256(tmp_path) == first
    (tmp_path / "vl_model" / "model.safetensors").write_bytes(b"A")
    assert weights_sha256(tmp_path) != first
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no weight files"):
        weights_sha256(empty)


def as_format_1(meta: dict) -> dict:
    """A meta line as the previous release wrote it (format 1: every setting at the top level)."""
    meta = dict(meta)
    preprocessing, clustering = meta.pop("preprocessing"), meta.pop("clustering")
    del preprocessing["max_train_frames"]  # evaluation does not use it: format 1 did not record it
    return {**meta, **preprocessing, "format": 1, "preprocessing": meta.pop("preprocessing_source"),
            "cluster_by": clustering["by"], "cluster_gap": clustering["gap"], "bootstrap": clustering["resamples"],
            "bootstrap_seed": clustering["seed"]}


def test_a_predictions_file_written_by_the_previous_release_rescores_to_its_summary(tmp_path):
    """tests/fixtures/predictions_format1: a file and its summary as the previous release wrote them (format 1,
    8 samples, --ablate video --cluster_by clip --bootstrap 500)."""
    copy = tmp_path / "preds.jsonl"
    shutil.copy(FIXTURES / "predictions_format1" / "preds.jsonl", copy)
    written = json.loads((FIXTURES / "predictions_format1" / "preds.summary.json").read_text())
    _assert_same_summary(written, _rescore(copy, "--report", str(tmp_path / "report.html")))
    assert "surgvqa_config.json" in (tmp_path / "report.html").read_text()  # the run's meta, shown
    meta = read_predictions_meta(copy)
    assert meta.format == 2 and meta.preprocessing_source == CONFIG_NAME and meta.ablate == "video"
    assert meta.clustering == Clustering("clip", 30, 500, 0) and meta.preprocessing.frame_size == 56


def test_files_of_the_previous_release_evaluate_rescore_and_resume(evaluated, trained_adapter, test_set, tmp_path):
    """A training output (surgvqa_config.json schema 2: ``media``, ``system_prompt`` and ``token_kept_ratio`` apart,
    no ``num_video_frames``) and a predictions file (meta line without ``num_video_frames``) as the release before
    the preprocessing record wrote them still resume to the same lines and re-score to the same summary."""
    adapter = tmp_path / "adapter"
    shutil.copytree(trained_adapter, adapter)
    record = json.loads((adapter / CONFIG_NAME).read_text())
    block = record.pop("preprocessing")
    del block["num_video_frames"]
    record.update(schema_version=2, system_prompt=block.pop("system_prompt"),
                  token_kept_ratio=block.pop("token_kept_ratio"), media=block)
    (adapter / CONFIG_NAME).write_text(json.dumps(record))
    lines = evaluated.read_text().splitlines()
    meta = as_format_1(json.loads(lines[0])[META_KEY])
    assert meta.pop("num_video_frames") == 8
    old = [json.dumps({META_KEY: meta}), *lines[1:]]

    copy = tmp_path / "old.jsonl"
    copy.write_text("\n".join(old) + "\n")
    _assert_same_summary(json.loads(evaluated.with_name("preds.summary.json").read_text()), _rescore(copy))

    out = tmp_path / "preds.jsonl"
    (tmp_path / "preds.jsonl.partial").write_text("\n".join(old[:17]) + "\n")
    assert main(_args(adapter, test_set / "out_002-001.jsonl", test_set / "frames", out, "--resume", "True")) == 0
    assert _without_latency(out)[1:] == _without_latency(evaluated)[1:]
