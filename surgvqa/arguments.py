"""The flags: training's dataclasses, the parser (every Hugging Face ``TrainingArguments`` flag too; or a YAML/JSON
recipe file followed by flags that override it) and :func:`validate_args`, which refuses every unsupported
combination before anything heavy happens; and evaluation's :class:`EvalArguments`.

``SurgvqaTrainingArguments`` (:mod:`surgvqa.training_args`) is imported only when arguments are parsed: importing
``TrainingArguments`` imports peft, and the command line decides first whether bitsandbytes is needed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import HfArgumentParser

from surgvqa.backbones import LoadOptions
from surgvqa.errors import UserError, existing_dir, existing_file, one_line_errors, parse_dataclasses
from surgvqa.frame_cache import check_frame_cache_settings
from surgvqa.lean_imports import checkpoint_needs_bitsandbytes, is_recipe, recipe_values
from surgvqa.lora import changes_base, check_variants
from surgvqa.preprocessing import Preprocessing, PreprocessingOverrides
from surgvqa.run_config import DEFAULT_MODEL_MAX_LENGTH

if TYPE_CHECKING:
    from transformers import TrainingArguments


logger = logging.getLogger("surgvqa.train")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="Qwen/Qwen2.5-Omni-7B", metadata={"help": "local model directory (full Omni or thinker-only)"}
    )
    backbone: str | None = field(default=None, metadata={"help": "registry name; default: read from config.json"})
    dtype: str = field(default="auto", metadata={"help": "auto | bfloat16 | float16 | float32"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa | eager | flash_attention_2"})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: nf4, double quant, bf16 compute"})
    load_in_8bit: bool = field(default=False, metadata={"help": "8-bit base (LLM.int8)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "only for checkpoints that need custom code"})
    loss_on_labelled_only: bool = field(
        default=True,
        metadata={"help": "apply the LM head only to answer positions (same loss, no full-vocabulary logits for the "
                          "prompt); False: logits for every position"},
    )


@dataclass
class DataArguments(Preprocessing):
    """The data flags: every :class:`~surgvqa.preprocessing.Preprocessing` field (inherited, declared there once),
    then the data's locations and how training reads it."""

    train_data_path: str = field(default=None, metadata={"help": "training JSONL (REAL-Colon-VQA schema)"})
    eval_data_path: str | None = field(default=None, metadata={"help": "evaluation JSONL (held-out video)"})
    frames_dir: str | None = field(default=None, metadata={"help": "root of the frames of the training file"})
    audio_dir: str | None = field(default=None, metadata={"help": "root of the spoken questions (training)"})
    eval_frames_dir: str | None = field(default=None, metadata={"help": "default: --frames_dir"})
    eval_audio_dir: str | None = field(default=None, metadata={"help": "default: --audio_dir"})
    model_max_length: int = field(default=DEFAULT_MODEL_MAX_LENGTH)
    skip_overlong: bool = field(default=False, metadata={"help": "skip (and count) samples longer than the limit"})
    skip_bad_samples: bool = field(default=False, metadata={"help": "skip (and list) samples with bad data"})
    packing: bool = field(
        default=False,
        metadata={"help": "pack several training samples into each row, up to --model_max_length tokens (first fit "
                          "by their pre-flight token counts, in a seeded random order), each with its own M-RoPE "
                          "positions and attention; --per_device_train_batch_size then counts rows. Evaluation never "
                          "packs"},
    )
    allow_changed_data: bool = field(
        default=False,
        metadata={"help": "resume a run although an input it was trained on changed (training or eval data, the "
                          "media its samples use, the base model's weights); the change is recorded in "
                          "surgvqa_config.json (data_changes). Without it such a resume is refused"},
    )
    eval_generate_samples: int = field(
        default=0,
        metadata={"help": "generate on N eval samples (seeded, stratified by question type) each evaluation → "
                          "eval_accuracy; split across processes"},
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={"help": "stop after this many evaluations without improving --metric_for_best_model"},
    )
    eval_max_new_tokens: int = field(default=48)
    eval_batch_size_generate: int = field(default=8)
    frame_cache: str = field(
        default="disk",
        metadata={"help": "none | memory | disk: decode and resize each frame once, then read it back every epoch"},
    )
    frame_cache_dir: str | None = field(
        default=None, metadata={"help": "disk frame cache location (default: <output_dir>/frame_cache)"}
    )
    frame_cache_max_gb: float | None = field(
        default=None, metadata={"help": "frame cache bound (default: 32 on disk, 4 in memory)"}
    )
    encoding_cache_gb: float | None = field(
        default=None,
        metadata={"help": "keep each training sample's encoding (prompt ids, pixel values, audio features) in memory, "
                          "up to this many GB, until its last read of the run; 0: off (default: 2 with "
                          "--dataloader_num_workers 0 or persistent workers, else 0)"},
    )
    tower_cache_gb: float | None = field(
        default=None,
        metadata={"help": "keep the frozen towers' outputs and M-RoPE positions of each training sample up to this "
                          "many GB (Qwen2.5-Omni; refused by a family that keeps none); 0: off (default, set apart from "
                          "--encoding_cache_gb: 2 with --dataloader_num_workers 0 or persistent workers and more "
                          "than one epoch, else 0)"},
    )


