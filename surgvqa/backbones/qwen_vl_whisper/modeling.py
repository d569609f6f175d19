"""``QwenVLWhisperForConditionalGeneration``: the VL model, the Whisper encoder and the audio projector as one
``PreTrainedModel``, so Trainer, PEFT, ``save_pretrained`` / ``from_pretrained`` and ``generate`` work on it.

Audio: :mod:`.audio` encodes each clip by its own length; the output is cut to the clip's real frames, optionally
average-pooled 2x, projected and spliced into ``inputs_embeds`` at the ``<|AUDIO|>`` placeholders.

Positions: M-RoPE positions come from the VL model's own ``get_rope_index`` with ``mm_token_type_ids`` built here
from ``input_ids``: image/video placeholders are vision (1/2), everything else - audio placeholders included - is
text (0), so audio tokens advance the position like text and vision positions are the VL model's own.

Embeddings: text, vision (Qwen2-VL/2.5-VL: spliced here from ``get_image_features``/``get_video_features`` at the
exact ``input_ids`` positions) and audio are assembled into ``inputs_embeds``; training and ``generate`` both call
the VL model with ``inputs_embeds`` + explicit 3-D ``position_ids`` (``generate`` then returns only the new tokens,
which ``surgvqa.generate.new_token_ids`` handles). Qwen3-VL's deepstack needs the VL model to splice vision itself:
there the pixels are passed along and the VL model finds its placeholders by embedding equality (checked here
against ``input_ids`` before every call).

Importing this module registers the model with ``AutoModelForImageTextToText``.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoModelForImageTextToText, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from surgvqa.backbones.common.labelled_logits import head_logits, labelled_loss
from surgvqa.backbones.common.token_merging import merge_videos, merged_position_ids
from surgvqa.backbones.qwen_vl_whisper.audio import encode_trimmed, fit_window
from surgvqa.backbones.qwen_vl_whisper.configuration import QwenVLWhisperConfig
from surgvqa.backbones.qwen_vl_whisper.constants import (
    ENCODER_SUBDIR,
    PROJECTOR_FILE,
    PROJECTOR_PREFIX,
    SPLICES_VISION,
    VL_CLASSES,
    VL_SUBDIR,
)
from surgvqa.backbones.qwen_vl_whisper.weights import (
    load_whisper_encoder,
    mark_initialized,
    read_projector,
    resolve_part,
    write_projector,
    write_projector_index,
)
from surgvqa.errors import UserError


class AudioProjector(nn.Module):
    """Whisper ``d_model`` → LLM hidden size: ``linear`` (the original graft) or ``mlp`` (Linear-GELU-Linear)."""

    def __init__(self, in_dim: int, out_dim: int, kind: str = "linear"):
        super().__init__()
        if kind == "linear":
            self.layers = nn.Sequential(nn.Linear(in_dim, out_dim))
        elif kind == "mlp":
            self.layers = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        else:
            raise UserError(f"projector must be 'linear' or 'mlp', got {kind!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _splice(embeds: torch.Tensor, mask: torch.Tensor, features: torch.Tensor, what: str) -> torch.Tensor:
    count = int(mask.sum())
    if count != features.shape[0]:
        raise UserError(
            f"{count} {what} placeholder token(s) but {features.shape[0]} {what} feature(s): the processor and "
            "the model disagree (for audio: audio_pooling / trim_audio of the processor vs config.json)"
        )
    if count == 0:
        return embeds
    return embeds.masked_scatter(mask.unsqueeze(-1).to(embeds.device), features.to(embeds.device, embeds.dtype))


class QwenVLWhisperForConditionalGeneration(PreTrainedModel, GenerationMixin):
    config_class = QwenVLWhisperConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("image", "video", "audio", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _keep_in_fp32_modules = ["audio_projector"]

    def __init__(self, config: QwenVLWhisperConfig, vl_model=None, audio_encoder=None):
        super().__init__(config)
        vl_type = config.vl_config.model_type
        if vl_type not in VL_CLASSES:
            raise UserError(f"unsupported VL model_type {vl_type!r}; supported: {', '.join(VL_CLASSES)}")
        # the VL model first: model.dtype (its first parameter) is the LLM's dtype
        if vl_model is None:
            vl_model = getattr(transformers, VL_CLASSES[vl_type])._from_config(config.vl_config)
        self.vl_model = vl_model
        self.audio_encoder = audio_encoder if audio_encoder is not None else WhisperEncoder._from_config(
            config.audio_config)
        hidden = config.vl_config.get_text_config().hidden_size
        self.audio_projector = AudioProjector(config.audio_config.d_model, hidden, config.projector_type)
        #: "full": save the VL model and the encoder too; "projector" (stage-1 training): the projector only
        self.save_mode = "full"
        #: video token merging (a run setting, set by the backbone's ``enable_token_merging``; 1.0: off)
        self.token_kept_ratio = 1.0
        self.post_init()

    # -- the parts ------------------------------------------------------------------------------------------
    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = getattr(self.config.vl_config.get_text_config(), "initializer_range", 0.02)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @property
    def vl_type(self) -> str:
        return self.config.vl_config.model_type

    def get_input_embeddings(self):
        return self.vl_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.vl_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.vl_model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.vl_model.set_output_embeddings(value)

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        embeddings = self.vl_model.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        self.config.vl_config.get_text_config().vocab_size = embeddings.num_embeddings
        return embeddings

    # -- inputs ---------------------------------------------------------------------------------------------
    def get_audio_features(self, input_features: torch.Tensor,
                           feature_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Projected audio tokens of the batch, concatenated: (sum of per-clip counts, hidden). Each clip is
        encoded by its own length (``feature_attention_mask``), so its tokens do not depend on the batch."""
        encoder = self.audio_encoder
        features = input_features.to(device=encoder.device, dtype=encoder.dtype)
        if feature_attention_mask is None:
            lengths = torch.full((features.shape[0],), features.shape[-1], device=features.device)
        else:
            lengths = feature_attention_mask.to(features.device).sum(-1)
        window = 2 * encoder.config.max_source_positions
        lengths = lengths.clamp(max=window)
        trainable = any(p.requires_grad for p in encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            if self.config.audio_window == "full":
                hidden = encoder(fit_window(features, window, lengths)).last_hidden_state
            else:
                hidden = encode_trimmed(encoder, features[..., :window], lengths)
        if self.config.trim_audio:
            keep = torch.clamp((lengths - 1) // 2 + 1, max=hidden.shape[1])
        else:
            keep = torch.full_like(lengths, hidden.shape[1])
        pool = int(self.config.audio_pooling)
        if pool > 1:
            hidden = nn.functional.avg_pool1d(hidden.transpose(1, 2), pool, pool).transpose(1, 2)
            keep = keep // pool
        hidden = hidden[:, : int(keep.max())]
        projector_dtype = next(self.audio_projector.parameters()).dtype
        projected = self.audio_projector(hidden.to(projector_dtype))
        valid = torch.arange(projected.shape[1], device=projected.device)[None, :] < keep[:, None].to(
            projected.device)
        return projected[valid]

    def mm_token_type_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """0 text (audio placeholders included), 1 image, 2 video: what the VL rope index reads."""
        types = torch.zeros_like(input_ids, dtype=torch.int)
        types[input_ids == self.config.vl_config.image_token_id] = 1
        types[input_ids == self.config.vl_config.video_token_id] = 2
        return types

    def get_position_ids(self, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None,
                         second_per_grid_ts=None) -> torch.Tensor:
        """(3, batch, length) M-RoPE positions from the VL model's own ``get_rope_index``."""
        rope_index = self.vl_model.model.get_rope_index
        kwargs = {"mm_token_type_ids": self.mm_token_type_ids(input_ids), "image_grid_thw": image_grid_thw,
                  "video_grid_thw": video_grid_thw, "attention_mask": attention_mask}
        if "second_per_grid_ts" in inspect.signature(rope_index).parameters:
            kwargs["second_per_grid_ts"] = second_per_grid_ts
        position_ids, _ = rope_index(input_ids, **kwargs)
        return position_ids

    def prepare_inputs_embeds(self, input_ids, attention_mask=None, pixel_values=None, pixel_values_videos=None,
                              image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None,
                              input_features=None, feature_attention_mask=None):
        """(inputs_embeds, position_ids, kwargs for the VL call): text, vision and audio in one tensor."""
        embeds = self.get_input_embeddings()(input_ids)
        vl_kwargs: dict[str, Any] = {}
        vl_config = self.config.vl_config
        merged = None
        if self.vl_type in SPLICES_VISION:
            if pixel_values is not None:
                image = self.vl_model.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
                embeds = _splice(embeds, input_ids == vl_config.image_token_id,
                                 torch.cat(image.pooler_output, dim=0), "image")
            if pixel_values_videos is not None:
                video = self.vl_model.model.get_video_features(pixel_values_videos, video_grid_thw,
                                                               return_dict=True)
                features = video.pooler_output
                if self.token_kept_ratio != 1.0:  # video token merging (backbones.common.token_merging)
                    merged = merge_videos(features, self.token_kept_ratio, video_grid_thw,
                                          vl_config.vision_config.spatial_merge_size)
                    features = [m.tokens for m in merged]
                embeds = _splice(embeds, input_ids == vl_config.video_token_id, torch.cat(features, dim=0), "video")
        elif self.token_kept_ratio != 1.0:
            raise UserError(f"token merging is not available for {self.vl_type} grafts (its VL model places the "
                            "vision tokens itself)")
        else:
            vl_kwargs = {k: v for k, v in (("pixel_values", pixel_values), ("image_grid_thw", image_grid_thw),
                                           ("pixel_values_videos", pixel_values_videos),
                                           ("video_grid_thw", video_grid_thw)) if v is not None}
        if input_features is not None:
            audio = self.get_audio_features(input_features, feature_attention_mask)
            embeds = _splice(embeds, input_ids == self.config.audio_token_id, audio, "audio")
        elif (input_ids == self.config.audio_token_id).any():
            raise ValueError("<|AUDIO|> placeholders in input_ids but no input_features")
        if vl_kwargs:
            self._check_vision_placeholders(input_ids, embeds)
        if merged is None:
            position_ids = self.get_position_ids(input_ids, attention_mask, image_grid_thw, video_grid_thw,
                                                 second_per_grid_ts)
        else:  # positions of the full grid, each merged token at the one it represents
            position_ids, _ = merged_position_ids(
                input_ids, attention_mask, vl_config.video_token_id, merged,
                lambda ids, mask: self.get_position_ids(ids, mask, image_grid_thw, video_grid_thw,
                                                        second_per_grid_ts))
        return embeds, position_ids, vl_kwargs

    def _check_vision_placeholders(self, input_ids, embeds) -> None:
        """The VL model finds its placeholders by embedding equality when given inputs_embeds: make sure that finds
        exactly the ``input_ids`` positions (a duplicated embedding row would misplace vision)."""
        table = self.get_input_embeddings().weight
        for token_id in (self.config.vl_config.image_token_id, self.config.vl_config.video_token_id):
            by_value = (embeds == table[token_id].to(embeds.dtype)).all(-1)
            held = input_ids == token_id
            if not torch.equal(by_value, held):
                raise ValueError(
                    f"{int(by_value.sum())} positions embed like token {token_id} but {int(held.sum())} "
                    "hold it: the VL model could not place the vision features"
                )

    # -- forward / generate ---------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, pixel_values=None, pixel_values_videos=None,
                image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None, input_features=None,
                feature_attention_mask=None, logits_to_keep=0, logits_mask: torch.Tensor | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        """The VL model's forward on the spliced embeddings; ``logits_mask`` (boolean (batch, seq)): logits of those
        positions only, as (n, vocab) rows (:mod:`surgvqa.backbones.common.labelled_logits`)."""
        for key in ("output_attentions", "output_hidden_states", "return_dict", "mm_token_type_ids"):
            if kwargs.get(key) is None:
                kwargs.pop(key, None)
        vl_kwargs: dict[str, Any] = {}
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (or inputs_embeds)")
            inputs_embeds, rope, vl_kwargs = self.prepare_inputs_embeds(
                input_ids, attention_mask, pixel_values, pixel_values_videos, image_grid_thw, video_grid_thw,
                second_per_grid_ts, input_features, feature_attention_mask,
            )
            position_ids = rope if position_ids is None else position_ids
        if logits_mask is None:
            return self.vl_model(
                input_ids=None, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                position_ids=position_ids, past_key_values=past_key_values, labels=labels, use_cache=use_cache,
                logits_to_keep=logits_to_keep, **vl_kwargs, **kwargs,
            )
        outputs = self.vl_model.model(input_ids=None, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                      position_ids=position_ids, use_cache=use_cache, **vl_kwargs, **kwargs)
        logits = head_logits(self.vl_model.lm_head, outputs[0], logits_mask)
        loss = labelled_loss({"logits": logits}, labels, kwargs.get("num_items_in_batch")) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, pixel_values=None, pixel_values_videos=None,
                 image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None, input_features=None,
                 feature_attention_mask=None, generation_config=None, **kwargs):
        """Greedy/sampled generation from ``inputs_embeds``: returns only the new tokens."""
        if input_ids is None:
            raise ValueError("QwenVLWhisperForConditionalGeneration.generate needs input_ids")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds, position_ids, vl_kwargs = self.prepare_inputs_embeds(
            input_ids, attention_mask, pixel_values, pixel_values_videos, image_grid_thw, video_grid_thw,
            second_per_grid_ts, input_features, feature_attention_mask,
        )
        if generation_config is None and self.generation_config is not None:
            self.vl_model.generation_config = self.generation_config  # eos/pad as repaired on the graft
        elif generation_config is not None:
            kwargs["generation_config"] = generation_config
        return self.vl_model.generate(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, **vl_kwargs, **kwargs,
        )

    # -- save / load ----------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, *args, save_towers: bool | None = None, state_dict=None,
                        is_main_process: bool = True, push_to_hub: bool = False, **kwargs):
        """Write the graft directory: config.json, projector.safetensors, generation_config.json and, with
        ``save_towers`` (default: unless in stage-1 training), the VL model (``vl_model/``) and the encoder
        (``audio_encoder/``), so the directory stands alone.

        Every tensor comes from ``state_dict`` when given (Trainer passes the gathered one under ZeRO-3 / FSDP,
        where the module's own parameters are shards); ``*args`` and the other keywords (``max_shard_size``,
        ``save_function``, ...) go to the parts' ``save_pretrained``."""
        if push_to_hub:
            raise UserError("push_to_hub: a graft directory refers to its parts by path; save it, then upload the "
                            "directory (huggingface_hub upload_folder)")
        if not is_main_process:
            return
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        if save_towers is None:
            save_towers = self.save_mode != "projector"
        state = self.state_dict() if state_dict is None else state_dict
        config = copy.deepcopy(self.config)
        if save_towers:
            self.vl_model.save_pretrained(save_directory / VL_SUBDIR, *args, state_dict=_part(state, "vl_model."),
                                          **kwargs)
            self.audio_encoder.save_pretrained(save_directory / ENCODER_SUBDIR, *args,
                                               state_dict=_part(state, "audio_encoder."), **kwargs)
            config.vl_model_path, config.audio_encoder_path = VL_SUBDIR, ENCODER_SUBDIR
        elif not (self.config.vl_model_path and self.config.audio_encoder_path):
            raise ValueError("this graft records no VL model / encoder paths: save it with save_towers=True")
        projector = _part(state, PROJECTOR_PREFIX)
        write_projector(projector, save_directory)
        index = save_directory / "model.safetensors.index.json"
        if save_towers:
            index.unlink(missing_ok=True)
        else:  # lets Trainer resume a stage-1 checkpoint: the trained weights of the model live here
            write_projector_index(projector, save_directory)
        config.to_json_file(save_directory / "config.json", use_diff=False)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        """Load a graft directory: the VL model by its own ``from_pretrained`` (``*model_args`` and every keyword -
        ``dtype`` (default "auto"), ``attn_implementation``, ``quantization_config``, ``device_map``, ... - go to
        it), the Whisper encoder in the VL model's compute dtype and on its device, the projector in float32."""
        path = Path(pretrained_model_name_or_path)
        if not isinstance(config, QwenVLWhisperConfig):
            config = QwenVLWhisperConfig.from_pretrained(str(path))
        vl_path = resolve_part(config.vl_model_path, path)
        encoder_path = resolve_part(config.audio_encoder_path, path)
        if "dtype" not in kwargs and "torch_dtype" not in kwargs:
            kwargs["dtype"] = "auto"
        vl_class = getattr(transformers, VL_CLASSES[config.vl_config.model_type])
        vl_model = vl_class.from_pretrained(str(vl_path), *model_args, **kwargs)
        mark_initialized(vl_model)
        embed = vl_model.get_input_embeddings().weight
        compute_dtype = embed.dtype if embed.is_floating_point() else torch.bfloat16
        encoder = load_whisper_encoder(encoder_path, dtype=compute_dtype, device=embed.device)
        if kwargs.get("attn_implementation") in ("sdpa", "eager"):
            encoder.config._attn_implementation = kwargs["attn_implementation"]
        config.vl_config, config.audio_config = vl_model.config, encoder.config
        config.vl_model_path, config.audio_encoder_path = str(vl_path), str(encoder_path)
        model = cls(config, vl_model=vl_model, audio_encoder=encoder)
        projector_file = path / PROJECTOR_FILE
        if not projector_file.is_file():
            raise UserError(f"{projector_file} not found: a graft directory holds its audio projector")
        model.audio_projector.load_state_dict(read_projector(projector_file), strict=True)
        model.audio_projector.to(device=embed.device, dtype=torch.float32)
        if (path / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(str(path))
        elif vl_model.generation_config is not None:
            model.generation_config = vl_model.generation_config
        model.name_or_path = str(path)
        model.config._name_or_path = str(path)
        model.eval()
        return model


def _part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of one part of the graft, with the part's own key names."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_graft(path: str | Path, *model_args, **kwargs) -> QwenVLWhisperForConditionalGeneration:
    """``QwenVLWhisperForConditionalGeneration.from_pretrained``: VL model, Whisper encoder, projector."""
    return QwenVLWhisperForConditionalGeneration.from_pretrained(path, *model_args, **kwargs)


AutoModelForImageTextToText.register(QwenVLWhisperConfig, QwenVLWhisperForConditionalGeneration, exist_ok=True)
