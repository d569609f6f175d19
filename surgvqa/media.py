"""Media: the settings of where media live (:class:`MediaConfig`), contained path resolution, frame/video/audio
decoding, resizing, subsampling, ablation.

A leaf module: of ``surgvqa`` it imports only the leaves ``prompts`` and ``errors``. Every failure to read a file raises :class:`MediaError`
naming the path; nothing here substitutes data silently (``grey_like``/``silence_like`` exist for explicit
modality ablation only).

Heavy imports (PyAV, soundfile, torch/torchaudio) happen inside the functions that need them, so importing
this module is cheap.
"""

from __future__ import annotations

import os
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from surgvqa.prompts import check_question_modality

#: the vision grid (patch x spatial merge) frames are resized to when the backbone has not said otherwise: 28 px, the
#: grid of Qwen2-VL, Qwen2.5-VL and Qwen2.5-Omni. Training, evaluation and merging set ``MediaConfig.pixel_multiple``
#: from the backbone's processor (``surgvqa.backbones.base.vision_grid``; 32 for Qwen3-VL).
DEFAULT_PIXEL_MULTIPLE = 28
DEFAULT_SAMPLING_RATE = 16000


class MediaError(ValueError):
    """A media file is missing, unreadable, corrupt, empty, or outside its root."""


ABLATIONS = (None, "video", "audio", "both")


# ------------------------------------------------------------------------------------------------- config
@dataclass
class MediaConfig:
    """Where media live and how a sample becomes model input.

    ``frames_dir``: root of frame images (and of files named by a ``video`` field); ``None`` means
    ``<directory of the data file>/frames``. ``audio_dir``: root of spoken-question audio, required when
    ``question_modality`` is ``"audio"`` or ``"text+audio"``. Templates are formatted with ``video_id``,
    ``frame`` and ``id`` (frames; must use ``{frame}``) or ``video_id`` and ``id`` (audio; must use both, so
    the audio of ``(002-002, qa_X)`` can never serve ``(002-001, qa_X)``). ``ablate`` replaces the video by
    mean-grey frames and/or the audio by silence of the same length (modality ablation).
    """

    frames_dir: str | None
    audio_dir: str | None = None
    frame_path_template: str = "{video_id}/{frame}.jpg"
    audio_path_template: str = "{video_id}/{id}.wav"
    frame_size: int = 384
    max_frames: int | None = None
    num_video_frames: int = 8
    question_modality: str = "text"
    ablate: str | None = None
    #: frames are resized to multiples of this (the backbone's vision grid), so the processor never resizes again
    pixel_multiple: int = DEFAULT_PIXEL_MULTIPLE

    def __post_init__(self) -> None:
        check_question_modality(self.question_modality)
        if self.ablate not in ABLATIONS:
            raise ValueError(f"ablate must be one of {ABLATIONS}, got {self.ablate!r}")
        if self.needs_audio and not self.audio_dir:
            raise ValueError(
                f"question_modality {self.question_modality!r} needs spoken-question audio but audio_dir is not "
                "set; pass --audio_dir (generate audio with scripts/make_spoken_questions.py) or use "
                "--question_modality text"
            )
        if self.ablate in ("audio", "both") and not self.needs_audio:
            raise ValueError(
                f"ablate={self.ablate!r} silences the audio, but question_modality 'text' has no audio; "
                "use ablate='video' or an audio question_modality"
            )
        if not isinstance(self.frame_size, int) or self.frame_size < self.pixel_multiple:
            raise ValueError(
                f"frame_size must be an int >= {self.pixel_multiple} (the vision grid: patch x merge), "
                f"got {self.frame_size!r}"
            )
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1 or None (all frames), got {self.max_frames}")
        if self.num_video_frames < 1:
            raise ValueError(f"num_video_frames must be >= 1, got {self.num_video_frames}")
        _check_template(
            "frame_path_template", self.frame_path_template, ("video_id", "frame", "id"), ("frame",)
        )
        _check_template(
            "audio_path_template", self.audio_path_template, ("video_id", "id"), ("video_id", "id")
        )

    @property
    def needs_audio(self) -> bool:
        """True when the question is (also) spoken, i.e. every sample needs an audio file."""
        return self.question_modality != "text"


def _check_template(name: str, template: str, allowed: tuple[str, ...], required: tuple[str, ...]) -> None:
    try:
        used = {fname for _, fname, _, _ in string.Formatter().parse(template) if fname is not None}
        template.format(**dict.fromkeys(allowed, "x"))
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(
            f"{name} {template!r} is not a valid template ({err!r}); use only the placeholders "
            + ", ".join("{" + a + "}" for a in allowed)
        ) from err
    missing = [r for r in required if r not in used]
    if missing:
        raise ValueError(
            f"{name} {template!r} must use "
            + " and ".join("{" + m + "}" for m in missing)
            + " so that every sample gets its own file"
        )


