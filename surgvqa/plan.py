"""``surgvqa plan``: will this run fit on my GPU?

Tokens per sample come from the backbone's own processor arithmetic (``VQACollator.token_counts``, the collator's
length pre-flight); parameters and bytes per module group from the model built on the meta device from its config,
stored as our loading code stores them (bf16 / fp32, or bitsandbytes 4-bit / 8-bit with towers, projectors and
lm_head unquantized); optimizer state and gradients for the trainable parameters; activations from a per-token
model whose coefficients are fitted to measured peaks (``benchmarks/memory_calibration.py`` writes
``surgvqa/memory_coefficients.json``). With ``--budget`` it searches the largest frame count, frame size and
evaluation batch that fit, for training and evaluation separately.

    surgvqa plan --model configs/models/qwen2_5_omni_7b_thinker.json --processor runs/tiny-omni-qwen \\
        --frames 8 --frame_size 384 --question_modality text+audio --budget 40GiB [--json]
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

COEFFICIENTS_FILE = Path(__file__).with_name("memory_coefficients.json")
GiB = 1024**3
DEFAULT_QUESTION = "Is the scope advancing or withdrawing in this clip?"
DEFAULT_ANSWER = "The scope is withdrawing."
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: optimizer state bytes per trainable parameter: (bytes per element of the parameter's dtype, fixed bytes)
OPTIMIZER_STATE = {
    "adamw_torch": (2, 0),  # exp_avg + exp_avg_sq, in the parameter's dtype
    "adamw_torch_fused": (2, 0),
    "adamw_8bit": (0, 2),  # two uint8 states (+ per-block scales, < 1 %)
    "paged_adamw_8bit": (0, 2),
    "sgd": (0, 0),  # no momentum (Trainer's default for sgd)
}
#: what the planner calls each module group (in table order)
GROUPS = ("LLM layers", "embeddings", "lm_head", "vision tower", "audio tower", "projectors")
MODES = ("train", "train_gc", "generate")


class PlanError(ValueError):
    """A user error: printed as one ``error:`` line."""


# ---------------------------------------------------------------------------------------------- arguments
@dataclass
class PlanArguments:
    model: str = field(metadata={"help": "checkpoint directory (config.json) or a config JSON (configs/models/)"})
    processor: str | None = field(default=None, metadata={
        "help": "directory holding the processor (tokenizer, chat template); default: --model when it has one"})
    backbone: str | None = field(default=None, metadata={"help": "registry name; default: from the config"})
    frames: int = field(default=8, metadata={"help": "frames per clip (after subsampling)"})
    frame_size: int = field(default=384, metadata={"help": "longest frame edge in pixels (the pixel budget)"})
    source_size: str = field(default="1352x1080", metadata={
        "help": "WIDTHxHEIGHT of the frames on disk (REAL-Colon: 1352x1080); sets the aspect ratio"})
    frames_as: str = field(default="video", metadata={"help": "video | images"})
    question_modality: str = field(default="text", metadata={"help": "text | audio | text+audio"})
    audio_seconds: float = field(default=3.0, metadata={"help": "length of a spoken question"})
    question: str = field(default=DEFAULT_QUESTION, metadata={"help": "a representative question"})
    answer: str = field(default=DEFAULT_ANSWER, metadata={"help": "a representative (long) answer"})
    batch: int = field(default=1, metadata={"help": "per-device training batch"})
    eval_batch: int = field(default=8, metadata={"help": "generation batch (evaluate_checkpoint --batch_size)"})
    max_new_tokens: int = field(default=64, metadata={"help": "generation budget (KV cache at its end)"})
    dtype: str = field(default="bfloat16", metadata={"help": "bfloat16 | float16 | float32"})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: nf4, double quant"})
    load_in_8bit: bool = field(default=False, metadata={"help": "8-bit base (LLM.int8)"})
    gradient_checkpointing: bool = field(default=False)
    lora_r: int = field(default=16)
    lora_dropout: float = field(default=0.05)
    lora_target_regex: str | None = field(default=None, metadata={"help": "default: the backbone's"})
    train_projectors: bool = field(default=False, metadata={"help": "also train the multimodal projectors"})
    optim: str = field(default="adamw_torch_fused", metadata={"help": " | ".join(OPTIMIZER_STATE)})
    token_kept_ratio: float = field(default=1.0, metadata={
        "help": "visual token merging: ceil(r x n) video tokens kept per video (1.0 = off)"})
    logits: str = field(default="full", metadata={
        "help": "full: the LM head runs on every position | labelled: on the labelled (answer) positions only"})
    model_max_length: int = field(default=4096, metadata={"help": "longest sequence training accepts"})
    budget: str | None = field(default=None, metadata={"help": "GPU memory, e.g. 40GiB, 24GB: search what fits"})
    overhead: str = field(default="1GiB", metadata={
        "help": "added to every total before comparing with --budget: CUDA context, cuBLAS workspace, allocator "
                "slack (the totals themselves are allocated tensor bytes, like torch.cuda.max_memory_allocated)"})
    device: str = field(default="cuda", metadata={"help": "which calibration to use: cuda | cpu"})
    json: bool = field(default=False, metadata={"help": "print the plan as one JSON object"})

    def validate(self) -> None:
        if self.load_in_4bit and self.load_in_8bit:
            raise PlanError("--load_in_4bit and --load_in_8bit are exclusive: pick one quantization")
        if self.dtype not in DTYPE_BYTES:
            raise PlanError(f"--dtype must be one of {', '.join(DTYPE_BYTES)}; got {self.dtype!r}")
        if (self.load_in_4bit or self.load_in_8bit) and self.dtype == "float32":
            raise PlanError("QLoRA computes in bf16: use --dtype bfloat16 with --load_in_4bit / --load_in_8bit")
        if self.optim not in OPTIMIZER_STATE:
            raise PlanError(f"--optim must be one of {', '.join(OPTIMIZER_STATE)}; got {self.optim!r}")
        if self.logits not in ("full", "labelled"):
            raise PlanError(f"--logits must be full or labelled; got {self.logits!r}")
        if self.device not in ("cuda", "cpu"):
            raise PlanError(f"--device must be cuda or cpu; got {self.device!r}")
        if self.question_modality not in ("text", "audio", "text+audio"):
            raise PlanError(f"--question_modality must be text, audio or text+audio; got {self.question_modality!r}")
        if self.frames < 1 or self.batch < 1 or self.eval_batch < 1 or self.max_new_tokens < 1:
            raise PlanError("--frames, --batch, --eval_batch and --max_new_tokens must be >= 1")
        if not 0.0 < self.token_kept_ratio <= 1.0:
            raise PlanError(f"--token_kept_ratio must be in (0, 1]; got {self.token_kept_ratio}")
        if self.lora_r < 1:
            raise PlanError("--lora_r must be >= 1")
        source_hw(self.source_size)
        parse_bytes(self.overhead)
        if self.budget is not None:
            parse_bytes(self.budget)

    @property
    def quantization(self) -> str | None:
        return "4bit" if self.load_in_4bit else "8bit" if self.load_in_8bit else None


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


def source_hw(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise PlanError(f"--source_size must be WIDTHxHEIGHT, e.g. 1352x1080; got {text!r}")
    return int(match[2]), int(match[1])


# -------------------------------------------------------------------------------------------------- model
@dataclass
class Layout:
    """Where a model family keeps its parts (full module names) and what LoRA wraps."""

    backbone: str
    towers: dict[str, str]  # group name → module prefix
    projectors: tuple[str, ...]
    lora_target_regex: str
    quantized_root: str  # bitsandbytes quantizes Linear layers under this prefix ("" = the whole model)
    quant_skip: tuple[str, ...]  # … except these (relative to quantized_root), as transformers matches them
    never_quantized: tuple[str, ...] = ()  # loaded beside the quantized part, in the compute dtype
    fp32_modules: tuple[str, ...] = ()  # kept in fp32 by the loading code
    always_trained: tuple[str, ...] = ()  # modules_to_save the backbone adds itself


def read_config(model: str) -> tuple[dict, Path | None]:
    """The config dict and the checkpoint directory (None for a bare config JSON)."""
    path = Path(model)
    if path.is_dir():
        file = path / "config.json"
        if not file.is_file():
            raise PlanError(f"{file} not found: --model must be a checkpoint directory or a config JSON")
        return json.loads(file.read_text()), path
    if path.is_file():
        try:
            return json.loads(path.read_text()), None
        except json.JSONDecodeError as err:
            raise PlanError(f"{path}:{err.lineno}: not a JSON config ({err.msg})") from None
    raise PlanError(f"--model {model}: no such file or directory")


def layout_for(config: dict, backbone_name: str | None = None) -> Layout:
    from surgvqa.backbones import get_backbone

    model_type = config.get("model_type")
    if model_type in ("qwen2_vl", "qwen2_5_vl") and backbone_name in (None, "qwen_vl_whisper"):
        # a bare Qwen-VL: the graft's VL part, without the Whisper encoder (names relative to the VL model)
        graft = get_backbone("qwen_vl_whisper")

        def strip(name: str) -> str:
            return name.removeprefix("vl_model.")

        return Layout(
            backbone="qwen_vl (the qwen_vl_whisper graft's VL model, no audio)",
            towers={"vision tower": "model.visual"},
            projectors=tuple(strip(p) for p in graft.projector_modules if p.startswith("vl_model.")),
            lora_target_regex=graft.lora_target_regex.replace(r"vl_model\.", "", 1),
            quantized_root="",
            quant_skip=("model.visual", "lm_head"),
        )
    if backbone_name is None:
        from surgvqa.backbones import BACKBONES

        matches = [b for b in BACKBONES.values() if b.matches(config)]
        if not matches:
            raise PlanError(f"no backbone plans model_type {model_type!r}: pass --backbone "
                            "(qwen2_5_omni, qwen_vl_whisper) or a Qwen2.5-Omni / Qwen-VL config")
        backbone = matches[0]
    else:
        backbone = get_backbone(backbone_name)
    towers = {}
    for prefix in backbone.tower_modules:
        kind = "audio tower" if ("audio" in prefix) else "vision tower"
        towers[kind] = prefix
    if backbone.name == "qwen_vl_whisper":
        return Layout(
            backbone=backbone.name, towers=towers, projectors=tuple(backbone.projector_modules),
            lora_target_regex=backbone.lora_target_regex, quantized_root="vl_model.",
            quant_skip=("model.visual", "lm_head"), never_quantized=("audio_encoder", "audio_projector"),
            fp32_modules=("audio_projector",), always_trained=("audio_projector",),
        )
    return Layout(
        backbone=backbone.name, towers=towers, projectors=tuple(backbone.projector_modules),
        lora_target_regex=backbone.lora_target_regex, quantized_root="",
        quant_skip=(*backbone.tower_modules, *backbone.projector_modules, "lm_head"),
    )


def build_config(config: dict, checkpoint: Path | None):
    """A transformers config object (offline: from the dict)."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type == "qwen_vl_whisper":
        from surgvqa.backbones.qwen_vl_whisper import _model_classes

        if checkpoint is None:
            raise PlanError("a qwen_vl_whisper graft is planned from its directory (create_graft writes it)")
        return _model_classes()["QwenVLWhisperConfig"].from_pretrained(str(checkpoint))
    if model_type not in CONFIG_MAPPING:
        raise PlanError(f"unknown model_type {model_type!r} in the config")
    data = {k: v for k, v in config.items() if k != "model_type"}
    built = CONFIG_MAPPING[model_type].from_dict(data)
    if model_type == "qwen2_5_omni":
        built = built.thinker_config  # the thinker only: the talker is never loaded
    return built


