"""``surgvqa_config.json``: the typed, versioned record of how a run was trained, so every later step agrees.

Training writes one into its output directory and into every checkpoint; evaluation and merging read it back
through :class:`RunConfig`, and no other module parses the file or repeats a default. Reading validates: an unknown
key (a typo) or a missing required key is an error naming the key and the file; a value of the wrong type too.

Adding a setting is one line: a field with a default (on :class:`MediaSettings` for preprocessing, on
:class:`RunConfig` otherwise). A field with a default is optional on read, so files written before it existed still
read, with that default; fields without one are required.

Schema versions (``schema_version``; :data:`MIGRATIONS` turns an older file into the current layout on read):

* 0 — files without ``schema_version`` (surgvqa 0.1.0). Same keys as version 1; training outputs written before the
  data roots were recorded lack ``train_data_path`` … ``eval_audio_dir`` (read as unknown: ``None``).
* 1 — ``schema_version`` and ``base_model_relative`` (the base model's path relative to the checkpoint directory,
  used when the recorded absolute path no longer exists because both were moved).
* 2 — ``inputs`` (fingerprints of the data, media and base model a training run read; see
  :func:`surgvqa.rundir.input_fingerprints`) and ``data_changes``. A version-1 training output reads with
  ``inputs`` unknown (``None``): it is still resumed, without the data check.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgvqa.errors import UserError
from surgvqa.media import MediaConfig
from surgvqa.prompts import DEFAULT_SYSTEM_PROMPT, check_question_modality

logger = logging.getLogger(__name__)

CONFIG_NAME = "surgvqa_config.json"
SCHEMA_VERSION = 2
#: how frames reach the processor: one video (temporal merging) or separate images
FRAMES_AS = ("video", "images")
#: the frame rate extracted frames are assumed to have when none is recorded (sets the video's rope timing)
DEFAULT_FPS = 2.0
DEFAULT_MODEL_MAX_LENGTH = 4096
#: the preprocessing a checkpoint without surgvqa_config.json must be told (or allowed to default)
PREPROCESSING_FLAGS = ("frame_size", "question_modality", "frames_as")
#: what only a training output records (a merged checkpoint keeps them per stage, in ``merged_from``)
TRAINING_FIELDS = ("lora", "quantization", "resized_vocab", "original_vocab_rows")


class RunConfigError(UserError):
    """A surgvqa_config.json that is missing, malformed, of a newer schema, or has unknown/missing keys."""


@dataclass
class MediaSettings:
    """The ``media`` block: how a sample's frames and audio become model input, in training and evaluation."""

    frame_path_template: str
    audio_path_template: str
    frame_size: int
    max_train_frames: int | None
    max_eval_frames: int | None
    question_modality: str
    frames_as: str
    #: frames per second of the frames a line lists (the video clock of lines without frame_numbers / video_fps)
    fps: float
    #: the source video's frame rate: a kept frame's time is its frame_numbers entry / video_fps
    video_fps: float | None = None
    #: pixel-count budget per frame (smart_resize); replaces frame_size when set
    max_pixels: int | None = None
    min_pixels: int | None = None

    @classmethod
    def defaults(cls, **given: Any) -> MediaSettings:
        """The toolkit's defaults (those of :class:`~surgvqa.media.MediaConfig`), with ``given`` values on top."""
        values = {
            "frame_path_template": MediaConfig.frame_path_template,
            "audio_path_template": MediaConfig.audio_path_template,
            "frame_size": MediaConfig.frame_size,
            "max_train_frames": None,
            "max_eval_frames": None,
            "question_modality": MediaConfig.question_modality,
            "frames_as": FRAMES_AS[0],
            "fps": DEFAULT_FPS,
        }
        values.update({k: v for k, v in given.items() if v is not None})
        return cls(**values)

    def check(self, where: str) -> None:
        try:
            check_question_modality(self.question_modality, f"{where}: media.question_modality")
        except UserError as err:
            raise RunConfigError(str(err)) from None
        if self.frames_as not in FRAMES_AS:
            raise RunConfigError(f"{where}: media.frames_as must be one of {FRAMES_AS}, got {self.frames_as!r}")


