#!/usr/bin/env python
"""Write the published configurations (Qwen2.5-Omni-7B thinker, Qwen2.5-VL-7B, Qwen3-Omni-30B-A3B thinker) as
config.json-style files, from transformers' own config classes and the hyperparameters of the released checkpoints,
so ``surgvqa plan`` and
``benchmarks/gpu_check.sh`` can build the models (on the meta device, or with random weights) without a download.

    python configs/models/make_model_configs.py   # rewrites configs/models/*.json
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

# The Qwen2 vocabulary's added tokens (<|endoftext|> = 151643 ...) as the released checkpoints number them.
ENDOFTEXT, IM_START, IM_END = 151643, 151644, 151645
MROPE = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}
QWEN2_5_7B_TEXT = {
    "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_act": "silu", "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "use_sliding_window": False, "rope_parameters": MROPE,
}
QWEN2_5_VIT = {  # the Qwen2.5-VL vision transformer (also the Omni thinker's)
    "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "in_channels": 3,
    "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
    "out_hidden_size": 3584, "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu",
}


def omni_thinker_7b():
    from transformers import Qwen2_5OmniThinkerConfig

    config = Qwen2_5OmniThinkerConfig(
        text_config={**QWEN2_5_7B_TEXT, "max_position_embeddings": 32768},
        vision_config={**QWEN2_5_VIT, "tokens_per_second": 25},
        audio_config={
            "num_mel_bins": 128, "encoder_layers": 32, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120,
            "d_model": 1280, "output_dim": 3584, "max_source_positions": 1500, "n_window": 100,
        },
        audio_token_index=151646, image_token_index=151655, video_token_index=151656,
        audio_start_token_id=151647, audio_end_token_id=151648, user_token_id=872,
        position_id_per_seconds=25, seconds_per_chunk=2,
    )
    # The thinker's rope index reads these; Qwen2_5OmniThinkerConfig does not define them.
    config.vision_start_token_id, config.vision_end_token_id = 151652, 151653
    config.pad_token_id, config.eos_token_id = ENDOFTEXT, IM_END
    return config


def qwen3_omni_30b_a3b_thinker():
    """The thinker of Qwen3-Omni-30B-A3B (Instruct): 48 MoE layers of 128 experts (width 768, 8 routed per token),
    hidden 2048, 32 query / 4 key-value heads of 128, the 152k vocabulary; a 27-block SigLIP-style vision tower
    (patch 16, deepstack at blocks 8/16/24) and a 32-layer audio encoder."""
    from transformers import Qwen3OmniMoeThinkerConfig

    config = Qwen3OmniMoeThinkerConfig(
        text_config={
            "vocab_size": 152064, "hidden_size": 2048, "intermediate_size": 768, "moe_intermediate_size": 768,
            "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
            "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 65536,
            "tie_word_embeddings": False, "router_aux_loss_coef": 0.001,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [24, 20, 20],
                                "interleaved": True},
        },
        vision_config={
            "depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "in_channels": 3,
            "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 2048,
            "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24],
            "hidden_act": "gelu_pytorch_tanh",
        },
        audio_config={
            "num_mel_bins": 128, "encoder_layers": 32, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120,
            "d_model": 1280, "output_dim": 2048, "max_source_positions": 1500, "n_window": 50,
            "n_window_infer": 800, "conv_chunksize": 500, "downsample_hidden_size": 480,
        },
        audio_token_id=151675, image_token_id=151655, video_token_id=151656, audio_start_token_id=151669,
        position_id_per_seconds=13, user_token_id=872,
    )
    config.vision_start_token_id, config.vision_end_token_id = 151652, 151653
    config.audio_end_token_id = 151670
    config.pad_token_id, config.eos_token_id = ENDOFTEXT, IM_END
    return config


def qwen2_5_vl_7b():
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config={**QWEN2_5_7B_TEXT, "max_position_embeddings": 128000, "bos_token_id": ENDOFTEXT,
                     "eos_token_id": IM_END},
        vision_config={**QWEN2_5_VIT, "tokens_per_second": 2},
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=False,
    )


def main() -> int:
    for name, build in (("qwen2_5_omni_7b_thinker", omni_thinker_7b), ("qwen2_5_vl_7b", qwen2_5_vl_7b),
                        ("qwen3_omni_30b_a3b_thinker", qwen3_omni_30b_a3b_thinker)):
        config = build()
        data = config.to_dict()
        data.pop("transformers_version", None)
        path = HERE / f"{name}.json"
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
