"""What does the tiny demo model learn, and what does each lever change? Held-out accuracy per question type.

Trains the `make demo` setting (tiny random Qwen2.5-Omni thinker, synthetic clips, LoRA, the same flags
`train_with_eval_FINAL.sh` passes) with one lever changed at a time, and logs, every ``--eval_every`` steps, the
greedy strict accuracy of each question type on held-out clips of a video never trained on, next to that type's
majority baseline. At the end each run is scored again with every frame replaced by one constant frame (the
processor's normalisation mean): a type that really reads the video falls to its majority there.

    python benchmarks/demo_learning.py                           # every variant, one fresh process each
    python benchmarks/demo_learning.py --variants base,static    # some of them
    python benchmarks/demo_learning.py --table                   # reprint the table of the saved results

Results are saved per variant under ``runs/bench/demo_learning/<variant>.json``; ``--table`` reads them back.
Everything runs with one torch thread; a variant takes 1-4 minutes on one core.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from _common import REPO, cached_build, emit_result, load_script, log, run_children

RESULTS = REPO / "runs" / "bench" / "demo_learning"
TRAIN_VIDEOS = ("002-002", "002-003", "002-004", "002-005")
HELDOUT_VIDEO = "002-006"
#: question types whose answer is in every single frame vs those that need the change across frames
STATIC_TYPES = ("nbi_status", "lesion_screen_position", "tool_catheter_check", "occlusion_check")
MOTION_TYPES = (
    "scope_forward_motion", "scope_backward_motion", "scope_motion_type", "scope_motion", "lesion_motion_direction",
)

#: the demo's setting before this diagnostic (tiny model, 56 px, lr 5e-3, batch 4, merger trained, 160 clips)
BASE: dict = {
    "model": {"text_hidden": 128, "layers": 2, "tower_hidden": 32, "tower_depth": None, "patch_embed_std": None,
              "llm_gain": None, "patch_embed": "random"},
    "types": STATIC_TYPES + MOTION_TYPES,
    "lighting": "mixed",
    "train_clips": 160,
    "heldout_clips": 60,
    "frame_size": 56,
    "steps": 400,
    "lr": 5e-3,
    "batch": 4,
    "lora_r": 16,
    "train_projectors": True,
    "lora_vision_tower": False,
}

#: one lever changed at a time (dicts merge into BASE; "model" merges key by key)
VARIANTS: dict[str, dict] = {
    "base": {},
    "static": {"types": STATIC_TYPES},
    "white_light": {"lighting": "white", "types": tuple(t for t in STATIC_TYPES + MOTION_TYPES if t != "nbi_status")},
    "motion": {"types": MOTION_TYPES},
    "112px": {"frame_size": 112},
    "llm_256x4": {"model": {"text_hidden": 256, "layers": 4}},
    "tower_64x4": {"model": {"tower_hidden": 64, "tower_depth": 4}},
    "patch_std_0.1": {"model": {"patch_embed_std": 0.1}},
    "lora_vision": {"lora_vision_tower": True},
    "no_merger": {"train_projectors": False},
    "lr_1e-3": {"lr": 1e-3},
    "lr_2e-2": {"lr": 2e-2},
    "batch_8": {"batch": 8},
    "steps_1200": {"steps": 1200},
    "clips_480": {"train_clips": 480},
    "clips_960": {"train_clips": 960},
    "lora_r4": {"lora_r": 4},
    "llm_unit_gain": {"model": {"llm_gain": 1.0}},
    "patch_pool": {"model": {"patch_embed": "pool"}},
    "nbi_tool": {"types": ("nbi_status", "tool_catheter_check")},
    "nbi_tool_occl": {"types": ("nbi_status", "tool_catheter_check", "occlusion_check")},
}


def _lever(part: str) -> dict:
    """A named variant, or ``key=value`` (JSON value) for any BASE or model setting, e.g. ``steps=800``."""
    if "=" not in part:
        return VARIANTS[part]
    key, value = part.split("=", 1)
    value = json.loads(value)
    if key in BASE["model"]:
        return {"model": {key: value}}
    if key not in BASE:
        raise KeyError(key)
    return {key: value}


def settings_for(name: str, overrides: dict | None = None) -> dict:
    """BASE with the variant's overrides (``a+b`` applies both, left to right) and any extra ``overrides``."""
    merged = json.loads(json.dumps(BASE))
    for change in (*(_lever(part) for part in name.split("+")), overrides or {}):
        for key, value in change.items():
            if key == "model":
                merged["model"].update(value)
            else:
                merged[key] = value
    merged["types"] = list(merged["types"])
    return merged


# ------------------------------------------------------------------------------------------------- building
def tiny_model(shape: dict) -> Path:
    script = REPO / "scripts" / "make_tiny_model.py"
    key = _common_digest(sorted(shape.items()), script)
    return cached_build(
        "demo-tiny-omni", key, lambda out: load_script("make_tiny_model").build_tiny_model(out, seed=0, **shape)
    )


