"""Training: argument handling, LoRA placement, outputs, quantized loading, resume after kill -9, DDP."""

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
import torch
from conftest import qlora_compute
from safetensors.torch import load_file

from surgvqa.backbones import LoadOptions, get_backbone
from surgvqa.errors import UserError
from surgvqa.train import (
    assert_lora_placement,
    build_model,
    lora_module_names,
    parse_args,
    stratified_subset,
    train,
    validate_args,
)

REPO = Path(__file__).resolve().parents[1]


def _args(tiny_model_dir, test_set, out, *extra):
    return [
        "--model_name_or_path", str(tiny_model_dir),
        "--train_data_path", str(test_set / "in_002-001.jsonl"),
        "--frames_dir", str(test_set / "frames"),
        "--frame_size", "56",
        "--output_dir", str(out),
        "--per_device_train_batch_size", "2",
        "--learning_rate", "1e-3",
        "--use_cpu", "True",
        "--seed", "0",
        "--data_seed", "0",
        "--disable_tqdm", "True",
        "--dataloader_num_workers", "0",
        *extra,
    ]


def test_trained_adapter_outputs(trained_adapter, tiny_model_dir):
    files = {p.name for p in trained_adapter.iterdir()}
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    assert {"tokenizer.json", "processor_config.json", "chat_template.jinja"} <= files
    config = json.loads((trained_adapter / "surgvqa_config.json").read_text())
    assert config["backbone"] == "qwen2_5_omni"
    assert Path(config["base_model"]) == Path(tiny_model_dir).resolve()
    assert config["preprocessing"]["frame_size"] == 56
    assert config["preprocessing"]["question_modality"] == "text"
    assert config["preprocessing"]["frame_path_template"] == "{video_id}/{frame}.jpg"
    assert config["resized_vocab"] is None
    weights = load_file(str(trained_adapter / "adapter_model.safetensors"))
    assert weights, "empty adapter"
    assert all("language_model.layers" in name for name in weights), "LoRA weights outside the language model"
    assert any(float(t.abs().max()) > 0 for name, t in weights.items() if "lora_B" in name), "LoRA B never trained"
    # the Trainer's own records, and the loss curve
    state = json.loads((trained_adapter / "trainer_state.json").read_text())
    assert state["global_step"] == 40 and sum("loss" in e for e in state["log_history"]) == 4
    results = json.loads((trained_adapter / "all_results.json").read_text())
    assert results["train_loss"] > 0 and "train_runtime" in results
    assert (trained_adapter / "train_results.json").is_file()
    png = (trained_adapter / "training_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert config["training"]["learning_rate"] == 3e-3 and config["training"]["max_steps"] == 40


def test_lora_only_in_language_model(tiny_model_dir, capsys):
    model_args, data_args, lora_args, args = parse_args(
        ["--model_name_or_path", str(tiny_model_dir), "--train_data_path", "x.jsonl", "--output_dir", "/tmp/x",
         "--use_cpu", "True"]
    )
    model, _, backbone, _, _ = build_model(model_args, lora_args, args)
    names = lora_module_names(model)
    assert len(names) == 2 * 7  # 2 layers x q,k,v,o,gate,up,down
    assert all(".language_model.layers." in n for n in names)
    assert "trainable params:" in capsys.readouterr().out
    # a plain name list would also wrap tower modules: the placement check refuses it
    from peft import LoraConfig, get_peft_model

    base = backbone.load(str(tiny_model_dir), LoadOptions(dtype="float32"))
    naive = get_peft_model(base, LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "proj"]))
    with pytest.raises(UserError, match="inside the tower"):
        assert_lora_placement(naive, backbone)


def test_vision_lora_and_projectors_opt_in(tiny_model_dir):
    model_args, _, lora_args, args = parse_args(
        ["--model_name_or_path", str(tiny_model_dir), "--train_data_path", "x.jsonl", "--output_dir", "/tmp/x",
         "--use_cpu", "True", "--lora_vision_tower", "True", "--train_projectors", "True"]
    )
    model, *_ = build_model(model_args, lora_args, args)
    names = lora_module_names(model)
    assert any(".visual.blocks." in n for n in names)
    assert not any("audio_tower" in n for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("visual.merger" in n for n in trainable) and any("audio_tower.proj" in n for n in trainable)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--attn_implementation", "flash_attention_2"], "half precision"),
        (["--load_in_4bit", "True", "--load_in_8bit", "True"], "exclusive"),
        (["--metric_for_best_model", "accuracy"], "eval_generate_samples"),
        (["--eval_generate_samples", "4"], "eval_data_path"),
        (["--load_in_4bit", "True", "--fp16", "True"], "bf16"),
        (["--dtype", "int3"], "dtype"),
    ],
)
def test_unsupported_combinations_raise(extra, message):
    parsed = parse_args(["--train_data_path", "x.jsonl", "--output_dir", "/tmp/x", "--use_cpu", "True", *extra])
    with pytest.raises(ValueError, match=message):
        validate_args(*parsed)


