"""``surgvqa plan``: will this run fit on my GPU?

Tokens per sample come from the backbone's own processor arithmetic (``VQACollator.token_counts``, the collator's
length pre-flight); parameters and bytes per module group from the model built on the meta device from its config,
stored as our loading code stores them (bf16 / fp32, or bitsandbytes 4-bit / 8-bit with towers, projectors and
lm_head unquantized); optimizer state and gradients for the trainable parameters; activations from a per-token
model whose coefficients are fitted to measured peaks (``benchmarks/memory_calibration.py`` writes
``surgvqa/memory_coefficients.json``). With ``--budget`` it searches the largest frame count, frame size and
evaluation batch that fit, for training and evaluation separately.

This module adds the parts up (``Planner``), searches the budget and prints the plan; ``surgvqa.plan_counts`` counts
tokens and weights, ``surgvqa.memory_model`` holds the arithmetic and the fitted activation model.

    surgvqa plan --model configs/models/qwen2_5_omni_7b_thinker.json --processor runs/tiny-omni-qwen \\
        --frames 8 --frame_size 384 --question_modality text+audio --budget 40GiB [--json]
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import asdict, dataclass
from typing import Any

from surgvqa.errors import one_line_errors, parse_dataclasses, run_main
from surgvqa.memory_model import (
    DTYPE_BYTES,
    MODES,
    OPTIMIZER_STATE,
    GiB,
    PlanError,
    activation_features,
    fitted_bytes,
    gathered_bytes,
    load_coefficients,
    nf4_bytes,
    parse_bytes,
    per_gpu,
    phase_totals,
    pick_fit,
    regime,
)
from surgvqa.plan_counts import (
    PlanArguments,
    Tokens,
    backbone_to_plan,
    build_config,
    dora_norm_elements,
    expert_lora_update_bytes,
    kbit_training_dtype,
    largest_quantized_linear,
    layout_for,
    load_processor,
    lora_params,
    meta_model,
    model_shape,
    moe_counts,
    read_config,
    sample_tokens,
    shard_units,
    source_hw,
    trained_module_params,
    weights,
)


# -------------------------------------------------------------------------------------------------- plan
@dataclass
class Plan:
    args: dict
    model: dict
    tokens: dict
    eval_tokens: dict
    weights: list[dict]
    trainable: dict
    train: dict
    eval: dict
    calibration: dict
    budget: dict | None = None
    #: the training sample against --model_max_length (training refuses a longer one)
    length: dict | None = None
    #: --gpus / --shard: how the training plan is spread over the GPUs (the training totals are per GPU)
    sharding: dict | None = None


class Planner:
    """Everything that does not change with frames / frame size / batch, built once."""

    def __init__(self, args: PlanArguments):
        args.validate()
        self.args = args
        config, checkpoint = read_config(args.model)
        backbone = backbone_to_plan(config, args.backbone)
        self.layout = backbone.plan_layout(config)
        self.config = backbone.plan_config(config, checkpoint)
        self.model = backbone.plan_model(self.config)
        self.shape = model_shape(self.model)
        self.processor = load_processor(args, checkpoint, backbone, config)
        self.groups = weights(self.model, self.layout, args)
        self.moe = moe_counts(self.model, self.layout, self.groups)
        self.lora = lora_params(self.model, self.layout, args)
        # DoRA's norm of W + BA: the product in fp32 (the adapter's dtype) beside the weight in the compute dtype
        self.dora_norm = dora_norm_elements(self.model, self.layout, args) * (4 + DTYPE_BYTES[args.dtype])
        self.saved_params, self.saved_bytes = trained_module_params(self.model, self.layout, args)
        if args.quantization:
            self.shape.largest_linear = largest_quantized_linear(self.model, self.layout)
        self.shape.trainable = self.lora + self.saved_params
        self.units = shard_units(self.model, self.layout, args) if args.shard else None
        self._coefficients: dict | None = None

    # -- pieces ------------------------------------------------------------------------------------------
    def trainable(self) -> dict:
        optim_per_elem, optim_fixed = OPTIMIZER_STATE[self.args.optim]
        lora_bytes = 4 * self.lora  # PEFT keeps adapters of a bf16/fp16 base in fp32 (autocast_adapter_dtype)
        params = self.lora + self.saved_params
        param_bytes = lora_bytes + self.saved_bytes
        return {
            "lora_params": self.lora, "modules_to_save_params": self.saved_params, "params": params,
            "param_bytes": param_bytes, "grad_bytes": param_bytes,
            "optimizer_bytes": optim_per_elem * param_bytes + optim_fixed * params,
        }

    def inputs_bytes(self, tokens: Tokens, batch: int) -> int:
        """input_ids, attention mask, labels (int64), pixel values and mel features (fp32), and the towers' copies
        of both in the compute dtype (none when it is fp32: the tensors pass as they are)."""
        ids = 3 * 8 * batch * tokens.total
        cast = 0 if self.args.dtype == "float32" else DTYPE_BYTES[self.args.dtype]
        pixels = batch * tokens.patches * self.shape.patch_dim * (4 + cast)
        mel = batch * tokens.mel_frames * 128 * (4 + cast)
        return ids + pixels + mel

    def train_breakdown(self, tokens: Tokens, batch: int | None = None) -> tuple[str, dict, dict]:
        """(mode, exact parts, activation features) of one training step."""
        args = self.args
        batch = batch or args.batch
        mode = "train_gc" if args.gradient_checkpointing else "train"
        logit_tokens = tokens.answer if args.logits == "labelled" else tokens.total
        trainable = self.trainable()
        parts = {
            "weights": sum(g.train_bytes for g in self.groups),
            "trainable_params": trainable["param_bytes"],
            "gradients": trainable["grad_bytes"],
            "optimizer": trainable["optimizer_bytes"],
            "inputs": self.inputs_bytes(tokens, batch),
            "dequantize": self.shape.largest_linear * DTYPE_BYTES[args.dtype],
            "expert_lora_update": expert_lora_update_bytes(self.model, self.layout, args),
            "lm_head_cast": self.lm_head_cast_bytes(),
            "dora_norm": self.dora_norm,
        }
        self.spread(parts)
        return mode, parts, activation_features(self.shape, batch, tokens.total, logit_tokens, mode, tokens.patches)

    def spread(self, parts: dict) -> None:
        """One GPU's share of a training step over --gpus. Sharded (--shard): weights, trainable parameters,
        gradients and optimizer state divided by N, plus the full weights gathered at once
        (:func:`~surgvqa.memory_model.gathered_bytes`). DDP (--gpus N alone): everything on every GPU, plus the
        gradient buckets DDP all-reduces (a copy of the gradients). Activations and inputs are per GPU either way."""
        args = self.args
        if args.shard:
            for key in ("weights", "trainable_params", "gradients", "optimizer"):
                parts[key] = per_gpu(parts[key], args.gpus)
            units = self.units
            parts["gathered"] = gathered_bytes(args.shard, units.largest_bytes, units.root_bytes,
                                               units.largest_elements, units.total_elements, DTYPE_BYTES[args.dtype])
        elif args.gpus > 1:
            parts["ddp_buckets"] = parts["gradients"]

    def sharding(self) -> dict | None:
        """What --gpus / --shard do to the plan (None on one GPU)."""
        args = self.args
        if args.gpus == 1:
            return None
        info: dict[str, Any] = {"gpus": args.gpus, "shard": args.shard}
        if self.units:
            info.update(dataclasses.asdict(self.units))
        return info

    def eval_breakdown(self, tokens: Tokens, batch: int | None = None) -> tuple[dict, dict]:
        """(exact parts, activation features) of one generation batch."""
        args = self.args
        batch = batch or args.eval_batch
        kv = (batch * (tokens.total + args.max_new_tokens) * self.shape.layers * 2 * self.shape.kv_heads
              * self.shape.head_dim * DTYPE_BYTES[args.dtype])
        parts = {
            "weights": sum(g.eval_bytes for g in self.groups),
            "adapter": 4 * self.lora + self.saved_bytes,
            "inputs": self.inputs_bytes(tokens, batch),
            "kv_cache": kv,
            "dequantize": self.shape.largest_linear * DTYPE_BYTES[args.dtype],
            "dora_norm": self.dora_norm,
        }
        return parts, activation_features(self.shape, batch, tokens.total, tokens.total, "generate", tokens.patches)

    def lm_head_cast_bytes(self) -> int:
        """Training a 4/8-bit model with an lm_head held in another dtype than the compute dtype: autocast keeps
        a compute-dtype copy for the backward pass (none today: the lm_head stays in the compute dtype)."""
        if not self.args.quantization or kbit_training_dtype(self.args.dtype) == self.args.dtype:
            return 0
        head = next((g for g in self.groups if g.group == "lm_head"), None)
        return head.params * DTYPE_BYTES[self.args.dtype] if head else 0

    @property
    def coefficients(self) -> dict:
        if self._coefficients is None:
            self._coefficients = load_coefficients()
        return self._coefficients

    def fit(self, mode: str) -> dict:
        return pick_fit(self.coefficients, self.args.device, regime(self.args.quantization, self.args.dtype), mode)[0]

    def train_total(self, tokens: Tokens, batch: int | None = None) -> dict:
        mode, parts, features = self.train_breakdown(tokens, batch)
        fit = self.fit(mode)
        parts["activations"] = fitted_bytes(fit, features)
        return {"mode": mode, "batch": batch or self.args.batch, "sequence": tokens.total, "parts": parts,
                "total": sum(parts.values()), "activation_phases": _rounded(phase_totals(fit["coefficients"], features))}

    def eval_total(self, tokens: Tokens, batch: int | None = None) -> dict:
        parts, features = self.eval_breakdown(tokens, batch)
        fit = self.fit("generate")
        parts["activations"] = fitted_bytes(fit, features)
        return {"mode": "generate", "batch": batch or self.args.eval_batch, "prompt": tokens.total,
                "max_new_tokens": self.args.max_new_tokens, "parts": parts, "total": sum(parts.values()),
                "activation_phases": _rounded(phase_totals(fit["coefficients"], features))}

    # -- budget ------------------------------------------------------------------------------------------
    def fits(self, total: int) -> bool:
        return total + parse_bytes(self.args.overhead) <= parse_bytes(self.args.budget)

    def search(self) -> dict:
        """Largest frames (at --frame_size), frame size (at --frames) and eval batch that fit, train and eval."""
        args = self.args
        step = 2 if args.frames_as == "video" else 1

        def train_ok(frames: int, size: int) -> bool:
            tokens = sample_tokens(self.processor, args, frames, size, "train")
            return tokens.total <= args.model_max_length and self.fits(self.train_total(tokens)["total"])

        def eval_ok(frames: int, size: int, batch: int | None = None) -> bool:
            tokens = sample_tokens(self.processor, args, frames, size, "generate")
            return self.fits(self.eval_total(tokens, batch)["total"])

        from surgvqa.backbones import processing_for

        grid = processing_for(self.processor).grid  # 28 px (Qwen2/2.5), 32 px (Qwen3)
        result: dict[str, Any] = {"budget_bytes": parse_bytes(args.budget),
                                  "overhead_bytes": parse_bytes(args.overhead)}
        for name, ok in (("train", train_ok), ("eval", eval_ok)):
            result[name] = {
                "max_frames": _largest(lambda f, ok=ok: ok(f, args.frame_size), step, step, 1024),
                "max_frame_size": _largest(lambda s, ok=ok: ok(args.frames, s), grid, grid, grid * 96),
            }
        tokens = sample_tokens(self.processor, args, mode="generate")
        result["eval"]["max_batch"] = _largest(lambda b: self.fits(self.eval_total(tokens, b)["total"]), 1, 1, 4096)
        return result

    # -- the plan ----------------------------------------------------------------------------------------
    def check_positions(self, train_tokens: Tokens, eval_tokens: Tokens) -> None:
        """Refuse sizes the model cannot read at all (over its ``max_position_embeddings``): no memory plan for
        them, only what to change."""
        args = self.args
        limit = getattr(self.config.get_text_config(), "max_position_embeddings", None)
        longest = max(train_tokens.total, eval_tokens.total + args.max_new_tokens)
        if limit and longest > limit:
            raise PlanError(
                f"--frames {args.frames} x --frame_size {args.frame_size} make {longest:,} tokens per sample, more "
                f"than the {limit:,} positions the model reads (max_position_embeddings; --model_max_length "
                f"{args.model_max_length:,}): no memory plan for that. Lower --frames or --frame_size (the plan at "
                f"--frames 8 --budget SIZE says how many fit)"
            )

    def plan(self) -> Plan:
        args = self.args
        train_tokens = sample_tokens(self.processor, args, mode="train")
        eval_tokens = sample_tokens(self.processor, args, mode="generate")
        self.check_positions(train_tokens, eval_tokens)
        train = self.train_total(train_tokens)
        evaluation = self.eval_total(eval_tokens)
        reg = regime(args.quantization, args.dtype)
        calibration = {}
        for mode in (train["mode"], "generate"):
            fit, note = pick_fit(self.coefficients, args.device, reg, mode)
            calibration[mode] = {"regime": reg, "source": note, "coefficients": fit["coefficients"],
                                 "max_error_on_calibration": fit.get("max_abs_rel_error")}
        total_params = sum(g.params for g in self.groups)
        return Plan(
            args=asdict(args),
            model={"backbone": self.layout.backbone, "model_type": self.config.model_type, "params": total_params,
                   "layers": self.shape.layers, "hidden": self.shape.hidden, "vocab": self.shape.vocab,
                   "moe": self.moe},
            tokens=asdict(train_tokens), eval_tokens=asdict(eval_tokens),
            weights=[asdict(g) for g in self.groups], trainable=self.trainable(), train=train, eval=evaluation,
            calibration=calibration, budget=self.search() if args.budget else None,
            length={"model_max_length": args.model_max_length, "train_sequence": train_tokens.total,
                    "train_fits": train_tokens.total <= args.model_max_length},
            sharding=self.sharding(),
        )


def _rounded(phases: dict[str, float]) -> dict[str, int]:
    return {name: int(value) for name, value in phases.items()}


def _largest(ok, start: int, step: int, limit: int) -> int | None:
    """Largest value in start, start+step, … ≤ limit with ok(value) (memory grows with it); None if none fits."""
    if not ok(start):
        return None
    lo, hi = start, None
    probe = start
    while hi is None:  # gallop up
        nxt = min(probe * 2, limit)
        nxt -= (nxt - start) % step
        if nxt <= probe:
            return probe
        if ok(nxt):
            lo = probe = nxt
            if nxt == limit:
                return nxt
        else:
            hi = nxt
    while hi - lo > step:
        mid = lo + ((hi - lo) // 2 // step) * step
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


# -------------------------------------------------------------------------------------------------- output
#: how the table names the phases of a training step (``memory_model.PHASES``)
PHASE_NAMES = {"forward": "forward through the layers", "head": "LM head and loss",
               "backward": "backward through the layers"}


def gib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f} GiB"


def render(plan: Plan) -> str:
    a = plan.args
    t = plan.tokens
    lines = []
    quant = "4-bit nf4" if a["load_in_4bit"] else "8-bit" if a["load_in_8bit"] else a["dtype"]
    h, w = t["frame_hw"]
    lines.append(f"surgvqa plan: {a['model']} ({plan.model['backbone']}, {plan.model['params'] / 1e9:.2f} B params)")
    if plan.model.get("moe"):
        moe = plan.model["moe"]
        lines.append(f"  MoE: {moe['experts']} experts per layer, {moe['routed_per_token']} routed per token; "
                     f"experts {moe['expert_params'] / 1e9:.2f} B params, active per token "
                     f"{moe['active_params'] / 1e9:.2f} B")
    lines.append(
        f"  {a['frames']} frames x {a['frame_size']} px ({a['source_size']} -> {w}x{h}), {a['question_modality']}"
        + (f" ({a['audio_seconds']:g} s)" if "audio" in a["question_modality"] else "")
        + f", batch {a['batch']}, {'DoRA' if a['use_dora'] else 'LoRA'} r{a['lora_r']}, {quant}, gradient checkpointing "
        + ("on" if a["gradient_checkpointing"] else "off") + f", {a['optim']}, logits {a['logits']}"
        + (f", token_kept_ratio {a['token_kept_ratio']:g}" if a["token_kept_ratio"] != 1.0 else "")
    )
    lines.append("")
    lines.append("tokens per sample (exact, from the processor)")
    lines.append(f"  video {t['video']:>6}   image {t['image']:>4}   audio {t['audio']:>4}   text {t['text']:>4}"
                 f"   total {t['total']:>6}   (answer {t['answer']} labelled; generation prompt "
                 f"{plan.eval_tokens['total']})")
    if plan.length and not plan.length["train_fits"]:
        lines.append(f"  LENGTH: a training sample is {t['total']:,} tokens, over --model_max_length "
                     f"{a['model_max_length']:,}: training refuses it, so training does not fit (length) at any "
                     "memory; lower --frames / --frame_size or raise --model_max_length")
    lines.append("")
    lines.append(f"{'weights (exact)':<22}{'params':>14}{'train':>14}{'eval':>14}")
    for g in plan.weights:
        lines.append(f"  {g['group']:<20}{g['params']:>14,}{gib(g['train_bytes']):>14}{gib(g['eval_bytes']):>14}")
    tr = plan.trainable
    lines.append(f"  {'LoRA (trainable)':<20}{tr['lora_params']:>14,}{gib(4 * tr['lora_params']):>14}"
                 f"{gib(4 * tr['lora_params']):>14}")
    if tr["modules_to_save_params"]:
        lines.append(f"  {'projector copies':<20}{tr['modules_to_save_params']:>14,}")
    lines.append("")
    train, ev = plan.train, plan.eval
    labels = {"weights": "weights", "trainable_params": "trainable params", "gradients": "gradients",
              "optimizer": "optimizer state", "inputs": "inputs", "activations": "activations (fitted)",
              "dequantize": "4/8-bit dequantize", "expert_lora_update": "expert LoRA update",
              "lm_head_cast": "lm_head bf16 copy", "adapter": "adapter", "kv_cache": "KV cache (exact)",
              "dora_norm": "DoRA weight norm", "gathered": "gathered full weights",
              "ddp_buckets": "DDP gradient buckets"}
    lines.append(f"training: batch {train['batch']} x {train['sequence']} tokens ({train['mode']})"
                 + (f", per GPU of {plan.sharding['gpus']}" if plan.sharding else ""))
    if plan.sharding:
        lines.append("  " + sharding_line(plan.sharding))
    phases = train["activation_phases"]
    peak = max(phases, key=phases.get) if phases else None
    for key, value in train["parts"].items():
        if value:
            note = f"   (largest phase: {PHASE_NAMES.get(peak, peak)})" if key == "activations" and peak else ""
            lines.append(f"  {labels[key]:<24}{gib(value):>12}{note}")
    lines.append(f"  {'total':<24}{gib(train['total']):>12}")
    lines.append(f"evaluation (generation): batch {ev['batch']} x {ev['prompt']} prompt tokens + "
                 f"{ev['max_new_tokens']} new" + (", evaluate_checkpoint.py on one GPU with the whole model"
                                                  if plan.sharding and plan.sharding["shard"] else ""))
    for key, value in ev["parts"].items():
        if value:
            lines.append(f"  {labels[key]:<24}{gib(value):>12}")
    lines.append(f"  {'total':<24}{gib(ev['total']):>12}")
    lines.append("")
    for mode, cal in plan.calibration.items():
        err = cal["max_error_on_calibration"]
        lines.append(f"activations ({mode}, {cal['regime']}): {cal['source']}"
                     + (f"; worst calibration error {100 * err:.1f} %" if err is not None else ""))
    if a["use_dora"]:
        lines.append("DoRA: activations are fitted on plain LoRA; DoRA also keeps each adapted Linear's output for its "
                     "backward (not in the fit)")
    lines.append("totals are allocated tensor bytes (torch.cuda.max_memory_allocated); the GPU also holds the CUDA "
                 "context and allocator slack (--overhead)")
    if plan.budget:
        b = plan.budget
        lines.append("")
        lines.append(f"budget {gib(b['budget_bytes'])} (minus {gib(b['overhead_bytes'])} overhead): "
                     f"train {b['train_verdict']}, eval {b['eval_verdict']}")
        lines.append(f"  train: up to {b['train']['max_frames'] or 'no'} frames at {a['frame_size']} px; up to "
                     f"{b['train']['max_frame_size'] or 'no'} px at {a['frames']} frames "
                     f"(sequence <= --model_max_length {a['model_max_length']})")
        lines.append(f"  eval:  up to {b['eval']['max_frames'] or 'no'} frames at {a['frame_size']} px; up to "
                     f"{b['eval']['max_frame_size'] or 'no'} px at {a['frames']} frames; batch up to "
                     f"{b['eval']['max_batch'] or 'none'} at {a['frames']} frames x {a['frame_size']} px")
    if a.get("cv"):
        lines += ["", cv_line(a["cv"], a.get("steps_per_fold"), a.get("seconds_per_step"))]
    return "\n".join(lines)


def sharding_line(sharding: dict) -> str:
    n = sharding["gpus"]
    if not sharding["shard"]:
        return (f"DDP over {n} GPUs: every GPU holds the whole model, its gradients and optimizer state "
                f"(--shard fsdp2|zero3 divides them)")
    gathered = (f"the root unit (embeddings, LM head, norms: {gib(sharding['root_bytes'])}) kept gathered through the "
                f"step and two {sharding['largest_class']} units ({gib(sharding['largest_bytes'])} each) at a time"
                if sharding["shard"] == "fsdp2" else
                f"up to stage3_max_live_parameters of gathered weights (at least one {sharding['largest_class']})")
    return (f"{sharding['shard']} over {n} GPUs: weights, LoRA parameters, gradients and optimizer state divided by "
            f"{n}; {sharding['wrapped']} wrapped units, gathered: {gathered}")


def cv_line(videos: int, steps: int | None, seconds_per_step: float | None) -> str:
    """What ``surgvqa cv`` over ``videos`` videos costs: V trainings and V evaluations; hours only from a measured
    step time."""
    if videos < 3:
        return (f"leave-one-video-out over {videos} video(s): needs at least 3 videos (2 with --val_policy none)")
    text = (f"leave-one-video-out (surgvqa cv) over {videos} videos: {videos} trainings (each on {videos - 2} videos, "
            f"the next one validating; {videos - 1} with --val_policy none) and {videos} evaluations (one video each)")
    if steps and seconds_per_step:
        hours = videos * steps * seconds_per_step / 3600
        return text + (f"; training {videos} x {steps} steps x {seconds_per_step:g} s/step (measured, as given) = "
                       f"{hours:.1f} h, evaluation not included")
    return text + ("; hours: pass --steps_per_fold and --seconds_per_step measured on this GPU (a short run's "
                   "train_runtime / steps); the plan never guesses a step time")


def make_plan(args: PlanArguments) -> Plan:
    planner = Planner(args)
    plan = planner.plan()
    if plan.budget is not None:
        memory = planner.fits(plan.train["total"])
        length = plan.length["train_fits"]
        plan.budget["train_fits"] = memory and length
        plan.budget["eval_fits"] = planner.fits(plan.eval["total"])
        reasons = [name for name, ok in (("length", length), ("memory", memory)) if not ok]
        plan.budget["train_verdict"] = f"does not fit ({', '.join(reasons)})" if reasons else "fits"
        plan.budget["eval_verdict"] = "fits" if plan.budget["eval_fits"] else "does not fit (memory)"
    return plan


def parse_args(argv: list[str] | None = None) -> PlanArguments:
    from transformers import HfArgumentParser

    parser = one_line_errors(HfArgumentParser(PlanArguments, prog="surgvqa plan",
                                              description=__doc__.split("\n\n")[0]))
    (args,) = parse_dataclasses(parser, list(sys.argv[1:] if argv is None else argv))
    return args


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        args = parse_args(argv)
        plan = make_plan(args)
        print(json.dumps(asdict(plan), indent=2) if args.json else render(plan))

    return run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())


#: the names scripts and tests import from ``surgvqa.plan`` (each defined in plan_counts or memory_model)
__all__ = [
    "MODES", "GiB", "PlanArguments", "PlanError", "Planner", "Tokens", "activation_features", "build_config",
    "layout_for", "load_coefficients", "main", "make_plan", "meta_model", "nf4_bytes", "parse_args", "parse_bytes",
    "render", "sample_tokens", "source_hw", "weights",
]
