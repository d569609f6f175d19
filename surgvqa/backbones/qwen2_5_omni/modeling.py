"""``Qwen25OmniThinker``: transformers' Qwen2.5-Omni thinker with four code paths of its own (backbones/common):
video token merging (``token_kept_ratio``: ``forward``/``generate`` hand the merged video to the inner model with
positions from the full grid), kept tower outputs (``tower_cache``, for calls naming their items in ``media_ids``),
packed rows (``packed_lengths``: several samples per row, each with its own positions and attention) and
labelled-only logits (``logits_mask``). Without them ``forward`` runs the stock code. No parameter is added: a
checkpoint it saves is the stock class's (``architectures`` names it) and the stock class's loads into it."""

from __future__ import annotations

import torch
from transformers import Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniThinkerForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import MultimodalCausalLMOutputWithPast
from transformers.utils.generic import can_return_tuple

from surgvqa.backbones.common.labelled_logits import head_logits, labelled_loss
from surgvqa.backbones.common.packing import packed_attention, repack, text_positions, unpack
from surgvqa.backbones.common.stock_checkpoint import StockCheckpoint, register_stock_layout
from surgvqa.backbones.common.token_merging import merge_videos, merged_position_ids
from surgvqa.backbones.common.tower_cache import EncoderOutputCache, deterministic_frozen

#: the stock class, named in saved config.json files (loaders that read ``architectures`` find it)
STOCK_CLASS = Qwen2_5OmniThinkerForConditionalGeneration


