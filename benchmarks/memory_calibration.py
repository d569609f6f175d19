#!/usr/bin/env python
"""Measure peak memory of training steps and generation batches, fit the planner's activation coefficients, and
report the planner's error per point (``surgvqa plan`` reads the fit from ``surgvqa/memory_coefficients.json``).

    python benchmarks/memory_calibration.py [--device cpu|cuda] [--quick] [--write] [--json FILE]
        [--features basic|detailed] [--configs tiny,...] [--regimes float32,...]
    python benchmarks/memory_calibration.py --refit benchmarks/memory_calibration_cpu.json [--features ...]

For every model config (the tiny thinker of the tests and three small ones: wider MLPs with one KV head; the real
152,064-row vocabulary; an MLP as wide as the hidden size with 16 heads), every precision regime (fp32; bf16
weights with bf16 autocast; 4-bit nf4 with bf16 compute) and every mode (a training step with and without gradient
checkpointing; one generation batch), the model is loaded and made trainable by the real code
(``surgvqa.train.build_model``: the backbone's loader, ``prepare_quantized_for_training``, PEFT LoRA r 16 on the
language model), batches come from the real collator on synthetic frames and audio, and one step is measured after
a warm-up step (optimizer state allocated), phase by phase: a training step is split where the LM head's input is
computed and where its gradient is (``forward``: towers and decoder layers; ``head``: LM head and loss, both ways;
``backward``: the decoder layers' backward and the optimizer step); a generation batch is one phase.

Measuring (``_peak_memory.py``):

- CPU: allocated tensor bytes, exactly: what is alive when the step starts (parameters, buffers, quantization
  state, optimizer state, the batch) plus the peak of torch's own allocation records during each phase (the
  profiler's ``profile_memory`` events, replayed in time order). RSS is not used: it includes the interpreter and
  libraries and never shrinks.
- CUDA: ``torch.cuda.max_memory_allocated()``, read and reset where each phase starts.

The planner's exact parts (weights, trainable parameters, gradients, optimizer state, inputs, KV cache) are
subtracted and, phase by phase, the remainder is fitted as bytes per element of that phase's activation features
(``surgvqa.memory_model.activation_features``, restricted to ``--features``, a set of
``surgvqa.memory_model.FEATURE_SETS``; non-negative least squares on the relative error); the planner's activations
are the largest phase. The report gives the planner's error on every point's peak, and a leave-one-
config-out error (each config predicted by a fit that never saw it). ``--write`` stores the fit for this device;
``--refit FILE`` refits the measured peaks of an earlier ``--json`` run with the current activation features (the
CPU sweep behind the shipped fit is ``benchmarks/memory_calibration_cpu.json``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, _digest, cached_build, load_script, log, print_table  # noqa: E402
from _peak_memory import (  # noqa: E402
    PeakMeter,
    PhaseMarks,
    batch_tensors,
    generate_step,
    model_tensors,
    optimizer_tensors,
    storage_bytes,
    train_step,
)

from surgvqa.memory_model import FEATURE_SETS  # noqa: E402

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REGIMES = ("float32", "bfloat16", "4bit")
DEFAULT_FEATURES = "detailed"
#: model configs of the sweep: text width, MLP width, layers, heads, KV heads, vocabulary, tower width
CONFIGS = {
    "tiny": dict(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab="tiny", tower=32),
    "small": dict(hidden=512, intermediate=2688, layers=4, heads=8, kv_heads=1, vocab="tiny", tower=64),
    "small-qwen-vocab": dict(hidden=256, intermediate=1024, layers=3, heads=4, kv_heads=2, vocab="qwen",
                             tower=64),
    # MLP as wide as the hidden size and 16 heads: separates the hidden, MLP and attention-score terms
    "many-heads": dict(hidden=256, intermediate=256, layers=2, heads=16, kv_heads=4, vocab="tiny", tower=32),
}
#: (frames, frame_size, question modality, batch) per mode
TRAIN_POINTS = [(2, 112, "text", 1), (8, 224, "text+audio", 1), (16, 336, "text+audio", 1), (8, 224, "text", 2)]
GENERATE_POINTS = [(2, 112, "text", 1), (8, 224, "text+audio", 1), (8, 224, "text+audio", 4), (16, 336, "text", 2)]
QUICK_TRAIN_POINTS = [(2, 112, "text", 1), (8, 224, "text+audio", 1), (8, 224, "text", 2)]
QUICK_GENERATE_POINTS = [(2, 112, "text", 1), (8, 224, "text+audio", 2)]
GENERATE_NEW_TOKENS = 16


# ------------------------------------------------------------------------------------------------- models
def build_model_dir(name: str, spec: dict) -> Path:
    """A random Qwen2.5-Omni thinker of the given shape plus its processor, saved like a checkpoint (cached)."""
    script = REPO / "scripts" / "make_tiny_model.py"

    def build(out: Path) -> None:
        import torch
        from transformers import GenerationConfig, Qwen2_5OmniThinkerForConditionalGeneration

        tiny = load_script("make_tiny_model")
        log(f"building the {name} model ...")
        torch.manual_seed(0)
        tokenizer = tiny.build_tokenizer(spec["vocab"])
        processor = tiny.build_processor(tokenizer, frame_size=336)
        config = tiny.build_config(tokenizer, text_hidden=spec["hidden"], tower_hidden=spec["tower"],
                                   layers=spec["layers"])
        text = config.text_config
        text.intermediate_size = spec["intermediate"]
        text.num_hidden_layers = spec["layers"]
        text.num_attention_heads = spec["heads"]
        text.num_key_value_heads = spec["kv_heads"]
        half = spec["hidden"] // spec["heads"] // 2
        temporal = half // 4
        height = (half - temporal) // 2
        text.rope_parameters["mrope_section"] = [temporal, height, half - temporal - height]
        text.layer_types = ["full_attention"] * spec["layers"]
        model = Qwen2_5OmniThinkerForConditionalGeneration(config)
        model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id,
                                                   pad_token_id=config.pad_token_id, do_sample=False)
        model.save_pretrained(out, safe_serialization=True)
        processor.save_pretrained(out)

    return cached_build(f"calib-{name}", _digest(name, spec, files=[script]), build)


def regime_options(regime: str) -> dict:
    """ModelArguments / TrainingArguments settings of a regime (what a user passes to train_vqa.py)."""
    if regime == "float32":
        return {"dtype": "float32", "load_in_4bit": False, "bf16": False}
    if regime == "bfloat16":
        return {"dtype": "bfloat16", "load_in_4bit": False, "bf16": True}
    if regime == "4bit":
        return {"dtype": "bfloat16", "load_in_4bit": True, "bf16": True}
    raise ValueError(f"regime must be one of {REGIMES}")


def build_trainable(model_dir: Path, regime: str, gradient_checkpointing: bool, device: str, lora_r: int = 16):
    """The model exactly as ``train_vqa.py`` builds it, on ``device``; plus the TrainingArguments."""
    import torch
    from transformers import TrainingArguments

    from surgvqa.train import LoraArguments, ModelArguments, build_model

    options = regime_options(regime)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="calib-"), use_cpu=device == "cpu", bf16=options["bf16"],
        gradient_checkpointing=gradient_checkpointing, report_to="none", seed=0,
    )
    model_args = ModelArguments(model_name_or_path=str(model_dir), dtype=options["dtype"],
                                load_in_4bit=options["load_in_4bit"])
    model, processor, _, _, _ = build_model(model_args, LoraArguments(lora_r=lora_r, lora_alpha=2 * lora_r), args)
    if device != "cpu" and not options["load_in_4bit"]:
        model.to(device)
    model.train()
    return model, processor, args, torch.bfloat16 if options["bf16"] else None


def build_for_generation(model_dir: Path, regime: str, device: str, lora_r: int = 16):
    """The model as ``evaluate_checkpoint.py`` holds it: the backbone's loader (no training preparation) plus a
    LoRA adapter of rank ``lora_r`` (freshly initialised here: same shapes as a trained one)."""
    from peft import LoraConfig, get_peft_model

    from surgvqa.backbones import LoadOptions, backbone_for

    options = regime_options(regime)
    backbone = backbone_for(str(model_dir))
    model = backbone.load(str(model_dir), LoadOptions(dtype=options["dtype"], load_in_4bit=options["load_in_4bit"]))
    processor = backbone.load_processor(str(model_dir))
    from surgvqa.tokenizer import repair_tokenizer

    repair_tokenizer(processor.tokenizer, model)
    if device != "cpu" and not options["load_in_4bit"]:
        model.to(device)
    model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=backbone.lora_target_regex,
                                             task_type="CAUSAL_LM"))
    model.eval()
    return model, processor


def make_optimizer(model, args):
    from transformers import Trainer

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    return cls([p for p in model.parameters() if p.requires_grad], **kwargs)


# --------------------------------------------------------------------------------------------------- data
def make_items(args, batch: int) -> list[dict]:
    """``batch`` identical dataset items at the planner's frame size (synthetic frames, noise audio)."""
    import numpy as np

    from surgvqa.media import fit_to_budget
    from surgvqa.plan_counts import source_hw

    height, width = source_hw(args.source_size)
    w, h = fit_to_budget(width, height, args.frame_size)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(args.frames)]
    audio = None
    if "audio" in args.question_modality:
        audio = (0.1 * rng.standard_normal(round(args.audio_seconds * 16000))).astype(np.float32)
    items = []
    for i in range(batch):
        sample = SimpleNamespace(key=("calib", str(i)), question=args.question, answer=args.answer,
                                 source="memory_calibration")
        items.append({"sample": sample, "frames": frames, "audio": audio})
    return items


