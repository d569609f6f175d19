"""Sharded training on two CPU processes (gloo): FSDP2 through the Trainer trains, generates during evaluation,
checkpoints, survives a kill, resumes, and ends with the adapter of a two-process DDP run of the same steps; the
adapter evaluates with evaluate_checkpoint.py. ZeRO-3 the same way where DeepSpeed is installed."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
#: FSDP2 reduce-scatters the gradients where DDP all-reduces them: the sums are ordered differently, so the adapters
#: differ by float32 rounding carried through AdamW (measured after the 6 steps: 2.4e-6 FSDP2, 2.0e-6 ZeRO-3, on weights
#: up to 0.09)
ADAPTER_ATOL = 1e-5
STEPS = 6


def _free_port() -> int:
    """A port no process listens on now, for torchrun's rendezvous (two test sessions may run at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _train_command(tiny_model_dir: Path, test_set: Path, out: Path, port: int, *extra: str) -> list[str]:
    """torchrun, 2 CPU processes, gloo; a checkpoint and a generation-scored evaluation every 2 steps."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
        str(REPO / "train_vqa.py"),
        "--model_name_or_path", str(tiny_model_dir), "--train_data_path", str(test_set / "in_002-001.jsonl"),
        "--frames_dir", str(test_set / "frames"), "--frame_size", "56", "--output_dir", str(out),
        "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--use_cpu", "True", "--ddp_backend", "gloo",
        "--seed", "0", "--data_seed", "0", "--full_determinism", "True", "--disable_tqdm", "True",
        "--dataloader_num_workers", "0", "--max_steps", str(STEPS), "--save_strategy", "steps", "--save_steps", "2",
        "--eval_data_path", str(test_set / "out_002-001.jsonl"), "--eval_strategy", "steps", "--eval_steps", "2",
        "--per_device_eval_batch_size", "4", "--eval_generate_samples", "9", "--eval_max_new_tokens", "8",
        "--resume_from_checkpoint", "auto", *extra,
    ]


def _env() -> dict[str, str]:
    """CPU only; DeepSpeed on its CPU accelerator (it falls back to gloo without oneCCL)."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
            "DS_ACCELERATOR": "cpu"}


def _run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _kill_after_first_checkpoint(command: list[str], out: Path, log: Path) -> None:
    """Start the run and SIGKILL all its processes once checkpoint-2 is complete (surgvqa_config.json written).
    torchrun starts each worker in a session of its own, so the workers are found as its descendants."""
    import psutil

    with open(log, "w") as fh:
        proc = subprocess.Popen(command, env=_env(), stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while not (out / "checkpoint-2" / "surgvqa_config.json").is_file():
            assert proc.poll() is None, f"the run ended before its first checkpoint:\n{log.read_text()[-4000:]}"
            assert time.time() < deadline
            time.sleep(0.02)
        launcher = psutil.Process(proc.pid)
        for process in [launcher, *launcher.children(recursive=True)]:
            process.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "adapter_model.safetensors").exists(), "the run finished before the kill"
    assert not (out / f"checkpoint-{STEPS}").exists(), "the run reached its last checkpoint before the kill"


def _header(path: Path) -> tuple[dict, dict]:
    """(name → (dtype, shape), metadata) of a safetensors file."""
    with safe_open(str(path), "pt") as f:
        return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}, f.metadata()


def _assert_same_adapter(reference: Path, sharded: Path) -> None:
    """The same files in the same format (names, dtypes, shapes, metadata, adapter_config.json) and the same
    values within ADAPTER_ATOL."""
    assert _header(sharded / "adapter_model.safetensors") == _header(reference / "adapter_model.safetensors")
    assert json.loads((sharded / "adapter_config.json").read_text()) == \
        json.loads((reference / "adapter_config.json").read_text())
    a, b = load_file(str(reference / "adapter_model.safetensors")), load_file(str(sharded / "adapter_model.safetensors"))
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k), "lora_B still zero: nothing trained"
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=ADAPTER_ATOL, msg=lambda m, n=name: f"{n}: {m}")


def _generation_evals(out: Path) -> list[dict]:
    logged = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [entry for entry in logged if "eval_accuracy" in entry]


