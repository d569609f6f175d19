"""``QwenVLWhisperProcessor``: the VL model's processor plus a Whisper feature extractor and ``<|AUDIO|>`` expansion.

A ``ProcessorMixin`` with four parts (image processor, video processor, Whisper feature extractor, tokenizer) and
the graft's audio settings: ``save_pretrained`` / ``from_pretrained`` are the library's (one processor_config.json,
the tokenizer files, chat_template.jinja), and importing this module registers it with ``AutoProcessor``.

It gives the collator the Omni processor interface: ``processor(text, videos=..., audio=...)`` expands each
``<|audio_bos|><|AUDIO|><|audio_eos|>`` to exactly as many placeholders as the model makes audio tokens for that
clip, and ``_get_num_multimodal_tokens(audio_lengths=...)`` counts them without decoding anything. Vision stays the
VL processor's own (Qwen3-VL's frame timestamps included).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import AutoProcessor, BatchFeature, ProcessorMixin, WhisperFeatureExtractor
from transformers.processing_utils import MultiModalData

from surgvqa.backbones.common.qwen_processing import QwenProcessing
from surgvqa.backbones.qwen_vl_whisper.audio import audio_token_count, mel_frames
from surgvqa.backbones.qwen_vl_whisper.configuration import QwenVLWhisperConfig
from surgvqa.backbones.qwen_vl_whisper.constants import (
    AUDIO_TOKENS,
    LEGACY_PROCESSOR_FILE,
    SAMPLING_RATE,
    VL_PROCESSOR_CLASSES,
)
from surgvqa.errors import UserError

logger = logging.getLogger(__name__)

SETTING_KEYS = ("audio_pooling", "trim_audio", "audio_token", "audio_bos_token", "audio_eos_token")


class QwenVLWhisperProcessor(ProcessorMixin):
    """Processor of a ``qwen_vl_whisper`` graft (see the module docstring)."""

    def __init__(self, image_processor=None, video_processor=None, feature_extractor=None, tokenizer=None,
                 chat_template=None, vl_processor_class: str = "Qwen2VLProcessor", audio_pooling: int = 2,
                 trim_audio: bool = True, audio_token: str = AUDIO_TOKENS["audio_token"],
                 audio_bos_token: str = AUDIO_TOKENS["audio_bos_token"],
                 audio_eos_token: str = AUDIO_TOKENS["audio_eos_token"]):
        if audio_pooling not in (1, 2):
            raise UserError(f"audio_pooling must be 1 or 2, got {audio_pooling!r}")
        if vl_processor_class not in VL_PROCESSOR_CLASSES.values():
            raise UserError(f"vl_processor_class must be one of {', '.join(VL_PROCESSOR_CLASSES.values())}, "
                            f"got {vl_processor_class!r}")
        super().__init__(image_processor, video_processor, feature_extractor, tokenizer, chat_template=chat_template)
        self.vl_processor_class = vl_processor_class
        self.audio_pooling = int(audio_pooling)
        self.trim_audio = bool(trim_audio)
        self.audio_token, self.audio_bos_token, self.audio_eos_token = audio_token, audio_bos_token, audio_eos_token
        self.audio_token_id = _token_id(tokenizer, audio_token)
        self.audio_bos_token_id = _token_id(tokenizer, audio_bos_token)
        self.audio_eos_token_id = _token_id(tokenizer, audio_eos_token)
        vl_processor = self.vl_processor
        self.image_token, self.video_token = vl_processor.image_token, vl_processor.video_token
        if tokenizer.chat_template is None and chat_template is not None:
            tokenizer.chat_template = chat_template  # surgvqa.tokenizer reads the end-of-turn from the tokenizer's

    @classmethod
    def from_vl_processor(cls, vl_processor, feature_extractor, **settings) -> QwenVLWhisperProcessor:
        """The graft's processor on the parts of a VL model's own processor."""
        return cls(vl_processor.image_processor, vl_processor.video_processor, feature_extractor,
                   vl_processor.tokenizer, chat_template=vl_processor.chat_template,
                   vl_processor_class=type(vl_processor).__name__, **settings)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> QwenVLWhisperProcessor:
        """``ProcessorMixin.from_pretrained``; also reads grafts saved before this processor was a ProcessorMixin
        (the VL processor's files plus graft_processor.json)."""
        directory = Path(pretrained_model_name_or_path)
        saved = directory / "processor_config.json"
        saved_class = json.loads(saved.read_text()).get("processor_class") if saved.is_file() else None
        if saved_class == cls.__name__:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        legacy = directory / LEGACY_PROCESSOR_FILE
        if not legacy.is_file():
            raise UserError(
                f"{directory} holds no qwen_vl_whisper processor (processor_config.json names "
                f"{saved_class!r}): create a graft with `python -m surgvqa.backbones.qwen_vl_whisper.create` or "
                "scripts/make_tiny_graft.py"
            )
        record = json.loads(legacy.read_text())
        vl_processor = getattr(transformers, record["vl_processor_class"]).from_pretrained(str(directory), **kwargs)
        extractor = WhisperFeatureExtractor(**{k: v for k, v in record["feature_extractor"].items()
                                               if k not in ("feature_extractor_type", "processor_class")})
        return cls.from_vl_processor(vl_processor, extractor, **{k: record[k] for k in SETTING_KEYS if k in record})

    # -- the VL processor -----------------------------------------------------------------------------------
    @property
    def vl_processor(self):
        """The VL model's own processor on this processor's parts (built on use: it holds no state of its own)."""
        return getattr(transformers, self.vl_processor_class)(
            image_processor=self.image_processor, tokenizer=self.tokenizer, video_processor=self.video_processor,
            chat_template=self.chat_template)

    @property
    def model_input_names(self) -> list[str]:
        return [*self.vl_processor.model_input_names, "input_features", "feature_attention_mask"]

    @property
    def _uses_video_metadata(self) -> bool:
        return bool(getattr(getattr(transformers, self.vl_processor_class), "videos_kwargs", {}).get(
            "return_metadata"))

    # -- audio ----------------------------------------------------------------------------------------------
    @property
    def max_frames(self) -> int:
        return int(self.feature_extractor.nb_max_frames)

    def num_audio_tokens(self, num_samples: int) -> int:
        return audio_token_count(int(num_samples), pooling=self.audio_pooling, trim=self.trim_audio,
                                 hop_length=self.feature_extractor.hop_length, max_frames=self.max_frames)

    def audio_features(self, audio: list, audio_kwargs: dict | None = None) -> dict[str, torch.Tensor]:
        """Log-mel features padded to the batch's longest clip plus half an STFT window
        (``audio_kwargs["max_length"]`` when longer), cut at Whisper's 30 s, and the mask of real frames
        (``ceil(samples / hop)`` per clip, the rule the placeholder count follows). The model encodes each clip by
        its own length (``audio_window="full"`` rebuilds the 30 s window the encoder was trained on; exact but for
        the two frames straddling a clip's end), so no 30 s STFT is computed here."""
        audio_kwargs = dict(audio_kwargs or {})
        clips = [np.asarray(a, dtype=np.float32).reshape(-1) for a in audio]
        limit = int(self.feature_extractor.n_samples)
        too_long = [i for i, a in enumerate(clips) if len(a) > limit]
        if too_long:
            logger.warning("audio clip(s) %s longer than Whisper's %d s window are cut", too_long,
                           limit // SAMPLING_RATE)
        longest = max(len(a) for a in clips) + self.feature_extractor.n_fft // 2  # every clip's last partial frame
        max_length = min(max(int(audio_kwargs.get("max_length") or 0), longest), limit)
        features = self.feature_extractor(
            clips, sampling_rate=SAMPLING_RATE, padding="max_length", max_length=max_length, truncation=True,
            return_attention_mask=False, return_tensors="pt",
        )["input_features"]
        hop = self.feature_extractor.hop_length
        frames = torch.tensor([min(mel_frames(len(a), hop, self.max_frames), features.shape[-1]) for a in clips])
        mask = (torch.arange(features.shape[-1])[None, :] < frames[:, None]).long()
        return {"input_features": features, "feature_attention_mask": mask,
                "num_audio_tokens": [self.num_audio_tokens(len(a)) for a in clips]}

    def _expand_audio(self, text: list[str], counts: list[int]) -> list[str]:
        placeholders = sum(t.count(self.audio_token) for t in text)
        if placeholders != len(counts):
            raise ValueError(f"{placeholders} {self.audio_token} placeholder(s) in the text but {len(counts)} "
                             "audio clip(s) were passed")
        counter = iter(counts)
        expanded = []
        for sample in text:
            parts = sample.split(self.audio_token)
            out = parts[0]
            for part in parts[1:]:
                out += self.audio_token * next(counter) + part
            expanded.append(out)
        return expanded

    # -- the call -------------------------------------------------------------------------------------------
    def __call__(self, text=None, images=None, videos=None, audio=None, videos_kwargs: dict | None = None,
                 images_kwargs: dict | None = None, audio_kwargs: dict | None = None, return_tensors=None,
                 padding=False, **kwargs) -> BatchFeature:
        if text is None:
            raise ValueError("QwenVLWhisperProcessor needs text (the chat prompt with its placeholders)")
        text = [text] if isinstance(text, str) else list(text)
        audio_inputs: dict[str, Any] = {}
        if audio is not None:
            if isinstance(audio, np.ndarray) and audio.ndim == 1:
                audio = [audio]
            audio_inputs = self.audio_features(list(audio), audio_kwargs)
            text = self._expand_audio(text, audio_inputs.pop("num_audio_tokens"))
        elif any(self.audio_token in t for t in text):
            raise ValueError(f"{self.audio_token} in the text but no audio was passed")
        vl_kwargs: dict[str, Any] = {"text": text, "return_tensors": return_tensors, "padding": padding, **kwargs}
        if images is not None:
            vl_kwargs["images"] = images
            if images_kwargs:
                vl_kwargs["images_kwargs"] = images_kwargs
        if videos is not None:
            vl_kwargs["videos"] = videos
            videos_kwargs = dict(videos_kwargs or {})
            if self._uses_video_metadata and videos_kwargs.get("fps") and "video_metadata" not in videos_kwargs:
                # Qwen2.5-VL (second_per_grid_ts) and Qwen3-VL (frame timestamps) read the frame rate from the
                # metadata of each video, else assume 24 fps: frames handed over as arrays carry none.
                fps = float(videos_kwargs["fps"])
                videos_kwargs["video_metadata"] = [
                    {"fps": fps, "total_num_frames": len(v), "frames_indices": list(range(len(v)))} for v in videos
                ]
            if videos_kwargs:
                vl_kwargs["videos_kwargs"] = videos_kwargs
        data = dict(self.vl_processor(**vl_kwargs))
        # The model derives mm_token_type_ids from input_ids itself (audio = text); the processor's would also go
        # stale when the collator re-pads the rows and appends the answer.
        data.pop("mm_token_type_ids", None)
        data.update(audio_inputs)
        return BatchFeature(data, tensor_type=return_tensors)

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, audio_lengths=None, **kwargs):
        """Tokens each placeholder expands to: the VL processor's vision counts and the audio tokens of each clip.
        Text the VL processor writes around its placeholders (Qwen3-VL's frame timestamps) is not counted here: the
        length pre-flight measures it by running the processor (``VQACollator.token_counts``)."""
        counts = self.vl_processor._get_num_multimodal_tokens(image_sizes=image_sizes, video_sizes=video_sizes,
                                                              **kwargs)
        data = {k: getattr(counts, k, None) for k in ("num_image_tokens", "num_video_tokens", "num_image_patches")}
        if audio_lengths is not None:
            data["num_audio_tokens"] = [self.num_audio_tokens(n) for n in audio_lengths]
        return MultiModalData(**data)


class QwenVLWhisperProcessing(QwenProcessing):
    """The graft's processing: the shared Qwen-style encoder on :class:`QwenVLWhisperProcessor`; Qwen2.5-VL names
    each video's clock ``second_per_grid_ts`` (Qwen2-VL and Qwen3-VL write none)."""

    clock_keys = ("second_per_grid_ts",)


def _token_id(tokenizer, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise UserError(f"the tokenizer has no {token} token: create the graft with create_graft (it adds them)")
    return int(token_id)


AutoProcessor.register(QwenVLWhisperConfig, QwenVLWhisperProcessor, exist_ok=True)
