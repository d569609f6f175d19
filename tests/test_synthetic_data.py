"""Tests for the shipped ``test_set/`` and the synthetic-data / spoken-question generators in ``scripts/``."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import load_script
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TEST_SET = ROOT / "test_set"
REAL = ROOT.parent / "shared" / "data" / "real-colon-vqa"
FIELDS = {
    "id": str,
    "video_id": str,
    "frames": list,
    "frame_numbers": list,
    "question": str,
    "question_type": str,
    "support_frames": int,
    "total_frames": int,
    "support_ratio": float,
    "support_percentage": float,
    "answer": str,
    "short_answer": str,
}
# The exact settings of the shipped test_set (also written in test_set/README.md).
TEST_SET_ARGS = {
    "num_clips": None,
    "seed": 1001,
    "video_ids": ("002-001",),
    "prefix": "002-001",
    "num_samples": 50,
}
SMALL = 56  # tiny-model resolution: every cue must survive this downscale
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


def _load(name: str):
    return load_script(name)


@pytest.fixture(scope="module")
def synth():
    return _load("make_synthetic_dataset")


@pytest.fixture(scope="module")
def speech():
    return _load("make_spoken_questions")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@pytest.fixture(scope="module")
def fresh_set(synth, tmp_path_factory) -> Path:
    """A small freshly generated multi-video set (no audio) with a seed unlike the test_set's."""
    out = tmp_path_factory.mktemp("fresh")
    synth.make_dataset(
        out, num_clips=30, seed=7, video_ids=("002-002", "002-003", "002-004"), audio=False, progress=False
    )
    return out


# ----------------------------------------------------------------------------------------------------
# pixel-statistic classifiers (run at 56x56, like a tiny model with 14-px patches)


def load_clip(root: Path, row: dict, size: int = SMALL) -> np.ndarray:
    """The clip's frames as float32 [T, size, size, 3]."""
    frames = []
    for name in row["frames"]:
        with Image.open(root / "frames" / row["video_id"] / f"{name}.jpg") as im:
            frames.append(np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)))
    return np.stack(frames).astype(np.float32)


def luma(x: np.ndarray) -> np.ndarray:
    return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]


def bright_centroids(clip: np.ndarray) -> np.ndarray:
    """Per-frame (x, y) centroid of very bright pixels (the lesion), normalized to [0, 1]."""
    size = clip.shape[1]
    ys, xs = np.mgrid[0:size, 0:size]
    out = []
    for frame in clip:
        mask = luma(frame) > 200
        assert mask.sum() > 5, "no lesion pixels found"
        out.append(((xs[mask].mean() + 0.5) / size, (ys[mask].mean() + 0.5) / size))
    return np.array(out)


def predict(clip: np.ndarray, qtype: str) -> str:
    """Answer a question from simple pixel statistics alone."""
    y = luma(clip)
    r, g, b = clip[..., 0], clip[..., 1], clip[..., 2]
    if qtype == "nbi_status":
        return "yes" if g.mean() > r.mean() else "no"
    if qtype.startswith("scope_"):
        dark = (y < 45).mean(axis=(1, 2))
        ratio = dark[-1] / max(dark[0], 1e-6)
        motion = "advancing" if ratio > 1.5 else "withdrawing" if ratio < 1 / 1.5 else "static"
        return {
            "scope_motion": "no" if motion == "static" else "yes",
            "scope_motion_type": motion,
            "scope_forward_motion": "yes" if motion == "advancing" else "no",
            "scope_backward_motion": "yes" if motion == "withdrawing" else "no",
        }[qtype]
    if qtype == "lesion_motion_direction":
        c = bright_centroids(clip)
        dx, dy = c[-1] - c[0]
        if max(abs(dx), abs(dy)) < 0.06:
            return "stable"
        if abs(dx) > abs(dy):
            return "right" if dx > 0 else "left"
        return "down" if dy > 0 else "up"
    if qtype == "lesion_screen_position":
        cx, cy = bright_centroids(clip).mean(axis=0)
        return ("upper" if cy < 0.5 else "lower") + "-" + ("left" if cx < 0.5 else "right")
    if qtype == "tool_catheter_check":
        spread = clip.max(axis=-1) - clip.min(axis=-1)
        grey = (spread < 15) & (y > 90) & (y < 205)
        return "yes" if grey.mean() > 0.005 else "no"
    if qtype == "occlusion_check":
        brown = (r > b + 50) & (g > b + 30) & (y > 50) & (y < 200)
        return "yes" if brown.mean() > 0.03 else "no"
    raise AssertionError(f"no pixel classifier for question type {qtype!r}")


