#!/usr/bin/env python
"""Where a training step goes: s/step, the share spent waiting for data, peak RSS; frame cache and LM head rows.

    python benchmarks/train_step.py [--quick] [--rounds R] [--threads N] [--only content_check]

Each row is one fresh process running ``surgvqa.train.train`` (the real training loop: Trainer, LoRA r16 on the
language model, AdamW, DataLoader with 0 workers) on the tiny Qwen2.5-Omni thinker with 160 synthetic samples: 8 JPEG
frames of 112 px resized to 56 px, a 3 s spoken question (tone WAV), question_modality text+audio, batch 8 (the
side-by-side LLaMA-Factory harness's settings), so one epoch is 20 steps.

* data path, 2 epochs each: ``--frame_cache none --encoding_cache_gb 0`` (every frame decoded, every batch through
  the processor), ``--frame_cache disk --encoding_cache_gb 0``, and the defaults (``disk`` plus the collator's
  encoding cache). Epoch 1 decodes and writes every frame (and keeps every encoding); epoch 2 reads them back.
  Steps 1-2 of each epoch are left out of its mean (first-step effects).
* the frame cache's content checks: ``--frame_cache disk --encoding_cache_gb 0`` again with the checks swapped out
  (the key from the file's stat instead of a hash of its bytes, no checksum of the pixels): the epoch-2 ratio is what
  proving every entry by its content costs (``--only content_check`` runs just these two rows).
* LM head: the same data on the tiny model with the real 151,643-token Qwen vocabulary (``--vocab qwen``), full
  logits (``--loss_on_labelled_only False``) vs labelled positions only: s/step and peak RSS.
* computed: the logits the labelled-only loss avoids for Qwen2.5-Omni-7B (vocabulary 152,064) at 8 frames x 384 px
  (REAL-Colon 1352x1080 frames -> 364x280), token counts from the real processor math and the real Qwen tokenizer.

"data wait" is the time the Trainer spends fetching the step's batch (``get_batch_samples``: dataset + collator with
0 workers). Rows run one after another, never side by side; with ``--rounds`` > 1 the order alternates and the
median is reported. Peak RSS is ``ru_maxrss`` of the row's process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    _digest,
    add_threads_arg,
    cached_build,
    emit_result,
    environment_line,
    load_script,
    log,
    peak_rss_mb,
    print_table,
    run_child,
    set_threads,
    tiny_model,
    write_tone_wavs,
)

SAMPLES = 160
BATCH = 8
FRAME_SIZE = 56
QWEN_7B_VOCAB = 152_064
REAL_COLON_FRAME = (1352, 1080)  # width, height


def harness_set() -> tuple[Path, Path]:
    """160 samples, 112-px frames (make_synthetic_dataset --num_samples 160 --seed 11), tone WAVs: (data, audio)."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_synthetic_dataset.py"

    def build(out: Path) -> None:
        log(f"rendering {SAMPLES} synthetic samples ...")
        load_script("make_synthetic_dataset").make_dataset(
            out, None, 11, num_samples=SAMPLES, frame_size=112, audio=False, progress=False
        )

    data = cached_build(f"data-{SAMPLES}x112px-seed11", _digest(SAMPLES, 112, 11, files=[script]), build)
    jsonl = data / "in_template.jsonl"
    audio = cached_build("tone-wavs", _digest(jsonl.read_text(), 3.0), lambda out: write_tone_wavs(jsonl, out))
    return data, audio