def collate(processor, args, batch: int, mode: str) -> dict:
    from surgvqa.collate import VQACollator

    collator = VQACollator(processor, question_modality=args.question_modality, frame_size=args.frame_size,
                           frames_as=args.frames_as, mode=mode)
    return collator(make_items(args, batch))


# ------------------------------------------------------------------------------------------------ the sweep
@dataclass
class Point:
    config: str
    regime: str
    mode: str
    batch: int
    tokens: int
    measured: int
    exact: int  # the planner's exact parts
    features: dict
    seconds: float
    setting: str
    settings: tuple = ()
    phases: dict = field(default_factory=dict)  # measured peak of each phase of the step (bytes)
    predicted: int = 0
    loo_predicted: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def error(self) -> float:
        return (self.predicted - self.measured) / self.measured

    @property
    def loo_error(self) -> float:
        return (self.loo_predicted - self.measured) / self.measured


def planner_for(model_dir: Path, regime: str, gradient_checkpointing: bool, device: str):
    from surgvqa.plan import Planner
    from surgvqa.plan_counts import PlanArguments

    options = regime_options(regime)
    args = PlanArguments(model=str(model_dir), dtype=options["dtype"], load_in_4bit=options["load_in_4bit"],
                         gradient_checkpointing=gradient_checkpointing, max_new_tokens=GENERATE_NEW_TOKENS,
                         device=device, logits="full")  # the measured step is the model's own loss on full logits
    return Planner(args)


