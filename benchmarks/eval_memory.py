#!/usr/bin/env python
"""Peak RSS of the in-training evaluation (surgvqa.train's VQATrainer.evaluate) on 20 vs 200 samples.

    python benchmarks/eval_memory.py [--quick] [--small 20] [--large 200] [--max_new_tokens 16] [--strict]

Every measurement runs in its own fresh process, so the peaks (``ru_maxrss``) are comparable. The child calls
``surgvqa.train.train()`` exactly as ``train_vqa.py`` would (tiny random model, LoRA, eval set of N synthetic samples,
``--eval_generate_samples N``), with ``VQATrainer.train`` replaced by one ``trainer.evaluate()``: eval loss with
``prediction_loss_only`` (what train() sets) followed by the generation-scored accuracy over all N samples.
Goal: peak RSS(large) / peak RSS(small) <= 1.1.

The counterfactual rows redo the same evaluation the way the original toolkit did: a ``compute_metrics`` on
logits and ``prediction_loss_only=False``, so the Trainer keeps every batch's logits until the end. With the tiny
1,088-row vocabulary that growth is small; the printed per-sample estimate shows it for Qwen's 152,064 rows.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    add_threads_arg,
    current_rss_mb,
    emit_result,
    environment_line,
    goal_line,
    log,
    peak_rss_mb,
    print_table,
    run_children,
    set_threads,
    subset_jsonl,
    synthetic_set,
    tiny_model,
)

GOAL = 1.1
FRAME_SIZE = 56  # the collator's pixel budget (the tiny model's processor size)
DATA_FRAME_SIZE = 112  # rendered JPEGs, like test_set/
QWEN_VOCAB_ROWS = 152064


# ---------------------------------------------------------------------------------------------------- child
def child(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--frames_dir", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_new_tokens", type=int, required=True)
    parser.add_argument("--keep_logits", action="store_true")
    parser.add_argument("--no_generate", action="store_true", help="eval loss only (no generation accuracy)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    set_threads(args.threads)

    import logging

    from transformers.trainer_utils import TrainOutput

    from surgvqa import train as surg_train

    logging.disable(logging.WARNING)
    n = sum(1 for line in Path(args.data).read_text().splitlines() if line.strip())
    record: dict = {"n": n, "keep_logits": args.keep_logits, "generate": not args.no_generate}
    logits_bytes = {"bytes": 0, "tokens": 0}

    def evaluate_once(self, resume_from_checkpoint=None, **kwargs):
        if args.keep_logits:  # the original toolkit: metrics on logits, so the Trainer keeps them all
            self.args.prediction_loss_only = False

            def compute_metrics(pred):
                logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
                logits_bytes["bytes"] = int(logits.nbytes)
                logits_bytes["tokens"] = int(logits.shape[0] * logits.shape[1])
                return {}

            self.compute_metrics = compute_metrics
        gc.collect()
        record["rss_before_eval_mb"] = current_rss_mb()
        record["peak_before_eval_mb"] = peak_rss_mb()
        start = time.perf_counter()
        metrics = self.evaluate()
        record["eval_s"] = time.perf_counter() - start
        record["peak_mb"] = peak_rss_mb()
        record["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        return TrainOutput(global_step=0, training_loss=0.0, metrics={})

    surg_train.VQATrainer.train = evaluate_once
    train_args = [
        "--model_name_or_path", args.model,
        "--train_data_path", args.data,
        "--eval_data_path", args.data,
        "--frames_dir", args.frames_dir,
        "--frame_size", str(FRAME_SIZE),
        "--eval_generate_samples", str(0 if args.no_generate else n),
        "--eval_max_new_tokens", str(args.max_new_tokens),
        "--eval_batch_size_generate", "8",
        "--per_device_eval_batch_size", "4",
        "--output_dir", args.output_dir,
        "--eval_strategy", "no",
        "--save_strategy", "no",
        "--use_cpu", "True",
        "--disable_tqdm", "True",
        "--seed", "0",
    ]
    surg_train.train(*surg_train.parse_args(train_args))
    record["logits_kept_mb"] = logits_bytes["bytes"] / 2**20
    record["logit_rows"] = logits_bytes["tokens"]
    emit_result(record)
    return 0


# --------------------------------------------------------------------------------------------------- parent
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 vs 40 samples, no counterfactual (< 60 s)")
    parser.add_argument("--small", type=int, default=None, help="default 20 (quick 10)")
    parser.add_argument("--large", type=int, default=None, help="default 200 (quick 40)")
    parser.add_argument("--max_new_tokens", type=int, default=8, help="generation length of the accuracy eval")
    parser.add_argument("--no_counterfactual", action="store_true", help="skip the logits-kept rows")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the goal is missed")
    parser.add_argument("--parallel", type=int, default=2,
                        help="child processes at a time (peaks are per process; eval s then is for information)")
    add_threads_arg(parser)
    args = parser.parse_args(argv)
    small = args.small or (10 if args.quick else 20)
    large = args.large or (40 if args.quick else 200)
    counterfactual = not (args.quick or args.no_counterfactual)

    model_dir = tiny_model()
    data = synthetic_set(500, DATA_FRAME_SIZE)
    script = Path(__file__).resolve()
    # (samples, keep logits, generate)
    runs = [(small, False, True), (large, False, True)]
    if counterfactual:
        runs += [(small, True, False), (large, True, False)]
    with tempfile.TemporaryDirectory(prefix="surgvqa-eval-memory-") as tmp:
        jobs = []
        for n, keep, generate in runs:
            jsonl = subset_jsonl(data / "in_template.jsonl", n, Path(tmp) / f"eval_{n}.jsonl")
            jobs.append((script, [
                "--child", "--model", str(model_dir), "--data", str(jsonl), "--frames_dir", str(data / "frames"),
                "--output_dir", str(Path(tmp) / f"out_{n}_{int(keep)}"), "--max_new_tokens",
                str(args.max_new_tokens), "--threads", str(args.threads), *(["--keep_logits"] if keep else []),
                *([] if generate else ["--no_generate"]),
            ]))
        log(f"{len(jobs)} child process(es), {args.parallel} at a time: "
            + ", ".join(f"{n}{' (logits kept)' if keep else ''}" for n, keep, _ in runs) + " samples ...")
        results = {(n, keep): r for (n, keep, _), r in zip(runs, run_children(jobs, args.parallel), strict=True)}

    print(f"\n== eval_memory ({'quick' if args.quick else 'full'}): in-training evaluation, one fresh process "
          f"per row ({args.parallel} at a time) ==")
    print(environment_line(args.threads))
    print(f"tiny model, 8 frames at {FRAME_SIZE} px, text questions; surgvqa rows: eval loss (batch 4) + generation "
          f"accuracy on all N samples (batch 8, {args.max_new_tokens} new tokens); counterfactual rows: eval loss "
          "only, with a compute_metrics on logits and prediction_loss_only=False")
    rows = []
    for (n, keep), r in results.items():
        rows.append([
            "logits kept (original toolkit), loss only" if keep else "surgvqa: loss + generation", n,
            r["rss_before_eval_mb"], r["peak_mb"], r["peak_mb"] - r["rss_before_eval_mb"],
            r["logits_kept_mb"] if keep else "-", r["eval_s"],
            "-" if keep else f"{r['metrics'].get('eval_accuracy', float('nan')):.3f}",
        ])
    print_table(["evaluation", "samples", "RSS before eval MiB", "peak RSS MiB", "peak - before MiB",
                 "logits kept MiB", "eval s", "eval_accuracy"], rows, title="peak RSS (whole process)")
    print()
    def growth(keep: bool) -> str:
        big, little = results[(large, keep)], results[(small, keep)]
        grow = (big["peak_mb"] - big["rss_before_eval_mb"]) - (little["peak_mb"] - little["rss_before_eval_mb"])
        return f"evaluation's own growth {grow:+.1f} MiB for {large - small} more samples"

    ratio = results[(large, False)]["peak_mb"] / results[(small, False)]["peak_mb"]
    met = goal_line(f"peak RSS ratio {large} / {small} samples (surgvqa)", ratio, GOAL, False)
    print(f"  {growth(False)}")
    if counterfactual:
        r = results[(large, True)]
        cf = r["peak_mb"] / results[(small, True)]["peak_mb"]
        print(f"peak RSS ratio {large} / {small} samples (logits kept, counterfactual): {cf:.3f}")
        print(f"  {growth(True)}")
        if r["logit_rows"]:
            per_sample_rows = r["logit_rows"] / large
            vocab = round(r["logits_kept_mb"] * 2**20 / r["logit_rows"] / 4)
            qwen_mb = per_sample_rows * QWEN_VOCAB_ROWS * 2 / 2**20
            print(f"logits kept: {per_sample_rows:.0f} padded token rows/sample x {vocab:,} vocab x 4 B = "
                  f"{r['logits_kept_mb'] / large:.2f} MiB/sample here; with Qwen's {QWEN_VOCAB_ROWS:,}-row "
                  f"vocabulary in bf16: {qwen_mb:,.1f} MiB/sample, {qwen_mb * large / 1024:,.1f} GiB for {large} "
                  f"samples at this sequence length (at frame_size 384 a clip has 676 video tokens, not "
                  f"{4 * (FRAME_SIZE // 28) ** 2})")
    return 1 if args.strict and not met else 0


if __name__ == "__main__":
    raise SystemExit(main())
