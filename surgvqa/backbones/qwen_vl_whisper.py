"""Qwen-VL + Whisper encoder graft (``qwen_vl_whisper``): plain transformers classes, no fork, no remote code.

A Qwen2-VL / Qwen2.5-VL / Qwen3-VL model (``*ForConditionalGeneration``), the encoder of any Whisper checkpoint and
an audio projector (linear or 2-layer MLP, Whisper ``d_model`` → LLM hidden) form one ``PreTrainedModel``
(:class:`QwenVLWhisperForConditionalGeneration`, config ``model_type = "qwen_vl_whisper"``), so Trainer, PEFT,
``save_pretrained`` / ``from_pretrained`` and ``generate`` work on it like on any model.

Audio. The encoder output is trimmed to the real audio length (a 3 s question gives 150 encoder frames, not
Whisper's fixed 1,500), optionally average-pooled 2x (75), projected and spliced into ``inputs_embeds`` at the
``<|AUDIO|>`` placeholders. :class:`QwenVLWhisperProcessor` (the VL model's own processor plus a Whisper feature
extractor) expands each ``<|audio_bos|><|AUDIO|><|audio_eos|>`` to exactly that many placeholders, so the
collator's ``processor(audio=...)`` and ``_get_num_multimodal_tokens(audio_lengths=...)`` work as for
Qwen2.5-Omni. By default the encoder still sees Whisper's 30 s window (``audio_window="full"``: the regime it was
trained in, only the output is cut); ``audio_window="trimmed"`` also cuts the encoder input (faster, slightly
off-distribution). ``trim_audio=False`` reproduces the original system (all 1,500 frames fed to the LLM).

Positions. M-RoPE positions come from the VL model's own ``get_rope_index`` with ``mm_token_type_ids`` built here
from ``input_ids``: image/video placeholders are vision (1/2), everything else - audio placeholders included - is
text (0), so audio tokens advance the position like text and vision positions are the VL model's own.

Embeddings. Text, vision (Qwen2-VL/2.5-VL: spliced here from ``get_image_features``/``get_video_features`` at the
exact ``input_ids`` positions) and audio are assembled into ``inputs_embeds``; training and ``generate`` both call
the VL model with ``inputs_embeds`` + explicit 3-D ``position_ids`` (``generate`` then returns only the new tokens,
which ``surgvqa.generate.new_token_ids`` handles). Qwen3-VL's deepstack needs the VL model to splice vision itself:
there the pixels are passed along and the VL model finds its placeholders by embedding equality (checked here
against ``input_ids`` before every call).

On disk (one format for every stage; ``checkpoint.load_for_inference`` and ``backbone_for`` need nothing else)::

    GRAFT/config.json              model_type "qwen_vl_whisper"; vl_model_path, audio_encoder_path (absolute, or
                                   relative to GRAFT), vl_config, audio_config, projector/pooling/window settings,
                                   audio token ids, graft_stage (0 created, 1 after projector alignment)
    GRAFT/projector.safetensors    the audio projector only
    GRAFT/generation_config.json
    GRAFT/tokenizer*, processor_config.json, chat_template.jinja   the VL processor (audio tokens added)
    GRAFT/graft_processor.json     VL processor class, Whisper feature extractor, audio token settings
    GRAFT/vl_model/, audio_encoder/  only in self-contained saves (merged models, tiny fixtures)

``create_graft`` (CLI: ``python -m surgvqa.backbones.qwen_vl_whisper create``) writes GRAFT from a VL checkpoint
and a Whisper checkpoint without copying either. ``--stage 1`` training output is such a directory holding only the
aligned projector; ``--stage 2 --init_from STAGE1`` trains LoRA on the LLM plus the projector (``modules_to_save``)
and records STAGE1 as its ``base_model``. A merged model is written self-contained (``save_merged``; plain
``save_pretrained`` does the same except during stage-1 training).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from surgvqa.backbones.base import Backbone, LoadOptions

logger = logging.getLogger(__name__)

MODEL_TYPE = "qwen_vl_whisper"
PROJECTOR_FILE = "projector.safetensors"
PROCESSOR_FILE = "graft_processor.json"
VL_SUBDIR = "vl_model"
ENCODER_SUBDIR = "audio_encoder"
AUDIO_TOKENS = {"audio_bos_token": "<|audio_bos|>", "audio_token": "<|AUDIO|>", "audio_eos_token": "<|audio_eos|>"}
#: VL model classes by ``model_type`` of the VL config
VL_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}
#: VL families whose vision embeddings the graft splices itself (exact ``input_ids`` masks, no deepstack)
SPLICES_VISION = ("qwen2_vl", "qwen2_5_vl")
SAMPLING_RATE = 16000

# Qwen-VL's chat template, plus audio parts (as Qwen2.5-Omni renders them) - Qwen-VL names its placeholders
# <|vision_start|> <|image_pad|> / <|video_pad|> <|vision_end|>.
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ------------------------------------------------------------------------------------------- audio lengths
def mel_frames(num_samples: int, hop_length: int = 160, max_frames: int = 3000) -> int:
    """Mel frames holding real audio (Whisper: one per 10 ms), capped at the 30 s window."""
    return min(math.ceil(num_samples / hop_length), max_frames)


def encoder_frames(frames: int) -> int:
    """Whisper's stride-2 conv: output frames for ``frames`` mel frames (3000 → 1500)."""
    return (frames - 1) // 2 + 1


