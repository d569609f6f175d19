"""Audio: strict decoding of the spoken questions (mono float32 at the feature extractor's rate), a cheap duration
probe, the check for WAVs cut short, and silence for the audio ablation.

A leaf below the data layer: of ``surgvqa`` it imports only :class:`~surgvqa.media.MediaError`. Every failure to
read a file raises it naming the path; nothing here substitutes data silently (``silence_like`` exists for the
explicit audio ablation only). soundfile, torch and torchaudio are imported inside the functions that need them.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from surgvqa.media import MediaError

#: Whisper's (and Qwen2.5-Omni's) feature extractor rate
DEFAULT_SAMPLING_RATE = 16000


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


def _check_audio_file(p: Path) -> None:
    """A missing path, a directory, or a RIFF WAV whose header disagrees with its length raises MediaError."""
    if p.is_dir():
        raise MediaError(f"{p} is a directory where an audio file is expected; point the path at the file")
    if not p.is_file():
        raise MediaError(f"audio file not found: {p}")
    problem = wav_length_problem(p)
    if problem:
        raise MediaError(f"damaged WAV {p}: {problem}; re-generate it (scripts/make_spoken_questions.py)")


def wav_length_problem(path: Path | str) -> str | None:
    """Why a RIFF/WAVE file's header disagrees with its size (``None`` when it agrees or is not RIFF WAVE).

    libsndfile reads a WAV cut in half without complaint (it plays the half that is there); the ``data`` chunk's
    declared length says how much audio there should be.
    """
    with open(path, "rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
            return None
        order = "<" if head[:4] == b"RIFF" else ">"
        size = os.fstat(fh.fileno()).st_size
        pos = 12
        while pos + 8 <= size:
            fh.seek(pos)
            chunk_id, length = struct.unpack(order + "4sI", fh.read(8))
            if chunk_id == b"data":
                available = size - pos - 8
                if length != available and (length > available or length in (0, 0xFFFFFFFF)):
                    return (
                        f"the header declares {length} bytes of audio data but the file holds {available} "
                        "(the file was cut short, or written by a stream that never filled in the length)"
                    )
                return None
            pos += 8 + length + (length & 1)
        return f"no 'data' chunk in {size} bytes (the file was cut short before its audio)"


def load_audio(path: Path | str, sampling_rate: int = DEFAULT_SAMPLING_RATE) -> np.ndarray:
    """Decode audio as float32 mono at ``sampling_rate``: soundfile (wav/flac/ogg/mp3), torchaudio as fallback.

    Channels are mixed to mono by their mean; resampling uses ``torchaudio.functional.resample``. A missing,
    corrupt or zero-length file, and a WAV whose header length disagrees with its data (:func:`wav_length_problem`),
    raise :class:`MediaError` naming the path.
    """
    p = Path(path)
    _check_audio_file(p)
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

    Missing, corrupt or zero-length files, and WAVs whose header disagrees with their length, raise
    :class:`MediaError`.
    """
    import soundfile as sf

    p = Path(path)
    _check_audio_file(p)
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
