"""Evaluate a checkpoint by generated answers: a self-describing predictions file, its summary, the table.

    python evaluate_checkpoint.py --checkpoint_path OUT --eval_data_path test.jsonl --frames_dir frames \
        --audio_dir audio --output_file preds.jsonl
    python evaluate_checkpoint.py --score_predictions preds.jsonl      # re-score a file, no model needed

Preprocessing comes from the checkpoint's ``surgvqa_config.json``; flags override it. A checkpoint without one is
refused unless ``--frame_size``, ``--question_modality`` and ``--frames_as`` are all given, or
``--allow_default_preprocessing True`` (the meta line records which: ``preprocessing_source``).

Nothing is lost and nothing is mixed: predictions stream to ``<output>.partial`` (first line: the run's meta
record) and the finished file replaces ``<output>`` in one rename, so a failed or killed run leaves an existing
output untouched; an existing output is replaced only with ``--overwrite True``; ``--resume True`` continues a
partial (or complete) file only when its meta record matches this run, field by field.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from surgvqa import __version__
from surgvqa.arguments import EvalArguments
from surgvqa.backbones import LoadOptions
from surgvqa.checkpoint import load_for_inference, sha256_file, weights_sha256
from surgvqa.clusters import Clustering, clip_fields
from surgvqa.collate import VQACollator
from surgvqa.data import (
    CONSTANT_VIDEO_ABLATIONS,
    SHUFFLE_ABLATIONS,
    MediaConfig,
    Sample,
    SurgicalVQADataset,
    ablation_donors,
    load_samples,
)
from surgvqa.errors import (
    UserError,
    existing_dir,
    existing_file,
    one_line_errors,
    parse_dataclasses,
    run_main,
    writable_file,
)
from surgvqa.frame_cache import check_frame_cache_settings, eval_frame_cache
from surgvqa.generate import generate_predictions
from surgvqa.lean_imports import checkpoint_needs_bitsandbytes, skip_bitsandbytes
from surgvqa.media import ABLATION_REMOVES
from surgvqa.metrics import SCORING_VERSION, build_candidates, paired_comparison, parse_baseline, score_record
from surgvqa.preprocessing import field_names
from surgvqa.report import (
    META_KEY,
    PredictionsMeta,
    format_paired_comparison,
    format_table,
    partial_path_for,
    plot_per_type,
    predictions_path_for,
    read_predictions,
    read_predictions_meta,
    rescored_summary_path_for,
    summarize_run,
    summary_path_for,
    write_summary,
)
from surgvqa.run_config import EvalPreprocessing, RunConfig, eval_preprocessing

logger = logging.getLogger("surgvqa.evaluate")


def clustering_of(args: EvalArguments, meta: PredictionsMeta | None) -> Clustering:
    """The run's clustering (its meta line's, else the defaults) with the flags given on top."""
    return (meta.clustering if meta else Clustering()).given(
        cluster_by=args.cluster_by, cluster_gap=args.cluster_gap, bootstrap=args.bootstrap,
        bootstrap_seed=args.bootstrap_seed)


def compare_with(records: list[dict], reference: str, candidates: dict | None, ablate: str | None,
                 clustering: Clustering | None = None) -> dict:
    """Paired comparison of this run's records with a reference run's predictions file (or its summary)."""
    path = predictions_path_for(reference)
    result = paired_comparison(records, read_predictions(path), candidates, removed=ABLATION_REMOVES.get(ablate),
                               clustering=clustering)
    return {"reference": str(path.resolve()), **result}


# ------------------------------------------------------------------------------------------- run settings
def resolve_preprocessing(args: EvalArguments) -> EvalPreprocessing:
    """The checkpoint's recorded preprocessing with the flags given on top (refused when nothing is recorded
    and the flags do not say it either; see the module docstring)."""
    flags = {name: getattr(args, name) for name in field_names()}
    return eval_preprocessing(RunConfig.find(args.checkpoint_path), flags, checkpoint=args.checkpoint_path,
                              allow_defaults=args.allow_default_preprocessing)


def _abs(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None


def run_meta(args: EvalArguments, preprocessing: EvalPreprocessing, media: MediaConfig, samples: list[Sample],
             n_skipped: int, candidates: dict[str, list[str]]) -> PredictionsMeta:
    """The meta record: everything that decides this run's lines, plus what re-scoring needs."""
    config = RunConfig.find(args.checkpoint_path)
    return PredictionsMeta(
        surgvqa_version=__version__, checkpoint=_abs(args.checkpoint_path),
        checkpoint_sha256=weights_sha256(args.checkpoint_path),
        base_model=_abs(args.base_model_path) or (config.base_model if config else None),
        backbone=args.backbone or (config.backbone if config else None),
        eval_data_path=_abs(args.eval_data_path), eval_data_sha256=sha256_file(args.eval_data_path),
        frames_dir=_abs(media.frames_dir) or str(Path(args.eval_data_path).resolve().parent / "frames"),
        audio_dir=_abs(media.audio_dir), ablate=media.ablate,
        ablation_seed=args.ablation_seed if media.ablate in SHUFFLE_ABLATIONS else None,
        preprocessing_source=preprocessing.source, preprocessing=preprocessing.preprocessing,
        max_new_tokens=args.max_new_tokens, dtype=args.dtype, load_in_4bit=args.load_in_4bit, limit=args.limit,
        skip_bad_samples=args.skip_bad_samples, skipped_bad_samples=n_skipped, n_samples=len(samples),
        scoring=SCORING_VERSION, baseline=parse_baseline(args.baseline) if args.baseline else "majority",
        candidates=candidates, clustering=clustering_of(args, None))