@dataclass
class LoraArguments:
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_regex: str | None = field(default=None, metadata={"help": "default: the backbone's LLM regex"})
    train_projectors: bool = field(default=False, metadata={"help": "also train the multimodal projectors"})
    lora_vision_tower: bool = field(default=False, metadata={"help": "also put LoRA on the vision tower"})
    lora_experts: bool = field(default=False, metadata={
        "help": "MoE backbones: also put LoRA on the fused experts (PEFT target_parameters; the router stays frozen)"})
    router_aux_loss_coef: float = field(default=0.0, metadata={
        "help": "MoE backbones: weight of the router's load-balancing loss added to the LM loss (0: not computed; "
                "the router is frozen, so it only steers the adapters)"})
    stage: int | None = field(default=None, metadata={"help": "staged backbones: 1 = projector only, 2 = LoRA"})
    init_from: str | None = field(default=None, metadata={"help": "stage 2: the stage-1 output directory"})
    use_dora: bool = field(default=False, metadata={"help": "DoRA: LoRA on the direction, a trained magnitude per "
                                                          "output (PEFT's use_dora)"})
    use_rslora: bool = field(default=False, metadata={"help": "rsLoRA: scale LoRA by alpha / sqrt(r), not alpha / r"})
    init_lora_weights: str = field(default="default", metadata={
        "help": "LoRA's starting point: default | gaussian | pissa | pissa_niter_N | olora (PEFT's) | loftq (with "
                "--load_in_4bit: LoRA starts at the nf4 quantization error). PiSSA and OLoRA rewrite the base; the "
                "final adapter is converted to apply to the original base"})
    loraplus_lr_ratio: float | None = field(default=None, metadata={
        "help": "LoRA+: the B matrices learn at this multiple of --learning_rate (16 in the LoRA+ paper); as PEFT's "
                "LoRA+ does, so does every 1-D trainable parameter (DoRA magnitudes, trained projectors' biases)"})


