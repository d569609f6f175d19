"""Samples: JSONL reading and up-front validation, keyed on ``(video_id, id)``.

Every check happens before a :class:`Sample` exists: :func:`load_samples` validates every line, collects every
problem (with ``file:line``, the ``(video_id, id)`` key, the path tried and the fix) and either raises one
:class:`DataError` listing them all or, with ``skip_bad=True``, returns the good samples plus the problems.
Samples are keyed on ``(video_id, id)``, never on ``id`` alone: ids repeat across videos.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgvqa.audio import audio_duration, load_audio
from surgvqa.errors import UserError
from surgvqa.media import (
    MediaConfig,
    MediaError,
    decode_image,
    load_video_frames,
    resolve_under,
    verify_image,
    verify_video,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg")
REQUIRED_FIELDS = ("id", "video_id", "question", "answer")  # plus "frames" or "video"
SCORING_FIELDS = ("short_answer", "question_type")
_CONSUMED_FIELDS = frozenset(
    {"id", "video_id", "frames", "video", "audio", "question", "answer", "question_type", "short_answer"}
)
_MAX_LISTED = 20
SKIP_HINT = "use --skip_bad_samples to skip bad samples"


# ------------------------------------------------------------------------------------------ samples, errors
@dataclass(frozen=True)
class Sample:
    """One validated record, keyed on ``(video_id, id)``, with resolved media paths."""

    video_id: str
    id: str
    question: str
    answer: str
    question_type: str | None = None
    short_answer: str | None = None
    frame_paths: tuple[Path, ...] = ()
    video_path: Path | None = None
    audio_path: Path | None = None
    source: str = ""
    extra: dict = field(default_factory=dict, hash=False)

    @property
    def key(self) -> tuple[str, str]:
        """``(video_id, id)``: the unique key (``id`` alone repeats across videos)."""
        return (self.video_id, self.id)


@dataclass
class Problem:
    """One thing wrong with the data: where (``file:line``), which sample, what, the path tried, the fix."""

    source: str
    key: tuple | None
    message: str

    def __str__(self) -> str:
        where = self.source
        if self.key is not None:
            where += f" (video_id={self.key[0]!r}, id={self.key[1]!r})"
        return f"{where}: {self.message}"


class DataError(UserError):
    """Invalid data; ``problems`` lists every problem found (the message shows the first 20)."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        lines = [f"{len(self.problems)} problem(s) in the data:"]
        lines += [f"  - {p}" for p in self.problems[:_MAX_LISTED]]
        if len(self.problems) > _MAX_LISTED:
            lines.append(
                f"  ... and {len(self.problems) - _MAX_LISTED} more (run `python -m surgvqa.data check`)"
            )
        lines.append(f"Fix them, or {SKIP_HINT}.")
        super().__init__("\n".join(lines))


# ---------------------------------------------------------------------------------------------- validation
def _type_name(value: Any) -> str:
    return f"{type(value).__name__} {json.dumps(value)[:60] if _jsonable(value) else repr(value)[:60]}"


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def unsafe_component(value: str) -> str | None:
    """Why ``value`` cannot be one path component (``None`` when it can).

    ``id`` and ``video_id`` name files and directories through the path templates: with a separator,
    ``(002-001, sub/qa_1)`` and ``(002-001/sub, qa_1)`` would read the same file; ``..`` climbs out; NUL ends a C
    string; a leading ``-`` reads as an option to command-line tools.
    """
    if "/" in value or "\\" in value:
        return "contains a path separator ('/' or '\\')"
    if value in (".", ".."):
        return f"is {value!r}, which names a directory, not a file"
    if "\x00" in value:
        return "contains a NUL byte"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "contains a control character"
    if value.startswith("-"):
        return "starts with '-' (command-line tools read it as an option)"
    return None


def _alternatives(relative: str, extensions: tuple[str, ...]) -> list[str]:
    """``relative`` first, then the same path with each other extension of the family (if it has one)."""
    root, ext = os.path.splitext(relative)
    if ext.lower() not in extensions:
        return [relative]
    return [relative] + [root + e for e in extensions if e != ext.lower()]


_Report = Callable[[str], None]