def test_yaml_config_and_original_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "train_data_path: t.jsonl\nframes_dir: f\noutput_dir: o\nlearning_rate: 2.0e-4\nnum_train_epochs: 20\n"
        "question_modality: text+audio\naudio_dir: a\nmax_train_frames: 6\n"
    )
    model_args, data_args, lora_args, args = parse_args([str(config)])
    assert (data_args.question_modality, data_args.max_train_frames, args.learning_rate) == ("text+audio", 6, 2e-4)
    # the original toolkit's flags, unchanged
    _, data_args, _, args = parse_args([
        "--train_data_path", "t.jsonl", "--eval_data_path", "e.jsonl", "--frames_dir", "f", "--audio_dir", "a",
        "--eval_audio_dir", "ea", "--output_dir", "o", "--per_device_train_batch_size", "1",
        "--gradient_accumulation_steps", "4", "--learning_rate", "2e-4", "--num_train_epochs", "20",
        "--save_strategy", "epoch", "--bf16", "True", "--logging_steps", "5", "--model_name_or_path", "m",
        "--use_cpu", "True",
    ])
    assert data_args.eval_audio_dir == "ea" and args.gradient_accumulation_steps == 4 and args.bf16


def test_recipe_file_then_flags_that_override_it(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("train_data_path: t.jsonl\noutput_dir: o\nlearning_rate: 2.0e-4\nlora_r: 8\nbf16: false\n")
    _, data_args, lora_args, args = parse_args([str(config), "--learning_rate", "1e-4", "--use_cpu", "True"])
    assert (args.learning_rate, lora_args.lora_r, data_args.train_data_path) == (1e-4, 8, "t.jsonl")
    assert args.report_to in ([], "none", ["none"])  # left to the user: nothing forced, nothing reported by default
    _, _, _, args = parse_args([str(config), "--use_cpu", "True", "--report_to", "tensorboard"])
    assert args.report_to == ["tensorboard"]
    (tmp_path / "typo.yaml").write_text("learning_rte: 1e-4\n")
    with pytest.raises(ValueError, match="unknown argument.*learning_rte"):
        parse_args([str(tmp_path / "typo.yaml")])


def _complete_checkpoint(out: Path, step: int, *, complete: bool = True) -> Path:
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"x")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        (path / "surgvqa_config.json").write_text("{}")
    return path


def test_output_dir_plans(tmp_path):
    from surgvqa.rundir import RunDirError, apply_plan, plan_output_dir

    out = tmp_path / "run"
    assert plan_output_dir(out, None, False).resume_from is None  # missing: fresh
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"old")
    with pytest.raises(RunDirError, match="not empty.*overwrite_output_dir"):
        plan_output_dir(out, None, False)
    _complete_checkpoint(out, 4)
    _complete_checkpoint(out, 8)
    killed = _complete_checkpoint(out, 12, complete=False)  # written while being killed
    with pytest.raises(RunDirError, match="holds checkpoints of an earlier run.*resume_from_checkpoint True"):
        plan_output_dir(out, None, False)
    for flag in ("True", "last", "true"):
        assert plan_output_dir(out, flag, False).resume_from == str(out / "checkpoint-8")
    with pytest.raises(RunDirError, match="not a complete checkpoint"):
        plan_output_dir(out, str(killed), False)
    with pytest.raises(RunDirError, match="pass one of them"):
        plan_output_dir(out, "True", True)
    # auto: a directory without a run record is not ours
    with pytest.raises(RunDirError, match="not a surgvqa run"):
        plan_output_dir(out, "auto", False)
    (out / "surgvqa_config.json").write_text(json.dumps({"media": {"fps": 2.0}, "surgvqa_version": "0"}))
    plan = plan_output_dir(out, "auto", False)
    assert plan.resume_from == str(out / "checkpoint-8")
    from surgvqa.rundir import check_same_run

    check_same_run(plan, {"media": {"fps": 2.0}, "surgvqa_version": "1"})
    with pytest.raises(RunDirError, match=r"holds another run.*media\.fps: 2\.0 -> 3\.0"):
        check_same_run(plan, {"media": {"fps": 3.0}})
    with pytest.raises(RunDirError, match="training"):  # auto (the recipe rerun after a crash) never extends
        check_same_run(plan, {"media": {"fps": 2.0}, "training": {"max_steps": 16}})
    # an explicit resume compares the recorded settings too (the checkpoint's record), but may run longer
    (out / "checkpoint-8" / "surgvqa_config.json").write_text(
        json.dumps({"media": {"fps": 2.0}, "training": {"max_steps": 8, "learning_rate": 0.1}}))
    explicit = plan_output_dir(out, "True", False)
    check_same_run(explicit, {"media": {"fps": 2.0}, "training": {"max_steps": 16, "learning_rate": 0.1}})
    with pytest.raises(RunDirError, match=r"training\.learning_rate: 0\.1 -> 0\.2"):
        check_same_run(explicit, {"training": {"max_steps": 8, "learning_rate": 0.2}})
    # overwrite empties, but never a directory holding this run's inputs
    with pytest.raises(RunDirError, match="holds"):
        plan_output_dir(out, None, True, protected=[out / "checkpoint-4"])
    plan = plan_output_dir(out, None, True, protected=[tmp_path / "data.jsonl"])
    apply_plan(plan)
    assert out.is_dir() and not any(out.iterdir())
    with pytest.raises(RunDirError, match="no complete checkpoint"):
        plan_output_dir(out, "True", False)


