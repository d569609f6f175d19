"""The predictions meta line as a typed, versioned record: round trip, migration of every older format, a newer
format refused, and ``--resume``'s field-by-field check derived from the record's fields."""

from __future__ import annotations

import dataclasses
import json

import pytest

from surgvqa.clusters import Clustering
from surgvqa.errors import UserError
from surgvqa.preprocessing import Preprocessing
from surgvqa.report import META_FORMAT, META_KEY, META_MIGRATIONS, PredictionsMeta, read_predictions_meta

#: a meta line as the previous release wrote it (format 1, every key it wrote)
FORMAT_1 = {
    "format": 1, "surgvqa_version": "0.1.0", "checkpoint": "/runs/adapter", "checkpoint_sha256": "ab" * 32,
    "base_model": "/models/tiny", "backbone": "qwen2_5_omni", "eval_data_path": "/data/test.jsonl",
    "eval_data_sha256": "cd" * 32, "frames_dir": "/data/frames", "audio_dir": None, "ablate": "video_shuffle",
    "ablation_seed": 3, "preprocessing": "surgvqa_config.json", "frame_path_template": "{video_id}/{frame}.png",
    "audio_path_template": "{video_id}/{id}.wav", "frame_size": 56, "max_pixels": None, "min_pixels": None,
    "max_eval_frames": 4, "num_video_frames": 8, "question_modality": "text", "frames_as": "video", "fps": 2.0,
    "video_fps": 30.0, "token_kept_ratio": 0.5, "system_prompt": "Answer.", "max_new_tokens": 24,
    "dtype": "float32", "load_in_4bit": False, "limit": 16, "skip_bad_samples": True, "skipped_bad_samples": 2,
    "n_samples": 16, "scoring": "surgvqa-strict-1", "baseline": 0.46,
    "candidates": {"nbi_status": ["no", "yes"]}, "cluster_by": "clip", "cluster_gap": 10, "bootstrap": 500,
    "bootstrap_seed": 7,
}


def _write(path, meta: dict) -> None:
    path.write_text(json.dumps({META_KEY: meta}) + "\n" + json.dumps({"id": "q", "video_id": "v"}) + "\n")


def test_every_older_format_has_a_migration():
    assert sorted(META_MIGRATIONS) == list(range(1, META_FORMAT))


def test_format_1_migrates_to_the_current_record(tmp_path):
    path = tmp_path / "old.jsonl"
    _write(path, FORMAT_1)
    meta = read_predictions_meta(path)
    assert meta.format == META_FORMAT and meta.preprocessing_source == "surgvqa_config.json"
    assert meta.preprocessing == Preprocessing(
        frame_path_template="{video_id}/{frame}.png", frame_size=56, max_eval_frames=4, question_modality="text",
        video_fps=30.0, token_kept_ratio=0.5, system_prompt="Answer.")
    assert meta.clustering == Clustering("clip", 10, 500, 7)
    assert (meta.ablate, meta.ablation_seed, meta.baseline, meta.limit) == ("video_shuffle", 3, 0.46, 16)
    # what its summary repeats is what the previous release's summary held, under the same names
    summary = meta.summary_fields()
    assert summary["preprocessing"] == "surgvqa_config.json" and summary["frame_size"] == 56
    assert {k: summary[k] for k in ("checkpoint", "ablate", "limit", "skipped_bad_samples", "token_kept_ratio")} == \
        {k: FORMAT_1[k] for k in ("checkpoint", "ablate", "limit", "skipped_bad_samples", "token_kept_ratio")}
    assert "frame_path_template" not in summary and "system_prompt" not in summary
    # a line without "format" (hand-written, or of format 1) reads as format 1; absent settings are their defaults
    bare = PredictionsMeta.from_dict({"checkpoint": "/x"}, "bare")
    assert bare.checkpoint == "/x" and bare.preprocessing == Preprocessing() and bare.clustering == Clustering()


def test_round_trip(tmp_path):
    meta = PredictionsMeta.from_dict(FORMAT_1, "old")
    path = tmp_path / "new.jsonl"
    _write(path, json.loads(json.dumps(meta.to_dict())))
    again = read_predictions_meta(path)
    assert again == meta and again.to_dict()["format"] == META_FORMAT
    assert again.to_dict()["clustering"] == {"by": "clip", "gap": 10, "resamples": 500, "seed": 7}


def test_a_newer_format_is_refused_saying_to_upgrade(tmp_path):
    path = tmp_path / "newer.jsonl"
    _write(path, {**PredictionsMeta().to_dict(), "format": META_FORMAT + 1})
    with pytest.raises(UserError, match=rf"newer\.jsonl:1: surgvqa_meta: format {META_FORMAT + 1} was written by a "
                                        r"newer surgvqa .*upgrade surgvqa"):
        read_predictions_meta(path)


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m.update(frame_sise=56), "unknown key(s) frame_sise"),
    (lambda m: m.update(max_new_tokens="24"), "max_new_tokens must be int, got str"),
    (lambda m: m.update(format="2"), "format must be a whole number"),
    (lambda m: m.update(cluster_by="scene"), "--cluster_by must be one of"),
])
def test_a_malformed_line_names_the_key_and_the_file(tmp_path, change, message):
    raw = dict(FORMAT_1)
    change(raw)
    path = tmp_path / "bad.jsonl"
    _write(path, raw)
    with pytest.raises(UserError, match="bad.jsonl:1") as err:
        read_predictions_meta(path)
    assert message in str(err.value)


def test_the_resume_check_names_the_field_that_differs():
    old = PredictionsMeta.from_dict(FORMAT_1, "old")
    assert old.mismatch(dataclasses.replace(old)) is None
    # what does not decide a line's content is not compared (the limit, the clustering, the training-only setting)
    same = dataclasses.replace(old, limit=32, clustering=Clustering(), n_samples=32,
                               preprocessing=dataclasses.replace(old.preprocessing, max_train_frames=2))
    assert old.mismatch(same) is None
    assert old.mismatch(dataclasses.replace(old, checkpoint_sha256="ef" * 32)).startswith(
        f'checkpoint_sha256 differs ("{"ab" * 32}" in the file, "{"ef" * 32}" in this run)')
    other = dataclasses.replace(old, preprocessing=dataclasses.replace(old.preprocessing, frame_size=112))
    assert old.mismatch(other) == "preprocessing.frame_size differs (56 in the file, 112 in this run)"
    # every field marked for --resume is compared: changing any one of them is named
    for spec in dataclasses.fields(PredictionsMeta):
        if spec.metadata.get("resume") is True:
            assert old.mismatch(dataclasses.replace(old, **{spec.name: "changed"})).startswith(f"{spec.name} differs")
