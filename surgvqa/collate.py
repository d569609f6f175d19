"""Batching: chat prompt → the family's ``encode`` (once per batch) → answer tokens appended → labels masked by
position → padding.

Training pads on the right and labels exactly ``answer + end of turn`` (the special token the chat template writes
after an answer: ``<|im_end|>`` for Qwen); generation uses the same code with no answer and left padding. What the
processor makes of frames and audio (pixel budget, video clock, audio padding, token counts) is the family's
``processing.py`` (``surgvqa.backbones.processing_for``); nothing here reads processor internals.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from surgvqa.backbones import processing_for
from surgvqa.backbones.common.token_merging import kept_video_tokens
from surgvqa.errors import UserError
from surgvqa.media import MediaConfig
from surgvqa.preprocessing import DEFAULT_FPS, FRAMES_AS
from surgvqa.prompts import DEFAULT_SYSTEM_PROMPT, build_messages, check_question_modality
from surgvqa.tokenizer import end_of_turn_token

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


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


class OverlongSampleError(UserError):
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
    #: rendered prompts and tokenized answers: every epoch asks the same questions again (bounded, see _remember)
    _prompts: dict = field(default_factory=dict, repr=False)
    _answers: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in ("train", "generate"):
            raise ValueError(f"mode must be 'train' or 'generate', got {self.mode!r}")
        if self.frames_as not in FRAMES_AS:
            raise UserError(f"frames_as must be one of {', '.join(FRAMES_AS)}; got {self.frames_as!r}")
        check_question_modality(self.question_modality)
        tokenizer = self.processor.tokenizer
        token = end_of_turn_token(tokenizer)
        if token is None:
            raise UserError("the tokenizer's chat template writes no special token after an answer: the collator "
                            "needs a chat tokenizer that marks the end of a turn (e.g. <|im_end|>)")
        self.end_of_turn_id = tokenizer.convert_tokens_to_ids(token)
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token: run surgvqa.tokenizer.repair_tokenizer first")
        if not self.fps or self.fps <= 0:
            raise UserError(f"fps must be > 0, got {self.fps!r}")
        if self.video_fps is not None and self.video_fps <= 0:
            raise UserError(f"video_fps must be > 0 (the source video's frame rate) or None, got {self.video_fps!r}")
        #: the family's encoder (``processing.py``): processor call, pixel budget, clock, token counts
        self.processing = processing_for(
            self.processor, frames_as=self.frames_as, frame_size=self.frame_size, max_pixels=self.max_pixels,
            min_pixels=self.min_pixels, fps=self.fps, token_kept_ratio=self.token_kept_ratio)

    def frame_hw(self, width: int, height: int) -> tuple[int, int]:
        """``(height, width)`` a source frame of ``width x height`` reaches the processor with (the dataset's resize)."""
        w, h = self.processing.budget.target_size(width, height)
        return h, w

    def prompt_text(self, question: str, num_frames: int, answer: str | None = None,
                    question_modality: str | None = None) -> str:
        modality = question_modality or self.question_modality
        key = (question, num_frames, answer, modality)
        text = self._prompts.get(key)
        if text is None:
            text = _remember(self._prompts, key, self._render_prompt(question, num_frames, answer, modality))
        return text

    def _render_prompt(self, question: str, num_frames: int, answer: str | None, question_modality: str) -> str:
        messages = build_messages(
            question,
            answer,
            question_modality=question_modality,
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
    def __call__(self, items: list[dict]) -> dict[str, Any]:
        """A batch of dataset items; items carrying their ``encoding`` (:mod:`surgvqa.encoded`) are assembled, the
        others encoded together first. Training items' dataset ``index`` becomes ``media_ids`` (kept tower outputs)."""
        samples = [item["sample"] for item in items]
        if any("encoding" in item for item in items):
            raw = [item for item in items if "encoding" not in item]
            fresh = iter((self.encode_items(raw) or []) if raw else [])
            parts = [item["encoding"] if "encoding" in item else next(fresh, None) for item in items]
            if None in parts:
                raise RuntimeError("the processor output cannot be split per item, yet some items came encoded")
            rows, encoded = self.processing.assemble(parts)
        else:
            rows, encoded = self._encode(items)
        batch = self._finish(samples, [list(row) for row in rows], encoded)
        if self.mode == "train" and items and all("index" in item for item in items):
            batch["media_ids"] = torch.tensor([item["index"] for item in items], dtype=torch.long)
        return batch

    def encode_items(self, items: list[dict]) -> list[dict] | None:
        """Each item's encoding (its prompt ids and its own media tensors), from one processor call for all of them;
        None when the family's processor output cannot be split per item."""
        return self.processing.split(*self._encode(items), [len(item["frames"]) for item in items])

    def _encode(self, items: list[dict]) -> tuple[list[list[int]], dict[str, Any]]:
        """The family's encoder, once for the batch: each item's prompt ids (unpadded) and the media tensors."""
        prompts, clips, times, audios = [], [], [], []
        for item in items:
            frames = item["frames"]
            if not frames:
                raise UserError(f"{item['sample'].key}: no frames")
            prompts.append(self.prompt_text(item["sample"].question, len(frames)))
            clips.append(frames)
            times.append(frame_times(item, self.fps, self.video_fps))
            if "audio" in self.question_modality:
                if item.get("audio") is None:
                    raise UserError(f"{item['sample'].key}: question_modality {self.question_modality!r} needs audio")
                audios.append(np.asarray(item["audio"], dtype=np.float32))
        return self.processing.encode(prompts, clips, times, audios or None)

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

        side = "left" if self.mode == "generate" else "right"

        def pad(seqs: list[list[int]], value: int) -> torch.Tensor:
            return pad_sequence([torch.tensor(s, dtype=torch.long) for s in seqs], batch_first=True,
                                padding_value=value, padding_side=side)

        batch: dict[str, Any] = {"input_ids": pad(rows, self.processor.tokenizer.pad_token_id),
                                 "attention_mask": pad([[1] * len(r) for r in rows], 0), **encoded}
        if self.mode == "train":
            batch["labels"] = pad(labels, IGNORE_INDEX)
        else:
            batch["keys"] = [s.key for s in samples]
        return batch

    # -- length pre-flight ---------------------------------------------------------------------------------
    def token_counts(self, question: str, answer: str, frame_hw: tuple[int, int], num_frames: int,
                     audio_samples: int | None, frame_times: list[float] | None = None) -> dict[str, int]:
        """Tokens a sample will take, split by kind (``video``, ``image``, ``audio``, ``text``, ``answer`` -- the
        labelled answer tokens, part of ``text`` in training -- and ``total``), from frame size and audio length
        alone (no decoding).

        The vision part is what the family's processor makes of stand-in frames of that shape and clock
        (``vision_tokens``): placeholders and whatever text it writes around them (Qwen3-VL's frame timestamps),
        never re-derived from its formatting. Audio tokens are the count the processor exposes."""
        prompt = len(self.processor.tokenizer(self.prompt_text(question, num_frames),
                                              add_special_tokens=False)["input_ids"])
        stand_in = self.prompt_text("?", num_frames, question_modality="text")
        vision = self.processing.vision_tokens(stand_in, tuple(frame_hw), num_frames,
                                               tuple(frame_times) if frame_times else None)
        video = kept_video_tokens(vision["video"], self.token_kept_ratio) if vision["video"] else 0
        with_audio = audio_samples is not None and "audio" in self.question_modality
        audio = self.processing.audio_tokens(audio_samples) if with_audio else 0
        answer_tokens = len(self.answer_ids(answer)) if self.mode == "train" else 0
        # the audio placeholder of the prompt becomes `audio` tokens; the vision placeholders became vision["added"]
        total = prompt + vision["added"] - (vision["video"] - video) + (audio - 1 if with_audio else 0) + answer_tokens
        return {"video": video, "image": vision["image"], "audio": audio,
                "text": total - video - vision["image"] - audio, "answer": answer_tokens, "total": total}

    def sequence_length(self, question: str, answer: str, frame_hw: tuple[int, int], num_frames: int,
                        audio_samples: int | None, frame_times: list[float] | None = None) -> int:
        """Tokens a sample will take, from frame size and audio length alone (no decoding)."""
        return self.token_counts(question, answer, frame_hw, num_frames, audio_samples, frame_times)["total"]


def _remember(memo: dict, key, value, limit: int = 1 << 16):
    """``value``, kept in ``memo`` under ``key`` while it holds fewer than ``limit`` entries."""
    if len(memo) < limit:
        memo[key] = value
    return value
