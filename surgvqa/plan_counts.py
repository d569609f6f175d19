"""What a planned run holds, counted exactly: its settings (``PlanArguments``), the tokens of one sample from the
backbone's own processor arithmetic, and parameters and bytes per module group from the model built on the meta
device, as our loading code stores them. ``surgvqa.plan`` turns the counts into a plan.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from surgvqa.memory_model import (
    DTYPE_BYTES,
    GROUPS,
    OPTIMIZER_STATE,
    SHARDING,
    PlanError,
    Shape,
    int8_bytes,
    nf4_bytes,
    parse_bytes,
)
from surgvqa.preprocessing import Preprocessing

if TYPE_CHECKING:
    from surgvqa.backbones.base import PlanLayout as Layout

DEFAULT_QUESTION = "Is the scope advancing or withdrawing in this clip?"
DEFAULT_ANSWER = "The scope is withdrawing."


# ---------------------------------------------------------------------------------------------- arguments
@dataclass(kw_only=True)
class PlanArguments(Preprocessing):
    """The planner's flags: every :class:`~surgvqa.preprocessing.Preprocessing` field (inherited, as training
    takes them: frame size or pixel budget, question modality, frames as video/images, token merging), then these."""

    model: str = field(metadata={"help": "checkpoint directory (config.json) or a config JSON (configs/models/)"})
    processor: str | None = field(default=None, metadata={
        "help": "directory holding the processor (tokenizer, chat template); default: --model when it has one"})
    backbone: str | None = field(default=None, metadata={"help": "registry name; default: from the config"})
    frames: int = field(default=8, metadata={"help": "frames per clip (after subsampling)"})
    source_size: str = field(default="1352x1080", metadata={
        "help": "WIDTHxHEIGHT of the frames on disk (REAL-Colon: 1352x1080); sets the aspect ratio"})
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
    use_dora: bool = field(default=False, metadata={
        "help": "DoRA: a trained magnitude per output of each adapted Linear, and one layer's W + BA at a time for "
                "its norm"})
    lora_dropout: float = field(default=0.05)
    lora_target_regex: str | None = field(default=None, metadata={"help": "default: the backbone's"})
    lora_experts: bool = field(default=False, metadata={"help": "MoE backbones: LoRA on the fused experts too"})
    train_projectors: bool = field(default=False, metadata={"help": "also train the multimodal projectors"})
    optim: str = field(default="adamw_torch_fused", metadata={"help": " | ".join(OPTIMIZER_STATE)})
    logits: str = field(default="labelled", metadata={
        "help": "labelled: the LM head runs on the labelled (answer) positions only, as training does by default | "
                "full: on every position (training with --loss_on_labelled_only False)"})
    model_max_length: int = field(default=4096, metadata={"help": "longest sequence training accepts"})
    gpus: int = field(default=1, metadata={
        "help": "GPUs (processes) the run trains on; without --shard each holds everything (DDP) and the plan is "
                "that of one GPU"})
    shard: str | None = field(default=None, metadata={
        "help": "fsdp2 | zero3: weights (the frozen base too), LoRA parameters, gradients and optimizer state "
                "divided over --gpus, plus the full weights being gathered; activations per GPU unchanged"})
    budget: str | None = field(default=None, metadata={"help": "GPU memory, e.g. 40GiB, 24GB: search what fits"})
    overhead: str = field(default="1GiB", metadata={
        "help": "added to every total before comparing with --budget: CUDA context, cuBLAS workspace, allocator "
                "slack (the totals themselves are allocated tensor bytes, like torch.cuda.max_memory_allocated)"})
    device: str = field(default="cuda", metadata={"help": "which calibration to use: cuda | cpu"})
    cv: int | None = field(default=None, metadata={
        "help": "leave-one-video-out (surgvqa cv) over this many videos: state what its folds cost"})
    steps_per_fold: int | None = field(default=None, metadata={"help": "training steps of one fold (with --cv)"})
    seconds_per_step: float | None = field(default=None, metadata={
        "help": "a MEASURED training step time in seconds (e.g. train_runtime / steps of a short run): with --cv and "
                "--steps_per_fold the plan states the training hours; never guessed"})
    json: bool = field(default=False, metadata={"help": "print the plan as one JSON object"})

    def validate(self) -> None:
        self.check(PlanError)
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
        if self.frames < 1 or self.batch < 1 or self.eval_batch < 1 or self.max_new_tokens < 1:
            raise PlanError("--frames, --batch, --eval_batch and --max_new_tokens must be >= 1")
        if self.lora_r < 1:
            raise PlanError("--lora_r must be >= 1")
        if self.gpus < 1:
            raise PlanError(f"--gpus must be >= 1; got {self.gpus}")
        if self.shard is not None:
            if self.shard not in SHARDING:
                raise PlanError(f"--shard must be one of {', '.join(SHARDING)}; got {self.shard!r}")
            if self.gpus == 1:
                raise PlanError(f"--shard {self.shard} with --gpus 1: there is nothing to divide the model over; pass "
                                "--gpus N (N >= 2) or drop --shard")
            if self.quantization:
                raise PlanError(
                    f"--shard {self.shard} with --load_in_{self.quantization[0]}bit: training loads 4/8-bit weights as "
                    "bitsandbytes stores them by default (uint8), which FSDP2 leaves out of sharding (accelerate "
                    "keeps every GPU's full copy) and ZeRO-3 cannot partition; plan 4/8-bit on one GPU each "
                    "(--gpus N, DDP), or bf16 weights with --shard")
        source_hw(self.source_size)
        parse_bytes(self.overhead)
        if self.budget is not None:
            parse_bytes(self.budget)

    @property
    def quantization(self) -> str | None:
        return "4bit" if self.load_in_4bit else "8bit" if self.load_in_8bit else None


def source_hw(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise PlanError(f"--source_size must be WIDTHxHEIGHT, e.g. 1352x1080; got {text!r}")
    return int(match[2]), int(match[1])


# -------------------------------------------------------------------------------------------------- model
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


def backbone_to_plan(config: dict, backbone_name: str | None = None):
    """The backbone named, or the one that plans ``config`` (``Backbone.plans``)."""
    from surgvqa.backbones import BACKBONES, available, get_backbone

    if backbone_name:
        return get_backbone(backbone_name)
    for backbone in BACKBONES.values():
        if backbone.plans(config):
            return backbone
    raise PlanError(f"no backbone plans model_type {config.get('model_type')!r}: pass --backbone "
                    f"({', '.join(available())}) or a config.json of a checkpoint one of them loads")


def layout_for(config: dict, backbone_name: str | None = None) -> Layout:
    return backbone_to_plan(config, backbone_name).plan_layout(config)


def build_config(config: dict, checkpoint: Path | None, backbone_name: str | None = None):
    """A transformers config object of what the backbone loads (offline: from the dict)."""
    return backbone_to_plan(config, backbone_name).plan_config(config, checkpoint)


def meta_model(config):
    """The model on the meta device: exact shapes, no memory, no weights."""
    return backbone_to_plan({"model_type": config.model_type}).plan_model(config)


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
    # MoE: a token's MLP activations are those of its routed experts (k x expert width), not the dense width
    routed = getattr(text, "num_experts_per_tok", 0) * getattr(text, "moe_intermediate_size", 0)
    return Shape(
        layers=text.num_hidden_layers, hidden=text.hidden_size, intermediate=routed or text.intermediate_size,
        heads=heads,
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


def kbit_training_dtype(compute: str, module=None) -> str:
    """dtype of an unquantized floating parameter of ``module`` once training prepares a 4/8-bit model
    (``backbones.common.quantization.prepare_quantized_for_training``, called by ``surgvqa.train.build_model``): fp32
    in the norms, the compute dtype everywhere else (towers, embeddings, lm_head, biases). Evaluation loads without
    the preparation and keeps the compute dtype throughout."""
    from surgvqa.backbones.common.quantization import is_norm

    return "float32" if module is not None and is_norm(module) else compute


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    """transformers' rule for ``llm_int8_skip_modules`` (``modules_to_not_convert``)."""
    return any(key + "." in name or key == name for key in skip)


