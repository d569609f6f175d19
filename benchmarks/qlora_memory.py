#!/usr/bin/env python
"""Weight memory of a 4-bit model prepared for QLoRA: PEFT's prepare_model_for_kbit_training vs surgvqa's.

    python benchmarks/qlora_memory.py [--config PATH]

PEFT casts every parameter that is not 4-bit to fp32 (towers, embeddings, lm_head); surgvqa keeps them in bf16 and
runs only the norms in fp32 (``surgvqa.backbones.common.quantization.prepare_quantized_for_training``). Part 1 loads
the tiny Qwen2.5-Omni thinker in 4 bits twice, prepares one copy each way and sums the bytes of every parameter and buffer
(side by side, one process). Part 2 computes the same difference for Qwen2.5-Omni-7B from its thinker config
(``--config``: a config.json of the thinker or of the full Omni model; default: ``configs/models/
qwen2_5_omni_7b_thinker.json`` when present, else transformers' ``Qwen2_5OmniThinkerConfig()`` with the released
checkpoint's values where its defaults differ: a 1280-wide vision tower, an untied lm_head), counting parameters on
the meta device: nothing is downloaded or allocated. Part 2 applies the rule of part 1, and part 1 checks that rule against
the measured bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import environment_line, print_table, tiny_model  # noqa: E402

GB = 1e9
REPO = Path(__file__).resolve().parents[1]
SHIPPED_7B = REPO / "configs" / "models" / "qwen2_5_omni_7b_thinker.json"
#: the released Qwen2.5-Omni-7B thinker's values where Qwen2_5OmniThinkerConfig()'s defaults differ
RELEASED_7B = {"vision_config": {"hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                                 "out_hidden_size": 3584},
               "text_config": {"tie_word_embeddings": False}}


def _bytes(model) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _load_4bit(path: Path):
    from surgvqa.backbones import LoadOptions, get_backbone

    return get_backbone("qwen2_5_omni").load(str(path), LoadOptions(dtype="bfloat16", load_in_4bit=True))


def predicted_saving(model, quantized: set[str] | None = None) -> tuple[int, int, int]:
    """(parameters left unquantized, of which norm parameters, bytes surgvqa saves over PEFT) for a thinker: PEFT
    holds every unquantized parameter in fp32 (4 bytes), surgvqa holds them in bf16 (2 bytes) except the norms."""
    from surgvqa.backbones import get_backbone
    from surgvqa.backbones.common.quantization import is_norm

    backbone = get_backbone("qwen2_5_omni")
    skip = (*backbone.tower_modules, *backbone.projector_modules, "lm_head")
    norms = {name for name, module in model.named_modules() if is_norm(module)}
    linear = {name for name, module in model.named_modules()
              if type(module).__name__ in ("Linear", "Linear4bit") and not name.startswith(skip)}
    kept = norm = 0
    for name, param in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        if quantized is not None:
            if name in quantized:
                continue
        elif owner in linear and name.endswith(".weight"):
            continue  # 4-bit
        kept += param.numel()
        norm += param.numel() if owner in norms else 0
    return kept, norm, 2 * (kept - norm)


def measured_tiny() -> dict:
    from peft import prepare_model_for_kbit_training

    from surgvqa.backbones.common.quantization import prepare_quantized_for_training

    path = tiny_model()
    peft_model = prepare_model_for_kbit_training(_load_4bit(path), use_gradient_checkpointing=False)
    ours = _load_4bit(path)
    prepare_quantized_for_training(ours, gradient_checkpointing=False)
    quantized = {n for n, p in ours.named_parameters() if type(p).__name__ == "Params4bit"}
    kept, norm, predicted = predicted_saving(ours, quantized)
    return {"peft": _bytes(peft_model), "surgvqa": _bytes(ours), "kept": kept, "norm": norm, "predicted": predicted}


def omni_7b(config_path: str | None) -> dict:
    import torch
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    config_path = config_path or (str(SHIPPED_7B) if SHIPPED_7B.is_file() else None)
    if config_path:
        raw = json.loads(Path(config_path).read_text())
        raw = raw.get("thinker_config", raw)
        config = Qwen2_5OmniThinkerConfig(**{k: v for k, v in raw.items() if k != "model_type"})
        source = config_path
    else:
        config = Qwen2_5OmniThinkerConfig(**RELEASED_7B)
        source = "Qwen2_5OmniThinkerConfig() with the released 7B vision width and untied lm_head"
    with torch.device("meta"):
        model = Qwen2_5OmniThinkerForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    total = sum(p.numel() for p in model.parameters())
    kept, norm, saved = predicted_saving(model)
    return {"source": source, "total": total, "kept": kept, "norm": norm, "saved": saved}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="Qwen2.5-Omni(-thinker) config.json for part 2")
    args = parser.parse_args(argv)
    print(environment_line())

    tiny = measured_tiny()
    print_table(
        ["preparation", "weight + buffer bytes"],
        [["peft prepare_model_for_kbit_training", f"{tiny['peft']:,}"],
         ["surgvqa prepare_quantized_for_training", f"{tiny['surgvqa']:,}"]],
        title="1. tiny Qwen2.5-Omni thinker, 4-bit (measured)",
    )
    saved = tiny["peft"] - tiny["surgvqa"]
    print(f"tiny: surgvqa saves {saved:,} bytes ({saved / tiny['peft']:.1%} of PEFT's, ratio "
          f"{tiny['surgvqa'] / tiny['peft']:.3f}); the counting rule predicts {tiny['predicted']:,} "
          f"({tiny['kept']:,} unquantized parameters, {tiny['norm']:,} of them in norms)")
    if saved != tiny["predicted"]:
        print("WARNING: the measured saving differs from the counting rule used for 7B")

    big = omni_7b(args.config)
    print_table(
        ["parameters", "count"],
        [["all", f"{big['total']:,}"], ["left unquantized (towers, embeddings, lm_head, norms, biases)",
                                         f"{big['kept']:,}"], ["of which norms (fp32 in both)", f"{big['norm']:,}"]],
        title=f"2. Qwen2.5-Omni-7B thinker, 4-bit (computed from {big['source']})",
    )
    print(f"Omni-7B: PEFT holds {big['kept'] * 4 / GB:.2f} GB of unquantized weights in fp32, surgvqa "
          f"{(big['kept'] - big['norm']) * 2 / GB + big['norm'] * 4 / GB:.2f} GB: {big['saved'] / GB:.2f} GB saved")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
