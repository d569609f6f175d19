"""``surgvqa_config.json``: the typed, versioned record of how a run was trained, so every later step agrees.

Training writes one into its output directory and into every checkpoint; evaluation and merging read it back
through :class:`RunConfig`, and no other module parses the file or repeats a default. Reading validates: an unknown
key (a typo) or a missing required key is an error naming the key and the file; a value of the wrong type too.

Adding a setting is one line: a field with a default (on :class:`~surgvqa.preprocessing.Preprocessing` for
preprocessing, on :class:`RunConfig` otherwise). A RunConfig field with a default is optional on read, so files
written before it existed still read, with that default; fields without one are required. The ``preprocessing``
block lists every setting (a migration supplies what older files meant by an absent one).

Schema versions (``schema_version``; :data:`MIGRATIONS` turns an older file into the current layout on read):

* 0 — files without ``schema_version`` (surgvqa 0.1.0). Same keys as version 1; training outputs written before the
  data roots were recorded lack ``train_data_path`` … ``eval_audio_dir`` (read as unknown: ``None``).
* 1 — ``schema_version`` and ``base_model_relative`` (the base model's path relative to the checkpoint directory,
  used when the recorded absolute path no longer exists because both were moved).
* 2 — ``inputs`` (fingerprints of the data, media and base model a training run read; see
  :func:`surgvqa.rundir.input_fingerprints`) and ``data_changes``. A version-1 training output reads with
  ``inputs`` unknown (``None``): it is still resumed, without the data check.
* 3 — ``preprocessing`` (every field of :class:`~surgvqa.preprocessing.Preprocessing`) replaces ``media``,
  ``system_prompt`` and ``token_kept_ratio``; ``num_video_frames`` is recorded (version 2 used 8).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgvqa.errors import UserError
from surgvqa.preprocessing import DEFAULT_FPS, FRAMES_AS, Preprocessing, field_names
from surgvqa.records import build, migrate

logger = logging.getLogger(__name__)

CONFIG_NAME = "surgvqa_config.json"
SCHEMA_VERSION = 3
DEFAULT_MODEL_MAX_LENGTH = 4096
#: the preprocessing a checkpoint without surgvqa_config.json must be told (or allowed to default)
PREPROCESSING_FLAGS = ("frame_size", "question_modality", "frames_as")
#: where a run kept its caches: recorded, never part of what makes two invocations the same run (see train.run_identity)
CACHE_FIELDS = ("frame_cache",)
#: what only a training output records (a merged checkpoint keeps them per stage, in ``merged_from``)
TRAINING_FIELDS = ("lora", "quantization", "resized_vocab", "original_vocab_rows", "packing")


class RunConfigError(UserError):
    """A surgvqa_config.json that is missing, malformed, of a newer schema, or has unknown/missing keys."""


@dataclass
class RunConfig:
    """One run's settings, as written to ``surgvqa_config.json`` (see the module docstring for the rules)."""

    surgvqa_version: str
    backbone: str
    #: the model the adapter was trained on (absolute when it was a local directory)
    base_model: str
    #: how samples became model input (every field of :class:`~surgvqa.preprocessing.Preprocessing`)
    preprocessing: Preprocessing
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
    # -- a training output (None in a merged checkpoint)
    lora: dict[str, Any] | None = None
    quantization: str | None = None
    resized_vocab: int | None = None
    original_vocab_rows: int | None = None
    #: several samples per training row (``--packing``; absent from older files and merged checkpoints)
    packing: bool | None = False
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
    #    evaluation reuses a disk cache that still exists (a CACHE_FIELDS entry: not part of the run's identity)
    frame_cache: dict[str, Any] | None = None
    # -- what a training run read (compared when it is resumed) and the changes a resume was allowed to make
    inputs: dict[str, Any] | None = None
    data_changes: list[dict[str, Any]] | None = None

    # ----------------------------------------------------------------------------------------------- reading
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "surgvqa_config.json") -> RunConfig:
        """Validate ``raw`` (migrating an older schema first) into a RunConfig; errors name the key and source."""
        raw = migrate(raw, source, key="schema_version", current=SCHEMA_VERSION, migrations=MIGRATIONS,
                      error=RunConfigError)
        missing = [name for name in field_names() if name not in (raw.get("preprocessing") or {})]
        if isinstance(raw.get("preprocessing"), Mapping) and missing:  # a record lists every setting
            raise RunConfigError(f"{source}: required key(s) {', '.join('preprocessing.' + m for m in missing)} "
                                 "missing; restore them from the training output (or re-train)")
        config = build(cls, raw, source, RunConfigError)
        config.preprocessing.check(RunConfigError, source)
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
    def resolve_base_model(self, directory: str | Path) -> str | None:
        """The base model directory: the recorded path when it exists, else the same position relative to
        ``directory`` (both moved together), else None."""
        return resolve_recorded_path(self.base_model, directory, self.base_model_relative)


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


