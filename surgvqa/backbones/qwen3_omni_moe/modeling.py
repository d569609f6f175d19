"""The thinker with NF4 experts, and its loader that quantizes the expert stacks layer by layer.

:class:`Qwen3OmniMoeThinkerNF4ForConditionalGeneration` is transformers' thinker whose sparse MoE blocks hold an
:class:`~surgvqa.backbones.qwen3_omni_moe.experts.NF4Experts` instead of the fused 16-bit stacks (built in its
constructor, so ``from_pretrained`` never allocates the 16-bit experts; their checkpoint tensors are left unread).
:func:`load_nf4_experts` then reads the expert tensors from the checkpoint's safetensors one stack (or one expert) at
a time and quantizes each into its module: at most one layer's 16-bit stack is in memory at once. Checkpoints
written by transformers 5 hold fused stacks (``…mlp.experts.gate_up_proj``); the released Qwen3-Omni checkpoints
hold one ``gate_proj``/``up_proj``/``down_proj`` per expert (``thinker.model.layers.N.mlp.experts.E.…``): both load.

:class:`Qwen3OmniMoeThinker` is the thinker the backbone loads in 16-bit: the stock class plus labelled-only logits
(``forward(logits_mask=...)``, backbones/common). It adds no parameter: a checkpoint it saves is the stock class's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import Qwen3OmniMoeThinkerForConditionalGeneration
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    MultimodalMoeCausalLMOutputWithPast,
    load_balancing_loss_func,
)

from surgvqa.backbones.common.labelled_logits import head_logits, labelled_loss
from surgvqa.backbones.common.stock_checkpoint import StockCheckpoint, register_stock_layout
from surgvqa.backbones.qwen3_omni_moe.experts import PROJECTIONS, NF4Experts
from surgvqa.errors import UserError

#: the stock class, named in saved config.json files (loaders that read ``architectures`` find it)
STOCK_CLASS = Qwen3OmniMoeThinkerForConditionalGeneration

#: config attribute naming the NF4 settings ({"blocksize": 64, "double_quant": true}) of the subclass
NF4_ATTRIBUTE = "surgvqa_nf4_experts"
_FUSED = re.compile(r"^(?:thinker\.)?model\.(?:language_model\.)?layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(
    r"^(?:thinker\.)?model\.(?:language_model\.)?layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)"
    r"\.weight$"
)


def moe_blocks(model) -> dict[int, torch.nn.Module]:
    """Decoder layer index -> its sparse MoE block (layers whose ``mlp`` has ``experts``)."""
    layers = model.model.language_model.layers
    return {i: layer.mlp for i, layer in enumerate(layers) if hasattr(layer.mlp, "experts")}


class Qwen3OmniMoeThinker(StockCheckpoint, Qwen3OmniMoeThinkerForConditionalGeneration):
    """The Qwen3-Omni thinker with labelled-only logits (``logits_mask``); without it ``forward`` is the stock one."""

    stock_class = Qwen3OmniMoeThinkerForConditionalGeneration

    def forward(self, input_ids=None, input_features=None, pixel_values=None, pixel_values_videos=None,
                image_grid_thw=None, video_grid_thw=None, attention_mask=None, feature_attention_mask=None,
                audio_feature_lengths=None, position_ids=None, cache=None, inputs_embeds=None, labels=None,
                use_cache=None, output_router_logits=None, use_audio_in_video=None, video_second_per_grid=None,
                mm_encoder_outputs=None, logits_mask: torch.Tensor | None = None, **kwargs):
        """The stock forward, plus ``logits_mask`` (boolean (batch, seq)): the LM head runs on those positions only
        and returns them as (n, vocab) rows; the loss with ``labels`` is then :func:`labelled_loss` (plus the
        router's weighted load-balancing loss when its logits are asked for, as the stock forward adds it)."""
        inputs = dict(input_ids=input_ids, input_features=input_features, pixel_values=pixel_values,
                      pixel_values_videos=pixel_values_videos, image_grid_thw=image_grid_thw,
                      video_grid_thw=video_grid_thw, attention_mask=attention_mask,
                      feature_attention_mask=feature_attention_mask, audio_feature_lengths=audio_feature_lengths,
                      position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache,
                      use_audio_in_video=use_audio_in_video, video_second_per_grid=video_second_per_grid,
                      mm_encoder_outputs=mm_encoder_outputs)
        if logits_mask is None:
            return super().forward(**inputs, labels=labels, output_router_logits=output_router_logits, **kwargs)
        if output_router_logits is None:
            output_router_logits = self.config.text_config.output_router_logits
        kwargs.pop("return_dict", None)
        num_items = kwargs.pop("num_items_in_batch", None)
        outputs = self.model(**inputs, output_router_logits=output_router_logits, **kwargs)
        logits = head_logits(self.lm_head, outputs[0], logits_mask)
        loss = labelled_loss({"logits": logits}, labels, num_items) if labels is not None else None
        aux_loss = None
        if output_router_logits:
            aux_loss = load_balancing_loss_func(outputs.router_logits, self.num_experts, self.num_experts_per_tok,
                                                attention_mask)
            if loss is not None:
                loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
        return MultimodalMoeCausalLMOutputWithPast(
            loss=loss, logits=logits, aux_loss=aux_loss, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions, cache=outputs.cache, image_outputs=outputs.image_outputs,
            router_logits=outputs.router_logits)


class Qwen3OmniMoeThinkerNF4ForConditionalGeneration(Qwen3OmniMoeThinker):
    """The thinker with every sparse MoE block's experts in NF4 (``config.surgvqa_nf4_experts``). Only for loading
    in 4-bit: merged and saved models are written by the stock class (the merge loads the 16-bit base)."""

    _keys_to_ignore_on_load_unexpected = [r"mlp\.experts\."]  # read by load_nf4_experts instead
    _keys_to_ignore_on_load_missing = [r"mlp\.experts\.\w+_(codes|absmax|absmax_scale|absmax_offset)$"]

    def __init__(self, config):
        super().__init__(config)
        settings = getattr(config, NF4_ATTRIBUTE, None) or {}
        for block in moe_blocks(self).values():
            block.experts = NF4Experts.like(block.experts, blocksize=int(settings.get("blocksize", 64)),
                                            double_quant=bool(settings.get("double_quant", True)))


register_stock_layout(Qwen3OmniMoeThinker, Qwen3OmniMoeThinkerNF4ForConditionalGeneration, stock=STOCK_CLASS)


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path}: no *.safetensors weights to read the experts from")
    return files