# ------------------------------------------------------------------------------------------- output safety
def check_paths(args: EvalArguments) -> None:
    """Every path flag, before anything is read or written."""
    if args.score_predictions:
        existing_file(args.score_predictions, "--score_predictions")
        if args.output_file and args.summary_file:
            raise UserError("--output_file and --summary_file both name the re-scored summary: pass --summary_file "
                             "only")
        if args.output_file:
            writable_file(args.output_file, "--output_file")
        if args.summary_file:
            writable_file(args.summary_file, "--summary_file")
        if args.compare:
            existing_file(args.compare, "--compare")
        return
    if args.summary_file:
        raise UserError(f"--summary_file names the summary of --score_predictions; a model run writes its summary "
                         f"beside --output_file (PRED.summary.json): drop --summary_file {args.summary_file}")
    check_frame_cache_settings(args.frame_cache, args.frame_cache_max_gb, args.frame_cache_dir)
    for name in ("checkpoint_path", "eval_data_path", "output_file"):
        if not getattr(args, name):
            raise UserError(f"--{name} is required (or use --score_predictions FILE)")
    existing_dir(args.checkpoint_path, "--checkpoint_path")
    existing_file(args.eval_data_path, "--eval_data_path")
    for name in ("frames_dir", "audio_dir"):
        if getattr(args, name):
            existing_dir(getattr(args, name), f"--{name}")
    writable_file(args.output_file, "--output_file")
    if args.compare:
        existing_file(args.compare, "--compare")


def check_outputs(args: EvalArguments, output: Path, inputs: list[str | None], flag: str = "--output_file") -> None:
    """Refuse an output that is a directory or that would overwrite one of this run's inputs; an HTML report that
    cannot be written there."""
    if output.is_dir():
        raise UserError(f"{flag} {output} is a directory; pass a file name, e.g. {output / 'preds.jsonl'}")
    written = {output.resolve(): flag}
    if not args.score_predictions:
        written[summary_path_for(output).resolve()] = "the summary"
        written[partial_path_for(output).resolve()] = "the partial file"
    for flag in ("plot", "report"):
        if getattr(args, flag):
            written[Path(getattr(args, flag)).resolve()] = f"--{flag}"
    for value in inputs:
        if not value:
            continue
        path = Path(value).resolve()
        if path in written:
            raise UserError(
                f"{written[path]} would overwrite the input {value}; choose another --output_file / --plot / --report"
            )
    if args.report:  # before any evaluation, naming this command's flag
        if Path(args.report).resolve() == output.resolve():
            raise UserError(f"--report {args.report} is {flag} too; choose another file name for the report")
        _html_report().check_output(Path(args.report), [Path(v) for v in inputs if v], flag="--report")


