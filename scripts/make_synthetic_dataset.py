"""Generate a deterministic synthetic colonoscopy VQA set in the exact REAL-Colon-VQA schema.

    python scripts/make_synthetic_dataset.py --output_dir DIR --num_clips N --seed S \
        [--video_ids 002-002,002-003] [--frame_size 112] [--prefix template] [--no_audio]

Layout: ``DIR/in_{prefix}.jsonl`` and ``DIR/out_{prefix}.jsonl`` (same clips, ids and answers; reworded
questions), ``DIR/frames/{video_id}/{video_id}_{frame_number}.jpg`` (8 frames per clip, frame numbers step 4)
and spoken questions at ``DIR/audio/{in,out}_{prefix}/{video_id}/{id}.wav``.

Every answer is a function of the pixels (large, high-contrast cues that survive a 56x56 downscale):
  nbi_status                      whole frame green-blue (NBI) vs red-pink (white light)
  scope_* (forward/backward/type) dark lumen disc grows (advancing), shrinks (withdrawing) or stays (static)
  lesion_motion_direction         a bright yellow-white blob moves up/down/left/right or stays
  lesion_screen_position          the quadrant that blob stays in
  tool_catheter_check             a neutral-grey catheter tube enters from a corner, or not
  occlusion_check                 a large brown debris blob covers a corner, or not
Each clip is asked several questions whose answers differ (e.g. forward and backward motion of the same clip),
so a model that cannot hear or read the question cannot answer. ``id``s are numbered per video from the same
counter, so the same ``id`` repeats across videos: key samples on (video_id, id).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

FRAMES_PER_CLIP = 8
FRAME_STEP = 4
JPEG_QUALITY = 90
DEFAULT_VIDEO_IDS = ("002-002", "002-003", "002-004", "002-005", "002-006")
DEFAULT_PREFIX = "template"
QUADRANTS = ("upper-left", "upper-right", "lower-left", "lower-right")
CORNERS = {
    "upper-left": (0.0, 0.0),
    "upper-right": (1.0, 0.0),
    "lower-left": (0.0, 1.0),
    "lower-right": (1.0, 1.0),
}
DIRECTIONS = {
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "stable": (0.0, 0.0),
}
MOTIONS = ("advancing", "withdrawing", "static")
LIGHTING = ("mixed", "white", "nbi")
MOTION_WEIGHTS = (0.4, 0.4, 0.2)

# Geometry in normalized image coordinates (x right, y down, both in [0, 1]).
LUMEN_SMALL = (0.075, 0.095)
LUMEN_LARGE = (0.18, 0.20)
LUMEN_STATIC = (0.11, 0.15)
LESION_RADIUS = 0.07
LESION_SHIFT = (0.16, 0.22)
TOOL_HALF_WIDTH = 0.055

# Colours (RGB). White light (WL) is red-pink; NBI is a strong green-blue tint of the tissue.
PALETTES = {
    False: {"mucosa": (200, 88, 82), "lumen": (34, 12, 12), "lesion": (252, 240, 208)},
    True: {"mucosa": (72, 130, 122), "lumen": (12, 32, 30), "lesion": (212, 250, 240)},
}
DEBRIS = {False: (150, 108, 48), True: (150, 100, 30)}
TOOL_GREY = (105.0, 185.0)  # edge / centre grey level of the catheter tube


@dataclass(frozen=True)
class QuestionType:
    """A question type: in/out-template wording and one long answer per short answer."""

    name: str
    in_question: str
    out_question: str
    answers: dict[str, str]


QUESTION_TYPES: dict[str, QuestionType] = {
    q.name: q
    for q in (
        QuestionType(
            "nbi_status",
            "Is narrow band imaging switched on?",
            "Are these frames lit in NBI mode?",
            {"yes": "Yes, NBI light is on in these frames.", "no": "No, white light is on instead."},
        ),
        QuestionType(
            "scope_forward_motion",
            "Is the scope moving forward?",
            "Is the endoscope pushing deeper?",
            {"yes": "Yes, the scope is advancing.", "no": "No, the scope is withdrawing."},
        ),
        QuestionType(
            "scope_backward_motion",
            "Is the scope pulling back?",
            "Is the endoscope being retracted?",
            {"yes": "Yes, the scope is withdrawing.", "no": "No, the scope is advancing."},
        ),
        QuestionType(
            "scope_motion_type",
            "Is the scope advancing or withdrawing?",
            "Which way is the camera travelling, in or out?",
            {
                "advancing": "The scope is primarily advancing.",
                "withdrawing": "The scope is primarily withdrawing.",
            },
        ),
        QuestionType(
            "scope_motion",
            "Is the scope moving in this clip?",
            "Does the camera change position?",
            {
                "yes": "Yes, the scope is moving across the frames.",
                "no": "No, the scope is not moving in these frames.",
            },
        ),
        QuestionType(
            "lesion_motion_direction",
            "Which way does the lesion move?",
            "In what direction does the polyp drift?",
            {
                "up": "The lesion moves up across the frames.",
                "down": "The lesion moves down across the frames.",
                "left": "The lesion drifts toward the left side of the screen.",
                "right": "The lesion drifts toward the right side of the screen.",
                "stable": "The lesion stays stable without noticeable movement.",
            },
        ),
        QuestionType(
            "lesion_screen_position",
            "Which quadrant shows the lesion?",
            "In which corner of the image is the polyp?",
            {q: f"The lesion appears in the {q} quadrant of the screen." for q in QUADRANTS},
        ),
        QuestionType(
            "tool_catheter_check",
            "Is a catheter visible?",
            "Can you see a catheter tube here?",
            {
                "yes": "Yes, the visible tool is a catheter.",
                "no": "No, no catheter is visible in these frames.",
            },
        ),
        QuestionType(
            "occlusion_check",
            "Is the view blocked by debris?",
            "Does something obstruct the field of view?",
            {
                "yes": "Yes, a close-up obstruction blocks the view.",
                "no": "No, clean mucosa stays visible without obstruction.",
            },
        ),
    )
}
MOTION_ONLY_TYPES = ("scope_forward_motion", "scope_backward_motion", "scope_motion_type")


@dataclass(frozen=True)
class Clip:
    """Everything that decides a clip's pixels and answers."""

    index: int
    video_id: str
    frame_numbers: tuple[int, ...]
    nbi: bool
    motion: str
    lumen_center: tuple[float, float]
    lumen_radii: tuple[float, ...]
    lesion_quadrant: str
    lesion_direction: str
    lesion_path: tuple[tuple[float, float], ...]
    tool_corner: str | None
    tool_angle: float
    tool_lengths: tuple[float, ...]
    debris_corner: str | None
    debris_blobs: tuple[tuple[float, float, float], ...]

    @property
    def frames(self) -> list[str]:
        """Frame names in the REAL-Colon-VQA style ``<video_id>_<frame_number>``."""
        return [f"{self.video_id}_{n}" for n in self.frame_numbers]


