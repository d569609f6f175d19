#!/usr/bin/env python
"""Evaluation throughput (generation at batch 8 vs batch 1) and peak RSS of evaluation on 20 vs 500 samples.

    python benchmarks/eval_throughput.py [--quick] [--samples 48] [--rounds 3] [--max_new_tokens 16]
                                         [--small 20] [--large 500] [--profile] [--strict]

Part 1, in this process: ``generate_predictions`` with a ``VQACollator(mode="generate")`` on the tiny random model
(zero-shot, via ``load_for_inference``), test_set/out_002-001.jsonl + test_set/frames, 8 frames at frame_size 56,
text questions, a fixed ``max_new_tokens``. Batch 8 and batch 1 passes over the same samples alternate round by
round; samples/s(batch 8) / samples/s(batch 1) has the goal >= 4. Passes with ``max_new_tokens=1`` split the time
into data (dataset + collator), prefill (encoders + prompt) and decode steps.

Part 2, one fresh process per row: ``surgvqa.evaluate.evaluate`` (what evaluate_checkpoint.py runs: load, stream
predictions to a JSONL file, score, summary) on the first 20 vs 500 lines of a synthetic set rendered by
scripts/make_synthetic_dataset.py (no audio; cached under runs/bench/). Goal: peak RSS(500) / peak RSS(20) <= 1.1.

``--profile`` adds a cProfile of one batch-1 and one batch-8 pass (top functions by own time).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    REPO,
    TimedCollator,
    add_threads_arg,
    current_rss_mb,
    emit_result,
    environment_line,
    goal_line,
    log,
    median,
    peak_rss_mb,
    print_table,
    run_children,
    set_threads,
    subset_jsonl,
    synthetic_set,
    tiny_model,
)

THROUGHPUT_GOAL = 4.0
MEMORY_GOAL = 1.1
FRAME_SIZE = 56
DATA_FRAME_SIZE = 112
TEST_SET = REPO / "test_set"


# ------------------------------------------------------------------------------------------- part 2 (child)
def child(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--frames_dir", required=True)
    parser.add_argument("--output_file", required=True)
    parser.add_argument("--max_new_tokens", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    set_threads(args.threads)

    import logging

    from surgvqa.evaluate import EvalArguments, evaluate

    logging.disable(logging.WARNING)
    n = sum(1 for line in Path(args.data).read_text().splitlines() if line.strip())
    rss_before = current_rss_mb()
    peak_before = peak_rss_mb()
    start = time.perf_counter()
    summary = evaluate(EvalArguments(
        checkpoint_path=args.model, eval_data_path=args.data, frames_dir=args.frames_dir,
        output_file=args.output_file, frame_size=FRAME_SIZE, batch_size=8, max_new_tokens=args.max_new_tokens,
        device="cpu",
    ))
    from surgvqa.report import read_predictions

    predictions = len(read_predictions(args.output_file))  # records only: the meta line is not a prediction
    emit_result({
        "n": n, "predictions": predictions, "rss_before_mb": rss_before, "peak_before_mb": peak_before,
        "peak_mb": peak_rss_mb(), "eval_s": time.perf_counter() - start,
        "accuracy": summary.get("accuracy"),
    })
    return 0


# ---------------------------------------------------------------------------------------- part 1 (in-process)
def one_pass(model, tokenizer, dataset, collator, batch_size: int, max_new_tokens: int) -> dict:
    from surgvqa.generate import generate_predictions

    timed = TimedCollator(collator)
    start = time.perf_counter()
    predictions = list(generate_predictions(model, tokenizer, dataset, timed, batch_size=batch_size,
                                            max_new_tokens=max_new_tokens))
    wall = time.perf_counter() - start
    generate_s = sum(p.latency_ms for p in predictions) / 1000  # each row carries batch time / rows
    return {
        "wall": wall, "generate": generate_s, "collate": timed.seconds, "n": len(predictions),
        "tokens": sum(p.new_tokens for p in predictions), "eos": sum(p.stopped_by_eos for p in predictions),
    }


def profile_pass(model, tokenizer, dataset, collator, batch_size: int, max_new_tokens: int, top: int = 14) -> None:
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    one_pass(model, tokenizer, dataset, collator, batch_size, max_new_tokens)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    print(f"\ncProfile, batch {batch_size}, {len(dataset)} samples, {max_new_tokens} new tokens "
          f"(total {stats.total_tt:.2f} s), top {top} by own time:")
    for line in lines[start:]:
        print("  " + line.replace(str(REPO / ".venv/lib/python3.11/site-packages") + "/", "")
              .replace(str(REPO) + "/", ""))


def throughput(args, model_dir: Path) -> tuple[float, list]:
    from surgvqa.checkpoint import load_for_inference
    from surgvqa.collate import VQACollator
    from surgvqa.data import MediaConfig, SurgicalVQADataset, load_samples

    model, processor, _, _ = load_for_inference(model_dir)
    model.to("cpu")
    media = MediaConfig(frames_dir=str(TEST_SET / "frames"), frame_size=FRAME_SIZE)
    samples, _ = load_samples(TEST_SET / "out_002-001.jsonl", media)
    dataset = SurgicalVQADataset(samples[: args.samples], media)
    collator = VQACollator(processor, frame_size=FRAME_SIZE, mode="generate")
    tokenizer = processor.tokenizer
    n = len(dataset)

    log("warm-up ...")
    one_pass(model, tokenizer, SurgicalVQADataset(samples[:8], media), collator, 8, 2)
    runs: dict[tuple[int, int], list[dict]] = {}
    for r in range(args.rounds):
        log(f"round {r + 1}/{args.rounds} ...")
        for bs in ((8, 1) if r % 2 == 0 else (1, 8)):
            for t in (args.max_new_tokens, 1):
                runs.setdefault((bs, t), []).append(one_pass(model, tokenizer, dataset, collator, bs, t))

    def med(bs, t, key):
        return median([x[key] for x in runs[(bs, t)]])

    rows, sps = [], {}
    t_full = args.max_new_tokens
    for bs in (1, 8):
        wall, gen, coll = med(bs, t_full, "wall"), med(bs, t_full, "generate"), med(bs, t_full, "collate")
        gen1 = med(bs, 1, "generate")
        batches = -(-n // bs)
        step_ms = 1000 * (gen - gen1) / max(1, t_full - 1) / batches
        sps[bs] = n / wall
        tokens = runs[(bs, t_full)][0]["tokens"] / n
        rows.append([bs, f"{sps[bs]:.2f}", 1000 * wall / n, 1000 * (wall - gen - coll) / n, 1000 * coll / n,
                     1000 * gen1 / n, 1000 * (gen - gen1) / n, f"{step_ms:.1f}", f"{tokens:.1f}"])
    print(f"\n== eval_throughput ({'quick' if args.quick else 'full'}) part 1: generation, {n} samples x "
          f"{args.rounds} round(s), median ==")
    print(environment_line())
    print(f"tiny model (zero-shot), test_set/out_002-001.jsonl, 8 frames at {FRAME_SIZE} px, text questions, "
          f"max_new_tokens {t_full}")
    print_table(["batch", "samples/s", "ms/sample", "dataset ms", "collator ms", "prefill+1 token ms",
                 f"{t_full - 1} decode steps ms", "ms per decode step (batch)", "new tokens/sample"], rows,
                title="throughput (per-sample ms unless noted)")
    gen_ratio = (med(1, t_full, "generate") / med(8, t_full, "generate"))
    print(f"\nmodel.generate alone: batch 8 is {gen_ratio:.2f}x faster per sample than batch 1")
    ratio = sps[8] / sps[1]
    met = goal_line("throughput ratio batch 8 / batch 1 (end to end)", ratio, THROUGHPUT_GOAL, True)
    if args.profile:
        sub = SurgicalVQADataset(samples[:8], media)
        for bs in (1, 8):
            profile_pass(model, tokenizer, sub, collator, bs, t_full)
    return ratio, [met]


# --------------------------------------------------------------------------------------------------- parent
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 samples x 1 round; 8 vs 40 samples (< 60 s)")
    parser.add_argument("--samples", type=int, default=None, help="part 1 samples (default 48, quick 16)")
    parser.add_argument("--rounds", type=int, default=None, help="part 1 interleaved rounds (default 3, quick 1)")
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--small", type=int, default=None, help="part 2 small set (default 20, quick 8)")
    parser.add_argument("--large", type=int, default=None, help="part 2 large set (default 500, quick 40)")
    parser.add_argument("--skip_memory", action="store_true", help="part 1 only")
    parser.add_argument("--parallel", type=int, default=2,
                        help="part 2 child processes at a time (peaks are per process; their seconds are then "
                        "for information only)")
    parser.add_argument("--profile", action="store_true", help="cProfile a batch-1 and a batch-8 pass")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    add_threads_arg(parser)
    args = parser.parse_args(argv)
    args.samples = args.samples or (16 if args.quick else 48)
    args.rounds = args.rounds or (1 if args.quick else 3)
    small = args.small or (8 if args.quick else 20)
    large = args.large or (40 if args.quick else 500)
    set_threads(args.threads)

    model_dir = tiny_model()
    data = None if args.skip_memory else synthetic_set(500, DATA_FRAME_SIZE)
    _, met = throughput(args, model_dir)

    if data is not None:
        script = Path(__file__).resolve()
        with tempfile.TemporaryDirectory(prefix="surgvqa-eval-throughput-") as tmp:
            jobs = []
            for n in (small, large):
                jsonl = subset_jsonl(data / "in_template.jsonl", n, Path(tmp) / f"eval_{n}.jsonl")
                jobs.append((script, [
                    "--child", "--model", str(model_dir), "--data", str(jsonl), "--frames_dir",
                    str(data / "frames"), "--output_file", str(Path(tmp) / f"preds_{n}.jsonl"),
                    "--max_new_tokens", str(args.max_new_tokens), "--threads", str(args.threads),
                ]))
            log(f"child processes ({args.parallel} at a time): evaluate {small} and {large} samples ...")
            results = dict(zip((small, large), run_children(jobs, args.parallel), strict=True))
        print("\n== eval_throughput part 2: peak RSS of surgvqa.evaluate.evaluate, one fresh process per row ==")
        print(f"synthetic set ({DATA_FRAME_SIZE}-px JPEGs), 8 frames at {FRAME_SIZE} px, batch 8, "
              f"max_new_tokens {args.max_new_tokens}, predictions streamed to JSONL; {args.parallel} child "
              "process(es) at a time")
        rows = [[n, r["predictions"], r["rss_before_mb"], r["peak_mb"], r["peak_mb"] - r["rss_before_mb"],
                 r["eval_s"], f"{r['predictions'] / r['eval_s']:.2f}"] for n, r in results.items()]
        print_table(["samples", "predictions", "RSS after imports MiB", "peak RSS MiB", "peak - start MiB",
                     "evaluate s", "samples/s"], rows, title="peak RSS (whole process)")
        print()
        ratio = results[large]["peak_mb"] / results[small]["peak_mb"]
        met.append(goal_line(f"peak RSS ratio {large} / {small} samples", ratio, MEMORY_GOAL, False))
    return 1 if args.strict and not all(met) else 0


if __name__ == "__main__":
    raise SystemExit(main())