def _complete_lines(path: Path) -> list[str]:
    """The record lines of a file, without its meta line and without a last line cut by a kill."""
    lines = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill: the sample is generated again
            if isinstance(obj, dict) and META_KEY in obj:
                continue
            lines.append(line.rstrip("\n"))
    return lines


def refuse_to_overwrite(args: EvalArguments, output: Path) -> None:
    """Before anything heavy: an existing output or partial file needs ``--overwrite True`` or ``--resume True``
    (and both files at once need ``--overwrite True`` to resume, since the partial then replaces the output)."""
    partial = partial_path_for(output)
    if args.resume:
        if partial.exists() and output.exists() and not args.overwrite:
            raise UserError(
                f"both {output} and {partial} exist; --resume continues the partial file and replaces {output} at "
                "the end: add --overwrite True to allow that, or move one of them"
            )
        return
    if partial.exists() and not args.overwrite:
        raise UserError(
            f"{partial} is left from an interrupted run; pass --resume True to continue it, or --overwrite True "
            "to start again"
        )
    if output.exists() and not args.overwrite:
        raise UserError(
            f"--output_file {output} exists; pass --overwrite True to replace it (only once this run completes), "
            "--resume True to continue it, or choose another file"
        )


def previous_lines(args: EvalArguments, output: Path, meta: PredictionsMeta, samples: list[Sample]) -> dict[tuple, str]:
    """With ``--resume``: the lines of the partial (or finished) output that this run keeps, keyed on
    (video_id, id), after checking that its meta line matches this run; otherwise none."""
    if not args.resume:
        return {}
    partial = partial_path_for(output)
    source = partial if partial.exists() else output if output.exists() else None
    if source is None:
        logger.info("resume: %s does not exist yet; starting from the first sample", output)
        return {}
    old = read_predictions_meta(source)
    if old is None:
        raise UserError(
            f"--resume: {source} has no {META_KEY} line (written by an older version or another tool), so it cannot "
            "be checked against this run; start a new --output_file"
        )
    mismatch = old.mismatch(meta)
    if mismatch:
        raise UserError(
            f"--resume: {source} was written by a different run: {mismatch}. Resume only continues the same run; "
            "start a new --output_file, or pass the same settings"
        )
    wanted = {s.key for s in samples}
    kept: dict[tuple, str] = {}
    for line in _complete_lines(source):
        record = json.loads(line)
        key = (record.get("video_id"), record.get("id"))
        if key not in wanted:
            raise UserError(
                f"--resume: {source} holds a prediction for {key}, which this run does not evaluate (a different "
                "--limit or --skip_bad_samples?); pass the same flags, or start a new --output_file"
            )
        kept.setdefault(key, line)
    logger.info("resume: %d of %d samples already in %s", len(kept), len(samples), source)
    return kept


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------- the run
def evaluate(args: EvalArguments) -> dict[str, Any]:
    if args.baseline:
        parse_baseline(args.baseline)
    if args.score_predictions:
        return rescore(args)
    check_paths(args)
    clustering_of(args, None)  # a bad --cluster_by / --cluster_gap / --bootstrap fails before the model loads
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    output = Path(args.output_file)
    check_outputs(args, output, [args.eval_data_path, args.compare,
                                 str(predictions_path_for(args.compare)) if args.compare else None])
    refuse_to_overwrite(args, output)

    preprocessing = resolve_preprocessing(args)
    media = preprocessing.preprocessing.media_config(args.frames_dir, args.audio_dir, ablate=args.ablate)
    samples, problems = load_samples(args.eval_data_path, media, require_scoring_fields=True,
                                     skip_bad=args.skip_bad_samples)
    if problems:
        logger.warning("skipped %d bad sample(s):\n%s", len(problems), "\n".join(f"  {p}" for p in problems[:50]))
    # The closed answer set per type comes from every usable sample of the file, before --limit, so a limited
    # run is scored like the full one; the meta line records it, so re-scoring uses the same sets.
    candidates = build_candidates((s.question_type, s.short_answer) for s in samples)
    # Shuffle donors likewise from every usable sample, before --limit and --resume: a sample's donor never depends
    # on how many samples a run (or a resumed run) evaluates.
    donors = ablation_donors(samples, args.ablation_seed) if media.ablate in SHUFFLE_ABLATIONS else None
    if args.limit is not None:
        samples = samples[: args.limit]
    if not samples:
        raise UserError(f"--eval_data_path {args.eval_data_path}: no usable samples to evaluate")
    meta = run_meta(args, preprocessing, media, samples, len(problems), candidates)
    kept = previous_lines(args, output, meta, samples)
    todo = [s for s in samples if s.key not in kept]

    output.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path_for(output)
    meta_line = json.dumps({META_KEY: meta.to_dict()}, sort_keys=True)
    _write_atomically(partial, "".join(f"{line}\n" for line in [meta_line, *kept.values()]))
    try:
        _run_model(args, media, preprocessing, todo, donors, candidates, partial)
    except Exception:
        if not _complete_lines(partial):  # nothing to resume from: leave no partial file behind
            partial.unlink(missing_ok=True)
        raise
    # The finished file: the meta line, then one line per sample in the data file's order; it replaces the
    # output in one rename, so the output is never half-written.
    lines = {}
    for line in _complete_lines(partial):
        record = json.loads(line)
        lines.setdefault((record["video_id"], record["id"]), line)
    missing = [s.key for s in samples if s.key not in lines]
    if missing:
        raise RuntimeError(f"{len(missing)} sample(s) have no prediction in {partial}, e.g. {missing[0]}")
    _write_atomically(partial, "".join(f"{line}\n" for line in [meta_line, *(lines[s.key] for s in samples)]))
    os.replace(partial, output)

    summary = _finish(read_predictions(output), meta, output, summary_path_for(output), args)
    return summary