def synthetic(num_clips: int, seed: int, video_ids: tuple[str, ...], types: list[str], lighting: str) -> Path:
    """Clips with 3 questions each, asked only of ``types`` (cached under runs/bench)."""
    script = REPO / "scripts" / "make_synthetic_dataset.py"
    key = _common_digest((num_clips, seed, video_ids, sorted(types), lighting), script)
    return cached_build(
        f"demo-data-{num_clips}clips-seed{seed}", key,
        lambda out: load_script("make_synthetic_dataset").make_dataset(
            out, num_clips, seed, video_ids=video_ids, frame_size=112, audio=False, progress=False,
            question_types=types, lighting=lighting,
        ),
    )


def _common_digest(parts, script: Path) -> str:
    from _common import _digest

    return _digest(parts, files=[script])


# ------------------------------------------------------------------------------------------------- scoring
class ConstantFrames:
    """A dataset view whose every frame is the same constant frame: the processor's normalisation mean."""

    def __init__(self, dataset, mean: list[float]) -> None:
        import numpy as np

        self.dataset, self.samples = dataset, dataset.samples
        self.pixel = np.rint(np.asarray(mean) * 255).astype(np.uint8)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        import numpy as np

        item = dict(self.dataset[i])
        item["frames"] = [np.broadcast_to(self.pixel, f.shape).copy() for f in item["frames"]]
        return item


def per_type_accuracy(model, processor, dataset, collator, candidates) -> dict:
    from surgvqa.generate import generate_predictions
    from surgvqa.metrics import strict_hit

    by_key = {s.key: s for s in dataset.samples}
    hits, counts, no_eos = Counter(), Counter(), 0
    for p in generate_predictions(model, processor.tokenizer, dataset, collator, batch_size=16, max_new_tokens=24):
        sample = by_key[p.key]
        counts[sample.question_type] += 1
        hits[sample.question_type] += strict_hit(p.text, sample.short_answer, candidates[sample.question_type])
        no_eos += not p.stopped_by_eos
    per_type = {t: hits[t] / counts[t] for t in sorted(counts)}
    return {"overall": sum(hits.values()) / sum(counts.values()), "per_type": per_type, "no_eos": no_eos}


def majority(samples) -> dict:
    by_type: dict[str, Counter] = defaultdict(Counter)
    for s in samples:
        by_type[s.question_type][s.short_answer] += 1
    per_type = {t: max(c.values()) / sum(c.values()) for t, c in sorted(by_type.items())}
    overall = sum(max(c.values()) for c in by_type.values()) / len(samples)
    return {"overall": overall, "per_type": per_type, "n": {t: sum(c.values()) for t, c in by_type.items()}}


# ---------------------------------------------------------------------------------------------- one variant
def run_variant(name: str, settings: dict, eval_every: int, work: Path) -> dict:
    import torch
    from transformers import TrainerCallback

    import surgvqa.train as training
    from surgvqa.collate import VQACollator
    from surgvqa.data import MediaConfig, SurgicalVQADataset, load_samples
    from surgvqa.metrics import build_candidates

    torch.set_num_threads(1)
    model_dir = tiny_model(settings["model"])
    train_set = synthetic(settings["train_clips"], 7, TRAIN_VIDEOS, settings["types"], settings["lighting"])
    heldout_set = synthetic(settings["heldout_clips"], 8, (HELDOUT_VIDEO,), settings["types"], settings["lighting"])
    shutil.rmtree(work, ignore_errors=True)  # a fresh run: an output directory of another run is refused
    work.mkdir(parents=True)
    train_file, heldout_file = train_set / "in_template.jsonl", heldout_set / "in_template.jsonl"
    size = settings["frame_size"]
    media = MediaConfig(frames_dir=str(heldout_set / "frames"), frame_size=size, max_frames=8)
    samples, _ = load_samples(heldout_file, media)
    heldout = SurgicalVQADataset(samples, media)
    candidates = build_candidates((s.question_type, s.short_answer) for s in samples)
    base = majority(samples)
    curve: list[dict] = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
            if state.global_step % eval_every and state.global_step != state.max_steps:
                return control
            collator = VQACollator(processing_class, frame_size=size, mode="generate")
            result = per_type_accuracy(model, processing_class, heldout, collator, candidates)
            losses = [h["loss"] for h in state.log_history if "loss" in h]
            result.update(step=state.global_step, loss=losses[-1] if losses else None)
            curve.append(result)
            log(f"[{name}] step {state.global_step}: held-out {100 * result['overall']:.1f} % "
                f"(majority {100 * base['overall']:.1f} %), loss {result['loss']}")
            if state.global_step == state.max_steps:
                blind = per_type_accuracy(model, processing_class, ConstantFrames(heldout, collator.processor
                                          .video_processor.image_mean), collator, candidates)
                curve[-1]["constant_frame"] = blind
            return control

    class ProbingTrainer(training.VQATrainer):
        def __init__(self, *args, **kwargs):
            kwargs["callbacks"] = [*kwargs.get("callbacks", []), Probe()]
            super().__init__(*args, **kwargs)

    argv = [
        "--model_name_or_path", str(model_dir), "--train_data_path", str(train_file),
        "--frames_dir", str(train_set / "frames"), "--frame_size", str(size), "--max_train_frames", "8",
        "--output_dir", str(work / "adapter"), "--per_device_train_batch_size", str(settings["batch"]),
        "--learning_rate", str(settings["lr"]), "--max_steps", str(settings["steps"]),
        "--lora_r", str(settings["lora_r"]), "--lora_alpha", str(2 * settings["lora_r"]),
        "--warmup_steps", "0.03", "--lr_scheduler_type", "cosine",
        "--train_projectors", str(settings["train_projectors"]),
        "--lora_vision_tower", str(settings["lora_vision_tower"]),
        "--save_strategy", "no", "--logging_steps", "10", "--dataloader_num_workers", "0",
        "--use_cpu", "True", "--seed", "0", "--disable_tqdm", "True", "--report_to", "none",
    ]
    original = training.VQATrainer
    training.VQATrainer = ProbingTrainer
    start = time.perf_counter()
    try:
        training.train(*training.parse_args(argv))
    finally:
        training.VQATrainer = original
    return {
        "variant": name, "settings": settings, "majority": base, "curve": curve,
        "seconds": round(time.perf_counter() - start, 1), "train_samples": len(train_file.read_text().splitlines()),
    }


