"""How a sample becomes model input: one :class:`Preprocessing` record, declared once.

Every preprocessing setting is a field here, with its default and its help text. Training's flags
(:class:`~surgvqa.arguments.DataArguments` subclasses it), evaluation's overrides (:data:`PreprocessingOverrides`,
the same fields defaulting to "as recorded"), the planner's flags, ``surgvqa_config.json`` (``preprocessing``), the
predictions meta line and its resume / summary fields are all derived from :func:`dataclasses.fields`, so a new
setting is one field below.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from surgvqa.errors import UserError
from surgvqa.media import MediaConfig, PixelBudget
from surgvqa.prompts import DEFAULT_SYSTEM_PROMPT, check_question_modality

#: how frames reach the processor: one video (temporal merging) or separate images
FRAMES_AS = ("video", "images")
#: the frame rate extracted frames are assumed to have when none is recorded (sets the video's rope timing)
DEFAULT_FPS = 2.0


@dataclass
class Preprocessing:
    """The preprocessing of a run: recorded whole in ``surgvqa_config.json``, overridable field by field at
    evaluation (``dataclasses.replace(recorded, **given)``). Each field's metadata holds its flag's help only
    (HfArgumentParser passes metadata on to ``add_argument``)."""

    frame_path_template: str = field(default=MediaConfig.frame_path_template, metadata={
        "help": "frame file below the frames root ({video_id}, {frame}, {id})"})
    audio_path_template: str = field(default=MediaConfig.audio_path_template, metadata={
        "help": "spoken-question file below the audio root ({video_id}, {id})"})
    frame_size: int = field(default=MediaConfig.frame_size, metadata={
        "help": "longest frame edge in pixels, on the vision grid (ignored with --max_pixels)"})
    max_pixels: int | None = field(default=None, metadata={
        "help": "pixel budget per frame, a pixel count (e.g. 147456 = 384*384): transformers' smart_resize keeps the "
                "aspect ratio, grid-aligned edges and w*h <= max_pixels; replaces --frame_size"})
    min_pixels: int | None = field(default=None, metadata={
        "help": "smallest frame in pixels (smaller frames are enlarged); default one grid cell"})
    max_train_frames: int | None = field(default=None, metadata={
        "help": "frames per training clip: evenly spaced, first and last kept (default: all listed)"})
    max_eval_frames: int | None = field(default=None, metadata={
        "help": "frames per evaluation clip (default: the training frame count)"})
    num_video_frames: int = field(default=MediaConfig.num_video_frames, metadata={
        "help": "frames decoded per clip from a line naming a video file (evenly spaced)"})
    question_modality: str = field(default=MediaConfig.question_modality, metadata={
        "help": "text | audio | text+audio"})
    frames_as: str = field(default=FRAMES_AS[0], metadata={"help": "video (temporal merging) | images"})
    fps: float = field(default=DEFAULT_FPS, metadata={
        "help": "rate (frames per second) at which the frames listed on a line were sampled; sets the video clock "
                "(M-RoPE time step) of lines without frame_numbers, or without --video_fps"})
    video_fps: float | None = field(default=None, metadata={
        "help": "frame rate of the source videos: with it, a line's frame_numbers / video_fps give each kept frame's "
                "time, so any subsample keeps the true clock (e.g. 30 for 30-fps recordings)"})
    token_kept_ratio: float = field(default=1.0, metadata={
        "help": "video token merging: each video enters the language model as ceil(r x n) tokens, similar tokens "
                "averaged (0 < r <= 1; 1.0 = off); recorded, so evaluation uses it too"})
    system_prompt: str = field(default=DEFAULT_SYSTEM_PROMPT, metadata={
        "help": "the system turn of every prompt"})

    def check(self, error: type[UserError] = UserError, where: str = "") -> None:
        """Refuse an invalid value or combination (``where`` prefixes the message: a file, for a record)."""
        at = f"{where}: " if where else ""
        try:
            check_question_modality(self.question_modality, f"{at}--question_modality")
            PixelBudget(self.frame_size, self.max_pixels, self.min_pixels)
        except UserError as err:
            raise error(str(err)) from None
        if self.frames_as not in FRAMES_AS:
            raise error(f"{at}--frames_as must be one of {', '.join(FRAMES_AS)}; got {self.frames_as!r}")
        for name in ("max_train_frames", "max_eval_frames", "num_video_frames"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise error(f"{at}--{name} must be >= 1, got {value}")
        if self.fps <= 0 or (self.video_fps is not None and self.video_fps <= 0):
            raise error(f"{at}--fps and --video_fps must be > 0, got {self.fps} and {self.video_fps}")
        if not 0.0 < self.token_kept_ratio <= 1.0:
            raise error(f"{at}--token_kept_ratio must be in (0, 1] (1.0: no merging); got {self.token_kept_ratio}")
        if self.token_kept_ratio < 1.0 and self.frames_as != "video":
            raise error(f"{at}--token_kept_ratio {self.token_kept_ratio:g} merges the tokens of a video: it needs "
                        f"--frames_as video (frames reach the model as {self.frames_as}), or --token_kept_ratio 1.0")

    @classmethod
    def of(cls, values: Any) -> Preprocessing:
        """The Preprocessing part of an object holding its fields (parsed training flags, say)."""
        return cls(**{name: getattr(values, name) for name in field_names()})

    def media_config(self, frames_dir: str | None, audio_dir: str | None, *, train: bool = False,
                     ablate: str | None = None) -> MediaConfig:
        """The :class:`MediaConfig` of this preprocessing, with the given media roots."""
        return MediaConfig(
            frames_dir=frames_dir, audio_dir=audio_dir, frame_path_template=self.frame_path_template,
            audio_path_template=self.audio_path_template, frame_size=self.frame_size, max_pixels=self.max_pixels,
            min_pixels=self.min_pixels, max_frames=self.max_train_frames if train else self.max_eval_frames,
            num_video_frames=self.num_video_frames, question_modality=self.question_modality, ablate=ablate,
        )

    def collator_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``VQACollator`` that must match training (prompt, frames, audio, token merging)."""
        names = ("question_modality", "frame_size", "frames_as", "fps", "video_fps", "max_pixels", "min_pixels",
                 "system_prompt", "token_kept_ratio")
        return {name: getattr(self, name) for name in names}


def field_names(but: tuple[str, ...] = ()) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(Preprocessing) if f.name not in but)


def _overrides() -> type:
    """Every field of :class:`Preprocessing`, optional and defaulting to None (= as recorded)."""
    hints = typing.get_type_hints(Preprocessing)
    specs = [(f.name, hints[f.name] | None,
              field(default=None, metadata={"help": f"{f.metadata['help']}. Default: as recorded"}))
             for f in dataclasses.fields(Preprocessing)]
    overrides = dataclasses.make_dataclass("PreprocessingOverrides", specs)
    overrides.__module__ = __name__
    return overrides


#: evaluation's preprocessing flags: each field of Preprocessing, None meaning "as the checkpoint recorded"
PreprocessingOverrides = _overrides()

__all__ = ["DEFAULT_FPS", "FRAMES_AS", "Preprocessing", "PreprocessingOverrides", "field_names"]