def check_tokens(batch: dict, tokens, batch_size: int, where: str) -> None:
    width = batch["input_ids"].shape[1]
    if width != tokens.total or batch["input_ids"].shape[0] != batch_size:
        raise AssertionError(f"{where}: the planner expects {batch_size} x {tokens.total} tokens, the collator made "
                             f"{tuple(batch['input_ids'].shape)}")


def point_batch(planner, processor, point, mode: str, label: str):
    """(planned tokens, collated batch) of one sweep point, the batch checked against the planner's token count."""
    from surgvqa.plan_counts import sample_tokens

    frames, size, modality, batch_size = point
    args = planner.args
    args.frames, args.frame_size, args.question_modality = frames, size, modality
    tokens = sample_tokens(planner.processor, args, mode=mode)
    batch = collate(processor, args, batch_size, mode)
    check_tokens(batch, tokens, batch_size, label)
    return tokens, batch


def sweep_train(name: str, model_dir: Path, regime: str, gc_on: bool, device: str, points) -> list[Point]:
    planner = planner_for(model_dir, regime, gc_on, device)
    model, processor, targs, autocast_dtype = build_trainable(model_dir, regime, gc_on, device)
    optimizer = make_optimizer(model, targs)
    results = []
    for frames, size, modality, batch_size in points:
        tokens, batch = point_batch(planner, processor, (frames, size, modality, batch_size), "train",
                                    f"{name} {regime} train")
        train_step(model, optimizer, batch, autocast_dtype, device)  # warm-up: optimizer state exists after it
        static = storage_bytes([*model_tensors(model), *optimizer_tensors(optimizer), *batch_tensors(batch)])
        with PeakMeter(device, static, first_phase="forward") as meter, PhaseMarks(model, meter):
            seconds = train_step(model, optimizer, batch, autocast_dtype, device)
        mode, parts, features = planner.train_breakdown(tokens, batch_size)
        results.append(Point(name, regime, mode, batch_size, tokens.total, meter.peak, sum(parts.values()),
                             features, seconds, f"{frames}f {size}px {modality}", (frames, size, modality, gc_on),
                             phases=dict(meter.phases),
                             extra={"static_measured": static, "weights_planned": parts["weights"]}))
        log(f"{name:>17} {regime:>8} {mode:>8} b{batch_size} {tokens.total:>5} tok: "
            f"{meter.peak / 2**20:9.1f} MiB ({seconds:.2f} s; "
            + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in meter.phases.items()) + ")")
    del model, optimizer
    gc.collect()
    return results