def audio_token_count(num_samples: int, *, pooling: int = 2, trim: bool = True, hop_length: int = 160,
                      max_frames: int = 3000) -> int:
    """``<|AUDIO|>`` placeholders for ``num_samples`` of 16 kHz audio (processor and model use this one rule)."""
    frames = mel_frames(num_samples, hop_length, max_frames) if trim else max_frames
    return encoder_frames(frames) // pooling


# ------------------------------------------------------------------------------------------------ processor
class QwenVLWhisperProcessor:
    """The Omni processor interface the collator uses, for the graft: the VL model's own processor (text, images,
    videos, M-RoPE-ready placeholders) plus a Whisper feature extractor and ``<|AUDIO|>`` expansion.

    Saved as the VL processor's files plus ``graft_processor.json`` (``save_pretrained`` / ``from_pretrained``).
    """

    def __init__(self, vl_processor, feature_extractor, *, audio_pooling: int = 2, trim_audio: bool = True,
                 audio_token: str = AUDIO_TOKENS["audio_token"],
                 audio_bos_token: str = AUDIO_TOKENS["audio_bos_token"],
                 audio_eos_token: str = AUDIO_TOKENS["audio_eos_token"]):
        if audio_pooling not in (1, 2):
            raise ValueError(f"audio_pooling must be 1 or 2, got {audio_pooling!r}")
        self.vl_processor = vl_processor
        self.feature_extractor = feature_extractor
        self.audio_pooling = int(audio_pooling)
        self.trim_audio = bool(trim_audio)
        self.audio_token = audio_token
        self.audio_bos_token, self.audio_eos_token = audio_bos_token, audio_eos_token
        self.audio_token_id = _token_id(self.tokenizer, audio_token)
        self.audio_bos_token_id = _token_id(self.tokenizer, audio_bos_token)
        self.audio_eos_token_id = _token_id(self.tokenizer, audio_eos_token)

    # -- the parts ----------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.vl_processor.tokenizer

    @property
    def image_processor(self):
        return self.vl_processor.image_processor

    @property
    def video_processor(self):
        return self.vl_processor.video_processor

    @property
    def chat_template(self):
        return self.vl_processor.chat_template

    @chat_template.setter
    def chat_template(self, value) -> None:
        self.vl_processor.chat_template = value
        self.tokenizer.chat_template = value

    @property
    def image_token(self) -> str:
        return self.vl_processor.image_token

    @property
    def video_token(self) -> str:
        return self.vl_processor.video_token

    @property
    def model_input_names(self) -> list[str]:
        return [*self.vl_processor.model_input_names, "input_features", "feature_attention_mask"]

    def settings(self) -> dict:
        return {
            "audio_pooling": self.audio_pooling, "trim_audio": self.trim_audio,
            "audio_token": self.audio_token, "audio_bos_token": self.audio_bos_token,
            "audio_eos_token": self.audio_eos_token,
        }

    # -- save / load --------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path, **kwargs) -> list[str]:
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        files = self.vl_processor.save_pretrained(str(save_directory), **kwargs)
        record = {
            "processor_class": type(self).__name__,
            "vl_processor_class": type(self.vl_processor).__name__,
            "feature_extractor": _feature_extractor_dict(self.feature_extractor),
            **self.settings(),
        }
        (save_directory / PROCESSOR_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        return [*(files or []), str(save_directory / PROCESSOR_FILE)]

    @classmethod
    def from_pretrained(cls, path: str | Path, trust_remote_code: bool = False,
                        **kwargs) -> QwenVLWhisperProcessor:
        import transformers
        from transformers import WhisperFeatureExtractor

        record_file = Path(path) / PROCESSOR_FILE
        if not record_file.is_file():
            raise ValueError(
                f"{record_file} not found: {path} is not a qwen_vl_whisper graft (create one with "
                "`python -m surgvqa.backbones.qwen_vl_whisper create` or scripts/make_tiny_graft.py)"
            )
        record = json.loads(record_file.read_text())
        _model_classes()  # registers the graft's config with AutoConfig (AutoTokenizer reads config.json)
        vl_class = getattr(transformers, record["vl_processor_class"])
        vl_processor = vl_class.from_pretrained(str(path), trust_remote_code=trust_remote_code, **kwargs)
        extractor = WhisperFeatureExtractor(**_feature_extractor_kwargs(record["feature_extractor"]))
        processor = cls(vl_processor, extractor, **{k: record[k] for k in cls._setting_keys() if k in record})
        if processor.tokenizer.chat_template is None and vl_processor.chat_template is not None:
            processor.tokenizer.chat_template = vl_processor.chat_template
        return processor

    @staticmethod
    def _setting_keys() -> tuple[str, ...]:
        return ("audio_pooling", "trim_audio", "audio_token", "audio_bos_token", "audio_eos_token")

    # -- text ---------------------------------------------------------------------------------------------
    def apply_chat_template(self, conversation, **kwargs):
        return self.vl_processor.apply_chat_template(conversation, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    # -- audio --------------------------------------------------------------------------------------------
    @property
    def max_frames(self) -> int:
        return int(self.feature_extractor.nb_max_frames)

    def num_audio_tokens(self, num_samples: int) -> int:
        return audio_token_count(int(num_samples), pooling=self.audio_pooling, trim=self.trim_audio,
                                 hop_length=self.feature_extractor.hop_length, max_frames=self.max_frames)

    def audio_features(self, audio: list, audio_kwargs: dict | None = None) -> dict[str, torch.Tensor]:
        """Log-mel features padded to the batch's longest clip plus half an STFT window
        (``audio_kwargs["max_length"]`` when longer), cut at Whisper's 30 s, and the mask of real frames
        (``ceil(samples / hop)`` per clip, the rule the placeholder count follows). The model rebuilds the 30 s
        window the encoder was trained on (``audio_window="full"``; exact but for the two frames straddling a
        clip's end), so no 30 s STFT is computed here."""
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

    # -- the call -----------------------------------------------------------------------------------------
    def __call__(self, text=None, images=None, videos=None, audio=None, *, videos_kwargs: dict | None = None,
                 images_kwargs: dict | None = None, audio_kwargs: dict | None = None, return_tensors=None,
                 padding=False, **kwargs):
        from transformers import BatchFeature

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
            if videos_kwargs.get("do_resize") is False and not _on_grid(videos, self.video_processor):
                # the caller's frames sit on Qwen2-VL's 28-px grid; Qwen3-VL patches 16 px (32-px grid): resize
                videos_kwargs["do_resize"] = True
            if videos_kwargs:
                vl_kwargs["videos_kwargs"] = videos_kwargs
        encoded = self.vl_processor(**vl_kwargs)
        data = dict(encoded)
        # The model derives mm_token_type_ids from input_ids itself (audio = text); the processor's would also go
        # stale when the collator re-pads the rows and appends the answer.
        data.pop("mm_token_type_ids", None)
        data.update(audio_inputs)
        return BatchFeature(data, tensor_type=return_tensors)

    @property
    def _uses_video_metadata(self) -> bool:
        return bool(getattr(type(self.vl_processor), "videos_kwargs", {}).get("return_metadata"))

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, audio_lengths=None, **kwargs):
        """Tokens each placeholder expands to: the VL processor's vision counts (plus, for Qwen3-VL, the frame
        timestamps and per-frame vision markers it inserts) and the audio tokens of each clip."""
        from transformers.processing_utils import MultiModalData

        counts = self.vl_processor._get_num_multimodal_tokens(image_sizes=image_sizes, video_sizes=video_sizes,
                                                              **kwargs)
        data = {k: getattr(counts, k, None) for k in ("num_image_tokens", "num_video_tokens", "num_image_patches")}
        if video_sizes is not None and hasattr(self.vl_processor, "_calculate_timestamps"):
            fps = float((kwargs.get("videos_kwargs") or {}).get("fps") or 2.0)
            patch = self.video_processor.temporal_patch_size
            extra = []
            for frames, _, _ in video_sizes:
                stamps = self.vl_processor._calculate_timestamps(list(range(int(frames))), fps, patch)
                # each stamp sits between special tokens: tokenized on its own, as in the prompt
                words = [f"<{t:.1f} seconds>" for t in stamps]
                encoded = self.tokenizer(words, add_special_tokens=False)["input_ids"]
                stamp_tokens = sum(len(ids) for ids in encoded)
                extra.append(stamp_tokens + 2 * len(stamps))
            data["num_video_tokens"] = [n + e for n, e in zip(data["num_video_tokens"], extra, strict=True)]
        if audio_lengths is not None:
            data["num_audio_tokens"] = [self.num_audio_tokens(n) for n in audio_lengths]
        return MultiModalData(**data)


def _on_grid(videos, video_processor) -> bool:
    """Whether every frame's sides are multiples of the processor's patch x merge size (no resize needed)."""
    factor = int(video_processor.patch_size) * int(video_processor.merge_size)
    for video in videos:
        for frame in video:
            height, width = np.asarray(frame).shape[:2]
            if height % factor or width % factor:
                return False
    return True


def _token_id(tokenizer, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {token} token: create the graft with create_graft (it adds them)")
    return int(token_id)


def _feature_extractor_dict(extractor) -> dict:
    keys = ("feature_size", "sampling_rate", "hop_length", "chunk_length", "n_fft", "padding_value",
            "return_attention_mask", "dither")
    return {k: getattr(extractor, k) for k in keys if hasattr(extractor, k)}


def _feature_extractor_kwargs(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("feature_extractor_type", "processor_class")}


# ---------------------------------------------------------------------------------------------- the model
class AudioProjector(nn.Module):
    """Whisper ``d_model`` → LLM hidden size: ``linear`` (the original graft) or ``mlp`` (Linear-GELU-Linear)."""

    def __init__(self, in_dim: int, out_dim: int, kind: str = "linear"):
        super().__init__()
        if kind == "linear":
            self.layers = nn.Sequential(nn.Linear(in_dim, out_dim))
        elif kind == "mlp":
            self.layers = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        else:
            raise ValueError(f"projector must be 'linear' or 'mlp', got {kind!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@lru_cache(maxsize=1)
def _model_classes() -> dict[str, type]:
    """The config and model classes, built on first use (importing transformers' model code costs seconds, and
    ``surgvqa.backbones`` is imported by light commands too). They are module attributes once built."""
    from transformers import AutoConfig, GenerationMixin, PreTrainedConfig, PreTrainedModel
    from transformers.configuration_utils import SubConfigSpec
    from transformers.modeling_outputs import CausalLMOutputWithPast

    class QwenVLWhisperConfig(PreTrainedConfig):
        r"""A Qwen-VL model, a Whisper encoder and an audio projector. ``vl_model_path`` / ``audio_encoder_path``
        (absolute, or relative to the directory holding this config) say where the weights of the two are."""

        model_type = MODEL_TYPE
        sub_configs_defaults = {
            "vl_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2_vl"),
            "audio_config": SubConfigSpec(config_class=AutoConfig, model_type="whisper"),
        }

        vl_config: dict | PreTrainedConfig | None = None
        audio_config: dict | PreTrainedConfig | None = None
        vl_model_path: str | None = None
        audio_encoder_path: str | None = None
        projector_type: str = "linear"
        audio_pooling: int = 2
        audio_window: str = "full"
        trim_audio: bool = True
        audio_token_id: int | None = None
        audio_bos_token_id: int | None = None
        audio_eos_token_id: int | None = None
        graft_stage: int = 0
        tie_word_embeddings: bool = False

        def get_text_config(self, decoder=None, encoder=None):
            return self.vl_config.get_text_config(decoder=decoder, encoder=encoder)

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

        def __init__(self, config, vl_model=None, audio_encoder=None):
            super().__init__(config)
            import transformers
            from transformers.models.whisper.modeling_whisper import WhisperEncoder

            vl_type = config.vl_config.model_type
            if vl_type not in VL_CLASSES:
                raise ValueError(f"unsupported VL model_type {vl_type!r}; supported: {', '.join(VL_CLASSES)}")
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
            self.post_init()

        # -- the parts --------------------------------------------------------------------------------
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

        # -- inputs -----------------------------------------------------------------------------------
        def get_audio_features(self, input_features: torch.Tensor,
                               feature_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
            """Projected audio tokens of the batch, concatenated: (sum of per-clip counts, hidden)."""
            encoder = self.audio_encoder
            features = input_features.to(device=encoder.device, dtype=encoder.dtype)
            if feature_attention_mask is None:
                lengths = torch.full((features.shape[0],), features.shape[-1], device=features.device)
            else:
                lengths = feature_attention_mask.to(features.device).sum(-1)
            window = 2 * encoder.config.max_source_positions
            trainable = any(p.requires_grad for p in encoder.parameters())
            with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
                if self.config.audio_window == "full":
                    hidden = encoder(_fit_window(features, window)).last_hidden_state
                else:
                    hidden = _encode_trimmed(encoder, features[..., :window])
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

        def prepare_inputs_embeds(self, input_ids, attention_mask=None, pixel_values=None,
                                  pixel_values_videos=None, image_grid_thw=None, video_grid_thw=None,
                                  second_per_grid_ts=None, input_features=None, feature_attention_mask=None):
            """(inputs_embeds, position_ids, kwargs for the VL call): text, vision and audio in one tensor."""
            embeds = self.get_input_embeddings()(input_ids)
            vl_kwargs: dict[str, Any] = {}
            vl_config = self.config.vl_config
            if self.vl_type in SPLICES_VISION:
                if pixel_values is not None:
                    image = self.vl_model.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
                    embeds = _splice(embeds, input_ids == vl_config.image_token_id,
                                     torch.cat(image.pooler_output, dim=0), "image")
                if pixel_values_videos is not None:
                    video = self.vl_model.model.get_video_features(pixel_values_videos, video_grid_thw,
                                                                   return_dict=True)
                    embeds = _splice(embeds, input_ids == vl_config.video_token_id,
                                     torch.cat(video.pooler_output, dim=0), "video")
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
            position_ids = self.get_position_ids(input_ids, attention_mask, image_grid_thw, video_grid_thw,
                                                 second_per_grid_ts)
            return embeds, position_ids, vl_kwargs

        def _check_vision_placeholders(self, input_ids, embeds) -> None:
            """The VL model finds its placeholders by embedding equality when given inputs_embeds: make sure that
            finds exactly the ``input_ids`` positions (a duplicated embedding row would misplace vision)."""
            table = self.get_input_embeddings().weight
            for token_id in (self.config.vl_config.image_token_id, self.config.vl_config.video_token_id):
                by_value = (embeds == table[token_id].to(embeds.dtype)).all(-1)
                held = input_ids == token_id
                if not torch.equal(by_value, held):
                    raise ValueError(
                        f"{int(by_value.sum())} positions embed like token {token_id} but {int(held.sum())} "
                        "hold it: the VL model could not place the vision features"
                    )

        # -- forward / generate -------------------------------------------------------------------------
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                    inputs_embeds=None, labels=None, use_cache=None, pixel_values=None, pixel_values_videos=None,
                    image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None, input_features=None,
                    feature_attention_mask=None, logits_to_keep=0, **kwargs) -> CausalLMOutputWithPast:
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
            return self.vl_model(
                input_ids=None, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                position_ids=position_ids, past_key_values=past_key_values, labels=labels, use_cache=use_cache,
                logits_to_keep=logits_to_keep, **vl_kwargs, **kwargs,
            )

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
                inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, **vl_kwargs,
                **kwargs,
            )

        # -- save / load --------------------------------------------------------------------------------
        def save_pretrained(self, save_directory, *args, save_towers: bool | None = None, state_dict=None,
                            max_shard_size="5GB", is_main_process: bool = True, **kwargs):
            """Write the graft directory (module docstring). ``save_towers`` (default: unless in stage-1 training)
            also writes the VL model and the encoder beside it, so the directory stands alone."""

            if not is_main_process:
                return
            save_directory = Path(save_directory)
            save_directory.mkdir(parents=True, exist_ok=True)
            if save_towers is None:
                save_towers = self.save_mode != "projector"
            config = self.config.to_dict()
            if save_towers:
                self.vl_model.save_pretrained(save_directory / VL_SUBDIR, max_shard_size=max_shard_size)
                self.audio_encoder.save_pretrained(save_directory / ENCODER_SUBDIR)
                config["vl_model_path"], config["audio_encoder_path"] = VL_SUBDIR, ENCODER_SUBDIR
            elif not (self.config.vl_model_path and self.config.audio_encoder_path):
                raise ValueError("this graft records no VL model / encoder paths: save it with save_towers=True")
            write_projector(self.audio_projector, save_directory)
            index = save_directory / "model.safetensors.index.json"
            if save_towers:
                index.unlink(missing_ok=True)
            else:  # lets Trainer resume a stage-1 checkpoint: the trained weights of the model live here
                write_projector_index(self.audio_projector, save_directory)
            _write_json(save_directory / "config.json", config)
            if self.generation_config is not None:
                self.generation_config.save_pretrained(save_directory)

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path, *args, dtype="auto", attn_implementation=None,
                            quantization_config=None, device_map=None, **kwargs):
            return load_graft(pretrained_model_name_or_path, dtype=dtype, attn_implementation=attn_implementation,
                              quantization_config=quantization_config, device_map=device_map)

    for klass in (QwenVLWhisperConfig, QwenVLWhisperForConditionalGeneration):
        klass.__module__ = __name__
        klass.__qualname__ = klass.__name__
    AutoConfig.register(MODEL_TYPE, QwenVLWhisperConfig, exist_ok=True)
    classes = {"QwenVLWhisperConfig": QwenVLWhisperConfig,
               "QwenVLWhisperForConditionalGeneration": QwenVLWhisperForConditionalGeneration}
    globals().update(classes)
    return classes