def meta_model(config):
    """The model on the meta device: exact shapes, no memory, no weights."""
    import torch
    import transformers

    model_type = config.model_type
    classes = {
        "qwen2_5_omni_thinker": "Qwen2_5OmniThinkerForConditionalGeneration",
        "qwen2_vl": "Qwen2VLForConditionalGeneration",
        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    }
    if model_type == "qwen_vl_whisper":
        from surgvqa.backbones.qwen_vl_whisper import _model_classes

        cls = _model_classes()["QwenVLWhisperForConditionalGeneration"]
        build = cls
    elif model_type in classes:
        build = getattr(transformers, classes[model_type])._from_config  # imported before the meta context
    else:
        raise PlanError(f"the planner builds {', '.join(classes)} and qwen_vl_whisper; got {model_type!r}")
    with torch.device("meta"):
        return build(config)


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


def model_shape(model) -> Shape:
    import inspect

    config = model.config
    text = config.get_text_config()
    heads = text.num_attention_heads
    vision = getattr(config, "vision_config", None)
    if vision is None and hasattr(config, "vl_config"):
        vision = config.vl_config.vision_config
    patch_dim = 0
    if vision is not None:
        patch_dim = getattr(vision, "in_channels", 3) * vision.temporal_patch_size * vision.patch_size**2
    keeps = "logits_to_keep" in inspect.signature(_generating_model(model).forward).parameters
    return Shape(
        layers=text.num_hidden_layers, hidden=text.hidden_size, intermediate=text.intermediate_size, heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", heads),
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=text.vocab_size, logits_to_keep=keeps,
        vision_hidden=getattr(vision, "hidden_size", 0) if vision else 0,
        vision_intermediate=getattr(vision, "intermediate_size", 0) if vision else 0,
        patch_dim=patch_dim,
    )


