"""Evaluate a checkpoint by generated answers: streaming, resumable predictions file + summary + table.

    python evaluate_checkpoint.py --checkpoint_path OUT --eval_data_path test.jsonl --frames_dir frames \
        --audio_dir audio --output_file preds.jsonl
    python evaluate_checkpoint.py --score_predictions preds.jsonl      # re-score a file, no model needed

Preprocessing comes from the checkpoint's ``surgvqa_config.json``; flags override it. A checkpoint without one is
refused unless ``--frame_size``, ``--question_modality`` and ``--frames_as`` are all given, or
``--allow_default_preprocessing True`` (the summary records which: ``preprocessing``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from surgvqa.backbones import LoadOptions, get_backbone
from surgvqa.backbones.base import vision_grid
from surgvqa.checkpoint import load_for_inference
from surgvqa.collate import VQACollator
from surgvqa.data import MediaConfig, SurgicalVQADataset, load_samples
from surgvqa.errors import existing_dir, existing_file, one_line_errors, run_main, writable_file
from surgvqa.frame_cache import eval_frame_cache
from surgvqa.generate import generate_predictions
from surgvqa.lean_imports import checkpoint_needs_bitsandbytes, skip_bitsandbytes
from surgvqa.metrics import build_candidates, paired_comparison, parse_baseline, score_record, summarize
from surgvqa.report import (
    format_paired_comparison,
    format_table,
    plot_per_type,
    predictions_path_for,
    read_predictions,
    rescore,
    summary_path_for,
    write_summary,
)
from surgvqa.run_config import EvalPreprocessing, RunConfig, eval_preprocessing

logger = logging.getLogger("surgvqa.evaluate")


@dataclass
class EvalArguments:
    checkpoint_path: str | None = field(default=None, metadata={"help": "adapter dir, merged model or base model"})
    eval_data_path: str | None = field(default=None)
    frames_dir: str | None = field(default=None)
    audio_dir: str | None = field(default=None)
    output_file: str | None = field(default=None, metadata={"help": "predictions JSONL (summary beside it)"})
    base_model_path: str | None = field(default=None, metadata={"help": "override the adapter's recorded base"})
    backbone: str | None = field(default=None)
    frame_path_template: str | None = field(default=None)
    audio_path_template: str | None = field(default=None)
    frame_size: int | None = field(default=None)
    max_eval_frames: int | None = field(default=None)
    question_modality: str | None = field(default=None, metadata={"help": "text | audio | text+audio"})
    frames_as: str | None = field(default=None)
    allow_default_preprocessing: bool = field(
        default=False, metadata={"help": "a checkpoint without surgvqa_config.json: use the default preprocessing"}
    )
    batch_size: int = field(default=8)
    max_new_tokens: int = field(default=64)
    baseline: str = field(default="majority", metadata={"help": "'majority', 'chance' or a number such as 0.46"})
    limit: int | None = field(default=None, metadata={"help": "evaluate only the first N samples"})
    dtype: str = field(default="auto")
    attn_implementation: str = field(default="sdpa")
    load_in_4bit: bool = field(default=False)
    trust_remote_code: bool = field(default=False)
    resume: bool = field(default=False, metadata={"help": "skip (video_id, id) keys already in --output_file"})
    ablate: str | None = field(default=None, metadata={"help": "video | audio | both: grey frames / silence"})
    compare: str | None = field(
        default=None,
        metadata={"help": "reference run's predictions file (or its summary): paired comparison on the same samples"},
    )
    score_predictions: str | None = field(default=None, metadata={"help": "re-score this predictions file"})
    skip_bad_samples: bool = field(default=False)
    plot: str | None = field(default=None, metadata={"help": "write a per-type accuracy PNG here"})
    device: str | None = field(default=None, metadata={"help": "cpu | cuda (default: cuda when available)"})
    frame_cache: str | None = field(
        default=None,
        metadata={"help": "none | memory | disk (default: the training run's disk frame cache when it still exists, "
                          "otherwise none)"},
    )
    frame_cache_dir: str | None = field(default=None, metadata={"help": "disk frame cache location"})
    frame_cache_max_gb: float | None = field(default=None, metadata={"help": "default: 32 on disk, 4 in memory"})


# What each ablation removes, as the paired comparison's verdict names it ("video carries X pts").
REMOVED = {"video": "video", "audio": "audio", "both": "video and audio"}


def compare_with(records: list[dict], reference: str, candidates: dict, ablate: str | None) -> dict[str, Any]:
    """Paired comparison of this run's records with a reference run's predictions file (or its summary)."""
    path = predictions_path_for(reference)
    result = paired_comparison(records, read_predictions(path), candidates, removed=REMOVED.get(ablate))
    return {"reference": str(path.resolve()), **result}


def resolve_preprocessing(args: EvalArguments) -> EvalPreprocessing:
    """The checkpoint's recorded preprocessing with the flags given on top (refused when nothing is recorded
    and the flags do not say it either; see the module docstring)."""
    flags = {name: getattr(args, name) for name in ("frame_path_template", "audio_path_template", "frame_size",
                                                    "question_modality", "frames_as")}
    flags["max_eval_frames"] = args.max_eval_frames
    return eval_preprocessing(RunConfig.find(args.checkpoint_path), flags, checkpoint=args.checkpoint_path,
                              allow_defaults=args.allow_default_preprocessing)


def resolve_media(args: EvalArguments, preprocessing: EvalPreprocessing) -> MediaConfig:
    return preprocessing.media_config(args.frames_dir, args.audio_dir, ablate=args.ablate)


def check_paths(args: EvalArguments) -> None:
    """Every path flag, before anything is read or written."""
    if args.score_predictions:
        existing_file(args.score_predictions, "--score_predictions")
        if args.output_file:
            writable_file(args.output_file, "--output_file")
        return
    for name in ("checkpoint_path", "eval_data_path", "output_file"):
        if not getattr(args, name):
            raise ValueError(f"--{name} is required (or use --score_predictions FILE)")
    existing_dir(args.checkpoint_path, "--checkpoint_path")
    existing_file(args.eval_data_path, "--eval_data_path")
    writable_file(args.output_file, "--output_file")
    if args.compare:
        existing_file(args.compare, "--compare")


def existing_keys(path: Path) -> set[tuple[str, str]]:
    if not path.is_file():
        return set()
    keys = set()
    with path.open() as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill: dropped, the sample is redone
                continue
            keys.add((record["video_id"], record["id"]))
    return keys


def _rewrite_complete_lines(path: Path) -> None:
    """Drop a trailing partial line left by a kill so appended lines stay valid JSONL."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    good = []
    for ln in lines:
        try:
            json.loads(ln)
            good.append(ln)
        except json.JSONDecodeError:
            pass
    path.write_text("".join(f"{ln}\n" for ln in good))