def sweep_generate(name: str, model_dir: Path, regime: str, device: str, points) -> list[Point]:
    planner = planner_for(model_dir, regime, False, device)
    model, processor = build_for_generation(model_dir, regime, device)
    results = []
    for frames, size, modality, batch_size in points:
        tokens, batch = point_batch(planner, processor, (frames, size, modality, batch_size), "generate",
                                    f"{name} {regime} generate")
        generate_step(model, processor.tokenizer, batch, 2, device)  # warm-up (lazy kernels, caches)
        static = storage_bytes([*model_tensors(model), *batch_tensors(batch)])
        with PeakMeter(device, static, first_phase="prefill") as meter:
            seconds = generate_step(model, processor.tokenizer, batch, GENERATE_NEW_TOKENS, device)
        parts, features = planner.eval_breakdown(tokens, batch_size)
        results.append(Point(name, regime, "generate", batch_size, tokens.total, meter.peak, sum(parts.values()),
                             features, seconds, f"{frames}f {size}px {modality}", (frames, size, modality, False),
                             phases=dict(meter.phases), extra={"static_measured": static, "weights_planned": parts["weights"]}))
        log(f"{name:>17} {regime:>8} generate b{batch_size} {tokens.total:>5} tok: "
            f"{meter.peak / 2**20:9.1f} MiB ({seconds:.2f} s)")
    del model
    gc.collect()
    return results


# ---------------------------------------------------------------------------------------------------- fitting
def nnls(matrix, target):
    """Non-negative least squares (Lawson-Hanson active set), small problems."""
    import numpy as np

    a, b = np.asarray(matrix, dtype=float), np.asarray(target, dtype=float)
    n = a.shape[1]
    passive = np.zeros(n, dtype=bool)
    x = np.zeros(n)
    for _ in range(3 * n + 10):
        w = a.T @ (b - a @ x)
        candidates = np.where(~passive & (w > 1e-12 * max(1.0, np.abs(w).max())))[0]
        if candidates.size == 0:
            break
        passive[candidates[np.argmax(w[candidates])]] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            bad = passive & (z <= 0)
            alpha = np.min(x[bad] / (x[bad] - z[bad]))
            x = x + alpha * (z - x)
            passive &= x > 1e-12
    return x


def fit(points: list[Point], allowed: tuple[str, ...] | None = None) -> dict:
    """Bytes per element of each activation feature, phase by phase: for every phase, the coefficients of its
    features that minimise the sum of squared relative errors of that phase's measured peak, x >= 0."""
    coefficients = {}
    for phase in sorted({k.split(":", 1)[0] for p in points for k in p.features}):
        names = sorted({k for p in points for k in p.features if k.split(":", 1)[0] == phase
                        and (allowed is None or k.split(":", 1)[1] in allowed)})
        group = [p for p in points if phase in p.phases]
        rows = [[p.features.get(k, 0.0) / p.phases[phase] for k in names] for p in group]
        target = [(p.phases[phase] - p.exact) / p.phases[phase] for p in group]
        scale = [max(abs(r[j]) for r in rows) or 1.0 for j in range(len(names))]
        scaled = [[r[j] / scale[j] for j in range(len(names))] for r in rows]
        solution = nnls(scaled, target)
        coefficients.update({k: float(solution[j] / scale[j]) for j, k in enumerate(names)})
    return coefficients