def test_used_output_dir_refused_then_overwritten(tiny_model_dir, test_set, tmp_path, capsys):
    from surgvqa.train import main

    out = tmp_path / "used"
    out.mkdir()
    (out / "test_predictions.jsonl").write_text("{}\n")
    (out / "checkpoint-7").mkdir()
    args = _args(tiny_model_dir, test_set, out, "--max_steps", "1", "--save_strategy", "no")
    assert main(args) == 2
    assert "holds checkpoints of an earlier run" in capsys.readouterr().err
    assert (out / "test_predictions.jsonl").is_file()  # nothing touched
    assert main([*args, "--overwrite_output_dir", "True"]) == 0
    names = {p.name for p in out.iterdir()}
    assert "test_predictions.jsonl" not in names and "checkpoint-7" not in names
    assert "adapter_model.safetensors" in names


def test_resume_refuses_replaced_training_data_unless_allowed(tiny_model_dir, test_set, tmp_path, capsys, caplog):
    """Train 3 steps saving each, lose the later checkpoints as a crash would, replace the training JSONL at the
    same path with other lines: `auto` refuses, naming the file; --allow_changed_data True resumes and records it."""
    from surgvqa.train import main

    data = tmp_path / "train.jsonl"
    lines = (test_set / "in_002-001.jsonl").read_text().splitlines(keepends=True)
    data.write_text("".join(lines[:8]))
    out = tmp_path / "run"
    args = [*_args(tiny_model_dir, test_set, out, "--max_steps", "3", "--save_steps", "1"),
            "--train_data_path", str(data)]
    assert main(args) == 0
    for step in (2, 3):
        shutil.rmtree(out / f"checkpoint-{step}")
    before = json.loads((out / "surgvqa_config.json").read_text())
    size = data.stat().st_size
    data.write_text("".join(lines[8:16]))  # other lines, same path
    capsys.readouterr()
    resume = [*args, "--resume_from_checkpoint", "auto"]
    assert main(resume) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot resume from {out / 'checkpoint-1'}: it was trained on other inputs: "
                          f"training data {data.resolve()} changed (")
    assert "--allow_changed_data True" in err and err.count("\n") == 1
    assert not (out / "checkpoint-2").exists()  # nothing trained, nothing written
    recorded = before["inputs"]["train_data"]
    assert recorded["path"] == str(data.resolve()) and recorded["size"] == size
    with caplog.at_level("INFO"):
        assert main([*resume, "--allow_changed_data", "True"]) == 0
    assert "resuming from" in caplog.text and "resuming on changed inputs" in caplog.text
    record = json.loads((out / "surgvqa_config.json").read_text())
    (change,) = record["data_changes"]
    assert change["resumed_from"] == str(out / "checkpoint-1") and "training data" in change["changed"][0]
    assert record["inputs"]["train_data"]["sha256"] != recorded["sha256"]
    assert json.loads((out / "checkpoint-3" / "surgvqa_config.json").read_text())["data_changes"] == [change]


def test_a_run_record_without_fingerprints_still_resumes(tmp_path, caplog):
    """A run directory written before inputs were recorded (schema 1) resumes, saying the data was not compared."""
    from surgvqa.rundir import check_same_inputs, plan_output_dir

    out = tmp_path / "old"
    out.mkdir()
    _complete_checkpoint(out, 2)
    (out / "surgvqa_config.json").write_text(json.dumps({"schema_version": 1, "media": {"fps": 2.0}}))
    plan = plan_output_dir(out, "auto", False)
    with caplog.at_level("WARNING", logger="surgvqa.rundir"):
        assert check_same_inputs(plan, {"train_data": {"path": "x", "size": 1, "sha256": "a"}}, False) == []
    assert "records no fingerprints" in caplog.text