def __getattr__(name: str):
    if name in ("QwenVLWhisperConfig", "QwenVLWhisperForConditionalGeneration"):
        return _model_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _splice(embeds: torch.Tensor, mask: torch.Tensor, features: torch.Tensor, what: str) -> torch.Tensor:
    count = int(mask.sum())
    if count != features.shape[0]:
        raise ValueError(
            f"{count} {what} placeholder token(s) but {features.shape[0]} {what} feature(s): the processor and "
            "the model disagree (for audio: audio_pooling / trim_audio in graft_processor.json vs config.json)"
        )
    if count == 0:
        return embeds
    return embeds.masked_scatter(mask.unsqueeze(-1).to(embeds.device), features.to(embeds.device, embeds.dtype))


#: WhisperFeatureExtractor's log-mel scaling: log10(max(power, 1e-10)), floored at (max - 8), then (x + 4) / 4
_LOG_FLOOR = (-10.0 + 4.0) / 4.0
_DYNAMIC_RANGE = 8.0 / 4.0


def _fit_window(features: torch.Tensor, window: int) -> torch.Tensor:
    """Features of exactly Whisper's 30 s window, as if the clip had been zero-padded to 30 s before the log-mel:
    zero samples give log10(1e-10), floored at the clip's maximum minus 8 (scaled: max - 2, never below -1.5)."""
    if features.shape[-1] >= window:
        return features[..., :window]
    floor = torch.clamp(features.amax(dim=(1, 2)) - _DYNAMIC_RANGE, min=_LOG_FLOOR)
    pad = floor[:, None, None].expand(features.shape[0], features.shape[1], window - features.shape[-1])
    return torch.cat([features, pad.to(features.dtype)], dim=-1)


