"""Batching: chat prompt → processor (once per batch) → answer tokens appended → labels masked by position.

Training pads on the right and labels exactly ``answer + end of turn`` (the special token the chat template writes
after an answer: ``<|im_end|>`` for Qwen); generation uses the same code with no answer
and left padding. Audio is padded to the longest clip of the batch (not Whisper's 30 s window) and the feature mask
tells the audio tower which frames are real.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from surgvqa.backbones.base import num_audio_tokens, vision_grid
from surgvqa.backbones.common.token_merging import kept_video_tokens, merge_placeholders
from surgvqa.media import MediaConfig, PixelBudget
from surgvqa.prompts import DEFAULT_SYSTEM_PROMPT, build_messages, check_question_modality
from surgvqa.run_config import DEFAULT_FPS, FRAMES_AS
from surgvqa.samples import Sample
from surgvqa.tokenizer import end_of_turn_token

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
#: what the processors call the video clock (seconds per temporal grid step) in their output
_CLOCK_KEYS = ("video_second_per_grid", "second_per_grid_ts")


def frame_times(item: dict, fps: float, video_fps: float | None = None) -> list[float]:
    """Seconds at which each kept frame of a dataset item was shot.

    A video file's frames carry their presentation times (``frame_times``). Extracted frames use their
    ``frame_numbers`` (the line's entries for the kept frames) divided by ``video_fps`` (the source video's frame
    rate) when both exist, else their position in the line's frame list divided by ``fps`` (the rate at which the
    listed frames were sampled). Either way the frames kept after subsampling keep their own times, so 4 of 8
    frames span the same seconds as the 8.
    """
    if item.get("frame_times"):
        return [float(t) for t in item["frame_times"]]
    numbers = item.get("frame_numbers")
    if video_fps and numbers:
        return [float(n) / video_fps for n in numbers]
    indices = item.get("frame_indices") or list(range(len(item["frames"])))
    return [i / fps for i in indices]


def second_per_grid(times: list[float], temporal_patch_size: int, fps: float) -> float:
    """The M-RoPE time step of one video: seconds between consecutive temporal grids (``temporal_patch_size``
    frames each, the last frame repeated to fill the last grid), fitted through the first and last grid.

    The processors assume evenly spaced frames at one ``fps`` (``temporal_patch_size / fps``); here the step comes
    from the frames actually kept, so a subsampled clip keeps the clock of the full clip.
    """
    tp = max(1, temporal_patch_size)
    padded = list(times) + [times[-1]] * (-len(times) % tp)
    starts = padded[::tp]
    if len(starts) >= 2 and starts[-1] > starts[0]:
        return (starts[-1] - starts[0]) / (len(starts) - 1)
    if len(times) >= 2 and times[-1] > times[0]:  # one grid: its frames' mean spacing
        return tp * (times[-1] - times[0]) / (len(times) - 1)
    return tp / fps


class OverlongSampleError(ValueError):
    """A sample whose answer would be cut by ``model_max_length``."""


@dataclass
class VQACollator:
    """Turn dataset items (``{"sample", "frames", "audio"}``) into model inputs.

    ``mode="train"`` appends the answer and the end-of-turn token and returns ``labels``; ``mode="generate"`` returns the
    prompt only, left padded, plus ``keys`` (the (video_id, id) of each row).
    """

    processor: Any
    question_modality: str = MediaConfig.question_modality
    frame_size: int = MediaConfig.frame_size
    frames_as: str = FRAMES_AS[0]
    mode: str = "train"
    model_max_length: int | None = None
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    fps: float = DEFAULT_FPS
    video_fps: float | None = None
    max_pixels: int | None = None
    min_pixels: int | None = None
    #: video token merging: each video gets ceil(r x n) placeholders (the model merges its tokens to match)
    token_kept_ratio: float = 1.0
    _warned_odd: bool = field(default=False, repr=False)
    #: keep each item's encoding (its prompt ids, rows of pixel values, audio features) in memory up to this many GB,
    #: and build a later batch made only of kept items from them instead of running the processor again (0: off).
    #: Items name what they were made of in ``media_key`` (SurgicalVQADataset sets it); items without one are not kept.
    encoding_cache_gb: float = 0.0
    #: rendered prompts and tokenized answers: every epoch asks the same questions again (bounded, see _remember)
    _prompts: dict = field(default_factory=dict, repr=False)
    _answers: dict = field(default_factory=dict, repr=False)
    _encodings: dict = field(default_factory=dict, repr=False)
    _encoding_bytes: int = field(default=0, repr=False)
    #: the length pre-flight's vision token counts per frame shape (see _vision_tokens)
    _vision_counts: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in ("train", "generate"):
            raise ValueError(f"mode must be 'train' or 'generate', got {self.mode!r}")
        if self.frames_as not in FRAMES_AS:
            raise ValueError(f"frames_as must be one of {', '.join(FRAMES_AS)}; got {self.frames_as!r}")
        check_question_modality(self.question_modality)
        tokenizer = self.processor.tokenizer
        token = end_of_turn_token(tokenizer)
        if token is None:
            raise ValueError("the tokenizer's chat template writes no special token after an answer: the collator "
                             "needs a chat tokenizer that marks the end of a turn (e.g. <|im_end|>)")
        self.end_of_turn_id = tokenizer.convert_tokens_to_ids(token)
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token: run surgvqa.tokenizer.repair_tokenizer first")
        if not self.fps or self.fps <= 0:
            raise ValueError(f"fps must be > 0, got {self.fps!r}")
        if self.video_fps is not None and self.video_fps <= 0:
            raise ValueError(f"video_fps must be > 0 (the source video's frame rate) or None, got {self.video_fps!r}")
        self.budget = PixelBudget(self.frame_size, self.max_pixels, self.min_pixels, self.grid_factor)
        self._check_token_merging()

    def _check_token_merging(self) -> None:
        kept_video_tokens(1, self.token_kept_ratio)  # (0, 1]
        if self.token_kept_ratio == 1.0:
            return
        if self.frames_as != "video":
            raise ValueError("token_kept_ratio < 1 merges the tokens of a video: it needs frames_as='video'")
        token = getattr(self.processor, "video_token", None)
        if token is None:
            raise ValueError(f"{type(self.processor).__name__} names no video placeholder token: token merging "
                             "needs a Qwen-style video processor")
        self.video_token_id = self.processor.tokenizer.convert_tokens_to_ids(token)

    def _merged_video_rows(self, rows: list[list[int]], video_grid_thw) -> list[list[int]]:
        """Token merging: each video's placeholder run cut from n to ceil(r x n) tokens."""
        if self.token_kept_ratio == 1.0 or video_grid_thw is None:
            return rows
        merge = int(getattr(self.processor.video_processor, "merge_size", 1) or 1)
        counts = (video_grid_thw.prod(-1) // (merge * merge)).tolist()
        return merge_placeholders(rows, self.video_token_id, counts, self.token_kept_ratio)

    # -- pieces --------------------------------------------------------------------------------------------
    @property
    def temporal_patch_size(self) -> int:
        return int(getattr(self.processor.video_processor, "temporal_patch_size", 1) or 1)

    @property
    def grid_factor(self) -> int:
        """The vision grid in pixels: patch x spatial merge (28 for Qwen2/2.5, 32 for Qwen3)."""
        return vision_grid(self.processor)

    def pixel_kwargs(self) -> dict:
        """The pixel budget, always explicit: the processor's class-level defaults would otherwise upscale."""
        return {"size": self.budget.processor_size()}

    def frame_hw(self, width: int, height: int) -> tuple[int, int]:
        """``(height, width)`` a source frame of ``width x height`` reaches the processor with (the dataset's resize)."""
        w, h = self.budget.target_size(width, height)
        return h, w

    def _frames_for_video(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        """Qwen merges frames in pairs: an odd count gets its last frame repeated, deliberately and once logged."""
        pad = -len(frames) % self.temporal_patch_size
        if pad:
            if not self._warned_odd:
                logger.warning(
                    "%d frames is not a multiple of the temporal patch (%d): repeating the last frame",
                    len(frames), self.temporal_patch_size,
                )
                self._warned_odd = True
            frames = list(frames) + [frames[-1]] * pad
        return list(frames)

    def _on_grid(self, frame: np.ndarray) -> bool:
        """Frame already what the pixel budget makes of it (on the vision grid, within budget)."""
        h, w = frame.shape[:2]
        return self.budget.on_grid(w, h)

    def prompt_text(self, question: str, num_frames: int, answer: str | None = None) -> str:
        key = (question, num_frames, answer)
        text = self._prompts.get(key)
        if text is None:
            text = _remember(self._prompts, key, self._render_prompt(question, num_frames, answer))
        return text

    def _render_prompt(self, question: str, num_frames: int, answer: str | None) -> str:
        messages = build_messages(
            question,
            answer,
            question_modality=self.question_modality,
            num_images=num_frames if self.frames_as == "images" else 0,
            use_video=self.frames_as == "video",
            system_prompt=self.system_prompt,
        )
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def answer_ids(self, answer: str) -> list[int]:
        ids = self._answers.get(answer)
        if ids is None:
            tokens = self.processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
            ids = _remember(self._answers, answer, (*tokens, self.end_of_turn_id))
        return list(ids)

    # -- the call ------------------------------------------------------------------------------------------
    def has_encoding(self, media_key: tuple | None) -> bool:
        """This collator holds the encoding of an item made of ``media_key`` (the dataset may then skip its media)."""
        return media_key is not None and media_key in self._encodings

    def __call__(self, items: list[dict]) -> dict[str, Any]:
        samples = [item["sample"] for item in items]
        keys = [item.get("media_key") for item in self._check_media(items)]
        kept = [self._encodings.get(key) if key is not None else None for key in keys]
        if kept and None not in kept:  # every item kept: no processor
            rows, encoded = _assemble(kept)
        elif not any(kept) or self.encoding_cache_gb <= 0:  # none kept (or no cache): the processor, once
            rows, encoded = self._encode(items)
            if self.encoding_cache_gb > 0 and None not in keys:
                self._keep(keys, items, rows, encoded)
        else:  # some kept: the processor for the others, then the batch from the items' parts
            missing = [i for i, part in enumerate(kept) if part is None]
            new_rows, new_encoded = self._encode([items[i] for i in missing])
            parts = _split(new_rows, new_encoded, [len(items[i]["frames"]) for i in missing])
            if parts is None:
                raise RuntimeError("the processor output cannot be split per item, yet some items were kept")
            for i, part in zip(missing, parts, strict=True):
                kept[i] = part
            if None not in keys:
                self._keep([keys[i] for i in missing], [items[i] for i in missing], new_rows, new_encoded)
            rows, encoded = _assemble(kept)
        batch = self._finish(samples, [list(row) for row in rows], encoded)
        if self.mode == "train" and self.encoding_cache_gb > 0 and keys and None not in keys:
            batch["media_ids"] = torch.tensor([media_id(key) for key in keys], dtype=torch.long)
        return batch

    def _check_media(self, items: list[dict]) -> list[dict]:
        """``items``; an item that came without its media (the dataset's ``has_encoding``) must have been kept."""
        for item in items:
            if item.get("frames") is None and not self.has_encoding(item.get("media_key")):
                raise RuntimeError(f"{item['sample'].key}: the item came without its media but this collator "
                                   "holds no encoding of it (a dataset's has_encoding must be this collator's)")
        return items

    def _encode(self, items: list[dict]) -> tuple[list[list[int]], dict[str, Any]]:
        """The processor, once for the batch: each item's prompt ids (unpadded) and the media tensors."""
        texts, videos, images, audios, clocks = [], [], [], [], []
        for item in items:
            frames = item["frames"]
            if not frames:
                raise ValueError(f"{item['sample'].key}: no frames")
            texts.append(self.prompt_text(item["sample"].question, len(frames)))
            if self.frames_as == "video":
                videos.append(self._frames_for_video(frames))
                times = frame_times(item, self.fps, self.video_fps)
                clocks.append(second_per_grid(times, self.temporal_patch_size, self.fps))
            else:
                images.extend(frames)
            if "audio" in self.question_modality:
                if item.get("audio") is None:
                    raise ValueError(f"{item['sample'].key}: question_modality {self.question_modality!r} needs audio")
                audios.append(np.asarray(item["audio"], dtype=np.float32))

        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
        if videos:
            kwargs["videos"] = videos
            kwargs["videos_kwargs"] = {
                # fps: the rate the processor assumes for the first video (Qwen3-VL writes frame timestamps from
                # it); every video's own clock replaces the processor's below
                **self.pixel_kwargs(), "do_sample_frames": False, "cap_pixels_per_frame": False,
                "fps": self.temporal_patch_size / clocks[0],
                # frames already on the vision grid within the budget (the dataset resized them): no second resize
                "do_resize": not all(self._on_grid(video[0]) for video in videos),
            }
        if images:
            kwargs["images"] = images
            kwargs["images_kwargs"] = self.pixel_kwargs()
        if audios:
            kwargs["audio"] = audios
            # Pad to the longest clip of this batch, not to Whisper's 30 s window, plus half an STFT window: padded
            # to exactly its length, the longest clip would lose its last partial frame (one audio token fewer than
            # in a batch with a longer clip) and its last frame would see reflected samples instead of zeros.
            extractor = self.processor.feature_extractor
            longest = max(len(a) for a in audios)
            kwargs["audio_kwargs"] = {"max_length": longest + extractor.n_fft // 2, "truncation": False}
        encoded = self.processor(**kwargs)
        for key in _CLOCK_KEYS:
            if videos and key in encoded:
                encoded[key] = torch.tensor(clocks, dtype=torch.as_tensor(encoded[key]).dtype)
        if audios:  # drop the all-padding tail: every clip keeps ceil(samples / hop) frames, as at 30 s
            frames = int(encoded["feature_attention_mask"].sum(-1).max())
            encoded["input_features"] = encoded["input_features"][..., :frames]
            encoded["feature_attention_mask"] = encoded["feature_attention_mask"][:, :frames]

        # Un-pad the prompts (the processor padded on the left); _finish rebuilds rows with our own padding.
        mask = encoded.pop("attention_mask").bool()
        padded = encoded.pop("input_ids")
        rows = self._merged_video_rows([padded[i][mask[i]].tolist() for i in range(len(items))],
                                       encoded.get("video_grid_thw"))
        return rows, dict(encoded)

    def _keep(self, keys: list, items: list[dict], rows: list[list[int]], encoded: dict[str, Any]) -> None:
        """Store each item's share of a batch encoding while the bound allows (see ``encoding_cache_gb``)."""
        parts = _split(rows, encoded, [len(item["frames"]) for item in items])
        if parts is None:  # a processor output this collator cannot split per item: stop trying
            self.encoding_cache_gb = 0.0
            return
        limit = self.encoding_cache_gb * 1024**3
        for key, part in zip(keys, parts, strict=True):
            size = 8 * len(part["ids"]) + sum(t.numel() * t.element_size() for t in part["tensors"].values())
            if key not in self._encodings and self._encoding_bytes + size <= limit:
                self._encodings[key] = part
                self._encoding_bytes += size

    def _finish(self, samples: list, rows: list[list[int]], encoded: dict[str, Any]) -> dict[str, Any]:
        """Answers and labels appended (train), rows padded (right for train, left for generation)."""
        labels: list[list[int]] = []
        for i, sample in enumerate(samples):
            prompt_len = len(rows[i])
            if self.mode == "train":
                answer = self.answer_ids(sample.answer)
                rows[i] = rows[i] + answer
                labels.append([IGNORE_INDEX] * prompt_len + answer)
            if self.model_max_length is not None and len(rows[i]) > self.model_max_length:
                raise OverlongSampleError(
                    f"{sample.key} ({sample.source}): {len(rows[i])} tokens > --model_max_length "
                    f"{self.model_max_length}; raise --model_max_length, lower --frame_size / --max_train_frames, "
                    "or pass --skip_overlong to skip such samples"
                )

        pad_id = self.processor.tokenizer.pad_token_id
        left = self.mode == "generate"
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        label_tensor = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            input_ids[i, span] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, span] = 1
            if labels:
                label_tensor[i, span] = torch.tensor(labels[i], dtype=torch.long)

        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, **encoded}
        if self.mode == "train":
            batch["labels"] = label_tensor
        else:
            batch["keys"] = [s.key for s in samples]
        return batch

    # -- length pre-flight ---------------------------------------------------------------------------------
    def token_counts(self, question: str, answer: str, frame_hw: tuple[int, int], num_frames: int,
                     audio_samples: int | None, frame_times: list[float] | None = None) -> dict[str, int]:
        """Tokens a sample will take, split by kind (``video``, ``image``, ``audio``, ``text``, ``answer`` -- the
        labelled answer tokens, part of ``text`` in training -- and ``total``), from frame size and audio length
        alone (no decoding).

        The vision part is what the processor itself makes of stand-in frames of that shape and clock (cached per
        shape): placeholders and whatever text it writes around them (Qwen3-VL's frame timestamps), never re-derived
        from its formatting. Audio tokens are the count the processor exposes (:func:`num_audio_tokens`)."""
        prompt = len(self.processor.tokenizer(self.prompt_text(question, num_frames),
                                              add_special_tokens=False)["input_ids"])
        vision = self._vision_tokens(tuple(frame_hw), num_frames, tuple(frame_times) if frame_times else None)
        video = kept_video_tokens(vision["video"], self.token_kept_ratio) if vision["video"] else 0
        with_audio = audio_samples is not None and "audio" in self.question_modality
        audio = num_audio_tokens(self.processor, audio_samples) if with_audio else 0
        answer_tokens = len(self.answer_ids(answer)) if self.mode == "train" else 0
        # the audio placeholder of the prompt becomes `audio` tokens; the vision placeholders became vision["added"]
        total = prompt + vision["added"] - (vision["video"] - video) + (audio - 1 if with_audio else 0) + answer_tokens
        return {"video": video, "image": vision["image"], "audio": audio,
                "text": total - video - vision["image"] - audio, "answer": answer_tokens, "total": total}

    def _vision_tokens(self, frame_hw: tuple[int, int], num_frames: int,
                       frame_times: tuple[float, ...] | None) -> dict[str, int]:
        """Video/image placeholder tokens and all tokens the processor adds to a prompt for ``num_frames`` frames
        of ``frame_hw`` at this collator's clock: one processor call on zero frames, cached per shape."""
        key = (frame_hw, num_frames, frame_times)
        if key in self._vision_counts:
            return self._vision_counts[key]
        h, w = frame_hw
        if num_frames * h * w * 3 > _STAND_IN_BYTES:
            raise ValueError(f"{num_frames} frames of {w}x{h} px are more than {_STAND_IN_BYTES >> 30} GiB of "
                             "pixels per clip: no model takes that many tokens; lower the number of frames")
        stand_in = VQACollator(self.processor, question_modality="text", frame_size=self.frame_size,
                               frames_as=self.frames_as, mode="generate", system_prompt=self.system_prompt,
                               fps=self.fps, video_fps=self.video_fps, max_pixels=self.max_pixels,
                               min_pixels=self.min_pixels)
        frame = np.zeros((h, w, 3), dtype=np.uint8)
        sample = Sample(video_id="stand-in", id="stand-in", question="?", answer="")
        item: dict[str, Any] = {"sample": sample, "frames": [frame] * num_frames}
        if frame_times:
            item["frame_times"] = list(frame_times)
        rows, _ = stand_in._encode([item])
        text = stand_in.prompt_text(sample.question, num_frames)
        bare = len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        row = torch.tensor(rows[0])
        counts = {kind: int((row == token).sum()) if token is not None else 0
                  for kind, token in (("video", _token_id(self.processor, "video_token")),
                                      ("image", _token_id(self.processor, "image_token")))}
        counts["added"] = len(rows[0]) - bare
        return _remember(self._vision_counts, key, counts, limit=1024)

    def sequence_length(self, question: str, answer: str, frame_hw: tuple[int, int], num_frames: int,
                        audio_samples: int | None, frame_times: list[float] | None = None) -> int:
        """Tokens a sample will take, from frame size and audio length alone (no decoding)."""
        return self.token_counts(question, answer, frame_hw, num_frames, audio_samples, frame_times)["total"]


#: the largest stand-in clip the length pre-flight builds (a bound on absurd frame counts, not a model limit)
_STAND_IN_BYTES = 1 << 30


def _token_id(processor, name: str) -> int | None:
    """The id of the processor's ``video_token`` / ``image_token`` placeholder, None when it has none."""
    token = getattr(processor, name, None)
    return None if token is None else processor.tokenizer.convert_tokens_to_ids(token)


def media_id(media_key: tuple) -> int:
    """A 64-bit id of what an item is made of (its ``media_key``), the same in every process: batches carry these
    as ``media_ids`` so the model side can keep per-item outputs of its frozen encoders
    (:mod:`surgvqa.backbones.common.tower_cache`)."""
    digest = hashlib.blake2b(repr(media_key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _remember(memo: dict, key, value, limit: int = 1 << 16):
    """``value``, kept in ``memo`` under ``key`` while it holds fewer than ``limit`` entries."""
    if len(memo) < limit:
        memo[key] = value
    return value


#: per-item processor outputs, batched by concatenation along dim 0 (one or more rows per item)
_ROW_KEYS = ("pixel_values_videos", "video_grid_thw", *_CLOCK_KEYS, "pixel_values", "image_grid_thw")
_AUDIO_KEYS = ("input_features", "feature_attention_mask")


def _split(rows: list[list[int]], encoded: dict[str, Any], frames: list[int]) -> list[dict] | None:
    """Each item's share of a batch encoding: its prompt ids, its rows of pixel values and grids, its audio features
    without the batch's padding. None when ``encoded`` holds anything not known to be per item."""
    if set(encoded) - set(_ROW_KEYS) - set(_AUDIO_KEYS):
        return None
    n = len(rows)
    parts: list[dict] = [{"ids": tuple(row), "tensors": {}} for row in rows]
    if "video_grid_thw" in encoded:  # one video per item
        starts = np.cumsum([0, *encoded["video_grid_thw"].prod(-1).tolist()])
        for i, part in enumerate(parts):
            part["tensors"]["pixel_values_videos"] = encoded["pixel_values_videos"][starts[i]:starts[i + 1]].clone()
            for key in ("video_grid_thw", *_CLOCK_KEYS):
                if key in encoded:
                    part["tensors"][key] = encoded[key][i:i + 1].clone()
    if "image_grid_thw" in encoded:  # one image per frame
        first = np.cumsum([0, *frames])
        starts = np.cumsum([0, *encoded["image_grid_thw"].prod(-1).tolist()])
        for i, part in enumerate(parts):
            a, b = first[i], first[i + 1]
            part["tensors"]["pixel_values"] = encoded["pixel_values"][starts[a]:starts[b]].clone()
            part["tensors"]["image_grid_thw"] = encoded["image_grid_thw"][a:b].clone()
    if "input_features" in encoded:
        lengths = encoded["feature_attention_mask"].sum(-1).tolist()
        for i, part in enumerate(parts[:n]):
            part["tensors"]["input_features"] = encoded["input_features"][i, :, :lengths[i]].clone()
            part["mask_dtype"] = encoded["feature_attention_mask"].dtype
    return parts


def _assemble(parts: list[dict]) -> tuple[list[tuple[int, ...]], dict[str, Any]]:
    """A batch encoding rebuilt from kept items: rows concatenated; audio features padded with zeros to the longest
    clip of the batch (the feature mask marks the padding, and the audio towers read only the frames it marks, so
    the model sees what it sees from a batch the processor made)."""
    encoded: dict[str, Any] = {}
    for key in _ROW_KEYS:
        if key in parts[0]["tensors"]:
            encoded[key] = torch.cat([part["tensors"][key] for part in parts])
    if "input_features" in parts[0]["tensors"]:
        features = [part["tensors"]["input_features"] for part in parts]
        longest = max(f.shape[-1] for f in features)
        batch = features[0].new_zeros((len(features), features[0].shape[0], longest))
        mask = torch.zeros((len(features), longest), dtype=parts[0]["mask_dtype"])
        for i, f in enumerate(features):
            batch[i, :, :f.shape[-1]] = f
            mask[i, :f.shape[-1]] = 1
        encoded["input_features"], encoded["feature_attention_mask"] = batch, mask
    return [part["ids"] for part in parts], encoded
