"""LoRA / QLoRA fine-tuning: argument dataclasses → data check → backbone → PEFT → Trainer → outputs.

Every Hugging Face ``TrainingArguments`` flag works; ours, the parser (flags, or a YAML/JSON recipe file followed by
flags that override it) and the checks of their combinations are in :mod:`surgvqa.arguments`.
What happens to an existing ``--output_dir`` (refused, emptied, resumed) is decided by :mod:`surgvqa.rundir`.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import json
import logging
import math
import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgvqa import __version__
from surgvqa.arguments import (
    DataArguments,
    LoraArguments,
    ModelArguments,
    make_parser,
    needs_bitsandbytes,
    parse_args,
    sharding_of,
    validate_args,
)
from surgvqa.audio import DEFAULT_SAMPLING_RATE, audio_duration
from surgvqa.backbones import LoadOptions, backbone_for
from surgvqa.backbones.common.quantization import prepare_quantized_for_training, upcast_trainable
from surgvqa.collate import OverlongSampleError, VQACollator, frame_times
from surgvqa.data import DataError, MediaConfig, Problem, Sample, SurgicalVQADataset, load_samples
from surgvqa.encoded import EncodedDataset, run_reads
from surgvqa.errors import UserError, run_main
from surgvqa.frame_cache import open_frame_cache
from surgvqa.lean_imports import needs_deepspeed, skip_bitsandbytes, skip_deepspeed
from surgvqa.lora import changes_base, init_loftq, save_converted, save_initial_adapter
from surgvqa.lora import config_kwargs as lora_variant_kwargs
from surgvqa.metrics import build_candidates
from surgvqa.packing import packed_training_set
from surgvqa.preprocessing import Preprocessing
from surgvqa.run_config import CACHE_FIELDS, CONFIG_NAME, RunConfig
from surgvqa.rundir import apply_plan, check_same_inputs, check_same_run, input_fingerprints, plan_output_dir
from surgvqa.tokenizer import repair_tokenizer

if TYPE_CHECKING:
    from transformers import TrainingArguments

    from surgvqa.training_args import SurgvqaTrainingArguments

logger = logging.getLogger("surgvqa.train")


def preprocessing_of(data_args: DataArguments) -> Preprocessing:
    """The run's preprocessing, as recorded in surgvqa_config.json (evaluation defaults to the training frames)."""
    recorded = Preprocessing.of(data_args)
    return dataclasses.replace(recorded, max_eval_frames=recorded.max_eval_frames or recorded.max_train_frames)


def media_config(data_args: DataArguments, *, eval: bool = False) -> MediaConfig:
    frames_dir = (data_args.eval_frames_dir if eval else None) or data_args.frames_dir
    audio_dir = (data_args.eval_audio_dir if eval else None) or data_args.audio_dir
    return preprocessing_of(data_args).media_config(frames_dir, audio_dir, train=not eval)


def load_checked(path: str, media: MediaConfig, skip_bad: bool, scoring: bool = False) -> list[Sample]:
    """Build every Sample up front; report all problems at once (or skip them, listed, with --skip_bad_samples)."""
    samples, problems = load_samples(path, media, require_scoring_fields=scoring, skip_bad=skip_bad)
    if problems:
        logger.warning("%s: skipped %d bad sample(s):\n%s", path, len(problems),
                       "\n".join(f"  {p}" for p in problems[:50]))
    if not samples:
        raise DataError([Problem(source=path, key=None, message="no usable samples")])
    return samples