def _encode_trimmed(encoder, features: torch.Tensor) -> torch.Tensor:
    """WhisperEncoder.forward on fewer than 3,000 frames (same layers, the first positions only)."""
    hidden = nn.functional.gelu(encoder.conv1(features))
    hidden = nn.functional.gelu(encoder.conv2(hidden)).permute(0, 2, 1)
    hidden = hidden + encoder.embed_positions.weight[: hidden.shape[1]].to(hidden.dtype)
    hidden = nn.functional.dropout(hidden, p=encoder.dropout, training=encoder.training)
    for layer in encoder.layers:
        hidden = layer(hidden, None)
    return encoder.layer_norm(hidden)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return value


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=True) + "\n")


def _mark_initialized(module: nn.Module) -> None:
    """Loaded weights must survive the composite's ``post_init`` (which initializes unflagged modules)."""
    for sub in module.modules():
        sub._is_hf_initialized = True
        for tensor in [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]:
            tensor._is_hf_initialized = True


# ----------------------------------------------------------------------------------------------- loading
def resolve_part(path: str | None, graft_dir: str | Path) -> Path:
    if not path:
        raise ValueError(f"{graft_dir}/config.json records no path for a part of the graft")
    candidate = Path(path).expanduser()
    if not candidate.is_absolute():
        candidate = Path(graft_dir) / candidate
    if not (candidate / "config.json").is_file():
        raise ValueError(f"{graft_dir}: the graft refers to {candidate}, which holds no config.json")
    return candidate.resolve()


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise ValueError(f"{path} has no model.safetensors (pickled .bin checkpoints are not loaded)")