# --------------------------------------------------------------------------------------------------- paths
def resolve_under(
    root: Path | str,
    relative: str | os.PathLike[str],
    *,
    dir_cache: dict[tuple[str, str], Path] | None = None,
) -> Path:
    """Join ``relative`` to ``root`` and return the fully resolved path, refusing anything outside ``root``.

    Containment is checked AFTER resolving symlinks (of ``root`` and of the joined path), so ``../`` escapes,
    absolute paths and symlinks pointing out of ``root`` all raise :class:`MediaError`. ``..`` components that
    stay inside ``root`` (``a/../b.jpg``) are accepted. The path need not exist. ``dir_cache`` (optional, for
    bulk validation) memoizes the resolution of directories; the last component is still checked every call.
    """
    rel = os.fspath(relative)
    root_path = os.fspath(root)
    fix = "use a path relative to the root (no '..', not absolute, no symlink leading outside it) or change the root"
    if not rel.strip():
        raise MediaError(f"empty relative path under root {root_path}; {fix}")
    if "\x00" in rel:
        raise MediaError(f"path {rel!r} contains a NUL byte (root {root_path}); {fix}")
    if os.path.isabs(rel):
        raise MediaError(f"path {rel!r} is absolute but must be relative to root {root_path}; {fix}")

    def _resolve(p: str) -> str:
        try:
            return os.path.realpath(p, strict=False)
        except (OSError, RuntimeError, ValueError) as err:  # symlink loops
            raise MediaError(f"cannot resolve path {p} (root {root_path}): {err}; {fix}") from err

    head, tail = os.path.split(rel)
    if dir_cache is not None and tail not in ("", ".", ".."):
        root_key = (root_path, "")
        if root_key not in dir_cache:
            dir_cache[root_key] = Path(_resolve(root_path))
        root_s = str(dir_cache[root_key])
        dir_key = (root_path, head)
        if dir_key not in dir_cache:
            dir_cache[dir_key] = Path(_resolve(os.path.join(root_s, head)))
        candidate = os.path.join(str(dir_cache[dir_key]), tail)
        resolved = _resolve(candidate) if os.path.islink(candidate) else candidate
    else:
        root_s = _resolve(root_path)
        resolved = _resolve(os.path.join(root_s, rel))
    prefix = root_s if root_s.endswith(os.sep) else root_s + os.sep
    if resolved != root_s and not resolved.startswith(prefix):
        raise MediaError(f"path {rel!r} resolves to {resolved}, outside root {root_s}; {fix}")
    return Path(resolved)


# -------------------------------------------------------------------------------------------------- frames
def fit_to_budget(
    width: int, height: int, frame_size: int, multiple: int = DEFAULT_PIXEL_MULTIPLE
) -> tuple[int, int]:
    """New ``(width, height)`` keeping the aspect ratio, longest edge <= ``frame_size``, both multiples of ``multiple``.

    Frames are only shrunk, never enlarged beyond rounding: the scale is ``min(1, cap / longest_edge)`` with
    ``cap = frame_size // multiple * multiple`` (so ``frame_size=384`` gives a longest edge of at most 364), then
    each edge is rounded half-up to the nearest multiple, clamped to ``[multiple, cap]``. Resizing to these sizes
    before the processor means the Qwen processor never resizes again. ``(1352, 1080, 384) -> (364, 280)``.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    if frame_size < multiple:
        raise ValueError(
            f"frame_size {frame_size} is smaller than the pixel multiple {multiple}; use >= {multiple}"
        )
    cap = frame_size // multiple * multiple
    scale = min(1.0, cap / max(width, height))

    def _round(edge: float) -> int:
        units = int(edge / multiple + 0.5)
        return min(cap, max(multiple, units * multiple))

    return _round(width * scale), _round(height * scale)


def _pil_to_array(img: Any, frame_size: int, multiple: int) -> np.ndarray:
    img = img.convert("RGB")
    array = np.array(img, dtype=np.uint8)
    size = fit_to_budget(img.width, img.height, frame_size, multiple)
    if size != img.size:
        array = resize_uint8(array, size)
    return array


def resize_uint8(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Antialiased bicubic resize of an HxWx3 uint8 frame to (width, height) on uint8 tensors (torchvision):
    within a grey level or two of PIL's bicubic and several times faster."""
    import torch
    from torchvision.transforms.v2 import functional as tvf

    tensor = torch.from_numpy(array).permute(2, 0, 1)
    out = tvf.resize(tensor, [size[1], size[0]], interpolation=tvf.InterpolationMode.BICUBIC, antialias=True)
    return out.permute(1, 2, 0).contiguous().numpy()


