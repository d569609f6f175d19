"""Qwen3-Omni MoE (``qwen3_omni_moe``): the thinker of Qwen3-Omni-30B-A3B (vision + audio towers + a 48-layer MoE
language model, 128 experts with 8 routed per token); the talker and code2wav are never loaded.

    backbone.py   the backbone training, evaluation and merging use (BACKBONE): loading, LoRA targets, router loss
    experts.py    NF4Experts: the fused expert stacks in NF4, one expert per quantization, dequantized when routed
    modeling.py   the thinker subclass holding NF4Experts and the layer-by-layer expert loader (--load_in_4bit)

Processing is transformers' ``Qwen3OmniMoeProcessor`` (chat template, ``<|im_end|>`` end of turn, video/audio token
counts, the video clock as ``video_second_per_grid``) and the position ids are the thinker's own ``get_rope_index``.
Video token merging is refused: the thinker adds deepstack features of every vision token into the first layers,
so merged video tokens would no longer line up with them. Importing this package is cheap (no transformers model
code).
"""

from surgvqa.backbones.qwen3_omni_moe.backbone import BACKBONE, EXPERT_PARAMETERS, Qwen3OmniMoe

__all__ = ["BACKBONE", "EXPERT_PARAMETERS", "Qwen3OmniMoe"]