def predict(coefficients: dict, point: Point) -> int:
    from surgvqa.memory_model import fitted_bytes

    return point.exact + fitted_bytes({"coefficients": coefficients}, point.features)


def fit_all(points: list[Point], allowed: tuple[str, ...] | None = None) -> dict:
    """{regime: {mode: fit entry}}; sets each point's prediction and leave-one-config-out prediction."""
    fits: dict = {}
    for regime in sorted({p.regime for p in points}):
        for mode in sorted({p.mode for p in points}):
            group = [p for p in points if p.regime == regime and p.mode == mode]
            if not group:
                continue
            coefficients = fit(group, allowed)
            for p in group:
                p.predicted = predict(coefficients, p)
                others = [q for q in group if q.config != p.config]
                p.loo_predicted = predict(fit(others, allowed), p) if others else p.predicted
            fits.setdefault(regime, {})[mode] = {
                "coefficients": coefficients,
                "points": len(group),
                "max_abs_rel_error": max(abs(p.error) for p in group),
                "max_abs_rel_error_leave_one_config_out": max(abs(p.loo_error) for p in group),
                "configs": sorted({p.config for p in group}),
                "features": sorted({k.split(":", 1)[1] for k in coefficients}),
            }
    return fits


# --------------------------------------------------------------------------------------------------- main
def device_label(device: str) -> str:
    import platform

    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU {platform.machine()}, torch {torch.__version__}"


def write_fits(fits: dict, device: str, label: str, path: Path) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data["about"] = (
        "Activation coefficients of surgvqa plan: bytes per element of each feature (surgvqa.memory_model."
        "activation_features, keyed phase:feature), fitted phase by phase by benchmarks/memory_calibration.py to "
        "measured peaks minus the planner's exact parts; a step's activations are its largest phase total. "
        "fits[device][regime][mode].")
    data.setdefault("fits", {})[device] = {}
    for regime, modes in fits.items():
        for mode, entry in modes.items():
            entry = dict(entry, measured_on=f"{label}, {date.today().isoformat()}")
            data["fits"][device].setdefault(regime, {})[mode] = entry
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def run(device: str, quick: bool, regimes: list[str], configs: list[str],
        allowed: tuple[str, ...] | None = None) -> tuple[list[Point], dict]:
    import torch

    torch.manual_seed(0)
    train_points = QUICK_TRAIN_POINTS if quick else TRAIN_POINTS
    generate_points = QUICK_GENERATE_POINTS if quick else GENERATE_POINTS
    points: list[Point] = []
    for name in configs:
        model_dir = build_model_dir(name, CONFIGS[name])
        for regime in regimes:
            for gc_on in (False, True):
                points += sweep_train(name, model_dir, regime, gc_on, device, train_points)
            points += sweep_generate(name, model_dir, regime, device, generate_points)
    return points, fit_all(points, allowed)


def replan(saved: list[dict]) -> list[Point]:
    """Points of an earlier ``--json`` run with the current planner's exact parts and features (the measured
    peaks are kept): change the activation model, refit, no new measurement."""
    from surgvqa.plan_counts import sample_tokens

    points, planners = [], {}
    for record in saved:
        if not record.get("phases"):
            raise ValueError("the sweep predates the per-phase peaks the activation model is fitted to: measure it "
                             "again (python benchmarks/memory_calibration.py --json FILE)")
        frames, size, modality, gc_on = record.get("settings") or _settings(record)
        key = (record["config"], record["regime"], gc_on)
        if key not in planners:
            planners[key] = planner_for(build_model_dir(record["config"], CONFIGS[record["config"]]),
                                        record["regime"], gc_on, "cpu")
        planner = planners[key]
        args = planner.args
        args.frames, args.frame_size, args.question_modality = frames, size, modality
        if record["mode"] == "generate":
            tokens = sample_tokens(planner.processor, args, mode="generate")
            parts, features = planner.eval_breakdown(tokens, record["batch"])
        else:
            tokens = sample_tokens(planner.processor, args, mode="train")
            _, parts, features = planner.train_breakdown(tokens, record["batch"])
        points.append(Point(record["config"], record["regime"], record["mode"], record["batch"], tokens.total,
                            record["measured"], sum(parts.values()), features, record["seconds"], record["setting"],
                            (frames, size, modality, gc_on), phases=record["phases"], extra=record.get("extra", {})))
    return points