def pixel_accuracy(root: Path, rows: list[dict]) -> tuple[float, dict]:
    cache: dict[tuple, np.ndarray] = {}
    per_type: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        key = (row["video_id"], tuple(row["frames"]))
        if key not in cache:
            cache[key] = load_clip(root, row)
        per_type[row["question_type"]].append(
            predict(cache[key], row["question_type"]) == row["short_answer"]
        )
    total = [ok for oks in per_type.values() for ok in oks]
    return sum(total) / len(total), {t: sum(v) / len(v) for t, v in per_type.items()}


# ----------------------------------------------------------------------------------------------------
# shipped test_set


def check_schema(rows: list[dict], synth) -> None:
    for i, row in enumerate(rows, start=1):
        where = f"line {i}"
        assert set(row) == set(FIELDS), where
        for field, typ in FIELDS.items():
            assert isinstance(row[field], typ), (where, field)
        assert re.fullmatch(r"qa_\d{6}", row["id"]), where
        assert len(row["frames"]) == len(row["frame_numbers"]) == row["total_frames"] == 8, where
        assert row["frames"] == [f"{row['video_id']}_{n}" for n in row["frame_numbers"]], where
        assert np.all(np.diff(row["frame_numbers"]) == 4), where
        assert (row["support_frames"], row["support_ratio"], row["support_percentage"]) == (8, 1.0, 100.0), (
            where
        )
        qt = synth.QUESTION_TYPES[row["question_type"]]
        assert row["answer"] == qt.answers[row["short_answer"]], where
        # keyword metrics need the short answer inside the long one, at word boundaries
        assert re.search(rf"(?<![\w-]){re.escape(row['short_answer'])}(?![\w-])", row["answer"].lower()), (
            where
        )
    keys = [(r["video_id"], r["id"]) for r in rows]
    assert len(set(keys)) == len(keys)


def test_test_set_schema_and_pairing(synth):
    rows_in = read_jsonl(TEST_SET / "in_002-001.jsonl")
    rows_out = read_jsonl(TEST_SET / "out_002-001.jsonl")
    assert len(rows_in) == len(rows_out) == 50
    check_schema(rows_in, synth)
    check_schema(rows_out, synth)
    assert {r["video_id"] for r in rows_in} == {"002-001"}
    for a, b in zip(rows_in, rows_out, strict=True):
        assert {k: v for k, v in a.items() if k != "question"} == {
            k: v for k, v in b.items() if k != "question"
        }
        assert a["question"] != b["question"]
    assert len({r["question_type"] for r in rows_in}) >= 7


def test_test_set_media_exist(speech):
    for split in ("in_002-001", "out_002-001"):
        rows = read_jsonl(TEST_SET / f"{split}.jsonl")
        audio_dir = TEST_SET / "audio" / split
        manifest = speech.load_manifest(audio_dir)
        for row in rows:
            for name in row["frames"]:
                with Image.open(TEST_SET / "frames" / row["video_id"] / f"{name}.jpg") as im:
                    assert im.format == "JPEG" and im.mode == "RGB" and im.size == (112, 112)
            rel = f"{row['video_id']}/{row['id']}.wav"
            info = sf.info(audio_dir / rel)
            assert (info.samplerate, info.channels) == (16_000, 1), rel
            assert 0.5 < info.duration < 6.0, rel
            entry = manifest[rel]
            assert (entry["video_id"], entry["id"], entry["text"]) == (
                row["video_id"],
                row["id"],
                row["question"],
            )
        audio, sr = sf.read(audio_dir / rel, dtype="float32")
        assert sr == 16_000 and audio.ndim == 1 and np.abs(audio).max() > 0.1