# evaluate_checkpoint.py's flags (surgvqa.evaluate); every preprocessing flag defaults to the checkpoint's record
@dataclass
class EvalArguments(PreprocessingOverrides):
    """evaluate_checkpoint.py's flags: every Preprocessing field (default: as the checkpoint recorded), then these."""

    checkpoint_path: str | None = field(default=None, metadata={"help": "adapter dir, merged model or base model"})
    eval_data_path: str | None = field(default=None)
    frames_dir: str | None = field(default=None)
    audio_dir: str | None = field(default=None)
    output_file: str | None = field(
        default=None,
        metadata={"help": "predictions JSONL (summary beside it: PRED.summary.json). With --score_predictions "
                          "use --summary_file (--output_file still names the summary there, with a warning)"},
    )
    summary_file: str | None = field(
        default=None,
        metadata={"help": "with --score_predictions: where the re-scored summary JSON goes (default: "
                          "PRED.rescored.summary.json beside the predictions file)"},
    )
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --output_file (at the end)"})
    base_model_path: str | None = field(default=None, metadata={"help": "override the adapter's recorded base"})
    backbone: str | None = field(default=None)
    allow_default_preprocessing: bool = field(
        default=False, metadata={"help": "a checkpoint without surgvqa_config.json: use the default preprocessing"}
    )
    batch_size: int = field(default=8)
    max_new_tokens: int = field(default=64)
    baseline: str | None = field(
        default=None,
        metadata={"help": "'majority' (default), 'chance' or a number such as 0.46; re-scoring: the run's"},
    )
    limit: int | None = field(default=None, metadata={"help": "evaluate only the first N samples"})
    dtype: str = field(default="auto")
    attn_implementation: str = field(default="sdpa")
    load_in_4bit: bool = field(default=False)
    trust_remote_code: bool = field(default=False)
    resume: bool = field(
        default=False,
        metadata={"help": "continue <output>.partial (or <output>) when its meta line matches this run"},
    )
    ablate: str | None = field(
        default=None,
        metadata={"help": "video (one constant frame for all) | video_shuffle (another sample's frames) | audio "
                          "(silence) | audio_shuffle (another sample's audio) | both (video + audio)"},
    )
    ablation_seed: int = field(default=0, metadata={"help": "seed of the shuffle ablations' donor assignment"})
    compare: str | None = field(
        default=None,
        metadata={"help": "reference run's predictions file (or its summary): paired comparison on the same samples"},
    )
    cluster_by: str | None = field(default=None, metadata={"help": "segment (default) | clip | video | none"})
    cluster_gap: int | None = field(default=None, metadata={"help": "frames between clips of a segment (30)"})
    bootstrap: int | None = field(default=None, metadata={"help": "cluster-bootstrap resamples (default 2000)"})
    bootstrap_seed: int | None = field(default=None, metadata={"help": "seed of the cluster bootstrap (default 0)"})
    score_predictions: str | None = field(
        default=None,
        metadata={"help": "re-score this predictions file with the answer sets of its meta line (no model)"},
    )
    skip_bad_samples: bool = field(default=False)
    plot: str | None = field(default=None, metadata={"help": "write a per-type accuracy PNG here"})
    report: str | None = field(default=None, metadata={"help": "write an HTML report of the run here"})
    device: str | None = field(default=None, metadata={"help": "cpu | cuda (default: cuda when available)"})
    frame_cache: str | None = field(
        default=None,
        metadata={"help": "none | memory | disk (default: the training run's disk frame cache when it still exists, "
                          "otherwise none)"},
    )
    frame_cache_dir: str | None = field(default=None, metadata={"help": "disk frame cache location"})
    frame_cache_max_gb: float | None = field(default=None, metadata={"help": "default: 32 on disk, 4 in memory"})



#: what :func:`parse_args` returns (a string: SurgvqaTrainingArguments is imported only when arguments are parsed)
ArgumentTuple = "tuple[ModelArguments, DataArguments, LoraArguments, SurgvqaTrainingArguments]"


def make_parser() -> HfArgumentParser:
    from surgvqa.training_args import SurgvqaTrainingArguments

    parser = one_line_errors(HfArgumentParser((ModelArguments, DataArguments, LoraArguments, SurgvqaTrainingArguments)))
    parser.prog = "train_vqa.py"
    return parser


