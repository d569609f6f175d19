"""surgvqa.preprocessing: every preprocessing setting declared once (one dataclass), reaching training's,
evaluation's and the planner's flags under its own name, and overridable field by field at evaluation."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import logging
import textwrap

import pytest
from transformers import HfArgumentParser

from surgvqa.arguments import DataArguments, EvalArguments, LoraArguments, ModelArguments, make_parser
from surgvqa.errors import UserError
from surgvqa.evaluate import parse_args as parse_eval_args
from surgvqa.evaluate import resolve_preprocessing
from surgvqa.plan_counts import PlanArguments
from surgvqa.preprocessing import Preprocessing, PreprocessingOverrides, field_names
from surgvqa.report import PredictionsMeta
from surgvqa.run_config import CONFIG_NAME, RunConfig

#: a valid value other than the default, for every field (a new field must be added here: see the first assert)
OVERRIDES = {
    "frame_path_template": "{video_id}/f{frame}.png", "audio_path_template": "{video_id}/q_{id}.wav",
    "frame_size": 112, "max_pixels": 50176, "min_pixels": 3136, "max_train_frames": 3, "max_eval_frames": 5,
    "num_video_frames": 4, "question_modality": "text+audio", "frames_as": "images", "fps": 1.0,
    "video_fps": 30.0, "token_kept_ratio": 0.5, "system_prompt": "Answer in one word.",
}


def _argument_classes() -> list[type]:
    from surgvqa.training_args import SurgvqaTrainingArguments

    return [ModelArguments, DataArguments, LoraArguments, SurgvqaTrainingArguments, EvalArguments, PlanArguments]


def _declared_in_body(cls: type) -> set[str]:
    """The names a class's own source annotates (its fields, inherited ones not included)."""
    (node,) = ast.parse(textwrap.dedent(inspect.getsource(cls))).body
    return {stmt.target.id for stmt in node.body if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)}


def test_every_preprocessing_field_is_declared_once():
    assert set(OVERRIDES) == set(field_names()), "give the new field a value in OVERRIDES"
    names = set(field_names())
    for cls in _argument_classes():
        own = set(vars(cls).get("__annotations__", {}))
        assert not own & names, f"{cls.__name__} re-declares {sorted(own & names)}"
        assert not _declared_in_body(cls) & names, f"{cls.__name__} re-declares {sorted(_declared_in_body(cls) & names)}"
    assert _declared_in_body(Preprocessing) == names  # the one declaration
    # ... which still reaches every command line under its own name: training and the planner with the same
    # defaults as the record, evaluation defaulting to the record (None)
    train = {a.dest: a for a in make_parser()._actions}
    plan = {a.dest: a for a in HfArgumentParser(PlanArguments)._actions}
    evaluate = {a.dest: a for a in HfArgumentParser(EvalArguments)._actions}
    defaults = Preprocessing()
    for spec in dataclasses.fields(Preprocessing):
        assert f"--{spec.name}" in train[spec.name].option_strings
        assert train[spec.name].default == plan[spec.name].default == getattr(defaults, spec.name)
        assert f"--{spec.name}" in evaluate[spec.name].option_strings and evaluate[spec.name].default is None
        assert evaluate[spec.name].help.startswith(spec.metadata["help"])
    assert {f.name for f in dataclasses.fields(PreprocessingOverrides)} == names
    # what the predictions meta line, resume and the summary list comes from the same fields
    (recorded,) = [f for f in dataclasses.fields(PredictionsMeta) if f.name == "preprocessing"]
    assert set(recorded.metadata["resume"]) == names - {"max_train_frames"}
    assert {"frame_size", "max_pixels", "num_video_frames", "token_kept_ratio"} <= set(
        PredictionsMeta().summary_fields())
    # a meta line written before a setting existed meant its default
    assert PredictionsMeta.from_dict({"format": 1}, "old").preprocessing == defaults


def _record(directory, preprocessing: Preprocessing):
    RunConfig(surgvqa_version="0.1.0", backbone="qwen2_5_omni", base_model="/models/base", preprocessing=preprocessing,
              model_max_length=4096, dtype="bfloat16", tokenizer_repair=[], train_data_path=None, eval_data_path=None,
              frames_dir=None, audio_dir=None, eval_frames_dir=None, eval_audio_dir=None,
              lora={"lora_r": 16}).write(directory)
    return directory


@pytest.mark.parametrize("name", list(OVERRIDES))
def test_evaluation_overrides_every_field(name, tmp_path, caplog):
    recorded = Preprocessing(max_eval_frames=2)
    checkpoint = _record(tmp_path, recorded)
    args = parse_eval_args(["--checkpoint_path", str(checkpoint), f"--{name}", str(OVERRIDES[name])])
    with caplog.at_level(logging.WARNING, logger="surgvqa.run_config"):
        resolved = resolve_preprocessing(args)
    assert resolved.source == CONFIG_NAME
    assert resolved.preprocessing == dataclasses.replace(recorded, **{name: OVERRIDES[name]})
    assert f"--{name}" in caplog.text  # a value the checkpoint was not trained with is said


def test_max_pixels_and_frame_size_overrides_of_a_recorded_pixel_budget(tmp_path, caplog):
    checkpoint = _record(tmp_path, Preprocessing(max_pixels=147456, min_pixels=3136))
    resolved = resolve_preprocessing(parse_eval_args(["--checkpoint_path", str(checkpoint),
                                                      "--max_pixels", "50176"]))
    assert (resolved.preprocessing.max_pixels, resolved.preprocessing.min_pixels) == (50176, 3136)
    assert resolved.preprocessing.media_config(None, None).budget.max_area == 50176
    with caplog.at_level(logging.WARNING, logger="surgvqa.run_config"):
        resolved = resolve_preprocessing(parse_eval_args(["--checkpoint_path", str(checkpoint),
                                                          "--frame_size", "112"]))
    # a longest edge replaces the recorded budget, which would otherwise win over it; and says so
    assert (resolved.preprocessing.frame_size, resolved.preprocessing.max_pixels) == (112, None)
    assert "replaces the recorded pixel budget" in caplog.text


@pytest.mark.parametrize(("flags", "message"), [
    (["--token_kept_ratio", "0"], "--token_kept_ratio must be in (0, 1]"),
    (["--token_kept_ratio", "0.5", "--frames_as", "images"], "needs --frames_as video"),
    (["--frames_as", "frames"], "--frames_as must be one of"),
    (["--max_pixels", "10"], "max_pixels is a pixel count"),
    (["--num_video_frames", "0"], "--num_video_frames must be >= 1"),
    (["--question_modality", "video"], "question_modality must be one of"),
])
def test_an_override_is_validated_with_the_record_as_a_whole(flags, message, tmp_path):
    checkpoint = _record(tmp_path, Preprocessing())
    with pytest.raises(UserError) as info:
        resolve_preprocessing(parse_eval_args(["--checkpoint_path", str(checkpoint), *flags]))
    assert message in str(info.value)