def _run_model(args: EvalArguments, media: MediaConfig, preprocessing: EvalPreprocessing, todo: list[Sample],
               donors, candidates, partial: Path) -> None:
    """Load the model and append a line to ``partial`` for every sample in ``todo`` (nothing to do: no load)."""
    if not todo:
        return
    options = LoadOptions(dtype=args.dtype, attn_implementation=args.attn_implementation,
                          load_in_4bit=args.load_in_4bit, trust_remote_code=args.trust_remote_code)
    model, processor, backbone, config = load_for_inference(args.checkpoint_path, args.base_model_path, options,
                                                            backbone=args.backbone)
    backbone.enable_token_merging(model, preprocessing.preprocessing.token_kept_ratio)
    print(f"model: {backbone.describe(model)}")
    device = args.device or ("cuda" if _cuda() else "cpu")
    if not args.load_in_4bit:
        model.to(device)
    collator = VQACollator(processor, mode="generate", **preprocessing.preprocessing.collator_kwargs())
    media = dataclasses.replace(media, pixel_multiple=collator.processing.grid)  # the backbone's vision grid
    fill = collator.processing.video_fill() if media.ablate in CONSTANT_VIDEO_ABLATIONS else None
    frame_cache = eval_frame_cache(args.frame_cache, args.frame_cache_dir, args.frame_cache_max_gb,
                                   config.frame_cache if config else None)
    dataset = SurgicalVQADataset(todo, media, video_fill=fill, donors=donors, frame_cache=frame_cache)
    _generate_into(partial, model, processor, dataset, collator, candidates, args)


def _finish(records: list[dict], meta: PredictionsMeta | None, predictions: Path, summary_file: Path,
            args: EvalArguments) -> dict[str, Any]:
    """Summary (+ comparison) of a predictions file, written and printed; the same for a run and a re-score."""
    baseline = parse_baseline(args.baseline) if args.baseline else None
    clustering = clustering_of(args, meta)
    summary = summarize_run(records, meta, baseline=baseline, clustering=clustering)
    summary["predictions_file"] = str(predictions.resolve())
    ablate = meta.ablate if meta else None
    if args.compare:
        summary["comparison"] = compare_with(records, args.compare, meta.candidates if meta else None, ablate,
                                             clustering)
    write_summary(summary, summary_file)
    print(format_table(summary))
    if args.compare:
        label = f"ablate={ablate}" if ablate else "run"
        print(format_paired_comparison(summary["comparison"], label=label, reference_label="reference"))
    if args.plot:
        plot_per_type(summary, args.plot)
    if args.report:
        write_report(predictions, args, meta, clustering)
    print(f"predictions: {predictions}\nsummary:     {summary_file}")
    return summary


