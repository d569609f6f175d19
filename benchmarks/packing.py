#!/usr/bin/env python
"""Sequence packing (``--packing``): padding and tokens/s, packed vs unpacked, on the real annotation lengths.

    python benchmarks/packing.py [--quick] [--data FILE] [--samples N] [--rounds R] [--batch 1,4] [--lengths 2048,4096]

1. Padding (arithmetic, every sample of ``--data``, default the REAL-Colon-VQA training annotations): each sample's
   token count as training's pre-flight computes it (``VQACollator.sequence_length``, the real Qwen tokenizer of the
   tiny model built on the Qwen vocabulary): its real question and answer, 8 frames of REAL-Colon's 1352x1080 at
   ``--frame_size 384`` (364x280 on the vision grid), a spoken question of 1.5-5 s (uniform, seeded: the annotations
   carry no audio lengths). Unpacked: batches of B samples in a seeded random order (the Trainer's sampler), each
   padded to its longest. Packed: first fit in a seeded random order into rows of ``model_max_length``
   (``surgvqa.packing.plan_packs``, as training packs),
   batches of B rows in a seeded random order, each padded to its longest row. Padding = padded slots / all slots;
   fill = sample tokens / (rows x model_max_length); attention work = what a dense (masked) attention computes,
   sum of row length squared, over the unpacked samples' (FlashAttention-2's variable-length kernel does only
   the samples' own share).
2. tokens/s (measured, side by side in one process): the tiny thinker (scripts/make_tiny_model.py, fp32, LoRA r16
   on the language model, labelled-only loss, AdamW) on ``--samples`` of those samples with real frames-sized
   inputs (8 random frames of 364x280, random audio of the sampled length, the real question and answer): one pass
   over them unpacked (batches of ``--batch``) and packed (batch 1 row per model_max_length), batches collated
   beforehand (the same items either way), one optimizer step per batch; rounds alternate the order, the median
   round is reported. tokens/s counts the samples' tokens (padding not counted).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    REPO,
    add_threads_arg,
    environment_line,
    log,
    median,
    print_table,
    set_threads,
    tiny_model,
)

DATA = REPO.parent / "shared" / "data" / "real-colon-vqa" / "in_template.jsonl"
REAL_COLON_FRAME = (1352, 1080)  # width, height
FRAMES = 8
AUDIO_SECONDS = (1.5, 5.0)
RATE = 16000


def annotations(path: Path, seed: int) -> list[dict]:
    """The records of ``path`` with a seeded spoken-question length (samples) each."""
    rng = random.Random(seed)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for record in records:
        record["audio_samples"] = int(rng.uniform(*AUDIO_SECONDS) * RATE)
    return records


def batches(groups: list[list[int]], size: int, seed: int) -> list[list[list[int]]]:
    """``groups`` (rows) in a seeded random order, ``size`` rows per batch."""
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    return [[groups[i] for i in order[j:j + size]] for j in range(0, len(order), size)]


def padding(lengths: list[int], batched: list[list[list[int]]]) -> float:
    """Padded slots / all slots when every row of a batch is padded to the batch's longest row."""
    slots = sum(len(batch) * max(sum(lengths[i] for i in row) for row in batch) for batch in batched)
    return 1.0 - sum(lengths[i] for batch in batched for row in batch for i in row) / slots


def padding_table(records: list[dict], collator, frame_hw: tuple[int, int], sizes: list[int],
                  max_lengths: list[int], seed: int) -> list[int]:
    from surgvqa.packing import plan_packs

    lengths = [collator.sequence_length(r["question"], r["answer"], frame_hw, FRAMES, r["audio_samples"])
               for r in records]
    rows = []
    alone = sum(n * n for n in lengths)
    for size in sizes:
        batched = batches([[i] for i in range(len(lengths))], size, seed)
        rows.append(["unpacked", f"{size} samples", "-", len(batched), f"{100 * padding(lengths, batched):.1f} %",
                     "-", "1.00x"])
    for max_length in max_lengths:
        packs = plan_packs(lengths, max_length, seed)
        fill = sum(lengths) / (len(packs) * max_length)
        work = sum(sum(lengths[i] for i in pack) ** 2 for pack in packs) / alone
        for size in sizes[:2]:
            batched = batches(packs, size, seed)
            rows.append([f"packed, {max_length}", f"{size} rows", f"{len(lengths) / len(packs):.2f}", len(batched),
                         f"{100 * padding(lengths, batched):.1f} %", f"{100 * fill:.1f} %", f"{work:.2f}x"])
    print(f"\n{len(lengths)} samples; tokens per sample: min {min(lengths)}, mean {sum(lengths) / len(lengths):.0f}, "
          f"max {max(lengths)} (8 frames at {frame_hw[1]}x{frame_hw[0]}, spoken question 1.5-5 s, text)")
    print_table(["layout", "batch", "samples/row", "steps/epoch", "padding", "fill of max length",
                 "dense attention work"], rows,
                title="1. padding, every sample of the annotations (arithmetic)")
    return lengths


