"""Media: the settings of where media live (:class:`MediaConfig`), contained path resolution, frame and video
decoding, pixel budgets and resizing, subsampling, the ablation table and its functions. Audio decoding is in
:mod:`surgvqa.audio`.

A leaf module: of ``surgvqa`` it imports only the leaf ``prompts``. Every failure to read a file raises
:class:`MediaError` naming the path; nothing here substitutes data silently (``constant_frames_like`` and
``derangement`` exist for explicit modality ablation only).

Heavy imports (PyAV, torch) happen inside the functions that need them, so importing this module is cheap.
"""

from __future__ import annotations

import io
import os
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from surgvqa.errors import UserError
from surgvqa.prompts import check_question_modality

#: the vision grid (patch x spatial merge) frames are resized to when the backbone has not said otherwise: 28 px, the
#: grid of Qwen2-VL, Qwen2.5-VL and Qwen2.5-Omni. Training, evaluation and merging set ``MediaConfig.pixel_multiple``
#: from the backbone's processor (``Backbone.vision_grid``; 32 for Qwen3-VL).
DEFAULT_PIXEL_MULTIPLE = 28
#: raise with any change to the pixels the decode and resize code below makes (part of the frame cache's key)
DECODE_REVISION = 1


class MediaError(UserError):
    """A media file is missing, unreadable, corrupt, empty, or outside its root."""


ABLATIONS = (None, "video", "audio", "both", "video_shuffle", "audio_shuffle")
CONSTANT_VIDEO_ABLATIONS = ("video", "both")  # every frame becomes one constant frame
SILENT_AUDIO_ABLATIONS = ("audio", "both")  # the spoken question becomes silence of the same length
SHUFFLE_ABLATIONS = ("video_shuffle", "audio_shuffle")  # another sample's frames / audio
#: what each ablation removes, as a paired comparison's verdict names it ("video carries X pts")
ABLATION_REMOVES = {
    "video": "video",
    "audio": "audio",
    "both": "video and audio",
    "video_shuffle": "the sample's own video",
    "audio_shuffle": "the sample's own audio",
}


