"""Tests for surgvqa.run_config: the schema of surgvqa_config.json, its migration, and what evaluation derives."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from surgvqa.checkpoint import base_for_adapter
from surgvqa.errors import UserError
from surgvqa.media import MediaConfig
from surgvqa.run_config import (
    CONFIG_NAME,
    DEFAULT_FPS,
    SCHEMA_VERSION,
    Preprocessing,
    RunConfig,
    RunConfigError,
    eval_preprocessing,
)

# surgvqa_config.json as surgvqa 0.1.0 wrote it (no schema_version), key for key.
V0_TRAINING = {
    "surgvqa_version": "0.1.0",
    "backbone": "qwen2_5_omni",
    "base_model": "/models/Qwen2.5-Omni-7B",
    "media": {"frame_path_template": "{video_id}/{frame}.jpg", "audio_path_template": "{video_id}/{id}.wav",
              "frame_size": 56, "max_train_frames": 4, "max_eval_frames": 4, "question_modality": "text+audio",
              "frames_as": "video", "fps": 2.0},
    "system_prompt": "You are a surgical video assistant.",
    "model_max_length": 4096,
    "lora": {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "lora_target_regex": None,
             "train_projectors": False, "lora_vision_tower": False, "stage": None, "init_from": None},
    "quantization": None,
    "dtype": "bfloat16",
    "tokenizer_repair": ["set pad to existing special token '<|endoftext|>' (id 151643)"],
    "resized_vocab": None,
    "original_vocab_rows": 151936,
    "train_data_path": "/data/in_template_train.jsonl",
    "eval_data_path": None,
    "frames_dir": "/data/frames",
    "audio_dir": "/data/audio/in_template",
    "eval_frames_dir": "/data/frames",
    "eval_audio_dir": "/data/audio/in_template",
}


def _write(directory: Path, record: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(record))
    return directory


def _current(record: dict) -> dict:
    """``record`` in the current layout: ``media``, ``system_prompt`` (and ``token_kept_ratio``) as one
    ``preprocessing`` block listing every setting, with the defaults of the ones an older file did not hold; a
    training output lists ``packing`` (False: older runs did not pack)."""
    record = json.loads(json.dumps(record))
    block = {**record.pop("media"), "system_prompt": record.pop("system_prompt"),
             "token_kept_ratio": record.pop("token_kept_ratio", 1.0)}
    return {"packing": False, **record, "schema_version": SCHEMA_VERSION,
            "preprocessing": {**dataclasses.asdict(Preprocessing()), "num_video_frames": 8, **block}}


def test_v0_file_reads_and_round_trips_as_current(tmp_path):
    config = RunConfig.read(_write(tmp_path / "v0", V0_TRAINING))
    assert config.schema_version == SCHEMA_VERSION
    assert config.preprocessing.frame_size == 56 and config.preprocessing.question_modality == "text+audio"
    assert config.lora["lora_r"] == 16 and config.original_vocab_rows == 151936
    written = json.loads(config.write(tmp_path / "v1").read_text())
    assert written["schema_version"] == SCHEMA_VERSION
    # settings added since are written with what the old file meant: no merging, no pixel budget, 8 video frames
    assert written["preprocessing"] == {**V0_TRAINING["media"], "system_prompt": V0_TRAINING["system_prompt"],
                                        "token_kept_ratio": 1.0, "max_pixels": None, "min_pixels": None,
                                        "video_fps": None, "num_video_frames": 8}
    assert {k: v for k, v in written.items() if k not in ("base_model_relative",)} == _current(V0_TRAINING)
    assert RunConfig.read(tmp_path / "v1") == dataclasses.replace(config, base_model_relative=written[
        "base_model_relative"])


def test_v2_training_output_reads_with_its_preprocessing_as_one_block(tmp_path):
    """A run directory of the release before the preprocessing record (schema 2) reads with every setting."""
    v2 = {**V0_TRAINING, "schema_version": 2, "base_model_relative": None, "token_kept_ratio": 0.5,
          "inputs": None, "media": {**V0_TRAINING["media"], "max_pixels": 147456, "video_fps": 30.0}}
    config = RunConfig.read(_write(tmp_path / "v2", v2))
    assert config.preprocessing == Preprocessing(**{**V0_TRAINING["media"], "max_pixels": 147456,
                                                    "video_fps": 30.0, "token_kept_ratio": 0.5,
                                                    "system_prompt": V0_TRAINING["system_prompt"]})
    assert config.preprocessing.num_video_frames == 8  # the frames per video file every earlier release used
    missing = {k: v for k, v in v2.items() if k != "system_prompt"}
    with pytest.raises(RunConfigError, match="required key.*system_prompt missing") as info:
        RunConfig.read(_write(tmp_path / "bad", missing))
    assert str(tmp_path / "bad" / CONFIG_NAME) in str(info.value)


def test_v0_file_from_before_data_roots_were_recorded(tmp_path):
    old = {k: v for k, v in V0_TRAINING.items() if not k.endswith(("_data_path", "_dir"))}
    config = RunConfig.read(_write(tmp_path, old))
    assert (config.train_data_path, config.frames_dir, config.eval_audio_dir) == (None, None, None)


def test_v1_training_output_reads_with_inputs_unknown_and_writes_v2(tmp_path):
    """A run directory of the release before input fingerprints (schema 1) still reads (and resumes, unchecked)."""
    v1 = {**V0_TRAINING, "schema_version": 1, "base_model_relative": None}
    config = RunConfig.read(_write(tmp_path / "v1", v1))
    assert config.schema_version == SCHEMA_VERSION == 3 and config.inputs is None and config.data_changes is None
    fingerprints = {"train_data": {"path": "/data/t.jsonl", "size": 3, "sha256": "ab"}}
    written = json.loads(dataclasses.replace(config, inputs=fingerprints).write(tmp_path / "v2").read_text())
    assert written["schema_version"] == 3 and written["inputs"] == fingerprints and "data_changes" not in written


def test_v0_merged_checkpoint_reads(tmp_path):
    merged = {k: v for k, v in V0_TRAINING.items() if k not in ("lora", "quantization", "resized_vocab",
                                                                  "original_vocab_rows")}
    merged.update(merged_from=[{"adapter": "/runs/a", "base": "/models/b", "quantization": None,
                                "merged_into": "base", "forced": False}],
                  vocab_rows=151936, full_omni=False, merged_with="surgvqa 0.1.0")
    config = RunConfig.read(_write(tmp_path / "m", merged))
    assert config.merged_from[0]["adapter"] == "/runs/a" and config.lora is None
    written = json.loads(config.write(tmp_path / "out").read_text())
    assert "lora" not in written and "resized_vocab" not in written and written["vocab_rows"] == 151936


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(frame_sise=56), "unknown key(s) frame_sise"),
        (lambda r: r["preprocessing"].update(frame_sise=56), "unknown key(s) preprocessing.frame_sise"),
        (lambda r: r.pop("backbone"), "required key backbone is missing"),
        (lambda r: r["preprocessing"].pop("frame_size"), "required key(s) preprocessing.frame_size missing"),
        (lambda r: r["preprocessing"].update(frame_size="56"), "preprocessing.frame_size must be int, got str"),
        (lambda r: r["preprocessing"].update(question_modality="video"), "question_modality must be one of"),
        (lambda r: r["preprocessing"].update(token_kept_ratio=0.0), "token_kept_ratio must be in (0, 1]"),
        (lambda r: r.update(schema_version=SCHEMA_VERSION + 1), "newer surgvqa"),
        (lambda r: r.update(tokenizer_repair=[1]), "tokenizer_repair[0] must be str"),
    ],
)
def test_invalid_files_are_errors_naming_the_key_and_file(tmp_path, change, message):
    record = _current(V0_TRAINING)
    change(record)
    directory = _write(tmp_path, record)
    with pytest.raises(RunConfigError) as info:
        RunConfig.read(directory)
    assert message in str(info.value) and str(directory / CONFIG_NAME) in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    assert RunConfig.find(tmp_path) is None
    with pytest.raises(RunConfigError, match="not found"):
        RunConfig.read(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(RunConfigError, match="not valid JSON"):
        RunConfig.find(tmp_path)


def test_media_config_and_collator_settings_come_from_the_record(tmp_path):
    config = RunConfig.from_dict(V0_TRAINING)
    media = config.preprocessing.media_config(str(tmp_path), str(tmp_path), ablate="video")
    assert (media.frame_size, media.max_frames, media.question_modality, media.ablate) == (56, 4, "text+audio",
                                                                                            "video")
    assert config.preprocessing.collator_kwargs() == {"question_modality": "text+audio", "frame_size": 56, "frames_as": "video",
                                        "fps": 2.0, "video_fps": None, "max_pixels": None, "min_pixels": None,
                                        "system_prompt": "You are a surgical video assistant.",
                                        "token_kept_ratio": 1.0}  # files from before token merging: off


def test_defaults_are_those_of_media_config():
    media = Preprocessing()
    assert (media.frame_path_template, media.frame_size, media.question_modality, media.fps) == (
        MediaConfig.frame_path_template, MediaConfig.frame_size, MediaConfig.question_modality, DEFAULT_FPS)


def test_a_checkpoint_without_record_needs_every_preprocessing_flag_or_explicit_defaults(tmp_path):
    with pytest.raises(UserError) as info:
        eval_preprocessing(None, {"frame_size": 56}, checkpoint=tmp_path)
    message = str(info.value)
    assert "pass --question_modality --frames_as as in training" in message  # --frame_size was given
    assert "--allow_default_preprocessing True" in message
    given = eval_preprocessing(None, {"frame_size": 56, "question_modality": "text", "frames_as": "video"},
                               checkpoint=tmp_path)
    assert given.source == "flags" and given.preprocessing.frame_size == 56
    defaults = eval_preprocessing(None, {"frame_size": 56}, checkpoint=tmp_path, allow_defaults=True)
    assert defaults.source == "defaults" and defaults.preprocessing.frame_size == 56
    assert defaults.preprocessing.question_modality == MediaConfig.question_modality
    recorded = eval_preprocessing(RunConfig.from_dict(V0_TRAINING), {"frame_size": 112, "frames_as": None},
                                  checkpoint=tmp_path)
    assert recorded.source == CONFIG_NAME and recorded.preprocessing.frame_size == 112
    assert recorded.preprocessing.question_modality == "text+audio"


def _adapter(directory: Path, peft_base: str) -> Path:
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": peft_base}))
    return directory


def test_base_model_found_after_moving_adapter_and_base_together(tmp_path):
    tree = tmp_path / "before"
    (tree / "models" / "base").mkdir(parents=True)
    adapter = _adapter(tree / "runs" / "run1", str(tree / "models" / "base"))
    record = dict(V0_TRAINING, base_model=str(tree / "models" / "base"))
    RunConfig.from_dict(record).write(adapter)
    assert json.loads((adapter / CONFIG_NAME).read_text())["base_model_relative"] == "../../models/base"
    assert base_for_adapter(adapter) == str((tree / "models" / "base").resolve())
    moved = tmp_path / "after"
    shutil.move(tree, moved)
    assert base_for_adapter(moved / "runs" / "run1") == str((moved / "models" / "base").resolve())
    shutil.rmtree(moved / "models")
    with pytest.raises(UserError, match="pass --base_model_path"):
        base_for_adapter(moved / "runs" / "run1")


def test_peft_relative_base_is_taken_relative_to_the_adapter(tmp_path, monkeypatch):
    (tmp_path / "tiny").mkdir()
    adapter = _adapter(tmp_path / "adapter", "../tiny")
    monkeypatch.chdir(tmp_path / "adapter")  # not where the relative path was meant from
    assert base_for_adapter(adapter) == str((tmp_path / "tiny").resolve())
    lost = _adapter(tmp_path / "lost", "tiny-elsewhere")
    with pytest.raises(UserError) as info:
        base_for_adapter(lost)
    assert "--base_model_path" in str(info.value) and "--model_name_or_path" not in str(info.value)


# ------------------------------------------------------------------------------------------ through the CLIs
def test_training_records_the_base_absolute_even_from_a_relative_flag(tiny_model_dir, test_set, tmp_path,
                                                                     monkeypatch):
    from surgvqa.train import main as train_main

    monkeypatch.chdir(tiny_model_dir.parent)
    out = tmp_path / "adapter"
    assert train_main(["--model_name_or_path", tiny_model_dir.name, "--train_data_path",
                       str(test_set / "in_002-001.jsonl"), "--frames_dir", str(test_set / "frames"),
                       "--frame_size", "56", "--output_dir", str(out), "--max_steps", "1", "--save_strategy", "no",
                       "--use_cpu", "True", "--disable_tqdm", "True"]) == 0
    base = str(tiny_model_dir.resolve())
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    config = RunConfig.read(out)
    assert config.base_model == base and config.resolve_base_model(out) == base


def test_evaluating_a_checkpoint_without_record(trained_adapter, test_set, tmp_path, capsys):
    from surgvqa.evaluate import main as evaluate_main

    bare = tmp_path / "bare"
    shutil.copytree(trained_adapter, bare)
    (bare / CONFIG_NAME).unlink()
    args = ["--checkpoint_path", str(bare), "--eval_data_path", str(test_set / "out_002-001.jsonl"),
            "--frames_dir", str(test_set / "frames"), "--output_file", str(tmp_path / "p.jsonl"),
            "--device", "cpu", "--limit", "2", "--max_new_tokens", "4"]
    assert evaluate_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert "--frame_size --question_modality --frames_as" in err and "--allow_default_preprocessing" in err
    assert not (tmp_path / "p.jsonl").exists()  # refused before anything was written

    assert evaluate_main(args + ["--frame_size", "56", "--question_modality", "text", "--frames_as", "video"]) == 0
    summary = json.loads((tmp_path / "p.summary.json").read_text())
    assert summary["preprocessing"] == "flags" and summary["frame_size"] == 56
    assert "allow_default_preprocessing" not in summary

    assert evaluate_main(args + ["--frame_size", "56", "--allow_default_preprocessing", "True",
                                 "--overwrite", "True"]) == 0  # replaces the previous p.jsonl
    summary = json.loads((tmp_path / "p.summary.json").read_text())
    assert summary["preprocessing"] == "defaults" and summary["allow_default_preprocessing"] is True
