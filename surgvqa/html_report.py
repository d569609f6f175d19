"""One self-contained HTML report per run: summary, per-type results, paired comparisons, training curves and a
viewer of every sample with its own frames, spoken question, gold answers and prediction.

    surgvqa report preds.jsonl [--compare ablated.jsonl ...] [--frames_dir D --audio_dir A] [--train_dir RUN]
        [--link_media] --output report.html
    python -m surgvqa.html_report ...            (the same)

Every number is re-computed from the predictions file(s) with ``surgvqa.metrics``; nothing is read from a stored
summary. The page needs no network: CSS, JavaScript and SVG charts are inline; frames are embedded as small JPEG
thumbnails (a pixel budget per frame, a size cap for the whole file) and spoken questions as Ogg/Vorbis, or both are
linked by relative path with ``--link_media``. A card is keyed on (video_id, id) and carries its own frames, so one
sample's frames can never sit next to another's question.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import io
import json
import math
import os
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from surgvqa import __version__
from surgvqa.errors import ArgumentParser, UserError, run_main, writable_file
from surgvqa.media import MediaConfig
from surgvqa.metrics import (
    AMBIGUOUS_LABEL,
    NONE_LABEL,
    SCORING_VERSION,
    paired_comparison,
    predicted_label,
    score_record,
    summarize,
)
from surgvqa.report import read_predictions, read_predictions_meta
from surgvqa.samples import load_samples

# A thumbnail holds at most this many pixels (aspect ratio kept, never enlarged): 1352x1080 -> 179x143.
THUMB_MAX_PIXELS = 160 * 160
THUMB_QUALITY = 72
# Embedded media stop at these sizes (base64 text); cards past the cap say so and the page notes it.
MAX_EMBEDDED_FRAME_BYTES = 24 * 2**20
MAX_EMBEDDED_AUDIO_BYTES = 12 * 2**20
# Spoken questions are embedded at 8 kHz: speech stays intelligible and encoding stays fast.
AUDIO_RATE = 8000
VIDEO_FILE_THUMBS = 8
GENERATOR = f"surgvqa {__version__} html_report"

Key = tuple[str | None, str]


class ReportError(UserError):
    """A user error: a missing or unreadable input, an output that would overwrite something else."""


# ------------------------------------------------------------------------------------------------------------
# Where the meta record keeps each field (one place, so a renamed field is a one-line change).
_META_FIELDS: dict[str, tuple[str, ...]] = {
    "data_path": ("eval_data_path",),
    "data_hash": ("eval_data_sha256",),
    "frames_dir": ("frames_dir",),
    "audio_dir": ("audio_dir",),
    "frame_path_template": ("frame_path_template",),
    "audio_path_template": ("audio_path_template",),
    "candidates": ("candidates",),
    "ablate": ("ablate",),
    "checkpoint": ("checkpoint",),
}


def _meta(meta: Mapping[str, Any] | None, name: str) -> Any:
    if not meta:
        return None
    for field_name in _META_FIELDS[name]:
        value = meta.get(field_name)
        if value is None and isinstance(meta.get("media"), Mapping):
            value = meta["media"].get(field_name)
        if value is not None:
            return value
    return None


def _key(record: Mapping[str, Any]) -> Key:
    return (record.get("video_id") or None, str(record["id"]))


def _norm(text: Any) -> str:
    return str(text).strip().lower()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    """One predictions file, scored: records, meta, the summary and per-record strict hits / predicted labels."""

    path: Path
    label: str
    meta: dict[str, Any] | None
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    hits: list[dict[str, bool | None]]
    labels: list[str]
    by_key: dict[Key, int]


def load_run(path: Path, label: str | None = None) -> Run:
    """Read and score one predictions file (our format with or without its meta line, or the original toolkit's)."""
    if not path.exists():
        raise ReportError(f"predictions file {path} not found; pass the --output_file of evaluate_checkpoint.py")
    if not path.is_file():
        raise ReportError(f"{path} is a directory; pass the predictions JSONL file inside it")
    meta = read_predictions_meta(path)
    records = read_predictions(path)
    if not records:
        raise ReportError(f"{path} holds no predictions; re-run the evaluation")
    candidates = _meta(meta, "candidates")
    summary = summarize(records, candidates=candidates)
    per_type = summary["per_type"]
    hits = [score_record(r, summary["candidates"]) for r in records]
    labels = [
        predicted_label(r.get("prediction") or "", per_type[r.get("question_type") or "<untyped>"]["candidates"])
        for r in records
    ]
    by_key: dict[Key, int] = {}
    for i, rec in enumerate(records):
        by_key.setdefault(_key(rec), i)
    if label is None:
        ablate = _meta(meta, "ablate")
        label = f"{path.stem} (ablate={ablate})" if ablate else path.stem
    return Run(path, label, meta, records, summary, hits, labels, by_key)


# ------------------------------------------------------------------------------------------------------ media
@dataclass
class Located:
    """The media of one (video_id, id) per the eval data file: frame names and paths (or a video file), the
    spoken question, the data file's question text, and every problem found (shown on the card, never hidden)."""

    frame_names: list[str] = field(default_factory=list)
    frame_paths: list[Path] = field(default_factory=list)
    video_path: Path | None = None
    audio_path: Path | None = None
    question: str | None = None
    problems: list[str] = field(default_factory=list)


def _find_data_file(meta: Mapping[str, Any] | None, predictions: Path) -> tuple[Path | None, str | None]:
    recorded = _meta(meta, "data_path")
    if not recorded:
        return None, None
    candidates = [Path(recorded)]
    if not Path(recorded).is_absolute():
        candidates.append(predictions.parent / recorded)
    for cand in candidates:
        if cand.is_file():
            return cand, None
    return None, (
        f"the eval data file recorded in {predictions.name}'s meta line ({recorded}) is not found, so the frames "
        "and audio of the samples cannot be located; build the report where that path exists"
    )


def locate_media(
    run: Run,
    *,
    frames_dir: str | Path | None,
    audio_dir: str | Path | None,
    frame_path_template: str | None,
    audio_path_template: str | None,
) -> tuple[dict[Key, Located], list[str]]:
    """Frames, video and audio of every predicted (video_id, id), from the eval data file named in the meta line,
    resolved and checked by ``surgvqa.samples.load_samples`` (path templates, containment under the roots, every
    file opened). Flags override the meta line's roots and templates.

    Returns ``(located, notes)``: every key of ``run`` gets an entry; a key whose media cannot be shown carries
    the reason, and a key whose data-file question differs from the prediction's question gets no media at all.
    """
    notes: list[str] = []
    data_path, missing = _find_data_file(run.meta, run.path)
    if missing:
        notes.append(missing)
    located: dict[Key, Located] = {}
    if data_path is not None:
        frames_root = frames_dir if frames_dir is not None else _meta(run.meta, "frames_dir")
        audio_root = audio_dir if audio_dir is not None else _meta(run.meta, "audio_dir")
        defaults = MediaConfig(frames_dir=None)
        media = MediaConfig(
            frames_dir=str(frames_root) if frames_root else None,
            audio_dir=str(audio_root) if audio_root else None,
            frame_path_template=frame_path_template
            or _meta(run.meta, "frame_path_template")
            or defaults.frame_path_template,
            audio_path_template=audio_path_template
            or _meta(run.meta, "audio_path_template")
            or defaults.audio_path_template,
            question_modality="text+audio" if audio_root else "text",
        )
        recorded_hash = _meta(run.meta, "data_hash")
        if recorded_hash and str(recorded_hash).split(":")[-1] != _sha256(data_path):
            notes.append(
                f"the eval data file {data_path} changed since the run (its sha256 differs from the meta line's); "
                "a card shows media only where the data file's question for its (video_id, id) is the "
                "prediction's question"
            )
        located = _load_located(data_path, media, notes)

    out: dict[Key, Located] = {}
    for rec in run.records:
        key = _key(rec)
        loc = located.get(key)
        if loc is None:
            if data_path is not None:
                reason = f"{_show_key(key)} is not in the eval data file {data_path}"
            elif missing:
                reason = "the eval data file was not found (see the note at the top)"
            else:
                reason = "the predictions file names no eval data file (it has no surgvqa_meta line)"
            loc = Located(problems=[f"no media: {reason}"])
        elif loc.question is not None and rec.get("question") is not None and loc.question != rec["question"]:
            loc = Located(problems=[
                f"media not shown: the data file's question for {_show_key(key)} is {loc.question!r}, not this "
                "prediction's question (the data file changed since the run?)"
            ])
        out[key] = loc
    return out, notes


def _show_key(key: Key) -> str:
    return f"(video_id={key[0]!r}, id={key[1]!r})"


def _frame_names_by_key(data_path: Path) -> dict[Key, list[str]]:
    """The ``frames`` list of every data line (Samples keep resolved paths; the card shows the names)."""
    names: dict[Key, list[str]] = {}
    with data_path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # load_samples reports it
            if isinstance(rec, dict) and isinstance(rec.get("frames"), list) and "id" in rec:
                names.setdefault((rec.get("video_id") or None, str(rec["id"])), [str(f) for f in rec["frames"]])
    return names


def _load_located(data_path: Path, media: Any, notes: list[str]) -> dict[Key, Located]:
    from dataclasses import replace

    samples, problems = load_samples(data_path, media, skip_bad=True, check_media=True)
    messages: dict[Key, list[str]] = {}
    for problem in problems:
        if problem.key is None:
            notes.append(f"{problem.source}: {problem.message}")
        else:
            messages.setdefault((problem.key[0] or None, str(problem.key[1])), []).append(problem.message)
    found = {s.key: s for s in samples}
    if media.needs_audio and messages:
        # A missing spoken question must not hide the frames: look again without audio for the keys that failed.
        text_only, _ = load_samples(
            data_path, replace(media, question_modality="text", audio_dir=None), skip_bad=True, check_media=True
        )
        found.update({s.key: s for s in text_only if s.key in messages and s.key not in found})
    names = _frame_names_by_key(data_path)
    out: dict[Key, Located] = {}
    for key, sample in found.items():
        out[key] = Located(
            frame_names=names.get(key, []) if sample.frame_paths else [],
            frame_paths=list(sample.frame_paths),
            video_path=sample.video_path,
            audio_path=sample.audio_path,
            question=sample.question,
            problems=messages.get(key, []),
        )
    for key, msgs in messages.items():
        out.setdefault(key, Located(problems=msgs))
    return out


# -------------------------------------------------------------------------------------------------- embedding
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

    from surgvqa.media import MediaError, load_audio

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

    from surgvqa.media import load_video_frames

    frames = load_video_frames(path, VIDEO_FILE_THUMBS, frame_size=int(math.sqrt(THUMB_MAX_PIXELS) * 1.5))
    return [_jpeg(Image.fromarray(a)) for a in frames]


def _href(path: Path, out_dir: Path) -> str:
    try:
        rel = os.path.relpath(path, out_dir)
    except ValueError:  # another drive (Windows)
        return path.resolve().as_uri()
    return urllib.parse.quote(rel.replace(os.sep, "/"))


# ------------------------------------------------------------------------------------------------------- svg
def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(1, count)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = first
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _fmt_tick(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 or v == int(v) else f"{v:.3g}"


PALETTE = ("#2f6fdf", "#e0892b", "#8a55c7", "#2a9d8f", "#c8372d", "#6c757d")


def svg_type_bars(
    types: Sequence[str],
    series: Sequence[tuple[str, Mapping[str, Mapping[str, Any]]]],
    majority: Mapping[str, float],
    chance: Mapping[str, float],
    collapsed: Iterable[str] = (),
) -> str:
    """Horizontal per-type accuracy bars (one per run) with 95 % interval whiskers, the majority baseline as a
    black line and chance as a dashed grey line. ``series``: (label, per_type summary) per run."""
    collapsed = set(collapsed)
    k = len(series)
    bar_h = 11 if k > 1 else 14
    group_h = k * (bar_h + 2) + 10
    left, right, top = 230, 60, 34
    width = 860
    plot_w = width - left - right
    height = top + group_h * len(types) + 26

    def x(v: float) -> float:
        return left + plot_w * max(0.0, min(1.0, v))

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="per question type accuracy">']
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{x(tick):.1f}" y1="{top - 4}" x2="{x(tick):.1f}" y2="{height - 22}" '
                     'stroke="#8884" stroke-width="1"/>')
        parts.append(f'<text x="{x(tick):.1f}" y="{height - 8}" text-anchor="middle">{100 * tick:.0f}%</text>')
    lx = left
    for j, (label, _) in enumerate(series):
        color = PALETTE[j % len(PALETTE)]
        parts.append(f'<rect x="{lx}" y="8" width="12" height="10" fill="{color}"/>'
                     f'<text x="{lx + 16}" y="17">{_e(label)}</text>')
        lx += 26 + 7 * len(label)
    parts.append(f'<line x1="{lx + 4}" y1="6" x2="{lx + 4}" y2="20" stroke="currentColor" stroke-width="2"/>'
                 f'<text x="{lx + 10}" y="17">majority</text>')
    parts.append(f'<line x1="{lx + 80}" y1="6" x2="{lx + 80}" y2="20" stroke="#888" stroke-width="1.5" '
                 f'stroke-dasharray="3 2"/><text x="{lx + 86}" y="17">chance</text>')
    for i, qtype in enumerate(types):
        y0 = top + i * group_h
        flag = "  ⚠ collapse" if qtype in collapsed else ""
        parts.append(f'<text x="{left - 8}" y="{y0 + group_h / 2 + 3:.1f}" text-anchor="end">'
                     f'{_e(qtype)}<tspan fill="#c8372d">{_e(flag)}</tspan></text>')
        for j, (label, per_type) in enumerate(series):
            t = per_type.get(qtype)
            if not t:
                continue
            yb = y0 + 5 + j * (bar_h + 2)
            color = "#c8372d" if (k == 1 and t.get("collapse")) else PALETTE[j % len(PALETTE)]
            lo, hi = t["ci95"]
            tip = (f"{label}: {qtype} {_pct(t['accuracy'])} [{100 * lo:.1f}, {100 * hi:.1f}] "
                   f"n={t['n']}")
            parts.append(f'<rect x="{left}" y="{yb}" width="{x(t["accuracy"]) - left:.1f}" height="{bar_h}" '
                         f'fill="{color}" opacity="0.85"><title>{_e(tip)}</title></rect>')
            cy = yb + bar_h / 2
            parts.append(f'<path d="M{x(lo):.1f} {cy:.1f}H{x(hi):.1f}M{x(lo):.1f} {cy - 3:.1f}V{cy + 3:.1f}'
                         f'M{x(hi):.1f} {cy - 3:.1f}V{cy + 3:.1f}" stroke="currentColor" stroke-width="1.2" '
                         'fill="none"/>')
        if qtype in majority:
            mx = x(majority[qtype])
            parts.append(f'<line x1="{mx:.1f}" y1="{y0 + 2}" x2="{mx:.1f}" y2="{y0 + group_h - 6}" '
                         f'stroke="currentColor" stroke-width="2"><title>majority baseline '
                         f'{_pct(majority[qtype])}</title></line>')
        if qtype in chance:
            cx = x(chance[qtype])
            parts.append(f'<line x1="{cx:.1f}" y1="{y0 + 2}" x2="{cx:.1f}" y2="{y0 + group_h - 6}" '
                         f'stroke="#888" stroke-width="1.5" stroke-dasharray="3 2"><title>chance '
                         f'{_pct(chance[qtype])}</title></line>')
        parts.append(f'<text x="{width - right + 6}" y="{y0 + group_h / 2 + 3:.1f}">'
                     f'{_pct(series[0][1].get(qtype, {}).get("accuracy"), 0)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_scale(acc: float, lo: float, hi: float, majority: float, chance: float) -> str:
    """One accuracy on a 0-100 % scale: the interval, the point, and the majority and chance markers."""
    width, left, right = 420, 12, 12
    plot_w = width - left - right

    def x(v: float) -> float:
        return left + plot_w * max(0.0, min(1.0, v))

    return (
        f'<svg class="chart" viewBox="0 0 {width} 62" role="img" aria-label="accuracy with 95% interval">'
        f'<rect x="{left}" y="22" width="{plot_w}" height="8" rx="4" fill="#8882"/>'
        f'<rect x="{x(lo):.1f}" y="22" width="{max(2.0, x(hi) - x(lo)):.1f}" height="8" rx="4" fill="#2f6fdf66"/>'
        f'<circle cx="{x(acc):.1f}" cy="26" r="6" fill="#2f6fdf"><title>strict accuracy {_pct(acc)}</title></circle>'
        f'<line x1="{x(majority):.1f}" y1="14" x2="{x(majority):.1f}" y2="38" stroke="currentColor" '
        f'stroke-width="2"/><text x="{x(majority):.1f}" y="10" text-anchor="middle">majority</text>'
        f'<line x1="{x(chance):.1f}" y1="18" x2="{x(chance):.1f}" y2="34" stroke="#888" stroke-width="1.5" '
        f'stroke-dasharray="3 2"/><text x="{x(chance):.1f}" y="50" text-anchor="middle" fill="#888">chance</text>'
        f'<text x="{left}" y="60" font-size="10">0%</text>'
        f'<text x="{width - right}" y="60" text-anchor="end" font-size="10">100%</text></svg>'
    )


def svg_lines(
    series: Sequence[tuple[str, Sequence[tuple[float, float]]]],
    *,
    y_label: str,
    y_range: tuple[float, float] | None = None,
    marker_x: float | None = None,
    marker_label: str = "",
    percent: bool = False,
) -> str:
    """A line chart of (step, value) series with nice ticks; an optional vertical marker (the best checkpoint)."""
    width, height = 560, 250
    left, right, top, bottom = 56, 16, 28, 38
    xs = [p[0] for _, pts in series for p in pts]
    ys = [p[1] for _, pts in series for p in pts]
    if not xs:
        return ""
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_hi = x_lo + 1
    if x_lo > 0:
        x_lo = 0.0  # curves of one run share the step axis from 0
    if y_range:
        y_lo, y_hi = y_range
    else:
        y_lo, y_hi = min(ys), max(ys)
        pad = (y_hi - y_lo) * 0.08 or abs(y_hi) * 0.1 or 1.0
        y_lo, y_hi = max(0.0, y_lo - pad) if y_lo >= 0 else y_lo - pad, y_hi + pad
    pw, ph = width - left - right, height - top - bottom

    def px(v: float) -> float:
        return left + pw * (v - x_lo) / (x_hi - x_lo)

    def py(v: float) -> float:
        return top + ph * (1 - (v - y_lo) / (y_hi - y_lo))

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{_e(y_label)}">']
    for t in _nice_ticks(y_lo, y_hi):
        parts.append(f'<line x1="{left}" y1="{py(t):.1f}" x2="{width - right}" y2="{py(t):.1f}" stroke="#8883"/>'
                     f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">'
                     f'{f"{100 * t:.0f}%" if percent else _fmt_tick(t)}</text>')
    for t in _nice_ticks(x_lo, x_hi, 6):
        parts.append(f'<line x1="{px(t):.1f}" y1="{top + ph}" x2="{px(t):.1f}" y2="{top + ph + 4}" '
                     f'stroke="#888"/><text x="{px(t):.1f}" y="{top + ph + 16}" text-anchor="middle">'
                     f'{_fmt_tick(t)}</text>')
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{height - 4}" text-anchor="middle" fill="#888">step</text>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#888"/>'
                 f'<line x1="{left}" y1="{top + ph}" x2="{width - right}" y2="{top + ph}" stroke="#888"/>')
    if marker_x is not None and x_lo <= marker_x <= x_hi:
        parts.append(f'<line x1="{px(marker_x):.1f}" y1="{top}" x2="{px(marker_x):.1f}" y2="{top + ph}" '
                     f'stroke="#1f8a4c" stroke-dasharray="4 3"/><text x="{px(marker_x) + 4:.1f}" y="{top + 10}" '
                     f'fill="#1f8a4c">{_e(marker_label)}</text>')
    lx = left
    for j, (label, pts) in enumerate(series):
        color = PALETTE[j % len(PALETTE)]
        path = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in pts)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.8"/>')
        if len(pts) <= 60:
            parts.extend(f'<circle cx="{px(a):.1f}" cy="{py(b):.1f}" r="2.6" fill="{color}">'
                         f'<title>{_e(label)} step {_fmt_tick(a)}: {b:.4g}</title></circle>' for a, b in pts)
        parts.append(f'<rect x="{lx}" y="8" width="12" height="4" fill="{color}"/>'
                     f'<text x="{lx + 16}" y="14">{_e(label)}</text>')
        lx += 30 + 7 * len(label)
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------------------------------- training
def read_run_settings(directory: Path) -> dict[str, Any] | None:
    """The run's settings (``surgvqa_config.json``, read and validated by :class:`surgvqa.run_config.RunConfig`)
    as a dict, or None when the directory has none."""
    from surgvqa.run_config import RunConfig

    config = RunConfig.find(directory)
    return None if config is None else config.to_dict()