def _generating_model(model):
    """The module whose forward generate calls (the graft generates through its VL model)."""
    return getattr(model, "vl_model", model)


# ------------------------------------------------------------------------------------------------ weights
def kbit_training_dtype(compute: str, module=None) -> str:
    """dtype of an unquantized floating parameter of ``module`` once training prepares a 4/8-bit model
    (``surgvqa.backbones.base.prepare_quantized_for_training``, called by ``surgvqa.train.build_model``): fp32 in
    the norms, the compute dtype everywhere else (towers, embeddings, lm_head, biases). Evaluation loads without
    the preparation and keeps the compute dtype throughout."""
    from surgvqa.backbones.base import is_norm

    return "float32" if module is not None and is_norm(module) else compute


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    """transformers' rule for ``llm_int8_skip_modules`` (``modules_to_not_convert``)."""
    return any(key + "." in name or key == name for key in skip)


def nf4_bytes(numel: int, blocksize: int = 64, nested_blocksize: int = 256) -> int:
    """bitsandbytes nf4 with double quantization: packed 4-bit weight, uint8 absmax per block, fp32 absmax per
    nested block, the fp32 nested code (256) and offset, the fp32 nf4 code (16)."""
    blocks = math.ceil(numel / blocksize)
    return (numel + 1) // 2 + blocks + 4 * math.ceil(blocks / nested_blocksize) + 4 * 256 + 4 + 4 * 16


