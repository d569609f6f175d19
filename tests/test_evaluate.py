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


@pytest.mark.parametrize("ablate", ["video", "video_shuffle"])
def test_ablate_video_and_compare(evaluated, trained_adapter, test_set, tmp_path, capsys, ablate):
    """The shipped test_set end to end under each video ablation, compared with the normal run."""
    out = tmp_path / "blind.jsonl"
    code = main([
        "--checkpoint_path", str(trained_adapter), "--eval_data_path", str(test_set / "out_002-001.jsonl"),
        "--frames_dir", str(test_set / "frames"), "--output_file", str(out), "--ablate", ablate,
        "--compare", str(evaluated.with_name("preds.summary.json")), "--limit", "16", "--baseline", "0.46",
        "--max_new_tokens", "24", "--device", "cpu",
    ])
    assert code == 0
    summary = json.loads(out.with_name("blind.summary.json").read_text())
    assert summary["ablate"] == ablate and summary["n"] == 16
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


def test_baseline_parsing_and_required_flags(tmp_path):
    assert parse_baseline("majority") == "majority"
    assert parse_baseline("0.46") == pytest.approx(0.46)
    with pytest.raises(ValueError, match="fraction"):
        parse_baseline("46")
    with pytest.raises(ValueError, match="majority"):
        parse_baseline("mode")
    assert main(["--eval_data_path", "x.jsonl"]) == 1
    args = parse_args(["--checkpoint_path", "c", "--eval_data_path", "e", "--output_file", "o", "--limit", "3"])
    assert args.limit == 3 and args.baseline == "majority"


def test_missing_frame_is_an_error_naming_the_sample(trained_adapter, test_set, tmp_path, capsys):
    data = tmp_path / "eval.jsonl"
    record = json.loads((test_set / "out_002-001.jsonl").read_text().splitlines()[0])
    record["frames"][3] = "002-001_0"
    data.write_text(json.dumps(record) + "\n")
    code = main(["--checkpoint_path", str(trained_adapter), "--eval_data_path", str(data),
                 "--frames_dir", str(test_set / "frames"), "--output_file", str(tmp_path / "p.jsonl")])
    assert code == 1
    err = capsys.readouterr().err
    assert "002-001_0" in err and record["id"] in err


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
        ablated = _colour_eval(colour_task, ablate, "--ablate", ablate, "--compare", reference)
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