def _evaluate(adapter: Path, test_set: Path, tmp_path: Path, name: str) -> list[dict]:
    from surgvqa.evaluate import main

    data = tmp_path / "eval.jsonl"
    data.write_text("".join((test_set / "out_002-001.jsonl").read_text().splitlines(keepends=True)[:8]))
    out = tmp_path / f"{name}.jsonl"
    assert main(["--checkpoint_path", str(adapter), "--eval_data_path", str(data), "--frames_dir",
                 str(test_set / "frames"), "--output_file", str(out), "--batch_size", "4", "--max_new_tokens", "8",
                 "--device", "cpu"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()[1:] if x.strip()]
    assert len(rows) == 8
    return rows


#: engine → (flags, what its checkpoint holds besides the adapter, how the start of training names the sharding)
FSDP = ["--fsdp", "--fsdp_config", str(REPO / "configs" / "fsdp2.json")]
ENGINES = {
    "fsdp2": (FSDP, "pytorch_model_fsdp.bin", "FSDP2"),
    "zero3": (["--deepspeed", str(REPO / "configs" / "zero3.json")], "global_step2", "ZeRO-3"),
}


@pytest.fixture(scope="module")
def ddp_run(tiny_model_dir, test_set, tmp_path_factory) -> Path:
    """The reference: two-process DDP, the same steps."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    _run(_train_command(tiny_model_dir, test_set, out, _free_port()))
    return out


@pytest.fixture(scope="module")
def ddp_predictions(ddp_run, test_set, tmp_path_factory) -> list[dict]:
    """The reference adapter's answers from the usual evaluation command."""
    return _evaluate(ddp_run, test_set, tmp_path_factory.mktemp("ddp-eval"), "ddp")


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(ENGINES))
def test_sharded_on_two_cpu_processes_killed_and_resumed_equals_ddp(engine, ddp_run, ddp_predictions, tiny_model_dir,
                                                                     test_set, tmp_path):
    if engine == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed: make venv installs it with the dev extra "
                    "(pip install 'surgvqa[deepspeed]')")
    flags, engine_file, kind = ENGINES[engine]
    sharded = tmp_path / engine
    command = _train_command(tiny_model_dir, test_set, sharded, _free_port(), *flags)
    log = tmp_path / "killed.log"
    _kill_after_first_checkpoint(command, sharded, log)
    first = log.read_text()
    # the parameters were sharded: each process held half of every parameter tensor
    assert f"{kind}: 132 of 132 parameter tensors sharded over 2 processes; this process holds" in first
    assert (sharded / "checkpoint-2" / engine_file).exists()  # the engine's own checkpoint

    resumed = _run(command)
    assert "resuming from" in resumed.stderr and "checkpoint-2" in resumed.stderr
    assert f"{kind}: 132 of 132 parameter tensors sharded" in resumed.stderr
    _assert_same_adapter(ddp_run, sharded)
    for step in (2, 4, 6):  # checkpoints hold the usual adapter too
        assert (sharded / f"checkpoint-{step}" / "adapter_model.safetensors").is_file()

    # in-training generation ran sharded at every evaluation, with the DDP run's accuracies: 9 samples split 5 + 4,
    # i.e. two generation batches on one process and one on the other, so the sharded run generated in step (the
    # last sample repeated on the second process) instead of pairing one process's forward with another collective
    evals, reference = _generation_evals(sharded), _generation_evals(ddp_run)
    assert [e["step"] for e in evals] == [2, 4, 6] == [e["step"] for e in reference]
    assert all(e["eval_generated"] == 9 and e["eval_generated_per_process"] == 5 for e in evals)
    assert [e["eval_accuracy"] for e in evals] == [e["eval_accuracy"] for e in reference]

    # the adapter evaluates with the usual command, answering as the DDP run's adapter does
    predictions = _evaluate(sharded, test_set, tmp_path, engine)
    assert [r["prediction"] for r in predictions] == [r["prediction"] for r in ddp_predictions]


def test_sharding_check_stops_an_unsharded_fsdp_run(tmp_path):
    """--fsdp with parameters that are not DTensors (a model the Trainer did not shard): refused, not trained."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from surgvqa.trainer import ShardingCheck

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(RuntimeError, match="no parameter of the prepared model is sharded"):
        ShardingCheck().on_train_begin(args, TrainerState(), TrainerControl(), model=torch.nn.Linear(2, 2))


def test_deepspeed_flag_without_deepspeed_is_one_error_line(tmp_path, capsys):
    if importlib.util.find_spec("deepspeed") is None:  # the real flag, as a user without DeepSpeed meets it
        from surgvqa.train import main

        code = main(["--train_data_path", "x.jsonl", "--output_dir", str(tmp_path / "run"), "--use_cpu", "True",
                     "--deepspeed", str(REPO / "configs" / "zero3.json")])
        assert code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --deepspeed needs DeepSpeed, which is not installed") and "Traceback" not in err
        return
    # DeepSpeed installed: TrainingArguments' ImportError as transformers raises it without DeepSpeed
    from dataclasses import dataclass

    from transformers import HfArgumentParser

    from surgvqa.errors import UserError, parse_dataclasses

    @dataclass
    class Args:
        deepspeed: str = ""

        def __post_init__(self):
            raise ImportError("--deepspeed requires deepspeed: `pip install deepspeed`.")

    with pytest.raises(UserError, match=r"^--deepspeed needs DeepSpeed, which is not installed: pip install "):
        parse_dataclasses(HfArgumentParser(Args), ["--deepspeed", "x.json"])


#: `accelerate launch` with a stage-3 DeepSpeed config sets no --deepspeed flag, only its environment
ZERO3_LAUNCH = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}


@pytest.mark.parametrize("flags,env,message", [
    (["--load_in_4bit", "True", *FSDP], {},
     "error: --fsdp with --load_in_4bit: the 4/8-bit weights are stored as uint8"),
    # the PiSSA/OLoRA conversion at the end runs on one process, which holds only its shard of the weights
    (["--init_lora_weights", "pissa", *FSDP], {},
     "error: --init_lora_weights pissa with --fsdp: the final adapter is converted"),
    (["--load_in_4bit", "True"], ZERO3_LAUNCH, "error: ZeRO-3 with --load_in_4bit: the 4/8-bit weights"),
], ids=["4bit-fsdp", "pissa-fsdp", "4bit-zero3-accelerate-launch"])
def test_sharding_refusals_come_before_loading(tiny_model_dir, tmp_path, capsys, monkeypatch, flags, env, message):
    if env:
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'surgvqa[deepspeed]')")
    from surgvqa.train import main

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    code = main(["--model_name_or_path", str(tiny_model_dir), "--train_data_path", "x.jsonl", "--output_dir",
                 str(out), "--use_cpu", "True", *flags])
    assert code == 2
    assert capsys.readouterr().err.startswith(message)
    assert not out.exists()


def test_the_graft_refuses_sharding_and_omni_accepts_it():
    from surgvqa.backbones import get_backbone
    from surgvqa.errors import UserError

    get_backbone("qwen2_5_omni").check_sharding("--fsdp")  # writes no files of its own from the weights
    graft = get_backbone("qwen_vl_whisper")
    graft.check_sharding(None)
    with pytest.raises(UserError, match="graft: its projector file is written from the model's weights"):
        graft.check_sharding("ZeRO-3")
