"""Training: argument handling, LoRA placement, outputs, quantized loading, resume after kill -9, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgvqa.backbones import LoadOptions, get_backbone
from surgvqa.train import (
    assert_lora_placement,
    build_model,
    lora_module_names,
    parse_args,
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
    assert config["media"]["frame_size"] == 56
    assert config["media"]["question_modality"] == "text"
    assert config["media"]["frame_path_template"] == "{video_id}/{frame}.jpg"
    assert config["resized_vocab"] is None
    weights = load_file(str(trained_adapter / "adapter_model.safetensors"))
    assert weights, "empty adapter"
    assert all("language_model.layers" in name for name in weights), "LoRA weights outside the language model"
    assert any(float(t.abs().max()) > 0 for name, t in weights.items() if "lora_B" in name), "LoRA B never trained"


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
    # a plain name list would also wrap tower modules: the assertion catches it
    from peft import LoraConfig, get_peft_model

    base = backbone.load(str(tiny_model_dir), LoadOptions(dtype="float32"))
    naive = get_peft_model(base, LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "proj"]))
    with pytest.raises(AssertionError, match="inside the tower"):
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


def _bnb_cpu_ok() -> bool:
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(16, 16, compute_dtype=torch.bfloat16, quant_type="nf4")
        layer = layer.to("cpu")
        layer(torch.randn(1, 16, dtype=torch.bfloat16))
        return True
    except Exception:  # noqa: BLE001 - any failure means: not available on this machine
        return False


@pytest.mark.parametrize("bits", ["4", "8"])
def test_quantized_load_and_one_step(bits, tiny_model_dir, test_set, tmp_path):
    if not _bnb_cpu_ok():
        pytest.skip("bitsandbytes cannot run on this machine's CPU")
    from surgvqa.train import main

    flag = "--load_in_4bit" if bits == "4" else "--load_in_8bit"
    out = tmp_path / f"q{bits}"
    try:
        code = main(_args(tiny_model_dir, test_set, out, flag, "True", "--bf16", "True", "--max_steps", "1",
                          "--save_strategy", "no"))
    except (RuntimeError, NotImplementedError) as err:  # an op bitsandbytes lacks on CPU: a clear error
        pytest.skip(f"bitsandbytes {bits}-bit training is not supported on this CPU: {err}")
    assert code == 0
    config = json.loads((out / "surgvqa_config.json").read_text())
    assert config["quantization"] == f"{bits}bit"
    model = get_backbone("qwen2_5_omni").load(
        str(tiny_model_dir), LoadOptions(dtype="bfloat16", **{f"load_in_{bits}bit": True})
    )
    linear_types = {type(m).__name__ for n, m in model.named_modules() if n.endswith("self_attn.q_proj")}
    assert linear_types & {"Linear4bit", "Linear8bitLt"}
    for name, module in model.named_modules():
        if name.startswith(("model.visual", "model.audio_tower")) or name == "lm_head":
            assert type(module).__name__ not in ("Linear4bit", "Linear8bitLt"), f"{name} was quantized"


def _adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted(tiny_model_dir, test_set, tmp_path):
    """kill -9 after the first checkpoint, resume: the final adapter equals an uninterrupted run."""
    common = ["--max_steps", "40", "--save_strategy", "steps", "--save_steps", "4", "--learning_rate", "3e-3",
              "--lr_scheduler_type", "constant", "--full_determinism", "True"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    subprocess.run([sys.executable, str(REPO / "train_vqa.py"), *_args(tiny_model_dir, test_set, straight, *common)],
                   check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train_vqa.py"), *_args(tiny_model_dir, test_set, killed, *common)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    checkpoint = killed / "checkpoint-4"
    deadline = time.time() + 300
    complete = ("trainer_state.json", "rng_state.pth", "optimizer.pt", "adapter_model.safetensors")
    while not all((checkpoint / name).is_file() for name in complete):
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter_model.safetensors").exists(), "run finished before the kill"
    subprocess.run(
        [sys.executable, str(REPO / "train_vqa.py"),
         *_args(tiny_model_dir, test_set, killed, *common, "--resume_from_checkpoint", str(checkpoint))],
        check=True, env=env, capture_output=True,
    )
    a, b = _adapter_tensors(straight), _adapter_tensors(killed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tiny_model_dir, test_set, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         str(REPO / "train_vqa.py"),
         *_args(tiny_model_dir, test_set, out, "--max_steps", "3", "--save_strategy", "no", "--ddp_backend", "gloo")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file()
    state = json.loads((out / "train_results.json").read_text())
    assert state["train_loss"] > 0
    # 3 steps x 2 per device x 2 processes = 12 of 50 samples: both ranks consumed data
    assert state["epoch"] == pytest.approx(12 / 50, abs=0.01)


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
