#!/usr/bin/env python
"""Data-path throughput: SurgicalVQADataset + VQACollator (train mode) next to decode-only of the same files.

    python benchmarks/data_throughput.py [--quick] [--samples N] [--rounds R] [--strict]

Each sample: 8 JPEG frames of 384x384 px (rendered by scripts/make_synthetic_dataset.py, cached under runs/bench/)
plus a 3 s 16 kHz WAV (tone + noise), question_modality text+audio, frame_size 384, the tiny model's processor.
The decode-only pass (PIL decode of the 8 JPEGs + soundfile read of the WAV) is the data path's limit; the ratio
data-path samples/s / decode-only samples/s has the goal >= 0.5. Passes are interleaved round by round (decode,
batch 1, batch 4, ...) and the median round is reported, so the ratio is measured side by side in one run.
Single process (DataLoader num_workers=0) on both sides; a row with 2 DataLoader workers is for information only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    TimedCollator,
    _digest,
    add_threads_arg,
    cached_build,
    environment_line,
    goal_line,
    log,
    median,
    print_table,
    set_threads,
    synthetic_set,
    tiny_model,
    write_tone_wavs,
)

GOAL = 0.5
FRAME_SIZE = 384
AUDIO_SECONDS = 3.0


def decode_only(samples) -> None:
    """The limit: decode every JPEG (PIL) and read every WAV (soundfile), nothing else."""
    import soundfile as sf
    from PIL import Image

    for sample in samples:
        for path in sample.frame_paths:
            with Image.open(path) as img:
                img.load()
        sf.read(str(sample.audio_path), dtype="float32")


def data_path(dataset, collator, batch_size: int, num_workers: int = 0) -> tuple[float, float, int]:
    """(total seconds, seconds in the collator (0 with workers), tokens) for one pass over the dataset."""
    from torch.utils.data import DataLoader

    timed = TimedCollator(collator)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=timed, num_workers=num_workers,
                        persistent_workers=False)
    tokens = 0
    start = time.perf_counter()
    for batch in loader:
        tokens += int(batch["attention_mask"].sum())
    return time.perf_counter() - start, timed.seconds, tokens


def collator_breakdown(dataset, collator, batch_size: int) -> dict[str, float]:
    """Seconds per sample inside one collator pass: video processor, audio features, the rest (text, padding)."""
    processor = collator.processor
    spent = {"video": 0.0, "audio": 0.0}
    originals = {"video": processor._process_videos, "audio": processor._process_audio}

    def timed(kind):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return originals[kind](*args, **kwargs)
            finally:
                spent[kind] += time.perf_counter() - start
        return call

    items = [dataset[i] for i in range(len(dataset))]
    processor._process_videos, processor._process_audio = timed("video"), timed("audio")
    try:
        start = time.perf_counter()
        for i in range(0, len(items), batch_size):
            collator(items[i:i + batch_size])
        total = time.perf_counter() - start
    finally:
        del processor._process_videos, processor._process_audio
    n = len(items)
    return {"total": total / n, "video": spent["video"] / n, "audio": spent["audio"] / n,
            "rest": (total - spent["video"] - spent["audio"]) / n}


def getitem_breakdown(dataset) -> dict[str, float]:
    """Seconds per sample of the dataset's pieces: load_frame x8 (decode + resize to the budget), load_audio."""
    from surgvqa.audio import DEFAULT_SAMPLING_RATE, load_audio
    from surgvqa.media import load_frame

    frames = audio = 0.0
    for sample in dataset.samples:
        start = time.perf_counter()
        for path in sample.frame_paths:
            load_frame(path, dataset.media.frame_size)
        mid = time.perf_counter()
        load_audio(sample.audio_path, DEFAULT_SAMPLING_RATE)
        frames += mid - start
        audio += time.perf_counter() - mid
    n = len(dataset)
    return {"frames": frames / n, "audio": audio / n}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples and rounds (< 60 s)")
    parser.add_argument("--samples", type=int, default=None, help="samples per pass (default 24, quick 8)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, quick 1)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    add_threads_arg(parser)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    n = args.samples or (8 if args.quick else 24)
    rounds = args.rounds or (1 if args.quick else 3)

    from surgvqa.backbones import backbone_for
    from surgvqa.collate import VQACollator
    from surgvqa.data import MediaConfig, SurgicalVQADataset, load_samples

    model_dir = tiny_model()
    data = synthetic_set(max(n, 24), FRAME_SIZE)
    jsonl = data / "in_template.jsonl"
    audio_root = cached_build(
        "tone-wavs", _digest(jsonl.read_text(), AUDIO_SECONDS),
        lambda out: write_tone_wavs(jsonl, out, seconds=AUDIO_SECONDS),
    )
    processor = backbone_for(model_dir).load_processor(str(model_dir))
    media = MediaConfig(frames_dir=str(data / "frames"), audio_dir=str(audio_root), frame_size=FRAME_SIZE,
                        question_modality="text+audio")
    samples, _ = load_samples(jsonl, media)
    samples = samples[:n]
    dataset = SurgicalVQADataset(samples, media)
    collator = VQACollator(processor, question_modality="text+audio", frame_size=FRAME_SIZE, mode="train")

    log(f"warm-up ({n} samples) ...")
    decode_only(samples)  # page cache
    data_path(dataset, collator, 4)
    first = dataset[0]
    frame_hw = first["frames"][0].shape[:2]

    runs: dict[str, list[float]] = {"decode": [], "bs1": [], "bs4": [], "bs4_w2": []}
    collate_s: dict[str, list[float]] = {"bs1": [], "bs4": []}
    tokens = {}
    for r in range(rounds):
        log(f"round {r + 1}/{rounds} ...")
        start = time.perf_counter()
        decode_only(samples)
        runs["decode"].append(time.perf_counter() - start)
        for bs in (1, 4):
            total, in_collator, tokens[bs] = data_path(dataset, collator, bs)
            runs[f"bs{bs}"].append(total)
            collate_s[f"bs{bs}"].append(in_collator)
        runs["bs4_w2"].append(data_path(dataset, collator, 4, num_workers=2)[0])

    decode_sps = n / median(runs["decode"])
    rows = [["decode only (PIL 8 JPEG + soundfile WAV)", "-", "-", f"{decode_sps:.2f}",
             f"{1000 / decode_sps:.1f}", "-", "1.00"]]
    ratios = {}
    for bs in (1, 4):
        sps = n / median(runs[f"bs{bs}"])
        coll_ms = 1000 * median(collate_s[f"bs{bs}"]) / n
        ratios[bs] = sps / decode_sps
        rows.append([f"dataset + collator, batch {bs}", bs, 0, f"{sps:.2f}", f"{1000 / sps:.1f}",
                     f"{coll_ms:.1f}", f"{ratios[bs]:.3f}"])
    sps_w2 = n / median(runs["bs4_w2"])
    rows.append(["dataset + collator, batch 4, 2 workers (info)", 4, 2, f"{sps_w2:.2f}", f"{1000 / sps_w2:.1f}",
                 "-", f"{sps_w2 / decode_sps:.3f}"])

    log("breakdown ...")
    parts = getitem_breakdown(dataset)
    coll = collator_breakdown(dataset, collator, 4)

    print(f"\n== data_throughput ({'quick' if args.quick else 'full'}): {n} samples x {rounds} round(s), median "
          "round ==")
    print(f"{environment_line()}")
    print(f"sample: 8 JPEG frames {FRAME_SIZE}x{FRAME_SIZE} -> {frame_hw[1]}x{frame_hw[0]} after fit_to_budget, "
          f"{AUDIO_SECONDS:g} s WAV, question_modality text+audio, collator mode train, "
          f"~{tokens[4] / n:.0f} tokens/sample")
    print_table(["path", "batch", "workers", "samples/s", "ms/sample", "in collator ms", "ratio vs decode"], rows,
                title="throughput")
    print_table(
        ["stage (per sample)", "ms"],
        [
            ["decode only: 8 JPEG + WAV", 1000 / decode_sps],
            ["dataset: 8 x load_frame (decode + bicubic resize)", 1000 * parts["frames"]],
            ["dataset: load_audio", 1000 * parts["audio"]],
            ["collator (batch 4): video processor", 1000 * coll["video"]],
            ["collator (batch 4): audio features (Whisper fbank)", 1000 * coll["audio"]],
            ["collator (batch 4): text, tokenizer, padding, labels", 1000 * coll["rest"]],
        ],
        title="where a sample's time goes",
    )
    print()
    met = [goal_line(f"ratio batch {bs} (data path / decode only)", ratios[bs], GOAL, True) for bs in (1, 4)]
    return 1 if args.strict and not all(met) else 0


if __name__ == "__main__":
    raise SystemExit(main())