def load_whisper_encoder(path: str | Path, dtype: torch.dtype | None = None, device=None):
    """The encoder of any Whisper checkpoint directory (WhisperForConditionalGeneration, WhisperModel or an
    encoder-only save): only the encoder's tensors are read."""
    from safetensors import safe_open
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    path = Path(path)
    config = WhisperConfig.from_pretrained(str(path))
    with torch.device("meta"):
        encoder = WhisperEncoder(config)
    wanted = set(encoder.state_dict())
    state: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(path):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                for prefix in ("model.encoder.", "encoder.", ""):
                    if key.startswith(prefix) and key[len(prefix):] in wanted:
                        state[key[len(prefix):]] = handle.get_tensor(key)
                        break
    missing = sorted(wanted - set(state))
    if missing:
        raise ValueError(f"{path}: no Whisper encoder weights for {missing[:5]}{' …' if len(missing) > 5 else ''}")
    encoder.load_state_dict(state, strict=True, assign=True)
    encoder.to(device=device or "cpu", dtype=dtype or torch.float32)
    encoder.requires_grad_(False)
    _mark_initialized(encoder)
    return encoder


def load_graft(path: str | Path, dtype: Any = "auto", attn_implementation: str | None = None,
               quantization_config=None, device_map=None):
    """Load a graft directory (module docstring): VL model, Whisper encoder, projector."""
    import transformers
    from transformers import GenerationConfig

    classes = _model_classes()
    path = Path(path)
    config = classes["QwenVLWhisperConfig"].from_pretrained(str(path))
    vl_path = resolve_part(config.vl_model_path, path)
    encoder_path = resolve_part(config.audio_encoder_path, path)
    vl_class = getattr(transformers, VL_CLASSES[config.vl_config.model_type])
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device_map is not None:
        kwargs["device_map"] = device_map
    vl_model = vl_class.from_pretrained(str(vl_path), **kwargs)
    _mark_initialized(vl_model)
    embed = vl_model.get_input_embeddings().weight
    compute_dtype = embed.dtype if embed.is_floating_point() else torch.bfloat16
    encoder = load_whisper_encoder(encoder_path, dtype=compute_dtype, device=embed.device)
    if attn_implementation in ("sdpa", "eager"):
        encoder.config._attn_implementation = attn_implementation
    config.vl_config, config.audio_config = vl_model.config, encoder.config
    config.vl_model_path, config.audio_encoder_path = str(vl_path), str(encoder_path)
    model = classes["QwenVLWhisperForConditionalGeneration"](config, vl_model=vl_model, audio_encoder=encoder)
    projector_file = path / PROJECTOR_FILE
    if not projector_file.is_file():
        raise ValueError(f"{projector_file} not found: a graft directory holds its audio projector")
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