def int8_bytes(out_features: int, in_features: int) -> int:
    """LLM.int8: int8 weight plus an fp32 scale per output row."""
    return out_features * in_features + 4 * out_features


@dataclass
class GroupRow:
    group: str
    params: int
    train_bytes: int
    eval_bytes: int
    trainable: int = 0


def weights(model, layout: Layout, args: PlanArguments) -> list[GroupRow]:
    """Parameters and bytes per module group, as loaded for training and for evaluation."""
    from torch import nn

    compute = args.dtype
    quant = args.quantization
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    special = {id(embed): "embeddings", id(head): "lm_head"}
    rows = {g: GroupRow(g, 0, 0, 0) for g in GROUPS}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:  # tied weights count once
                continue
            seen.add(id(param))
            name = f"{module_name}.{pname}" if module_name else pname
            group = special.get(id(module)) or _group(name, layout)
            numel = param.numel()
            dtype = "float32" if _skipped(module_name, layout.fp32_modules) else compute
            plain = numel * DTYPE_BYTES[dtype]
            quantized = (
                quant is not None and pname == "weight" and isinstance(module, nn.Linear)
                and module_name.startswith(layout.quantized_root)
                and not _skipped(module_name.removeprefix(layout.quantized_root), layout.quant_skip)
                and not _skipped(module_name, layout.never_quantized)
            )
            if quantized:
                stored = nf4_bytes(numel) if quant == "4bit" else int8_bytes(*param.shape)
                train = stored
            else:
                stored = plain
                train = numel * DTYPE_BYTES[kbit_training_dtype(dtype, module)] if quant else plain
            row = rows[group]
            row.params += numel
            row.train_bytes += train
            row.eval_bytes += stored
    return [rows[g] for g in GROUPS if rows[g].params]


