"""train_with_eval_FINAL.sh and configs/a100_qwen2_5_omni.yaml are one recipe: the script passes the YAML file and
only what its environment variables change; every variable it ever had still works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from surgvqa.train import parse_args

REPO = Path(__file__).resolve().parents[1]
VARIABLES = ("MODEL", "DATA", "TRAIN_DATA", "VAL_DATA", "TEST_DATA", "FRAMES_DIR", "EVAL_FRAMES_DIR", "TEST_FRAMES_DIR",
             "AUDIO_DIR", "EVAL_AUDIO_DIR", "TEST_AUDIO_DIR", "OUTPUT_DIR", "QUESTION_MODALITY", "FRAME_SIZE", "FRAMES",
             "TOKEN_KEPT_RATIO", "EPOCHS", "MAX_STEPS", "LR", "BATCH", "GRAD_ACC", "LORA_R", "EVAL_GENERATE_SAMPLES", "EVAL_STRATEGY",
             "EVAL_STEPS", "PRECISION", "EVAL_BATCH", "WORKERS", "CONFIG")


def _run_recipe(tmp_path: Path, env: dict[str, str], *extra: str) -> tuple[list[str], list[str]]:
    """Run the script with a PYTHON that records the train_vqa.py / evaluate_checkpoint.py command lines."""
    log = tmp_path / "calls.jsonl"
    stub = tmp_path / "python"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        f'if [[ "$1" == train_vqa.py || "$1" == evaluate_checkpoint.py ]]; then\n'
        f'  {sys.executable} -c \'import json, sys; print(json.dumps(sys.argv[1:]))\' "$@" >> {log}\n'
        "  exit 0\nfi\n"
        f'exec {sys.executable} "$@"\n'
    )
    stub.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    subprocess.run(["bash", str(REPO / "train_with_eval_FINAL.sh"), *extra], check=True,
                   env={**clean, **env, "PYTHON": str(stub)}, capture_output=True, text=True)
    train, evaluate = (json.loads(line) for line in log.read_text().splitlines())
    assert train[0] == "train_vqa.py" and evaluate[0] == "evaluate_checkpoint.py"
    return train[1:], evaluate[1:]


def _parsed(argv: list[str]):
    return parse_args([*argv, "--use_cpu", "True"])


def test_without_variables_the_script_runs_the_yaml_recipe(tmp_path):
    train, evaluate = _run_recipe(tmp_path, {})
    assert train[0] == "configs/a100_qwen2_5_omni.yaml"
    assert train[1:] == ["--resume_from_checkpoint", "auto"]  # nothing overridden: the file is the recipe
    model_args, data_args, lora_args, args = _parsed(train)
    assert (model_args.model_name_or_path, data_args.frame_size, data_args.max_train_frames) == (
        "/models/Qwen2.5-Omni-7B", 384, 8)
    assert (args.learning_rate, args.gradient_accumulation_steps, lora_args.lora_r, args.bf16) == (2e-4, 4, 16, True)
    assert evaluate == ["--checkpoint_path", "outputs/qwen2_5_omni_lora", "--eval_data_path",
                        "data/out_template_test.jsonl", "--frames_dir", "data/frames", "--audio_dir",
                        "data/audio/out_template", "--batch_size", "8", "--output_file",
                        "outputs/qwen2_5_omni_lora/test_predictions.jsonl", "--overwrite", "True"]


def test_every_variable_still_overrides_its_setting(tmp_path):
    env = {
        "MODEL": "/m", "DATA": "/d", "VAL_DATA": "/v.jsonl", "TEST_DATA": "/t.jsonl", "EVAL_FRAMES_DIR": "/ef",
        "TEST_FRAMES_DIR": "/tf", "TEST_AUDIO_DIR": "/ta", "OUTPUT_DIR": "/o", "QUESTION_MODALITY": "audio",
        "FRAME_SIZE": "56", "FRAMES": "6", "TOKEN_KEPT_RATIO": "0.5", "EPOCHS": "3", "MAX_STEPS": "40", "LR": "1e-3", "BATCH": "2",
        "GRAD_ACC": "8", "LORA_R": "4", "EVAL_GENERATE_SAMPLES": "10", "EVAL_STRATEGY": "steps", "EVAL_STEPS": "7",
        "PRECISION": "--fp16 True", "EVAL_BATCH": "3", "WORKERS": "0",
    }
    train, evaluate = _run_recipe(tmp_path, env, "--seed", "5")
    model_args, data, lora, args = _parsed(train)
    assert (model_args.model_name_or_path, data.token_kept_ratio) == ("/m", 0.5)
    assert (data.train_data_path, data.eval_data_path, data.frames_dir, data.eval_frames_dir) == (
        "/d/in_template_train.jsonl", "/v.jsonl", "/d/frames", "/ef")
    assert (data.audio_dir, data.eval_audio_dir, data.question_modality) == (
        "/d/audio/in_template", "/d/audio/out_template", "audio")
    assert (data.frame_size, data.max_train_frames, data.max_eval_frames, data.eval_generate_samples) == (56, 6, 6, 10)
    assert (args.num_train_epochs, args.max_steps, args.learning_rate, args.output_dir) == (3, 40, 1e-3, "/o")
    assert (args.per_device_train_batch_size, args.per_device_eval_batch_size, args.gradient_accumulation_steps) == (
        2, 2, 8)
    assert (lora.lora_r, lora.lora_alpha) == (4, 8)
    assert (args.eval_strategy, args.save_strategy, args.eval_steps, args.save_steps) == ("steps", "steps", 7, 7)
    assert (args.fp16, args.bf16, args.dataloader_num_workers, args.seed) == (True, False, 0, 5)
    assert args.resume_from_checkpoint == "auto"
    assert evaluate == ["--checkpoint_path", "/o", "--eval_data_path", "/t.jsonl", "--frames_dir", "/tf",
                        "--audio_dir", "/ta", "--batch_size", "3", "--output_file", "/o/test_predictions.jsonl",
                        "--overwrite", "True"]


def test_text_questions_carry_no_audio_dirs(tmp_path):
    train, evaluate = _run_recipe(tmp_path, {"QUESTION_MODALITY": "text", "AUDIO_DIR": "/a"})
    _, data, _, _ = _parsed(train)
    assert (data.question_modality, data.audio_dir, data.eval_audio_dir) == ("text", "", "")
    assert "--audio_dir" not in evaluate


@pytest.mark.parametrize("flag", ["--overwrite_output_dir", "--resume_from_checkpoint"])
def test_extra_arguments_pass_through_last(tmp_path, flag):
    train, _ = _run_recipe(tmp_path, {}, flag, "True")
    assert train[-2:] == [flag, "True"]
    _, _, _, args = _parsed(train)
    assert str(getattr(args, flag[2:])) == "True"


def test_the_model_family_picks_the_recipe(tmp_path):
    """A Qwen3-Omni MoE checkpoint (config.json model_type) runs configs/a100_qwen3_omni.yaml: the thinker in 4-bit
    with NF4 experts; anything else (or no config.json) the Qwen2.5-Omni recipe."""
    model = tmp_path / "qwen3-omni"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen3_omni_moe"}))
    train, evaluate = _run_recipe(tmp_path, {"MODEL": str(model)})
    assert train[0] == "configs/a100_qwen3_omni.yaml"
    model_args, _, lora_args, _ = _parsed(train)
    assert model_args.model_name_or_path == str(model)
    assert (model_args.load_in_4bit, lora_args.lora_experts, lora_args.router_aux_loss_coef) == (True, False, 0.0)
    assert evaluate[:2] == ["--checkpoint_path", "outputs/qwen3_omni_lora"]
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2_5_omni"}))
    (tmp_path / "calls.jsonl").unlink()
    train, _ = _run_recipe(tmp_path, {"MODEL": str(model)})
    assert train[0] == "configs/a100_qwen2_5_omni.yaml"