# ----------------------------------------------------------------------------- evaluation's preprocessing
@dataclass
class EvalPreprocessing:
    """What evaluation feeds the model, and where it came from (recorded in the summary)."""

    preprocessing: Preprocessing
    #: "surgvqa_config.json" | "flags" | "defaults"
    source: str


def eval_preprocessing(config: RunConfig | None, flags: Mapping[str, Any], *, checkpoint: str | Path,
                       allow_defaults: bool = False) -> EvalPreprocessing:
    """The recorded preprocessing with the flags given (not None) on top: ``dataclasses.replace(recorded,
    **given)``, any field of :class:`Preprocessing`, validated as a whole.

    A value other than the recorded one is logged (the model then sees input as it was not trained to); a
    ``frame_size`` given without ``max_pixels`` replaces a recorded pixel budget (which would otherwise win). A
    checkpoint without surgvqa_config.json has no record: every one of :data:`PREPROCESSING_FLAGS` must then be
    given, or ``allow_defaults`` set (the toolkit's defaults are used and the summary says so); otherwise a
    :class:`UserError` naming the missing flags.
    """
    unknown = set(flags) - set(field_names())
    if unknown:
        raise ValueError(f"not preprocessing settings: {sorted(unknown)}")
    given = {k: v for k, v in flags.items() if v is not None}
    recorded = config.preprocessing if config is not None else Preprocessing()
    if "frame_size" in given and "max_pixels" not in given and recorded.max_pixels is not None:
        logger.warning("--frame_size %s replaces the recorded pixel budget (max_pixels %s)", given["frame_size"],
                       recorded.max_pixels)
        given["max_pixels"] = None
    preprocessing = dataclasses.replace(recorded, **given)
    preprocessing.check()
    if config is not None:
        for name, value in given.items():
            if value != getattr(recorded, name):
                logger.warning("--%s %r overrides the %r the checkpoint was trained with", name, value,
                               getattr(recorded, name))
        return EvalPreprocessing(preprocessing, CONFIG_NAME)
    missing = [name for name in PREPROCESSING_FLAGS if name not in given]
    if missing and not allow_defaults:
        defaults = ", ".join(f"--{name} {getattr(preprocessing, name)}" for name in missing)
        raise UserError(
            f"{checkpoint} has no {CONFIG_NAME}, so how it was trained is unknown: pass "
            + " ".join(f"--{name}" for name in missing)
            + f" as in training, or --allow_default_preprocessing True to use the defaults ({defaults})"
        )
    return EvalPreprocessing(preprocessing, "defaults" if missing else "flags")


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


#: the ``media`` keys a version-2 record had to have (the others had defaults)
_V2_REQUIRED_MEDIA = ("frame_path_template", "audio_path_template", "frame_size", "max_train_frames",
                      "max_eval_frames", "question_modality", "frames_as", "fps")
#: what a version-2 record meant by a setting it did not hold (frames per video file: the then fixed 8)
_V2_DEFAULTS = {"max_pixels": None, "min_pixels": None, "video_fps": None, "token_kept_ratio": 1.0,
                "num_video_frames": 8}


def _from_v2(raw: dict[str, Any]) -> dict[str, Any]:
    """Version 2 → 3: ``media``, ``system_prompt`` and ``token_kept_ratio`` become one ``preprocessing`` block."""
    media = raw.pop("media", None)
    if not isinstance(media, Mapping):
        return raw  # reading reports the missing / malformed block
    missing = [f"media.{k}" for k in _V2_REQUIRED_MEDIA if k not in media]
    missing += ["system_prompt"] if "system_prompt" not in raw else []
    if missing:
        raise RunConfigError(f"required key(s) {', '.join(missing)} missing; restore them from the training output "
                             "(or re-train)")
    block = {**_V2_DEFAULTS, **media, "system_prompt": raw.pop("system_prompt")}
    if "token_kept_ratio" in raw:
        block["token_kept_ratio"] = raw.pop("token_kept_ratio")
    raw["preprocessing"] = block
    return raw


#: ``MIGRATIONS[v]`` turns a version-``v`` record into a version-``v + 1`` one
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {0: _from_v0, 1: _from_v1, 2: _from_v2}


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
    "Preprocessing",
    "RunConfig",
    "RunConfigError",
    "eval_preprocessing",
    "resolve_recorded_path",
]
