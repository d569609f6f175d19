"""Tests for surgvqa.media: containment, resizing, frame/video/audio decoding, subsampling, ablation helpers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from surgvqa.media import (
    MediaError,
    audio_duration,
    constant_frames_like,
    derangement,
    fit_to_budget,
    load_audio,
    load_frame,
    load_video_frames,
    resolve_under,
    silence_like,
    subsample_indices,
    verify_image,
    verify_video,
)


def _jpeg(path: Path, size: tuple[int, int] = (8, 8), colour: tuple[int, int, int] = (200, 40, 90)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=95)
    return path


def _write_video(path: Path, colours: list[tuple[int, int, int]], size: tuple[int, int] = (112, 56)) -> Path:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for colour in colours:
            img = np.empty((size[1], size[0], 3), dtype=np.uint8)
            img[:] = colour
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# ------------------------------------------------------------------------------------------ subsample_indices
def test_subsample_indices_reference_example() -> None:
    assert subsample_indices(8, 6) == [0, 1, 3, 4, 6, 7]
    assert subsample_indices(8, 2) == [0, 7]
    assert subsample_indices(16, 4) == [0, 5, 10, 15]


@pytest.mark.parametrize("n", [2, 3, 5, 8, 9, 16, 31, 100])
def test_subsample_indices_keeps_ends_order_and_matches_linspace(n: int) -> None:
    for k in range(2, n):
        idx = subsample_indices(n, k)
        assert len(idx) == k
        assert idx[0] == 0 and idx[-1] == n - 1
        assert idx == sorted(set(idx)), (n, k, idx)
        expected = [int(np.floor(x + 0.5 + 1e-9)) for x in np.linspace(0, n - 1, k)]
        assert idx == expected


def test_subsample_indices_edge_cases() -> None:
    assert subsample_indices(5, None) == [0, 1, 2, 3, 4]
    assert subsample_indices(5, 5) == [0, 1, 2, 3, 4]
    assert subsample_indices(5, 9) == [0, 1, 2, 3, 4]
    assert subsample_indices(5, 1) == [0]
    assert subsample_indices(1, 1) == [0]
    assert subsample_indices(0, 3) == []
    with pytest.raises(ValueError, match=">= 1"):
        subsample_indices(5, 0)
    with pytest.raises(ValueError):
        subsample_indices(5, -2)


# ------------------------------------------------------------------------------------------------ fit_to_budget
@pytest.mark.parametrize(
    ("size", "frame_size", "expected"),
    [
        ((1352, 1080), 384, (364, 280)),  # 384 is not a multiple of 28: cap 364
        ((1080, 1352), 384, (280, 364)),
        ((1920, 1080), 448, (448, 252)),
        ((448, 448), 448, (448, 448)),
        ((100, 50), 384, (112, 56)),  # never enlarged beyond rounding half-up
        ((10, 10), 384, (28, 28)),  # at least one multiple
        ((112, 56), 56, (56, 28)),
    ],
)
def test_fit_to_budget_examples(size: tuple[int, int], frame_size: int, expected: tuple[int, int]) -> None:
    w, h = fit_to_budget(*size, frame_size)
    assert (w, h) == expected
    assert w % 28 == 0 and h % 28 == 0
    assert max(w, h) <= frame_size


def test_fit_to_budget_other_multiple_and_errors() -> None:
    assert fit_to_budget(640, 480, 320, multiple=32) == (320, 256)
    with pytest.raises(ValueError, match="smaller than the pixel multiple"):
        fit_to_budget(100, 100, 20)
    with pytest.raises(ValueError, match="positive"):
        fit_to_budget(0, 100, 384)


# ---------------------------------------------------------------------------------------------- resolve_under
def test_resolve_under_accepts_inside_paths(tmp_path: Path) -> None:
    root = tmp_path / "root"
    target = _jpeg(root / "v" / "f.jpg")
    assert resolve_under(root, "v/f.jpg") == target.resolve()
    assert resolve_under(root, "v/../v/f.jpg") == target.resolve()
    (root / "alias.jpg").symlink_to(target)  # a symlink inside the root pointing inside the root is fine
    assert resolve_under(root, "alias.jpg") == target.resolve()
    assert resolve_under(root, "v/missing.jpg") == (root / "v" / "missing.jpg").resolve()  # need not exist


@pytest.mark.parametrize("use_cache", [False, True])
def test_resolve_under_rejects_escapes(tmp_path: Path, use_cache: bool) -> None:
    root = tmp_path / "root"
    root.mkdir()
    outside = _jpeg(tmp_path / "outside.jpg")
    (root / "link.jpg").symlink_to(outside)
    (root / "linkdir").symlink_to(tmp_path)
    cache: dict | None = {} if use_cache else None
    for rel in ["../outside.jpg", "a/../../outside.jpg", str(outside), "link.jpg", "linkdir/outside.jpg"]:
        with pytest.raises(MediaError) as info:
            resolve_under(root, rel, dir_cache=cache)
        message = str(info.value)
        assert rel in message and str(root) in message, message
        assert "relative to the root" in message  # the fix
    with pytest.raises(MediaError, match="absolute"):
        resolve_under(root, "/etc/passwd", dir_cache=cache)


# ------------------------------------------------------------------------------------------------------ frames
def test_load_frame_resizes_and_keeps_colour(tmp_path: Path) -> None:
    path = _jpeg(tmp_path / "f.jpg", size=(200, 100), colour=(200, 40, 90))
    frame = load_frame(path, 56)
    assert frame.dtype == np.uint8 and frame.shape == (28, 56, 3)
    assert np.abs(frame.reshape(-1, 3).mean(0) - np.array([200, 40, 90])).max() < 6
    png = tmp_path / "g.png"
    Image.new("L", (30, 30), 77).save(png)  # greyscale -> RGB
    assert load_frame(png, 384).shape == (28, 28, 3)


def test_load_frame_errors_name_the_path(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"definitely not a jpeg")
    with pytest.raises(MediaError, match="corrupt.jpg"):
        load_frame(bad, 56)
    with pytest.raises(MediaError, match="missing.jpg"):
        load_frame(tmp_path / "missing.jpg", 56)


def test_verify_image_detects_truncation(tmp_path: Path) -> None:
    good = _jpeg(tmp_path / "good.jpg", size=(64, 48))
    assert verify_image(good) == (64, 48)
    data = good.read_bytes()
    truncated = tmp_path / "trunc.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="trunc.jpg"):
        verify_image(truncated)


# ------------------------------------------------------------------------------------------------------- video
COLOURS = [(16 * i, 255 - 16 * i, (64 + 32 * i) % 256) for i in range(16)]


def test_load_video_frames_samples_evenly(tmp_path: Path) -> None:
    path = _write_video(tmp_path / "clip.mp4", COLOURS)
    verify_video(path)
    frames = load_video_frames(path, 4, 56)
    assert len(frames) == 4
    for frame, i in zip(frames, subsample_indices(16, 4), strict=True):
        assert frame.dtype == np.uint8 and frame.shape == (28, 56, 3)
        mean = frame.reshape(-1, 3).mean(0)
        assert np.abs(mean - np.array(COLOURS[i])).max() < 20, (i, mean)
    assert len(load_video_frames(path, None, 56)) == 16
    assert len(load_video_frames(path, 32, 56)) == 16


def test_load_video_frames_corrupt(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(os.urandom(2048))
    with pytest.raises(MediaError, match="bad.mp4"):
        load_video_frames(bad, 4, 56)
    with pytest.raises(MediaError, match="bad.mp4"):
        verify_video(bad)


# ------------------------------------------------------------------------------------------------------- audio
def test_load_audio_resamples_and_mixes_to_mono(tmp_path: Path) -> None:
    rate = 22050
    t = np.arange(rate // 2) / rate
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    right = np.full_like(left, 0.1)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), rate, subtype="FLOAT")
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) == 8000  # 0.5 s at 16 kHz
    assert abs(float(audio.mean()) - 0.05) < 0.01  # mean of (sine, 0.1)
    assert 0.2 < float(np.abs(audio).max()) < 0.4  # 0.25 * sine + 0.05
    assert audio_duration(path) == pytest.approx(0.5)


def test_load_audio_keeps_16k_mono_and_reads_flac(tmp_path: Path) -> None:
    signal = (0.3 * np.sin(np.linspace(0, 60, 16000))).astype(np.float32)
    path = tmp_path / "a.flac"
    sf.write(path, signal, 16000)
    audio = load_audio(path)
    assert audio.shape == (16000,)
    np.testing.assert_allclose(audio, signal, atol=1e-3)


def test_load_audio_mp3_if_supported(tmp_path: Path) -> None:
    if "MP3" not in sf.available_formats():
        pytest.skip("libsndfile without MP3")
    path = tmp_path / "a.mp3"
    sf.write(path, (0.3 * np.sin(np.linspace(0, 600, 22050))).astype(np.float32), 22050, format="MP3")
    audio = load_audio(path)
    assert audio.dtype == np.float32 and abs(len(audio) - 16000) < 1200


def test_load_audio_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(MediaError, match="zero-length"):
        load_audio(empty)
    with pytest.raises(MediaError, match="zero-length"):
        audio_duration(empty)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF....WAVEjunk" + os.urandom(64))
    with pytest.raises(MediaError, match="corrupt.wav"):
        load_audio(corrupt)
    with pytest.raises(MediaError, match="corrupt.wav"):
        audio_duration(corrupt)
    with pytest.raises(MediaError, match="nope.wav"):
        load_audio(tmp_path / "nope.wav")


# ---------------------------------------------------------------------------------------------------- ablation
def test_constant_frames_like_ignores_the_clip() -> None:
    rng = np.random.default_rng(0)
    nbi = [np.full((28, 56, 3), (20, 160, 150), np.uint8), rng.integers(0, 256, (28, 56, 3), dtype=np.uint8)]
    white = [np.full((28, 56, 3), (200, 90, 90), np.uint8)] * 2
    a, b = constant_frames_like(nbi, (123, 117, 104)), constant_frames_like(white, (123, 117, 104))
    assert [f.shape for f in a] == [f.shape for f in nbi] and all(f.dtype == np.uint8 for f in a)
    # every frame of every clip is the same array: no tint, no per-frame mean survives
    for frame in a + b:
        np.testing.assert_array_equal(frame, np.full((28, 56, 3), (123, 117, 104), np.uint8))
    with pytest.raises(ValueError, match="3 values"):
        constant_frames_like(nbi, (1, 2))
    with pytest.raises(ValueError, match="0-255"):
        constant_frames_like(nbi, (1, 2, 300))


def test_derangement_prefers_another_group_and_is_seeded() -> None:
    groups = ["v1"] * 5 + ["v2"] * 4 + ["v3"] * 3
    p = derangement(groups, seed=0)
    assert sorted(p) == list(range(12))  # a permutation
    assert all(p[i] != i for i in range(12))
    assert all(groups[p[i]] != groups[i] for i in range(12))  # largest group <= half: every donor elsewhere
    assert derangement(groups, seed=0) == p
    assert derangement(groups, seed=1) != p
    # a dominant group: as many cross-group donors as possible (n - m for the m-item group), none is itself
    big = ["a"] * 7 + ["b"] * 3
    q = derangement(big, seed=0)
    assert sorted(q) == list(range(10)) and all(q[i] != i for i in range(10))
    assert sum(big[q[i]] != big[i] for i in range(10)) == 6  # 3 "b" get an "a", 3 "a" get a "b"
    # one group: still a derangement
    r = derangement(["only"] * 6, seed=3)
    assert sorted(r) == list(range(6)) and all(r[i] != i for i in range(6))
    with pytest.raises(ValueError, match="at least 2 samples"):
        derangement(["x"], seed=0)


def test_silence_like() -> None:
    rng = np.random.default_rng(0)
    audio = rng.standard_normal(1234).astype(np.float32)
    silent = silence_like(audio)
    assert silent is not None and silent.shape == audio.shape and silent.dtype == np.float32
    assert not silent.any()
    assert silence_like(None) is None
