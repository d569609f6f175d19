"""The ``qwen3_omni_moe`` backbone: how training, evaluation and merging load, train and describe the thinker.

Imports no transformers model code at import time (``modeling`` loads on first use).
"""

from __future__ import annotations

import logging
import re

from surgvqa.backbones.base import Backbone, LoadOptions, check_quantized, unwrap
from surgvqa.backbones.common.token_merging import kept_video_tokens
from surgvqa.errors import UserError

logger = logging.getLogger(__name__)

MODEL_TYPES = ("qwen3_omni_moe", "qwen3_omni_moe_thinker")
#: the fused expert parameters LoRA reaches with --lora_experts (PEFT ``target_parameters``)
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
VISION_START_ID = 151652  # <|vision_start|> in the Qwen3 vocabulary


class Qwen3OmniMoe(Backbone):
    name = "qwen3_omni_moe"
    lora_target_regex = (
        r"model\.language_model\.layers\.\d+\."
        r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
    )
    vision_lora_regex = r"model\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(linear_fc1|linear_fc2))"
    tower_modules = ("model.visual", "model.audio_tower")
    projector_modules = ("model.visual.merger", "model.visual.merger_list", "model.audio_tower.proj1",
                         "model.audio_tower.proj2")
    conv3d_patch_embed = "model.visual.patch_embed"
    expert_parameters = EXPERT_PARAMETERS
    #: NF4 settings of the experts under --load_in_4bit (bitsandbytes' own 4-bit defaults)
    nf4_blocksize = 64
    nf4_double_quant = True

    def expert_stored_bytes(self, shape: tuple[int, ...], quantization: str | None) -> int | None:
        """NF4 under 4-bit (:func:`~surgvqa.backbones.qwen3_omni_moe.experts.nf4_matrix_bytes` per expert), else
        unquantized (the 8-bit loading has no expert quantization: ``check_quantized`` refuses it)."""
        from surgvqa.backbones.qwen3_omni_moe.experts import nf4_matrix_bytes

        if quantization != "4bit":
            return None
        experts, rows, cols = shape
        return experts * nf4_matrix_bytes(rows * cols, self.nf4_blocksize, self.nf4_double_quant)

    processor_class = "Qwen3OmniMoeProcessor"
    loaded_part = "thinker_config"
    planned_class = "Qwen3OmniMoeThinkerForConditionalGeneration"

    def matches(self, config: dict) -> bool:
        return config.get("model_type") in MODEL_TYPES

    def processing(self, processor, **settings):
        from surgvqa.backbones.qwen3_omni_moe.processing import Qwen3OmniMoeProcessing

        return Qwen3OmniMoeProcessing(processor, **settings)

    def thinker_config(self, path: str, trust_remote_code: bool = False):
        """(the thinker's config, from_pretrained kwargs): a full Qwen3-Omni checkpoint loads only its thinker."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        kwargs = {}
        if config.model_type == "qwen3_omni_moe":
            logger.info("loading only the thinker of the full Qwen3-Omni checkpoint %s", path)
            config = config.thinker_config
            kwargs["key_mapping"] = {r"^thinker\.": ""}
        if getattr(config, "vision_start_token_id", None) is None:  # the rope index reads it
            config.vision_start_token_id = VISION_START_ID
        return config, kwargs

    def load(self, path: str, options: LoadOptions):
        """The thinker (never the talker or code2wav). ``--load_in_4bit``: attention and dense projections as
        bitsandbytes ``Linear4bit``, the fused experts as :class:`NF4Experts` quantized layer by layer from the
        checkpoint; towers, projectors, embeddings and the LM head in the compute dtype."""
        from surgvqa.backbones.qwen3_omni_moe.modeling import Qwen3OmniMoeThinker

        options.validate()
        if options.load_in_8bit:
            raise UserError("--load_in_8bit: qwen3_omni_moe quantizes its fused experts in 4-bit only (NF4); the "
                             "8-bit loading would leave them 16-bit. Use --load_in_4bit")
        config, kwargs = self.thinker_config(path, options.trust_remote_code)
        model_class = Qwen3OmniMoeThinker
        if options.load_in_4bit:
            from surgvqa.backbones.qwen3_omni_moe.modeling import (
                NF4_ATTRIBUTE,
                Qwen3OmniMoeThinkerNF4ForConditionalGeneration,
            )

            setattr(config, NF4_ATTRIBUTE, {"blocksize": self.nf4_blocksize, "double_quant": self.nf4_double_quant})
            model_class = Qwen3OmniMoeThinkerNF4ForConditionalGeneration
        model = model_class.from_pretrained(path, config=config, **self.from_pretrained_kwargs(options), **kwargs)
        if options.load_in_4bit:
            from surgvqa.backbones.qwen3_omni_moe.modeling import NF4_ATTRIBUTE, load_nf4_experts

            delattr(model.config, NF4_ATTRIBUTE)
            count = load_nf4_experts(model, path)
            logger.info("%d experts quantized to NF4 layer by layer", count)
        check_quantized(model, self, options)
        self.warn_if_slow_conv3d()
        return model

    def enable_token_merging(self, model, ratio: float) -> None:
        """Refused below 1: the thinker adds the vision tower's deepstack features to the hidden states of every
        video token position in its first layers, so a merged (shorter) video run would no longer line up with
        them."""
        kept_video_tokens(1, ratio)
        if ratio != 1.0:
            raise UserError("--token_kept_ratio: qwen3_omni_moe has no video token merging (its deepstack features "
                             "are added per video token in the first layers, one per original token); drop it or "
                             "set it to 1.0")

    # -- training ---------------------------------------------------------------------------------------------
    def expert_lora_parameters(self, model, options: LoadOptions) -> list[str]:
        """PEFT ``target_parameters`` for --lora_experts: both fused expert stacks of every MoE layer. On the NF4
        experts they are storage-free placeholders whose LoRA update the experts add to each routed expert
        (``NF4Experts.expose_for_lora``): the same adapter format either way."""
        return list(EXPERT_PARAMETERS)

    def make_trainable(self, model, lora_config, stage: int | None = None, init_from: str | None = None):
        """PEFT LoRA with the regex resolved to full module names first: on transformers 5 MoE models PEFT rewrites
        a regex ``target_modules`` to bare leaf names (``q_proj`` ...), which would also wrap the audio tower's
        projections. The router (``mlp.gate``) is never a target and stays frozen."""
        if isinstance(lora_config.target_modules, str):
            pattern = re.compile(lora_config.target_modules)
            names = [name for name, _ in model.named_modules() if pattern.fullmatch(name)]
            if not names:
                raise UserError(f"LoRA matched no module: --lora_target_regex {lora_config.target_modules!r}")
            lora_config.target_modules = names
        peft_model = super().make_trainable(model, lora_config, stage=stage, init_from=init_from)
        router = [name for name, param in peft_model.named_parameters() if param.requires_grad
                  and re.search(r"\.mlp\.gate\.", name) and "lora_" not in name]
        if router:
            raise UserError(f"the MoE router must stay frozen, but {router[0]} is trainable: leave mlp.gate out of "
                             "--lora_target_regex and modules_to_save")
        return peft_model

    def set_router_aux_loss(self, model, coefficient: float) -> None:
        """The router's load-balancing loss, ``coefficient`` x aux loss added to the LM loss (0: not computed).
        The router itself stays frozen either way."""
        thinker = unwrap(model)
        text = thinker.config.text_config
        text.output_router_logits = coefficient > 0
        text.router_aux_loss_coef = float(coefficient)
        thinker.router_aux_loss_coef = float(coefficient)




BACKBONE = Qwen3OmniMoe()
