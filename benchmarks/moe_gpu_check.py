#!/usr/bin/env python
"""The Qwen3-Omni-30B-A3B thinker built straight into 4-bit on one GPU: stored bytes against the planner, one QLoRA
step. No checkpoint is written or downloaded: the 59 GiB of bf16 weights never exist at once.

    python benchmarks/moe_gpu_check.py [--config configs/models/qwen3_omni_30b_a3b_thinker.json] [--device cuda]
    python benchmarks/moe_gpu_check.py --config tiny --device cpu     # CPU rehearsal of the same code

The thinker is built on ``--device`` with NF4 experts (the ``qwen3_omni_moe`` backbone's
``Qwen3OmniMoeThinkerNF4ForConditionalGeneration``: empty NF4 buffers, no 16-bit stacks) and random bf16 weights
elsewhere; every language-model ``nn.Linear`` is then replaced by a bitsandbytes ``Linear4bit`` quantized from its
weight, and every expert's two matrices are drawn and quantized one expert at a time. Then: the unquantized-weights guard, the bytes held against ``surgvqa plan
--load_in_4bit`` (its weights line), and one LoRA training step (attention, r16) on ``--tokens`` random text
tokens (the towers do not run: the step's peak is for information, the plan's activations include them).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, environment_line, load_script, log  # noqa: E402

sys.path.insert(0, str(REPO))
THINKER_30B = REPO / "configs" / "models" / "qwen3_omni_30b_a3b_thinker.json"


def thinker_config(which: str):
    import json

    from transformers import Qwen3OmniMoeThinkerConfig

    if which == "tiny":
        tiny = load_script("tiny_qwen3_omni_moe")
        tokenizer = load_script("make_tiny_model").build_tokenizer(
            "tiny", special_tokens=tiny.QWEN3_OMNI_SPECIAL_TOKENS, model_specific_tokens=tiny.MODEL_SPECIFIC_TOKENS)
        return tiny.build_config(tokenizer)
    data = json.loads(Path(which).read_text())
    return Qwen3OmniMoeThinkerConfig.from_dict({k: v for k, v in data.items() if k != "model_type"})


def build_in_4bit(config, device: str):
    """The thinker with NF4 experts and Linear4bit language-model projections, random weights, on ``device``."""
    import bitsandbytes as bnb
    import torch

    from surgvqa.backbones import get_backbone
    from surgvqa.backbones.qwen3_omni_moe.modeling import (
        NF4_ATTRIBUTE,
        Qwen3OmniMoeThinkerNF4ForConditionalGeneration,
        moe_blocks,
    )

    backbone = get_backbone("qwen3_omni_moe")
    setattr(config, NF4_ATTRIBUTE, {"blocksize": backbone.nf4_blocksize, "double_quant": backbone.nf4_double_quant})
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # towers, embeddings, head, attention drawn in bf16 by the model's init
    try:
        with torch.device(device):
            model = Qwen3OmniMoeThinkerNF4ForConditionalGeneration(config)  # experts: empty NF4 buffers only
    finally:
        torch.set_default_dtype(default)
    delattr(model.config, NF4_ATTRIBUTE)
    layers = model.model.language_model.layers
    linears = [(name, module) for name, module in layers.named_modules() if isinstance(module, torch.nn.Linear)]
    for name, module in linears:  # Linear4bit in place of each projection, quantized from its random bf16 weight
        parent = layers.get_submodule(name.rpartition(".")[0])
        quantized = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                      device="meta")
        quantized.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4", blocksize=64).to(device)
        if module.bias is not None:
            quantized.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
        setattr(parent, name.rpartition(".")[2], quantized)
    with torch.no_grad():
        for block in moe_blocks(model).values():  # one expert's bf16 matrix at a time
            experts = block.experts
            for name in ("gate_up_proj", "down_proj"):
                rows, cols = experts.shape(name)
                for expert in range(experts.num_experts):
                    weight = torch.randn(rows, cols, dtype=torch.bfloat16, device=device) * 0.02
                    experts.quantize_expert_(name, expert, weight)
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(THINKER_30B), help="thinker config JSON, or 'tiny'")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=489, help="sequence length of the training step")
    args = parser.parse_args()
    import torch
    from peft import LoraConfig

    from surgvqa.backbones import LoadOptions, get_backbone
    from surgvqa.backbones.base import check_quantized
    from surgvqa.backbones.common.quantization import prepare_quantized_for_training, upcast_trainable

    print(environment_line())
    backbone = get_backbone("qwen3_omni_moe")
    config = thinker_config(args.config)
    cuda = args.device.startswith("cuda")
    start = time.perf_counter()
    model = build_in_4bit(config, args.device)
    held = (torch.cuda.memory_allocated() if cuda else
            sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]))
    log(f"built in {time.perf_counter() - start:.0f} s")
    check_quantized(model, backbone, LoadOptions(load_in_4bit=True))
    print(f"built straight into 4-bit: {held / 2**20:,.0f} MiB held on {args.device} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:,.1f} M parameters besides the NF4 buffers); the "
          "unquantized-weights guard passes")
    if args.config != "tiny":
        from surgvqa.plan import PlanArguments, Planner

        processor = REPO / "runs" / "bench" / "qwen3-omni-processor"
        if not (processor / "tokenizer_config.json").is_file():
            tiny = load_script("tiny_qwen3_omni_moe")
            tiny.build_processor(load_script("make_tiny_model").build_tokenizer(
                "qwen", special_tokens=tiny.QWEN3_OMNI_SPECIAL_TOKENS,
                model_specific_tokens=tiny.MODEL_SPECIFIC_TOKENS)).save_pretrained(processor)
        planner = Planner(PlanArguments(model=args.config, processor=str(processor), load_in_4bit=True,
                                        question_modality="text+audio"))
        planned = sum(group.eval_bytes for group in planner.groups)
        print(f"  planner weights (4-bit, eval): {planned / 2**20:,.0f} MiB; measured/planned {held / planned:.3f}")
    prepare_quantized_for_training(model, gradient_checkpointing=False)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=backbone.lora_target_regex,
                      task_type="CAUSAL_LM")
    model = backbone.make_trainable(model, lora)
    upcast_trainable(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, min(config.text_config.vocab_size, 151643), (1, args.tokens), device=args.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else None
    print(f"one QLoRA step (attention LoRA r16, {args.tokens} text tokens): loss {float(loss.detach()):.3f}, {seconds:.2f} s"
          + (f", peak {peak / 2**30:.2f} GiB allocated" if peak is not None else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