def unwrap(model):
    """The graft inside a PeftModel or a DDP wrapper (or the graft itself)."""
    graft = getattr(model, "module", model)  # DistributedDataParallel
    if hasattr(graft, "get_base_model"):  # PeftModel
        graft = graft.get_base_model()
    if type(graft).__name__ != "QwenVLWhisperForConditionalGeneration":
        raise ValueError(f"{type(model).__name__} holds no qwen_vl_whisper graft")
    return graft


def projector_module(model) -> nn.Module:
    """The projector that is active: the trained copy when PEFT wraps it in ``modules_to_save``."""
    projector = unwrap(model).audio_projector
    if hasattr(projector, "modules_to_save"):
        active = projector.active_adapters if hasattr(projector, "active_adapters") else [projector.active_adapter]
        projector = projector.modules_to_save[active[0]]
    return projector


def load_projector(model, directory: str | Path) -> None:
    file = Path(directory) / PROJECTOR_FILE
    if not file.is_file():
        raise ValueError(f"--init_from {directory}: no {PROJECTOR_FILE} (expected a stage-1 output directory)")
    target = projector_module(model)
    state = read_projector(file)
    expected = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        raise ValueError(f"--init_from {directory}: projector {found} does not fit this graft's {expected}")
    target.load_state_dict(state, strict=True)


#: key prefix of the projector's tensors in projector.safetensors (their names in the graft's state dict)
PROJECTOR_PREFIX = "audio_projector."


def write_projector(projector: nn.Module, directory: str | Path) -> Path:
    """projector.safetensors, keyed by the names the tensors have in the graft (``audio_projector.…``)."""
    from safetensors.torch import save_file

    file = Path(directory) / PROJECTOR_FILE
    file.parent.mkdir(parents=True, exist_ok=True)
    state = {PROJECTOR_PREFIX + k: v.detach().contiguous().cpu() for k, v in projector.state_dict().items()}
    save_file(state, str(file), metadata={"format": "pt"})
    return file


def read_projector(file: str | Path) -> dict[str, torch.Tensor]:
    """The projector's state dict (module-relative keys) from projector.safetensors."""
    from safetensors.torch import load_file

    return {k.removeprefix(PROJECTOR_PREFIX): v for k, v in load_file(str(file)).items()}


def write_projector_index(projector: nn.Module, directory: str | Path) -> Path:
    """A safetensors index naming projector.safetensors as the file holding the graft's trained weights: Trainer's
    ``resume_from_checkpoint`` then finds and loads them (the frozen VL model and encoder stay where config.json
    points; Trainer's warning about their "missing" keys is expected)."""
    index = Path(directory) / "model.safetensors.index.json"
    weight_map = {PROJECTOR_PREFIX + k: PROJECTOR_FILE for k in projector.state_dict()}
    record = {"metadata": {"surgvqa": "projector only: the VL model and the Whisper encoder are read from the "
                                      "vl_model_path / audio_encoder_path of config.json"},
              "weight_map": weight_map}
    index.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return index