def test_a_cache_location_is_recorded_but_not_part_of_the_run(tiny_model_dir, test_set, tmp_path):
    """Where the frame cache is goes into the record (evaluation reuses it), not into what makes two invocations
    the same run: a resume with the cache elsewhere (or none) is the same run; a changed setting is not."""
    import dataclasses

    from surgvqa.rundir import RunDirError, check_same_run, plan_output_dir
    from surgvqa.train import build_run_config, frame_cache_record, run_identity

    model_args, data_args, lora_args, args = parse_args(_args(tiny_model_dir, test_set, tmp_path / "run"))
    config = build_run_config(model_args, data_args, lora_args, "qwen2_5_omni", args)
    here = dataclasses.replace(config, frame_cache={"mode": "disk", "dir": str(tmp_path / "a")})
    there = dataclasses.replace(config, frame_cache={"mode": "disk", "dir": str(tmp_path / "b")})
    assert run_identity(here) == run_identity(there) == run_identity(config) and "frame_cache" not in run_identity(here)
    assert frame_cache_record(None) == {"mode": "none", "dir": None}
    out = tmp_path / "run"
    _complete_checkpoint(out, 1)
    here.write(out)
    plan = plan_output_dir(out, "auto", False)
    assert plan.recorded["frame_cache"]["dir"] == str(tmp_path / "a")
    check_same_run(plan, run_identity(there))  # the cache moved: the same run
    with pytest.raises(RunDirError, match="learning_rate"):
        check_same_run(plan, run_identity(dataclasses.replace(
            there, training={**there.training, "learning_rate": 0.5})))


def test_a_run_directory_of_the_previous_release_resumes(tiny_model_dir, test_set, tmp_path, caplog):
    """A run record as an earlier release wrote it (schema 1: no input fingerprints, no LoRA variant settings,
    ``media``, ``system_prompt`` and ``token_kept_ratio`` apart, no ``num_video_frames``) resumes: the settings it
    lacks are the ones that release always used."""
    from surgvqa.train import main

    out = tmp_path / "run"
    args = _args(tiny_model_dir, test_set, out, "--max_steps", "2", "--save_steps", "1")
    assert main(args) == 0
    shutil.rmtree(out / "checkpoint-2")
    for record in (out / "surgvqa_config.json", out / "checkpoint-1" / "surgvqa_config.json"):
        old = json.loads(record.read_text())
        old["schema_version"] = 1
        for key in ("inputs", "data_changes"):
            old.pop(key, None)
        for key in ("use_dora", "use_rslora", "init_lora_weights", "loraplus_lr_ratio"):
            del old["lora"][key]
        media = old.pop("preprocessing")
        assert media.pop("num_video_frames") == 8
        old.update(system_prompt=media.pop("system_prompt"), token_kept_ratio=media.pop("token_kept_ratio"),
                   media=media)
        record.write_text(json.dumps(old))
    with caplog.at_level("INFO"):
        assert main([*args, "--resume_from_checkpoint", "auto"]) == 0
    assert f"resuming from {out / 'checkpoint-1'}" in caplog.text
    assert (out / "checkpoint-2").is_dir()


@pytest.mark.parametrize("length", [
    ("--max_steps", "2"), ("--num_train_epochs", "1"), ("--num_train_epochs", "1.5"),
    ("--num_train_epochs", "1.5", "--save_strategy", "epoch", "--eval_strategy", "epoch", "--load_best_model_at_end",
     "True"),
], ids=["max_steps-mid-epoch", "epochs-at-epoch-end", "fractional-epochs", "fractional-epochs-eval-each-epoch"])
def test_killed_after_its_last_checkpoint_resumes_to_that_checkpoint(length, tiny_model_dir, test_set, tmp_path):
    """Killed after writing the checkpoint at the last step, before the final files: the rerun trains nothing
    (no step past the end, no checkpoint beyond it) and writes the checkpoint's adapter as the final one, beside
    the final files an uninterrupted run writes."""
    from surgvqa.train import main

    data = tmp_path / "train.jsonl"  # 6 samples, batch 2: 3 steps per epoch
    data.write_text("".join((test_set / "in_002-001.jsonl").read_text().splitlines(keepends=True)[:6]))
    out = tmp_path / "run"
    args = [*_args(tiny_model_dir, test_set, out, "--save_steps", "1", "--logging_steps", "1", *length),
            "--train_data_path", str(data), "--eval_data_path", str(data)]
    assert main(args) == 0
    last = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert last == {"2": 2, "1": 3, "1.5": 5}[length[1]]
    finished = sorted(p.name for p in out.iterdir())
    state = json.loads((out / "trainer_state.json").read_text())
    record = json.loads((out / "surgvqa_config.json").read_text())
    uninterrupted = _adapter_tensors(out)
    for path in out.iterdir():  # what a kill -9 between the last checkpoint and the final save leaves
        if path.is_file() and path.name != "surgvqa_config.json":
            path.unlink()
    resume = [*args, "--resume_from_checkpoint", "auto"]
    assert main(resume) == 0
    assert sorted(p.name for p in out.iterdir()) == finished  # no checkpoint-(last + 1), every final file
    # the last checkpoint's adapter (the best one's with --load_best_model_at_end), bit for bit
    checkpoint = _adapter_tensors(Path(state["best_model_checkpoint"] or out / f"checkpoint-{last}"))
    final = _adapter_tensors(out)
    assert checkpoint.keys() == final.keys() == uninterrupted.keys()
    assert all(torch.equal(checkpoint[name], final[name]) for name in checkpoint)
    assert all(torch.equal(uninterrupted[name], final[name]) for name in checkpoint)
    resumed = json.loads((out / "trainer_state.json").read_text())
    assert resumed["global_step"] == state["global_step"] == resumed["max_steps"] == last
    assert resumed["log_history"][:-1] == state["log_history"][:-1]  # the checkpoint's history, nothing added
    results = json.loads((out / "train_results.json").read_text())
    assert results["train_steps_per_second"] == 0 and "train_loss" not in results  # no loss of zero steps
    assert json.loads((out / "surgvqa_config.json").read_text()) == record  # rewritten whole at the end