# ------------------------------------------------------------------------------------------------- config
@dataclass
class MediaConfig:
    """Where media live and how a sample becomes model input.

    ``frames_dir``: root of frame images (and of files named by a ``video`` field); ``None`` means
    ``<directory of the data file>/frames``. ``audio_dir``: root of spoken-question audio, required when
    ``question_modality`` is ``"audio"`` or ``"text+audio"``. Templates are formatted with ``video_id``,
    ``frame`` and ``id`` (frames; must use ``{frame}``) or ``video_id`` and ``id`` (audio; must use both, so
    the audio of ``(002-002, qa_X)`` can never serve ``(002-001, qa_X)``). ``ablate`` (modality ablation):
    ``video`` = every frame one constant frame, ``audio`` = silence of the same length, ``both`` = the two,
    ``video_shuffle`` / ``audio_shuffle`` = another sample's frames / audio (see ``SurgicalVQADataset``).
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
    #: a pixel-count budget per frame (smart_resize) instead of the longest edge ``frame_size``
    max_pixels: int | None = None
    min_pixels: int | None = None

    def __post_init__(self) -> None:
        check_question_modality(self.question_modality)
        if self.ablate not in ABLATIONS:
            raise UserError(f"ablate must be one of {ABLATIONS}, got {self.ablate!r}")
        if self.needs_audio and not self.audio_dir:
            raise UserError(
                f"question_modality {self.question_modality!r} needs spoken-question audio but audio_dir is not "
                "set; pass --audio_dir (generate audio with scripts/make_spoken_questions.py) or use "
                "--question_modality text"
            )
        if self.ablate in ("audio", "both", "audio_shuffle") and not self.needs_audio:
            raise UserError(
                f"ablate={self.ablate!r} removes the spoken question, but question_modality 'text' has no audio; "
                "use ablate='video' / 'video_shuffle' or an audio question_modality"
            )
        self.budget  # noqa: B018  (validates frame_size / max_pixels / min_pixels against the vision grid)
        if self.max_frames is not None and self.max_frames < 1:
            raise UserError(f"max_frames must be >= 1 or None (all frames), got {self.max_frames}")
        if self.num_video_frames < 1:
            raise UserError(f"num_video_frames must be >= 1, got {self.num_video_frames}")
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

    @property
    def budget(self) -> PixelBudget:
        """The pixel budget frames are resized to (see :class:`PixelBudget`)."""
        return PixelBudget(self.frame_size, self.max_pixels, self.min_pixels, self.pixel_multiple)


def _check_template(name: str, template: str, allowed: tuple[str, ...], required: tuple[str, ...]) -> None:
    try:
        used = {fname for _, fname, _, _ in string.Formatter().parse(template) if fname is not None}
        template.format(**dict.fromkeys(allowed, "x"))
    except (KeyError, IndexError, ValueError) as err:
        raise UserError(
            f"{name} {template!r} is not a valid template ({err!r}); use only the placeholders "
            + ", ".join("{" + a + "}" for a in allowed)
        ) from err
    missing = [r for r in required if r not in used]
    if missing:
        raise UserError(
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
@dataclass(frozen=True)
class PixelBudget:
    """How large a frame may be when it reaches the vision tower.

    ``max_pixels`` (a pixel count, as in the Qwen processors) given: the frame is resized with transformers'
    ``smart_resize`` — aspect ratio kept, both edges multiples of ``factor``, ``min_pixels <= w * h <= max_pixels``.
    Otherwise ``frame_size`` caps the longest edge (:func:`fit_to_budget`). ``factor`` is the vision grid (patch x
    spatial merge: 28 for Qwen2/2.5, 32 for Qwen3). The dataset, the length pre-flight and the collator all size
    frames with :meth:`target_size`, so the processor never resizes a second time.
    """

    frame_size: int | None = 384
    max_pixels: int | None = None
    min_pixels: int | None = None
    factor: int = DEFAULT_PIXEL_MULTIPLE

    def __post_init__(self) -> None:
        if not isinstance(self.factor, int) or self.factor < 1:
            raise UserError(f"pixel factor must be a positive int, got {self.factor!r}")
        if self.max_pixels is None:
            if not isinstance(self.frame_size, int) or self.frame_size < self.factor:
                raise UserError(
                    f"frame_size must be an int >= {self.factor} (the vision grid: patch x merge), "
                    f"got {self.frame_size!r}"
                )
        elif not isinstance(self.max_pixels, int) or self.max_pixels < self.factor * self.factor:
            raise UserError(
                f"max_pixels is a pixel count (e.g. 147456 = 384 x 384) and must be >= {self.factor ** 2} "
                f"(one {self.factor}x{self.factor} grid cell), got {self.max_pixels!r}"
            )
        if self.min_pixels is not None:
            if not isinstance(self.min_pixels, int) or self.min_pixels < 1:
                raise UserError(f"min_pixels must be a positive pixel count, got {self.min_pixels!r}")
            if self.min_pixels > self.max_area:
                raise UserError(
                    f"min_pixels {self.min_pixels} is larger than the budget's maximum {self.max_area} pixels; "
                    "lower --min_pixels or raise --max_pixels / --frame_size"
                )

    @property
    def max_area(self) -> int:
        """The most pixels a frame may have."""
        return self.max_pixels if self.max_pixels is not None else int(self.frame_size) ** 2

    @property
    def min_area(self) -> int:
        """The fewest pixels a frame may have (default: one grid cell)."""
        return self.min_pixels if self.min_pixels is not None else self.factor * self.factor

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` a ``width x height`` frame is resized to."""
        if width < 1 or height < 1:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        if self.max_pixels is None:
            w, h = fit_to_budget(width, height, int(self.frame_size), self.factor)
            if w * h >= self.min_area:
                return w, h
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        h, w = smart_resize(height, width, factor=self.factor, min_pixels=self.min_area, max_pixels=self.max_area)
        return w, h

    def processor_size(self) -> dict[str, int]:
        """The same budget in the Qwen processors' terms (``shortest_edge``/``longest_edge`` are pixel counts)."""
        return {"shortest_edge": self.min_area, "longest_edge": self.max_area}

    def on_grid(self, width: int, height: int) -> bool:
        """True when a frame of this size is already what :meth:`target_size` makes of it."""
        return self.target_size(width, height) == (width, height)