def _group(name: str, layout: Layout) -> str:
    if any(name.startswith(p + ".") for p in layout.projectors):
        return "projectors"
    for group, prefix in layout.towers.items():
        if name.startswith(prefix + "."):
            return group
    return "LLM layers"


def lora_params(model, layout: Layout, args: PlanArguments) -> int:
    """Parameters LoRA adds: r x (in + out) for every Linear PEFT's regex (``re.fullmatch``) selects."""
    from torch import nn

    regex = args.lora_target_regex or layout.lora_target_regex
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and re.fullmatch(regex, name):
            total += args.lora_r * (module.in_features + module.out_features)
    if total == 0:
        raise PlanError(f"the LoRA regex {regex!r} matches no Linear layer of this model")
    return total


def trained_module_params(model, layout: Layout, args: PlanArguments) -> tuple[int, int]:
    """(parameters, bytes) of the full-precision copies PEFT trains (``modules_to_save``)."""
    names = set(layout.always_trained) | (set(layout.projectors) if args.train_projectors else set())
    params = nbytes = 0
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        for param in module.parameters():
            params += param.numel()
            dtype = "float32" if (args.quantization or _skipped(name, layout.fp32_modules)) else args.dtype
            nbytes += param.numel() * DTYPE_BYTES[dtype]
    return params, nbytes


# ------------------------------------------------------------------------------------------------- tokens
def load_processor(args: PlanArguments, checkpoint: Path | None, backbone_name: str):
    from surgvqa.backbones import get_backbone

    where = Path(args.processor) if args.processor else checkpoint
    if where is None or not any((where / f).is_file() for f in (
            "tokenizer_config.json", "tokenizer.json", "processor_config.json", "preprocessor_config.json")):
        raise PlanError(
            f"{args.processor or args.model} holds no processor (tokenizer, chat template): pass --processor DIR, "
            "the checkpoint you will train or a tiny model with the real Qwen vocabulary, whose token counts equal "
            "the 7B's (python scripts/make_tiny_model.py --vocab qwen --output_dir runs/tiny-omni-qwen)"
        )
    name = backbone_name if backbone_name in ("qwen2_5_omni", "qwen_vl_whisper") else None
    if name is None:  # a bare Qwen-VL
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(str(where))
    return get_backbone(name).load_processor(str(where))


@dataclass
class Tokens:
    video: int
    image: int
    audio: int
    text: int
    answer: int
    total: int
    frame_hw: tuple[int, int]
    patches: int  # vision patches entering the vision tower per sample
    mel_frames: int