def _html_report():
    """``surgvqa.html_report``, imported only when a report is asked for."""
    try:
        html_report = importlib.import_module("surgvqa.html_report")
    except ImportError as err:
        raise UserError(
            f"--report needs surgvqa.html_report, which cannot be imported here ({err}); update surgvqa, or drop "
            "--report and build the report later from the predictions file"
        ) from None
    return html_report


def write_report(predictions: Path, args: EvalArguments, meta: PredictionsMeta | None,
                 clustering: Clustering) -> Path:
    """The HTML report of a predictions file, clustered as its summary is."""
    compare = [predictions_path_for(args.compare)] if args.compare else []
    meta = meta or PredictionsMeta()
    return _html_report().build_report(predictions, args.report, compare=compare,
                                       frames_dir=args.frames_dir or meta.frames_dir,
                                       audio_dir=args.audio_dir or meta.audio_dir, clustering=clustering)


# The flags re-scoring uses; any other flag set away from its default needs a model run and is refused.
_RESCORE_FLAGS = {"score_predictions", "output_file", "summary_file", "overwrite", "compare", "baseline", "plot",
                  "report", "frames_dir", "audio_dir", "cluster_by", "cluster_gap", "bootstrap", "bootstrap_seed"}


def rescore(args: EvalArguments) -> dict[str, Any]:
    """``--score_predictions FILE``: the summary of FILE from its predictions and its meta line (no model)."""
    defaults = EvalArguments()
    ignored = [f"--{f.name}" for f in fields(EvalArguments)
               if f.name not in _RESCORE_FLAGS and getattr(args, f.name) != getattr(defaults, f.name)]
    if ignored:
        raise UserError(
            f"--score_predictions re-scores a finished file without a model; {', '.join(ignored)} would be ignored "
            "(the run's settings are in the file's meta line): drop them"
        )
    if (args.frames_dir or args.audio_dir) and not args.report:
        raise UserError("--frames_dir / --audio_dir with --score_predictions only locate media for --report")
    check_paths(args)
    source = Path(args.score_predictions)
    if args.baseline:
        parse_baseline(args.baseline)
    given = args.summary_file or args.output_file
    flag = "--summary_file" if args.summary_file else "--output_file"
    if args.output_file:
        logger.warning("--output_file with --score_predictions names the re-scored summary JSON, not a predictions "
                       "file: %s; --summary_file says so (the same effect)", args.output_file)
    target = Path(given) if given else rescored_summary_path_for(source)
    check_outputs(args, target, [str(source), args.compare,
                                 str(predictions_path_for(args.compare)) if args.compare else None], flag)
    if given and target.exists() and not args.overwrite:
        raise UserError(f"{flag} {target} exists; pass --overwrite True to replace it, or choose another file")
    meta = read_predictions_meta(source)
    if meta is None:
        logger.warning("%s has no %s line: the closed answer sets are gathered from its own gold answers, which "
                       "can differ from the run's", source, META_KEY)
    return _finish(read_predictions(source), meta, source, target, args)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _generate_into(partial: Path, model, processor, dataset, collator, candidates, args: EvalArguments) -> None:
    from tqdm.auto import tqdm

    by_key = {s.key: s for s in dataset.samples}
    hits = seen = 0
    bar = tqdm(total=len(dataset), desc="evaluating", unit="sample")
    with partial.open("a", encoding="utf-8") as handle:
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
                **clip_fields(sample.frame_paths, sample.extra.get("frame_numbers")),
                "prediction": prediction.text,
                "stopped_by_eos": prediction.stopped_by_eos,
                "new_tokens": prediction.new_tokens,
                "latency_ms": round(prediction.latency_ms, 2),
            }
            if dataset.donors is not None:
                donor = dataset.donors[sample.key]
                record["ablation_source"] = [donor.video_id, donor.id]
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
    (args,) = parse_dataclasses(parser, list(sys.argv[1:] if argv is None else argv))
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
