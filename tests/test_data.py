"""Tests for surgvqa.data: validation of every line, (video_id, id) keying, the Dataset, the check CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from surgvqa.data import (
    QUESTION_MODALITIES,
    DataError,
    MediaConfig,
    Problem,
    Sample,
    SurgicalVQADataset,
    ablation_donors,
    load_qa_text,
    load_samples,
    main,
    summarize_samples,
)
from surgvqa.media import MediaError

REPO = Path(__file__).resolve().parents[1]
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-colon-vqa" / "in_template.jsonl"
TEST_SET = REPO / "test_set"


# ---------------------------------------------------------------------------------------------------- helpers
def _record(video_id: str = "002-001", qid: str = "qa_000001", n_frames: int = 4, **over) -> dict:
    rec = {
        "id": qid,
        "video_id": video_id,
        "frames": [f"{video_id}_{100 + 4 * i}" for i in range(n_frames)],
        "frame_numbers": [100 + 4 * i for i in range(n_frames)],
        "question": "Is clean mucosa visible in this sequence?",
        "question_type": "mucosa_visibility",
        "answer": "Yes, clean mucosa is visible.",
        "short_answer": "yes",
    }
    if "frames" in over and "frame_numbers" not in over:  # a line that names other frames has no numbers
        del rec["frame_numbers"]
    rec.update(over)
    return rec


def _write_jsonl(path: Path, records: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def _wav(path: Path, seconds: float = 0.25, freq: float = 440.0, rate: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate)
    return path


class World:
    """A small data set under tmp_path: frames/{video_id}/{frame}.jpg and audio/{video_id}/{id}.wav."""

    def __init__(self, root: Path, records: list, *, audio: bool = True, size: tuple[int, int] = (64, 48)):
        self.root = root
        self.frames = root / "frames"
        self.audio = root / "audio"
        self.frames.mkdir(parents=True, exist_ok=True)
        self.audio.mkdir(parents=True, exist_ok=True)
        for k, rec in enumerate(r for r in records if isinstance(r, dict)):
            frames = rec.get("frames")
            for j, frame in enumerate(frames if isinstance(frames, list) else []):
                if isinstance(frame, str) and isinstance(rec.get("video_id"), str):
                    path = self.frames / rec["video_id"] / f"{frame}.jpg"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.new("RGB", size, (40 * j % 256, 100, 200)).save(path)
            if audio and isinstance(rec.get("id"), str) and isinstance(rec.get("video_id"), str):
                _wav(self.audio / rec["video_id"] / f"{rec['id']}.wav", 0.25 + 0.05 * k, 300 + 100 * k)
        self.data = _write_jsonl(root / "data.jsonl", records)

    def media(self, **kw) -> MediaConfig:
        kw.setdefault("frames_dir", str(self.frames))
        if kw.get("question_modality", "text") != "text":
            kw.setdefault("audio_dir", str(self.audio))
        return MediaConfig(**kw)


def _problems(world: World, **kw) -> list[Problem]:
    load_kw = {k: kw.pop(k) for k in ("require_scoring_fields", "check_media") if k in kw}
    with pytest.raises(DataError) as info:
        load_samples(world.data, world.media(**kw), **load_kw)
    return info.value.problems


def _one(world: World, **kw) -> str:
    problems = _problems(world, **kw)
    assert len(problems) == 1, problems
    return str(problems[0])


# --------------------------------------------------------------------------------------------- real schema
@pytest.mark.skipif(not REAL.is_file(), reason="../shared/data/real-colon-vqa not present")
def test_real_colon_vqa_all_lines_parse_keyed_on_video_and_id(tmp_path: Path) -> None:
    start = time.perf_counter()
    records = [json.loads(line) for line in REAL.read_text().splitlines()]
    one = tmp_path / "one.jpg"
    Image.new("RGB", (8, 8), (120, 60, 60)).save(one)
    frames = tmp_path / "frames"
    for video_id, frame in {(r["video_id"], f) for r in records for f in r["frames"]}:
        (frames / video_id).mkdir(parents=True, exist_ok=True)
        os.link(one, frames / video_id / f"{frame}.jpg")  # one tiny JPEG, many names (hard links)
    samples, problems = load_samples(REAL, MediaConfig(frames_dir=str(frames)), require_scoring_fields=True)
    elapsed = time.perf_counter() - start
    assert problems == []
    assert len(samples) == 5200
    assert len({s.key for s in samples}) == 5200
    assert len({s.id for s in samples}) == 3750  # ids repeat across videos
    types = Counter(s.question_type for s in samples)
    assert len(types) == 20
    assert types["mucosa_visibility"] == 300
    assert types["tool_identification"] == 250
    assert types["lesion_site"] == 150
    assert len({s.short_answer for s in samples}) == 26
    assert all(len(s.frame_paths) == 8 and s.audio_path is None for s in samples)
    first = samples[0]
    assert first.key == ("002-003", "qa_000001")
    assert first.source.endswith("in_template.jsonl:1")
    assert first.frame_paths[0].name == "002-003_3806.jpg"
    assert first.extra["frame_numbers"][0] == 3806
    summary = summarize_samples(samples)
    assert summary["n"] == 5200 and summary["videos"]["002-001"] == 700
    assert summary["frames_per_sample"] == {"min": 8, "max": 8, "mean": 8.0}
    print(f"5,200-line load with media checks: {elapsed:.1f} s")


@pytest.mark.skipif(not (TEST_SET / "in_002-001.jsonl").is_file(), reason="test_set/ not generated yet")
def test_shipped_test_set_is_clean() -> None:
    media = MediaConfig(
        frames_dir=str(TEST_SET / "frames"),
        audio_dir=str(TEST_SET / "audio" / "in_002-001"),
        question_modality="text+audio",
    )
    samples, problems = load_samples(TEST_SET / "in_002-001.jsonl", media, require_scoring_fields=True)
    assert problems == [] and samples
    assert len({s.key for s in samples}) == len(samples)
    item = SurgicalVQADataset(samples, media, max_frames=4)[0]
    assert len(item["frames"]) <= 4 and item["audio"] is not None and item["audio"].dtype == np.float32


# --------------------------------------------------------------------------------------------- good input
def test_good_file_builds_samples_with_resolved_paths(tmp_path: Path) -> None:
    world = World(tmp_path, [_record(qid="qa_1"), _record(qid="qa_2", n_frames=8)])
    samples, problems = load_samples(world.data, world.media(question_modality="text+audio"))
    assert problems == []
    assert [s.key for s in samples] == [("002-001", "qa_1"), ("002-001", "qa_2")]
    s = samples[1]
    assert isinstance(s, Sample) and len(s.frame_paths) == 8 and s.video_path is None
    assert s.frame_paths[0] == (world.frames / "002-001" / "002-001_100.jpg").resolve()
    assert s.audio_path == (world.audio / "002-001" / "qa_2.wav").resolve()
    assert s.source == f"{world.data}:2"
    assert s.extra == {"frame_numbers": [100 + 4 * i for i in range(8)]}
    assert s.short_answer == "yes" and s.question_type == "mucosa_visibility"
    assert len({*samples, *samples}) == 2  # hashable (extra is left out of the hash)
    # text modality: no audio path even if audio exists
    text_samples, _ = load_samples(world.data, world.media())
    assert all(t.audio_path is None for t in text_samples)


def test_frames_dir_none_defaults_to_frames_next_to_data(tmp_path: Path) -> None:
    world = World(tmp_path, [_record()])
    samples, _ = load_samples(world.data, MediaConfig(frames_dir=None))
    assert samples[0].frame_paths[0].parent == (tmp_path / "frames" / "002-001").resolve()


def test_alternative_image_and_audio_extensions(tmp_path: Path) -> None:
    world = World(tmp_path, [_record()], audio=False)
    moved = world.frames / "002-001" / "002-001_100.jpg"
    Image.open(moved).save(moved.with_suffix(".png"))
    moved.unlink()
    _wav(world.audio / "002-001" / "qa_000001.flac")
    samples, _ = load_samples(world.data, world.media(question_modality="audio"))
    assert samples[0].frame_paths[0].suffix == ".png"
    assert samples[0].audio_path is not None and samples[0].audio_path.suffix == ".flac"


def test_explicit_audio_field(tmp_path: Path) -> None:
    world = World(tmp_path, [_record(audio="spoken/q1.wav")], audio=False)
    _wav(world.audio / "spoken" / "q1.wav")
    samples, _ = load_samples(world.data, world.media(question_modality="audio"))
    assert samples[0].audio_path == (world.audio / "spoken" / "q1.wav").resolve()
    assert "audio" not in samples[0].extra


# ---------------------------------------------------------------------------------------------- bad input
def test_malformed_json_line(tmp_path: Path) -> None:
    world = World(tmp_path, [_record(qid="qa_1"), '{"id": "qa_2", "video_id": ', _record(qid="qa_3")])
    msg = _one(world)
    assert f"{world.data}:2" in msg and "malformed JSON" in msg and "fix the line" in msg


def test_non_object_line(tmp_path: Path) -> None:
    world = World(tmp_path, [_record(), "[1, 2]"])
    assert f"{world.data}:2" in _one(world) and "not an object" in _one(world)


@pytest.mark.parametrize("field", ["id", "video_id", "question", "answer"])
def test_missing_required_field(tmp_path: Path, field: str) -> None:
    rec = _record()
    del rec[field]
    msg = _one(World(tmp_path, [rec]))
    assert "data.jsonl:1" in msg and f"missing required field '{field}'" in msg and "add it" in msg


def test_missing_frames_and_video(tmp_path: Path) -> None:
    rec = _record()
    del rec["frames"]
    msg = _one(World(tmp_path, [rec]))
    assert "data.jsonl:1" in msg and "'frames'" in msg and "'video'" in msg


def test_missing_scoring_fields_only_when_required(tmp_path: Path) -> None:
    rec = _record()
    del rec["short_answer"]
    world = World(tmp_path, [rec])
    samples, _ = load_samples(world.data, world.media())
    assert samples[0].short_answer is None
    msg = _one(world, require_scoring_fields=True)
    assert "'short_answer'" in msg and "qa_000001" in msg and "--require_scoring_fields" in msg


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"frames": "002-001_100"}, "'frames' must be a list of frame-name strings, got str"),
        ({"frames": ["002-001_100", 7]}, "'frames' must be a list"),
        ({"frames": []}, "'frames' is an empty list"),
        ({"id": 17}, "'id' must be a string, got int 17"),
        ({"answer": ["yes"]}, "'answer' must be a string"),
        ({"short_answer": 3}, "'short_answer' must be a string"),
    ],
)
def test_wrong_types(tmp_path: Path, override: dict, expected: str) -> None:
    msg = _one(World(tmp_path, [_record(**override)]))
    assert "data.jsonl:1" in msg and expected in msg


@pytest.mark.parametrize("field", ["answer", "question"])
def test_empty_answer_or_question(tmp_path: Path, field: str) -> None:
    msg = _one(World(tmp_path, [_record(**{field: "   "})]))
    assert "data.jsonl:1" in msg
    assert "video_id='002-001', id='qa_000001'" in msg and f"'{field}' is empty" in msg


def test_missing_frame_reports_every_path_tried(tmp_path: Path) -> None:
    world = World(tmp_path, [_record()])
    (world.frames / "002-001" / "002-001_104.jpg").unlink()
    msg = _one(world)
    base = (world.frames / "002-001").resolve() / "002-001_104"
    assert "data.jsonl:1" in msg and "1 of 4 frame file(s) missing" in msg
    for ext in (".jpg", ".jpeg", ".png"):
        assert f"{base}{ext}" in msg
    assert "--frame_path_template" in msg and "{video_id}/{frame}.jpg" in msg


def test_corrupt_jpeg(tmp_path: Path) -> None:
    world = World(tmp_path, [_record()])
    bad = world.frames / "002-001" / "002-001_108.jpg"
    bad.write_bytes(bad.read_bytes()[:40])
    msg = _one(world)
    assert "data.jsonl:1" in msg and str(bad.resolve()) in msg and "re-extract" in msg
    # check_media=False skips decoding (and existence) checks
    samples, _ = load_samples(world.data, world.media(), check_media=False)
    assert len(samples) == 1


def test_frames_of_different_sizes(tmp_path: Path) -> None:
    world = World(tmp_path, [_record()])
    Image.new("RGB", (32, 32)).save(world.frames / "002-001" / "002-001_104.jpg")
    msg = _one(world)
    assert "differ in size" in msg and "002-001_104.jpg" in msg


def test_missing_audio(tmp_path: Path) -> None:
    world = World(tmp_path, [_record()], audio=False)
    msg = _one(world, question_modality="text+audio")
    base = (world.audio / "002-001").resolve() / "qa_000001"
    assert "data.jsonl:1" in msg and "video_id='002-001', id='qa_000001'" in msg
    for ext in (".wav", ".flac", ".mp3", ".ogg"):
        assert f"{base}{ext}" in msg
    assert "scripts/make_spoken_questions.py" in msg


def test_corrupt_audio(tmp_path: Path) -> None:
    world = World(tmp_path, [_record()])
    bad = world.audio / "002-001" / "qa_000001.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEgarbage" + os.urandom(32))
    msg = _one(world, question_modality="audio")
    assert "data.jsonl:1" in msg and str(bad.resolve()) in msg and "make_spoken_questions" in msg


def test_zero_length_audio(tmp_path: Path) -> None:
    world = World(tmp_path, [_record()])
    bad = world.audio / "002-001" / "qa_000001.wav"
    sf.write(bad, np.zeros(0, dtype=np.float32), 16000)
    msg = _one(world, question_modality="audio")
    assert "zero-length" in msg and str(bad.resolve()) in msg and "data.jsonl:1" in msg


def test_dotdot_in_frame_name_escapes_root(tmp_path: Path) -> None:
    world = World(tmp_path, [_record(frames=["../../secret"])])
    msg = _one(world)
    assert "data.jsonl:1" in msg and "../../secret" in msg and "outside root" in msg
    assert str(world.frames.resolve()) in msg


def test_absolute_audio_field(tmp_path: Path) -> None:
    outside = _wav(tmp_path / "elsewhere" / "q.wav")
    world = World(tmp_path, [_record(audio=str(outside))])
    msg = _one(world, question_modality="audio")
    assert "data.jsonl:1" in msg and str(outside) in msg and "absolute" in msg and "'audio' field" in msg


def test_absolute_frame_template(tmp_path: Path) -> None:
    world = World(tmp_path, [_record(n_frames=1)])
    template = str(world.frames) + "/{video_id}/{frame}.jpg"
    msg = _one(world, frame_path_template=template)
    assert "absolute" in msg and str(world.frames) in msg


def test_symlink_out_of_root(tmp_path: Path) -> None:
    world = World(tmp_path, [_record(n_frames=2)])
    secret = tmp_path / "secret.jpg"
    Image.new("RGB", (64, 48)).save(secret)
    link = world.frames / "002-001" / "002-001_104.jpg"
    link.unlink()
    link.symlink_to(secret)
    msg = _one(world)
    assert "data.jsonl:1" in msg and str(secret) in msg and "outside root" in msg
    assert "002-001_104.jpg" in msg
    # a symlink to a file inside the root is fine
    link.unlink()
    link.symlink_to(world.frames / "002-001" / "002-001_100.jpg")
    samples, _ = load_samples(world.data, world.media())
    assert len(samples) == 1


def test_duplicate_key_names_both_lines(tmp_path: Path) -> None:
    world = World(tmp_path, [_record(qid="qa_1"), _record(qid="qa_2"), _record(qid="qa_1")])
    msg = _one(world)
    assert f"{world.data}:1" in msg and f"{world.data}:3" in msg and "duplicate" in msg
    assert "unique id within its video" in msg


def test_same_id_in_two_videos_is_not_a_duplicate(tmp_path: Path) -> None:
    world = World(tmp_path, [_record("002-001", "qa_X"), _record("002-002", "qa_X")])
    samples, problems = load_samples(world.data, world.media())
    assert problems == [] and [s.key for s in samples] == [("002-001", "qa_X"), ("002-002", "qa_X")]


def test_all_problems_collected_and_skip_bad(tmp_path: Path) -> None:
    records = [
        _record(qid="qa_1"),
        "not json",
        _record(qid="qa_3", answer=""),
        _record(qid="qa_4"),
        _record(qid="qa_4"),
        _record(qid="qa_6", frames=7),
    ]
    world = World(tmp_path, records)
    with pytest.raises(DataError) as info:
        load_samples(world.data, world.media())
    err = info.value
    assert isinstance(err, ValueError)
    sources = sorted(p.source for p in err.problems)
    assert sources == sorted(f"{world.data}:{n}" for n in (2, 3, 5, 6))
    assert "4 problem(s)" in str(err) and "--skip_bad_samples" in str(err)
    samples, problems = load_samples(world.data, world.media(), skip_bad=True)
    assert [s.id for s in samples] == ["qa_1", "qa_4"]
    assert len(problems) == 4


def test_data_error_lists_first_20_and_count(tmp_path: Path) -> None:
    world = World(tmp_path, [_record(qid=f"qa_{i}", answer="") for i in range(25)])
    with pytest.raises(DataError) as info:
        load_samples(world.data, world.media())
    text = str(info.value)
    assert len(info.value.problems) == 25
    assert "data.jsonl:20" in text and "data.jsonl:21:" not in text and "... and 5 more" in text


def test_missing_data_file_and_empty_file(tmp_path: Path) -> None:
    media = MediaConfig(frames_dir=str(tmp_path))
    with pytest.raises(DataError, match="not found; fix --data_path"):
        load_samples(tmp_path / "nope.jsonl", media, skip_bad=True)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no samples"):
        load_samples(empty, media)


def test_media_config_validation() -> None:
    assert QUESTION_MODALITIES == ("text", "audio", "text+audio")
    with pytest.raises(ValueError, match="audio_dir is not set"):
        MediaConfig(frames_dir="f", question_modality="audio")
    with pytest.raises(ValueError, match="question_modality must be one of"):
        MediaConfig(frames_dir="f", question_modality="speech")
    with pytest.raises(ValueError, match="ablate must be one of"):
        MediaConfig(frames_dir="f", ablate="frames")
    with pytest.raises(ValueError, match="has no audio"):
        MediaConfig(frames_dir="f", ablate="audio")
    with pytest.raises(ValueError, match=r"must use \{video_id\}"):
        MediaConfig(frames_dir="f", audio_dir="a", question_modality="audio", audio_path_template="{id}.wav")
    with pytest.raises(ValueError, match="placeholders"):
        MediaConfig(frames_dir="f", frame_path_template="{video}/{frame}.jpg")
    with pytest.raises(ValueError, match="frame_size"):
        MediaConfig(frames_dir="f", frame_size=16)


# --------------------------------------------------------------------------------- audio keyed on (video, id)
def test_audio_is_keyed_on_video_and_id(tmp_path: Path) -> None:
    world = World(tmp_path, [_record("002-001", "qa_X"), _record("002-002", "qa_X")])
    media = world.media(question_modality="text+audio")
    samples, _ = load_samples(world.data, media)
    a, b = samples
    assert a.audio_path == (world.audio / "002-001" / "qa_X.wav").resolve()
    assert b.audio_path == (world.audio / "002-002" / "qa_X.wav").resolve()
    ds = SurgicalVQADataset(samples, media)
    audio_a, audio_b = ds[0]["audio"], ds[1]["audio"]
    assert len(audio_a) != len(audio_b)  # 0.25 s vs 0.30 s
    np.testing.assert_allclose(audio_a, sf.read(a.audio_path, dtype="float32")[0], atol=1e-6)
    # without its own audio, (002-001, qa_X) is reported, never served (002-002, qa_X)'s audio
    a.audio_path.unlink()
    msg = _one(world, question_modality="text+audio")
    assert "video_id='002-001', id='qa_X'" in msg and str(a.audio_path) in msg
    assert str(world.audio.resolve() / "002-002") not in msg
    kept, problems = load_samples(world.data, media, skip_bad=True)
    assert [s.key for s in kept] == [("002-002", "qa_X")] and kept[0].audio_path == b.audio_path
    assert len(problems) == 1


# ------------------------------------------------------------------------------------------------- dataset
def test_dataset_subsamples_resizes_and_overrides_max_frames(tmp_path: Path) -> None:
    world = World(tmp_path, [_record(n_frames=8)], size=(200, 100))
    media = world.media(frame_size=56, max_frames=6)
    samples, _ = load_samples(world.data, media)
    item = SurgicalVQADataset(samples, media)[0]
    assert item["sample"] is samples[0] and item["audio"] is None
    assert len(item["frames"]) == 6
    assert all(f.shape == (28, 56, 3) and f.dtype == np.uint8 for f in item["frames"])
    # frames 0,1,3,4,6,7 were written with red channel 40*j
    reds = [int(round(f[..., 0].mean())) for f in item["frames"]]
    assert reds == pytest.approx([0, 40, 120, 160, 240, 280 % 256], abs=4)
    assert len(SurgicalVQADataset(samples, media, max_frames=2)[0]["frames"]) == 2
    assert len(SurgicalVQADataset(samples, world.media(frame_size=56))[0]["frames"]) == 8


FILL = (123, 117, 104)


@pytest.mark.parametrize("ablate", ["video", "audio", "both"])
def test_dataset_ablation(tmp_path: Path, ablate: str) -> None:
    world = World(tmp_path, [_record(n_frames=3)])
    normal = world.media(question_modality="text+audio", frame_size=56)
    ablated = world.media(question_modality="text+audio", frame_size=56, ablate=ablate)
    samples, _ = load_samples(world.data, normal)
    ref = SurgicalVQADataset(samples, normal)[0]
    item = SurgicalVQADataset(samples, ablated, video_fill=FILL)[0]
    assert [f.shape for f in item["frames"]] == [f.shape for f in ref["frames"]]
    assert item["audio"].shape == ref["audio"].shape and ref["audio"].any()
    if ablate in ("video", "both"):
        for frame in item["frames"]:  # the given constant, not the clip's own colour
            np.testing.assert_array_equal(frame, np.broadcast_to(np.array(FILL, np.uint8), frame.shape))
    else:
        for got, orig in zip(item["frames"], ref["frames"], strict=True):
            np.testing.assert_array_equal(got, orig)
    if ablate in ("audio", "both"):
        assert not item["audio"].any()
    else:
        np.testing.assert_array_equal(item["audio"], ref["audio"])
    if ablate != "audio":
        with pytest.raises(ValueError, match="needs video_fill"):
            SurgicalVQADataset(samples, ablated)


@pytest.mark.parametrize("ablate", ["video_shuffle", "audio_shuffle"])
def test_dataset_shuffle_ablation_serves_the_donors_media(tmp_path: Path, ablate: str) -> None:
    # distinct frame counts and audio lengths, so whose media a sample got is visible
    records = [_record("002-001", "qa_1", n_frames=2), _record("002-001", "qa_2", n_frames=3),
               _record("002-002", "qa_1", n_frames=4)]
    world = World(tmp_path, records)
    normal = world.media(question_modality="text+audio", frame_size=56)
    samples, _ = load_samples(world.data, normal)
    donors = ablation_donors(samples, seed=0)
    assert all(donors[s.key].key != s.key for s in samples)
    assert ablation_donors(samples, seed=0) == donors
    ref = SurgicalVQADataset(samples, normal)
    shuffled = SurgicalVQADataset(samples, world.media(question_modality="text+audio", frame_size=56,
                                                       ablate=ablate), donors=donors)
    index = {s.key: i for i, s in enumerate(samples)}
    for i, sample in enumerate(samples):
        got, own, donor = shuffled[i], ref[i], ref[index[donors[sample.key].key]]
        assert got["sample"] is sample
        moved, kept = ("frames", "audio") if ablate == "video_shuffle" else ("audio", "frames")
        assert len(got[moved]) == len(donor[moved]) != len(own[moved])
        for a, b in zip(got[moved], donor[moved], strict=True):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(got[kept], own[kept], strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="needs donors"):
        SurgicalVQADataset(samples, shuffled.media)
    with pytest.raises(ValueError, match="no donor for 1 sample"):
        SurgicalVQADataset(samples, shuffled.media, donors={k: v for k, v in list(donors.items())[1:]})
    with pytest.raises(ValueError, match="at least 2 samples"):
        ablation_donors(samples[:1], seed=0)


def test_dataset_unreadable_frame_raises_with_key_and_path(tmp_path: Path) -> None:
    world = World(tmp_path, [_record(n_frames=2)])
    media = world.media(frame_size=56)
    samples, _ = load_samples(world.data, media)
    gone = samples[0].frame_paths[1]
    gone.unlink()
    with pytest.raises(MediaError) as info:
        SurgicalVQADataset(samples, media)[0]
    msg = str(info.value)
    assert "video_id='002-001', id='qa_000001'" in msg and str(gone) in msg and "data.jsonl:1" in msg


def test_video_field_sample(tmp_path: Path) -> None:
    import av

    world = World(tmp_path, [_record(frames=None, video="clips/c1.mp4")])
    clip = world.frames / "clips" / "c1.mp4"
    clip.parent.mkdir()
    with av.open(str(clip), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(12):
            img = np.full((48, 64, 3), 20 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    media = world.media(frame_size=56, num_video_frames=4)
    samples, problems = load_samples(world.data, media)
    assert problems == [] and samples[0].video_path == clip.resolve() and samples[0].frame_paths == ()
    frames = SurgicalVQADataset(samples, media)[0]["frames"]
    assert len(frames) == 4 and frames[0].shape == (56, 56, 3)
    assert len(SurgicalVQADataset(samples, media, max_frames=2)[0]["frames"]) == 2
    assert summarize_samples(samples)["video_files"] == 1
    clip.write_bytes(b"junk")
    assert "c1.mp4" in _one(world, frame_size=56)


# ---------------------------------------------------------------------------------------------------- q|a
def test_load_qa_text(tmp_path: Path) -> None:
    qa = tmp_path / "seq_5" / "vqa" / "Classification" / "frame012_QA.txt"
    qa.parent.mkdir(parents=True)
    qa.write_text(
        "What organ is being operated?|kidney\n\nWhat is the state of bipolar_forceps?|Idle\nbroken\n"
    )
    frames = tmp_path
    Image.new("RGB", (64, 48)).save(
        (tmp_path / "seq_5" / "left_frames").mkdir() or tmp_path / "seq_5" / "left_frames" / "frame012.png"
    )
    media = MediaConfig(frames_dir=str(frames), frame_path_template="{video_id}/left_frames/{frame}.png")
    samples, problems = load_qa_text([qa], media, skip_bad=True)
    assert [(s.key, s.answer) for s in samples] == [
        (("seq_5", "frame012_QA_1"), "kidney"),
        (("seq_5", "frame012_QA_3"), "Idle"),
    ]
    assert samples[1].question == "What is the state of bipolar_forceps?"
    assert len(problems) == 1 and f"{qa}:4" in str(problems[0]) and "question|answer" in str(problems[0])


# ---------------------------------------------------------------------------------------------------- CLI
def test_summary_counts_audio(tmp_path: Path) -> None:
    world = World(tmp_path, [_record(qid="qa_1"), _record("002-002", "qa_1", question_type="nbi_status")])
    samples, _ = load_samples(world.data, world.media(question_modality="audio"))
    summary = summarize_samples(samples)
    assert summary["question_types"] == {"mucosa_visibility": 1, "nbi_status": 1}
    assert summary["videos"] == {"002-001": 1, "002-002": 1}
    assert summary["audio"]["n"] == 2 and summary["audio"]["seconds_total"] == pytest.approx(0.55, abs=1e-3)


def test_check_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = World(tmp_path / "good", [_record(qid="qa_1"), _record(qid="qa_2")])
    args = ["check", "--data_path", str(good.data), "--frames_dir", str(good.frames)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert '"n": 2' in out and "OK: 2 sample(s)" in out
    assert main(args + ["--audio_dir", str(good.audio), "--question_modality", "text+audio"]) == 0
    assert '"seconds_total"' in capsys.readouterr().out

    bad = World(tmp_path / "bad", [_record(qid="qa_1"), _record(qid="qa_2", answer=" ")])
    (bad.frames / "002-001" / "002-001_100.jpg").unlink()
    assert main(["check", "--data_path", str(bad.data), "--frames_dir", str(bad.frames)]) == 1
    out = capsys.readouterr().out
    assert f"{bad.data}:1" in out and "002-001_100.jpg" in out and "missing" in out
    assert f"{bad.data}:2" in out and "'answer' is empty" in out
    assert "2 problem(s)" in out and "--skip_bad_samples" in out
    # a wrong call, not a data problem: exit 2 and one line naming the flag
    assert main(["check", "--data_path", str(tmp_path / "none.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --data_path") and "does not exist" in err and len(err.splitlines()) == 1
    assert main(["check", "--data_path", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["check", "--data_path", str(good.data), "--frames_dir", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("error: --frames_dir")
    assert main(["check", "--data_path", str(good.data), "--question_modality", "audio"]) == 2
    assert capsys.readouterr().err.startswith("error: question_modality 'audio' needs spoken-question audio")
    with pytest.raises(SystemExit) as info:
        main(["check", "--data_path", str(good.data), "--question_modality", "video"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --question_modality") and len(err.splitlines()) == 1


def test_check_cli_as_module(tmp_path: Path) -> None:
    world = World(tmp_path, [_record(), _record(qid="qa_2", frames=["../../x"])])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "surgvqa.data",
            "check",
            "--data_path",
            str(world.data),
            "--frames_dir",
            str(world.frames),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert f"{world.data}:2" in proc.stdout and "outside root" in proc.stdout
