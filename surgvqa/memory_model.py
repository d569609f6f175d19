"""The planner's arithmetic: bytes of stored weights and optimizer state, the activation features and their fitted
coefficients (``memory_coefficients.json``, written by ``benchmarks/memory_calibration.py``).

A leaf: it imports nothing from ``surgvqa``, nor torch; ``surgvqa.plan_counts`` measures a model and a processor,
``surgvqa.plan`` adds the parts up, searches the budget and prints the plan.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from surgvqa.errors import UserError

COEFFICIENTS_FILE = Path(__file__).with_name("memory_coefficients.json")
GiB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: optimizer state bytes per trainable parameter: (bytes per element of the parameter's dtype, fixed bytes)
OPTIMIZER_STATE = {
    "adamw_torch": (2, 0),  # exp_avg + exp_avg_sq, in the parameter's dtype
    "adamw_torch_fused": (2, 0),
    "adamw_8bit": (0, 2),  # two uint8 states (+ per-block scales, < 1 %)
    "paged_adamw_8bit": (0, 2),
    "sgd": (0, 0),  # no momentum (Trainer's default for sgd)
}
#: how parameters, gradients and optimizer state are spread over --gpus (``surgvqa plan --shard``)
SHARDING = ("fsdp2", "zero3")
#: configs/zero3.json's stage3_max_live_parameters: ZeRO-3 keeps up to this many gathered parameters per GPU
ZERO3_MAX_LIVE_PARAMETERS = 1_000_000_000
#: what the planner calls each module group (in table order)
GROUPS = ("LLM layers", "MoE experts", "embeddings", "lm_head", "vision tower", "audio tower", "projectors")
MODES = ("train", "train_gc", "generate")


class PlanError(UserError):
    """A user error: printed as one ``error:`` line (exit 2)."""


def parse_bytes(text: str) -> int:
    """``40GiB``, ``24GB``, ``512MiB``, ``1.5G`` (G = GiB) → bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B?)\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise PlanError(f"cannot read {text!r} as a memory size: write e.g. 40GiB, 24GB or 512MiB")
    value, prefix, suffix = float(match[1]), match[2].upper(), match[3]
    if not prefix:
        raise PlanError(f"{text!r} needs a unit: write e.g. 40GiB or 24GB")
    power = "KMGT".index(prefix) + 1
    base = 1000 if suffix.upper() == "B" else 1024  # "GB" is decimal; "GiB" and a bare "G" are binary
    return int(value * base**power)