# --------------------------------------------------------------------------------------------------- child
def child(spec: dict) -> None:
    """One row: train for ``spec["steps"]`` steps, stamping every step end and every batch fetch."""
    set_threads(spec["threads"])
    import surgvqa.train as train_module

    fetch: list[float] = []
    ends: list[float] = []
    original = train_module.VQATrainer.get_batch_samples

    def timed_fetch(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            fetch.append(time.perf_counter() - start)

    train_module.VQATrainer.get_batch_samples = timed_fetch

    checking = [0.0]  # seconds spent in the frame cache's content checks so far
    check_at_end: list[float] = []

    class Stamp(train_module.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())
            check_at_end.append(checking[0])

    original_init = train_module.VQATrainer.__init__

    def init(self, *args, **kwargs):
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), Stamp()]
        original_init(self, *args, **kwargs)

    train_module.VQATrainer.__init__ = init
    from surgvqa.frame_cache import FrameCache

    def timing(check):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return check(*args, **kwargs)
            finally:
                checking[0] += time.perf_counter() - start
        return timed

    # time the checks where they run (in the same steps)
    FrameCache.source_digest = timing(FrameCache.source_digest)
    FrameCache.array_digest = staticmethod(timing(FrameCache.array_digest))
    if not spec.get("content_check", True):  # price the checks: stat-based key, no pixel checksum
        import os

        def stat_digest(self, path):
            st = os.stat(path)
            return f"stat:{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"

        FrameCache.source_digest = stat_digest
        FrameCache.array_digest = staticmethod(lambda data: bytes(16))
    out = Path(spec["out"])
    argv = [
        "--model_name_or_path", spec["model"], "--train_data_path", spec["jsonl"], "--frames_dir", spec["frames"],
        "--audio_dir", spec["audio"], "--question_modality", "text+audio", "--frame_size", str(FRAME_SIZE),
        "--per_device_train_batch_size", str(BATCH), "--learning_rate", "2e-3", "--max_steps", str(spec["steps"]),
        "--lr_scheduler_type", "linear", "--warmup_steps", "0", "--optim", "adamw_torch", "--weight_decay", "0",
        "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0.05", "--dataloader_num_workers", "0",
        "--use_cpu", "True", "--logging_steps", "1", "--save_strategy", "no", "--seed", "42", "--report_to", "none",
        "--disable_tqdm", "True", "--output_dir", str(out), "--frame_cache", spec["frame_cache"],
        "--loss_on_labelled_only", str(spec["labelled"]), "--encoding_cache_gb", str(spec["encoding_cache_gb"]),
        "--tower_cache_gb", str(spec["encoding_cache_gb"]),  # the rows turn both caches on or off together
    ]
    result = train_module.train(*train_module.parse_args(argv))
    trainer = result["trainer"]
    # fetch i precedes step i (one accumulation step per update here); step i lasts ends[i] - ends[i-1]
    steps = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    waits = fetch[1:len(ends)]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    cache = trainer.train_dataset.frame_cache
    checks = [b - a for a, b in zip(check_at_end, check_at_end[1:], strict=False)]
    emit_result({"steps": steps, "waits": waits, "checks": checks, "peak_rss_mib": peak_rss_mb(), "losses": losses,
                 "cache": cache.stats() if cache is not None else None})