@torch.no_grad()
def load_nf4_experts(model, path: str | Path) -> int:
    """Quantize every expert of ``path``'s checkpoint into ``model``'s NF4 modules, one tensor at a time; returns
    the number of experts loaded. Raises if an expert of the model is missing from the checkpoint."""
    from safetensors import safe_open

    blocks = moe_blocks(model)
    filled = {i: {name: torch.zeros(block.experts.num_experts, dtype=torch.bool) for name in PROJECTIONS}
              for i, block in blocks.items()}
    pending: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # per-expert format: gate waits for up
    for file in _weight_files(Path(path)):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if (match := _FUSED.match(key)) and int(match[1]) in blocks:
                    layer, name = int(match[1]), match[2]
                    blocks[layer].experts.quantize_(name, handle.get_tensor(key))
                    filled[layer][name][:] = True
                elif (match := _PER_EXPERT.match(key)) and int(match[1]) in blocks:
                    layer, expert, part = int(match[1]), int(match[2]), match[3]
                    experts = blocks[layer].experts
                    if part == "down_proj":
                        experts.quantize_expert_("down_proj", expert, handle.get_tensor(key))
                        filled[layer]["down_proj"][expert] = True
                        continue
                    halves = pending.setdefault((layer, expert), {})
                    halves[part] = handle.get_tensor(key)
                    if len(halves) == 2:  # gate_up = [gate; up], as transformers fuses them
                        experts.quantize_expert_("gate_up_proj", expert,
                                                 torch.cat([halves["gate_proj"], halves["up_proj"]], dim=0))
                        filled[layer]["gate_up_proj"][expert] = True
                        del pending[(layer, expert)]
    missing = [f"layer {layer} {name} ({int((~done).sum())} experts)" for layer, names in filled.items()
               for name, done in names.items() if not bool(done.all())]
    if missing:
        raise UserError(f"{path}: the checkpoint lacks expert weights for {', '.join(missing[:6])}")
    for block in blocks.values():  # LoRA on the experts (--lora_experts, or an adapter loaded for evaluation)
        block.experts.expose_for_lora()
    return sum(block.experts.num_experts for block in blocks.values())
