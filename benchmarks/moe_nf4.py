#!/usr/bin/env python
"""Qwen3-Omni MoE experts in NF4: memory while loading, and the speed of the 4-bit expert forward (CPU).

    python benchmarks/moe_nf4.py [--layers 24] [--experts 64] [--hidden 384] [--width 256] [--tokens 512]

Part 1 writes a mid-size random Qwen3-Omni MoE thinker (``--layers`` MoE layers of ``--experts`` experts, routed 8
per token, bf16, the per-expert checkpoint layout transformers writes) and loads it in fresh processes, one at a
time: the ``qwen3_omni_moe`` backbone with ``--load_in_4bit`` (experts quantized layer by layer into NF4) and, for
reference, the plain bf16 load. Each child imports the model code first and reports its peak RSS above its RSS
after the imports; the line to read is the 4-bit load's peak against the bf16 bytes of the experts alone (the
4-bit load must never hold them all).

Part 2 times one MoE layer's experts on ``--tokens`` tokens (8 routed each), NF4 (dequantizing each routed expert
per call) against the stock fused bf16 experts (fp32 where the CPU has no AVX-512 bf16 kernels), same weights and
routing, one process, interleaved rounds; the ratio is the number to read.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    REPO,
    cached_build,
    current_rss_mb,
    emit_result,
    environment_line,
    load_script,
    log,
    peak_rss_mb,
    run_children,
)

sys.path.insert(0, str(REPO))


def build_mid_moe(out: Path, layers: int, experts: int, hidden: int, width: int) -> None:
    import torch
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    tiny = load_script("tiny_qwen3_omni_moe")
    tokenizer = load_script("make_tiny_model").build_tokenizer(
        "tiny", special_tokens=tiny.QWEN3_OMNI_SPECIAL_TOKENS, model_specific_tokens=tiny.MODEL_SPECIFIC_TOKENS)
    config = tiny.build_config(tokenizer, text_hidden=hidden, layers=layers, num_experts=experts,
                               experts_per_token=8, expert_width=width)
    config.vision_config.depth = config.audio_config.encoder_layers = 1
    torch.manual_seed(0)
    model = Qwen3OmniMoeThinkerForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="200MB")


def child_load(model_dir: str, mode: str) -> None:
    import bitsandbytes  # noqa: F401  (imported before the baseline: the same code in both modes)
    import torch
    import transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe  # noqa: F401

    import surgvqa.backbones.qwen3_omni_moe.modeling  # noqa: F401
    from surgvqa.backbones import LoadOptions, get_backbone

    backbone = get_backbone("qwen3_omni_moe")
    torch.zeros(1)  # torch's own allocations before the baseline
    before = current_rss_mb()
    start = time.perf_counter()
    model = backbone.load(model_dir, LoadOptions(dtype="bfloat16", load_in_4bit=mode == "nf4"))
    seconds = time.perf_counter() - start
    tensors = [t for n, t in [*model.named_buffers(), *model.named_parameters()] if ".experts." in n]
    experts = sum(t.untyped_storage().nbytes() for t in tensors)  # storage: LoRA placeholders hold one zero
    emit_result({"mode": mode, "peak_above_start_mb": peak_rss_mb() - before, "seconds": seconds,
                 "expert_bytes_loaded": experts})


def expert_speed(hidden: int, width: int, experts: int, tokens: int, rounds: int = 5) -> dict:
    import torch
    from transformers import Qwen3OmniMoeTextConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerTextExperts

    from surgvqa.backbones.qwen3_omni_moe.experts import NF4Experts

    dtype = torch.bfloat16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else torch.float32
    config = Qwen3OmniMoeTextConfig(hidden_size=hidden, moe_intermediate_size=width, num_experts=experts)
    torch.manual_seed(0)
    stock = Qwen3OmniMoeThinkerTextExperts(config)
    torch.nn.init.normal_(stock.gate_up_proj, std=0.02)
    torch.nn.init.normal_(stock.down_proj, std=0.02)
    nf4 = NF4Experts.like(stock)
    nf4.quantize_("gate_up_proj", stock.gate_up_proj.data)
    nf4.quantize_("down_proj", stock.down_proj.data)
    stock = stock.to(dtype)
    hidden_states = torch.randn(tokens, hidden, dtype=dtype)
    index = torch.stack([torch.randperm(experts)[:8] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, 8), -1).to(dtype)
    times: dict[str, list[float]] = {"bf16": [], "nf4": []}
    with torch.no_grad():
        for module in (stock, nf4):  # warm-up
            module(hidden_states, index, weights)
        for _ in range(rounds):
            for name, module in (("bf16", stock), ("nf4", nf4)):
                start = time.perf_counter()
                module(hidden_states, index, weights)
                times[name].append(time.perf_counter() - start)
        diff = float((stock(hidden_states, index, weights) - nf4(hidden_states, index, weights)).abs().max())
    best = {name: min(values) for name, values in times.items()}
    return {"dtype": str(dtype).replace("torch.", ""), "bf16_s": best["bf16"], "nf4_s": best["nf4"],
            "ratio": best["nf4"] / best["bf16"], "max_abs_diff": diff}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_load(*args.child)
        return 0
    print(environment_line())
    key = f"{args.layers}-{args.experts}-{args.hidden}-{args.width}"
    model_dir = cached_build(f"mid-moe-{key}", key, lambda out: build_mid_moe(
        out, args.layers, args.experts, args.hidden, args.width))
    expert_bf16 = args.layers * args.experts * 3 * args.hidden * args.width * 2
    log(f"loading {model_dir} in fresh processes (4-bit, then bf16) ...")
    results = run_children([(Path(__file__), ["--child", str(model_dir), mode]) for mode in ("nf4", "bf16")],
                           parallel=1)
    print(f"part 1: loading a {args.layers}-layer x {args.experts}-expert MoE thinker (hidden {args.hidden}, expert "
          f"width {args.width}); bf16 experts alone: {expert_bf16 / 2**20:.0f} MiB")
    for result in results:
        print(f"  {result['mode']:>4} load: peak RSS above start {result['peak_above_start_mb']:8.0f} MiB "
              f"({result['peak_above_start_mb'] * 2**20 / expert_bf16:.2f}x the bf16 experts), experts held "
              f"{result['expert_bytes_loaded'] / 2**20:.0f} MiB, {result['seconds']:.1f} s")
    speed = expert_speed(args.hidden, args.width, args.experts, args.tokens)
    print(f"part 2: one MoE layer's experts, {args.tokens} tokens x 8 routed ({speed['dtype']} compute): "
          f"stock fused {speed['dtype']} {1e3 * speed['bf16_s']:.1f} ms, NF4 {1e3 * speed['nf4_s']:.1f} ms, "
          f"ratio NF4/stock {speed['ratio']:.2f} (best of 5; max |output diff| {speed['max_abs_diff']:.2e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