def evaluate(args: EvalArguments) -> dict[str, Any]:
    baseline = parse_baseline(args.baseline)
    check_paths(args)
    if args.score_predictions:
        target = summary_path_for(args.output_file) if args.output_file else None
        summary = rescore(args.score_predictions, target, baseline=baseline)
        print(format_table(summary))
        return summary
    preprocessing = resolve_preprocessing(args)
    media = resolve_media(args, preprocessing)
    samples, problems = load_samples(args.eval_data_path, media, require_scoring_fields=True,
                                     skip_bad=args.skip_bad_samples)
    if problems:
        logger.warning("skipped %d bad sample(s):\n%s", len(problems), "\n".join(f"  {p}" for p in problems[:50]))
    candidates = build_candidates((s.question_type, s.short_answer) for s in samples)
    if args.limit is not None:
        samples = samples[: args.limit]

    output = Path(args.output_file)
    output.parent.mkdir(parents=True, exist_ok=True)
    if args.resume and output.is_file():
        _rewrite_complete_lines(output)
        done = existing_keys(output)
        todo = [s for s in samples if s.key not in done]
        logger.info("resume: %d of %d samples already in %s", len(samples) - len(todo), len(samples), output)
    else:
        output.write_text("")
        todo = samples

    if todo:
        options = LoadOptions(dtype=args.dtype, attn_implementation=args.attn_implementation,
                              load_in_4bit=args.load_in_4bit, trust_remote_code=args.trust_remote_code)
        model, processor, config = load_for_inference(args.checkpoint_path, args.base_model_path, options,
                                                      backbone=args.backbone)
        print(f"model: {get_backbone(config['backbone']).describe(model)}")
        device = args.device or ("cuda" if _cuda() else "cpu")
        if not args.load_in_4bit:
            model.to(device)
        collator = VQACollator(processor, mode="generate", **preprocessing.collator_kwargs())
        media = dataclasses.replace(media, pixel_multiple=vision_grid(processor))  # the backbone's vision grid
        frame_cache = eval_frame_cache(args.frame_cache, args.frame_cache_dir, args.frame_cache_max_gb,
                                       config.get("frame_cache"))
        dataset = SurgicalVQADataset(todo, media, frame_cache=frame_cache)
        _generate_into(output, model, processor, dataset, collator, candidates, args)

    records = read_predictions(output)
    wanted = {s.key for s in samples}
    records = [r for r in records if (r.get("video_id"), r.get("id")) in wanted]
    summary = summarize(records, baseline=baseline, candidates=candidates)
    summary.update(
        predictions_file=str(output.resolve()),
        checkpoint=str(args.checkpoint_path), eval_data_path=str(args.eval_data_path), ablate=args.ablate,
        question_modality=media.question_modality, frame_size=media.frame_size, max_eval_frames=media.max_frames,
        skipped_bad_samples=len(problems), preprocessing=preprocessing.source,
    )
    if preprocessing.source == "defaults":
        summary["allow_default_preprocessing"] = True
    if args.compare:
        summary["comparison"] = compare_with(records, args.compare, candidates, args.ablate)
    summary_file = write_summary(summary, summary_path_for(output))
    print(format_table(summary))
    if args.compare:
        label = f"ablate={args.ablate}" if args.ablate else "run"
        print(format_paired_comparison(summary["comparison"], label=label, reference_label="reference"))
    if args.plot:
        plot_per_type(summary, args.plot)
    print(f"predictions: {output}\nsummary:     {summary_file}")
    return summary


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _generate_into(output: Path, model, processor, dataset, collator, candidates, args: EvalArguments) -> None:
    from tqdm.auto import tqdm

    by_key = {s.key: s for s in dataset.samples}
    hits = seen = 0
    bar = tqdm(total=len(dataset), desc="evaluating", unit="sample")
    with output.open("a") as handle:
        for prediction in generate_predictions(model, processor.tokenizer, dataset, collator,
                                               batch_size=args.batch_size, max_new_tokens=args.max_new_tokens):
            sample = by_key[prediction.key]
            record = {
                "video_id": sample.video_id,
                "id": sample.id,
                "question_type": sample.question_type,
                "question": sample.question,
                "answer": sample.answer,
                "short_answer": sample.short_answer,
                "prediction": prediction.text,
                "stopped_by_eos": prediction.stopped_by_eos,
                "new_tokens": prediction.new_tokens,
                "latency_ms": round(prediction.latency_ms, 2),
            }
            record.update(score_record(record, candidates))
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            seen += 1
            hits += bool(record["accuracy"])
            bar.update(1)
            bar.set_postfix(accuracy=f"{hits / seen:.3f}")
    bar.close()


def parse_args(argv: list[str] | None = None) -> EvalArguments:
    parser = one_line_errors(HfArgumentParser(EvalArguments))
    parser.prog = "evaluate_checkpoint.py"
    (args,) = parser.parse_args_into_dataclasses(list(sys.argv[1:] if argv is None else argv))
    return args


def main(argv: list[str] | None = None) -> int:
    """``evaluate_checkpoint.py``: 0 evaluated; 2 a user error (bad flag, missing file, bad data): ``error: …``."""

    def body():
        args = parse_args(argv)
        if argv is None:  # the command line: bitsandbytes only for a 4-bit load or a quantized checkpoint
            skip_bitsandbytes(args.load_in_4bit or checkpoint_needs_bitsandbytes(args.checkpoint_path)
                              or checkpoint_needs_bitsandbytes(args.base_model_path))
        return evaluate(args)

    return run_main(body, logs=True)


if __name__ == "__main__":
    raise SystemExit(main())
