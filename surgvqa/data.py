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

from surgvqa.audio import DEFAULT_SAMPLING_RATE, audio_duration, load_audio, silence_like
from surgvqa.errors import ArgumentParser, UserError, existing_dir, existing_file, run_main
from surgvqa.frame_cache import FrameCache
from surgvqa.media import (
    ABLATIONS,
    CONSTANT_VIDEO_ABLATIONS,
    SHUFFLE_ABLATIONS,
    SILENT_AUDIO_ABLATIONS,
    MediaConfig,
    MediaError,
    constant_frames_like,
    derangement,
    load_frame,
    load_video_frames,
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
def ablation_donors(samples: Sequence[Sample], seed: int) -> dict[tuple[str, str], Sample]:
    """For the shuffle ablations: each sample's donor, another sample (from another video where possible).

    A seeded :func:`~surgvqa.media.derangement` over ``samples`` in their given order, so the same samples and
    seed always give the same donors (a resumed evaluation serves every sample the same media again).
    """
    order = derangement([s.video_id for s in samples], seed)
    return {s.key: samples[j] for s, j in zip(samples, order, strict=True)}


class SurgicalVQADataset(Dataset):
    """Samples plus decoded media: ``{"sample", "frames", "audio", "frame_indices", "frame_numbers", "frame_times"}``
    (no tokenization; a training run keeps their encodings with :class:`surgvqa.encoded.EncodedDataset`).

    ``frames``: uint8 HxWx3 arrays, subsampled with :func:`subsample_indices` to ``max_frames`` (which overrides
    ``media.max_frames``: train and eval may differ) and resized to the pixel budget ``media.budget``. ``audio``:
    float32 16 kHz mono (``None`` for text questions). A file that cannot be read raises :class:`MediaError` naming
    the sample and the path: nothing is substituted silently. For the video clock the item also carries
    ``frame_indices`` (which of the line's frames were kept), ``frame_numbers`` (their ``frame_numbers`` entries,
    when the line has them) and, for a video file, ``frame_times`` (the kept frames' presentation times in seconds);
    the collator turns them into the M-RoPE time step.

    Modality ablation (``media.ablate``), media still decoded so a missing file is still an error:

    - ``video`` / ``both``: every frame of every sample becomes the constant colour ``video_fill`` (the
      processor's normalisation mean, i.e. zeros after normalisation), frame count and size kept;
    - ``audio`` / ``both``: the spoken question becomes silence of the same length;
    - ``video_shuffle`` / ``audio_shuffle``: the frames / audio of ``donors[sample.key]`` (see
      :func:`ablation_donors`) instead of the sample's own.

    ``frame_cache`` (:class:`surgvqa.frame_cache.FrameCache`, optional): decoded, resized frames (of frame files;
    video files are decoded every time, their frame times come with the decode) are read from it and decoded only on
    a miss; the pixels are the same either way.
    """

    def __init__(self, samples: Sequence[Sample], media: MediaConfig, max_frames: int | None = None, *,
                 video_fill: Sequence[int] | None = None, donors: dict[tuple[str, str], Sample] | None = None,
                 frame_cache: FrameCache | None = None) -> None:
        self.samples = list(samples)
        self.media = media
        self.frame_cache = frame_cache
        self.max_frames = max_frames if max_frames is not None else media.max_frames
        if self.max_frames is not None and self.max_frames < 1:
            raise UserError(f"max_frames must be >= 1 or None, got {self.max_frames}")
        if media.ablate in CONSTANT_VIDEO_ABLATIONS and video_fill is None:
            raise ValueError(
                f"ablate={media.ablate!r} needs video_fill, the constant RGB colour of the ablated frames (the "
                "processor's normalisation mean)"
            )
        if media.ablate in SHUFFLE_ABLATIONS:
            if donors is None:
                raise ValueError(f"ablate={media.ablate!r} needs donors (see ablation_donors)")
            missing = [s.key for s in self.samples if s.key not in donors]
            if missing:
                raise UserError(f"ablate={media.ablate!r}: no donor for {len(missing)} sample(s), e.g. {missing[0]}")
        self.video_fill = tuple(int(v) for v in video_fill) if video_fill is not None else None
        self.donors = donors

    def __len__(self) -> int:
        return len(self.samples)

    def _frames(self, sample: Sample, timing: dict[str, Any]) -> list[np.ndarray]:
        size, grid = self.media.budget, self.media.pixel_multiple
        if sample.video_path is not None:
            n = self.media.num_video_frames
            if self.max_frames is not None:
                n = min(n, self.max_frames)
            times: list[float] = []
            frames = load_video_frames(sample.video_path, n, size, grid, times=times)
            timing["frame_times"] = times or None
            return frames
        if not sample.frame_paths:
            raise MediaError("sample has neither frame_paths nor video_path")
        indices = timing["frame_indices"] = subsample_indices(len(sample.frame_paths), self.max_frames)
        numbers = sample.extra.get("frame_numbers")
        if isinstance(numbers, list) and len(numbers) == len(sample.frame_paths):
            timing["frame_numbers"] = [numbers[i] for i in indices]
        cache, settings = self.frame_cache, ("frame", size, grid)
        frames = [load_frame(path, size, grid) if cache is None else
                  cache.get(path, settings, lambda path=path: load_frame(path, size, grid))
                  for path in (sample.frame_paths[i] for i in indices)]
        shapes = {f.shape for f in frames}
        if len(shapes) > 1:
            raise MediaError(
                f"frames differ in size after resizing ({sorted(shapes)}); re-extract them at one "
                f"resolution: {[str(sample.frame_paths[i]) for i in indices]}"
            )
        return frames

    def _audio(self, sample: Sample) -> np.ndarray | None:
        if not self.media.needs_audio:
            return None
        if sample.audio_path is None:
            raise MediaError(
                f"question_modality {self.media.question_modality!r} needs audio but the "
                "sample has no audio_path; build samples with the same MediaConfig"
            )
        return load_audio(sample.audio_path, DEFAULT_SAMPLING_RATE)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self.samples[i]
        ablate = self.media.ablate
        frame_source = self.donors[sample.key] if ablate == "video_shuffle" else sample
        audio_source = self.donors[sample.key] if ablate == "audio_shuffle" else sample
        timing: dict[str, Any] = {"frame_indices": None, "frame_numbers": None, "frame_times": None}
        try:
            frames = self._frames(frame_source, timing)
            audio = self._audio(audio_source)
        except MediaError as err:
            donor = ""
            if frame_source is not sample or audio_source is not sample:
                other = frame_source if frame_source is not sample else audio_source
                donor = f" (media of (video_id={other.video_id!r}, id={other.id!r}) under ablate={ablate!r})"
            raise MediaError(
                f"sample (video_id={sample.video_id!r}, id={sample.id!r}) from {sample.source or '?'}{donor}: {err}"
            ) from err
        if ablate in CONSTANT_VIDEO_ABLATIONS:
            frames = constant_frames_like(frames, self.video_fill)
        if ablate in SILENT_AUDIO_ABLATIONS:
            audio = silence_like(audio)
        return {"sample": sample, "frames": frames, "audio": audio, **timing}


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
    check.add_argument(
        "--audio_dir", default=None,
        help="root of spoken-question audio; when given, every sample's audio is found and decoded, whatever "
        "--question_modality says",
    )
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
            args.data_path, media, require_scoring_fields=args.require_scoring_fields, skip_bad=True,
            decode_media=True, check_audio=True,
        )
    except DataError as err:
        samples, problems = [], err.problems
    print(json.dumps({"data_path": args.data_path, **summarize_samples(samples)}, indent=2))
    print(
        "media: every frame, video and audio file decoded with the training loader's own decoders"
        if args.audio_dir else
        "media: every frame and video file decoded with the training loader's own decoders; audio NOT checked "
        "(no --audio_dir given)"
    )
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
    "CONSTANT_VIDEO_ABLATIONS",
    "IMAGE_EXTENSIONS",
    "QUESTION_MODALITIES",
    "REQUIRED_FIELDS",
    "SCORING_FIELDS",
    "SHUFFLE_ABLATIONS",
    "SILENT_AUDIO_ABLATIONS",
    "SKIP_HINT",
    "DataError",
    "MediaConfig",
    "MediaError",
    "Problem",
    "Sample",
    "SurgicalVQADataset",
    "ablation_donors",
    "check_main",
    "load_qa_text",
    "load_samples",
    "main",
    "summarize_samples",
]


if __name__ == "__main__":
    raise SystemExit(main())
