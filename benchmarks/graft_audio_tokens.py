#!/usr/bin/env python
"""Audio tokens of the Qwen-VL + Whisper graft: sequence length and CPU training-step time, trimmed vs 1,500.

    python benchmarks/graft_audio_tokens.py [--quick] [--batch_size 2] [--steps 6] [--seconds 3]

The tiny random graft of scripts/make_tiny_graft.py (Qwen2-VL + Whisper encoder, 128 mel bins, 1,500 encoder
positions) answers spoken questions (question_modality audio; 3 s clips, 8 frames of 56 px). Four settings of the
same weights, side by side, round by round (the median step is reported):

    original          every question gets Whisper's 1,500 encoder frames (no trimming, no pooling)
    trim              encoder output cut to the real audio length (150 frames for 3 s)
    trim+pool         ... and 2x average pooling (75; the graft's default)
    trim+pool+window  ... and the encoder input cut too (audio_window='trimmed': the encoder sees 3 s, not 30 s)

A step is the stage-2 training step (LoRA on the LLM + the audio projector; forward, backward, AdamW) on one
collated batch; the collator time (processor: log-mel + placeholders) is reported separately. Ratios are against
``original``. The tiny LLM is small next to its Whisper encoder, so the step-time ratio here understates what
trimming saves on a 7B LLM, where the 1,500 extra tokens per question dominate; the sequence-length ratio is exact.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    REPO,
    _digest,
    add_threads_arg,
    cached_build,
    environment_line,
    load_script,
    log,
    median,
    print_table,
    set_threads,
    synthetic_set,
    write_tone_wavs,
)

VARIANTS = {
    "original": {"trim_audio": False, "audio_pooling": 1, "audio_window": "full"},
    "trim": {"trim_audio": True, "audio_pooling": 1, "audio_window": "full"},
    "trim+pool": {"trim_audio": True, "audio_pooling": 2, "audio_window": "full"},
    "trim+pool+window": {"trim_audio": True, "audio_pooling": 2, "audio_window": "trimmed"},
}


def tiny_graft() -> Path:
    files = [REPO / "scripts" / "make_tiny_graft.py", REPO / "scripts" / "make_tiny_model.py",
             *sorted((REPO / "surgvqa" / "backbones" / "qwen_vl_whisper").glob("*.py"))]

    def build(out: Path) -> None:
        log("building the tiny Qwen2-VL + Whisper graft ...")
        load_script("make_tiny_graft").build_tiny_graft(out, seed=0)

    return cached_build("tiny-graft", _digest(0, files=files), build)


def apply(model, processor, settings: dict) -> None:
    """Switch the graft (config) and its processor to one audio setting; the weights stay the same."""
    graft = model.get_base_model() if hasattr(model, "get_base_model") else model
    for key, value in settings.items():
        setattr(graft.config, key, value)
        if hasattr(processor, key):  # the processor counts placeholders (trim, pooling); the window is the model's
            setattr(processor, key, value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 rounds, batch 1")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed rounds (one step per variant per round)")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of every spoken question")
    add_threads_arg(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size = 2, 1
    set_threads(args.threads)

    import torch
    from peft import LoraConfig

    from surgvqa.backbones import LoadOptions, get_backbone
    from surgvqa.collate import VQACollator
    from surgvqa.data import MediaConfig, SurgicalVQADataset, load_samples
    from surgvqa.tokenizer import repair_tokenizer

    graft_dir = tiny_graft()
    data = synthetic_set(8, 112)
    audio_dir = data / f"audio-{args.seconds:g}s"
    write_tone_wavs(data / "in_template.jsonl", audio_dir, seconds=args.seconds)
    media = MediaConfig(frames_dir=str(data / "frames"), audio_dir=str(audio_dir), frame_size=56,
                        question_modality="audio")
    samples, _ = load_samples(data / "in_template.jsonl", media)
    dataset = SurgicalVQADataset(samples[: args.batch_size], media)
    items = [dataset[i] for i in range(len(dataset))]

    backbone = get_backbone("qwen_vl_whisper")
    torch.manual_seed(0)
    model = backbone.load(str(graft_dir), LoadOptions(dtype="float32"))
    processor = backbone.load_processor(str(graft_dir))
    repair_tokenizer(processor.tokenizer, model)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=backbone.lora_target_regex,
                      task_type="CAUSAL_LM")
    model.config.graft_stage = 1  # timing only: the random projector stands in for an aligned one
    model = backbone.make_trainable(model, lora, stage=2)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    collator = VQACollator(processor, question_modality="audio", frame_size=56, mode="train")
    graft = model.get_base_model()

    lengths, audio_tokens, step_s, collate_s = {}, {}, {v: [] for v in VARIANTS}, {v: [] for v in VARIANTS}
    batches = {}
    for name, settings in VARIANTS.items():  # shapes, and one warm-up step each
        apply(model, processor, settings)
        batch = collator(items)
        batches[name] = batch
        lengths[name] = float(batch["attention_mask"].sum(-1).float().mean())
        audio_tokens[name] = float((batch["input_ids"] == graft.config.audio_token_id).sum(-1).float().mean())
        model(**batch).loss.backward()
        optimizer.zero_grad(set_to_none=True)
    log(f"timing {args.steps} round(s) of {len(VARIANTS)} variants, batch {args.batch_size} ...")
    for _ in range(args.steps):
        for name, settings in VARIANTS.items():
            apply(model, processor, settings)
            start = time.perf_counter()
            batch = collator(items)
            collate_s[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_s[name].append(time.perf_counter() - start)

    print(environment_line())
    base_len, base_step = lengths["original"], median(step_s["original"])
    rows = []
    for name in VARIANTS:
        step = median(step_s[name])
        rows.append([name, audio_tokens[name], lengths[name], f"{lengths[name] / base_len:.3f}x", step * 1000,
                     f"{step / base_step:.3f}x", f"{base_step / step:.2f}x", median(collate_s[name]) * 1000])
    print_table(
        ["variant", "audio tokens", "seq len", "len ratio", "step ms", "step ratio", "speed-up", "collate ms"],
        rows,
        title=f"tiny graft, {args.seconds:g} s spoken questions, batch {args.batch_size}, median of {args.steps} "
              "steps (ratios vs original)",
    )
    default = "trim+pool"
    print(f"\n{default} (the default) vs original: {audio_tokens[default]:.0f} vs {audio_tokens['original']:.0f} "
          f"audio tokens per {args.seconds:g} s question; sequence {lengths[default] / base_len:.3f}x; "
          f"training step {median(step_s[default]) / base_step:.3f}x the time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