def sample_tokens(processor, args: PlanArguments, frames: int | None = None, frame_size: int | None = None,
                  mode: str = "train") -> Tokens:
    """Tokens of one sample, split by kind, from the collator's own pre-flight arithmetic."""
    from surgvqa.backbones.base import kept_video_tokens
    from surgvqa.collate import VQACollator
    from surgvqa.media import fit_to_budget

    frames = frames or args.frames
    frame_size = frame_size or args.frame_size
    height, width = source_hw(args.source_size)
    w, h = fit_to_budget(width, height, frame_size)
    with_audio = "audio" in args.question_modality
    if with_audio and not hasattr(processor, "feature_extractor"):
        raise PlanError("this model has no audio tower: plan it with --question_modality text")
    collator = VQACollator(processor, question_modality=args.question_modality, frame_size=frame_size,
                           frames_as=args.frames_as, mode=mode)
    samples = round(args.audio_seconds * 16000) if with_audio else None
    counts = collator.token_counts(args.question, args.answer, (h, w), frames, samples)
    video = kept_video_tokens(counts["video"], args.token_kept_ratio) if counts["video"] else 0
    merge = int(getattr(processor.video_processor, "merge_size", 2))
    patches = (counts["video"] + counts["image"]) * merge * merge
    mel = math.ceil(samples / 160) if samples else 0
    return Tokens(video=video, image=counts["image"], audio=counts["audio"], text=counts["text"],
                  answer=counts["answer"], total=counts["total"] - counts["video"] + video, frame_hw=(h, w),
                  patches=patches, mel_frames=mel)


# -------------------------------------------------------------------------------------------- activations
def activation_features(shape: Shape, batch: int, tokens: int, logit_tokens: int, mode: str) -> dict[str, float]:
    """The quantities activation memory is modelled as linear in (element counts; the fitted coefficients are
    bytes per element). ``tokens``: sequence length; ``logit_tokens``: positions the LM head runs on."""
    bt = batch * tokens
    kv = 2 * shape.kv_heads * shape.head_dim
    scores = batch * shape.heads * tokens * tokens  # attention scores of one layer, if a kernel materialises them
    if mode == "train":
        return {"token_layer_hidden": bt * shape.layers * shape.hidden,
                "token_layer_mlp": bt * shape.layers * shape.intermediate,
                "token_layer_kv": bt * shape.layers * kv,
                "layer_attention": scores * shape.layers,
                "logit": batch * logit_tokens * shape.vocab}
    if mode == "train_gc":
        return {"token_layer_hidden": bt * shape.layers * shape.hidden,
                "token_hidden": bt * shape.hidden,
                "token_mlp": bt * shape.intermediate,
                "attention": scores,
                "logit": batch * logit_tokens * shape.vocab}
    if mode == "generate":
        return {"token_hidden": bt * shape.hidden,
                "token_mlp": bt * shape.intermediate,
                "attention": scores,
                "logit": batch * (1 if shape.logits_to_keep else tokens) * shape.vocab}
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def regime(args: PlanArguments) -> str:
    """Which calibration applies: the storage / compute precision of the run."""
    if args.quantization:
        return "4bit"
    return "float32" if args.dtype == "float32" else "bfloat16"


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
    return int(sum(fit["coefficients"].get(name, 0.0) * value for name, value in features.items()))


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