@dataclass
class Shape:
    """What activation memory scales with."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    logits_to_keep: bool  # generation computes the last position's logits only
    vision_hidden: int = 0
    vision_intermediate: int = 0
    patch_dim: int = 0  # pixel values per patch (channels x temporal x patch²)
    largest_linear: int = 0  # elements of the largest quantized weight (dequantized per matmul)
    trainable: int = 0  # trainable parameters (LoRA, modules_to_save): the optimizer step's temporaries


def nf4_bytes(numel: int, blocksize: int = 64, nested_blocksize: int = 256) -> int:
    """bitsandbytes nf4 with double quantization: packed 4-bit weight, uint8 absmax per block, fp32 absmax per
    nested block, the fp32 nested code (256) and offset, the fp32 nf4 code (16)."""
    blocks = math.ceil(numel / blocksize)
    return (numel + 1) // 2 + blocks + 4 * math.ceil(blocks / nested_blocksize) + 4 * 256 + 4 + 4 * 16


def per_gpu(total: int, gpus: int) -> int:
    """One GPU's share of ``total`` bytes divided over ``gpus`` (rounded up: the first ranks hold the remainder)."""
    return -(-total // gpus)


def gathered_bytes(shard: str, largest_unit: int, root_unit: int, unit_elements: int, total_elements: int,
                   element_bytes: int) -> int:
    """Full (unsharded) weights one GPU holds at once while a sharded step runs. FSDP2: the root unit (the
    parameters in no wrapped module: embeddings, LM head, final norm), which the root keeps gathered from its forward
    to its backward, plus two of the largest wrapped unit (the one computing and the next, prefetched). ZeRO-3:
    gathered parameters are kept while they will be reused, up to ``ZERO3_MAX_LIVE_PARAMETERS`` elements, and at
    least the largest unit."""
    if shard == "fsdp2":
        return root_unit + 2 * largest_unit
    live = min(total_elements, max(ZERO3_MAX_LIVE_PARAMETERS, unit_elements))
    return live * element_bytes


def int8_bytes(out_features: int, in_features: int) -> int:
    """LLM.int8: int8 weight plus an fp32 scale per output row."""
    return out_features * in_features + 4 * out_features


# -------------------------------------------------------------------------------------------- activations
#: the phases of each mode whose peaks are measured and modelled apart; a step's peak is the largest of them
PHASES = {
    "train": ("forward", "head", "backward"),
    "train_gc": ("forward", "head", "backward"),
    "generate": ("prefill",),
}


#: which features a fit may use (``benchmarks/memory_calibration.py --features``); the planner uses the features
#: its coefficients name. ``basic``: the decoder's per-token and attention-score terms and the logits;
#: ``detailed`` adds the K/V projections, the attention mask (batch x tokens², not per head), the vision tower
#: (patches x its width and MLP width: the tower runs once, without gradients, in the forward pass) and the
#: optimizer step's temporaries (per trainable parameter, at the end of the backward phase).
FEATURE_SETS = {
    "basic": ("token_layer_hidden", "token_layer_mlp", "layer_attention", "token_hidden", "token_mlp",
               "attention", "logit"),
    "detailed": ("token_layer_hidden", "token_layer_mlp", "token_layer_kv", "layer_attention", "token_hidden",
                 "token_mlp", "token_kv", "attention", "mask", "patch_hidden", "patch_mlp", "logit", "step"),
}


def activation_features(shape: Shape, batch: int, tokens: int, logit_tokens: int, mode: str,
                        patches: int = 0) -> dict[str, float]:
    """The element counts activation memory is modelled as linear in, per phase of the step (keys
    ``phase:feature``; the fitted coefficients are bytes per element, and the activations of a step are the largest
    phase total). ``tokens``: sequence length; ``logit_tokens``: positions the LM head runs on; ``patches``: vision
    patches of one sample.

    A training step has three phases, split where the LM head's input is computed and where its gradient is:
    ``forward`` (towers, embeddings, decoder layers), ``head`` (LM head, loss and their backward: the logits),
    ``backward`` (the decoder layers' backward, then the optimizer step). Without checkpointing every phase holds
    the saved activations of all layers (``token_layer_*``, ``layer_attention``) plus its own transient: one
    layer's attention scores (``attention``) and MLP in forward and backward, the vision tower in forward, the
    logits in the head. With checkpointing only the layer inputs stay (``token_layer_hidden``); forward and
    backward add one layer's activations, recomputed (``token_hidden``, ``token_mlp``, ``token_kv``,
    ``attention``), the head adds the logits; the backward phase ends with the optimizer step's temporaries
    (``step``). Generation is one phase, the prefill (the KV cache is exact, outside this model).
    ``FEATURE_SETS`` names the subsets a fit may use."""
    bt = batch * tokens
    scores = batch * shape.heads * tokens * tokens  # attention scores of one layer, if a kernel materialises them
    kv = 2 * shape.kv_heads * shape.head_dim
    layer = {"token_hidden": bt * shape.hidden, "token_mlp": bt * shape.intermediate, "token_kv": bt * kv,
             "attention": scores}
    saved_inputs = {"token_layer_hidden": bt * shape.layers * shape.hidden}
    saved_all = {**saved_inputs, "token_layer_mlp": bt * shape.layers * shape.intermediate,
                 "token_layer_kv": bt * shape.layers * kv, "layer_attention": scores * shape.layers}
    logits = {"logit": batch * logit_tokens * shape.vocab}
    hidden = {"token_hidden": bt * shape.hidden}  # outside the layers: embeddings, spliced towers, final norm
    mask = {"mask": batch * tokens * tokens}
    step = {"step": shape.trainable}
    tower = {"patch_hidden": batch * patches * shape.vision_hidden,
             "patch_mlp": batch * patches * shape.vision_intermediate}
    if mode == "train":
        phases = {"forward": {**saved_all, **layer, **mask, **tower},
                  "head": {**saved_all, **hidden, **mask, **logits},
                  "backward": {**saved_all, **layer, **mask, **step}}
    elif mode == "train_gc":
        phases = {"forward": {**saved_inputs, **layer, **mask, **tower},
                  "head": {**saved_inputs, **hidden, **mask, **logits},
                  "backward": {**saved_inputs, **layer, **mask, **step}}
    elif mode == "generate":
        phases = {"prefill": {**layer, **mask, **tower,
                              "logit": batch * (1 if shape.logits_to_keep else tokens) * shape.vocab}}
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return {f"{phase}:{name}": value for phase, features in phases.items() for name, value in features.items()}


def phase_totals(coefficients: dict[str, float], features: dict[str, float]) -> dict[str, float]:
    """Fitted bytes of each phase: the sum of coefficient x count over the phase's features."""
    totals: dict[str, float] = {}
    for key, value in features.items():
        phase = key.split(":", 1)[0]
        totals[phase] = totals.get(phase, 0.0) + coefficients.get(key, 0.0) * value
    return totals


def regime(quantization: str | None, dtype: str) -> str:
    """Which calibration applies: the storage / compute precision of the run."""
    if quantization:
        return "4bit"
    return "float32" if dtype == "float32" else "bfloat16"


def load_coefficients(path: Path = COEFFICIENTS_FILE) -> dict:
    if not path.is_file():
        raise PlanError(f"{path} is missing: run python benchmarks/memory_calibration.py to measure it")
    return json.loads(path.read_text())


def pick_fit(coefficients: dict, device: str, regime_name: str, mode: str) -> tuple[dict, str]:
    """The fitted coefficients for (device, regime, mode) and a note on where they come from."""
    fits = coefficients.get("fits", {})
    entry = fits.get(device, {}).get(regime_name, {}).get(mode)
    if entry:
        return entry, f"measured on {device} ({entry.get('measured_on', 'see memory_coefficients.json')})"
    for other in ("cpu", "cuda"):
        entry = fits.get(other, {}).get(regime_name, {}).get(mode)
        if entry:
            return entry, f"no {device} calibration yet: {other} fit ({entry.get('measured_on', '')})"
    raise PlanError(f"memory_coefficients.json has no fit for {regime_name} {mode}: rerun "
                    "benchmarks/memory_calibration.py")


def fitted_bytes(fit: dict, features: dict[str, float]) -> int:
    """Activation bytes of a step: its largest phase."""
    return int(max(phase_totals(fit["coefficients"], features).values(), default=0.0))
