"""How media reach the page: small JPEG thumbnails of frames and video files and Ogg/Vorbis spoken questions,
encoded on a few threads into stores with a size cap, or linked by relative path. PIL and soundfile are imported
only when something is encoded, so ``import surgvqa.html_report`` stays light."""

from __future__ import annotations

import base64
import io
import math
import os
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgvqa.media import MediaError, load_audio, load_video_frames

# A thumbnail holds at most this many pixels (aspect ratio kept, never enlarged): 1352x1080 -> 179x143.
THUMB_MAX_PIXELS = 160 * 160
THUMB_QUALITY = 72
# Spoken questions are embedded at 8 kHz: speech stays intelligible and encoding stays fast.
AUDIO_RATE = 8000
VIDEO_FILE_THUMBS = 8

LEFT_OUT = "left out: the report reached its size cap"
Encoded = list[tuple[bytes, str]]  # (data, MIME type) per embedded item; a video file gives several frames


class MediaStore:
    """Embedded media, each distinct file once (three questions about one clip share its frames), up to a cap.

    ``fill`` encodes the files in the order the cards list them, on a few threads (PIL and libsndfile release the
    GIL), and keeps them until the cap; ``get`` answers ``(keys, None)`` or ``([], reason)``: the file could not be
    read, or it came after the cap (counted in ``left_out``). Keys are opaque ("f12"); a card names its own only.
    """

    def __init__(self, prefix: str, cap_bytes: int) -> None:
        self.prefix, self.cap = prefix, cap_bytes
        self.items: dict[str, str] = {}
        self.used = 0
        self.left_out = 0
        self.full = False
        self._done: dict[Any, tuple[list[str], str | None]] = {}

    def get(self, ident: Any) -> tuple[list[str], str | None]:
        return self._done[ident]

    def fill(self, jobs: Iterable[tuple[Any, Callable[[], Encoded]]], workers: int | None = None) -> None:
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        unique: dict[Any, Callable[[], Encoded]] = {}
        for ident, encode in jobs:
            if ident not in self._done:
                unique.setdefault(ident, encode)
        todo = iter(unique.items())
        workers = workers or min(8, os.cpu_count() or 1)
        window: deque = deque()
        with ThreadPoolExecutor(max_workers=workers) as pool:

            def submit_next() -> None:
                for ident, encode in todo:
                    window.append((ident, pool.submit(_attempt, encode)))
                    return

            for _ in range(4 * workers):
                submit_next()
            while window:
                ident, future = window.popleft()
                self._accept(ident, future.result())
                if not self.full:
                    submit_next()
        for ident, _ in todo:  # never started: the cap was reached
            self._accept(ident, [])

    def _accept(self, ident: Any, result: Encoded | Exception) -> None:
        if isinstance(result, Exception):
            self._done[ident] = ([], f"cannot read {Path(ident).name}: {result}")
            return
        uris = [f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}" for data, mime in result]
        if self.full or not uris or self.used + sum(map(len, uris)) > self.cap:
            self.full = True
            self.left_out += 1
            self._done[ident] = ([], LEFT_OUT)
            return
        keys = []
        for uri in uris:
            keys.append(f"{self.prefix}{len(self.items)}")
            self.items[keys[-1]] = uri
            self.used += len(uri)
        self._done[ident] = (keys, None)


def _attempt(encode: Callable[[], Encoded]) -> Encoded | Exception:
    try:
        return encode()
    except (OSError, ValueError) as err:  # MediaError is a ValueError; PIL raises OSError subclasses
        return err


def _thumb_size(width: int, height: int) -> tuple[int, int]:
    scale = min(1.0, math.sqrt(THUMB_MAX_PIXELS / float(width * height)))
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


def _jpeg(img: Any) -> tuple[bytes, str]:
    from PIL import Image

    img = img.convert("RGB")
    size = _thumb_size(*img.size)
    if img.size != size:
        img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=THUMB_QUALITY, optimize=True)
    return buf.getvalue(), "image/jpeg"


def thumbnail_jpeg(path: Path) -> Encoded:
    """A JPEG thumbnail of an image file within ``THUMB_MAX_PIXELS`` (JPEG sources decode at reduced scale)."""
    from PIL import Image

    with Image.open(path) as img:
        img.draft("RGB", _thumb_size(*img.size))
        img.load()
        return [_jpeg(img)]


def _speech_at_audio_rate(path: Path) -> Any:
    """Mono float32 at ``AUDIO_RATE``. Files at a multiple of it (16, 24, 48 kHz) are low-passed (windowed sinc)
    and decimated here; other rates go through ``surgvqa.media.load_audio``'s torchaudio resampler, whose import
    would otherwise cost seconds per report."""
    import numpy as np
    import soundfile as sf

    try:
        rate = int(sf.info(str(path)).samplerate)
    except Exception as err:  # soundfile raises several types; load_audio names the file and the fix
        if not Path(path).is_file():
            raise MediaError(f"audio file not found: {path}") from err
        rate = 0
    if rate < AUDIO_RATE or rate % AUDIO_RATE:
        return load_audio(path, AUDIO_RATE)
    wave = load_audio(path, rate)
    factor = rate // AUDIO_RATE
    if factor == 1:
        return wave
    taps = 16 * factor + 1
    n = np.arange(taps) - (taps - 1) / 2
    kernel = np.sinc(0.9 * n / factor) * np.hamming(taps)
    return np.convolve(wave, kernel / kernel.sum(), mode="same")[::factor].astype(np.float32)


def audio_ogg(path: Path) -> Encoded:
    """A spoken question as Ogg/Vorbis, 8 kHz mono at the lowest quality (plenty for speech, ~4 KB per second);
    WAV where libsndfile has no Vorbis."""
    import soundfile as sf

    wave = _speech_at_audio_rate(path)
    buf = io.BytesIO()
    try:
        sf.write(buf, wave, AUDIO_RATE, format="OGG", subtype="VORBIS", compression_level=1.0)
        return [(buf.getvalue(), "audio/ogg")]
    except (sf.LibsndfileError, TypeError, ValueError, RuntimeError):
        buf = io.BytesIO()
        sf.write(buf, wave, AUDIO_RATE, format="WAV", subtype="PCM_16")
        return [(buf.getvalue(), "audio/wav")]


def video_thumbs(path: Path) -> Encoded:
    """``VIDEO_FILE_THUMBS`` evenly spaced frames of a video file (``surgvqa.media.load_video_frames``) as JPEGs."""
    from PIL import Image

    frames = load_video_frames(path, VIDEO_FILE_THUMBS, frame_size=int(math.sqrt(THUMB_MAX_PIXELS) * 1.5))
    return [_jpeg(Image.fromarray(a)) for a in frames]


def href(path: Path, out_dir: Path) -> str:
    """A link to ``path`` from a page in ``out_dir``: relative and URL-quoted (a file URI across drives)."""
    try:
        rel = os.path.relpath(path, out_dir)
    except ValueError:  # another drive (Windows)
        return path.resolve().as_uri()
    return urllib.parse.quote(rel.replace(os.sep, "/"))


@dataclass
class MediaOutput:
    """How media reach the page: embedded in two stores (frames, spoken questions), or linked by a path relative
    to the report's folder (``link``: the stores stay empty)."""

    link: bool
    out_dir: Path
    frames: MediaStore
    audio: MediaStore
