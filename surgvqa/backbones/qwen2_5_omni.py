"""Qwen2.5-Omni: the thinker (vision + audio towers + language model), never the talker."""

from __future__ import annotations

import logging

from surgvqa.backbones.base import Backbone, LoadOptions

logger = logging.getLogger(__name__)


class Qwen25Omni(Backbone):
    name = "qwen2_5_omni"
    lora_target_regex = (
        r"model\.language_model\.layers\.\d+\."
        r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
    )
    vision_lora_regex = r"model\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(gate_proj|up_proj|down_proj))"
    tower_modules = ("model.visual", "model.audio_tower")
    projector_modules = ("model.visual.merger", "model.audio_tower.proj")
    conv3d_patch_embed = "model.visual.patch_embed"

    def matches(self, config: dict) -> bool:
        return config.get("model_type") in ("qwen2_5_omni", "qwen2_5_omni_thinker")

    def load(self, path: str, options: LoadOptions):
        from transformers import AutoConfig, Qwen2_5OmniThinkerForConditionalGeneration

        options.validate()
        config = AutoConfig.from_pretrained(path, trust_remote_code=options.trust_remote_code)
        kwargs = {}
        if config.model_type == "qwen2_5_omni":
            # A full Omni checkpoint: load only the thinker's weights, the talker and token2wav stay on disk.
            logger.info("loading only the thinker of the full Qwen2.5-Omni checkpoint %s", path)
            config = config.thinker_config
            kwargs["key_mapping"] = {r"^thinker\.": ""}
        if getattr(config, "vision_start_token_id", None) is None:
            # Qwen2_5OmniThinkerConfig does not define it; its rope index needs it (<|vision_bos|>).
            config.vision_start_token_id = 151652
        model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
            path,
            config=config,
            dtype=options.torch_dtype(),
            attn_implementation=options.attn_implementation,
            quantization_config=self.quantization_config(options),
            device_map=options.device_map,
            trust_remote_code=options.trust_remote_code,
            **kwargs,
        )
        self.warn_if_slow_conv3d()
        return model


#: the instance listed in ``surgvqa.backbones.BACKBONES``
BACKBONE = QWEN2_5_OMNI = Qwen25Omni()