def drop_overlong(samples: list[Sample], collator: VQACollator, max_frames: int | None, skip: bool,
                  max_length: int) -> tuple[list[Sample], list[int | None]]:
    """Pre-flight: token count per sample from frame headers and audio lengths (nothing decoded); the samples
    kept and their token counts (None for video files: checked when decoded)."""
    from PIL import Image

    from surgvqa.media import subsample_indices

    kept, lengths, overlong = [], [], []
    size_cache: dict[tuple, tuple[int, int]] = {}
    for sample in samples:
        if not sample.frame_paths:  # video files: checked when decoded
            kept.append(sample)
            lengths.append(None)
            continue
        with Image.open(sample.frame_paths[0]) as img:
            raw = img.size
        if raw not in size_cache:  # the collator's own budget function: the size the dataset resizes to
            size_cache[raw] = collator.frame_hw(*raw)
        indices = subsample_indices(len(sample.frame_paths), max_frames)
        audio_len = None
        if sample.audio_path is not None and "audio" in collator.question_modality:
            audio_len = math.ceil(audio_duration(sample.audio_path) * DEFAULT_SAMPLING_RATE)
        times = frame_times({"frames": indices, "frame_indices": indices,
                             "frame_numbers": [sample.extra["frame_numbers"][i] for i in indices]
                             if sample.extra.get("frame_numbers") else None}, collator.fps, collator.video_fps)
        length = collator.sequence_length(sample.question, sample.answer, size_cache[raw], len(indices), audio_len,
                                          times)
        if length > max_length:
            overlong.append(sample)
        else:
            kept.append(sample)
            lengths.append(length)
    if overlong:
        listed = ", ".join(f"{s.key}" for s in overlong[:20])
        if not skip:
            raise OverlongSampleError(
                f"{len(overlong)} sample(s) exceed --model_max_length {max_length}: {listed}. Raise "
                "--model_max_length, lower --frame_size / --max_train_frames, or pass --skip_overlong"
            )
        logger.warning("skipping %d overlong sample(s): %s", len(overlong), listed)
    return kept, lengths


# --------------------------------------------------------------------------------------------------- model
def build_model(model_args: ModelArguments, lora_args: LoraArguments, args: TrainingArguments,
                token_kept_ratio: float = 1.0):
    from peft import LoraConfig

    backbone = backbone_for(model_args.model_name_or_path, model_args.backbone)
    options = LoadOptions(
        dtype=model_args.dtype,
        attn_implementation=model_args.attn_implementation,
        load_in_4bit=model_args.load_in_4bit,
        load_in_8bit=model_args.load_in_8bit,
        trust_remote_code=model_args.trust_remote_code,
    )
    model = backbone.load(model_args.model_name_or_path, options)
    backbone.enable_token_merging(model, token_kept_ratio)
    processor = backbone.load_processor(model_args.model_name_or_path, model_args.trust_remote_code)
    original_rows = model.get_input_embeddings().num_embeddings
    report = repair_tokenizer(processor.tokenizer, model)
    sharding = sharding_of(args)
    if report.resized_embeddings_to is not None and sharding:
        raise UserError(f"{sharding}: the tokenizer repair added embedding rows ({original_rows} -> "
                        f"{report.resized_embeddings_to}), which are saved from the model's weights by one process "
                        "holding only its shard of them; train this base with DDP (torchrun, no --fsdp / ZeRO-3)")

    gc_kwargs = args.gradient_checkpointing_kwargs or {"use_reentrant": False}
    args.gradient_checkpointing_kwargs = gc_kwargs
    if options.quantized:  # only the norms in fp32; towers, embeddings and lm_head stay in the compute dtype
        prepare_quantized_for_training(
            model, gradient_checkpointing=args.gradient_checkpointing, gradient_checkpointing_kwargs=gc_kwargs
        )
    elif args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        model.enable_input_require_grads()

    target = lora_args.lora_target_regex or backbone.lora_target_regex
    if lora_args.lora_vision_tower:
        target = f"({target})|({backbone.vision_lora_regex})"
    lora_config = LoraConfig(
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=target,
        target_parameters=backbone.expert_lora_parameters(model, options) if lora_args.lora_experts else None,
        modules_to_save=list(backbone.projector_modules) if lora_args.train_projectors else None,
        task_type="CAUSAL_LM",
        **lora_variant_kwargs(lora_args),
    )
    backbone.set_router_aux_loss(model, lora_args.router_aux_loss_coef)
    model = backbone.make_trainable(model, lora_config, stage=lora_args.stage, init_from=lora_args.init_from)
    if lora_args.init_lora_weights == "loftq" and hasattr(model, "peft_config"):
        logger.info("LoftQ: %d LoRA pairs start at the nf4 quantization error", init_loftq(
            model, model_args.model_name_or_path))
    if options.quantized:
        upcast_trainable(model)
    if hasattr(model, "peft_config"):
        assert_lora_placement(model, backbone, allow_vision=lora_args.lora_vision_tower)
        model.print_trainable_parameters()
    return model, processor, backbone, report, original_rows