def load_frame(path: Path | str, frame_size: int, multiple: int = DEFAULT_PIXEL_MULTIPLE) -> np.ndarray:
    """Decode an image (JPEG/PNG/...) as uint8 HxWx3 RGB, resized (bicubic) to :func:`fit_to_budget`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return _pil_to_array(img, frame_size, multiple)
    except FileNotFoundError as err:
        raise MediaError(f"frame file not found: {path}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise MediaError(
            f"cannot decode frame {path}: {err} (corrupt or not an image; re-extract it)"
        ) from err


def verify_image(path: Path | str) -> tuple[int, int]:
    """Cheap integrity check without a full decode; returns ``(width, height)``.

    PIL ``verify()`` (checks PNG chunk CRCs; for JPEG it only parses the headers), plus, for JPEG, the
    end-of-image marker ``FFD9`` must appear in the last 1 KiB, which catches truncated files.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            size, fmt = img.size, img.format
            img.verify()
        if fmt == "JPEG":
            with open(path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 1024))
                if b"\xff\xd9" not in fh.read():
                    raise MediaError(f"corrupt image {path}: JPEG is truncated (no end-of-image marker)")
        return size
    except FileNotFoundError as err:
        raise MediaError(f"frame file not found: {path}") from err
    except MediaError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise MediaError(f"corrupt or unreadable image {path}: {err}") from err


def subsample_indices(n: int, k: int | None) -> list[int]:
    """``k`` evenly spaced indices out of ``range(n)``, in order, keeping the first and the last.

    The rule is ``np.linspace(0, n - 1, k)`` rounded half-up (computed exactly in integers), e.g. ``(8, 6)`` gives
    ``[0, 1, 3, 4, 6, 7]``. ``k`` None or ``k >= n`` keeps all indices. ``k == 1`` gives ``[0]`` (the linspace
    rule keeps only the first frame; use ``k >= 2`` to keep both ends). ``k < 1`` raises ValueError.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if k is None or k >= n:
        return list(range(n))
    if k < 1:
        raise ValueError(f"number of frames to keep must be >= 1 (or None for all), got {k}")
    if k == 1:
        return [0]
    span, steps = n - 1, k - 1
    # round(i * span / steps) half-up == floor((2 * i * span + steps) / (2 * steps))
    return [(2 * i * span + steps) // (2 * steps) for i in range(k)]


def load_video_frames(path: Path | str, num_frames: int | None, frame_size: int,
                      multiple: int = DEFAULT_PIXEL_MULTIPLE) -> list[np.ndarray]:
    """Decode a video file with PyAV, keep ``num_frames`` evenly spaced frames (:func:`subsample_indices`), resize."""
    import av

    def _open() -> Any:
        try:
            return av.open(str(path))
        except FileNotFoundError as err:
            raise MediaError(f"video file not found: {path}") from err
        except (av.FFmpegError, OSError, ValueError) as err:
            raise MediaError(f"cannot open video {path}: {err}") from err

    def _decode(wanted: set[int] | None) -> tuple[dict[int, np.ndarray], int]:
        kept: dict[int, np.ndarray] = {}
        count = 0
        with _open() as container:
            if not container.streams.video:
                raise MediaError(f"video file {path} has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            try:
                for frame in container.decode(stream):
                    if wanted is None or count in wanted:
                        kept[count] = _pil_to_array(frame.to_image(), frame_size, multiple)
                    count += 1
            except (av.FFmpegError, OSError, ValueError) as err:
                raise MediaError(f"cannot decode video {path} at frame {count}: {err}") from err
        return kept, count

    with _open() as container:
        if not container.streams.video:
            raise MediaError(f"video file {path} has no video stream")
        declared = int(container.streams.video[0].frames or 0)
    if declared > 0:
        indices = subsample_indices(declared, num_frames)
        kept, count = _decode(set(indices))
        if count == declared:
            return [kept[i] for i in indices]
        # The container's frame count was wrong: resample with the real count.
        indices = subsample_indices(count, num_frames)
        if count and set(indices) <= kept.keys():
            return [kept[i] for i in indices]
        kept, count = _decode(set(indices))
    else:
        _, count = _decode(set())
        indices = subsample_indices(count, num_frames)
        kept, count = _decode(set(indices))
    if count == 0:
        raise MediaError(f"video file {path} has no decodable frames")
    return [kept[i] for i in indices]


def verify_video(path: Path | str) -> None:
    """Cheap integrity check of a video file: it opens, has a video stream, and its first frame decodes."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"video file {path} has no video stream")
            for _frame in container.decode(container.streams.video[0]):
                return
    except FileNotFoundError as err:
        raise MediaError(f"video file not found: {path}") from err
    except (av.FFmpegError, OSError, ValueError) as err:
        if isinstance(err, MediaError):
            raise
        raise MediaError(f"corrupt or unreadable video {path}: {err}") from err
    raise MediaError(f"video file {path} has no decodable frames")