class Planner:
    """Everything that does not change with frames / frame size / batch, built once."""

    def __init__(self, args: PlanArguments):
        args.validate()
        self.args = args
        config, checkpoint = read_config(args.model)
        self.layout = layout_for(config, args.backbone)
        self.config = build_config(config, checkpoint)
        self.model = meta_model(self.config)
        self.shape = model_shape(self.model)
        self.processor = load_processor(args, checkpoint, self.layout.backbone)
        self.groups = weights(self.model, self.layout, args)
        self.lora = lora_params(self.model, self.layout, args)
        self.saved_params, self.saved_bytes = trained_module_params(self.model, self.layout, args)
        if args.quantization:
            self.shape.largest_linear = max(
                (m.weight.numel() for n, m in self.model.named_modules()
                 if type(m).__name__ == "Linear" and n.startswith(self.layout.quantized_root)
                 and not _skipped(n.removeprefix(self.layout.quantized_root), self.layout.quant_skip)),
                default=0)
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
        """input_ids, attention mask, labels (int64), pixel values (fp32) and their cast copy, mel features."""
        ids = 3 * 8 * batch * tokens.total
        pixels = batch * tokens.patches * self.shape.patch_dim * (4 + DTYPE_BYTES[self.args.dtype])
        mel = batch * tokens.mel_frames * 128 * 4
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
            "lm_head_cast": self.lm_head_cast_bytes(),
        }
        return mode, parts, activation_features(self.shape, batch, tokens.total, logit_tokens, mode)

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
        }
        return parts, activation_features(self.shape, batch, tokens.total, tokens.total, "generate")

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

    def train_total(self, tokens: Tokens, batch: int | None = None) -> dict:
        mode, parts, features = self.train_breakdown(tokens, batch)
        fit, _ = pick_fit(self.coefficients, self.args.device, regime(self.args), mode)
        parts["activations"] = fitted_bytes(fit, features)
        return {"mode": mode, "batch": batch or self.args.batch, "sequence": tokens.total, "parts": parts,
                "total": sum(parts.values())}

    def eval_total(self, tokens: Tokens, batch: int | None = None) -> dict:
        parts, features = self.eval_breakdown(tokens, batch)
        fit, _ = pick_fit(self.coefficients, self.args.device, regime(self.args), "generate")
        parts["activations"] = fitted_bytes(fit, features)
        return {"mode": "generate", "batch": batch or self.args.eval_batch, "prompt": tokens.total,
                "max_new_tokens": self.args.max_new_tokens, "parts": parts, "total": sum(parts.values())}

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

        result: dict[str, Any] = {"budget_bytes": parse_bytes(args.budget),
                                  "overhead_bytes": parse_bytes(args.overhead)}
        for name, ok in (("train", train_ok), ("eval", eval_ok)):
            result[name] = {
                "max_frames": _largest(lambda f, ok=ok: ok(f, args.frame_size), step, step, 1024),
                "max_frame_size": _largest(lambda s, ok=ok: ok(args.frames, s), 28, 28, 28 * 96),
            }
        tokens = sample_tokens(self.processor, args, mode="generate")
        result["eval"]["max_batch"] = _largest(lambda b: self.fits(self.eval_total(tokens, b)["total"]), 1, 1, 4096)
        return result

    # -- the plan ----------------------------------------------------------------------------------------
    def plan(self) -> Plan:
        args = self.args
        train_tokens = sample_tokens(self.processor, args, mode="train")
        eval_tokens = sample_tokens(self.processor, args, mode="generate")
        train = self.train_total(train_tokens)
        evaluation = self.eval_total(eval_tokens)
        reg = regime(args)
        calibration = {}
        for mode in (train["mode"], "generate"):
            fit, note = pick_fit(self.coefficients, args.device, reg, mode)
            calibration[mode] = {"regime": reg, "source": note, "coefficients": fit["coefficients"],
                                 "max_error_on_calibration": fit.get("max_abs_rel_error")}
        total_params = sum(g.params for g in self.groups)
        return Plan(
            args=asdict(args),
            model={"backbone": self.layout.backbone, "model_type": self.config.model_type, "params": total_params,
                   "layers": self.shape.layers, "hidden": self.shape.hidden, "vocab": self.shape.vocab},
            tokens=asdict(train_tokens), eval_tokens=asdict(eval_tokens),
            weights=[asdict(g) for g in self.groups], trainable=self.trainable(), train=train, eval=evaluation,
            calibration=calibration, budget=self.search() if args.budget else None,
        )


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
def gib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f} GiB"