@dataclass
class GroupRow:
    group: str
    params: int
    train_bytes: int
    eval_bytes: int
    trainable: int = 0


def weights(model, layout: Layout, args: PlanArguments) -> list[GroupRow]:
    """Parameters and bytes per module group, as loaded for training and for evaluation. Fused MoE experts are
    their own group, stored as their backbone loads them (NF4 per expert under 4-bit, codes and constants)."""
    from torch import nn

    from surgvqa.backbones import get_backbone

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
            if _is_expert(name, layout):
                stored = get_backbone(layout.backbone).expert_stored_bytes(tuple(param.shape), quant) or plain
                row = rows["MoE experts"]
                row.params += numel
                row.train_bytes += stored
                row.eval_bytes += stored
                continue
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


@dataclass
class ShardUnits:
    """How FSDP2 / ZeRO-3 see the model: units of parameters gathered together (accelerate wraps each module whose
    class the model lists in ``_no_split_modules``; everything outside them is the root unit)."""

    largest_bytes: int  # the largest wrapped unit, as stored for training
    largest_elements: int
    largest_class: str
    root_bytes: int
    total_elements: int
    wrapped: int  # how many wrapped units


def shard_units(model, layout: Layout, args: PlanArguments) -> ShardUnits:
    """Each parameter counted in the innermost wrapped module holding it (or the root), in the training dtype."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    units = {name: type(m).__name__ for name, m in model.named_modules() if type(m).__name__ in classes and name}
    sizes: dict[str, list[int]] = {name: [0, 0] for name in units}
    root = total = 0
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        dtype = "float32" if _skipped(module_name, layout.fp32_modules) else args.dtype
        parts = module_name.split(".")
        owner = next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in units), None)
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            nbytes = param.numel() * DTYPE_BYTES[dtype]
            total += param.numel()
            if owner is None:
                root += nbytes
            else:
                sizes[owner][0] += nbytes
                sizes[owner][1] += param.numel()
    largest = max(sizes, key=lambda name: sizes[name][0], default=None)
    return ShardUnits(
        largest_bytes=sizes[largest][0] if largest else 0, largest_elements=sizes[largest][1] if largest else 0,
        largest_class=units[largest] if largest else "-", root_bytes=root, total_elements=total, wrapped=len(units))


def _group(name: str, layout: Layout) -> str:
    if any(name.startswith(p + ".") for p in layout.projectors):
        return "projectors"
    for group, prefix in layout.towers.items():
        if name.startswith(prefix + "."):
            return group
    return "LLM layers"


def largest_quantized_linear(model, layout: Layout) -> int:
    """Elements of the largest weight bitsandbytes quantizes (dequantized to the compute dtype per matmul); for
    fused MoE experts one expert's matrix (they are dequantized one expert at a time)."""
    linear = max(
        (m.weight.numel() for n, m in model.named_modules()
         if type(m).__name__ == "Linear" and n.startswith(layout.quantized_root)
         and not _skipped(n.removeprefix(layout.quantized_root), layout.quant_skip)),
        default=0)
    expert = max((p[0].numel() for n, p in model.named_parameters() if _is_expert(n, layout)), default=0)
    return max(linear, expert)