def grey_like(frames: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each frame replaced by a frame of its own per-channel mean (same shape, uint8): video ablation."""
    out = []
    for frame in frames:
        arr = np.asarray(frame)
        axes = tuple(range(arr.ndim - 1)) if arr.ndim >= 3 else None
        mean = np.rint(arr.astype(np.float64).mean(axis=axes)).clip(0, 255).astype(np.uint8)
        out.append(np.broadcast_to(mean, arr.shape).copy())
    return out


# --------------------------------------------------------------------------------------------------- audio
def _read_with_soundfile(path: Path | str) -> tuple[np.ndarray, int]:
    import soundfile as sf

    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return data, int(rate)


def _read_with_torchaudio(path: Path | str) -> tuple[np.ndarray, int]:
    import warnings

    import torchaudio

    with warnings.catch_warnings():  # torchaudio 2.8 warns about its torchcodec migration
        warnings.simplefilter("ignore", UserWarning)
        waveform, rate = torchaudio.load(str(path))  # (channels, frames)
    return waveform.numpy().T.astype(np.float32), int(rate)


def load_audio(path: Path | str, sampling_rate: int = DEFAULT_SAMPLING_RATE) -> np.ndarray:
    """Decode audio as float32 mono at ``sampling_rate``: soundfile (wav/flac/ogg/mp3), torchaudio as fallback.

    Channels are mixed to mono by their mean; resampling uses ``torchaudio.functional.resample``. A missing,
    corrupt or zero-length file raises :class:`MediaError` naming the path.
    """
    p = Path(path)
    if not p.is_file():
        raise MediaError(f"audio file not found: {p}")
    try:
        data, rate = _read_with_soundfile(p)
    except Exception as sf_err:  # soundfile raises several types (LibsndfileError, RuntimeError, ...)
        if p.suffix.lower() != ".mp3":
            raise MediaError(
                f"cannot decode audio {p}: {sf_err} (corrupt or unsupported; re-generate it, e.g. with "
                "scripts/make_spoken_questions.py)"
            ) from sf_err
        try:  # libsndfile < 1.1 cannot read mp3
            data, rate = _read_with_torchaudio(p)
        except Exception as ta_err:
            raise MediaError(
                f"cannot decode audio {p}: soundfile: {sf_err}; torchaudio: {ta_err} (corrupt or unsupported; "
                "re-generate it, e.g. with scripts/make_spoken_questions.py)"
            ) from ta_err
    if data.size == 0 or data.shape[0] == 0:
        raise MediaError(f"audio file {p} is zero-length (no samples); re-generate it")
    mono = data.mean(axis=1, dtype=np.float32) if data.ndim == 2 else data.astype(np.float32)
    if rate != sampling_rate:
        import torch
        import torchaudio.functional as AF

        mono = AF.resample(torch.from_numpy(np.ascontiguousarray(mono)), rate, sampling_rate).numpy()
    return np.ascontiguousarray(mono, dtype=np.float32)


def audio_duration(path: Path | str) -> float:
    """Seconds of audio, probed cheaply with ``soundfile.info`` (full decode only as a fallback, e.g. old mp3).

    Missing, corrupt or zero-length files raise :class:`MediaError`.
    """
    import soundfile as sf

    p = Path(path)
    if not p.is_file():
        raise MediaError(f"audio file not found: {p}")
    try:
        info = sf.info(str(p))
    except Exception as err:
        if p.suffix.lower() == ".mp3":  # full decode with the torchaudio fallback (libsndfile < 1.1)
            return len(load_audio(p)) / DEFAULT_SAMPLING_RATE
        raise MediaError(f"corrupt or unreadable audio {p}: {err}; re-generate it") from err
    if info.frames <= 0 or info.samplerate <= 0:
        raise MediaError(f"audio file {p} is zero-length (no samples); re-generate it")
    return info.frames / info.samplerate


def silence_like(audio: np.ndarray | None) -> np.ndarray | None:
    """Zeros of the same length (float32): audio ablation. ``None`` stays ``None``."""
    if audio is None:
        return None
    return np.zeros(np.asarray(audio).shape, dtype=np.float32)
