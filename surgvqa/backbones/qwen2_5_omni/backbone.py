"""The ``qwen2_5_omni`` backbone: the thinker (vision + audio towers + language model), never the talker, loaded into
:class:`~surgvqa.backbones.qwen2_5_omni.modeling.Qwen25OmniThinker`."""

from __future__ import annotations

import logging

from surgvqa.backbones.base import Backbone, LoadOptions, check_quantized

logger = logging.getLogger(__name__)

VISION_BOS_ID = 151652


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
    keeps_tower_outputs = True
    packs_rows = True
    processor_class = "Qwen2_5OmniProcessor"
    loaded_part = "thinker_config"
    planned_class = "Qwen2_5OmniThinkerForConditionalGeneration"

    def matches(self, config: dict) -> bool:
        return config.get("model_type") in ("qwen2_5_omni", "qwen2_5_omni_thinker")

    def processing(self, processor, **settings):
        from surgvqa.backbones.qwen2_5_omni.processing import Qwen25OmniProcessing

        return Qwen25OmniProcessing(processor, **settings)

    def load(self, path: str, options: LoadOptions):
        from transformers import AutoConfig

        from surgvqa.backbones.qwen2_5_omni.modeling import Qwen25OmniThinker

        options.validate()
        config = AutoConfig.from_pretrained(path, trust_remote_code=options.trust_remote_code)
        kwargs = {}
        if config.model_type == "qwen2_5_omni":
            # A full Omni checkpoint: load only the thinker's weights, the talker and token2wav stay on disk.
            logger.info("loading only the thinker of the full Qwen2.5-Omni checkpoint %s", path)
            config = config.thinker_config
            kwargs["key_mapping"] = {r"^thinker\.": ""}
        _set_vision_start(config)
        model = Qwen25OmniThinker.from_pretrained(path, config=config, **self.from_pretrained_kwargs(options), **kwargs)
        check_quantized(model, self, options)
        self.warn_if_slow_conv3d()
        return model

    # -- the full model (thinker + talker + token2wav), for ``merge_stage2_to_bf16.py --full_omni``
    full_model_files = ("spk_dict.pt",)  # the talker's speakers (the one pickle; transformers loads it weights-only)

    def full_model_problem(self, config: dict, path: str) -> str | None:
        model_type = config.get("model_type")
        if model_type == "qwen2_5_omni":
            return None
        return (f"--full_omni needs a full Qwen2.5-Omni base (model_type 'qwen2_5_omni'); {path} is {model_type!r}, "
                "which has no talker to keep. Drop --full_omni to write the merged thinker")

    def load_full(self, path: str, options: LoadOptions):
        from surgvqa.backbones.qwen2_5_omni.modeling import Qwen25OmniFull

        options.validate()
        full = Qwen25OmniFull.from_pretrained(
            path, dtype=options.torch_dtype(), attn_implementation=options.attn_implementation
        )
        _set_vision_start(full.thinker.config)
        return full, full.thinker

    def put_back(self, full, merged):
        full.thinker = merged
        return full


def _set_vision_start(config) -> None:
    """Qwen2_5OmniThinkerConfig does not define ``vision_start_token_id``; its rope index needs it
    (``<|vision_bos|>``, id 151652 in every Qwen2.5-Omni vocabulary)."""
    if getattr(config, "vision_start_token_id", None) is None:
        config.vision_start_token_id = VISION_BOS_ID


#: the instance listed in ``surgvqa.backbones.BACKBONES``
BACKBONE = QWEN2_5_OMNI = Qwen25Omni()