def test_a_failed_start_leaves_the_directory_reusable(tiny_model_dir, test_set, tmp_path, capsys, caplog):
    """A start that fails after writing the run record (an unusable --frame_cache_dir) is no run: the corrected
    rerun starts there; a directory with a checkpoint still counts as used."""
    from surgvqa.train import main

    out = tmp_path / "run"
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    args = _args(tiny_model_dir, test_set, out, "--max_steps", "1", "--save_strategy", "no")
    assert main([*args, "--frame_cache_dir", str(blocker / "cache")]) == 2
    assert "frame cache directory" in capsys.readouterr().err
    assert (out / "surgvqa_config.json").is_file()
    with caplog.at_level("WARNING"):
        assert main(args) == 0
    assert "starting the run afresh" in caplog.text
    assert (out / "adapter_model.safetensors").is_file()
    assert main(args) == 2  # now used: refused as before
    assert "not empty" in capsys.readouterr().err


def test_bad_data_fails_before_model_loads(tmp_path, test_set, capsys):
    from surgvqa.train import main

    bad = tmp_path / "bad.jsonl"
    lines = (test_set / "in_002-001.jsonl").read_text().splitlines()[:3]
    record = json.loads(lines[1])
    record["frames"][0] = "002-001_999999"
    bad.write_text("\n".join([lines[0], json.dumps(record), lines[2]]) + "\n")
    # the model path does not even exist: the data check must fail first, naming the line and the path
    code = main(["--model_name_or_path", str(tmp_path / "no-model"), "--train_data_path", str(bad),
                 "--frames_dir", str(test_set / "frames"), "--output_dir", str(tmp_path / "o"), "--use_cpu", "True"])
    assert code == 2  # a user error: bad data
    err = capsys.readouterr().err
    assert err.startswith("error: 1 problem(s) in the data") and f"{bad}:2" in err and "002-001_999999" in err


@pytest.mark.parametrize("bits", ["4", "8"])
def test_quantized_load_and_one_step(bits, tiny_model_dir, test_set, tmp_path):
    compute = qlora_compute()
    from surgvqa.train import main

    flag = "--load_in_4bit" if bits == "4" else "--load_in_8bit"
    out = tmp_path / f"q{bits}"
    try:
        code = main(_args(tiny_model_dir, test_set, out, flag, "True", *compute, "--max_steps", "1",
                          "--save_strategy", "no"))
    except (RuntimeError, NotImplementedError) as err:  # an op bitsandbytes lacks on CPU: a clear error
        pytest.skip(f"bitsandbytes {bits}-bit training is not supported on this CPU: {err}")
    assert code == 0
    config = json.loads((out / "surgvqa_config.json").read_text())
    assert config["quantization"] == f"{bits}bit"
    model = get_backbone("qwen2_5_omni").load(
        str(tiny_model_dir), LoadOptions(dtype="bfloat16" if "--bf16" in compute else "float32",
                                         **{f"load_in_{bits}bit": True})
    )
    linear_types = {type(m).__name__ for n, m in model.named_modules() if n.endswith("self_attn.q_proj")}
    assert linear_types & {"Linear4bit", "Linear8bitLt"}
    for name, module in model.named_modules():
        if name.startswith(("model.visual", "model.audio_tower")) or name == "lm_head":
            assert type(module).__name__ not in ("Linear4bit", "Linear8bitLt"), f"{name} was quantized"


def _qlora_model(tiny_model_dir, test_set):
    compute = qlora_compute()
    parsed = parse_args(["--model_name_or_path", str(tiny_model_dir),
                         "--train_data_path", str(test_set / "in_002-001.jsonl"),
                         "--output_dir", "/tmp/x", "--use_cpu", "True", "--load_in_4bit", "True", *compute,
                         "--gradient_checkpointing", "True", "--train_projectors", "True"])
    validate_args(*parsed)
    model_args, _, lora_args, args = parsed
    model, processor, *_ = build_model(model_args, lora_args, args)
    return model, processor


def _compute_dtype() -> torch.dtype:
    return torch.bfloat16 if "--bf16" in qlora_compute() else torch.float32