def answer_for(clip: Clip, qtype: str) -> str | None:
    """Short answer of ``qtype`` for ``clip`` (None when the question does not apply)."""
    moving = clip.motion != "static"
    if qtype in MOTION_ONLY_TYPES and not moving:
        return None
    return {
        "nbi_status": "yes" if clip.nbi else "no",
        "scope_forward_motion": "yes" if clip.motion == "advancing" else "no",
        "scope_backward_motion": "yes" if clip.motion == "withdrawing" else "no",
        "scope_motion_type": clip.motion,
        "scope_motion": "yes" if moving else "no",
        "lesion_motion_direction": clip.lesion_direction,
        "lesion_screen_position": clip.lesion_quadrant,
        "tool_catheter_check": "yes" if clip.tool_corner else "no",
        "occlusion_check": "yes" if clip.debris_corner else "no",
    }[qtype]


def _lesion_path(rng: np.random.Generator, quadrant: str, direction: str, lumen_max: float) -> list:
    """A straight lesion path that stays inside its quadrant and clear of the largest lumen."""
    qx, qy = (0.5 if "right" in quadrant else 0.0), (0.5 if "lower" in quadrant else 0.0)
    margin = LESION_RADIUS + 0.03
    min_dist = lumen_max + LESION_RADIUS + 0.03
    dx, dy = DIRECTIONS[direction]
    for _ in range(10_000):
        shift = rng.uniform(*LESION_SHIFT) if direction != "stable" else 0.0
        x0, y0 = rng.uniform(qx + margin, qx + 0.5 - margin), rng.uniform(qy + margin, qy + 0.5 - margin)
        path = []
        for j in range(FRAMES_PER_CLIP):
            t = j / (FRAMES_PER_CLIP - 1)
            jx, jy = rng.uniform(-0.004, 0.004, size=2)
            path.append((x0 + dx * shift * t + jx, y0 + dy * shift * t + jy))
        inside = all(
            qx + margin <= x <= qx + 0.5 - margin and qy + margin <= y <= qy + 0.5 - margin for x, y in path
        )
        clear = all(math.hypot(x - 0.5, y - 0.5) >= min_dist for x, y in path)
        if inside and clear:
            return [(round(x, 5), round(y, 5)) for x, y in path]
    raise RuntimeError(f"could not place a {direction} lesion path in the {quadrant} quadrant")


