"""Hostile media: damaged files and unsafe names each fail `surgvqa.data check` with file:line and (video_id, id),
and the training loader refuses the same files (the checker and the loader share one decoder)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from surgvqa.data import DataError, MediaConfig, MediaError, SurgicalVQADataset, load_samples, main
from surgvqa.media import decode_image, load_audio


def _jpeg(seed: int = 0, size: tuple[int, int] = (320, 240)) -> bytes:
    from PIL import Image

    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    pixels = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1) + rng.integers(0, 60, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _scan(data: bytes) -> tuple[int, int]:
    """(first, end) byte offsets of the entropy-coded scan (between the SOS header and the EOI marker)."""
    sos = data.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big"), len(data) - 2


def mid_cut(data: bytes) -> bytes:
    """The middle third of the scan removed; the file still ends with its end-of-image marker."""
    first, end = _scan(data)
    third = (end - first) // 3
    return data[:first + third] + data[first + 2 * third:]


def bit_flipped(data: bytes, flips: int = 32, seed: int = 0) -> bytes:
    """``flips`` single-bit errors in the second half of the scan (never creating or touching a 0xFF marker byte)."""
    first, end = _scan(data)
    rng = np.random.default_rng(seed)
    out = bytearray(data)
    for pos in rng.integers(first + (end - first) // 2, end, flips):
        bit = 1 << int(rng.integers(0, 8))
        if 0xFF in (out[pos], out[pos - 1], out[pos] ^ bit):
            continue
        out[pos] ^= bit
    return bytes(out)


@pytest.fixture()
def hostile(tmp_path: Path) -> dict:
    frames, audio = tmp_path / "frames" / "v1", tmp_path / "audio" / "v1"
    frames.mkdir(parents=True)
    audio.mkdir(parents=True)
    good = _jpeg()
    for i in range(3):
        (frames / f"good{i}.jpg").write_bytes(_jpeg(seed=i))
    (frames / "midcut.jpg").write_bytes(mid_cut(good))
    (frames / "flipped.jpg").write_bytes(bit_flipped(good))
    (frames / "dirframe.jpg").mkdir()  # a directory where a frame is expected
    tone = (0.1 * np.sin(np.arange(16000) / 16000 * 2 * np.pi * 440)).astype(np.float32)
    for qid in ("q1", "q2", "q3", "q5"):
        sf.write(audio / f"{qid}.wav", tone, 16000)
    whole = io.BytesIO()
    sf.write(whole, tone, 16000, format="WAV")
    (audio / "q4.wav").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])  # the half WAV
    (audio / "q9.wav").mkdir()  # a directory where an audio file is expected
    sf.write(audio / "q6.wav", tone, 16000)
    goods = ["good0", "good1", "good2"]
    lines = [
        ("v1", "q1", goods),                              # 1 good
        ("v1", "q2", ["good0", "midcut", "good2"]),       # 2 mid-cut JPEG
        ("v1", "q3", ["good0", "flipped"]),               # 3 bit-flipped scan
        ("v1", "q4", goods),                              # 4 half WAV
        ("v1", "q5", ["good0", "dirframe"]),              # 5 directory as a frame
        ("v1", "sub/q6", goods),                          # 6 id with '/'
        ("..", "q7", goods),                              # 7 video_id '..'
        ("v1", "../q8", goods),                           # 8 id with '..' and '/'
        ("v1", "q9", goods),                              # 9 directory as the audio file
        ("v1", "-q10", goods),                            # 10 leading '-'
    ]
    data = tmp_path / "hostile.jsonl"
    data.write_text("".join(
        json.dumps({"id": q, "video_id": v, "frames": f, "question": "Is it?", "answer": "yes"}) + "\n"
        for v, q, f in lines
    ))
    return {"root": tmp_path, "data": data, "frames": tmp_path / "frames", "audio": tmp_path / "audio",
            "good": good}


def test_damaged_jpegs_decode_partly_grey_in_pil_but_fail_here(hostile):
    """The premise: PIL hands back the mid-cut frame with no error; the strict decoder refuses it."""
    from PIL import Image

    frames = hostile["frames"] / "v1"
    with Image.open(frames / "midcut.jpg") as img:
        img.load()  # no error: the damaged part comes back grey
    pristine = np.asarray(Image.open(io.BytesIO(hostile["good"])).convert("RGB"))
    assert np.array_equal(decode_image(frames / "good0.jpg"), np.asarray(Image.open(frames / "good0.jpg").convert("RGB")))
    for name in ("midcut", "flipped"):
        with Image.open(frames / f"{name}.jpg") as img:
            lax = np.asarray(img.convert("RGB")).astype(int)
        assert (np.abs(lax - pristine).max(-1) > 16).mean() > 0.01, f"{name}: the damage is visible"
        with pytest.raises(MediaError, match=f"damaged JPEG .*{name}.jpg"):
            decode_image(frames / f"{name}.jpg")
    with pytest.raises(MediaError, match="header declares 32000 bytes of audio data but the file holds"):
        load_audio(hostile["audio"] / "v1" / "q4.wav")
    assert sf.info(str(hostile["audio"] / "v1" / "q4.wav")).frames > 0  # libsndfile alone would read the half


def test_check_names_every_hostile_file_by_line_and_key(hostile, capsys):
    code = main(["check", "--data_path", str(hostile["data"]), "--frames_dir", str(hostile["frames"]),
                 "--audio_dir", str(hostile["audio"])])
    out = capsys.readouterr().out
    assert code == 1
    problems = [line for line in out.splitlines() if line.startswith("PROBLEM")]
    data = hostile["data"]

    def problem(line: int, key: tuple[str, str], *words: str) -> None:
        where = f"{data}:{line} (video_id={key[0]!r}, id={key[1]!r})"
        hits = [p for p in problems if where in p and all(w in p for w in words)]
        assert hits, f"no problem at {where} with {words}:\n" + "\n".join(problems)

    problem(2, ("v1", "q2"), "damaged JPEG", "midcut.jpg", "premature end of data segment")
    problem(3, ("v1", "q3"), "damaged JPEG", "flipped.jpg")
    problem(4, ("v1", "q4"), "damaged WAV", "q4.wav", "declares")
    problem(5, ("v1", "q5"), "dirframe.jpg is a directory where a file is expected")
    problem(6, ("v1", "sub/q6"), "field 'id'", "path separator")
    problem(7, ("..", "q7"), "field 'video_id'", "'..'")
    problem(8, ("v1", "../q8"), "field 'id'", "path separator")
    problem(9, ("v1", "q9"), "q9.wav is a directory where a file is expected")
    problem(10, ("v1", "-q10"), "field 'id'", "starts with '-'")
    assert not any(f"{data}:1 " in p for p in problems)
    assert "1 good sample(s)" in out
    assert "audio file decoded" in out or "every frame, video and audio file decoded" in out


def test_check_says_when_audio_was_not_checked(hostile, capsys):
    main(["check", "--data_path", str(hostile["data"]), "--frames_dir", str(hostile["frames"])])
    out = capsys.readouterr().out
    assert "audio NOT checked (no --audio_dir given)" in out
    assert "q4.wav" not in out


def test_directory_as_data_path(hostile, capsys):
    code = main(["check", "--data_path", str(hostile["root"]), "--frames_dir", str(hostile["frames"])])
    assert code == 2  # a bad invocation: one error line naming the path
    assert f"error: --data_path {hostile['root']} is a directory; pass a file" in capsys.readouterr().err
    with pytest.raises(DataError, match=f"data path {hostile['root']} is a directory, not a JSONL file"):
        load_samples(hostile["root"], MediaConfig(frames_dir=str(hostile["frames"])))


def test_loader_refuses_what_the_header_check_lets_through(hostile):
    """Training's quick up-front check reads headers only; the loader decodes strictly and names the sample."""
    media = MediaConfig(frames_dir=str(hostile["frames"]), frame_size=56)
    samples, problems = load_samples(hostile["data"], media, skip_bad=True)
    keys = {s.key for s in samples}
    assert {("v1", "q2"), ("v1", "q3")} <= keys  # header-level: JPEG headers and end markers look fine
    dataset = SurgicalVQADataset(samples, media)
    by_key = {s.key: i for i, s in enumerate(samples)}
    assert len(dataset[by_key[("v1", "q1")]]["frames"]) == 3
    for qid, name in (("q2", "midcut"), ("q3", "flipped")):
        with pytest.raises(MediaError, match=rf"\(video_id='v1', id='{qid}'\).*damaged JPEG .*{name}\.jpg"):
            dataset[by_key[("v1", qid)]]