def _is_expert(name: str, layout: Layout) -> bool:
    return bool(layout.experts) and name.endswith(tuple("." + suffix for suffix in layout.experts))


def expert_lora_update_bytes(model, layout: Layout, args: PlanArguments) -> int:
    """--lora_experts: what one MoE layer holds for its expert LoRA during its forward and backward: the update of
    its stacks (experts x rows x cols, fp32, built by PEFT) and, in the worst case of every expert routed, each
    expert's weight plus update in the compute dtype, kept for the backward (0 without expert LoRA)."""
    if not args.lora_experts:
        return 0
    stacks = [p.numel() for n, p in model.named_parameters() if _is_expert(n, layout)]
    per_layer = sum(stacks) // max(1, model.config.get_text_config().num_hidden_layers)
    return per_layer * (4 + DTYPE_BYTES[args.dtype])


def moe_counts(model, layout: Layout, groups: list[GroupRow]) -> dict | None:
    """Fused MoE experts: their parameters, and the language-model parameters a token runs through (layers,
    embeddings, LM head, and k of E experts per MoE layer; towers not counted); None for dense models."""
    if not layout.experts:
        return None
    text = model.config.get_text_config()
    experts = sum(p.numel() for n, p in model.named_parameters() if _is_expert(n, layout))
    language = sum(g.params for g in groups if g.group in ("LLM layers", "embeddings", "lm_head"))
    routed, count = text.num_experts_per_tok, text.num_experts
    return {"expert_params": experts, "experts": count, "routed_per_token": routed,
            "active_params": language + experts * routed // count}


def adapted_linears(model, layout: Layout, args: PlanArguments) -> list:
    """The Linear layers PEFT's regex (``re.fullmatch``) selects for LoRA."""
    from torch import nn

    regex = args.lora_target_regex or layout.lora_target_regex
    linears = [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(regex, name)]
    if not linears:
        raise PlanError(f"the LoRA regex {regex!r} matches no Linear layer of this model")
    return linears


def lora_params(model, layout: Layout, args: PlanArguments) -> int:
    """Parameters LoRA adds: r x (in + out) for every adapted Linear, plus its out magnitudes with DoRA; with
    --lora_experts, r x experts x (rows + cols) for every fused expert stack (PEFT's target_parameters)."""
    total = sum(args.lora_r * (m.in_features + m.out_features) + (m.out_features if args.use_dora else 0)
                for m in adapted_linears(model, layout, args))
    if args.lora_experts:
        stacks = [p.shape for n, p in model.named_parameters() if _is_expert(n, layout)]
        if not stacks:
            raise PlanError(f"--lora_experts: backbone {layout.backbone!r} has no MoE experts")
        total += sum(args.lora_r * experts * (rows + cols) for experts, rows, cols in stacks)
    return total


def dora_norm_elements(model, layout: Layout, args: PlanArguments) -> int:
    """Elements of the largest W + BA DoRA forms for its weight norm (one layer at a time; 0 without DoRA)."""
    if not args.use_dora:
        return 0
    return max(m.in_features * m.out_features for m in adapted_linears(model, layout, args))


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
def load_processor(args: PlanArguments, checkpoint: Path | None, backbone, config: dict):
    """The processor ``backbone`` plans ``config`` with (``--processor``, else the checkpoint's own)."""
    where = Path(args.processor) if args.processor else checkpoint
    if where is None or not any((where / f).is_file() for f in (
            "tokenizer_config.json", "tokenizer.json", "processor_config.json", "preprocessor_config.json")):
        raise PlanError(
            f"{args.processor or args.model} holds no processor (tokenizer, chat template): pass --processor DIR, "
            "the checkpoint you will train or a tiny model with the real Qwen vocabulary, whose token counts equal "
            "the 7B's (python scripts/make_tiny_model.py --vocab qwen --output_dir runs/tiny-omni-qwen)"
        )
    try:
        return backbone.plan_processor(str(where), config)
    except (OSError, ValueError, KeyError) as err:  # e.g. a tokenizer without the image / audio processor
        flag = f"--processor {args.processor}" if args.processor else f"--model {args.model}"
        first = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else type(err).__name__
        raise PlanError(
            f"{flag}: {where} holds no complete processor ({first}); the plan needs the tokenizer, the image and "
            "the audio processor: pass --processor DIR with a saved processor (the checkpoint you will train, or "
            "python scripts/make_tiny_model.py --vocab qwen --output_dir runs/tiny-omni-qwen)"
        ) from err


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
    from surgvqa.backbones.common.token_merging import kept_video_tokens
    from surgvqa.collate import VQACollator
    from surgvqa.media import PixelBudget

    frames = frames or args.frames
    preprocessing = Preprocessing.of(args)
    if frame_size is not None:  # a longest edge searched for replaces the pixel budget
        preprocessing = dataclasses.replace(preprocessing, frame_size=frame_size, max_pixels=None, min_pixels=None)
    height, width = source_hw(args.source_size)
    with_audio = "audio" in args.question_modality
    # unmerged counts from the collator: the vision tower sees every patch; merging is applied below
    collator = VQACollator(processor, mode=mode, **{**preprocessing.collator_kwargs(), "token_kept_ratio": 1.0})
    grid = collator.processing.grid  # the backbone's vision grid: 28 px (Qwen2/2.5), 32 px (Qwen3)
    w, h = PixelBudget(preprocessing.frame_size, preprocessing.max_pixels, preprocessing.min_pixels,
                       grid).target_size(width, height)
    samples = round(args.audio_seconds * 16000) if with_audio else None
    if with_audio and not collator.processing.takes_audio:
        raise PlanError("this model has no audio tower: plan it with --question_modality text")
    counts = collator.token_counts(args.question, args.answer, (h, w), frames, samples)
    video = kept_video_tokens(counts["video"], args.token_kept_ratio) if counts["video"] else 0
    patches = (counts["video"] + counts["image"]) * collator.processing.patches_per_token
    mel = math.ceil(samples / 160) if samples else 0
    return Tokens(video=video, image=counts["image"], audio=counts["audio"], text=counts["text"],
                  answer=counts["answer"], total=counts["total"] - counts["video"] + video, frame_hw=(h, w),
                  patches=patches, mel_frames=mel)