# -------------------------------------------------------------------------------------------------- parent
def epoch_means(result: dict, steps_per_epoch: int, skip: int = 2) -> list[tuple[float, float]]:
    """(s/step, data-wait share) per epoch, leaving out the first ``skip`` steps of each epoch.

    ``result["steps"][i]`` is step i + 2 (the first step has no start stamp), so epoch e covers indices
    ``e * steps_per_epoch - 1 ...``.
    """
    out = []
    n = len(result["steps"])
    for e in range(0, (n + 1) // steps_per_epoch):
        lo = max(0, e * steps_per_epoch - 1 + skip)
        hi = min(n, (e + 1) * steps_per_epoch - 1)
        if hi <= lo:
            continue
        step = statistics.mean(result["steps"][lo:hi])
        wait = statistics.mean(result["waits"][lo:hi])
        out.append((step, wait / step))
    return out


def logits_figure(model_dir: Path, test_set: Path) -> dict:
    """Positions and labelled tokens per sample at 8 frames x 384 px with the real Qwen tokenizer (test_set)."""
    import soundfile as sf

    from surgvqa.backbones import backbone_for
    from surgvqa.collate import VQACollator
    from surgvqa.data import MediaConfig, load_samples
    from surgvqa.media import fit_to_budget

    processor = backbone_for(model_dir).load_processor(str(model_dir))
    collator = VQACollator(processor, question_modality="text+audio", frame_size=384, mode="train")
    media = MediaConfig(frames_dir=str(test_set / "frames"), audio_dir=str(test_set / "audio" / "in_002-001"),
                        question_modality="text+audio")
    samples, _ = load_samples(test_set / "in_002-001.jsonl", media)
    w, h = fit_to_budget(*REAL_COLON_FRAME, 384)
    positions, labelled = [], []
    for s in samples:
        info = sf.info(str(s.audio_path))
        audio = int(info.frames * 16000 / info.samplerate)
        positions.append(collator.sequence_length(s.question, s.answer, (h, w), 8, audio))
        labelled.append(len(collator.answer_ids(s.answer)))
    pos, lab = statistics.mean(positions), statistics.mean(labelled)
    return {"positions": pos, "labelled": lab, "frame": f"{w}x{h}", "n": len(samples),
            "avoided_fp32": (pos - lab) * QWEN_7B_VOCAB * 4, "avoided_bf16": (pos - lab) * QWEN_7B_VOCAB * 2}


def hash_vs_decode(tmp: Path, reps: int = 20) -> tuple[float, float, int]:
    """(ms to hash, ms to decode + resize to 384 px) one REAL-Colon-sized JPEG (1352x1080, smooth + noise), bytes."""
    import numpy as np
    from PIL import Image

    from surgvqa.frame_cache import content_digest
    from surgvqa.media import load_frame

    rng = np.random.default_rng(0)
    w, h = REAL_COLON_FRAME
    ramp = np.linspace(0, 200, w)[None, :, None] + np.linspace(0, 50, h)[:, None, None]
    pixels = np.clip(ramp + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    path = tmp / "real-colon-sized.jpg"
    Image.fromarray(pixels).save(path, quality=92)
    times = {}
    for name, call in (("hash", lambda: content_digest(path)), ("decode", lambda: load_frame(path, 384))):
        call()
        start = time.perf_counter()
        for _ in range(reps):
            call()
        times[name] = (time.perf_counter() - start) / reps * 1e3
    return times["hash"], times["decode"], path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 round, fewer LM-head steps")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per row (default 1)")
    parser.add_argument("--only", choices=["content_check"], default=None,
                        help="content_check: only the frame cache rows with its content checks on and off")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    add_threads_arg(parser)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0

    import tempfile

    rounds = args.rounds or 1
    epoch = SAMPLES // BATCH
    head_steps = 6 if args.quick else 12
    data, audio = harness_set()
    models = {"tiny": tiny_model(vocab="tiny"), "qwen": tiny_model(vocab="qwen")}
    unchecked = "frame cache disk without content checks, encoding cache off"
    rows = [  # (name, model, frame cache, encoding cache GB, labelled-only, steps)
        ("frame cache none, encoding cache off", "tiny", "none", 0, True, 2 * epoch),
        ("frame cache disk, encoding cache off", "tiny", "disk", 0, True, 2 * epoch),
        (unchecked, "tiny", "disk", 0, True, 2 * epoch),
        ("frame cache disk + encoding cache (defaults)", "tiny", "disk", 2, True, 2 * epoch),
        ("LM head: full logits", "qwen", "disk", 2, False, head_steps),
        ("LM head: labelled positions only", "qwen", "disk", 2, True, head_steps),
    ]
    if args.only == "content_check":
        rows = rows[1:3]
    data_rows = [name for name, *_ in rows if name.startswith("frame cache")]
    results: dict[str, list[dict]] = {name: [] for name, *_ in rows}
    script = Path(__file__).resolve()
    with tempfile.TemporaryDirectory(prefix="surgvqa-train-step-") as tmp:
        for r in range(rounds):
            order = rows if r % 2 == 0 else list(reversed(rows))
            for name, model, cache, encoding, labelled, steps in order:
                log(f"round {r + 1}/{rounds}: {name} ({steps} steps) ...")
                spec = {"model": str(models[model]), "jsonl": str(data / "in_template.jsonl"),
                        "frames": str(data / "frames"), "audio": str(audio), "frame_cache": cache,
                        "labelled": labelled, "steps": steps, "threads": args.threads, "encoding_cache_gb": encoding,
                        "content_check": name != unchecked,
                        "out": str(Path(tmp) / f"round{r}-row{rows.index((name, model, cache, encoding, labelled, steps))}")}
                results[name].append(run_child(script, ["--child", json.dumps(spec)], timeout=1800))

    def med(values):
        return statistics.median(values)

    print(f"\n== train_step: {SAMPLES} samples, batch {BATCH}, 8 frames at {FRAME_SIZE} px + 3 s audio, "
          f"{rounds} round(s) ==")
    print(environment_line(threads=args.threads))
    cache_rows = []
    for name in data_rows:
        per_round = [epoch_means(res, epoch) for res in results[name]]
        for e in range(2):
            step = med([p[e][0] for p in per_round])
            share = med([p[e][1] for p in per_round])
            cache_rows.append([name, e + 1, f"{step:.4f}", f"{100 * share:.1f} %",
                               f"{med([res['peak_rss_mib'] for res in results[name]]):,.0f}"])
    print_table(["row (tiny vocab)", "epoch", "s/step", "waiting for data", "peak RSS MiB"], cache_rows,
                title="data path (steps 3-20 of each epoch)")
    on = results["frame cache disk, encoding cache off"]
    checked = med([epoch_means(res, epoch)[1][0] for res in on])
    plain = med([epoch_means(res, epoch)[1][0] for res in results[unchecked]])
    lo, hi = epoch + 1, 2 * epoch - 1  # epoch 2 less its first 2 steps, as in the table
    share = med([statistics.mean(r["checks"][lo:hi]) / statistics.mean(r["steps"][lo:hi]) for r in on])
    print(f"content checks, epoch 2 (every frame read back from the disk cache), timed inside the same steps: "
          f"{1e3 * med([statistics.mean(r['checks'][lo:hi]) for r in on]):.2f} ms of a {1e3 * checked:.0f} ms "
          f"step = {100 * share:.2f} %")
    print(f"rows on / off (separate processes, one after the other: wall-clock noise included): s/step "
          f"{checked / plain:.3f}")
    with tempfile.TemporaryDirectory(prefix="surgvqa-hash-") as tmp:
        hashed, decoded, size = hash_vs_decode(Path(tmp))
    print(f"one 1352x1080 JPEG ({size / 1e3:.0f} kB): content hash {hashed:.3f} ms, decode + resize to 384 px "
          f"{decoded:.1f} ms (the hash costs {100 * hashed / decoded:.2f} % of the decode a hit saves)")
    if args.only == "content_check":
        return 0
    disk = results[data_rows[-1]][0]["cache"]
    print(f"disk cache, main process: {disk['hits']} hits, {disk['misses']} misses, {disk['bytes'] / 1e6:.1f} MB")

    head_rows = []
    for name in ("LM head: full logits", "LM head: labelled positions only"):
        steps = [statistics.mean(res["steps"][1:]) for res in results[name]]
        head_rows.append([name, f"{med(steps):.3f}",
                          f"{med([res['peak_rss_mib'] for res in results[name]]):,.0f}",
                          f"{results[name][0]['losses'][0]:.6f}"])
    print_table(["row (Qwen vocabulary, 151,680 rows)", "s/step", "peak RSS MiB", "loss step 1"], head_rows,
                title=f"LM head (steps 3-{head_steps})")
    full, lab = (med([statistics.mean(r["steps"][1:]) for r in results[n]]) for n in
                 ("LM head: full logits", "LM head: labelled positions only"))
    print(f"labelled-only / full: s/step {lab / full:.3f}")

    repo = Path(__file__).resolve().parents[1]
    fig = logits_figure(models["qwen"], repo / "test_set")
    print(f"\nQwen2.5-Omni-7B, 8 frames x 384 px (REAL-Colon 1352x1080 -> {fig['frame']}), spoken + written question "
          f"(test_set, {fig['n']} samples): {fig['positions']:.0f} positions/sample, {fig['labelled']:.1f} labelled.")
    print(f"logits avoided per sample: {fig['positions'] - fig['labelled']:.0f} rows x {QWEN_7B_VOCAB:,} = "
          f"{fig['avoided_fp32'] / 1e9:.2f} GB fp32 (the loss upcasts) + {fig['avoided_bf16'] / 1e9:.2f} GB bf16 "
          "head output, and as much again for the fp32 gradient")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