# ----------------------------------------------------------------------------------------------- the backbone
class QwenVLWhisper(Backbone):
    name = MODEL_TYPE
    lora_target_regex = (
        r"vl_model\.model\.language_model\.layers\.\d+\."
        r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
    )
    vision_lora_regex = (
        r"vl_model\.model\.visual\.blocks\.\d+\."
        r"(attn\.(qkv|proj)|mlp\.(fc1|fc2|gate_proj|up_proj|down_proj|linear_fc1|linear_fc2))"
    )
    tower_modules = ("vl_model.model.visual", "audio_encoder")
    projector_modules = ("audio_projector", "vl_model.model.visual.merger")
    conv3d_patch_embed = "vl_model.model.visual.patch_embed"
    audio_projector_module = "audio_projector"

    def matches(self, config: dict) -> bool:
        return config.get("model_type") == MODEL_TYPE

    def vl_quantization_config(self, options: LoadOptions):
        """bitsandbytes config for the VL model (names relative to it): vision tower, merger and lm_head stay
        unquantized; the Whisper encoder and the projector are never quantized."""
        if not options.quantized:
            return None
        from transformers import BitsAndBytesConfig

        skip = ["model.visual", "lm_head"]
        if options.load_in_4bit:
            return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=skip)
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)

    def load(self, path: str, options: LoadOptions):
        options.validate()
        model = load_graft(path, dtype=options.torch_dtype(), attn_implementation=options.attn_implementation,
                           quantization_config=self.vl_quantization_config(options), device_map=options.device_map)
        self.warn_if_slow_conv3d()
        return model

    def load_processor(self, path: str, trust_remote_code: bool = False):
        return QwenVLWhisperProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)

    def make_trainable(self, model, lora_config, stage: int | None = None, init_from: str | None = None):
        """Stage 1: only the audio projector trains (no PEFT; saving writes the projector and config). Stage 2
        (the default): LoRA on the LLM plus the projector as ``modules_to_save``."""
        stage = 2 if stage is None else int(stage)
        if stage not in (1, 2):
            raise ValueError(f"--stage must be 1 (projector alignment) or 2 (LoRA + projector), got {stage}")
        if hasattr(model, "peft_config"):
            raise ValueError("make_trainable expects the bare graft, not a PEFT model")
        graft = unwrap(model)
        if init_from:
            self._check_same_parts(graft, init_from)
            load_projector(graft, init_from)
            logger.info("audio projector initialised from %s", init_from)
        elif stage == 2 and graft.config.graft_stage < 1:
            logger.warning("stage 2 on a graft whose projector was never aligned (graft_stage %d): run --stage 1 "
                           "first and pass --init_from STAGE1_DIR (or train on the stage-1 directory)",
                           graft.config.graft_stage)
        graft._surgvqa_training = {"stage": stage,
                                   "init_from": str(Path(init_from).resolve()) if init_from else None}
        if stage == 1:
            graft.requires_grad_(False)
            graft.audio_projector.requires_grad_(True)
            graft.save_mode = "projector"
            graft.config.graft_stage = 1
            trainable = sum(p.numel() for p in graft.parameters() if p.requires_grad)
            total = sum(p.numel() for p in graft.parameters())
            logger.info("stage 1: training the audio projector only (%d of %d parameters)", trainable, total)
            return graft
        from peft import get_peft_model

        modules = list(lora_config.modules_to_save or [])
        if self.audio_projector_module not in modules:
            modules.append(self.audio_projector_module)
        lora_config.modules_to_save = modules
        graft.config.graft_stage = max(graft.config.graft_stage, 1)
        return get_peft_model(graft, lora_config)

    @staticmethod
    def _check_same_parts(graft, init_from: str) -> None:
        """--init_from must be a stage-1 directory of the same VL model and encoder: stage 2 records it as its
        base, so inference loads that directory's parts under the adapter."""
        config_file = Path(init_from) / "config.json"
        recorded = json.loads(config_file.read_text()) if config_file.is_file() else {}
        if recorded.get("model_type") != MODEL_TYPE:
            raise ValueError(f"--init_from {init_from}: not a qwen_vl_whisper graft directory (stage-1 output)")
        for key in ("vl_model_path", "audio_encoder_path"):
            theirs = resolve_part(recorded.get(key), init_from)
            ours = Path(getattr(graft.config, key)).resolve()
            if theirs != ours:
                raise ValueError(f"--init_from {init_from}: its {key} is {theirs}, this graft's is {ours}")

    def save_extras(self, model, output_dir: str, config) -> dict[str, Any]:
        """The graft's record for surgvqa_config.json (encoder, stage); stage 2 also writes the trained projector
        (projector.safetensors, the modules_to_save copy) and records the stage-1 directory as its base."""
        graft = unwrap(model)
        training = getattr(graft, "_surgvqa_training", None) or {"stage": None, "init_from": None}
        updates: dict[str, Any] = {}
        record = {
            "stage": training["stage"],
            "init_from": training["init_from"],
            "vl_model": graft.config.vl_model_path,
            "vl_model_type": graft.vl_type,
            "audio_encoder": graft.config.audio_encoder_path,
            "projector": graft.config.projector_type,
            "projector_file": PROJECTOR_FILE,
            "audio_pooling": graft.config.audio_pooling,
            "audio_window": graft.config.audio_window,
            "trim_audio": graft.config.trim_audio,
        }
        if training["stage"] == 2:
            write_projector(projector_module(model), output_dir)
            if training["init_from"]:
                record["model_name_or_path"] = config.base_model
                updates["base_model"] = training["init_from"]
        updates["graft"] = record
        return updates

    def save_merged(self, model, output_dir: str, **kwargs) -> None:
        """Write a merged graft (after ``merge_and_unload``) as one self-contained directory: the merged VL model
        (a plain transformers checkpoint in ``vl_model/``), the encoder (``audio_encoder/``), the projector and the
        graft config. ``model.save_pretrained`` does the same outside stage-1 training."""
        graft = unwrap(model)
        if hasattr(model, "peft_config"):
            raise ValueError("save_merged expects a merged model (call merge_and_unload first)")
        graft.save_pretrained(output_dir, save_towers=True, **kwargs)