def sample_clip(seed: int, index: int, video_id: str, first_frame: int, lighting: str = "mixed") -> Clip:
    """Draw one clip's attributes from its own RNG stream (independent of the other clips).

    ``lighting``: ``mixed`` (NBI or white light, drawn per clip), ``white`` or ``nbi`` (every clip; the other
    attributes are drawn exactly as with ``mixed``).
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    nbi = bool(rng.integers(2))
    if lighting != "mixed":
        nbi = lighting == "nbi"
    motion = MOTIONS[int(rng.choice(len(MOTIONS), p=MOTION_WEIGHTS))]
    small, large = rng.uniform(*LUMEN_SMALL), rng.uniform(*LUMEN_LARGE)
    if motion == "static":
        r = rng.uniform(*LUMEN_STATIC)
        radii = [r + rng.uniform(-0.003, 0.003) for _ in range(FRAMES_PER_CLIP)]
    else:
        start, end = (small, large) if motion == "advancing" else (large, small)
        radii = [start + (end - start) * j / (FRAMES_PER_CLIP - 1) for j in range(FRAMES_PER_CLIP)]
    center = (0.5 + rng.uniform(-0.015, 0.015), 0.5 + rng.uniform(-0.015, 0.015))
    quadrant = QUADRANTS[int(rng.integers(len(QUADRANTS)))]
    direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
    path = _lesion_path(rng, quadrant, direction, max(radii) + 0.015)
    free = [q for q in QUADRANTS if q != quadrant]
    rng.shuffle(free)
    tool_corner = free[0] if rng.integers(2) else None
    debris_corner = free[1] if rng.integers(2) else None
    tool_len0 = rng.uniform(0.30, 0.36)
    tool_grow = rng.uniform(0.0, 0.05)
    tool_lengths = [tool_len0 + tool_grow * j / (FRAMES_PER_CLIP - 1) for j in range(FRAMES_PER_CLIP)]
    blobs = []
    if debris_corner:
        cx, cy = CORNERS[debris_corner]
        for _ in range(4):
            ox, oy = rng.uniform(0.0, 0.1, size=2)
            blobs.append((abs(cx - ox), abs(cy - oy), rng.uniform(0.2, 0.3)))
    return Clip(
        index=index,
        video_id=video_id,
        frame_numbers=tuple(first_frame + FRAME_STEP * j for j in range(FRAMES_PER_CLIP)),
        nbi=nbi,
        motion=motion,
        lumen_center=(round(center[0], 5), round(center[1], 5)),
        lumen_radii=tuple(round(r, 5) for r in radii),
        lesion_quadrant=quadrant,
        lesion_direction=direction,
        lesion_path=tuple(path),
        tool_corner=tool_corner,
        tool_angle=round(float(rng.uniform(-0.14, 0.14)), 5),
        tool_lengths=tuple(round(v, 5) for v in tool_lengths),
        debris_corner=debris_corner,
        debris_blobs=tuple((round(x, 5), round(y, 5), round(r, 5)) for x, y, r in blobs),
    )


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, amplitude: float) -> np.ndarray:
    """Low-frequency multiplicative noise around 1.0 (bicubic upsampling of a coarse random grid)."""
    coarse = rng.uniform(-amplitude, amplitude, size=(cells, cells)).astype(np.float32)
    img = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    return 1.0 + np.clip(np.asarray(img, dtype=np.float32), -amplitude, amplitude)


def _soft(signed_distance: np.ndarray, size: int) -> np.ndarray:
    """Anti-aliased coverage (1 inside, 0 outside) from a signed distance in normalized units."""
    return np.clip(0.5 - signed_distance * size, 0.0, 1.0)


def _blend(img: np.ndarray, color: np.ndarray, alpha: np.ndarray) -> None:
    """In place: ``img = img * (1 - alpha) + color * alpha`` (alpha HxW, color RGB or HxWx3)."""
    img += alpha[..., None] * (color - img)


def render_clip(clip: Clip, seed: int, size: int) -> list[np.ndarray]:
    """Render the clip's frames as uint8 HxWx3 arrays."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, clip.index, 1]))
    pal = PALETTES[clip.nbi]
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    xx, yy = np.meshgrid(coords, coords)
    texture = _smooth_noise(rng, size, 6, 0.12) * _smooth_noise(rng, size, 16, 0.05)
    vignette = 1.0 - 0.3 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2) / 0.5
    debris_tex = _smooth_noise(rng, size, 8, 0.08)
    frames = []
    for j in range(FRAMES_PER_CLIP):
        cx, cy = clip.lumen_center
        r = clip.lumen_radii[j]
        d_lumen = np.hypot(xx - cx, yy - cy)
        fold = 1.0 - 0.2 * np.exp(-(((d_lumen - 1.7 * r) / (0.25 * r)) ** 2))  # haustral fold ring
        img = np.array(pal["mucosa"], dtype=np.float32) * (texture * vignette * fold)[..., None]
        _blend(img, np.array(pal["lumen"], dtype=np.float32), _soft(d_lumen - r, size))
        lx, ly = clip.lesion_path[j]
        d_les = np.hypot(xx - lx, yy - ly)
        shade = (1.0 - 0.08 * (d_les / LESION_RADIUS) ** 2)[..., None]
        _blend(img, np.array(pal["lesion"], dtype=np.float32) * shade, _soft(d_les - LESION_RADIUS, size))
        if clip.debris_corner:
            d_deb = np.min([np.hypot(xx - bx, yy - by) - br for bx, by, br in clip.debris_blobs], axis=0)
            _blend(
                img, np.array(DEBRIS[clip.nbi], dtype=np.float32) * debris_tex[..., None], _soft(d_deb, size)
            )
        if clip.tool_corner:
            ox, oy = CORNERS[clip.tool_corner]
            angle = math.atan2(0.5 - oy, 0.5 - ox) + clip.tool_angle
            ux, uy = math.cos(angle), math.sin(angle)
            sx, sy = ox - 0.08 * ux, oy - 0.08 * uy  # start just outside the frame corner
            length = clip.tool_lengths[j] + 0.08
            t = np.clip((xx - sx) * ux + (yy - sy) * uy, 0.0, length)
            d_tool = np.hypot(xx - (sx + t * ux), yy - (sy + t * uy))
            rel = np.clip(d_tool / TOOL_HALF_WIDTH, 0.0, 1.0)
            grey = TOOL_GREY[0] + (TOOL_GREY[1] - TOOL_GREY[0]) * (1.0 - rel**2)
            _blend(img, grey[..., None], _soft(d_tool - TOOL_HALF_WIDTH, size))
        frames.append(np.clip(np.rint(img), 0, 255).astype(np.uint8))
    return frames


