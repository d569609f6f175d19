#!/usr/bin/env python
"""Build a tiny, random, but *real* Qwen-VL + Whisper-encoder graft (backbone ``qwen_vl_whisper``), fully offline.

Three directories, all from transformers' own config classes:

    DIR/vl_model/   a tiny Qwen2-VL (or Qwen2.5-VL / Qwen3-VL) ``*ForConditionalGeneration``, its real processor:
                    the tiny BPE of scripts/make_tiny_model.py with Qwen-VL's special tokens under their real names
                    and in their real order (<|vision_start|> <|vision_end|> <|vision_pad|> <|image_pad|>
                    <|video_pad|>; no audio tokens, like the real Qwen-VL vocabularies), sized for 56 px frames
    DIR/whisper/    a tiny Whisper (WhisperForConditionalGeneration, 128 mel bins like large-v3 / large-v3-turbo,
                    1,500 encoder positions) and its WhisperFeatureExtractor
    DIR/            the graft, written by ``create_graft`` exactly as for the 7B models: config.json (model_type
                    qwen_vl_whisper, relative paths to the two above), a random projector, the VL processor with
                    <|audio_bos|> <|AUDIO|> <|audio_eos|> added, the Whisper feature extractor

    python scripts/make_tiny_graft.py --output_dir runs/tiny-graft [--vl qwen2_vl|qwen2_5_vl|qwen3_vl] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _path in (HERE.parent, HERE):  # run from anywhere: the package is the repository's, make_tiny_model a sibling
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

# Qwen2-VL's added tokens in the order (and so with the relative ids) of the real tokenizer (<|endoftext|> = 151643
# … <|video_pad|> = 151656), then Qwen2.5-VL's additions.
QWEN_VL_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
MODEL_SPECIFIC_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}
# Qwen-VL's own chat template (no audio): the graft replaces it with one that renders audio parts too.
VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VL_KINDS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def build_vl_tokenizer(vocab_kind: str = "tiny"):
    """make_tiny_model's tokenizer (same BPE, pad <|endoftext|>, eos <|im_end|>) with Qwen-VL's special tokens."""
    from make_tiny_model import build_tokenizer

    return build_tokenizer(
        vocab_kind, special_tokens=QWEN_VL_SPECIAL_TOKENS, model_specific_tokens=MODEL_SPECIFIC_TOKENS
    )


def build_vl_processor(tokenizer, kind: str = "qwen2_vl", frame_size: int = 56):
    import transformers
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    pixels = {"shortest_edge": 28 * 28, "longest_edge": frame_size * frame_size}
    if kind == "qwen3_vl":
        from transformers import Qwen3VLVideoProcessor

        pixels = {"shortest_edge": 32 * 32, "longest_edge": frame_size * frame_size}
        image = Qwen2VLImageProcessor(size=dict(pixels), patch_size=16, temporal_patch_size=2, merge_size=2)
        video = Qwen3VLVideoProcessor(size=dict(pixels), patch_size=16, temporal_patch_size=2, merge_size=2)
    else:
        image = Qwen2VLImageProcessor(size=dict(pixels), patch_size=14, temporal_patch_size=2, merge_size=2)
        video = Qwen2VLVideoProcessor(size=dict(pixels), patch_size=14, temporal_patch_size=2, merge_size=2)
    name = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
            "qwen3_vl": "Qwen3VLProcessor"}[kind]
    return getattr(transformers, name)(image_processor=image, video_processor=video, tokenizer=tokenizer,
                                       chat_template=VL_CHAT_TEMPLATE)


def build_vl_config(tokenizer, kind: str = "qwen2_vl", text_hidden: int = 128, tower_hidden: int = 32,
                    layers: int = 2, extra_rows: int = 3):
    """A tiny config of the real class; ``extra_rows`` spare embedding rows (real Qwen-VL models have ~400) hold
    the audio tokens the graft adds."""
    import transformers

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_VL_SPECIAL_TOKENS}
    vocab_size = ((len(tokenizer) + extra_rows + 63) // 64) * 64
    heads = 4
    head_dim = text_hidden // heads
    half = head_dim // 2  # mrope_section (temporal, height, width) sums to head_dim / 2; real: [16, 24, 24]
    temporal = half // 4
    height = (half - temporal) // 2
    section = [temporal, height, half - temporal - height]
    rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section}
    text = {
        "vocab_size": vocab_size, "hidden_size": text_hidden, "intermediate_size": text_hidden * 2,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": 2,
        "max_position_embeddings": 4096, "rope_parameters": rope, "tie_word_embeddings": False,
        "pad_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "bos_token_id": ids["<|endoftext|>"],
    }
    if kind == "qwen2_vl":
        vision = {"depth": layers, "embed_dim": tower_hidden, "hidden_size": text_hidden, "num_heads": 2,
                  "mlp_ratio": 2, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
        cls = transformers.Qwen2VLConfig
    elif kind == "qwen2_5_vl":
        vision = {"depth": layers, "hidden_size": tower_hidden, "intermediate_size": tower_hidden * 2,
                  "num_heads": 2, "out_hidden_size": text_hidden, "patch_size": 14, "spatial_merge_size": 2,
                  "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [layers - 1]}
        cls = transformers.Qwen2_5_VLConfig
    elif kind == "qwen3_vl":
        text["head_dim"] = head_dim
        text["rope_parameters"] = {**rope, "mrope_interleaved": True}
        vision = {"depth": layers, "hidden_size": tower_hidden, "intermediate_size": tower_hidden * 2,
                  "num_heads": 2, "out_hidden_size": text_hidden, "patch_size": 16, "spatial_merge_size": 2,
                  "temporal_patch_size": 2, "num_position_embeddings": 64, "deepstack_visual_indexes": [0]}
        cls = transformers.Qwen3VLConfig
    else:
        raise ValueError(f"--vl must be one of {', '.join(VL_KINDS)}, got {kind!r}")
    return cls(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
               video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
               vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)


def build_whisper(output_dir: Path, d_model: int = 64, layers: int = 2, num_mel_bins: int = 128) -> Path:
    """A tiny WhisperForConditionalGeneration (the checkpoint kind users download) + its feature extractor."""
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    config = WhisperConfig(
        vocab_size=128, num_mel_bins=num_mel_bins, d_model=d_model, encoder_layers=layers, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=d_model * 2,
        decoder_ffn_dim=d_model * 2,
        max_source_positions=1500, max_target_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[],
    )
    model = WhisperForConditionalGeneration(config)
    # A random encoder with the default 0.02 conv init is deaf: its sinusoidal positions drown the mel content. A
    # trained Whisper hears; a larger conv init gives the tiny one content a projector can learn from.
    for conv in (model.model.encoder.conv1, model.model.encoder.conv2):
        torch.nn.init.normal_(conv.weight, std=0.2)
    model.generation_config = GenerationConfig(decoder_start_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(output_dir)
    WhisperFeatureExtractor(feature_size=num_mel_bins, sampling_rate=16000).save_pretrained(output_dir)
    return output_dir


def build_tiny_graft(output_dir: str | Path, seed: int = 0, vl: str = "qwen2_vl", frame_size: int = 56,
                     projector: str = "linear", audio_pooling: int = 2, audio_window: str = "full",
                     trim_audio: bool = True, text_hidden: int = 128) -> Path:
    """Write DIR/vl_model, DIR/whisper and the graft DIR (see the module docstring); return DIR."""
    import torch
    import transformers
    from transformers import GenerationConfig

    from surgvqa.backbones.qwen_vl_whisper.create import create_graft

    output_dir = Path(output_dir)
    torch.manual_seed(seed)
    tokenizer = build_vl_tokenizer()
    config = build_vl_config(tokenizer, vl, text_hidden=text_hidden)
    model_class = getattr(transformers, {"qwen2_vl": "Qwen2VLForConditionalGeneration",
                                         "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                                         "qwen3_vl": "Qwen3VLForConditionalGeneration"}[vl])
    model = model_class(config)
    # A trained LM head gives confident logits; a 0.02-std random one near-uniform ones (logit std ~0.2), so LoRA
    # on the layers would need many steps just to scale them up (as in make_tiny_model.py).
    torch.nn.init.normal_(model.lm_head.weight, std=0.3)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    vl_dir = output_dir / "vl_model"
    model.save_pretrained(vl_dir)
    build_vl_processor(tokenizer, vl, frame_size).save_pretrained(vl_dir)
    whisper_dir = build_whisper(output_dir / "whisper")
    return create_graft(vl_dir, whisper_dir, output_dir, projector=projector, audio_pooling=audio_pooling,
                        audio_window=audio_window, trim_audio=trim_audio, seed=seed, relative_paths=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--vl", choices=VL_KINDS, default="qwen2_vl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frame_size", type=int, default=56, help="frame edge the processors are sized for")
    parser.add_argument("--projector", choices=["linear", "mlp"], default="linear")
    parser.add_argument("--audio_pooling", type=int, choices=[1, 2], default=2)
    parser.add_argument("--audio_window", choices=["full", "trimmed"], default="full")
    parser.add_argument("--no_trim_audio", action="store_true",
                        help="all 1,500 encoder frames (the original graft)")
    args = parser.parse_args(argv)
    path = build_tiny_graft(args.output_dir, seed=args.seed, vl=args.vl, frame_size=args.frame_size,
                            projector=args.projector, audio_pooling=args.audio_pooling,
                            audio_window=args.audio_window, trim_audio=not args.no_trim_audio)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6
    print(f"tiny {args.vl} + Whisper-encoder graft written to {path} ({size:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