class _Validator:
    """Turns raw records into Samples, collecting every problem. Caches media checks by resolved path."""

    def __init__(
        self, media: MediaConfig, frames_root: Path, *, require_scoring_fields: bool, check_media: bool,
        decode_media: bool = False, check_audio: bool = False,
    ):
        self.media = media
        self.frames_root = frames_root
        self.audio_root = Path(media.audio_dir) if media.audio_dir else None
        self.require_scoring_fields = require_scoring_fields
        self.check_media = check_media
        self.decode_media = decode_media and check_media
        #: audio is looked up (and checked) for spoken questions, and for text questions when asked to
        self.want_audio = media.needs_audio or (check_audio and self.audio_root is not None)
        self._image_cache: dict[Path, tuple[int, int] | MediaError] = {}
        self._audio_cache: dict[Path, MediaError | None] = {}
        self._video_cache: dict[Path, MediaError | None] = {}
        self._dir_cache: dict[tuple[str, str], Path] = {}

    # -- fields
    def _fields(self, rec: dict, bad: _Report) -> None:
        for name in REQUIRED_FIELDS:
            if rec.get(name) is None:
                bad(f"missing required field '{name}'; add it to the line")
        if rec.get("frames") is None and rec.get("video") is None:
            bad(
                "missing required field 'frames' (list of frame names) or 'video' (a video file under frames_dir); "
                "add one"
            )
        if rec.get("frames") is not None and rec.get("video") is not None:
            bad("has both 'frames' and 'video'; keep exactly one")
        for name in ("id", "video_id", "question", "answer"):
            value = rec.get(name)
            if value is None:
                continue
            if not isinstance(value, str):
                bad(f"field '{name}' must be a string, got {_type_name(value)}; quote it")
            elif not value.strip():
                bad(f"field '{name}' is empty or whitespace; fill it in or remove the line")
            elif name in ("id", "video_id") and (why := unsafe_component(value)):
                bad(
                    f"field '{name}' {value!r} {why}; it names a file or directory, so it must be a single safe path "
                    "component: rename it (letters, digits, '_', '-', '.', not starting with '-')"
                )
        for name in SCORING_FIELDS:
            value = rec.get(name)
            if value is None:
                if self.require_scoring_fields:
                    bad(f"missing field '{name}' needed for scoring; add it or drop --require_scoring_fields")
            elif not isinstance(value, str):
                bad(f"field '{name}' must be a string, got {_type_name(value)}")
            elif self.require_scoring_fields and not value.strip():
                bad(f"field '{name}' is empty; scoring needs it")
        frames = rec.get("frames")
        if frames is not None:
            if not isinstance(frames, list) or not all(isinstance(f, str) for f in frames):
                bad(f"field 'frames' must be a list of frame-name strings, got {_type_name(frames)}")
            elif not frames:
                bad("field 'frames' is an empty list; name at least one frame")
            elif not all(f.strip() for f in frames):
                bad("field 'frames' contains an empty frame name")
        numbers = rec.get("frame_numbers")
        if numbers is not None:
            if not isinstance(numbers, list) or not all(
                isinstance(n, int | float) and not isinstance(n, bool) for n in numbers
            ):
                bad(f"field 'frame_numbers' must be a list of numbers, got {_type_name(numbers)}")
            elif isinstance(frames, list) and frames and all(isinstance(f, str) for f in frames) and len(numbers) != len(frames):
                bad(f"field 'frame_numbers' has {len(numbers)} entries but 'frames' has {len(frames)}; one per frame")
            elif any(b <= a for a, b in zip(numbers, numbers[1:], strict=False)):
                bad("field 'frame_numbers' must increase strictly (it times the frames for --video_fps)")
        for name in ("video", "audio"):
            value = rec.get(name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                bad(f"field '{name}' must be a non-empty relative path string, got {_type_name(value)}")

    # -- media
    def _find(self, root: Path, candidates: list[str]) -> tuple[Path | None, list[str], MediaError | None]:
        """First existing candidate under ``root``; the paths tried; a containment error or a directory where a
        file is expected (either stops the search)."""
        tried: list[str] = []
        for rel in candidates:
            try:
                path = resolve_under(root, rel, dir_cache=self._dir_cache)
            except MediaError as err:
                return None, tried + [str(root / rel)], err
            tried.append(str(path))
            if not self.check_media:
                return path, tried, None
            if path.is_file():
                return path, tried, None
            if path.is_dir():
                return None, tried, MediaError(f"{path} is a directory where a file is expected")
        return None, tried, None

    def _verify_image(self, path: Path) -> tuple[int, int] | MediaError:
        if path not in self._image_cache:
            try:
                if self.decode_media:  # the loader's own decoder: what passes here, training can read
                    h, w = decode_image(path).shape[:2]
                    self._image_cache[path] = (w, h)
                else:
                    self._image_cache[path] = verify_image(path)
            except MediaError as err:
                self._image_cache[path] = err
        return self._image_cache[path]

    def _frames(self, rec: dict, bad: _Report) -> tuple[Path, ...]:
        template = self.media.frame_path_template
        paths: list[Path] = []
        missing: list[str] = []
        sizes: dict[tuple[int, int], str] = {}
        for frame in rec["frames"]:
            rel = template.format(video_id=rec["video_id"], frame=frame, id=rec["id"])
            path, tried, err = self._find(self.frames_root, _alternatives(rel, IMAGE_EXTENSIONS))
            if err is not None:
                bad(f"frame {frame!r}: {err}; fix the frame name, the files or --frame_path_template ({template!r})")
            elif path is None:
                missing.append(f"{frame!r} (tried {', '.join(tried)})")
            else:
                paths.append(path)
                if self.check_media:
                    result = self._verify_image(path)
                    if isinstance(result, MediaError):
                        bad(f"frame {frame!r}: {result}; re-extract the frame")
                    else:
                        sizes.setdefault(result, str(path))
        if missing:
            bad(
                f"{len(missing)} of {len(rec['frames'])} frame file(s) missing under frames_dir {self.frames_root}: "
                + "; ".join(missing)
                + f". Fix: extract the frame(s) there, or fix --frames_dir / --frame_path_template ({template!r})"
            )
        if len(sizes) > 1:
            listed = ", ".join(f"{w}x{h} ({p})" for (w, h), p in sizes.items())
            bad(f"frames of one sample differ in size: {listed}; re-extract them at one resolution")
        return tuple(paths)

    def _video(self, rec: dict, bad: _Report) -> Path | None:
        path, tried, err = self._find(self.frames_root, [rec["video"]])
        if err is not None:
            bad(f"video: {err}; fix the 'video' field")
            return None
        if path is None:
            bad(f"video file missing: tried {', '.join(tried)}; fix the 'video' field or --frames_dir")
            return None
        error = self._media_problem(self._video_cache, path,
                                    lambda p: load_video_frames(p, None, self.media.budget), verify_video)
        if error is not None:
            bad(f"video: {error}; re-encode or replace the file")
        return path

    def _media_problem(self, cache: dict, path: Path, decode, verify) -> MediaError | None:
        """What checking ``path`` found (with ``--check_media``: ``decode`` when media are decoded, else
        ``verify``), once per path; None when unchecked or fine."""
        if self.check_media and path not in cache:
            try:
                (decode if self.decode_media else verify)(path)
                cache[path] = None
            except MediaError as e:
                cache[path] = e
        return cache.get(path)

    def _audio(self, rec: dict, bad: _Report) -> Path | None:
        assert self.audio_root is not None
        explicit = rec.get("audio")
        if explicit is not None:
            rel, how = explicit, "the line's 'audio' field"
        else:
            rel = self.media.audio_path_template.format(video_id=rec["video_id"], id=rec["id"])
            how = f"--audio_path_template ({self.media.audio_path_template!r})"
        path, tried, err = self._find(self.audio_root, _alternatives(rel, AUDIO_EXTENSIONS))
        if err is not None:
            bad(f"audio: {err}; fix {how}")
            return None
        if path is None:
            bad(
                f"spoken-question audio missing under audio_dir {self.audio_root}: tried {', '.join(tried)}. "
                f"Fix: run scripts/make_spoken_questions.py for this data file, or fix --audio_dir / {how}"
            )
            return None
        error = self._media_problem(self._audio_cache, path, load_audio, audio_duration)  # the loader's own decoder
        if error is not None:
            bad(f"audio: {error}; re-generate it with scripts/make_spoken_questions.py")
        return path

    def build(self, source: str, rec: dict) -> tuple[Sample | None, list[Problem]]:
        vid, qid = rec.get("video_id"), rec.get("id")
        key = (vid, qid) if isinstance(vid, str) and isinstance(qid, str) else None
        problems: list[Problem] = []

        def bad(message: str) -> None:
            problems.append(Problem(source, key, message))

        self._fields(rec, bad)
        if problems:
            return None, problems
        frame_paths: tuple[Path, ...] = ()
        video_path = audio_path = None
        if rec.get("frames") is not None:
            frame_paths = self._frames(rec, bad)
        else:
            video_path = self._video(rec, bad)
        if self.want_audio:
            audio_path = self._audio(rec, bad)
        if problems:
            return None, problems
        sample = Sample(
            video_id=vid,
            id=qid,
            question=rec["question"],
            answer=rec["answer"],
            question_type=rec.get("question_type"),
            short_answer=rec.get("short_answer"),
            frame_paths=frame_paths,
            video_path=video_path,
            audio_path=audio_path,
            source=source,
            extra={k: v for k, v in rec.items() if k not in _CONSUMED_FIELDS},
        )
        return sample, []


# A record stream: (source "file:line", parsed dict) or (source, Problem) for a line that could not be parsed.
_Records = Iterable[tuple[str, "dict | Problem"]]


def _validate(
    records: _Records,
    media: MediaConfig,
    frames_root: Path,
    origin: str,
    *,
    require_scoring_fields: bool,
    skip_bad: bool,
    check_media: bool,
    decode_media: bool = False,
    check_audio: bool = False,
) -> tuple[list[Sample], list[Problem]]:
    validator = _Validator(
        media, frames_root, require_scoring_fields=require_scoring_fields, check_media=check_media,
        decode_media=decode_media, check_audio=check_audio,
    )
    samples: list[Sample] = []
    problems: list[Problem] = []
    if check_media and not frames_root.is_dir():
        problems.append(
            Problem(origin, None, f"frames_dir {frames_root} is not a directory; fix --frames_dir")
        )
    if (
        check_media
        and validator.audio_root is not None
        and validator.want_audio
        and not validator.audio_root.is_dir()
    ):
        problems.append(
            Problem(
                origin,
                None,
                f"audio_dir {validator.audio_root} is not a directory; fix --audio_dir or run "
                "scripts/make_spoken_questions.py",
            )
        )
    first_seen: dict[tuple[str, str], str] = {}
    n_records = 0
    for source, rec in records:
        n_records += 1
        if isinstance(rec, Problem):
            problems.append(rec)
            continue
        sample, line_problems = validator.build(source, rec)
        vid, qid = rec.get("video_id"), rec.get("id")
        if isinstance(vid, str) and isinstance(qid, str):
            key = (vid, qid)
            if key in first_seen:
                line_problems.append(
                    Problem(
                        source,
                        key,
                        f"duplicate (video_id, id) {key}: first at {first_seen[key]}, again at {source}; give each "
                        "sample a unique id within its video (ids may repeat across videos)",
                    )
                )
                sample = None
            else:
                first_seen[key] = source
        problems.extend(line_problems)
        if sample is not None:
            samples.append(sample)
    if n_records == 0:
        problems.append(Problem(origin, None, "no samples: the file is empty; fix --data_path"))
    if problems and not skip_bad:
        raise DataError(problems)
    return samples, problems


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict | Problem]]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            source = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield (
                    source,
                    Problem(source, None, f"line is not valid UTF-8 ({err}); re-save the file as UTF-8"),
                )
                continue
            if lineno == 1:
                text = text.lstrip("\ufeff")
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as err:
                yield (
                    source,
                    Problem(
                        source,
                        None,
                        f"malformed JSON ({err.msg} at column {err.colno}); fix the line "
                        "(each line must be one JSON object)",
                    ),
                )
                continue
            if not isinstance(rec, dict):
                yield (
                    source,
                    Problem(source, None, f"line is a JSON {type(rec).__name__}, not an object; fix it"),
                )
                continue
            yield source, rec


