"""What a Qwen-style processor makes of dataset items: model inputs (``encode``) and token counts, asked of the
processor itself. Every processor detail the toolkit needs (vision grid, temporal patch, placeholders, audio window,
video clock, output keys) is read here; a family's ``processing.py`` names the clock key its processor writes."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from surgvqa.backbones.common.token_merging import kept_video_tokens, merge_placeholders
from surgvqa.errors import UserError
from surgvqa.media import PixelBudget

logger = logging.getLogger(__name__)

#: the largest stand-in clip the length pre-flight builds (a bound on absurd frame counts, not a model limit)
_STAND_IN_BYTES = 1 << 30
_AUDIO_KEYS = ("input_features", "feature_attention_mask")


def vision_grid(processor) -> int:
    """Pixels per side of one vision token: the patch size times the spatial merge of ``processor``'s video (else
    image) processor, or of ``processor`` itself. 28 for Qwen2-VL, Qwen2.5-VL and Qwen2.5-Omni, 32 for Qwen3-VL."""
    for part in (processor, getattr(processor, "video_processor", None), getattr(processor, "image_processor", None)):
        patch = getattr(part, "patch_size", None)
        if isinstance(patch, int) and patch > 0:
            return patch * int(getattr(part, "merge_size", 1) or 1)
    raise UserError(f"{type(processor).__name__} has no vision patch size: not a Qwen-style vision processor")


def second_per_grid(times: Sequence[float], temporal_patch_size: int, fps: float) -> float:
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


class QwenProcessing:
    """A Qwen-style processor with one run's settings: frames as a video or as images, the pixel budget, the
    assumed frame rate and the token merging ratio (video placeholders cut to ``ceil(r * n)``)."""

    #: the keys under which the processor writes each video's clock (seconds per temporal grid step)
    clock_keys: tuple[str, ...] = ("video_second_per_grid", "second_per_grid_ts")

    def __init__(self, processor, *, frames_as: str = "video", frame_size: int = 384, max_pixels: int | None = None,
                 min_pixels: int | None = None, fps: float = 2.0, token_kept_ratio: float = 1.0):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.frames_as = frames_as
        self.fps = fps
        self.token_kept_ratio = token_kept_ratio
        #: the vision grid in pixels: patch x spatial merge (28 for Qwen2/2.5, 32 for Qwen3)
        self.grid = vision_grid(processor)
        self.budget = PixelBudget(frame_size, max_pixels, min_pixels, self.grid)
        self.video_token_id = self._token_id("video_token")
        self.image_token_id = self._token_id("image_token")
        self._warned_odd = False
        self._vision_counts: dict = {}
        kept_video_tokens(1, token_kept_ratio)  # (0, 1]
        if token_kept_ratio != 1.0 and frames_as != "video":
            raise UserError("token_kept_ratio < 1 merges the tokens of a video: it needs frames_as='video'")
        if token_kept_ratio != 1.0 and self.video_token_id is None:
            raise UserError(f"{type(processor).__name__} names no video placeholder token: token merging "
                            "needs a Qwen-style video processor")

    def _token_id(self, name: str) -> int | None:
        token = getattr(self.processor, name, None)
        return None if token is None else self.tokenizer.convert_tokens_to_ids(token)

    @property
    def _vision_part(self):
        return self.processor.image_processor if self.frames_as == "images" else self.processor.video_processor

    @property
    def temporal_patch_size(self) -> int:
        return int(getattr(self.processor.video_processor, "temporal_patch_size", 1) or 1)

    @property
    def patches_per_token(self) -> int:
        """Vision patches merged into one vision token (spatial merge squared)."""
        merge = int(getattr(self._vision_part, "merge_size", 1) or 1)
        return merge * merge

    def video_fill(self) -> tuple[int, int, int]:
        """The uint8 RGB colour that the processor normalises to (about) zero: its normalisation mean."""
        part = self._vision_part
        mean = getattr(part, "image_mean", None)
        scale = getattr(part, "rescale_factor", 1 / 255) if getattr(part, "do_rescale", True) else 1.0
        if mean is None or len(mean) != 3:
            raise UserError(f"{type(part).__name__} has no 3-channel image_mean; --ablate video cannot pick its fill")
        return tuple(int(round(min(255.0, max(0.0, m / scale)))) for m in mean)

    @property
    def takes_audio(self) -> bool:
        """Whether the processor has an audio feature extractor (the model an audio tower)."""
        return getattr(self.processor, "feature_extractor", None) is not None

    def audio_tokens(self, samples: int) -> int:
        """Audio tokens a clip of ``samples`` (16 kHz) becomes: the count the processor exposes."""
        counter = getattr(self.processor, "_get_num_multimodal_tokens", None)
        tokens = getattr(counter(audio_lengths=[samples]), "num_audio_tokens", None) if counter else None
        if not tokens:
            raise UserError(f"{type(self.processor).__name__} does not count audio tokens: this model family takes "
                            "no spoken questions; use --question_modality text")
        return int(tokens[0])

    # -- encode -----------------------------------------------------------------------------------------------
    def _frames_for_video(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        """Qwen merges frames in pairs: an odd count gets its last frame repeated, deliberately and once logged."""
        pad = -len(frames) % self.temporal_patch_size
        if pad:
            if not self._warned_odd:
                logger.warning("%d frames is not a multiple of the temporal patch (%d): repeating the last frame",
                               len(frames), self.temporal_patch_size)
                self._warned_odd = True
            frames = list(frames) + [frames[-1]] * pad
        return list(frames)

    def _on_grid(self, frame: np.ndarray) -> bool:
        """Frame already what the pixel budget makes of it (on the vision grid, within budget)."""
        h, w = frame.shape[:2]
        return self.budget.on_grid(w, h)

    def encode(self, prompts: list[str], clips: list[list[np.ndarray]], times: list[list[float]],
               audios: list[np.ndarray] | None = None, merge_video: bool = True
               ) -> tuple[list[list[int]], dict[str, Any]]:
        """The processor, once for the batch: each prompt's ids (unpadded; with ``merge_video``, video
        placeholders cut for token merging) and the media tensors. ``clips[i]`` are prompt ``i``'s frames,
        ``times[i]`` when each was shot."""
        kwargs: dict[str, Any] = {"text": prompts, "return_tensors": "pt", "padding": True}
        size = {"size": self.budget.processor_size()}  # always explicit: class-level defaults would upscale
        clocks = []
        if self.frames_as == "video":
            videos = [self._frames_for_video(frames) for frames in clips]
            clocks = [second_per_grid(t, self.temporal_patch_size, self.fps) for t in times]
            kwargs["videos"] = videos
            kwargs["videos_kwargs"] = {
                # fps: the rate the processor assumes for the first video (Qwen3-VL writes frame timestamps from
                # it); every video's own clock replaces the processor's below
                **size, "do_sample_frames": False, "cap_pixels_per_frame": False,
                "fps": self.temporal_patch_size / clocks[0],
                # frames already on the vision grid within the budget (the dataset resized them): no second resize
                "do_resize": not all(self._on_grid(video[0]) for video in videos),
            }
        else:
            kwargs["images"] = [frame for frames in clips for frame in frames]
            kwargs["images_kwargs"] = size
        if audios:
            kwargs["audio"] = audios
            # Pad to the longest clip of this batch, not to Whisper's 30 s window, plus half an STFT window: padded
            # to exactly its length, the longest clip would lose its last partial frame (one audio token fewer than
            # in a batch with a longer clip) and its last frame would see reflected samples instead of zeros.
            longest = max(len(a) for a in audios)
            kwargs["audio_kwargs"] = {"max_length": longest + self.processor.feature_extractor.n_fft // 2,
                                      "truncation": False}
        encoded = self.processor(**kwargs)
        for key in self.clock_keys:
            if clocks and key in encoded:
                encoded[key] = torch.tensor(clocks, dtype=torch.as_tensor(encoded[key]).dtype)
        if audios:  # drop the all-padding tail: every clip keeps ceil(samples / hop) frames, as at 30 s
            frames = int(encoded["feature_attention_mask"].sum(-1).max())
            encoded["input_features"] = encoded["input_features"][..., :frames]
            encoded["feature_attention_mask"] = encoded["feature_attention_mask"][:, :frames]
        # Un-pad the prompts (the processor padded on the left); the collator pads its own way.
        mask = encoded.pop("attention_mask").bool()
        padded = encoded.pop("input_ids")
        rows = [padded[i][mask[i]].tolist() for i in range(len(prompts))]
        grid = encoded.get("video_grid_thw")
        if merge_video and self.token_kept_ratio != 1.0 and grid is not None:  # each video's run of n placeholders cut to ceil(r n)
            counts = (grid.prod(-1) // self.patches_per_token).tolist()
            rows = merge_placeholders(rows, self.video_token_id, counts, self.token_kept_ratio)
        return rows, dict(encoded)

    # -- token counts -----------------------------------------------------------------------------------------
    def vision_tokens(self, prompt: str, frame_hw: tuple[int, int], num_frames: int,
                      frame_times: tuple[float, ...] | None) -> dict[str, int]:
        """``video`` / ``image`` placeholder tokens (before merging) and all tokens (``added``) the processor adds
        to ``prompt`` (written for ``num_frames`` frames) for frames of ``frame_hw`` at this clock: one processor
        call on stand-in frames, cached per shape."""
        key = (prompt, frame_hw, num_frames, frame_times)
        if key in self._vision_counts:
            return self._vision_counts[key]
        h, w = frame_hw
        if num_frames * h * w * 3 > _STAND_IN_BYTES:  # beyond any model's length: the processor's own count
            return self._exposed_vision_tokens(frame_hw, num_frames)
        times = list(frame_times) if frame_times else [i / self.fps for i in range(num_frames)]
        rows, _ = self.encode([prompt], [[np.zeros((h, w, 3), dtype=np.uint8)] * num_frames], [times],
                              merge_video=False)
        row = torch.tensor(rows[0])
        counts = {kind: int((row == token).sum()) if token is not None else 0
                  for kind, token in (("video", self.video_token_id), ("image", self.image_token_id))}
        counts["added"] = len(rows[0]) - len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if len(self._vision_counts) < 1024:
            self._vision_counts[key] = counts
        return counts

    def _exposed_vision_tokens(self, frame_hw: tuple[int, int], num_frames: int) -> dict[str, int]:
        """Placeholder tokens for a clip too large to stand in for (more than 1 GiB of pixels): the count the
        processor exposes, without the text it writes around them -- a lower bound, far beyond any model's length."""
        size = {"size": self.budget.processor_size()}
        if self.frames_as == "video":
            num_frames += -num_frames % self.temporal_patch_size
            counts = self.processor._get_num_multimodal_tokens(video_sizes=[(num_frames, *frame_hw)],
                                                               videos_kwargs=size)
            video, image = sum(counts.num_video_tokens), 0
        else:
            counts = self.processor._get_num_multimodal_tokens(image_sizes=[frame_hw] * num_frames,
                                                               images_kwargs=size)
            video, image = 0, sum(counts.num_image_tokens)
        placeholders = 1 if self.frames_as == "video" else num_frames
        return {"video": video, "image": image, "added": video + image - placeholders}

    # -- one item's share of a batch (item encodings kept by surgvqa.encoded) -----------------------------
    @property
    def _row_keys(self) -> tuple[str, ...]:
        return ("pixel_values_videos", "video_grid_thw", *self.clock_keys, "pixel_values", "image_grid_thw")

    def split(self, rows: list[list[int]], encoded: dict[str, Any], frames: list[int]) -> list[dict] | None:
        """Each item's share of a batch encoding: its prompt ids, its rows of pixel values and grids, its audio
        features without the batch's padding. None when ``encoded`` holds anything not known to be per item."""
        if set(encoded) - set(self._row_keys) - set(_AUDIO_KEYS):
            return None
        parts: list[dict] = [{"ids": tuple(row), "tensors": {}} for row in rows]
        if "video_grid_thw" in encoded:  # one video per item
            starts = np.cumsum([0, *encoded["video_grid_thw"].prod(-1).tolist()])
            for i, part in enumerate(parts):
                part["tensors"]["pixel_values_videos"] = encoded["pixel_values_videos"][starts[i]:starts[i + 1]].clone()
                for key in ("video_grid_thw", *self.clock_keys):
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
            for i, part in enumerate(parts):
                part["tensors"]["input_features"] = encoded["input_features"][i, :, :lengths[i]].clone()
                part["mask_dtype"] = encoded["feature_attention_mask"].dtype
        return parts

    def assemble(self, parts: list[dict]) -> tuple[list[tuple[int, ...]], dict[str, Any]]:
        """A batch encoding rebuilt from kept items: rows concatenated; audio features padded with zeros to the
        longest clip of the batch (the feature mask marks the padding, and the audio towers read only the frames it
        marks, so the model sees what it sees from a batch the processor made)."""
        encoded: dict[str, Any] = {}
        for key in self._row_keys:
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


__all__ = ["QwenProcessing", "second_per_grid", "vision_grid"]