def test_4bit_build_keeps_towers_embeddings_and_head_in_bf16(tiny_model_dir, test_set):
    """QLoRA prep: only norms (fp32, run in fp32) and trainable weights are upcast; the towers, embeddings and
    lm_head stay bf16 (the compute dtype: fp32 on CPUs without AVX-512); checkpointed blocks get input gradients."""
    from surgvqa.backbones.common.quantization import is_norm

    model, _ = _qlora_model(tiny_model_dir, test_set)
    compute = _compute_dtype()
    norms = {name for name, module in model.named_modules() if is_norm(module)}
    seen = {"4bit": 0, "norm": 0, "lora": 0, "saved": 0, "bf16": 0}
    for name, param in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        if type(param).__name__ == "Params4bit":
            seen["4bit"] += 1
        elif "lora_" in name:
            assert param.dtype == torch.float32 and param.requires_grad, name
            seen["lora"] += 1
        elif "modules_to_save" in name:
            assert param.dtype == torch.float32 and param.requires_grad, name
            seen["saved"] += 1
        elif owner in norms:
            assert param.dtype == torch.float32 and not param.requires_grad, name
            seen["norm"] += 1
        else:
            assert param.dtype == compute and not param.requires_grad, name
            seen["bf16"] += 1
    assert all(seen.values()), seen
    names = [n for n, p in model.named_parameters() if p.dtype == compute]
    for part in ("visual.blocks", "audio_tower.layers", "embed_tokens", "lm_head"):
        assert any(part in n for n in names), f"{part} not kept in bf16"
    assert model.get_input_embeddings()(torch.tensor([[1, 2]])).requires_grad  # input grads for checkpointing


def test_4bit_forward_without_autocast_and_backward(tiny_model_dir, test_set):
    """The norms cast back to their input's dtype: a forward without autocast (as generation runs) and a backward
    through the bf16 towers and the 4-bit language model both work."""
    from surgvqa.collate import VQACollator
    from surgvqa.data import MediaConfig, SurgicalVQADataset, load_samples

    model, processor = _qlora_model(tiny_model_dir, test_set)
    media = MediaConfig(frames_dir=str(test_set / "frames"), audio_dir=str(test_set / "audio" / "in_002-001"),
                        frame_size=56, question_modality="text+audio")
    samples, _ = load_samples(test_set / "in_002-001.jsonl", media)
    dataset = SurgicalVQADataset(samples[:2], media)
    batch = VQACollator(processor, question_modality="text+audio", frame_size=56)([dataset[0], dataset[1]])
    model.train()
    try:
        loss = model(**batch).loss  # no autocast: each norm casts back to its input's dtype
    except RuntimeError as err:  # e.g. bf16 SDPA with ATEN_CPU_CAPABILITY forced below the CPU's
        pytest.skip(f"bf16 attention is not supported with this CPU's kernels: {err}")
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads)


def _adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def _recipe_env(tiny_model_dir, test_set, out: Path, data: Path) -> dict:
    """train_with_eval_FINAL.sh on the tiny model: 40 deterministic CPU steps, a checkpoint every 4."""
    return {
        **os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
        "MODEL": str(tiny_model_dir), "TRAIN_DATA": str(test_set / "in_002-001.jsonl"),
        "VAL_DATA": str(data), "TEST_DATA": str(data), "FRAMES_DIR": str(test_set / "frames"),
        "OUTPUT_DIR": str(out), "QUESTION_MODALITY": "text", "FRAME_SIZE": "56", "FRAMES": "8", "BATCH": "2",
        "GRAD_ACC": "1", "LR": "3e-3", "MAX_STEPS": "40", "EVAL_STRATEGY": "steps", "EVAL_STEPS": "4",
        "EVAL_GENERATE_SAMPLES": "2", "EVAL_BATCH": "4", "WORKERS": "0",
        "PRECISION": "--use_cpu True --disable_tqdm True --full_determinism True --seed 0 --data_seed 0",
    }