def _frames_root(media: MediaConfig, data_path: Path) -> Path:
    return Path(media.frames_dir) if media.frames_dir else data_path.parent / "frames"


def _open_check(data_path: Path) -> None:
    if data_path.is_dir():
        raise DataError([Problem(
            str(data_path), None, f"data path {data_path} is a directory, not a JSONL file; pass the .jsonl file"
        )])
    if not data_path.is_file():
        raise DataError([Problem(str(data_path), None, f"data file {data_path} not found; fix --data_path")])


def load_samples(
    data_path: str | Path,
    media: MediaConfig,
    *,
    require_scoring_fields: bool = False,
    skip_bad: bool = False,
    check_media: bool = True,
    decode_media: bool = False,
    check_audio: bool = False,
) -> tuple[list[Sample], list[Problem]]:
    """Read and validate every line of a JSONL file; return ``(samples, problems)``.

    Raises :class:`DataError` listing every problem unless ``skip_bad`` (then bad lines are dropped and their
    problems returned for the caller to report). ``check_media=True`` checks that every frame/audio/video file
    exists (trying ``.jpg/.jpeg/.png`` resp. ``.wav/.flac/.mp3/.ogg`` alternatives) and is readable: by its
    headers (PIL ``verify()``, JPEG end marker, WAV length, ``soundfile.info``, first video frame), or, with
    ``decode_media=True``, by decoding it with the loader's own functions (:func:`~surgvqa.media.decode_image`,
    :func:`~surgvqa.audio.load_audio`), which also finds damage inside a JPEG scan. ``check_media=False`` only
    resolves paths and checks they stay inside their roots. Audio is looked up for spoken questions, and for text
    questions too with ``check_audio=True`` (when ``media.audio_dir`` is set). A missing data file always raises.
    """
    path = Path(data_path)
    _open_check(path)
    return _validate(
        _read_jsonl(path),
        media,
        _frames_root(media, path),
        str(path),
        require_scoring_fields=require_scoring_fields,
        skip_bad=skip_bad,
        check_media=check_media,
        decode_media=decode_media,
        check_audio=check_audio,
    )