def test_test_set_regenerates_identically(synth, tmp_path):
    """The README command reproduces the shipped JSONL and JPEG bytes (audio skipped here)."""
    synth.make_dataset(tmp_path, audio=False, progress=False, **TEST_SET_ARGS)
    for name in ("in_002-001.jsonl", "out_002-001.jsonl"):
        assert (tmp_path / name).read_bytes() == (TEST_SET / name).read_bytes()
    new = sorted(p.relative_to(tmp_path) for p in (tmp_path / "frames").rglob("*.jpg"))
    old = sorted(p.relative_to(TEST_SET) for p in (TEST_SET / "frames").rglob("*.jpg"))
    assert new == old
    assert all((tmp_path / p).read_bytes() == (TEST_SET / p).read_bytes() for p in new)


def test_training_defaults_never_touch_the_test_set(synth, fresh_set):
    assert "002-001" not in synth.DEFAULT_VIDEO_IDS
    test_frames = {f for r in read_jsonl(TEST_SET / "in_002-001.jsonl") for f in r["frames"]}
    _, rows, _ = synth.build_samples(300, seed=0)
    assert {r["video_id"] for r in rows} == set(synth.DEFAULT_VIDEO_IDS)
    assert not test_frames & {f for r in rows for f in r["frames"]}


# ----------------------------------------------------------------------------------------------------
# answers depend on the pixels


def test_test_set_answers_recoverable_from_pixels():
    acc, per_type = pixel_accuracy(TEST_SET, read_jsonl(TEST_SET / "in_002-001.jsonl"))
    assert acc == 1.0, per_type


def test_fresh_set_answers_recoverable_from_pixels(fresh_set):
    rows = read_jsonl(fresh_set / "in_template.jsonl")
    assert len(rows) == 90
    acc, per_type = pixel_accuracy(fresh_set, rows)
    assert acc == 1.0, per_type
    assert len(per_type) == 9


def test_answers_need_the_question(synth):
    """Several questions per clip with different answers: a question-blind answer per clip scores low."""
    _, rows, _ = synth.build_samples(200, seed=3)
    by_clip: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        by_clip[(row["video_id"], tuple(row["frames"]))].append(row)
    assert all(len(v) == 3 for v in by_clip.values())
    blind = sum(Counter(r["answer"] for r in v).most_common(1)[0][1] for v in by_clip.values()) / len(rows)
    assert blind < 0.5
    pairs = [
        v
        for v in by_clip.values()
        if {"scope_forward_motion", "scope_backward_motion"} <= {r["question_type"] for r in v}
    ]
    assert len(pairs) > 40
    for v in pairs:
        ans = {r["question_type"]: r["short_answer"] for r in v}
        assert {ans["scope_forward_motion"], ans["scope_backward_motion"]} == {"yes", "no"}


def test_answers_balanced_per_type(synth):
    _, rows, _ = synth.build_samples(300, seed=0)
    by_type: dict[str, Counter] = defaultdict(Counter)
    for row in rows:
        by_type[row["question_type"]][row["short_answer"]] += 1
    sizes = [sum(c.values()) for c in by_type.values()]
    assert max(sizes) < 2 * min(sizes), by_type
    for qtype, c in by_type.items():
        n_answers = len(synth.QUESTION_TYPES[qtype].answers)
        assert set(c) == set(synth.QUESTION_TYPES[qtype].answers), qtype
        assert max(c.values()) / sum(c.values()) < 1.6 / n_answers, (qtype, c)


# ----------------------------------------------------------------------------------------------------
# keys, frame numbers, determinism