class Qwen25OmniThinker(StockCheckpoint, Qwen2_5OmniThinkerForConditionalGeneration):
    """The Qwen2.5-Omni thinker with token merging, kept tower outputs, packed rows and labelled-only logits."""

    stock_class = Qwen2_5OmniThinkerForConditionalGeneration

    #: video token merging: each video's tokens merged down to ceil(r * n) (1.0: off); a run setting, not saved
    token_kept_ratio: float = 1.0
    #: frozen towers' outputs kept per training item (None: off)
    tower_cache: EncoderOutputCache | None = None

    @can_return_tuple
    def forward(self, input_ids=None, input_features=None, pixel_values=None, pixel_values_videos=None,
                image_grid_thw=None, video_grid_thw=None, attention_mask=None, feature_attention_mask=None,
                audio_feature_lengths=None, position_ids=None, cache=None, inputs_embeds=None, labels=None,
                use_cache=None, use_audio_in_video=None, video_second_per_grid=None, mm_encoder_outputs=None,
                logits_mask: torch.Tensor | None = None, media_ids: torch.Tensor | None = None,
                packed_lengths: torch.Tensor | None = None, **kwargs) -> MultimodalCausalLMOutputWithPast:
        """The stock forward, plus: ``logits_mask`` (boolean (batch, seq)): logits of those positions only, as
        (n, vocab) rows (the loss with ``labels`` is then :func:`labelled_loss`); ``media_ids``: the items of the
        batch, whose frozen towers' outputs ``tower_cache`` serves; ``packed_lengths`` (rows, samples): the rows
        hold several samples each, of these lengths (:mod:`surgvqa.backbones.common.packing`)."""
        inputs = dict(input_ids=input_ids, input_features=input_features, pixel_values=pixel_values,
                      pixel_values_videos=pixel_values_videos, image_grid_thw=image_grid_thw,
                      video_grid_thw=video_grid_thw, attention_mask=attention_mask,
                      feature_attention_mask=feature_attention_mask, audio_feature_lengths=audio_feature_lengths,
                      position_ids=position_ids, cache=kwargs.pop("past_key_values", cache),  # the older name
                      inputs_embeds=inputs_embeds, use_cache=use_cache,
                      use_audio_in_video=use_audio_in_video, video_second_per_grid=video_second_per_grid,
                      mm_encoder_outputs=mm_encoder_outputs)
        if mm_encoder_outputs is None or packed_lengths is not None:
            inputs = self.encode_multimodal(inputs, media_ids, packed_lengths=packed_lengths)
        outputs = self.model(**inputs, **kwargs)
        logits = head_logits(self.lm_head, outputs[0], logits_mask)
        loss = None
        if labels is not None and logits_mask is not None:
            loss = labelled_loss({"logits": logits}, labels, kwargs.get("num_items_in_batch"))
        elif labels is not None:
            loss = self.loss_function(logits=logits, labels=labels,
                                      vocab_size=self.config.get_text_config().vocab_size, **kwargs)
        return MultimodalCausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache,
                                                hidden_states=outputs.hidden_states, attentions=outputs.attentions,
                                                image_outputs=outputs.image_outputs)

    @torch.no_grad()
    def generate(self, inputs=None, *args, **kwargs):
        """The stock ``generate``; with token merging the video is encoded and merged once, before decoding."""
        if self.token_kept_ratio != 1.0 and kwargs.get("pixel_values_videos") is not None:
            if kwargs.get("input_ids") is None and isinstance(inputs, torch.Tensor):
                kwargs["input_ids"], inputs = inputs, None
            kwargs = self.encode_multimodal(kwargs, None, generating=True)
        return super().generate(inputs, *args, **kwargs)

    # -- the code paths ---------------------------------------------------------------------------------------
    def encode_multimodal(self, inputs: dict, media_ids: torch.Tensor | None, generating: bool = False,
                          packed_lengths: torch.Tensor | None = None) -> dict:
        """``inputs`` (the inner model's arguments) with the towers' outputs handed in where merging or the tower
        cache applies: the video (merged) as ``mm_encoder_outputs``, kept audio spliced into ``inputs_embeds``,
        explicit ``position_ids``; packed rows get each sample's own positions and the block-diagonal attention;
        else ``inputs`` unchanged (the stock code path)."""
        merging = self.token_kept_ratio != 1.0 and inputs.get("pixel_values_videos") is not None
        keeping = self.tower_cache is not None and media_ids is not None and self.training
        packed = packed_lengths is not None
        ids = [int(i) for i in media_ids.tolist()] if keeping else None
        input_ids = inputs.get("input_ids")
        unusual = input_ids is None or inputs.get("position_ids") is not None or inputs.get("use_audio_in_video")
        if merging and unusual:
            raise ValueError("token merging needs input_ids (the placeholders say where the merged video goes) and "
                             "computes position_ids from the full video grid (pass none; no use_audio_in_video)")
        if packed and unusual:
            raise ValueError("packed rows need input_ids and compute each sample's position_ids themselves (pass "
                             "none; no use_audio_in_video)")
        if packed and (generating or inputs.get("cache") is not None or inputs.get("use_cache")):
            raise ValueError("packed rows are for training forwards only (no generation, no key/value cache)")
        if not merging and not packed and (ids is None or unusual):
            return inputs  # the stock code path (kept outputs need the tokens and the model's own positions)
        inputs = dict(inputs)
        if ids is not None and inputs.get("input_features") is not None:
            self._splice_kept_audio(inputs, ids)
        merged = self._hand_in_vision(inputs, ids, merging)
        feature_mask = inputs.get("feature_attention_mask")
        audio_lengths = feature_mask.sum(-1) if feature_mask is not None else inputs.get("audio_feature_lengths")

        def rope_index(row_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.model.get_rope_index(row_ids, inputs.get("image_grid_thw"), inputs.get("video_grid_thw"),
                                             mask, False, audio_lengths, inputs.get("video_second_per_grid"))

        def positions_of(row_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if ids is None:
                return rope_index(row_ids, mask)
            return self.tower_cache.rope_index(ids, row_ids, mask, rope_index)

        def batch_positions(row_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if merged is None:
                return positions_of(row_ids, mask)
            return merged_position_ids(row_ids, mask, self.config.video_token_id, merged,
                                       lambda full_ids, full_mask: positions_of(full_ids, full_mask)[0])

        if packed:  # each sample's own positions (as in a batch of its own), then one attention block per sample
            packed_lengths = packed_lengths.cpu()  # the layout is read on the host: one device sync per forward
            positions, _ = batch_positions(*unpack(input_ids, packed_lengths))
            positions, deltas = repack(positions, packed_lengths, input_ids.shape[1]), None
            self._pack_attention(inputs, packed_lengths)
            inputs["use_cache"] = False  # no key/value cache (with one, transformers ignores the text positions)
            if inputs["attention_mask"] is None:  # FlashAttention-2 reads the samples from the text positions
                text = text_positions(packed_lengths, input_ids.shape[1]).to(positions.device)
                positions = torch.cat([text[None], positions], dim=0)
        else:
            positions, deltas = batch_positions(input_ids, inputs.get("attention_mask"))
        attention_mask = inputs.get("attention_mask")
        self.model.rope_deltas = deltas
        if generating:  # generate's layout: text positions (for the mask) on top of the three M-RoPE rows
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0).to(positions.device)
            positions = torch.cat([text[None], positions], dim=0)
        inputs["position_ids"] = positions
        return inputs

    def _pack_attention(self, inputs: dict, packed_lengths: torch.Tensor) -> None:
        """The block-diagonal causal mask of packed rows as ``inputs["attention_mask"]`` (None for
        FlashAttention-2, whose variable-length kernel reads the text positions instead)."""
        implementation = self.config.get_text_config()._attn_implementation
        rows, length = inputs["input_ids"].shape
        if implementation == "flash_attention_2" and rows != 1:
            raise ValueError("packed rows on FlashAttention-2 take one row per batch (transformers reads the "
                             "samples' boundaries from the positions of a single row): per-device batch size 1")
        embeddings = self.get_input_embeddings().weight
        inputs["attention_mask"] = packed_attention(packed_lengths, length, implementation, embeddings.dtype,
                                                    embeddings.device)

    def _splice_kept_audio(self, inputs: dict, ids: list[int]) -> None:
        """The audio tower's output (kept, or run and kept) spliced into ``inputs_embeds`` at the audio
        placeholders; the inner model then runs no audio tower."""
        inner = self.model
        features, mask = inputs["input_features"], inputs.get("feature_attention_mask")
        if mask is None or mask.shape[0] != len(ids) or not deterministic_frozen(inner.audio_tower):
            return
        _, lengths = inner.audio_tower._get_feat_extract_output_lengths(mask.sum(-1))
        sizes = [int(n) for n in lengths.tolist()]

        def run() -> list[torch.Tensor]:
            out = inner.get_audio_features(features, mask, inputs.get("audio_feature_lengths"), return_dict=True)
            return list(torch.split(out.last_hidden_state, sizes))

        audio = torch.cat(self.tower_cache.rows("audio", ids, run, features.device))
        embeds = inputs.get("inputs_embeds")
        if embeds is None:
            embeds = inner.get_input_embeddings()(inputs["input_ids"])
        _, _, audio_mask = inner.get_placeholder_mask(inputs["input_ids"], inputs_embeds=embeds)
        inputs["inputs_embeds"] = embeds.masked_scatter(audio_mask, audio.to(embeds.device, embeds.dtype))
        inputs["input_features"] = None

    def _hand_in_vision(self, inputs: dict, ids: list[int] | None, merging: bool):
        """Video features (kept or run; merged when ``merging``) and images passed as ``mm_encoder_outputs``;
        returns the merged videos (None without merging)."""
        inner = self.model
        pixels, grid = inputs.get("pixel_values_videos"), inputs.get("video_grid_thw")
        keep = ids is not None and pixels is not None and grid.shape[0] == len(ids) and deterministic_frozen(
            inner.visual)
        if not (merging or keep):
            return None

        def run() -> list[torch.Tensor]:
            return list(inner.get_video_features(pixels, grid, return_dict=True).pooler_output)

        features = self.tower_cache.rows("video", ids, run, pixels.device) if keep else run()
        merged = merge_videos(features, self.token_kept_ratio, grid, inner.spatial_merge_size) if merging else None
        encoded = {"video": BaseModelOutputWithPooling(
            pooler_output=tuple(m.tokens for m in merged) if merged else tuple(features))}
        if inputs.get("pixel_values") is not None:
            encoded["image"] = inner.get_image_features(inputs["pixel_values"], inputs.get("image_grid_thw"),
                                                        return_dict=True)
        inputs.pop("pixel_values", None)  # removed, not None: generate encodes every pixel key it is given
        inputs.pop("pixel_values_videos")
        inputs["mm_encoder_outputs"] = encoded
        return merged


class Qwen25OmniFull(StockCheckpoint, Qwen2_5OmniForConditionalGeneration):
    """The full Qwen2.5-Omni model (thinker, talker, token2wav) with its thinker built as :class:`Qwen25OmniThinker`
    (``merge_stage2_to_bf16.py --full_omni``); it reads and writes the stock full model's files."""

    stock_class = Qwen2_5OmniForConditionalGeneration

    def __init__(self, config) -> None:
        super().__init__(config)  # builds a stock thinker (on the meta device inside from_pretrained) ...
        self.thinker = Qwen25OmniThinker(config.thinker_config)  # ... replaced before any weight is loaded
        self.post_init()


register_stock_layout(Qwen25OmniThinker, stock=STOCK_CLASS)  # reads and writes the stock class's files
register_stock_layout(Qwen25OmniFull, stock=Qwen2_5OmniForConditionalGeneration)

__all__ = ["STOCK_CLASS", "Qwen25OmniFull", "Qwen25OmniThinker"]