@dataclass
class RunConfig:
    """One run's settings, as written to ``surgvqa_config.json`` (see the module docstring for the rules)."""

    surgvqa_version: str
    backbone: str
    #: the model the adapter was trained on (absolute when it was a local directory)
    base_model: str
    media: MediaSettings
    system_prompt: str
    model_max_length: int
    dtype: str
    tokenizer_repair: list[str]
    train_data_path: str | None
    eval_data_path: str | None
    frames_dir: str | None
    audio_dir: str | None
    eval_frames_dir: str | None
    eval_audio_dir: str | None
    schema_version: int = SCHEMA_VERSION
    base_model_relative: str | None = None
    #: video token merging: each video enters the language model as ceil(r x n) tokens (1.0: off)
    token_kept_ratio: float = 1.0
    # -- a training output (None in a merged checkpoint)
    lora: dict[str, Any] | None = None
    quantization: str | None = None
    resized_vocab: int | None = None
    original_vocab_rows: int | None = None
    # -- kept in a merged checkpoint too (there: those of the last adapter merged)
    #: the TrainingArguments that change what a training run computes (learning rate, steps, batch, seed)
    training: dict[str, Any] | None = None
    # -- backbone-specific record (the Qwen-VL + Whisper graft: stage, encoder, projector)
    graft: dict[str, Any] | None = None
    # -- a merged checkpoint (written by surgvqa.merge)
    merged_from: list[dict[str, Any]] | None = None
    vocab_rows: int | None = None
    full_omni: bool | None = None
    merged_with: str | None = None
    merge_verification: dict[str, Any] | None = None
    # -- the decoded-frame cache a training run used ({"mode": "none"|"memory"|"disk", "dir": path or None});
    #    evaluation reuses a disk cache that still exists
    frame_cache: dict[str, Any] | None = None
    # -- what a training run read (compared when it is resumed) and the changes a resume was allowed to make
    inputs: dict[str, Any] | None = None
    data_changes: list[dict[str, Any]] | None = None

    # ----------------------------------------------------------------------------------------------- reading
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "surgvqa_config.json") -> RunConfig:
        """Validate ``raw`` (migrating an older schema first) into a RunConfig; errors name the key and source."""
        if not isinstance(raw, Mapping):
            raise RunConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        raw = dict(raw)
        version = raw.get("schema_version", 0)
        if not isinstance(version, int) or version < 0:
            raise RunConfigError(f"{source}: schema_version must be a whole number, got {version!r}")
        if version > SCHEMA_VERSION:
            raise RunConfigError(
                f"{source}: schema_version {version} was written by a newer surgvqa (this one reads up to "
                f"{SCHEMA_VERSION}); upgrade surgvqa"
            )
        while version < SCHEMA_VERSION:
            raw = MIGRATIONS[version](raw)
            version += 1
            raw["schema_version"] = version
        config = _build(cls, raw, source, "")
        config.media.check(source)
        return config

    @classmethod
    def find(cls, directory: str | Path) -> RunConfig | None:
        """The RunConfig of a checkpoint directory, or None when it has no surgvqa_config.json."""
        file = Path(directory) / CONFIG_NAME
        if not file.is_file():
            return None
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RunConfigError(f"{file}: not valid JSON ({err}); restore it from the training output") from err
        return cls.from_dict(raw, str(file))

    @classmethod
    def read(cls, directory: str | Path) -> RunConfig:
        """Like :meth:`find`, but a missing file is an error."""
        config = cls.find(directory)
        if config is None:
            raise RunConfigError(f"{Path(directory) / CONFIG_NAME} not found: {directory} is not a surgvqa "
                                 "training output (train_vqa.py writes this file)")
        return config

    # ----------------------------------------------------------------------------------------------- writing
    def to_dict(self) -> dict[str, Any]:
        """The JSON record: every required key; optional keys when set; :data:`TRAINING_FIELDS` always in a
        training output and never in a merged checkpoint."""
        record = dataclasses.asdict(self)
        merged = self.merged_from is not None
        for spec in dataclasses.fields(self):
            name = spec.name
            if (merged and name in TRAINING_FIELDS) or (
                spec.default is None and record[name] is None and (merged or name not in TRAINING_FIELDS)
            ):
                del record[name]
        optional = {f.name for f in dataclasses.fields(MediaSettings) if f.default is None}
        record["media"] = {k: v for k, v in record["media"].items() if not (k in optional and v is None)}
        return record

    def write(self, directory: str | Path) -> Path:
        """Write ``directory/surgvqa_config.json``; ``base_model_relative`` is computed for that directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        relative = None
        if Path(self.base_model).is_absolute():
            relative = os.path.relpath(self.base_model, directory.resolve())
        record = dataclasses.replace(self, base_model_relative=relative, schema_version=SCHEMA_VERSION)
        file = directory / CONFIG_NAME
        file.write_text(json.dumps(record.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return file

    # ------------------------------------------------------------------------------------------------- using
    def media_config(self, frames_dir: str | None, audio_dir: str | None, *, train: bool = False,
                     ablate: str | None = None) -> MediaConfig:
        """The :class:`MediaConfig` for this run's preprocessing, with the given media roots."""
        return media_config(self.media, frames_dir, audio_dir, train=train, ablate=ablate)

    def collator_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``VQACollator`` that must match training (prompt, frames, audio, token merging)."""
        return collator_kwargs(self.media, self.system_prompt, self.token_kept_ratio)

    def resolve_base_model(self, directory: str | Path) -> str | None:
        """The base model directory: the recorded path when it exists, else the same position relative to
        ``directory`` (both moved together), else None."""
        return resolve_recorded_path(self.base_model, directory, self.base_model_relative)


def media_config(media: MediaSettings, frames_dir: str | None, audio_dir: str | None, *, train: bool = False,
                 ablate: str | None = None) -> MediaConfig:
    return MediaConfig(
        frames_dir=frames_dir,
        audio_dir=audio_dir,
        frame_path_template=media.frame_path_template,
        audio_path_template=media.audio_path_template,
        frame_size=media.frame_size,
        max_pixels=media.max_pixels,
        min_pixels=media.min_pixels,
        max_frames=media.max_train_frames if train else media.max_eval_frames,
        question_modality=media.question_modality,
        ablate=ablate,
    )


def collator_kwargs(media: MediaSettings, system_prompt: str, token_kept_ratio: float = 1.0) -> dict[str, Any]:
    return {
        "question_modality": media.question_modality,
        "frame_size": media.frame_size,
        "frames_as": media.frames_as,
        "fps": media.fps,
        "video_fps": media.video_fps,
        "max_pixels": media.max_pixels,
        "min_pixels": media.min_pixels,
        "system_prompt": system_prompt,
        "token_kept_ratio": token_kept_ratio,
    }


def resolve_recorded_path(recorded: str | None, directory: str | Path, relative: str | None = None) -> str | None:
    """A path recorded in a checkpoint, as it exists now: absolute and existing as recorded; else ``relative``
    (or a relative ``recorded``) taken from ``directory``; else from the working directory. None if none exists."""
    if not recorded:
        return None
    candidates = [Path(recorded)] if Path(recorded).is_absolute() else []
    for rel in (relative, None if Path(recorded).is_absolute() else recorded):
        if rel:
            candidates.append(Path(directory) / rel)
    if not Path(recorded).is_absolute():
        candidates.append(Path(recorded))
    for candidate in candidates:
        if candidate.exists():
            found = str(candidate.resolve())
            if found != str(Path(recorded)):
                logger.info("recorded path %s found as %s", recorded, found)
            return found
    return None


# ----------------------------------------------------------------------------- a checkpoint without a record
@dataclass
class EvalPreprocessing:
    """What evaluation feeds the model, and where it came from (recorded in the summary)."""

    media: MediaSettings
    system_prompt: str
    #: "surgvqa_config.json" | "flags" | "defaults"
    source: str
    #: video token merging (as trained unless overridden; see :func:`eval_token_kept_ratio`)
    token_kept_ratio: float = 1.0

    def media_config(self, frames_dir: str | None, audio_dir: str | None, ablate: str | None = None) -> MediaConfig:
        return media_config(self.media, frames_dir, audio_dir, ablate=ablate)

    def collator_kwargs(self) -> dict[str, Any]:
        return collator_kwargs(self.media, self.system_prompt, self.token_kept_ratio)


def eval_token_kept_ratio(config: RunConfig | None, flag: float | None) -> float:
    """The token merging evaluation uses: ``flag`` when given, else what training recorded (1.0 without a record).
    A value different from the recorded one is logged: the model then sees videos as it was not trained to."""
    recorded = config.token_kept_ratio if config is not None else 1.0
    if flag is None:
        return recorded
    if not 0.0 < flag <= 1.0:
        raise UserError(f"--token_kept_ratio must be in (0, 1] (1.0: no merging); got {flag}")
    if flag != recorded:
        logger.warning("--token_kept_ratio %g overrides the %g the checkpoint was trained with", flag, recorded)
    return float(flag)


def eval_preprocessing(config: RunConfig | None, flags: Mapping[str, Any], *, checkpoint: str | Path,
                       allow_defaults: bool = False, token_kept_ratio: float | None = None) -> EvalPreprocessing:
    """The recorded preprocessing with the flags given (not None) on top.

    ``flags`` holds MediaSettings field names; ``token_kept_ratio`` overrides the recorded token merging. A
    checkpoint without surgvqa_config.json has no record: every one of :data:`PREPROCESSING_FLAGS` must then be
    given, or ``allow_defaults`` set (the toolkit's defaults are used and the summary says so); otherwise a
    :class:`UserError` naming the missing flags.
    """
    unknown = set(flags) - {f.name for f in dataclasses.fields(MediaSettings)}
    if unknown:
        raise ValueError(f"not preprocessing settings: {sorted(unknown)}")
    given = {k: v for k, v in flags.items() if v is not None}
    if "question_modality" in given:
        check_question_modality(given["question_modality"], "--question_modality")
    if given.get("frames_as", FRAMES_AS[0]) not in FRAMES_AS:
        raise UserError(f"--frames_as must be one of {', '.join(FRAMES_AS)}; got {given['frames_as']!r}")
    ratio = eval_token_kept_ratio(config, token_kept_ratio)
    frames_as = given.get("frames_as") or (config.media.frames_as if config is not None else FRAMES_AS[0])
    if ratio < 1.0 and frames_as != "video":
        raise UserError(f"token_kept_ratio {ratio:g} merges the tokens of a video, but frames reach the model as "
                        f"{frames_as}: pass --token_kept_ratio 1.0 or --frames_as video")
    if "frame_size" in given:  # a longest-edge flag replaces a recorded pixel-count budget
        given.setdefault("max_pixels", None)
    if config is not None:
        return EvalPreprocessing(dataclasses.replace(config.media, **given), config.system_prompt, CONFIG_NAME, ratio)
    missing = [name for name in PREPROCESSING_FLAGS if name not in given]
    media = MediaSettings.defaults(**given)
    if missing and not allow_defaults:
        defaults = ", ".join(f"--{name} {getattr(media, name)}" for name in missing)
        raise UserError(
            f"{checkpoint} has no {CONFIG_NAME}, so how it was trained is unknown: pass "
            + " ".join(f"--{name}" for name in missing)
            + f" as in training, or --allow_default_preprocessing True to use the defaults ({defaults})"
        )
    return EvalPreprocessing(media, DEFAULT_SYSTEM_PROMPT, "defaults" if missing else "flags", ratio)


# ------------------------------------------------------------------------------------------------ migrations
_DATA_ROOTS = ("train_data_path", "eval_data_path", "frames_dir", "audio_dir", "eval_frames_dir", "eval_audio_dir")


def _from_v0(raw: dict[str, Any]) -> dict[str, Any]:
    """Version 0 (no ``schema_version``) → 1: outputs from before data roots were recorded get them as unknown."""
    for key in _DATA_ROOTS:
        raw.setdefault(key, None)
    return raw


def _from_v1(raw: dict[str, Any]) -> dict[str, Any]:
    """Version 1 → 2: a record from before input fingerprints has them as unknown."""
    raw.setdefault("inputs", None)
    return raw


#: ``MIGRATIONS[v]`` turns a version-``v`` record into a version-``v + 1`` one
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {0: _from_v0, 1: _from_v1}


# ------------------------------------------------------------------------------------------------ validation
def _build(cls: type, raw: Mapping[str, Any], source: str, prefix: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise RunConfigError(
            f"{source}: unknown key(s) {', '.join(prefix + k for k in unknown)} (a typo, or a file from another "
            f"tool); known: {', '.join(prefix + k for k in fields)}"
        )
    values = {}
    for name, spec in fields.items():
        key = prefix + name
        if name not in raw:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise RunConfigError(f"{source}: required key {key} is missing; restore it from the training "
                                     "output (or re-train)")
            continue
        values[name] = _check_type(raw[name], hints[name], source, key)
    return cls(**values)


def _check_type(value: Any, hint: Any, source: str, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise RunConfigError(f"{source}: {key} must be an object, got {type(value).__name__}")
        return _build(hint, value, source, key + ".")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, source, key)
            except RunConfigError as err:
                errors.append(err)
        raise errors[0]
    base = origin or hint
    if base is Any:
        return value
    ok = isinstance(value, base) and not (base in (int, float) and isinstance(value, bool))
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise RunConfigError(f"{source}: {key} must be {getattr(base, '__name__', base)}, got "
                             f"{type(value).__name__} {json.dumps(value)[:40]}")
    if base is list:
        (item,) = typing.get_args(hint) or (Any,)
        return [_check_type(v, item, source, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


__all__ = [
    "CONFIG_NAME",
    "DEFAULT_FPS",
    "DEFAULT_MODEL_MAX_LENGTH",
    "FRAMES_AS",
    "MIGRATIONS",
    "PREPROCESSING_FLAGS",
    "SCHEMA_VERSION",
    "TRAINING_FIELDS",
    "EvalPreprocessing",
    "MediaSettings",
    "RunConfig",
    "RunConfigError",
    "eval_preprocessing",
    "eval_token_kept_ratio",
    "resolve_recorded_path",
]