def test_ids_repeat_across_videos_and_keys_unique(fresh_set):
    rows = read_jsonl(fresh_set / "in_template.jsonl")
    videos_per_id: dict[str, set] = defaultdict(set)
    for row in rows:
        videos_per_id[row["id"]].add(row["video_id"])
    assert sum(len(v) > 1 for v in videos_per_id.values()) >= 20
    assert len({r["id"] for r in rows}) < len(rows)
    assert len({(r["video_id"], r["id"]) for r in rows}) == len(rows)
    clips_per_video: dict[str, set] = defaultdict(set)
    for row in rows:
        clips_per_video[row["video_id"]].add(tuple(row["frame_numbers"]))
    for video, clips in clips_per_video.items():
        numbers = [n for clip in clips for n in clip]
        assert len(numbers) == len(set(numbers)), f"frame numbers collide in {video}"
    jpgs = list((fresh_set / "frames").rglob("*.jpg"))
    assert len(jpgs) == sum(len(c) for c in clips_per_video.values()) * 8


def test_same_seed_same_bytes(synth, tmp_path):
    args = {"num_clips": 4, "video_ids": ("002-002", "002-003"), "audio": False, "progress": False}
    synth.make_dataset(tmp_path / "a", seed=11, **args)
    synth.make_dataset(tmp_path / "b", seed=11, **args)
    synth.make_dataset(tmp_path / "c", seed=12, **args)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 2 + 4 * 8
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert (tmp_path / "a" / "in_template.jsonl").read_bytes() != (
        tmp_path / "c" / "in_template.jsonl"
    ).read_bytes()