def as_budget(size: PixelBudget | int, multiple: int = DEFAULT_PIXEL_MULTIPLE) -> PixelBudget:
    """A :class:`PixelBudget` from a budget or a longest-edge ``frame_size`` on the ``multiple`` grid."""
    return size if isinstance(size, PixelBudget) else PixelBudget(frame_size=int(size), factor=multiple)


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
        raise UserError(
            f"frame_size {frame_size} is smaller than the pixel multiple {multiple}; use >= {multiple}"
        )
    cap = frame_size // multiple * multiple
    scale = min(1.0, cap / max(width, height))

    def _round(edge: float) -> int:
        units = int(edge / multiple + 0.5)
        return min(cap, max(multiple, units * multiple))

    return _round(width * scale), _round(height * scale)


def _pil_to_array(img: Any, size: PixelBudget | int, multiple: int = DEFAULT_PIXEL_MULTIPLE) -> np.ndarray:
    return fit_frame(np.array(img.convert("RGB"), dtype=np.uint8), size, multiple)


def fit_frame(array: np.ndarray, size: PixelBudget | int, multiple: int = DEFAULT_PIXEL_MULTIPLE) -> np.ndarray:
    """An HxWx3 uint8 frame resized to its pixel budget (unchanged when it already fits)."""
    h, w = array.shape[:2]
    target = as_budget(size, multiple).target_size(w, h)
    return array if target == (w, h) else resize_uint8(array, target)