def _from_main_process(args: TrainingArguments, compute):
    """``compute()`` on the main process, its result sent to every other process (the same value everywhere)."""
    import torch.distributed as dist

    if args.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return compute()
    box = [compute() if args.process_index == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _wait_for_every_process(args: TrainingArguments) -> None:
    if args.world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()


def lora_module_names(model) -> list[str]:
    return [name for name, module in model.named_modules() if hasattr(module, "lora_A") and len(module.lora_A)]


def assert_lora_placement(model, backbone, allow_vision: bool = False) -> None:
    """No LoRA inside an encoder tower unless asked for (a plain name list would wrap the vision MLP too)."""
    towers = [t for t in backbone.tower_modules if not (allow_vision and "visual" in t)]
    for name in lora_module_names(model):
        for tower in towers:
            if re.search(rf"(^|\.){re.escape(tower)}\.", name):
                raise UserError(f"--lora_target_regex puts LoRA module {name} inside the tower {tower}: narrow the "
                                "regex to the language model, or pass --lora_vision_tower True to adapt the tower")
    if not lora_module_names(model):
        raise UserError("LoRA matched no module: check --lora_target_regex against model.named_modules()")


# ------------------------------------------------------------------------------------------------- trainer
def stratified_subset(samples: list[Sample], n: int, seed: int) -> list[Sample]:
    """A seeded sample of ``n`` samples, every question type represented in proportion (at least one each when
    ``n`` allows), kept in file order. ``n`` >= len(samples) returns them all."""
    import random
    from collections import defaultdict

    if n >= len(samples):
        return list(samples)
    by_type: dict[str, list[int]] = defaultdict(list)
    for i, sample in enumerate(samples):
        by_type[sample.question_type or ""].append(i)
    types = sorted(by_type)
    base = 1 if n >= len(types) else 0
    quota = dict.fromkeys(types, base)
    room = {t: len(by_type[t]) - base for t in types}
    rest = n - base * len(types)
    shares = {t: rest * room[t] / sum(room.values()) for t in types}
    for t in types:
        quota[t] += math.floor(shares[t])
    for t in sorted(types, key=lambda t: (-(shares[t] - math.floor(shares[t])), t)):  # largest remainders
        if sum(quota.values()) == n:
            break
        if quota[t] < len(by_type[t]):
            quota[t] += 1
    rng = random.Random(seed)
    chosen = [i for t in types for i in rng.sample(by_type[t], quota[t])]
    return [samples[i] for i in sorted(chosen)]


#: the TrainingArguments that change what a run computes (recorded, and compared when a run is resumed)
TRAINING_SETTINGS = (
    "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "weight_decay", "adam_beta1",
    "adam_beta2", "adam_epsilon", "max_grad_norm", "optim", "num_train_epochs", "max_steps",
    "per_device_train_batch_size", "gradient_accumulation_steps", "world_size", "seed", "data_seed", "bf16", "fp16",
    "gradient_checkpointing", "label_smoothing_factor", "neftune_noise_alpha", "optim_args",
    "average_tokens_across_devices", "group_by_length", "dataloader_drop_last",
)
#: RunConfig fields known only once the model is loaded (not compared when a run is resumed)
_MODEL_DERIVED = ("tokenizer_repair", "resized_vocab", "original_vocab_rows", "graft", "surgvqa_version",
                  "schema_version", "base_model_relative", "inputs", "data_changes")  # inputs: check_same_inputs


def training_settings(args: TrainingArguments) -> dict[str, Any]:
    """:data:`TRAINING_SETTINGS` of ``args``, as JSON values."""
    values = {name: getattr(args, name, None) for name in TRAINING_SETTINGS}
    return json.loads(json.dumps(values, default=str))


def run_identity(config: RunConfig) -> dict[str, Any]:
    """What makes two invocations the same run: the recorded settings, less what the loaded model adds and where
    the caches are (:data:`~surgvqa.run_config.CACHE_FIELDS`)."""
    return {k: v for k, v in config.to_dict().items() if k not in _MODEL_DERIVED + CACHE_FIELDS}


def build_run_config(model_args, data_args, lora_args, backbone_name: str, args: TrainingArguments | None = None,
                     report=None, original_rows: int | None = None, model=None) -> RunConfig:
    """The run's surgvqa_config.json; without ``model`` (before it loads) the model-derived fields are empty."""
    rows = model.get_input_embeddings().num_embeddings if model is not None else original_rows
    return RunConfig(
        surgvqa_version=__version__,
        backbone=backbone_name,
        base_model=model_args.model_name_or_path,  # absolute when local (validate_args)
        preprocessing=preprocessing_of(data_args),
        model_max_length=data_args.model_max_length,
        packing=data_args.packing,
        lora=asdict(lora_args),
        quantization="4bit" if model_args.load_in_4bit else "8bit" if model_args.load_in_8bit else None,
        dtype=model_args.dtype,
        tokenizer_repair=list(report.actions) if report is not None else [],
        resized_vocab=rows if rows != original_rows else None,
        original_vocab_rows=original_rows,
        training=training_settings(args) if args is not None else None,
        train_data_path=_resolved(data_args.train_data_path),
        eval_data_path=_resolved(data_args.eval_data_path),
        frames_dir=_resolved(data_args.frames_dir),
        audio_dir=_resolved(data_args.audio_dir),
        eval_frames_dir=_resolved(data_args.eval_frames_dir or data_args.frames_dir),
        eval_audio_dir=_resolved(data_args.eval_audio_dir or data_args.audio_dir),
    )


def release_training_caches(dataset: EncodedDataset, backbone, model) -> None:
    """After the training loop nothing reads the kept encodings and tower outputs: drop them, trim the freed heap."""
    dataset.clear()
    backbone.keep_tower_outputs(model, 0)
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def frame_cache_record(frame_cache) -> dict[str, Any]:
    """The run's frame cache as surgvqa_config.json records it (evaluation reuses a disk cache it finds there)."""
    if frame_cache is None:
        return {"mode": "none", "dir": None}
    return {"mode": frame_cache.mode, "dir": str(frame_cache.directory.parent) if frame_cache.directory else None}


def _resolved(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None


def train(model_args: ModelArguments, data_args: DataArguments, lora_args: LoraArguments,
          args: TrainingArguments) -> dict[str, Any]:
    from transformers import EarlyStoppingCallback, set_seed
    from transformers.trainer_utils import enable_full_determinism

    from surgvqa.trainer import SurgvqaConfigCallback, VQATrainer, save_outputs_extras

    validate_args(model_args, data_args, lora_args, args)
    args.remove_unused_columns = False  # items carry media, not model kwargs
    args.prediction_loss_only = True  # eval keeps no logits: memory is per batch, not per dataset
    if args.gradient_checkpointing_kwargs is None:
        args.gradient_checkpointing_kwargs = {"use_reentrant": False}

    # 1. data, fully checked before any model loads
    train_media = media_config(data_args)
    train_samples = load_checked(data_args.train_data_path, train_media, data_args.skip_bad_samples)
    eval_samples, eval_media = [], None
    if data_args.eval_data_path:
        eval_media = media_config(data_args, eval=True)
        eval_samples = load_checked(data_args.eval_data_path, eval_media, data_args.skip_bad_samples,
                                    scoring=bool(data_args.eval_generate_samples))

    # 2. the run directory: refused, emptied, resumed or started, before any weight loads
    backbone = backbone_for(model_args.model_name_or_path, model_args.backbone)
    backbone.check_moe_settings(lora_args.lora_experts, lora_args.router_aux_loss_coef)
    backbone.check_sharding(sharding_of(args))
    backbone.check_packing(data_args.packing)
    backbone.check_tower_cache(data_args.tower_cache_gb)
    backbone_name = backbone.name
    early = build_run_config(model_args, data_args, lora_args, backbone_name, args)
    plan = plan_output_dir(
        args.output_dir, args.resume_from_checkpoint, getattr(args, "overwrite_output_dir", False),
        protected=(data_args.train_data_path, data_args.eval_data_path, data_args.frames_dir, data_args.audio_dir,
                   data_args.eval_frames_dir, data_args.eval_audio_dir, model_args.model_name_or_path),
    )
    if plan.recorded and plan.recorded.get("lora"):  # a record from before a LoRA setting existed: its default
        plan.recorded["lora"] = {**asdict(LoraArguments()), **plan.recorded["lora"]}
    check_same_run(plan, run_identity(early))
    inputs = _from_main_process(args, lambda: input_fingerprints(
        data_args.train_data_path, data_args.eval_data_path, train_samples, eval_samples,
        model_args.model_name_or_path))  # hashing the base model's weights (15 GB at 7B) once, not per process
    changes = check_same_inputs(plan, inputs, data_args.allow_changed_data)
    history = list((plan.recorded or {}).get("data_changes") or []) if plan.resume_from else []
    if changes:
        history.append({"resumed_from": plan.resume_from, "changed": changes})
    early = dataclasses.replace(early, inputs=inputs, data_changes=history or None)
    _wait_for_every_process(args)  # every process has read the directory before the main process changes it
    with args.main_process_first(local=False, desc="preparing the output directory"):
        if args.process_index == 0:
            apply_plan(plan)
            early.write(args.output_dir)  # whose directory this is, from the start
    if plan.resume_from:
        logger.info("resuming from %s", plan.resume_from)
    frame_cache = open_frame_cache(data_args.frame_cache, data_args.frame_cache_dir, data_args.frame_cache_max_gb,
                                   default_directory=Path(args.output_dir) / "frame_cache")
    if frame_cache is not None:
        logger.info("decoded frames are cached: %s", frame_cache)

    # 3. model (seeded first: LoRA's random init must be reproducible for resume and comparisons)
    if args.full_determinism:
        enable_full_determinism(args.seed)
    else:
        set_seed(args.seed)
    model, processor, backbone, report, original_rows = build_model(model_args, lora_args, args,
                                                                   data_args.token_kept_ratio)
    grid = backbone.vision_grid(processor)  # frames are resized onto the backbone's vision grid
    train_media = dataclasses.replace(train_media, pixel_multiple=grid)
    if eval_media is not None:
        eval_media = dataclasses.replace(eval_media, pixel_multiple=grid)
    settings = dict(preprocessing_of(data_args).collator_kwargs(), model_max_length=data_args.model_max_length)
    train_collator = VQACollator(processor, mode="train", **settings)
    train_samples, train_lengths = drop_overlong(train_samples, train_collator, train_media.max_frames,
                                                 data_args.skip_overlong, data_args.model_max_length)
    # caches default to 2 GB when the data loader lives for the whole run (no workers, or persistent ones)
    default_gb = 2.0 if args.dataloader_num_workers == 0 or args.dataloader_persistent_workers else 0.0
    encoding_gb = default_gb if data_args.encoding_cache_gb is None else data_args.encoding_cache_gb
    encoded = EncodedDataset(SurgicalVQADataset(train_samples, train_media, frame_cache=frame_cache),
                             train_collator.encode_items, int(encoding_gb * 1024**3))
    train_dataset, data_collator = encoded, train_collator
    if data_args.packing:
        train_dataset, data_collator = packed_training_set(
            encoded, train_collator, train_lengths, data_args.model_max_length,
            args.data_seed if args.data_seed is not None else args.seed)
    # an item is read once per epoch the run starts; the epochs follow the rows (samples, or packs) per step
    encoded.reads = run_reads(len(train_dataset), args.per_device_train_batch_size * args.world_size,
                              args.gradient_accumulation_steps, args.max_steps, args.num_train_epochs)
    eval_dataset = generation_eval = None
    if eval_samples:
        eval_samples, _ = drop_overlong(eval_samples, train_collator, eval_media.max_frames,
                                        data_args.skip_overlong, data_args.model_max_length)
        eval_dataset = SurgicalVQADataset(eval_samples, eval_media, frame_cache=frame_cache)
        if data_args.eval_generate_samples:
            subset = stratified_subset(eval_samples, data_args.eval_generate_samples,
                                       args.data_seed if args.data_seed is not None else args.seed)
            generation_eval = {
                "dataset": SurgicalVQADataset(subset, eval_media, frame_cache=frame_cache),
                "collator": VQACollator(processor, mode="generate", **settings),
                "candidates": build_candidates((s.question_type, s.short_answer) for s in eval_samples),
                "batch_size": data_args.eval_batch_size_generate,
                "max_new_tokens": data_args.eval_max_new_tokens,
            }

    config = build_run_config(model_args, data_args, lora_args, backbone.name, args, report, original_rows, model)
    config = dataclasses.replace(config, frame_cache=frame_cache_record(frame_cache), inputs=early.inputs,
                                 data_changes=early.data_changes)
    trainer = VQATrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        eval_collator=train_collator if eval_dataset is not None else None,  # the plain one (never packs)
        processing_class=processor,
        generation_eval=generation_eval,
        labelled_only=model_args.loss_on_labelled_only,
        # kept outputs serve an item's later reads: a run that reads each item once keeps none by default
        keeps_tower_outputs=backbone.keep_tower_outputs(model, data_args.tower_cache_gb,
                                                        default_gb if encoded.reads > 1 else 0.0),
        callbacks=[SurgvqaConfigCallback(config, original_rows)],
        loraplus_lr_ratio=lora_args.loraplus_lr_ratio,
        router_aux_loss_coef=lora_args.router_aux_loss_coef,
    )
    if data_args.early_stopping_patience is not None:
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=data_args.early_stopping_patience))
    base_changed = changes_base(lora_args.init_lora_weights) and hasattr(trainer.model, "peft_config")
    if base_changed and trainer.is_world_process_zero():  # the starting point, for the conversion at the end
        save_initial_adapter(trainer.model, args.output_dir)
    result = trainer.train(resume_from_checkpoint=plan.resume_from)
    release_training_caches(encoded, backbone, trainer.model)
    trainer.save_model(args.output_dir)
    if base_changed and trainer.is_world_process_zero():  # PiSSA/OLoRA: an adapter of the original base
        save_converted(trainer.model, args.output_dir)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)  # train_results.json, all_results.json
    trainer.save_state()  # trainer_state.json: the whole log history
    if trainer.is_world_process_zero():
        save_outputs_extras(Path(args.output_dir), config, trainer.model, original_rows)
        # the final directory holds no pickles: the Trainer's training_args.bin becomes readable JSON
        (Path(args.output_dir) / "training_args.json").write_text(args.to_json_string() + "\n")
        (Path(args.output_dir) / "training_args.bin").unlink(missing_ok=True)
        curves = plot_training_curves(trainer.state.log_history, Path(args.output_dir) / CURVES_NAME)
        if curves:
            logger.info("loss curve: %s", curves)
    logger.info("adapter, processor and %s written to %s", CONFIG_NAME, args.output_dir)
    return {"metrics": result.metrics, "trainer": trainer}

