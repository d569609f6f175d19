"""The ``qwen3_omni_moe`` family of ``scripts/make_tiny_model.py``: a tiny random Qwen3-Omni MoE thinker.

A ``Qwen3OmniMoeThinkerForConditionalGeneration`` made from transformers' own config classes (a few layers, 8
experts with 2 routed per token, fused expert stacks as in the 30B-A3B checkpoint) and a ``Qwen3OmniMoeProcessor``
with Qwen3-Omni's special tokens under their real names and in their real order (``<|audio_pad|>`` = 151675 with the
real vocabulary), Qwen2-VL image/video processors on the 32-pixel grid (patch 16, merge 2) and a Whisper feature
extractor. The 30B-A3B thinker goes through exactly the same code with a bigger config
(``configs/models/qwen3_omni_30b_a3b_thinker.json``).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # make_tiny_model is a sibling (run from anywhere)
    sys.path.insert(0, str(HERE))

# Qwen3-Omni's added tokens, in the order (and so with the ids) of the real tokenizer: <|endoftext|> = 151643 …
QWEN3_OMNI_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>", "<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>",
    "<tts_text_bos_single>", "<|audio_pad|>",
]
MODEL_SPECIFIC_TOKENS = {
    "image_token": "<|image_pad|>",
    "audio_token": "<|audio_pad|>",
    "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
    "audio_bos_token": "<|audio_start|>",
    "audio_eos_token": "<|audio_end|>",
}

# The Qwen3-Omni chat template's multimodal parts (no default system turn; audio, image, video, text in order).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "<|audio_start|><|audio_pad|><|audio_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_processor(tokenizer, frame_size: int = 64):
    """Qwen3-Omni's processor (16-px patches: a 32-px vision grid) with its chat template."""
    from make_tiny_model import build_processor as build_qwen_processor

    return build_qwen_processor(tokenizer, frame_size, processor_class="Qwen3OmniMoeProcessor", patch_size=16,
                                chat_template=CHAT_TEMPLATE)


def build_config(tokenizer, text_hidden: int = 128, tower_hidden: int = 32, layers: int = 2,
                 num_experts: int = 8, experts_per_token: int = 2, expert_width: int | None = None):
    """A Qwen3-Omni MoE thinker config: ``layers`` language-model (and audio, vision) layers, every one a sparse
    MoE block of ``num_experts`` experts of width ``expert_width`` with ``experts_per_token`` routed per token."""
    from transformers import Qwen3OmniMoeThinkerConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN3_OMNI_SPECIAL_TOKENS}
    vocab_size = ((len(tokenizer) + 63) // 64) * 64  # padded like the real 152,064-row embedding
    heads = 4
    head_dim = text_hidden // heads
    half = head_dim // 2  # mrope_section (temporal, height, width) sums to head_dim / 2; real: [24, 20, 20]
    temporal = half - 2 * (half * 5 // 16)
    mrope_section = [temporal, half * 5 // 16, half * 5 // 16]
    config = Qwen3OmniMoeThinkerConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": text_hidden,
            "intermediate_size": text_hidden * 2,
            "moe_intermediate_size": expert_width or text_hidden,
            "num_experts": num_experts,
            "num_experts_per_tok": experts_per_token,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": 2,
            "head_dim": head_dim,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope_section,
                                "interleaved": True},
            "tie_word_embeddings": False,
            "pad_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
        },
        vision_config={
            "depth": layers,
            "hidden_size": tower_hidden,
            "intermediate_size": tower_hidden * 2,
            "num_heads": 2,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": text_hidden,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        },
        audio_config={
            "num_mel_bins": 128,
            "encoder_layers": layers,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": tower_hidden * 2,
            "d_model": tower_hidden,
            "output_dim": text_hidden,
            "max_source_positions": 1500,
            "n_window": 50,
            "n_window_infer": 800,
            "downsample_hidden_size": 16,
        },
        audio_token_id=ids["<|audio_pad|>"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        audio_start_token_id=ids["<|audio_start|>"],
        position_id_per_seconds=13,
        user_token_id=tokenizer.convert_tokens_to_ids("user") if "user" in tokenizer.get_vocab() else 872,
    )
    config.vision_start_token_id = ids["<|vision_start|>"]
    config.vision_end_token_id = ids["<|vision_end|>"]
    config.audio_end_token_id = ids["<|audio_end|>"]
    config.pad_token_id = ids["<|endoftext|>"]
    config.eos_token_id = ids["<|im_end|>"]
    return config


def build_tiny_qwen3_omni_moe(output_dir: str | Path, seed: int = 0, vocab: str = "tiny", frame_size: int = 64,
                              layers: int = 2, num_experts: int = 8, experts_per_token: int = 2,
                              text_hidden: int = 128) -> Path:
    """Write a tiny random Qwen3-Omni MoE thinker + processor to ``output_dir`` and return the path."""
    import torch
    from make_tiny_model import build_tokenizer
    from transformers import GenerationConfig, Qwen3OmniMoeThinkerForConditionalGeneration

    output_dir = Path(output_dir)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(vocab, special_tokens=QWEN3_OMNI_SPECIAL_TOKENS,
                                model_specific_tokens=MODEL_SPECIFIC_TOKENS)
    processor = build_processor(tokenizer, frame_size=frame_size)
    config = build_config(tokenizer, text_hidden=text_hidden, layers=layers, num_experts=num_experts,
                          experts_per_token=experts_per_token)
    model = Qwen3OmniMoeThinkerForConditionalGeneration(config)
    # As for the Qwen2.5-Omni tiny model: an audible spoken question and confident logits from the first step.
    for conv in (model.model.audio_tower.conv2d1, model.model.audio_tower.conv2d2):
        torch.nn.init.normal_(conv.weight, std=0.2)
    torch.nn.init.normal_(model.lm_head.weight, std=0.3)
    # A random router of 0.02 std would route every token about uniformly; a trained one is decisive.
    for layer in model.model.language_model.layers:
        torch.nn.init.normal_(layer.mlp.gate.weight, std=0.5)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, do_sample=False, max_new_tokens=32
    )
    model.save_pretrained(output_dir, safe_serialization=True)
    processor.save_pretrained(output_dir)
    return output_dir