def _checkpoints(train_dir: Path) -> list[Path]:
    found = []
    for child in train_dir.glob("checkpoint-*"):
        suffix = child.name.split("-", 1)[1]
        if child.is_dir() and suffix.isdigit():
            found.append((int(suffix), child))
    return [p for _, p in sorted(found)]


@dataclass
class Training:
    directory: Path
    state_path: Path | None
    state: dict[str, Any] | None
    settings: dict[str, Any] | None
    settings_path: Path | None
    args: dict[str, Any] | None
    notes: list[str]


def load_training(train_dir: str | Path) -> Training:
    """``trainer_state.json`` (the run's own, else its latest checkpoint's), the run's settings and its training
    arguments. A directory with none of them is a user error; a missing part becomes a note."""
    directory = Path(train_dir)
    if not directory.is_dir():
        raise ReportError(f"--train_dir {directory} is not a directory; pass the training --output_dir")
    places = [directory, *reversed(_checkpoints(directory))]
    state_path = next((p / "trainer_state.json" for p in places if (p / "trainer_state.json").is_file()), None)
    settings_dir = next((p for p in places if (p / "surgvqa_config.json").is_file()), None)
    args_path = next((p / "training_args.json" for p in places if (p / "training_args.json").is_file()), None)
    if state_path is None and settings_dir is None:
        raise ReportError(
            f"--train_dir {directory} holds no trainer_state.json and no surgvqa_config.json (nor any "
            "checkpoint-N folder with them); pass the --output_dir of the training run"
        )
    notes = []
    state = None
    if state_path is None:
        notes.append(
            f"{directory} holds no trainer_state.json (the Trainer writes it into each checkpoint-N; a run trained "
            "with --save_strategy no keeps none), so there are no training curves"
        )
    else:
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ReportError(f"{state_path}:{err.lineno}: invalid JSON ({err.msg})") from err
    args = None
    if args_path is not None:
        try:
            args = json.loads(args_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            notes.append(f"{args_path} is not valid JSON; training arguments not shown")
    settings = read_run_settings(settings_dir) if settings_dir else None
    return Training(directory, state_path, state, settings,
                    settings_dir / "surgvqa_config.json" if settings_dir else None, args, notes)


TRAINING_ARG_KEYS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "warmup_ratio", "warmup_steps", "lr_scheduler_type", "weight_decay", "optim", "bf16", "fp16", "seed",
    "eval_strategy", "save_strategy", "metric_for_best_model", "load_best_model_at_end", "gradient_checkpointing",
)


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for k, v in obj.items():
        if isinstance(v, Mapping) and v:
            rows.extend(_flatten(v, f"{prefix}{k}."))
        else:
            rows.append((f"{prefix}{k}", v))
    return rows