QWEN_VL_WHISPER = QwenVLWhisper()


# ------------------------------------------------------------------------------------------------- creating
def create_graft(vl_model_path: str | Path, whisper_path: str | Path, output_dir: str | Path, *,
                 projector: str = "linear", audio_pooling: int = 2, audio_window: str = "full",
                 trim_audio: bool = True, seed: int = 0, relative_paths: bool = False) -> Path:
    """Write a graft directory referring to ``vl_model_path`` and ``whisper_path`` (nothing is copied): config,
    a freshly initialised projector, the VL processor with the audio tokens and the graft's chat template."""
    from transformers import (
        AutoConfig,
        AutoProcessor,
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
    )

    classes = _model_classes()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    vl_config = AutoConfig.from_pretrained(str(vl_model_path))
    if vl_config.model_type not in VL_CLASSES:
        raise ValueError(
            f"{vl_model_path}: model_type {vl_config.model_type!r} is not one of {', '.join(VL_CLASSES)}")
    audio_config = WhisperConfig.from_pretrained(str(whisper_path))

    vl_processor = AutoProcessor.from_pretrained(str(vl_model_path))
    tokenizer = vl_processor.tokenizer
    vocab = tokenizer.get_vocab()
    missing = [t for t in AUDIO_TOKENS.values() if t not in vocab]
    if missing:  # reuse ids the vocabulary already has, add only the others
        tokenizer.add_tokens(missing, special_tokens=True)
        logger.info("added %s to the tokenizer (ids %s)", missing, tokenizer.convert_tokens_to_ids(missing))
    rows = vl_config.get_text_config().vocab_size
    if len(tokenizer) > rows:
        raise ValueError(
            f"the tokenizer now has {len(tokenizer)} tokens but {vl_model_path} has {rows} embedding rows")
    vl_processor.chat_template = CHAT_TEMPLATE
    tokenizer.chat_template = CHAT_TEMPLATE
    try:
        extractor = WhisperFeatureExtractor.from_pretrained(str(whisper_path))
    except OSError:
        extractor = WhisperFeatureExtractor(feature_size=audio_config.num_mel_bins)
    if extractor.feature_size != audio_config.num_mel_bins:
        raise ValueError(f"{whisper_path}: feature extractor has {extractor.feature_size} mel bins, the encoder "
                         f"{audio_config.num_mel_bins}")
    if audio_window not in ("full", "trimmed"):
        raise ValueError(f"audio_window must be 'full' or 'trimmed', got {audio_window!r}")
    if not trim_audio and audio_window != "full":
        raise ValueError("trim_audio=False (all 1,500 encoder frames) needs audio_window='full'")
    processor = QwenVLWhisperProcessor(vl_processor, extractor, audio_pooling=audio_pooling, trim_audio=trim_audio)

    def where(part: str | Path) -> str:
        part = Path(part).resolve()
        if relative_paths:
            try:
                return str(part.relative_to(output_dir.resolve()))
            except ValueError:
                pass
        return str(part)

    config = classes["QwenVLWhisperConfig"](
        vl_config=vl_config.to_dict(), audio_config=audio_config.to_dict(), vl_model_path=where(vl_model_path),
        audio_encoder_path=where(whisper_path), projector_type=projector, audio_pooling=audio_pooling,
        audio_window=audio_window, trim_audio=trim_audio, audio_token_id=processor.audio_token_id,
        audio_bos_token_id=processor.audio_bos_token_id, audio_eos_token_id=processor.audio_eos_token_id,
        graft_stage=0,
    )
    torch.manual_seed(seed)
    hidden = vl_config.get_text_config().hidden_size
    projector_net = AudioProjector(audio_config.d_model, hidden, projector)
    std = getattr(vl_config.get_text_config(), "initializer_range", 0.02)
    for module in projector_net.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)

    write_projector(projector_net, output_dir)
    _write_json(output_dir / "config.json", config.to_dict())
    text = vl_config.get_text_config()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else getattr(text, "pad_token_id", None)
    GenerationConfig(eos_token_id=eos, pad_token_id=pad, do_sample=False).save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m surgvqa.backbones.qwen_vl_whisper", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="write a graft directory from a Qwen-VL and a Whisper checkpoint")
    create.add_argument("--vl_model", required=True, help="Qwen2-VL / Qwen2.5-VL / Qwen3-VL directory")
    create.add_argument("--audio_encoder", required=True, help="any Whisper checkpoint directory (encoder used)")
    create.add_argument("--output_dir", required=True)
    create.add_argument("--projector", choices=["linear", "mlp"], default="linear")
    create.add_argument("--audio_pooling", type=int, choices=[1, 2], default=2)
    create.add_argument("--audio_window", choices=["full", "trimmed"], default="full")
    create.add_argument("--no_trim_audio", action="store_true", help="feed all 1,500 encoder frames (original)")
    create.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        out = create_graft(args.vl_model, args.audio_encoder, args.output_dir, projector=args.projector,
                           audio_pooling=args.audio_pooling, audio_window=args.audio_window,
                           trim_audio=not args.no_trim_audio, seed=args.seed)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"graft written to {out}; align the projector with: python train_vqa.py --model_name_or_path {out} "
          "--stage 1 ...")
    return 0


def _register() -> None:
    from surgvqa.backbones import register

    register(QWEN_VL_WHISPER)


if __name__ == "__main__":  # python -m: run the registered module's main (this copy is __main__, not registered)
    from surgvqa.backbones.qwen_vl_whisper import main as _main

    raise SystemExit(_main())
else:
    _register()