def test_refuses_to_overwrite_a_different_dataset(synth, tmp_path):
    synth.make_dataset(tmp_path, num_clips=2, seed=1, audio=False, progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        synth.make_dataset(tmp_path, num_clips=2, seed=2, audio=False, progress=False)
    synth.make_dataset(tmp_path, num_clips=2, seed=1, audio=False, progress=False)  # same content: fine


# ----------------------------------------------------------------------------------------------------
# spoken questions


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def row(video_id: str, qid: str, question: str) -> dict:
    return {"id": qid, "video_id": video_id, "question": question}


@needs_espeak
def test_speak_keys_on_video_and_id(speech, tmp_path):
    data = write_jsonl(
        tmp_path / "q.jsonl",
        [
            row("002-001", "qa_000001", "Is the scope moving forward?"),
            row("002-002", "qa_000001", "Is a catheter visible?"),
        ],
    )
    audio_dir = tmp_path / "audio"
    assert speech.speak_questions(data, audio_dir, progress=False) == 2
    a, b = audio_dir / "002-001" / "qa_000001.wav", audio_dir / "002-002" / "qa_000001.wav"
    wa, sr_a = sf.read(a, dtype="float32")
    wb, sr_b = sf.read(b, dtype="float32")
    assert sr_a == sr_b == 16_000 and wa.ndim == wb.ndim == 1
    assert np.abs(wa).max() > 0.1 and wa.shape != wb.shape  # two different questions, two different files
    manifest = speech.load_manifest(audio_dir)
    assert manifest["002-002/qa_000001.wav"]["text"] == "Is a catheter visible?"
    # idempotent: the same questions again write nothing and leave the bytes alone
    before = a.read_bytes()
    assert speech.speak_questions(data, audio_dir, progress=False) == 0
    assert a.read_bytes() == before


@needs_espeak
def test_speak_never_overwrites_another_question(speech, tmp_path):
    audio_dir = tmp_path / "audio"
    first = write_jsonl(tmp_path / "a.jsonl", [row("002-001", "qa_000007", "Is NBI on?")])
    speech.speak_questions(first, audio_dir, progress=False)
    target = audio_dir / "002-001" / "qa_000007.wav"
    before = target.read_bytes()
    second = write_jsonl(tmp_path / "b.jsonl", [row("002-001", "qa_000007", "Is the lesion moving up?")])
    with pytest.raises(speech.SpokenQuestionError) as err:
        speech.speak_questions(second, audio_dir, progress=False)
    msg = str(err.value)
    for part in (
        f"{second}:1",
        str(target),
        "Is NBI on?",
        "Is the lesion moving up?",
        "qa_000007",
        "002-001",
        "--audio_dir",
        "--overwrite",
    ):
        assert part in msg, part
    assert target.read_bytes() == before
    assert speech.speak_questions(second, audio_dir, overwrite=True, progress=False) == 1
    assert target.read_bytes() != before
    assert speech.load_manifest(audio_dir)["002-001/qa_000007.wav"]["text"] == "Is the lesion moving up?"


@needs_espeak
def test_speak_unknown_existing_file_is_an_error(speech, tmp_path):
    audio_dir = tmp_path / "audio"
    (audio_dir / "002-001").mkdir(parents=True)
    sf.write(audio_dir / "002-001" / "qa_000001.wav", np.zeros(1600, dtype=np.float32), 16_000)
    data = write_jsonl(tmp_path / "q.jsonl", [row("002-001", "qa_000001", "Is NBI on?")])
    with pytest.raises(speech.SpokenQuestionError, match="not listed in"):
        speech.speak_questions(data, audio_dir, progress=False)


@needs_espeak
def test_speak_real_slice(speech, tmp_path):
    path = REAL / "in_002-001.jsonl"
    if not path.exists():
        pytest.skip("shared REAL-Colon-VQA annotations not available")
    assert speech.speak_questions(path, tmp_path, progress=False) == 50
    assert len(list(tmp_path.rglob("*.wav"))) == 50


def test_real_file_keys_are_unique_paths(speech):
    """On the real 5,200-line file ids repeat across videos; (video_id, id) still gives one path each."""
    path = REAL / "in_template.jsonl"
    if not path.exists():
        pytest.skip("shared REAL-Colon-VQA annotations not available")
    jobs = speech.read_jobs(path, speech.DEFAULT_TEMPLATE)
    assert len(jobs) == 5200
    assert len({j.rel_path for j in jobs}) == 5200
    assert len({j.qid for j in jobs}) < 5200
    with pytest.raises(speech.SpokenQuestionError, match="map to the same audio file"):
        speech.read_jobs(path, "{id}.wav")


def test_speak_input_errors_name_file_and_line(speech, tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps(row("v", "qa_1", "Q?")) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(speech.SpokenQuestionError, match=re.escape(f"{bad_json}:2: invalid JSON")):
        speech.speak_questions(bad_json, tmp_path / "a", progress=False)
    dup = write_jsonl(tmp_path / "dup.jsonl", [row("v", "qa_1", "Q one?"), row("v", "qa_1", "Q two?")])
    with pytest.raises(speech.SpokenQuestionError, match=re.escape(f"{dup}:2:")) as err:
        speech.speak_questions(dup, tmp_path / "a", progress=False)
    assert f"{dup}:1" in str(err.value) and "Q one?" in str(err.value)
    evil = write_jsonl(tmp_path / "evil.jsonl", [row("v", "../../x", "Q?")])
    with pytest.raises(speech.SpokenQuestionError, match="cannot be used in a file path"):
        speech.speak_questions(evil, tmp_path / "a", progress=False)
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"id": "qa_1", "video_id": "v"}])
    with pytest.raises(speech.SpokenQuestionError, match=re.escape(f"{missing}:1: field 'question'")):
        speech.speak_questions(missing, tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()


def test_speak_missing_espeak_says_how_to_install(speech, tmp_path, monkeypatch):
    monkeypatch.setattr(speech.shutil, "which", lambda name: None)
    data = write_jsonl(tmp_path / "q.jsonl", [row("v", "qa_1", "Q?")])
    with pytest.raises(speech.SpokenQuestionError, match="apt-get install -y espeak-ng"):
        speech.speak_questions(data, tmp_path / "a", progress=False)