def load_qa_text(
    paths: Iterable[str | Path],
    media: MediaConfig,
    *,
    video_id: str | None = None,
    skip_bad: bool = False,
    check_media: bool = True,
) -> tuple[list[Sample], list[Problem]]:
    """EndoVis/Surgical-VQA style ``question|answer`` text files -> validated Samples.

    Each file holds the QA pairs of one frame, one ``question|answer`` per line (e.g. EndoVis-18-VQA
    ``seq_5/vqa/Classification/frame012_QA.txt``). The frame name is the file stem up to its first ``_``
    (``frame012``); ``video_id`` is the argument if given, else the nearest ancestor directory named ``seq_*``,
    else the file's parent directory name; ``id`` is ``<stem>_<line>``. Frames resolve through
    ``media.frame_path_template`` (e.g. ``{video_id}/left_frames/{frame}.png``) under ``media.frames_dir``
    (required here). There are no ``question_type``/``short_answer`` fields. Same checks as :func:`load_samples`.
    """
    if not media.frames_dir:
        raise UserError("load_qa_text needs media.frames_dir (there is no data-file-relative default)")
    files = [Path(p) for p in paths]

    def records() -> Iterator[tuple[str, dict | Problem]]:
        for file in files:
            if not file.is_file():
                yield str(file), Problem(str(file), None, f"q|a file {file} not found; fix the path")
                continue
            vid = video_id or next(
                (a.name for a in file.parents if a.name.startswith("seq_")), file.parent.name
            )
            frame = file.stem.split("_", 1)[0]
            for lineno, line in enumerate(file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                source = f"{file}:{lineno}"
                if not line.strip():
                    continue
                if "|" not in line:
                    yield source, Problem(source, None, "expected 'question|answer'; add the '|' separator")
                    continue
                question, answer = (s.strip() for s in line.split("|", 1))
                yield (
                    source,
                    {
                        "video_id": vid,
                        "id": f"{file.stem}_{lineno}",
                        "frames": [frame],
                        "question": question,
                        "answer": answer,
                    },
                )

    return _validate(
        records(),
        media,
        Path(media.frames_dir),
        ", ".join(map(str, files)) or "<no files>",
        require_scoring_fields=False,
        skip_bad=skip_bad,
        check_media=check_media,
    )
