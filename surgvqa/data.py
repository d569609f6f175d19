"""The torch Dataset of decoded samples and the ``check`` CLI; the data layer's names in one place.

Samples are built and validated by :mod:`surgvqa.samples` (every problem reported before a :class:`Sample` exists);
media settings and decoding live in :mod:`surgvqa.media`. Both are re-exported here, so ``from surgvqa.data import
MediaConfig, Sample, load_samples, SurgicalVQADataset`` keeps working.

``python -m surgvqa.data check --data_path F [--frames_dir D] [--audio_dir A] ...`` (also ``surgvqa check …``)
builds all samples, prints a summary and every problem, and exits 1 if the data has any problem, 2 if the call
itself is wrong (a flag, a missing data file or directory).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from surgvqa.errors import ArgumentParser, UserError, existing_dir, existing_file, run_main
from surgvqa.frame_cache import FrameCache, file_identity
from surgvqa.media import (
    ABLATIONS,
    DEFAULT_SAMPLING_RATE,
    MediaConfig,
    MediaError,
    audio_duration,
    grey_like,
    load_audio,
    load_frame,
    load_video_frames,
    silence_like,
    subsample_indices,
)
from surgvqa.prompts import QUESTION_MODALITIES
from surgvqa.samples import (
    AUDIO_EXTENSIONS,
    IMAGE_EXTENSIONS,
    REQUIRED_FIELDS,
    SCORING_FIELDS,
    SKIP_HINT,
    DataError,
    Problem,
    Sample,
    load_qa_text,
    load_samples,
)


# ------------------------------------------------------------------------------------------------- dataset
class SurgicalVQADataset(Dataset):
    """Samples plus decoded media: ``{"sample", "frames", "audio"}`` (no tokenization, so items are cheap to cache).

    ``frames``: uint8 HxWx3 arrays, subsampled with :func:`subsample_indices` to ``max_frames`` (which overrides
    ``media.max_frames``: train and eval may differ) and resized to ``media.frame_size``; mean-grey when
    ``media.ablate`` is ``"video"``/``"both"``. ``audio``: float32 16 kHz mono (``None`` for text questions);
    silence of the same length when ``ablate`` is ``"audio"``/``"both"``. A file that cannot be read raises
    :class:`MediaError` naming the sample and the path: nothing is substituted silently.

    ``frame_cache`` (:class:`surgvqa.frame_cache.FrameCache`, optional): decoded, resized frames are read from it and
    decoded only on a miss; the pixels are the same either way. ``media_key`` identifies what the item was made of
    (:meth:`_media_key`), so a collator can reuse its encoding in a later epoch.
    """

    def __init__(self, samples: Sequence[Sample], media: MediaConfig, max_frames: int | None = None,
                 frame_cache: FrameCache | None = None) -> None:
        self.samples = list(samples)
        self.media = media
        self.frame_cache = frame_cache
        self.max_frames = max_frames if max_frames is not None else media.max_frames
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1 or None, got {self.max_frames}")

    def __len__(self) -> int:
        return len(self.samples)

    def _frames(self, sample: Sample, identities: tuple | None) -> list[np.ndarray]:
        size, grid = self.media.frame_size, self.media.pixel_multiple
        if sample.video_path is not None:
            n = self.media.num_video_frames
            if self.max_frames is not None:
                n = min(n, self.max_frames)
            if self.frame_cache is None:
                return load_video_frames(sample.video_path, n, size, grid)
            clip = self.frame_cache.get(sample.video_path, ("video", n, size, grid),
                                        lambda: np.stack(load_video_frames(sample.video_path, n, size, grid)),
                                        identities[0] if identities else None)
            return list(clip)
        if not sample.frame_paths:
            raise MediaError("sample has neither frame_paths nor video_path")
        paths = [sample.frame_paths[i] for i in subsample_indices(len(sample.frame_paths), self.max_frames)]
        if self.frame_cache is None:
            frames = [load_frame(path, size, grid) for path in paths]
        else:
            cache, settings = self.frame_cache, ("frame", size, grid)
            frames = [cache.get(path, settings, lambda path=path: load_frame(path, size, grid),
                                identities[k] if identities else None) for k, path in enumerate(paths)]
        shapes = {f.shape for f in frames}
        if len(shapes) > 1:
            raise MediaError(
                f"frames differ in size after resizing ({sorted(shapes)}); re-extract them at one "
                f"resolution: {[str(path) for path in paths]}"
            )
        return frames

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self.samples[i]
        identities = self._identities(sample)
        try:
            frames = self._frames(sample, identities)
            audio = None
            if self.media.needs_audio:
                if sample.audio_path is None:
                    raise MediaError(
                        f"question_modality {self.media.question_modality!r} needs audio but the "
                        "sample has no audio_path; build samples with the same MediaConfig"
                    )
                audio = load_audio(sample.audio_path, DEFAULT_SAMPLING_RATE)
        except MediaError as err:
            raise MediaError(
                f"sample (video_id={sample.video_id!r}, id={sample.id!r}) from {sample.source or '?'}: {err}"
            ) from err
        if self.media.ablate in ("video", "both"):
            frames = grey_like(frames)
        if self.media.ablate in ("audio", "both"):
            audio = silence_like(audio)
        return {"sample": sample, "frames": frames, "audio": audio, "media_key": self._media_key(sample, identities)}

    def _identities(self, sample: Sample) -> tuple | None:
        """:func:`~surgvqa.frame_cache.file_identity` of each media file the item is made of (the video file or the
        frames used, then the audio file when the question is spoken); None when one cannot be stat'ed (the
        decoder then reports it)."""
        try:
            if sample.video_path is not None:
                files = [file_identity(sample.video_path)]
            else:
                indices = subsample_indices(len(sample.frame_paths), self.max_frames)
                files = [file_identity(sample.frame_paths[i]) for i in indices]
            if self.media.needs_audio and sample.audio_path is not None:
                files.append(file_identity(sample.audio_path))
        except OSError:
            return None
        return tuple(files)

    def _media_key(self, sample: Sample, identities: tuple | None) -> tuple | None:
        """What the item is made of, so a collator can tell whether an encoding of it is still valid: the question,
        every media file (path, size, mtime, inode) and the settings that turn them into pixels and samples."""
        if identities is None:
            return None
        media = self.media
        return (sample.key, sample.question, identities, media.frame_size, media.pixel_multiple,
                media.num_video_frames, self.max_frames, media.question_modality, media.ablate)


# ------------------------------------------------------------------------------------------------- summary
def summarize_samples(samples: Sequence[Sample]) -> dict[str, Any]:
    """Counts: n, per question type, per video, frames per sample, and audio seconds (when any audio)."""
    summary: dict[str, Any] = {
        "n": len(samples),
        "question_types": dict(sorted(Counter(s.question_type or "(none)" for s in samples).items())),
        "videos": dict(sorted(Counter(s.video_id for s in samples).items())),
    }
    counts = [len(s.frame_paths) for s in samples if s.video_path is None]
    if counts:
        summary["frames_per_sample"] = {
            "min": min(counts),
            "max": max(counts),
            "mean": round(sum(counts) / len(counts), 3),
        }
    n_video = sum(s.video_path is not None for s in samples)
    if n_video:
        summary["video_files"] = n_video
    durations = [audio_duration(s.audio_path) for s in samples if s.audio_path is not None]
    if durations:
        summary["audio"] = {
            "n": len(durations),
            "seconds_total": round(sum(durations), 3),
            "seconds_mean": round(sum(durations) / len(durations), 3),
        }
    return summary


# ---------------------------------------------------------------------------------------------------- CLI
def make_check_parser(subparsers=None) -> argparse.ArgumentParser:
    """The ``check`` arguments: a subcommand of ``subparsers`` (``python -m surgvqa.data check``) or standalone
    (``surgvqa check``)."""
    description = "build every sample, print a summary and every problem"
    if subparsers is None:
        check = ArgumentParser(prog="surgvqa check", description=description)
    else:
        check = subparsers.add_parser("check", help=description, description=description)
    check.add_argument("--data_path", required=True, help="JSONL file, one sample per line")
    check.add_argument("--frames_dir", default=None, help="root of frame images (default: <data dir>/frames)")
    check.add_argument("--audio_dir", default=None, help="root of spoken-question audio")
    check.add_argument("--frame_path_template", default=MediaConfig.frame_path_template)
    check.add_argument("--audio_path_template", default=MediaConfig.audio_path_template)
    check.add_argument("--question_modality", default=MediaConfig.question_modality, choices=QUESTION_MODALITIES)
    check.add_argument(
        "--require_scoring_fields", action="store_true", help="also require question_type and short_answer"
    )
    return check


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m surgvqa.data", description=__doc__.splitlines()[0])
    make_check_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def check(args: argparse.Namespace) -> int:
    """Build every sample, print the summary and every problem: 0 no problem, 1 a problem in the data."""
    data_path = existing_file(args.data_path, "--data_path")
    if args.frames_dir is not None:
        existing_dir(args.frames_dir, "--frames_dir")
    elif not (data_path.parent / "frames").is_dir():
        raise UserError(f"--frames_dir is not given and the default {data_path.parent / 'frames'} does not exist; "
                        "pass --frames_dir")
    if args.audio_dir is not None:
        existing_dir(args.audio_dir, "--audio_dir")
    media = MediaConfig(
        frames_dir=args.frames_dir,
        audio_dir=args.audio_dir,
        frame_path_template=args.frame_path_template,
        audio_path_template=args.audio_path_template,
        question_modality=args.question_modality,
    )
    try:
        samples, problems = load_samples(
            args.data_path, media, require_scoring_fields=args.require_scoring_fields, skip_bad=True
        )
    except DataError as err:
        samples, problems = [], err.problems
    print(json.dumps({"data_path": args.data_path, **summarize_samples(samples)}, indent=2))
    for problem in problems:
        print(f"PROBLEM {problem}")
    if problems:
        bad_lines = len({p.source for p in problems})
        print(
            f"{len(problems)} problem(s) in {bad_lines} place(s); {len(samples)} good sample(s). "
            f"Fix them, or {SKIP_HINT}."
        )
        return 1
    print(f"OK: {len(samples)} sample(s), no problems.")
    return 0


def check_main(argv: Sequence[str] | None = None) -> int:
    """``surgvqa check …``: exit 0 when every sample is good, 1 when the data has a problem, 2 on a bad
    invocation (a flag, a missing data file or directory: one ``error: …`` line)."""
    args = make_check_parser().parse_args(argv)
    return run_main(lambda: check(args))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m surgvqa.data check …``: the same exit codes as :func:`check_main`."""
    args = _parser().parse_args(argv)
    return run_main(lambda: check(args))


__all__ = [
    "ABLATIONS",
    "AUDIO_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "QUESTION_MODALITIES",
    "REQUIRED_FIELDS",
    "SCORING_FIELDS",
    "SKIP_HINT",
    "DataError",
    "MediaConfig",
    "MediaError",
    "Problem",
    "Sample",
    "SurgicalVQADataset",
    "check_main",
    "load_qa_text",
    "load_samples",
    "main",
    "summarize_samples",
]


if __name__ == "__main__":
    raise SystemExit(main())