# ------------------------------------------------------------------------------------------------ reporting
SHORT = {
    "nbi_status": "nbi", "lesion_screen_position": "quad", "tool_catheter_check": "tool", "occlusion_check": "occl",
    "scope_forward_motion": "fwd", "scope_backward_motion": "bwd", "scope_motion_type": "mtype",
    "scope_motion": "moving", "lesion_motion_direction": "ldir",
}


def table(results: list[dict]) -> str:
    """Markdown: one row per variant, held-out accuracy at the end of the budget (majority in brackets)."""
    types = [t for t in (*STATIC_TYPES, *MOTION_TYPES) if any(t in r["majority"]["per_type"] for r in results)]
    head = ["variant", "train samples", "lr", "steps", "loss", "all (maj)", "const. frame",
            *(SHORT[t] for t in types), "s"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        last = r["curve"][-1]
        cells = [
            r["variant"], str(r["train_samples"]), f"{r['settings']['lr']:g}", str(last["step"]), f"{last['loss']:.2f}" if last["loss"] is not None else "-",
            f"**{100 * last['overall']:.0f}** ({100 * r['majority']['overall']:.0f})",
            f"{100 * last['constant_frame']['overall']:.0f}" if "constant_frame" in last else "-",
        ]
        for t in types:
            if t in last["per_type"]:
                cells.append(f"{100 * last['per_type'][t]:.0f} ({100 * r['majority']['per_type'][t]:.0f})")
            else:
                cells.append("")
        cells.append(f"{r['seconds']:.0f}")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def curves(results: list[dict]) -> str:
    lines = []
    for r in results:
        points = "  ".join(f"{c['step']}:{100 * c['overall']:.0f}" for c in r["curve"])
        lines.append(f"{r['variant']:>14}  majority {100 * r['majority']['overall']:.0f}  |  {points}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--variants", default=",".join(VARIANTS),
        help=f"comma-separated; each one of {', '.join(VARIANTS)} or key=value, joined by '+' (static+steps=800)",
    )
    parser.add_argument("--eval_every", type=int, default=100)
    parser.add_argument("--set", default=None, help='JSON overrides for every variant, e.g. \'{"steps": 200}\'')
    parser.add_argument("--table", action="store_true", help="only print the table of the saved results")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = []
    for n in names:
        try:
            settings_for(n)
        except (KeyError, ValueError):
            unknown.append(n)
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    overrides = json.loads(args.set) if args.set else None

    if args.child:
        settings = settings_for(args.child, overrides)
        result = run_variant(args.child, settings, args.eval_every, RESULTS / "work" / args.child)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{args.child}.json").write_text(json.dumps(result, indent=1) + "\n")
        emit_result({"variant": args.child})
        return 0

    if not args.table:
        extra = ["--set", args.set] if args.set else []
        for name in names:  # one at a time: the timings stay comparable and the machine stays usable
            log(f"variant {name} ...")
            run_children([(Path(__file__), ["--child", name, "--eval_every", str(args.eval_every), *extra])],
                         parallel=1, timeout=3600)
    results = [json.loads((RESULTS / f"{n}.json").read_text()) for n in names if (RESULTS / f"{n}.json").is_file()]
    if not results:
        print("no saved results: run without --table first", file=sys.stderr)
        return 1
    print(table(results))
    print()
    print("held-out accuracy (%) over steps:")
    print(curves(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