CURVES_NAME = "training_curves.png"


def plot_training_curves(log_history: list[dict], png_path: Path) -> Path | None:
    """Training loss (and eval loss, eval accuracy when logged) against the step, as a PNG; None when nothing
    was logged. matplotlib is imported here only (headless Agg canvas)."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    accuracy = [(e["step"], e["eval_accuracy"]) for e in log_history if "eval_accuracy" in e]
    if not (train or evals or accuracy):
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    handles, labels = ax.get_legend_handles_labels()
    if accuracy:
        acc_ax = ax.twinx()
        acc_ax.plot(*zip(*accuracy, strict=True), "s--", label="eval accuracy (generated)", color="tab:green")
        acc_ax.set_ylabel("accuracy")
        acc_ax.set_ylim(0, 1)
        more_handles, more_labels = acc_ax.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    return png_path




def main(argv: list[str] | None = None) -> int:
    """``train_vqa.py``: 0 trained; 2 a user error (bad flag, missing file, bad data), printed as ``error: …``.

    ``argv`` None reads ``sys.argv``; only then is bitsandbytes kept out of an unquantized process, and DeepSpeed out
    of one that does not use it (:mod:`surgvqa.lean_imports`).
    """
    if argv is None:
        argv = sys.argv[1:]
        skip_bitsandbytes(needs_bitsandbytes(argv))
        skip_deepspeed(needs_deepspeed(argv))
    return run_main(lambda: train(*parse_args(argv)), logs=True)


def __getattr__(name: str):
    """Names whose module imports transformers' Trainer or TrainingArguments (and with them peft), imported on first
    use: ``SurgvqaTrainingArguments`` (:mod:`surgvqa.training_args`), ``VQATrainer``, ``SurgvqaConfigCallback``,
    ``save_outputs_extras`` (:mod:`surgvqa.trainer`)."""
    if name == "SurgvqaTrainingArguments":
        from surgvqa.training_args import SurgvqaTrainingArguments

        return SurgvqaTrainingArguments
    if name == "TrainerCallback":
        from transformers import TrainerCallback

        return TrainerCallback
    if name in ("VQATrainer", "SurgvqaConfigCallback", "save_outputs_extras"):
        import surgvqa.trainer

        return getattr(surgvqa.trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "DataArguments",
    "LoraArguments",
    "ModelArguments",
    "SurgvqaTrainingArguments",
    "main",
    "make_parser",
    "parse_args",
    "train",
]