def choose_questions(
    clip: Clip,
    rng: np.random.Generator,
    counts: dict[str, Counter],
    k: int,
    pair_prob: float = 0.5,
    types: Sequence[str] | None = None,
) -> list[str]:
    """Pick ``k`` question types for a clip (of ``types``, default all), balancing types and answers; often pairs
    forward/backward."""
    options = {q: a for q in (types or QUESTION_TYPES) if (a := answer_for(clip, q)) is not None}
    chosen: list[str] = []
    pair = {"scope_forward_motion", "scope_backward_motion"}
    if clip.motion != "static" and k >= 2 and pair <= options.keys() and rng.random() < pair_prob:
        chosen = ["scope_forward_motion", "scope_backward_motion"]
    while len(chosen) < min(k, len(options)):

        def score(q: str) -> float:
            c = counts[q]
            deficit = c[options[q]] - min(c[a] for a in QUESTION_TYPES[q].answers)
            return sum(c.values()) + 1.5 * deficit + float(rng.random())

        chosen.append(min((q for q in options if q not in chosen), key=score))
    return chosen


def _load_speaker():
    """Import ``speak_questions`` from the sibling script (scripts/ is not a package)."""
    path = Path(__file__).resolve().with_name("make_spoken_questions.py")
    spec = importlib.util.spec_from_file_location("make_spoken_questions", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_spoken_questions", module)
    spec.loader.exec_module(module)
    return module.speak_questions


def build_samples(
    num_clips: int | None,
    seed: int,
    video_ids: tuple[str, ...] | list[str] = DEFAULT_VIDEO_IDS,
    num_samples: int | None = None,
    questions_per_clip: int = 3,
    question_types: Sequence[str] | None = None,
    lighting: str = "mixed",
) -> tuple[list[Clip], list[dict], list[dict]]:
    """Draw the clips and their in/out-template JSONL rows (no files touched).

    ``num_clips`` clips get ``questions_per_clip`` questions each; with ``num_samples`` clips are added until
    exactly that many rows exist (the last clip may get fewer questions). ``question_types`` restricts the questions
    asked (default: every type); the clips and their pixels do not depend on it. ``lighting`` other than ``mixed``
    fixes the palette of every clip (see :func:`sample_clip`); ``nbi_status`` then has one answer and is not asked.
    """
    if num_clips is None and num_samples is None:
        raise ValueError("give num_clips or num_samples")
    if not video_ids:
        raise ValueError("video_ids must not be empty")
    if len(set(video_ids)) != len(video_ids) or any("/" in v or v in ("", ".", "..") for v in video_ids):
        raise ValueError(f"video_ids must be distinct, non-empty and free of '/': {list(video_ids)}")
    if questions_per_clip < 1:
        raise ValueError("questions_per_clip must be >= 1")
    if lighting not in LIGHTING:
        raise ValueError(f"lighting must be one of {LIGHTING}, got {lighting!r}")
    if question_types is not None:
        unknown = sorted(set(question_types) - QUESTION_TYPES.keys())
        if unknown or not question_types:
            raise ValueError(f"question_types must be a non-empty subset of {list(QUESTION_TYPES)}; got {unknown}")
        if lighting != "mixed" and "nbi_status" in question_types:
            raise ValueError(f"with lighting {lighting!r} every clip has the same NBI answer: drop nbi_status")
        question_types = [q for q in QUESTION_TYPES if q in question_types]
    elif lighting != "mixed":
        question_types = [q for q in QUESTION_TYPES if q != "nbi_status"]
    qrng = np.random.default_rng(np.random.SeedSequence([seed, 2**31 - 1]))
    counts: dict[str, Counter] = {q: Counter() for q in QUESTION_TYPES}
    next_id = dict.fromkeys(video_ids, 1)
    next_frame = {v: int(qrng.integers(100, 2000)) for v in video_ids}
    rows_in: list[dict] = []
    rows_out: list[dict] = []
    clips: list[Clip] = []
    target = num_samples if num_samples is not None else num_clips * questions_per_clip
    index = 0
    while len(rows_in) < target:
        video_id = video_ids[index % len(video_ids)]
        clip = sample_clip(seed, index, video_id, next_frame[video_id], lighting)
        next_frame[video_id] = clip.frame_numbers[-1] + FRAME_STEP * int(qrng.integers(2, 60))
        clips.append(clip)
        k = min(questions_per_clip, target - len(rows_in))
        for qtype in choose_questions(clip, qrng, counts, k, types=question_types):
            short = answer_for(clip, qtype)
            counts[qtype][short] += 1
            qt = QUESTION_TYPES[qtype]
            base = {
                "id": f"qa_{next_id[video_id]:06d}",
                "video_id": video_id,
                "frames": clip.frames,
                "frame_numbers": list(clip.frame_numbers),
            }
            tail = {
                "question_type": qtype,
                "support_frames": FRAMES_PER_CLIP,
                "total_frames": FRAMES_PER_CLIP,
                "support_ratio": 1.0,
                "support_percentage": 100.0,
                "answer": qt.answers[short],
                "short_answer": short,
            }
            rows_in.append({**base, "question": qt.in_question, **tail})
            rows_out.append({**base, "question": qt.out_question, **tail})
            next_id[video_id] += 1
        index += 1
    return clips, rows_in, rows_out


def make_dataset(
    output_dir: str | Path,
    num_clips: int | None,
    seed: int,
    video_ids: tuple[str, ...] | list[str] = DEFAULT_VIDEO_IDS,
    frame_size: int = 112,
    prefix: str = DEFAULT_PREFIX,
    audio: bool = True,
    num_samples: int | None = None,
    questions_per_clip: int = 3,
    question_types: Sequence[str] | None = None,
    lighting: str = "mixed",
    voice: str = "en-us",
    rate: int = 160,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write frames, in/out JSONL (and spoken questions unless ``audio=False``); return a summary dict."""
    if frame_size < 28:
        raise ValueError("frame_size must be >= 28")
    clips, rows_in, rows_out = build_samples(
        num_clips, seed, video_ids, num_samples, questions_per_clip, question_types, lighting
    )
    out = Path(output_dir)
    in_path, out_path = out / f"in_{prefix}.jsonl", out / f"out_{prefix}.jsonl"
    text_in = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows_in)
    text_out = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows_out)
    for path, text in ((in_path, text_in), (out_path, text_out)):
        if path.exists() and path.read_text(encoding="utf-8") != text and not overwrite:
            raise FileExistsError(
                f"{path} exists with different content (another seed or settings?); use another --output_dir "
                f"or pass --overwrite"
            )
    t0 = time.perf_counter()
    for clip in clips:
        frame_dir = out / "frames" / clip.video_id
        frame_dir.mkdir(parents=True, exist_ok=True)
        for name, pixels in zip(clip.frames, render_clip(clip, seed, frame_size), strict=True):
            Image.fromarray(pixels).save(
                frame_dir / f"{name}.jpg", format="JPEG", quality=JPEG_QUALITY, subsampling=0
            )
    t_frames = time.perf_counter() - t0
    in_path.write_text(text_in, encoding="utf-8")
    out_path.write_text(text_out, encoding="utf-8")
    t1 = time.perf_counter()
    written = 0
    if audio:
        speak = _load_speaker()
        for path in (in_path, out_path):
            written += speak(
                path,
                out / "audio" / path.stem,
                voice=voice,
                rate=rate,
                overwrite=overwrite,
                progress=progress,
            )
    counts: dict[str, Counter] = {}
    for row in rows_in:
        counts.setdefault(row["question_type"], Counter())[row["short_answer"]] += 1
    return {
        "output_dir": str(out),
        "clips": len(clips),
        "samples": len(rows_in),
        "files": [str(in_path), str(out_path)],
        "audio_files_written": written,
        "seconds_frames": round(t_frames, 2),
        "seconds_audio": round(time.perf_counter() - t1, 2),
        "answers": {q: dict(sorted(c.items())) for q, c in sorted(counts.items())},
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument(
        "--num_clips", type=int, default=None, help="number of clips (each gets several questions)"
    )
    parser.add_argument(
        "--num_samples", type=int, default=None, help="exact number of JSONL lines (overrides --num_clips)"
    )
    parser.add_argument("--questions_per_clip", type=int, default=3)
    parser.add_argument(
        "--question_types", default=None, help=f"comma-separated subset of: {', '.join(QUESTION_TYPES)} (default: all)"
    )
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--video_ids", default=",".join(DEFAULT_VIDEO_IDS), help="comma-separated video ids")
    parser.add_argument("--frame_size", type=int, default=112)
    parser.add_argument(
        "--prefix", default=DEFAULT_PREFIX, help="files are in_{prefix}.jsonl / out_{prefix}.jsonl"
    )
    parser.add_argument(
        "--no_audio", action="store_true", help="skip the spoken questions (no espeak-ng needed)"
    )
    parser.add_argument(
        "--lighting", choices=LIGHTING, default="mixed",
        help="mixed: NBI or white light per clip; white / nbi: every clip (nbi_status is then not asked)",
    )
    parser.add_argument("--voice", default="en-us")
    parser.add_argument("--rate", type=int, default=160)
    parser.add_argument("--overwrite", action="store_true", help="replace existing JSONL/audio that differ")
    args = parser.parse_args(argv)
    if args.num_clips is None and args.num_samples is None:
        parser.error("give --num_clips or --num_samples")
    video_ids = tuple(v.strip() for v in args.video_ids.split(",") if v.strip())
    try:
        summary = make_dataset(
            args.output_dir,
            args.num_clips,
            args.seed,
            video_ids=video_ids,
            frame_size=args.frame_size,
            prefix=args.prefix,
            audio=not args.no_audio,
            num_samples=args.num_samples,
            questions_per_clip=args.questions_per_clip,
            question_types=[q.strip() for q in args.question_types.split(",")] if args.question_types else None,
            lighting=args.lighting,
            voice=args.voice,
            rate=args.rate,
            overwrite=args.overwrite,
        )
    except (FileExistsError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