def resize_uint8(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Antialiased bicubic resize of an HxWx3 uint8 frame to (width, height) on uint8 tensors (torchvision):
    within a grey level or two of PIL's bicubic and several times faster."""
    import torch
    from torchvision.transforms.v2 import functional as tvf

    tensor = torch.from_numpy(array).permute(2, 0, 1)
    out = tvf.resize(tensor, [size[1], size[0]], interpolation=tvf.InterpolationMode.BICUBIC, antialias=True)
    return out.permute(1, 2, 0).contiguous().numpy()


_JPEG_MAGIC = b"\xff\xd8"


def _read_media_file(path: Path | str, what: str) -> bytes:
    p = Path(path)
    if p.is_dir():
        raise MediaError(f"{p} is a directory where a {what} file is expected; point the path at the file")
    try:
        data = p.read_bytes()
    except FileNotFoundError as err:
        raise MediaError(f"{what} file not found: {p}") from err
    except OSError as err:
        raise MediaError(f"cannot read {what} file {p}: {err}") from err
    if not data:
        raise MediaError(f"{what} file {p} is empty (0 bytes); re-extract it")
    return data


def decode_image(path: Path | str) -> np.ndarray:
    """Decode an image file as uint8 HxWx3 RGB at its full size, refusing damaged files.

    JPEG goes through libjpeg-turbo (``simplejpeg``, the library PIL uses, so the pixels are PIL's) with its
    corrupt-data warnings raised as errors: a scan cut short, a premature end of a data segment or a bad Huffman
    code is a :class:`MediaError`, not a frame with a grey lower half. (A flipped bit inside a coefficient's
    magnitude bits changes one 8x8 block and leaves no trace any decoder could see: JPEG has no checksum.) Other
    formats go through PIL; a truncated PNG or a PNG whose zlib data is damaged raises.
    """
    data = _read_media_file(path, "frame")
    if data[:2] == _JPEG_MAGIC:
        import simplejpeg

        try:
            colorspace = simplejpeg.decode_jpeg_header(data)[2]
        except ValueError as err:
            raise MediaError(f"damaged JPEG {path}: {err}; re-extract the frame") from err
        if colorspace not in ("CMYK", "YCCK"):  # PIL converts CMYK (Adobe) JPEGs; libjpeg-turbo cannot
            try:
                return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
            except ValueError as err:
                raise MediaError(
                    f"damaged JPEG {path}: libjpeg reports '{err}' (decoded, the frame would be partly grey or "
                    "garbled); re-extract the frame"
                ) from err
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return np.array(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise MediaError(f"cannot decode frame {path}: {err} (damaged or not an image; re-extract it)") from err


def load_frame(path: Path | str, frame_size: PixelBudget | int, multiple: int = DEFAULT_PIXEL_MULTIPLE) -> np.ndarray:
    """Decode an image (:func:`decode_image`, which refuses damaged files) and resize it (antialiased bicubic) to
    the pixel budget ``frame_size`` (a :class:`PixelBudget`, or a longest edge on the ``multiple`` grid): one
    function from a path and size settings to a uint8 HxWx3 array."""
    return fit_frame(decode_image(path), frame_size, multiple)


def verify_image(path: Path | str) -> tuple[int, int]:
    """Cheap integrity check without a full decode; returns ``(width, height)``.

    PIL ``verify()`` (checks PNG chunk CRCs; for JPEG it only parses the headers), plus, for JPEG, the
    end-of-image marker ``FFD9`` must appear in the last 1 KiB, which catches truncated files. Damage inside the
    JPEG scan passes this check: only a full decode (:func:`decode_image`, run by ``surgvqa.data check``) sees it.
    """
    from PIL import Image, UnidentifiedImageError

    if Path(path).is_dir():
        raise MediaError(f"{path} is a directory where a frame file is expected; point the path at the file")
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


def load_video_frames(path: Path | str, num_frames: int | None, frame_size: PixelBudget | int,
                      multiple: int = DEFAULT_PIXEL_MULTIPLE, times: list[float] | None = None) -> list[np.ndarray]:
    """Decode a video file with PyAV, keep ``num_frames`` evenly spaced frames (:func:`subsample_indices`), resize
    to the pixel budget ``frame_size`` (a :class:`PixelBudget`, or a longest edge on the ``multiple`` grid).

    ``times``, when given, receives each kept frame's presentation time in seconds (the video's own clock).
    """
    import av

    if Path(path).is_dir():
        raise MediaError(f"{path} is a directory where a video file is expected; point the path at the file")
    stamps: dict[int, float] = {}

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
                        if frame.time is not None:
                            stamps[count] = float(frame.time)
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
            return _with_times(kept, indices, stamps, times)
        # The container's frame count was wrong: resample with the real count.
        indices = subsample_indices(count, num_frames)
        if count and set(indices) <= kept.keys():
            return _with_times(kept, indices, stamps, times)
        kept, count = _decode(set(indices))
    else:
        _, count = _decode(set())
        indices = subsample_indices(count, num_frames)
        kept, count = _decode(set(indices))
    if count == 0:
        raise MediaError(f"video file {path} has no decodable frames")
    return _with_times(kept, indices, stamps, times)


def _with_times(kept: dict[int, np.ndarray], indices: list[int], stamps: dict[int, float],
                times: list[float] | None) -> list[np.ndarray]:
    if times is not None:
        times[:] = [stamps[i] for i in indices] if all(i in stamps for i in indices) else []
    return [kept[i] for i in indices]


def verify_video(path: Path | str) -> None:
    """Cheap integrity check of a video file: it opens, has a video stream, and its first frame decodes."""
    import av

    if Path(path).is_dir():
        raise MediaError(f"{path} is a directory where a video file is expected; point the path at the file")
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


def constant_frames_like(frames: Sequence[np.ndarray], rgb: Sequence[int]) -> list[np.ndarray]:
    """Every frame replaced by one constant colour ``rgb`` (same count and shape, uint8): video ablation.

    The colour is the same for every frame of every sample (callers pass the processor's normalisation mean, so
    the model sees zeros after normalisation); nothing of the clip survives but the frame count and size.
    """
    fill = np.asarray(rgb, dtype=np.int64)
    if fill.shape != (3,) or fill.min() < 0 or fill.max() > 255:
        raise ValueError(f"constant_frames_like: rgb must be 3 values in 0-255, got {list(rgb)}")
    return [np.broadcast_to(fill.astype(np.uint8), np.asarray(f).shape).copy() for f in frames]


def derangement(groups: Sequence[Any], seed: int) -> list[int]:
    """A seeded permutation ``p`` with ``p[i] != i`` that gives each position a donor from another group.

    ``groups[i]`` is the group of item ``i`` (the video of a sample). Groups are shuffled internally and in
    order (seeded), laid out one after another with the largest first, and each position takes the item ``m``
    places further on (``m`` = the largest group's size). This pairs every item with another group whenever the
    largest group holds at most half of the items, and otherwise as many items as possible (the rest get another
    item of their own group). Needs at least two items.
    """
    import random

    n = len(groups)
    if n < 2:
        raise UserError(f"a shuffle ablation needs at least 2 samples to exchange media, got {n}")
    rng = random.Random(seed)
    members: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    blocks = list(members.values())
    for block in blocks:
        rng.shuffle(block)
    rng.shuffle(blocks)
    blocks.sort(key=len, reverse=True)  # stable: equal sizes keep their shuffled order
    order = [i for block in blocks for i in block]
    shift = len(blocks[0]) if len(blocks[0]) < n else rng.randrange(1, n)
    donors = [0] * n
    for pos, item in enumerate(order):
        donors[item] = order[(pos + shift) % n]
    return donors