# --------------------------------------------------------------------------------------------- tokens/s measured
def lora_model(model_dir: Path):
    import torch
    from peft import LoraConfig, get_peft_model

    from surgvqa.backbones import get_backbone
    from surgvqa.backbones.base import LoadOptions

    backbone = get_backbone("qwen2_5_omni")
    torch.manual_seed(0)
    model = backbone.load(str(model_dir), LoadOptions(dtype="float32"))
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=backbone.lora_target_regex,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config).train()


def items_of(records: list[dict], frame_hw: tuple[int, int], seed: int) -> list[dict]:
    import numpy as np

    from surgvqa.data import Sample

    rng = np.random.default_rng(seed)
    out = []
    for r in records:
        frames = [rng.integers(0, 256, (*frame_hw, 3), dtype=np.uint8) for _ in range(FRAMES)]
        audio = (0.1 * rng.standard_normal(r["audio_samples"])).astype(np.float32)
        sample = Sample(video_id=r["video_id"], id=r["id"], question=r["question"], answer=r["answer"],
                        source="benchmark")
        out.append({"sample": sample, "frames": frames, "audio": audio})
    return out


def measure(model_dir: Path, records: list[dict], frame_hw: tuple[int, int], sizes: list[int], max_lengths: list[int],
            rounds: int, seed: int) -> None:
    import torch
    from transformers import AutoProcessor

    from surgvqa.backbones.common.labelled_logits import labelled_loss, next_token_selection
    from surgvqa.collate import VQACollator
    from surgvqa.packing import PackingCollator, plan_packs

    processor = AutoProcessor.from_pretrained(model_dir)
    collator = VQACollator(processor, question_modality="text+audio", frame_size=384, mode="train")
    items = items_of(records, frame_hw, seed)
    lengths = [int(collator([item])["attention_mask"].sum()) for item in items]
    layouts = {f"unpacked, batch {size}": [collator([items[i] for row in b for i in row])
                                           for b in batches([[i] for i in range(len(items))], size, seed)]
               for size in sizes}
    for max_length in max_lengths:
        packs = plan_packs(lengths, max_length, seed)
        packer = PackingCollator(collator)
        layouts[f"packed, {max_length}, batch 1"] = [packer([[items[i] for i in row] for row in b])
                                                     for b in batches(packs, 1, seed)]
    model = lora_model(model_dir)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def one_pass(collated: list[dict]) -> float:
        start = time.perf_counter()
        for b in collated:
            inputs = {k: v for k, v in b.items() if k != "labels"}
            out = model(**inputs, logits_mask=next_token_selection(b["labels"]), use_cache=False)
            labelled_loss(out, b["labels"]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    one_pass(layouts[next(iter(layouts))][:1])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in layouts}
    names = list(layouts)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(one_pass(layouts[name]))
            log(f"round {r + 1}: {name}: {times[name][-1]:.1f} s")
    tokens = sum(lengths)
    base = min(median(times[name]) for name in names if name.startswith("unpacked"))
    rows = []
    for name in names:
        slots = sum(int(b["input_ids"].numel()) for b in layouts[name])
        seconds = median(times[name])
        rows.append([name, len(layouts[name]), f"{100 * (1 - tokens / slots):.1f} %", f"{seconds:.1f}",
                     f"{tokens / seconds:,.0f}", f"{base / seconds:.2f}x"])
    print(f"\n{len(items)} samples, {tokens} tokens (mean {tokens / len(items):.0f}); median of {rounds} round(s)")
    print_table(["layout", "steps", "padding", "s/pass", "tokens/s", "tokens/s vs best unpacked"], rows,
                title="2. tokens/s measured (tiny thinker, fp32 CPU, LoRA r16, labelled-only loss, AdamW)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="24 samples, 1 round")
    parser.add_argument("--data", type=Path, default=DATA, help="REAL-Colon-VQA JSONL (lengths of its samples)")
    parser.add_argument("--samples", type=int, default=None, help="samples of the measured pass (default 48)")
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds (default 3)")
    parser.add_argument("--batch", default="1,4", help="unpacked batch sizes of the measured pass")
    parser.add_argument("--lengths", default="2048,4096", help="model_max_length values to pack to")
    parser.add_argument("--seed", type=int, default=0)
    add_threads_arg(parser)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    if not args.data.is_file():
        print(f"error: {args.data} not found: pass --data with a REAL-Colon-VQA JSONL", file=sys.stderr)
        return 2
    from surgvqa.backbones import backbone_for
    from surgvqa.collate import VQACollator

    max_lengths = [int(x) for x in args.lengths.split(",")]
    records = annotations(args.data, args.seed)
    qwen_model = tiny_model(vocab="qwen")
    processor = backbone_for(qwen_model).load_processor(str(qwen_model))
    collator = VQACollator(processor, question_modality="text+audio", frame_size=384, mode="train")
    frame_hw = collator.frame_hw(*REAL_COLON_FRAME)
    print(environment_line())
    print(f"data: {args.data}")
    padding_table(records, collator, frame_hw, [1, 2, 4, 8], max_lengths, args.seed)
    n = args.samples or (24 if args.quick else 48)
    subset = random.Random(args.seed).sample(records, min(n, len(records)))
    measure(tiny_model(vocab="tiny"), subset, frame_hw, [int(x) for x in args.batch.split(",")], max_lengths,
            args.rounds or (1 if args.quick else 3), args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