def parse_args(argv: list[str] | None = None) -> ArgumentTuple:
    """Flags, or a YAML/JSON file followed by flags that override it (``config.yaml --learning_rate 1e-4``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    if argv and is_recipe(argv[0]):
        parser.set_defaults(**_config_file(parser, argv[0]))
        argv = argv[1:]
    return parse_dataclasses(parser, argv)


def read_recipe(path: str) -> dict[str, Any]:
    """The settings of a training recipe, read and checked as training reads them (an unknown key is an error)."""
    return _config_file(make_parser(), path)


def _config_file(parser: HfArgumentParser, path: str) -> dict[str, Any]:
    """The settings of a YAML/JSON recipe; an unknown key is an error naming it (a typo would be ignored)."""
    import yaml

    file = existing_file(path, "the arguments file")
    text = file.read_text()
    try:
        values = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        raise UserError(f"{file}: not valid {'JSON' if file.suffix == '.json' else 'YAML'} ({err})") from err
    if not isinstance(values, dict):
        raise UserError(f"{file}: expected a mapping of argument names to values")
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"{file}: unknown argument(s) {', '.join(unknown)}; see train_vqa.py --help")
    for action in parser._actions:  # argparse requires required arguments on the command line even with a default
        if action.dest in values:
            action.required = False
    return values


# -------------------------------------------------------------------------------------------------- checks
def sharding_of(args: TrainingArguments) -> str | None:
    """How the run shards its weights over processes: ``--fsdp`` (the flag or ``accelerate launch`` with an FSDP
    config), ``ZeRO-3`` (``--deepspeed`` or ``accelerate launch`` with a stage-3 DeepSpeed config), else None."""
    if args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "--fsdp"
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is not None and plugin.zero_stage == 3:
        return "ZeRO-3"
    return None


def validate_args(model_args: ModelArguments, data_args: DataArguments, lora_args: LoraArguments,
                  args: TrainingArguments) -> None:
    """Refuse unsupported combinations before anything heavy happens."""
    if not data_args.train_data_path:
        raise UserError("--train_data_path is required (the training JSONL); see train_vqa.py --help")
    data_args.check()
    model_path = Path(model_args.model_name_or_path)
    if model_path.exists():  # recorded absolute (surgvqa_config.json and PEFT's adapter_config.json)
        model_args.model_name_or_path = str(model_path.resolve())
    sharding = sharding_of(args)
    if model_args.load_in_4bit or model_args.load_in_8bit:
        if args.fp16:
            raise UserError("QLoRA computes in bf16: use --bf16 True instead of --fp16")
        if lora_args.train_projectors and model_args.load_in_8bit:
            logger.info("projectors stay unquantized under 8-bit loading and are trained in full precision")
        if sharding:
            raise UserError(
                f"{sharding} with --load_in_{'4' if model_args.load_in_4bit else '8'}bit: the 4/8-bit "
                "weights are stored as uint8, which FSDP2 leaves out of sharding (every GPU keeps all of them) and "
                "ZeRO-3 cannot partition; train 4/8-bit with DDP (torchrun, no --fsdp), or shard bf16 weights "
                "(--load_in_4bit False)")
    if sharding and changes_base(lora_args.init_lora_weights):
        raise UserError(
            f"--init_lora_weights {lora_args.init_lora_weights} with {sharding}: the final adapter is "
            "converted to apply to the original base on one process, which holds only its shard of the weights; "
            "train PiSSA/OLoRA with DDP (torchrun, no --fsdp / ZeRO-3) or use --init_lora_weights default")
    check_variants(lora_args, "4bit" if model_args.load_in_4bit else "8bit" if model_args.load_in_8bit else None)
    if data_args.eval_generate_samples and not data_args.eval_data_path:
        raise UserError("--eval_generate_samples needs --eval_data_path")
    if args.metric_for_best_model in ("accuracy", "eval_accuracy") and not data_args.eval_generate_samples:
        raise UserError(
            "--metric_for_best_model accuracy is the generation-scored accuracy: set --eval_generate_samples N"
        )
    if data_args.early_stopping_patience is not None:
        if data_args.early_stopping_patience < 1:
            raise UserError(f"--early_stopping_patience must be >= 1, got {data_args.early_stopping_patience}")
        if not args.metric_for_best_model or args.eval_strategy == "no":
            raise UserError(
                "--early_stopping_patience needs --metric_for_best_model (e.g. eval_accuracy) and an --eval_strategy"
            )
    if getattr(args, "label_smoothing_factor", 0.0):
        raise UserError(
            "--label_smoothing_factor is not supported: the loss is the model's own (or the labelled-only one), which "
            "the Trainer's label smoother does not replace; drop the flag"
        )
    if args.eval_strategy != "no" and not data_args.eval_data_path:
        raise UserError(f"--eval_strategy {args.eval_strategy} needs --eval_data_path")
    if data_args.packing:
        check_packing(model_args, args)
    check_frame_cache_settings(data_args.frame_cache, data_args.frame_cache_max_gb, data_args.frame_cache_dir)
    for flag in ("encoding_cache_gb", "tower_cache_gb"):
        if (getattr(data_args, flag) or 0) < 0:
            raise UserError(f"--{flag} must be >= 0 (0: off), got {getattr(data_args, flag)}")
    if model_args.dtype == "auto":
        model_args.dtype = "bfloat16" if args.bf16 else "float16" if args.fp16 else "float32"
    LoadOptions(dtype=model_args.dtype, attn_implementation=model_args.attn_implementation,
                load_in_4bit=model_args.load_in_4bit, load_in_8bit=model_args.load_in_8bit).validate()
    if (model_args.load_in_4bit or model_args.load_in_8bit) and not args.bf16 and model_args.dtype != "float32":
        # the towers and norms stay unquantized in bf16 / fp32: bf16 autocast runs them together
        raise UserError("QLoRA computes in bf16: add --bf16 True (or --dtype float32 for fp32 compute, e.g. on a CPU "
                        "without AVX-512, whose torch has no bf16 kernels)")
    existing_file(data_args.train_data_path, "--train_data_path")  # paths last: combinations need no files
    if data_args.eval_data_path:
        existing_file(data_args.eval_data_path, "--eval_data_path")
    for name in ("frames_dir", "audio_dir", "eval_frames_dir", "eval_audio_dir"):
        if getattr(data_args, name):
            existing_dir(getattr(data_args, name), f"--{name}")


def check_packing(model_args: ModelArguments, args: TrainingArguments) -> None:
    """The combinations ``--packing`` cannot train with (the family is asked by ``Backbone.check_packing``)."""
    strategy = getattr(args, "train_sampling_strategy", "random")
    if strategy in ("group_by_length", "batch_rebalance"):
        raise UserError(f"--packing with --train_sampling_strategy {strategy}: the packs are already grouped by "
                        "their lengths; use random (the default) or sequential")
    if model_args.attn_implementation == "flash_attention_2" and args.per_device_train_batch_size != 1:
        raise UserError("--packing on flash_attention_2 takes --per_device_train_batch_size 1 (each row already "
                        "holds several samples; FlashAttention-2 finds them in the positions of a single row): set "
                        "it to 1, or use --attn_implementation sdpa")


@dataclass
class _Optimizer:
    optim: str = "adamw_torch"


#: optimizers of ``--optim`` that bitsandbytes implements (8-bit, paged, Lion, AdEMAMix, ...)
_BNB_OPTIM = ("bnb", "8bit", "paged", "lion", "ademamix")


def needs_bitsandbytes(argv: list[str]) -> bool:
    """Whether a training command line quantizes or picks a bitsandbytes optimizer, read by the real parser with
    ModelArguments only (the full parser needs ``TrainingArguments``, whose import imports peft and with it
    bitsandbytes)."""
    parser = HfArgumentParser((ModelArguments, _Optimizer))
    try:
        if argv and is_recipe(argv[0]):
            values = recipe_values(argv[0])
            known = {f.name for f in (*dataclasses.fields(ModelArguments), *dataclasses.fields(_Optimizer))}
            parser.set_defaults(**{k: v for k, v in (values or {}).items() if k in known})
            argv = argv[1:]
        model_args, optimizer, _ = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    except (SystemExit, Exception):  # the full parse reports it
        return True
    return bool(model_args.load_in_4bit or model_args.load_in_8bit
                or any(name in str(optimizer.optim).lower() for name in _BNB_OPTIM)
                or checkpoint_needs_bitsandbytes(model_args.model_name_or_path))


__all__ = ["ArgumentTuple", "DataArguments", "LoraArguments", "ModelArguments", "make_parser", "needs_bitsandbytes",
           "parse_args", "validate_args"]