def render(plan: Plan) -> str:
    a = plan.args
    t = plan.tokens
    lines = []
    quant = "4-bit nf4" if a["load_in_4bit"] else "8-bit" if a["load_in_8bit"] else a["dtype"]
    h, w = t["frame_hw"]
    lines.append(f"surgvqa plan: {a['model']} ({plan.model['backbone']}, {plan.model['params'] / 1e9:.2f} B params)")
    lines.append(
        f"  {a['frames']} frames x {a['frame_size']} px ({a['source_size']} -> {w}x{h}), {a['question_modality']}"
        + (f" ({a['audio_seconds']:g} s)" if "audio" in a["question_modality"] else "")
        + f", batch {a['batch']}, LoRA r{a['lora_r']}, {quant}, gradient checkpointing "
        + ("on" if a["gradient_checkpointing"] else "off") + f", {a['optim']}, logits {a['logits']}"
        + (f", token_kept_ratio {a['token_kept_ratio']:g}" if a["token_kept_ratio"] != 1.0 else "")
    )
    lines.append("")
    lines.append("tokens per sample (exact, from the processor)")
    lines.append(f"  video {t['video']:>6}   image {t['image']:>4}   audio {t['audio']:>4}   text {t['text']:>4}"
                 f"   total {t['total']:>6}   (answer {t['answer']} labelled; generation prompt "
                 f"{plan.eval_tokens['total']})")
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
              "dequantize": "4/8-bit dequantize", "lm_head_cast": "lm_head bf16 copy", "adapter": "adapter", "kv_cache": "KV cache (exact)"}
    lines.append(f"training: batch {train['batch']} x {train['sequence']} tokens ({train['mode']})")
    for key, value in train["parts"].items():
        if value:
            lines.append(f"  {labels[key]:<24}{gib(value):>12}")
    lines.append(f"  {'total':<24}{gib(train['total']):>12}")
    lines.append(f"evaluation (generation): batch {ev['batch']} x {ev['prompt']} prompt tokens + "
                 f"{ev['max_new_tokens']} new")
    for key, value in ev["parts"].items():
        if value:
            lines.append(f"  {labels[key]:<24}{gib(value):>12}")
    lines.append(f"  {'total':<24}{gib(ev['total']):>12}")
    lines.append("")
    for mode, cal in plan.calibration.items():
        err = cal["max_error_on_calibration"]
        lines.append(f"activations ({mode}, {cal['regime']}): {cal['source']}"
                     + (f"; worst calibration error {100 * err:.1f} %" if err is not None else ""))
    lines.append("totals are allocated tensor bytes (torch.cuda.max_memory_allocated); the GPU also holds the CUDA "
                 "context and allocator slack (--overhead)")
    if plan.budget:
        b = plan.budget
        lines.append("")
        lines.append(f"budget {gib(b['budget_bytes'])} (minus {gib(b['overhead_bytes'])} overhead): "
                     f"train {'fits' if b['train_fits'] else 'does NOT fit'}, "
                     f"eval {'fits' if b['eval_fits'] else 'does NOT fit'}")
        lines.append(f"  train: up to {b['train']['max_frames'] or 'no'} frames at {a['frame_size']} px; up to "
                     f"{b['train']['max_frame_size'] or 'no'} px at {a['frames']} frames "
                     f"(sequence <= --model_max_length {a['model_max_length']})")
        lines.append(f"  eval:  up to {b['eval']['max_frames'] or 'no'} frames at {a['frame_size']} px; up to "
                     f"{b['eval']['max_frame_size'] or 'no'} px at {a['frames']} frames; batch up to "
                     f"{b['eval']['max_batch'] or 'none'} at {a['frames']} frames x {a['frame_size']} px")
    return "\n".join(lines)


def make_plan(args: PlanArguments) -> Plan:
    planner = Planner(args)
    plan = planner.plan()
    if plan.budget is not None:
        plan.budget["train_fits"] = planner.fits(plan.train["total"])
        plan.budget["eval_fits"] = planner.fits(plan.eval["total"])
    return plan


def parse_args(argv: list[str] | None = None) -> PlanArguments:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(PlanArguments, prog="surgvqa plan", description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(list(sys.argv[1:] if argv is None else argv))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        plan = make_plan(args)
    except PlanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(plan), indent=2) if args.json else render(plan))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["PlanArguments", "Planner", "activation_features", "main", "make_plan", "nf4_bytes", "sample_tokens"]
