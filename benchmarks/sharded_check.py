#!/usr/bin/env python
"""Sharded training on two processes against DDP: the tiny model trained for 6 steps (a generation-scored
evaluation and a checkpoint every 2) with DDP, FSDP2 and ZeRO-3 (where DeepSpeed is installed); prints each
engine's largest adapter difference from DDP's and how the start of training reported the sharding.

    python benchmarks/sharded_check.py --device cuda     # 2 GPUs: FSDP2 through accelerate launch + configs/fsdp2.yaml
    python benchmarks/sharded_check.py --device cpu      # 2 CPU processes (gloo), torchrun --fsdp / --deepspeed

On GPUs every engine runs in fp32 (accelerate launch --mixed_precision no) so that the adapters are comparable;
the shipped configs train in bf16.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, environment_line, load_script, log  # noqa: E402


def train_flags(model: Path, out: Path, device: str) -> list[str]:
    test_set = REPO / "test_set"
    return [
        "--model_name_or_path", str(model), "--train_data_path", str(test_set / "in_002-001.jsonl"),
        "--frames_dir", str(test_set / "frames"), "--frame_size", "56", "--output_dir", str(out),
        "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--seed", "0", "--data_seed", "0",
        "--full_determinism", "True", "--disable_tqdm", "True", "--dataloader_num_workers", "0", "--max_steps", "6",
        "--save_strategy", "steps", "--save_steps", "2", "--eval_data_path", str(test_set / "out_002-001.jsonl"),
        "--eval_strategy", "steps", "--eval_steps", "2", "--per_device_eval_batch_size", "4",
        "--eval_generate_samples", "9", "--eval_max_new_tokens", "8",
        *(["--use_cpu", "True", "--ddp_backend", "gloo"] if device == "cpu" else []),
    ]


def launches(device: str) -> dict[str, list[str]]:
    """engine → launcher and engine flags (before / after train_vqa.py)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    fsdp = ([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "fsdp2.yaml"),
             "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "29562"], [])
    if device == "cpu":  # accelerate launch starts one process on CPU
        fsdp = ([*torchrun, "29562"], ["--fsdp", "--fsdp_config", str(REPO / "configs" / "fsdp2.json")])
    engines = {"ddp": ([*torchrun, "29561"], []), "fsdp2": fsdp}
    if importlib.util.find_spec("deepspeed") is not None:
        engines["zero3"] = ([*torchrun, "29563"], ["--deepspeed", str(REPO / "configs" / "zero3.json")])
    return engines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--out", default=str(REPO / "runs" / "sharded_check"))
    args = parser.parse_args()
    import torch
    from safetensors.torch import load_file

    log(environment_line())
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        log(f"sharded check skipped: {torch.cuda.device_count()} GPU(s), it needs 2")
        return 0
    out = Path(args.out)
    model = out / "tiny-model"
    if not (model / "config.json").is_file():
        load_script("make_tiny_model").build_tiny_model(model, seed=0, vocab="tiny")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if args.device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    results = {}
    for engine, (launcher, flags) in launches(args.device).items():
        run = out / engine
        command = [*launcher, str(REPO / "train_vqa.py"), *train_flags(model, run, args.device), *flags,
                   "--overwrite_output_dir", "True"]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            log(f"{engine}: failed (exit {done.returncode})\n{done.stderr[-3000:]}")
            return 1
        sharding = re.search(r"(FSDP2|ZeRO-3): .*elements", done.stderr)
        evals = [e for e in json.loads((run / "trainer_state.json").read_text())["log_history"] if "eval_accuracy" in e]
        results[engine] = {"sharding": sharding[0] if sharding else "not sharded",
                           "eval_accuracy": [e["eval_accuracy"] for e in evals]}
    reference = load_file(str(out / "ddp" / "adapter_model.safetensors"))
    for engine, result in results.items():
        adapter = load_file(str(out / engine / "adapter_model.safetensors"))
        same = sorted(adapter) == sorted(reference)
        diff = max((adapter[k] - reference[k]).abs().max().item() for k in reference) if same else float("nan")
        log(f"{engine:6} max |adapter - DDP| {diff:.2e} (same tensors: {same}); eval_accuracy "
            f"{result['eval_accuracy']}; {result['sharding']}")
        result["max_abs_diff_vs_ddp"] = diff
    if "zero3" not in results:
        log("zero3: DeepSpeed is not installed here, not run")
    (out / "sharded_check.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