def _settings(record: dict) -> tuple:
    frames, size, modality = record["setting"].split()
    return int(frames.rstrip("f")), int(size.removesuffix("px")), modality, record["mode"] == "train_gc"


def report(points: list[Point], fits: dict, goal: float) -> bool:
    rows = [[p.config, p.regime, p.mode, p.setting, p.batch, p.tokens, f"{p.measured / 2**20:.1f}",
             f"{p.predicted / 2**20:.1f}", f"{100 * p.error:+.1f}", f"{100 * p.loo_error:+.1f}", f"{p.seconds:.2f}"]
            for p in points]
    print_table(["config", "regime", "mode", "setting", "batch", "tokens", "measured MiB", "planned MiB",
                 "error %", "held-out %", "s"], rows, title="planner vs measured peak (allocated tensor bytes)")
    worst = max(abs(p.error) for p in points)
    worst_loo = max(abs(p.loo_error) for p in points)
    print(f"\nworst planner error over {len(points)} points: {100 * worst:.1f} % (goal <= {100 * goal:.0f} %); "
          f"with each config held out of its own fit: {100 * worst_loo:.1f} %")
    for regime, modes in fits.items():
        for mode, entry in modes.items():
            coefs = ", ".join(f"{k} {v:.3g}" for k, v in sorted(entry["coefficients"].items()))
            print(f"  {regime:>8} {mode:>8}: {coefs}")
    return worst <= goal


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--quick", action="store_true", help="fewer points (a smoke test)")
    parser.add_argument("--regimes", default=",".join(REGIMES))
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--write", action="store_true", help="store the fit in surgvqa/memory_coefficients.json")
    parser.add_argument("--coefficients", default=str(REPO / "surgvqa" / "memory_coefficients.json"))
    parser.add_argument("--json", default=None, help="also write every point and the fit to this file")
    parser.add_argument("--goal", type=float, default=0.15)
    parser.add_argument("--features", choices=sorted(FEATURE_SETS), default=DEFAULT_FEATURES,
                        help="which activation features the fit may use (surgvqa.memory_model.FEATURE_SETS)")
    parser.add_argument("--refit", default=None, help="refit the points of an earlier --json run (CPU), no measuring")
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    regimes = [r for r in args.regimes.split(",") if r]
    configs = [c for c in args.configs.split(",") if c]
    unknown = [r for r in regimes if r not in REGIMES] + [c for c in configs if c not in CONFIGS]
    if unknown:
        print(f"error: unknown regime/config {unknown}; regimes {REGIMES}, configs {tuple(CONFIGS)}", file=sys.stderr)
        return 2
    allowed = FEATURE_SETS[args.features]
    start = time.perf_counter()
    if args.refit:
        saved = json.loads(Path(args.refit).read_text())
        device = "cpu" if saved["device"].startswith("CPU") else "cuda"
        try:
            points = replan(saved["points"])
        except ValueError as err:
            print(f"error: {args.refit}: {err}", file=sys.stderr)
            return 2
        fits = fit_all(points, allowed)
    else:
        points, fits = run(device, args.quick, regimes, configs, allowed)
    ok = report(points, fits, args.goal)
    label = saved["device"] if args.refit else device_label(device)
    print(f"\n{label}; {time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": label, "fits": fits, "points": [
            {**{k: v for k, v in vars(p).items()}, "error": p.error, "loo_error": p.loo_error} for p in points]},
            indent=2) + "\n")
    if args.write:
        write_fits(fits, device, label, Path(args.coefficients))
        print(f"fit written to {args.coefficients} (fits.{device})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
