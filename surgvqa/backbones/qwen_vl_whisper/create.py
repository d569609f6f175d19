"""Create a graft directory from a Qwen-VL checkpoint and a Whisper checkpoint (nothing is copied).

    python -m surgvqa.backbones.qwen_vl_whisper.create --vl_model /models/Qwen2.5-VL-7B-Instruct \
        --audio_encoder /models/whisper-large-v3-turbo --output_dir outputs/graft

The directory holds config.json (the two parts' paths and configs, projector/pooling/window settings, audio token
ids, ``graft_stage`` 0), a freshly initialised projector (projector.safetensors), generation_config.json and the
graft's processor (the VL tokenizer with <|audio_bos|> <|AUDIO|> <|audio_eos|> added, the graft's chat template,
the Whisper feature extractor). Align the projector next: ``train_vqa.py --model_name_or_path GRAFT --stage 1``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoProcessor, GenerationConfig, WhisperConfig, WhisperFeatureExtractor

from surgvqa.backbones.qwen_vl_whisper.configuration import QwenVLWhisperConfig
from surgvqa.backbones.qwen_vl_whisper.constants import AUDIO_TOKENS, VL_CLASSES
from surgvqa.backbones.qwen_vl_whisper.modeling import AudioProjector
from surgvqa.backbones.qwen_vl_whisper.processing import QwenVLWhisperProcessor
from surgvqa.backbones.qwen_vl_whisper.weights import write_projector
from surgvqa.errors import UserError

logger = logging.getLogger(__name__)

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


def create_graft(vl_model_path: str | Path, whisper_path: str | Path, output_dir: str | Path, *,
                 projector: str = "linear", audio_pooling: int = 2, audio_window: str = "full",
                 trim_audio: bool = True, seed: int = 0, relative_paths: bool = False) -> Path:
    """Write a graft directory referring to ``vl_model_path`` and ``whisper_path`` (module docstring); with
    ``relative_paths`` the parts are recorded relative to ``output_dir`` where they lie inside it."""
    if audio_window not in ("full", "trimmed"):
        raise UserError(f"audio_window must be 'full' or 'trimmed', got {audio_window!r}")
    if not trim_audio and audio_window != "full":
        raise UserError("trim_audio=False (all 1,500 encoder frames) needs audio_window='full'")
    output_dir = Path(output_dir)
    vl_config = AutoConfig.from_pretrained(str(vl_model_path))
    if vl_config.model_type not in VL_CLASSES:
        raise UserError(
            f"{vl_model_path}: model_type {vl_config.model_type!r} is not one of {', '.join(VL_CLASSES)}")
    audio_config = WhisperConfig.from_pretrained(str(whisper_path))
    processor = _graft_processor(vl_model_path, whisper_path, vl_config, audio_config, audio_pooling, trim_audio)

    def where(part: str | Path) -> str:
        part = Path(part).resolve()
        if relative_paths and part.is_relative_to(output_dir.resolve()):
            return str(part.relative_to(output_dir.resolve()))
        return str(part)

    config = QwenVLWhisperConfig(
        vl_config=vl_config.to_dict(), audio_config=audio_config.to_dict(), vl_model_path=where(vl_model_path),
        audio_encoder_path=where(whisper_path), projector_type=projector, audio_pooling=audio_pooling,
        audio_window=audio_window, trim_audio=trim_audio, audio_token_id=processor.audio_token_id,
        audio_bos_token_id=processor.audio_bos_token_id, audio_eos_token_id=processor.audio_eos_token_id,
        graft_stage=0,
    )
    torch.manual_seed(seed)
    text = vl_config.get_text_config()
    projector_net = AudioProjector(audio_config.d_model, text.hidden_size, projector)
    for module in projector_net.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=getattr(text, "initializer_range", 0.02))
            nn.init.zeros_(module.bias)

    output_dir.mkdir(parents=True, exist_ok=True)
    write_projector(projector_net.state_dict(), output_dir)
    config.to_json_file(output_dir / "config.json", use_diff=False)
    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else getattr(text, "pad_token_id", None)
    GenerationConfig(eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=pad,
                     do_sample=False).save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


def _graft_processor(vl_model_path, whisper_path, vl_config, audio_config, audio_pooling: int,
                     trim_audio: bool) -> QwenVLWhisperProcessor:
    """The VL processor with the audio tokens (ids the vocabulary already has are reused) and the graft's chat
    template, plus the Whisper checkpoint's feature extractor."""
    vl_processor = AutoProcessor.from_pretrained(str(vl_model_path))
    tokenizer = vl_processor.tokenizer
    missing = [t for t in AUDIO_TOKENS.values() if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
        logger.info("added %s to the tokenizer (ids %s)", missing, tokenizer.convert_tokens_to_ids(missing))
    rows = vl_config.get_text_config().vocab_size
    if len(tokenizer) > rows:
        raise UserError(
            f"the tokenizer now has {len(tokenizer)} tokens but {vl_model_path} has {rows} embedding rows")
    vl_processor.chat_template = CHAT_TEMPLATE
    tokenizer.chat_template = CHAT_TEMPLATE
    try:
        extractor = WhisperFeatureExtractor.from_pretrained(str(whisper_path))
    except OSError as err:  # an encoder-only Whisper export: the standard extractor at the encoder's mel bins
        logger.warning("%s has no readable preprocessor_config.json (%s): using Whisper's standard feature "
                       "extractor with %d mel bins (16 kHz, 30 s window)", whisper_path, err,
                       audio_config.num_mel_bins)
        extractor = WhisperFeatureExtractor(feature_size=audio_config.num_mel_bins)
    if extractor.feature_size != audio_config.num_mel_bins:
        raise UserError(f"{whisper_path}: feature extractor has {extractor.feature_size} mel bins, the encoder "
                        f"{audio_config.num_mel_bins}")
    return QwenVLWhisperProcessor.from_vl_processor(vl_processor, extractor, audio_pooling=audio_pooling,
                                                    trim_audio=trim_audio)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m surgvqa.backbones.qwen_vl_whisper.create", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vl_model", required=True, help="Qwen2-VL / Qwen2.5-VL / Qwen3-VL directory")
    parser.add_argument("--audio_encoder", required=True, help="any Whisper checkpoint directory (encoder used)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--projector", choices=["linear", "mlp"], default="linear")
    parser.add_argument("--audio_pooling", type=int, choices=[1, 2], default=2)
    parser.add_argument("--audio_window", choices=["full", "trimmed"], default="full")
    parser.add_argument("--no_trim_audio", action="store_true", help="feed all 1,500 encoder frames (original)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = create_graft(args.vl_model, args.audio_encoder, args.output_dir, projector=args.projector,
                           audio_pooling=args.audio_pooling, audio_window=args.audio_window,
                           trim_audio=not args.no_trim_audio, seed=args.seed)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"graft written to {out}; align the projector with: python train_vqa.py --model_name_or_path {out} "
          "--stage 1 ...")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