@pytest.mark.slow
def test_recipe_killed_at_a_random_step_resumes_to_the_same_adapter(tiny_model_dir, test_set, tmp_path):
    """kill -9 (the whole recipe) at a random step, run `bash train_with_eval_FINAL.sh` again with the same
    settings: it resumes from the last complete checkpoint and ends with the adapter of an uninterrupted run."""
    import random

    data = tmp_path / "val.jsonl"
    data.write_text("".join((test_set / "out_002-001.jsonl").read_text().splitlines(keepends=True)[:4]))
    extra = ["--logging_steps", "1", "--eval_max_new_tokens", "4"]
    script = str(REPO / "train_with_eval_FINAL.sh")
    straight = tmp_path / "straight"
    subprocess.run(["bash", script, *extra], env=_recipe_env(tiny_model_dir, test_set, straight, data),
                   check=True, capture_output=True)

    seed = random.randrange(10**6)
    kill_at = random.Random(seed).randint(2, 36)
    killed = tmp_path / "killed"
    env = _recipe_env(tiny_model_dir, test_set, killed, data)
    log = tmp_path / "killed.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(["bash", script, *extra], env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.time() + 600
        while log.read_text().count("'loss':") < kill_at:
            assert proc.poll() is None, f"recipe ended before step {kill_at}:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (killed / "adapter_model.safetensors").exists(), "the run finished before the kill"
    rerun = subprocess.run(["bash", script, *extra], env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    if kill_at >= 5:  # a complete checkpoint existed: resumed, not restarted
        assert "resuming from" in rerun.stderr, f"seed {seed}, kill at step {kill_at}"
    a, b = _adapter_tensors(straight), _adapter_tensors(killed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6,
                                   msg=lambda m, n=name: f"{n} (seed {seed}, killed at step {kill_at}): {m}")
    # the same directory with other settings is another run: refused, nothing touched
    before = sorted(p.name for p in killed.iterdir())
    other = subprocess.run(["bash", script, *extra], env={**env, "LR": "1e-3"}, capture_output=True, text=True)
    assert other.returncode == 2
    assert "holds another run" in other.stderr and "training.learning_rate: 0.003 -> 0.001" in other.stderr
    assert sorted(p.name for p in killed.iterdir()) == before


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tiny_model_dir, test_set, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         str(REPO / "train_vqa.py"),
         *_args(tiny_model_dir, test_set, out, "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "3",
                "--ddp_backend", "gloo", "--eval_data_path", str(test_set / "out_002-001.jsonl"),
                "--eval_strategy", "steps", "--eval_steps", "3", "--per_device_eval_batch_size", "4",
                "--eval_generate_samples", "8", "--eval_max_new_tokens", "8")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file()
    state = json.loads((out / "train_results.json").read_text())
    assert state["train_loss"] > 0
    # 3 steps x 2 per device x 2 processes = 12 of 50 samples: both ranks consumed data
    assert state["epoch"] == pytest.approx(12 / 50, abs=0.01)
    # generation-scored accuracy: 8 samples, split 4 + 4 between the two processes, gathered
    logged = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    evaluation = next(entry for entry in logged if "eval_accuracy" in entry)
    assert evaluation["eval_generated"] == 8 and evaluation["eval_generated_per_process"] == 4
    assert 0.0 <= evaluation["eval_accuracy"] <= 1.0


def test_shipped_recipe_config_parses():
    """configs/a100_qwen2_5_omni.yaml names only real arguments (checked with use_cpu: no GPU here)."""
    import yaml
    from transformers import HfArgumentParser, TrainingArguments

    from surgvqa.train import DataArguments, LoraArguments, ModelArguments

    config = yaml.safe_load((REPO / "configs" / "a100_qwen2_5_omni.yaml").read_text())
    parser = HfArgumentParser((ModelArguments, DataArguments, LoraArguments, TrainingArguments))
    model_args, data_args, lora_args, args = parser.parse_dict({**config, "use_cpu": True})
    assert args.metric_for_best_model == "eval_accuracy" or args.metric_for_best_model == "accuracy"
    assert (data_args.max_train_frames, data_args.frame_size, args.gradient_accumulation_steps) == (8, 384, 4)


def _sample(i: int, qtype: str):
    from surgvqa.data import Sample

    return Sample(video_id="v", id=f"q{i}", question="?", answer="a", question_type=qtype, short_answer="yes")


def test_stratified_subset_is_seeded_proportional_and_covers_every_type():
    samples = [_sample(i, t) for i, t in enumerate(["a"] * 60 + ["b"] * 30 + ["c"] * 9 + ["d"])]
    subset = stratified_subset(samples, 20, seed=0)
    counts = {t: sum(s.question_type == t for s in subset) for t in "abcd"}
    assert counts == {"a": 11, "b": 6, "c": 2, "d": 1}  # 1 each, then 16 in proportion to the rest
    assert len({s.key for s in subset}) == 20
    assert [samples.index(s) for s in subset] == sorted(samples.index(s) for s in subset)  # file order
    assert stratified_subset(samples, 20, seed=0) == subset
    assert stratified_subset(samples, 20, seed=1) != subset
    # not the first N lines (which would all be type "a")
    assert subset != samples[:20]
    assert stratified_subset(samples, 500, seed=0) == samples
    assert len(stratified_subset(samples, 3, seed=0)) == 3  # fewer than the types: the largest shares


def test_eval_accuracy_reaches_early_stopping_and_best_model(tiny_model_dir, test_set, tmp_path):
    """eval_accuracy is in the metrics on_evaluate sees: EarlyStoppingCallback(patience=1) on eval_accuracy stops
    the run (learning rate 0: the accuracy cannot improve after the first evaluation), and the best checkpoint is
    chosen by it."""
    out = tmp_path / "early"
    parsed = parse_args(_args(
        tiny_model_dir, test_set, out, "--max_steps", "20", "--learning_rate", "0",
        "--eval_data_path", str(test_set / "out_002-001.jsonl"), "--eval_strategy", "steps", "--eval_steps", "2",
        "--save_strategy", "steps", "--save_steps", "2", "--per_device_eval_batch_size", "8",
        "--eval_generate_samples", "6", "--eval_max_new_tokens", "8", "--metric_for_best_model", "eval_accuracy",
        "--load_best_model_at_end", "True", "--early_stopping_patience", "1",
    ))
    trainer = train(*parsed)["trainer"]
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert [e["step"] for e in evaluations] == [2, 4]  # stopped after one evaluation without improvement
    assert all("eval_accuracy" in e and e["eval_generated"] == 6 for e in evaluations)
    assert trainer.state.global_step == 4
    assert trainer.state.best_metric == evaluations[0]["eval_accuracy"]
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")


def test_early_stopping_needs_a_metric(tiny_model_dir, test_set, tmp_path):
    parsed = parse_args(_args(tiny_model_dir, test_set, tmp_path / "x", "--early_stopping_patience", "1"))
    with pytest.raises(ValueError, match="needs --metric_for_best_model"):
        validate_args(*parsed)


@pytest.mark.parametrize(
    ("argv", "needed"),
    [
        ([], False),
        (["--load_in_4bit", "True"], True),
        (["--optim", "adamw_torch"], False),
        (["--optim", "adamw_bnb_8bit"], True),  # a bitsandbytes optimizer in an unquantized run
        (["--optim", "paged_adamw_32bit"], True),
    ],
)
def test_bitsandbytes_is_loaded_when_the_command_line_needs_it(tiny_model_dir, argv, needed):
    from surgvqa.arguments import needs_bitsandbytes

    assert needs_bitsandbytes(["--model_name_or_path", str(tiny_model_dir), *argv]) is needed


def test_label_smoothing_is_refused_with_the_reason():
    parsed = parse_args(["--train_data_path", "x.jsonl", "--output_dir", "/tmp/x", "--use_cpu", "True",
                         "--label_smoothing_factor", "0.1"])
    with pytest.raises(UserError, match="label_smoothing_factor is not supported"):
        validate_args(*parsed)


def test_shipped_fsdp2_configs_wrap_each_familys_layers(tiny_model_dir, tmp_path):
    """configs/fsdp2.json (--fsdp_config) and configs/fsdp2.yaml (accelerate launch) ask for FSDP2 with the full
    state dict (a normal PEFT adapter); with no class names, accelerate wraps the classes the model lists in
    _no_split_modules: the tiny thinker's decoder layers among them."""
    import yaml
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from transformers import TrainingArguments

    from surgvqa.backbones import LoadOptions, backbone_for

    args = TrainingArguments(output_dir=str(tmp_path), fsdp=True,
                             fsdp_config=str(REPO / "configs" / "fsdp2.json"))
    assert args.fsdp_plugin_args["fsdp_version"] == 2
    assert args.fsdp_plugin_args["state_dict_type"] == "FULL_STATE_DICT"
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    model = backbone_for(str(tiny_model_dir)).load(str(tiny_model_dir), LoadOptions(dtype="float32"))
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = {type(m).__name__ for m in model.modules() if policy(m)}
    assert "Qwen2_5OmniDecoderLayer" in wrapped
    launch = yaml.safe_load((REPO / "configs" / "fsdp2.yaml").read_text())
    assert launch["distributed_type"] == "FSDP" and launch["fsdp_config"]["fsdp_version"] == 2
    assert launch["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert launch["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


def test_evaluation_batches_go_through_their_own_collator(tmp_path):
    """The eval DataLoader is built with eval_collator; the training collator stays the Trainer's throughout."""
    from transformers import TrainingArguments

    from surgvqa.trainer import VQATrainer

    def train_collator(items):
        return {"who": "train", "n": len(items)}

    def eval_collator(items):
        return {"who": "eval", "n": len(items), "training_collator": trainer.data_collator}

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_eval_batch_size=2)
    trainer = VQATrainer(model=torch.nn.Linear(1, 1), args=args, data_collator=train_collator,
                         eval_collator=eval_collator, eval_dataset=[{"x": i} for i in range(3)])
    batches = list(trainer.get_eval_dataloader())
    assert [(b["who"], b["n"]) for b in batches] == [("eval", 2), ("eval", 1)]
    assert all(b["training_collator"] is train_collator for b in batches) and trainer.data_collator is train_collator


@pytest.mark.parametrize(
    ("argv", "config", "env", "needed"),
    [
        ([], None, "", False),
        (["--deepspeed", "configs/zero3.json"], None, "", True),
        (["--deepspeed=configs/zero3.json"], None, "", True),
        ([], {"deepspeed": "zero3.json"}, "", True),
        ([], {"learning_rate": 1e-4}, "", False),
        ([], None, "true", True),  # accelerate launch with a DeepSpeed config
    ],
)
def test_deepspeed_is_loaded_when_the_run_uses_it(tmp_path, monkeypatch, argv, config, env, needed):
    import yaml

    from surgvqa.lean_imports import needs_deepspeed

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", env)
    argv = ["--output_dir", "out", *argv]
    if config is not None:
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
        argv = [str(tmp_path / "run.yaml"), *argv]
    assert needs_deepspeed(argv) is needed