def _value(v: Any) -> str:
    if isinstance(v, str):
        return v
    return "none" if v is None else json.dumps(v, ensure_ascii=False)


def _kv_table(rows: Iterable[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_value(v))}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def section_training(training: Training) -> str:
    parts = ['<section id="training"><h2>Training</h2>']
    parts.append(f'<p class="muted mono">{_e(training.directory)}</p>')
    state = training.state or {}
    history = state.get("log_history") or []
    loss = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    eval_loss = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    eval_acc = [(h["step"], h["eval_accuracy"]) for h in history if "eval_accuracy" in h and "step" in h]
    best = state.get("best_model_checkpoint")
    best_step = None
    if best and str(best).rsplit("-", 1)[-1].isdigit():
        best_step = int(str(best).rsplit("-", 1)[-1])
    charts = []
    if loss or eval_loss:
        series = [s for s in (("train loss", loss), ("eval loss", eval_loss)) if s[1]]
        charts.append(("loss", svg_lines(series, y_label="loss", marker_x=best_step, marker_label="best")))
    if eval_acc:
        charts.append(("eval accuracy (generated answers, strict)",
                       svg_lines([("eval_accuracy", eval_acc)], y_label="eval accuracy", y_range=(0.0, 1.0),
                                 marker_x=best_step, marker_label="best", percent=True)))
    if charts:
        parts.append('<div class="grid2 even">')
        for title, svg in charts:
            parts.append(f'<div class="panel"><h3>{_e(title)}</h3>{svg}</div>')
        parts.append("</div>")
    elif training.state is not None:
        parts.append('<p class="muted">trainer_state.json has no logged loss or evaluation yet.</p>')
    if training.state is not None:
        facts = [("trainer_state.json", str(training.state_path)), ("global_step", state.get("global_step")),
                 ("epoch", state.get("epoch"))]
        if best:
            facts += [("best checkpoint", best), ("best metric", state.get("best_metric"))]
        if eval_acc:
            top = max(eval_acc, key=lambda p: p[1])
            facts.append(("highest eval_accuracy", f"{_pct(top[1])} at step {top[0]}"))
        parts.append(f'<div class="panel" style="margin-top:12px">{_kv_table(facts)}</div>')
    settings_rows: list[tuple[str, Any]] = []
    if training.settings is not None:
        settings_rows += [(k, v) for k, v in _flatten(training.settings) if k != "tokenizer_repair"]
    if training.args:
        settings_rows += [(f"training_args.{k}", training.args[k]) for k in TRAINING_ARG_KEYS if k in training.args]
    if settings_rows:
        source = training.settings_path or training.directory
        half = (len(settings_rows) + 1) // 2
        parts.append(f'<h3>Settings <span class="muted mono">{_e(source)}</span></h3>'
                     f'<div class="panel grid2 even">{_kv_table(settings_rows[:half])}'
                     f'{_kv_table(settings_rows[half:])}</div>')
    parts.append("</section>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------------- summary
def _meta_rows(run: Run) -> str:
    rows: list[tuple[str, Any]] = [("file", str(run.path)), ("sha256", _sha256(run.path)),
                                   ("predictions", len(run.records))]
    if run.meta is None:
        return (_kv_table(rows) + '<p class="media-note">meta: unknown. This file has no surgvqa_meta line (it was '
                "written by the original toolkit or an older surgvqa), so its checkpoint, data, ablation and "
                "preprocessing are not recorded.</p>")
    candidate_fields = set(_META_FIELDS["candidates"])
    for k, v in run.meta.items():
        if k in candidate_fields and isinstance(v, Mapping):
            rows.append((k, f"{len(v)} question types (the closed answer sets used for scoring)"))
        elif isinstance(v, Mapping):
            rows.extend((f"{k}.{kk}", vv) for kk, vv in v.items())
        else:
            rows.append((k, v))
    return _kv_table(rows)


def section_summary(run: Run) -> str:
    s = run.summary
    lo, hi = s["accuracy_ci95"]
    delta = s["accuracy"] - s["majority_baseline"]
    cls = "pos" if lo > s["majority_baseline"] else "neg" if hi < s["majority_baseline"] else ""
    meteor = _pct(s["meteor"]) if s.get("meteor") is not None else f"unavailable ({s.get('meteor_unavailable')})"
    no_eos = f"{s['no_eos']} / {s['n']}"
    if s.get("eos_unknown"):
        no_eos += f" ({s['eos_unknown']} lines do not record stopped_by_eos)"
    metrics = [
        ("K-ACC (SurgViVQA keyword)", f"{_pct(s['k_acc'])} of {s['k_acc_n']} counted"),
        ("substring (original toolkit rule)", _pct(s["substring_acc"])),
        ("exact match (long answer)", _pct(s["exact_match"])),
        ("BLEU-4", f"{s['bleu4']:.3f}"),
        ("ROUGE-L", f"{s['rouge_l']:.3f}"),
        ("METEOR", meteor),
        ("no EOS (loops or cut at max tokens)", no_eos),
        ("mean new tokens", "n/a" if s.get("mean_new_tokens") is None else f"{s['mean_new_tokens']:.1f}"),
        ("collapsed types", ", ".join(s["collapsed_types"]) or "none"),
        ("scoring", s.get("scoring")),
    ]
    return (
        '<section id="summary"><h2>Summary</h2><div class="grid2"><div class="panel">'
        f'<div class="headline"><span class="big" id="overall-accuracy">{_pct(s["accuracy"])}</span>'
        f'<span class="ci">strict accuracy, 95 % CI [{100 * lo:.1f}, {100 * hi:.1f}] · '
        f'{s["accuracy_hits"]} of {s["n"]}</span></div>'
        f'<p>majority baseline <b>{_pct(s["majority_baseline"])}</b> '
        f'(<span class="delta {cls}">{100 * delta:+.1f} pts</span>) · chance {_pct(s["chance_baseline"])}</p>'
        f'{svg_scale(s["accuracy"], lo, hi, s["majority_baseline"], s["chance_baseline"])}'
        f'<h3>Other metrics</h3>{_kv_table(metrics)}</div>'
        f'<div class="panel"><h3 style="margin-top:0">Run</h3>{_meta_rows(run)}</div></div></section>'
    )


# ------------------------------------------------------------------------------------------------ per type
MAX_MATRIX_ANSWERS = 14


def _gold_label(short: str, candidates: Sequence[str]) -> str:
    return next((c for c in candidates if _norm(c) == _norm(short)), short)


def confusion(run: Run) -> dict[str, Counter[tuple[str, str]]]:
    """(gold answer, predicted answer) counts per question type; predicted = ``surgvqa.metrics.predicted_label``."""
    out: dict[str, Counter[tuple[str, str]]] = {}
    per_type = run.summary["per_type"]
    for rec, label in zip(run.records, run.labels, strict=True):
        qtype = rec.get("question_type") or "<untyped>"
        gold = _gold_label(str(rec["short_answer"]), per_type[qtype]["candidates"])
        out.setdefault(qtype, Counter())[(gold, label)] += 1
    return out


def _matrix(qtype: str, t: Mapping[str, Any], counts: Counter[tuple[str, str]]) -> str:
    gold_n = Counter()
    pred_n = Counter()
    for (g, p), c in counts.items():
        gold_n[g] += c
        pred_n[p] += c
    answers = list(t["candidates"])
    if len(answers) > MAX_MATRIX_ANSWERS:
        answers = [a for a, _ in (gold_n + pred_n).most_common(MAX_MATRIX_ANSWERS - 1)]
    other = "(other)"
    shown = set(answers)

    def fold(a: str) -> str:
        return a if a in shown or a in (NONE_LABEL, AMBIGUOUS_LABEL) else other

    folded: Counter[tuple[str, str]] = Counter()
    for (g, p), c in counts.items():
        folded[(fold(g), fold(p))] += c
    rows = answers + ([other] if any(g == other for g, _ in folded) else [])
    cols = answers + [c for c in (other, NONE_LABEL, AMBIGUOUS_LABEL) if any(p == c for _, p in folded)]
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = []
    for g in rows:
        total = sum(folded[(g, c)] for c in cols)
        cells = []
        for c in cols:
            n = folded[(g, c)]
            alpha = n / total if total else 0.0
            style = f"background:rgba(47,111,223,{0.85 * alpha:.2f});" + ("color:#fff;" if alpha > 0.5 else "")
            diag = ' class="diag"' if g == c else ""
            cells.append(f'<td{diag} style="{style}" title="gold {_e(g)}, predicted {_e(c)}: {n}">'
                         f'{n if n else ""}</td>')
        body.append(f"<tr><th>{_e(g)}</th>{''.join(cells)}</tr>")
    flag = ""
    if t["collapse"]:
        flag = (f'<span class="flag collapse" title="one answer for more than 90 % of the samples although the gold '
                f'answers differ">COLLAPSE</span><span class="muted">{_e(t["top_predicted"])} '
                f'{_pct(t["top_predicted_share"], 0)}</span>')
    return (f'<div class="cm"><h4>{_e(qtype)} <span class="muted">n={t["n"]}</span>{flag}</h4>'
            f'<table><thead><tr><th></th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
            '<div class="muted" style="font-size:11px">rows: gold · columns: predicted</div></div>')


def section_types(run: Run, compared: Sequence[Run]) -> str:
    per_type = run.summary["per_type"]
    types = list(per_type)
    series = [(run.label, per_type)] + [(c.label, c.summary["per_type"]) for c in compared]
    chart = svg_type_bars(
        types, series, {t: v["majority_baseline"] for t, v in per_type.items()},
        {t: v["chance_baseline"] for t, v in per_type.items()}, run.summary["collapsed_types"],
    )
    rows = []
    for qtype, t in per_type.items():
        lo, hi = t["ci95"]
        flag = '<span class="flag collapse">COLLAPSE</span>' if t["collapse"] else ""
        rows.append(
            f'<tr><td class="l">{_e(qtype)}</td><td>{t["n"]}</td><td>{_pct(t["accuracy"])}</td>'
            f'<td>[{100 * lo:.1f}, {100 * hi:.1f}]</td><td>{_pct(t["majority_baseline"])}</td>'
            f'<td class="l">{_e(t["majority_answer"])}</td><td>{_pct(t["chance_baseline"])}</td>'
            f'<td class="l">{_e(t["top_predicted"])} ({_pct(t["top_predicted_share"], 0)})</td>'
            f'<td>{_pct(t["k_acc"])}</td><td class="l">{flag}</td></tr>'
        )
    s = run.summary
    lo, hi = s["accuracy_ci95"]
    rows.append(
        f'<tr class="overall"><td class="l">overall</td><td>{s["n"]}</td><td>{_pct(s["accuracy"])}</td>'
        f'<td>[{100 * lo:.1f}, {100 * hi:.1f}]</td><td>{_pct(s["majority_baseline"])}</td><td></td>'
        f'<td>{_pct(s["chance_baseline"])}</td><td></td><td>{_pct(s["k_acc"])}</td><td></td></tr>'
    )
    table = (
        '<div class="tablewrap"><table class="data"><thead><tr><th class="l">question type</th><th>n</th>'
        '<th>strict acc.</th><th>95 % CI</th><th>majority</th><th class="l">majority answer</th><th>chance</th>'
        '<th class="l">top predicted (share)</th><th>K-ACC</th><th class="l"></th></tr></thead>'
        f'<tbody>{"".join(rows)}</tbody></table></div>'
    )
    matrices = confusion(run)
    cms = "".join(_matrix(q, per_type[q], matrices[q]) for q in types)
    legend = "this run" if not compared else "runs side by side"
    return (
        '<section id="types"><h2>Per question type</h2>'
        f'<div class="panel"><h3 style="margin-top:0">Strict accuracy with 95 % intervals ({legend}); solid line: '
        'majority baseline, dashed: chance</h3>'
        f'{chart}</div><div class="panel" style="margin-top:12px">{table}</div>'
        '<h3>Gold vs predicted answer (closed answer sets)</h3>'
        f'<p class="muted">Predicted = the one candidate the prediction states; {_e(NONE_LABEL)}: none stated, '
        f'{_e(AMBIGUOUS_LABEL)}: more than one. COLLAPSE: one answer for more than 90 % of a type whose gold answers '
        f'differ.</p><div class="cm-grid">{cms}</div></section>'
    )


# --------------------------------------------------------------------------------------------------- compare
# What a compared run lacks, by its meta line's ablation (words for the verdict).
REMOVED = {"video": "video", "audio": "audio", "both": "video and audio"}


@dataclass
class Pairing:
    """A paired comparison: ``run`` is the run that lacks something (the ablated one) or else the compared run,
    ``reference`` the other; ``result`` is ``surgvqa.metrics.paired_comparison(run, reference)``."""

    run: Run
    reference: Run
    result: dict[str, Any]


def pair_runs(this: Run, other: Run) -> Pairing:
    """Pair this report's run with a compared run, scored with this run's closed answer sets. An ablated run
    is always the "run" (so the verdict reads "video carries X pts"), whichever of the two files it is."""
    if _meta(this.meta, "ablate") and not _meta(other.meta, "ablate"):
        run, reference = this, other
    else:
        run, reference = other, this
    ablate = _meta(run.meta, "ablate")
    result = paired_comparison(run.records, reference.records, this.summary["candidates"],
                               removed=REMOVED.get(ablate, ablate) if ablate else None)
    return Pairing(run, reference, result)


def _keys_text(listed: Mapping[str, Any] | None) -> tuple[int, str]:
    """``paired_comparison``'s {"n", "examples"} as (n, "key, key, …")."""
    if not listed:
        return 0, ""
    examples = listed.get("examples", [])
    more = " …" if listed.get("n", 0) > len(examples) else ""
    return listed.get("n", 0), ", ".join(_show_key(tuple(k)) for k in examples) + more


def section_compare(pairings: Sequence[Pairing]) -> str:
    parts = ['<section id="compare"><h2>Paired comparison</h2>'
             '<p class="muted">The two runs are paired by (video_id, id) and both are scored with this report\'s '
             "closed answer sets. The run that lacks something (an ablation) is the <i>run</i>, the other the "
             "<i>reference</i>. b: reference right, run wrong; c: the reverse; p: exact McNemar test on b and c; "
             "difference = run − reference in points, with its paired 95 % interval.</p>"]
    for pairing in pairings:
        pc = pairing.result
        parts.append(f'<div class="panel" style="margin-bottom:12px"><h3 style="margin-top:0">run '
                     f'{_e(pairing.run.label)} vs reference {_e(pairing.reference.label)}</h3>'
                     f'<p class="muted mono">{_e(pairing.run.path)} vs {_e(pairing.reference.path)}</p>'
                     f'<p class="verdict">{_e(pc.get("verdict") or pc["overall"].get("verdict", ""))}</p>')
        for field_name, where in (("only_in_run", f"only in {pairing.run.label}"),
                                  ("only_in_reference", f"only in {pairing.reference.label}"),
                                  ("gold_differs", "with a different gold answer or type")):
            n, examples = _keys_text(pc.get(field_name))
            if n:
                parts.append(f'<p class="media-note">{n} sample(s) {_e(where)}, not paired: {_e(examples)}</p>')
        rows = []
        for name, block in [("overall", pc["overall"]), *pc.get("per_type", {}).items()]:
            ci = block.get("difference_ci95") or [None, None]
            ci_txt = "" if None in ci else f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"
            diff = block.get("difference")
            diff_txt = "" if diff is None else f"{100 * diff:+.1f}"
            p = block.get("p_value")
            p_txt = "n/a" if p is None else (f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}")
            strong = " verdict" if p is not None and p < 0.05 else ""
            rows.append(
                f'<tr{" class=overall" if name == "overall" else ""}><td class="l">{_e(name)}</td>'
                f'<td>{block.get("n")}</td><td>{_pct(block.get("reference_accuracy"))}</td>'
                f'<td>{_pct(block.get("run_accuracy"))}</td><td>{diff_txt}</td><td>{ci_txt}</td>'
                f'<td>{block.get("b")}</td><td>{block.get("c")}</td><td>{p_txt}</td>'
                f'<td class="l wrap{strong}">{_e(block.get("verdict") or "")}</td></tr>'
            )
        parts.append(
            '<div class="tablewrap"><table class="data"><thead><tr><th class="l">question type</th><th>paired n</th>'
            f'<th title="{_e(pairing.reference.label)}">reference</th><th title="{_e(pairing.run.label)}">run</th>'
            '<th>difference</th><th>95 % CI</th><th>b</th><th>c</th><th>McNemar p</th><th class="l">verdict</th>'
            f'</tr></thead><tbody>{"".join(rows)}</tbody></table></div></div>'
        )
    parts.append("</section>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------------- samples
@dataclass
class MediaOutput:
    """How media reach the page: embedded in two stores, or linked relative to the report's folder."""

    link: bool
    out_dir: Path
    frames: MediaStore = field(default_factory=lambda: MediaStore("f", MAX_EMBEDDED_FRAME_BYTES))
    audio: MediaStore = field(default_factory=lambda: MediaStore("a", MAX_EMBEDDED_AUDIO_BYTES))


def _figure(name: str, img_attrs: str) -> str:
    return (f'<figure data-name="{_e(name)}"><img {img_attrs} alt="{_e(name)}" title="{_e(name)}">'
            f'<figcaption>{_e(name)}</figcaption></figure>')


def _placeholder(name: str, reason: str) -> str:
    short = "left out (size cap)" if reason == LEFT_OUT else "unreadable"
    return (f'<figure data-name="{_e(name)}"><div class="ph" title="{_e(reason)}">{_e(short)}</div>'
            f'<figcaption>{_e(name)}</figcaption></figure>')


def embed_media(located: Mapping[Key, Located], order: Iterable[Key], media: MediaOutput) -> None:
    """Encode the frames (or video frames) and spoken questions of the cards, in card order, into the stores."""
    if media.link:
        return
    keys = list(order)
    frame_jobs: list[tuple[Any, Callable[[], Encoded]]] = []
    audio_jobs: list[tuple[Any, Callable[[], Encoded]]] = []
    for key in keys:
        loc = located[key]
        if loc.video_path is not None:
            frame_jobs.append((loc.video_path, lambda p=loc.video_path: video_thumbs(p)))
        frame_jobs.extend((p, lambda p=p: thumbnail_jpeg(p)) for p in loc.frame_paths)
        if loc.audio_path is not None:
            audio_jobs.append((loc.audio_path, lambda p=loc.audio_path: audio_ogg(p)))
    media.frames.fill(frame_jobs)
    media.audio.fill(audio_jobs)


def _frames_html(loc: Located, media: MediaOutput) -> tuple[str, list[str]]:
    """The frame strip and flipbook of one card, and the reasons for frames that could not be shown."""
    figures: list[str] = []
    notes: list[str] = []

    def missing(name: str, why: str | None) -> str:
        if why and why != LEFT_OUT:
            notes.append(why)
        return _placeholder(name, why or "")

    if loc.video_path is not None:
        if media.link:
            return (f'<video controls preload="none" width="256" src="{_href(loc.video_path, media.out_dir)}">'
                    "</video>", notes)
        keys, why = media.frames.get(loc.video_path)
        if not keys:
            figures.append(missing(loc.video_path.name, why))
        figures.extend(_figure(f"{loc.video_path.name} {k + 1}/{len(keys)}", f'data-frame="{key}"')
                       for k, key in enumerate(keys))
    for name, path in zip(loc.frame_names, loc.frame_paths, strict=True):
        if media.link:
            figures.append(_figure(name, f'src="{_href(path, media.out_dir)}" loading="lazy"'))
            continue
        keys, why = media.frames.get(path)
        figures.append(_figure(name, f'data-frame="{keys[0]}"') if keys else missing(name, why))
    if not figures:
        return "", notes
    return (f'<div class="strip" title="click to play the frames as a flipbook">{"".join(figures)}</div>'
            '<div class="flip"><img alt=""><span class="fc"></span></div>', notes)


def _audio_html(loc: Located, media: MediaOutput) -> tuple[str, list[str]]:
    if loc.audio_path is None:
        return "", []
    if media.link:
        return f'<audio controls preload="none" src="{_href(loc.audio_path, media.out_dir)}"></audio>', []
    keys, why = media.audio.get(loc.audio_path)
    if not keys:
        return "", [f"spoken question {loc.audio_path.name}: {why}"]
    return f'<audio controls preload="none" data-audio="{keys[0]}" title="spoken question"></audio>', []


def _tick(value: bool | None, name: str) -> str:
    if value is None:
        return f'<span title="not counted for this sample">{_e(name)} –</span>'
    return f'<span class="{"y" if value else "n"}">{_e(name)} {"✓" if value else "✗"}</span>'


def _text(value: Any) -> str:
    text = "" if value is None else str(value)
    return _e(text) if text.strip() else '<span class="empty">(empty)</span>'


def render_card(
    index: int, run: Run, located: Mapping[Key, Located], compared: Sequence[Run], media: MediaOutput
) -> str:
    """One sample: every part is read from this record and the media located for its own (video_id, id)."""
    rec = run.records[index]
    key = _key(rec)
    loc = located[key]
    hits = run.hits[index]
    correct = bool(hits["accuracy"])
    others = []
    disagree = False
    for other in compared:
        j = other.by_key.get(key)
        if j is None:
            others.append(f'<div><span class="lab">{_e(other.label)}</span><span class="muted">not in this run'
                          "</span></div>")
            continue
        other_ok = bool(other.hits[j]["accuracy"])
        disagree |= other_ok != correct
        others.append(
            f'<div><span class="lab">{_e(other.label)}</span>'
            f'<span class="flag {"ok" if other_ok else "bad"}">{"right" if other_ok else "wrong"}</span>'
            f'<span>{_text(other.records[j].get("prediction"))}</span></div>'
        )
    frames, frame_notes = _frames_html(loc, media)
    audio, audio_notes = _audio_html(loc, media)
    notes = "".join(f'<div class="media-note">{_e(n)}</div>' for n in [*loc.problems, *frame_notes, *audio_notes])
    question = rec.get("question")
    question_html = _text(question)
    if question is None and loc.question is not None:
        question_html = f'{_e(loc.question)} <span class="muted">(from the data file)</span>'
    eos = rec.get("stopped_by_eos")
    flags = f'<span class="flag {"ok" if correct else "bad"}">{"correct" if correct else "wrong"}</span>'
    if eos is False:
        flags += '<span class="flag warn" title="generation did not stop with EOS">no EOS</span>'
    if disagree:
        flags += '<span class="flag muted">runs disagree</span>'
    qtype = rec.get("question_type") or "<untyped>"
    tokens = rec.get("new_tokens")
    extra = f'<span class="muted">{tokens} new tokens</span>' if isinstance(tokens, int) else ""
    video_id = key[0] if key[0] is not None else ""
    return (
        f'<article class="card{" correct" if correct else ""}" id="s{index}" tabindex="-1" '
        f'data-video-id="{_e(video_id)}" data-id="{_e(key[1])}" data-type="{_e(qtype)}" '
        f'data-correct="{int(correct)}" data-disagree="{int(disagree)}">'
        f'<div class="head"><span class="key">{_e(video_id or "?")} / {_e(key[1])}</span>'
        f'<span class="qtype">{_e(qtype)}</span>{flags}</div>'
        f"{frames}{audio}{notes}"
        f'<dl class="qa"><dt>question</dt><dd class="question">{question_html}</dd>'
        f'<dt>gold answer</dt><dd class="gold">{_text(rec.get("answer"))}</dd>'
        f'<dt>gold short</dt><dd class="short">{_text(rec.get("short_answer"))}</dd>'
        f'<dt>prediction</dt><dd class="pred">{_text(rec.get("prediction"))}</dd>'
        f'<dt>predicted</dt><dd class="label mono">{_e(run.labels[index])}</dd></dl>'
        f'<div class="scores">{_tick(hits["accuracy"], "strict")}{_tick(hits["k_acc"], "K-ACC")}'
        f'{_tick(hits["substring"], "substring")}{_tick(hits["exact_match"], "exact match")}{extra}</div>'
        + (f'<div class="others">{"".join(others)}</div>' if others else "")
        + "</article>"
    )


def section_samples(run: Run, cards: Sequence[str], compared: Sequence[Run]) -> str:
    types = sorted({r.get("question_type") or "<untyped>" for r in run.records})
    options = "".join(f'<option value="{_e(t)}">{_e(t)}</option>' for t in types)
    n_wrong = sum(1 for h in run.hits if not h["accuracy"])
    dis_attr = "" if compared else ' disabled title="give --compare to find disagreements"'
    return (
        f'<section id="samples"><h2>Samples <span class="muted">({len(cards)}, {n_wrong} wrong)</span></h2>'
        '<div class="toolbar">'
        f'<label>type <select id="f-type"><option value="">all types</option>{options}</select></label>'
        '<label><input type="checkbox" id="f-wrong"> wrong only</label>'
        f'<label><input type="checkbox" id="f-disagree"{dis_attr}> runs disagree</label>'
        '<input type="search" id="f-search" placeholder="search video_id / id" aria-label="search by id">'
        '<span class="count" id="f-count"></span>'
        '<div class="keys"><kbd>j</kbd>/<kbd>k</kbd> or <kbd>→</kbd>/<kbd>←</kbd> next/previous sample · '
        '<kbd>space</kbd> play the frames · <kbd>w</kbd> wrong only · <kbd>d</kbd> disagreements · '
        '<kbd>/</kbd> search · click a frame strip to play it</div></div>'
        f'<div class="cards">{"".join(cards)}</div></section>'
    )


# ------------------------------------------------------------------------------------------------------ page
def _asset(name: str) -> str:
    return resources.files("surgvqa").joinpath("templates", name).read_text(encoding="utf-8")


def _json_script(element_id: str, data: Mapping[str, Any]) -> str:
    text = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return f'<script type="application/json" id="{element_id}">{text}</script>'


def render_page(
    run: Run,
    sections: Sequence[str],
    notes: Sequence[str],
    media: MediaOutput,
    toc: Sequence[tuple[str, str]],
) -> str:
    nav = "".join(f'<a href="#{anchor}">{_e(title)}</a>' for anchor, title in toc)
    note_html = ('<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>") if notes else ""
    stores = "" if media.link else _json_script("frame-store", media.frames.items) + _json_script(
        "audio-store", media.audio.items
    )
    generated = time.strftime("%Y-%m-%d %H:%M")
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><meta name="generator" content="{_e(GENERATOR)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>surgvqa report: {_e(run.path.name)}</title><style>{_asset('report.css')}</style></head><body>"
        f'<header class="top"><h1>surgvqa report: {_e(run.path.name)}</h1>'
        f'<div class="sub">{len(run.records)} predictions · scored with {_e(SCORING_VERSION)} · generated '
        f'{_e(generated)} by surgvqa {_e(__version__)}</div><nav class="toc">{nav}</nav></header>'
        f"<main>{note_html}{''.join(sections)}</main>"
        "<footer>Every number on this page is re-computed from the predictions file(s) by surgvqa.metrics; "
        "no stored score is trusted.</footer>"
        f"{stores}<script>{_asset('report.js')}</script></body></html>\n"
    )


# ----------------------------------------------------------------------------------------------------- build
def _check_output(output: Path, inputs: Iterable[Path]) -> None:
    if output.is_dir():
        raise ReportError(f"--output {output} is a directory; give a file name such as {output / 'report.html'}")
    resolved = output.resolve()
    for path in inputs:
        if path.exists() and path.resolve() == resolved:
            raise ReportError(f"--output {output} is one of the inputs ({path}); choose another file name")
    if output.is_file():
        with output.open("rb") as handle:
            head = handle.read(400)
        if b'name="generator" content="surgvqa' not in head:
            raise ReportError(
                f"--output {output} exists and is not a surgvqa report; choose another file name or remove it"
            )


def build_report(
    predictions: str | Path,
    output: str | Path,
    *,
    compare: Sequence[str | Path] = (),
    frames_dir: str | Path | None = None,
    audio_dir: str | Path | None = None,
    train_dir: str | Path | None = None,
    link_media: bool = False,
    frame_path_template: str | None = None,
    audio_path_template: str | None = None,
) -> Path:
    """Write one self-contained HTML report for a predictions file and return its path.

    ``compare``: other predictions files of the same samples (e.g. ablations), paired by (video_id, id).
    ``frames_dir``/``audio_dir`` and the templates override the ones recorded in the predictions' meta line.
    ``train_dir``: the training output, for loss and eval-accuracy curves and the run's settings.
    ``link_media``: link frames and audio by path relative to the report instead of embedding thumbnails.
    Raises ReportError (a ValueError) for user errors; an existing file is replaced only if it is a surgvqa report.
    """
    pred_path = Path(predictions)
    out = Path(output)
    compare_paths = [Path(p) for p in compare]
    _check_output(out, [pred_path, *compare_paths])
    run = load_run(pred_path)
    data_path, _ = _find_data_file(run.meta, run.path)
    if data_path is not None:
        _check_output(out, [data_path])
    compared = [load_run(p) for p in compare_paths]
    seen = Counter()
    for r in [run, *compared]:
        seen[r.label] += 1
        if seen[r.label] > 1:
            r.label = f"{r.label} #{seen[r.label]}"
    pairings = [pair_runs(run, c) for c in compared]
    training = load_training(train_dir) if train_dir is not None else None
    located, notes = locate_media(run, frames_dir=frames_dir, audio_dir=audio_dir,
                                  frame_path_template=frame_path_template, audio_path_template=audio_path_template)
    if run.meta is None:
        notes.insert(0, f"{run.path.name} has no surgvqa_meta line: the run's checkpoint, data and preprocessing "
                        "are unknown, and its frames cannot be located")
    for other in compared:
        if other.meta is None:
            notes.append(f"{other.path.name} has no surgvqa_meta line: what that run removed or changed is unknown")
    if training is not None:
        notes.extend(training.notes)
    hits = sum(bool(h["accuracy"]) for h in run.hits)
    if hits != run.summary["accuracy_hits"]:
        notes.append(f"the cards count {hits} correct samples but the summary {run.summary['accuracy_hits']}; "
                     "please report this")

    media = MediaOutput(link=link_media, out_dir=out.resolve().parent)
    embed_media(located, (_key(r) for r in run.records), media)
    cards = [render_card(i, run, located, compared, media) for i in range(len(run.records))]
    for store, what in ((media.frames, "frame thumbnail"), (media.audio, "spoken question")):
        if store.left_out:
            notes.append(
                f"{store.left_out} {what}(s) left out: embedded media reached the cap of "
                f"{store.cap / 2**20:.0f} MB; the cards past it say so. Build with --link_media to link every file."
            )
    missing = sum(1 for k in {_key(r) for r in run.records} if located[k].problems)
    if missing and run.meta is not None:
        notes.append(f"{missing} sample(s) have missing or unusable media; their cards say why")

    sections = [section_summary(run), section_types(run, compared)]
    toc = [("summary", "Summary"), ("types", "Per type")]
    if compared:
        sections.append(section_compare(pairings))
        toc.append(("compare", "Paired comparison"))
    if training is not None:
        sections.append(section_training(training))
        toc.append(("training", "Training"))
    sections.append(section_samples(run, cards, compared))
    toc.append(("samples", "Samples"))
    page = render_page(run, sections, notes, media, toc)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out


# ------------------------------------------------------------------------------------------------------- CLI
def build_parser(prog: str = "surgvqa report") -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=prog,
        description="One self-contained HTML report of a predictions file: summary, per-type results, paired "
        "comparisons, training curves and every sample with its frames, audio, answers and prediction.",
    )
    parser.add_argument("predictions", type=Path, help="predictions JSONL written by evaluate_checkpoint.py")
    parser.add_argument("--compare", nargs="+", action="extend", default=[], type=Path, metavar="OTHER.jsonl",
                        help="other runs on the same samples (e.g. --ablate video), paired by (video_id, id)")
    parser.add_argument("--frames_dir", help="frames root (default: the one recorded in the predictions' meta)")
    parser.add_argument("--audio_dir", help="spoken-question audio root (default: the recorded one, if any)")
    parser.add_argument("--frame_path_template", help="default: recorded, else {video_id}/{frame}.jpg")
    parser.add_argument("--audio_path_template", help="default: recorded, else {video_id}/{id}.wav")
    parser.add_argument("--train_dir", help="training --output_dir: loss/eval-accuracy curves and settings")
    parser.add_argument("--link_media", action="store_true",
                        help="link frames and audio by relative path instead of embedding thumbnails")
    parser.add_argument("--output", type=Path, default=None,
                        help="the HTML file (default: PREDICTIONS with .report.html)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    output = args.output or args.predictions.with_name(args.predictions.stem + ".report.html")

    def body() -> int:
        start = time.perf_counter()
        path = build_report(
            args.predictions, writable_file(output, "--output"), compare=args.compare, frames_dir=args.frames_dir,
            audio_dir=args.audio_dir, train_dir=args.train_dir, link_media=args.link_media,
            frame_path_template=args.frame_path_template, audio_path_template=args.audio_path_template,
        )
        print(f"report: {path} ({path.stat().st_size / 2**20:.1f} MB, built in {time.perf_counter() - start:.1f} s)")
        return 0

    return run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
