"""Speak every JSONL question with espeak-ng and write one 16 kHz mono WAV per (video_id, id).

    python scripts/make_spoken_questions.py --data_path F.jsonl --audio_dir D [--voice en-us] [--rate 160]

Files land at ``D/{video_id}/{id}.wav`` (``--audio_path_template``). ``D/manifest.jsonl`` records which key
and which text each file speaks, so a rerun skips files that already hold the same question and refuses
(unless ``--overwrite``) to replace the audio of a different question. The same text counts as up to date
whatever --voice/--rate made it (pass --overwrite to re-voice). Identical texts are synthesized once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

TARGET_SR = 16_000
MANIFEST_NAME = "manifest.jsonl"
DEFAULT_TEMPLATE = "{video_id}/{id}.wav"
DEFAULT_VOICE = "en-us"
DEFAULT_RATE = 160
SILENCE_THRESHOLD = 1e-3  # absolute amplitude below which leading/trailing samples count as silence
SILENCE_PAD_S = 0.08  # silence kept on each side after trimming
PEAK = 0.9  # peak level after normalization


class SpokenQuestionError(RuntimeError):
    """Raised for bad input lines, unsafe paths, audio collisions and TTS failures."""


@dataclass(frozen=True)
class Job:
    """One question to speak: where it came from, its key, its text and its path under the audio dir."""

    where: str
    video_id: str
    qid: str
    text: str
    rel_path: str


def find_espeak() -> str:
    """Return the espeak-ng executable or raise a clear, actionable error."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SpokenQuestionError(
            "espeak-ng is not installed (offline TTS used for spoken questions). "
            "Install it with: apt-get update && apt-get install -y espeak-ng"
        )
    return exe


def _safe_component(value: object, field: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpokenQuestionError(f"{where}: field {field!r} must be a non-empty string, got {value!r}")
    if "/" in value or "\\" in value or value in (".", "..") or "\x00" in value:
        raise SpokenQuestionError(f"{where}: field {field!r}={value!r} cannot be used in a file path")
    return value


def audio_rel_path(template: str, video_id: str, qid: str, where: str) -> str:
    """Format the path template for one key and check it stays inside the audio dir."""
    try:
        rel = template.format(video_id=video_id, id=qid)
    except (KeyError, IndexError, ValueError) as exc:
        raise SpokenQuestionError(
            f"--audio_path_template {template!r} is invalid ({exc!r}); "
            "only {video_id} and {id} are allowed"
        ) from exc
    parts = Path(rel).parts
    if Path(rel).is_absolute() or ".." in parts or not rel.endswith(".wav"):
        raise SpokenQuestionError(
            f"{where}: audio path {rel!r} must be a relative '.wav' path inside the audio dir (no '..')"
        )
    return Path(rel).as_posix()


def read_jobs(data_path: Path, template: str) -> list[Job]:
    """Parse the JSONL into jobs; errors name file:line. Same key + same text twice is kept once."""
    jobs: dict[tuple[str, str], Job] = {}
    by_path: dict[str, Job] = {}
    with open(data_path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            where = f"{data_path}:{lineno}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SpokenQuestionError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
            if not isinstance(row, dict):
                raise SpokenQuestionError(f"{where}: expected a JSON object, got {type(row).__name__}")
            video_id = _safe_component(row.get("video_id"), "video_id", where)
            qid = _safe_component(row.get("id"), "id", where)
            text = row.get("question")
            if not isinstance(text, str) or not text.strip():
                raise SpokenQuestionError(
                    f"{where}: field 'question' must be a non-empty string, got {text!r}"
                )
            text = " ".join(text.split())
            job = Job(where, video_id, qid, text, audio_rel_path(template, video_id, qid, where))
            key = (video_id, qid)
            prev = jobs.get(key)
            if prev is not None:
                if prev.text != text:
                    raise SpokenQuestionError(
                        f"{where}: (video_id={video_id!r}, id={qid!r}) was already used at {prev.where} "
                        f"with a different question: {prev.text!r} vs {text!r}. "
                        "Each (video_id, id) must be unique."
                    )
                continue
            clash = by_path.get(job.rel_path)
            if clash is not None:
                raise SpokenQuestionError(
                    f"{where}: (video_id={video_id!r}, id={qid!r}) and ({clash.video_id!r}, {clash.qid!r}) "
                    f"at {clash.where} map to the same audio file {job.rel_path!r}; "
                    "the --audio_path_template "
                    f"{template!r} must contain both {{video_id}} and {{id}}"
                )
            jobs[key] = job
            by_path[job.rel_path] = job
    return list(jobs.values())


def load_manifest(audio_dir: Path) -> dict[str, dict]:
    """Read ``manifest.jsonl`` (path -> entry; later lines win)."""
    path = audio_dir / MANIFEST_NAME
    entries: dict[str, dict] = {}
    if not path.exists():
        return entries
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                entries[entry["path"]] = entry
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise SpokenQuestionError(
                    f"{path}:{lineno}: corrupt manifest line ({exc!r}); delete the audio dir and regenerate"
                ) from exc
    return entries


def _write_manifest(audio_dir: Path, entries: dict[str, dict]) -> None:
    tmp = audio_dir / (MANIFEST_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for rel in sorted(entries):
            fh.write(json.dumps(entries[rel], ensure_ascii=False, sort_keys=True) + "\n")
    os.replace(tmp, audio_dir / MANIFEST_NAME)


def synthesize(text: str, voice: str, rate: int, espeak: str) -> np.ndarray:
    """Speak ``text`` with espeak-ng; return float32 mono 16 kHz audio, silence-trimmed, peak-normalized."""
    with tempfile.TemporaryDirectory(prefix="surgvqa_tts_") as tmp:
        out = Path(tmp) / "q.wav"
        proc = subprocess.run(
            [espeak, "-v", voice, "-s", str(rate), "-w", str(out), "--stdin"],
            input=text,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0 or not out.exists():
            raise SpokenQuestionError(
                f"espeak-ng failed (exit {proc.returncode}) for voice={voice!r} rate={rate} text={text!r}: "
                f"{proc.stderr.strip() or proc.stdout.strip()} (list voices with: espeak-ng --voices)"
            )
        data, sr = sf.read(out, dtype="float32", always_2d=True)
    import torch  # heavy: imported only when something has to be spoken
    import torchaudio.functional as taf

    wave = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))
    if sr != TARGET_SR:
        wave = taf.resample(wave, orig_freq=sr, new_freq=TARGET_SR)
    audio = wave.numpy().astype(np.float32)
    loud = np.flatnonzero(np.abs(audio) > SILENCE_THRESHOLD)
    if loud.size == 0:
        raise SpokenQuestionError(f"espeak-ng produced silence for text={text!r} (voice={voice!r})")
    pad = int(SILENCE_PAD_S * TARGET_SR)
    audio = audio[max(0, loud[0] - pad) : loud[-1] + 1 + pad]
    return (audio * (PEAK / float(np.abs(audio).max()))).astype(np.float32)


def _collision_message(job: Job, target: Path, manifest: Path, entry: dict | None) -> str:
    if entry is None:
        return (
            f"{job.where}: audio for (video_id={job.video_id!r}, id={job.qid!r}) already exists at {target} "
            f"but is not listed in {manifest}, so the question it speaks is unknown "
            f"(new question: {job.text!r}). "
            f"Use another --audio_dir or pass --overwrite."
        )
    return (
        f"{job.where}: refusing to overwrite {target}: it speaks (video_id={entry.get('video_id')!r}, "
        f"id={entry.get('id')!r}) question {entry.get('text')!r}, but (video_id={job.video_id!r}, "
        f"id={job.qid!r}) asks {job.text!r}. Use another --audio_dir or pass --overwrite."
    )


def speak_questions(
    data_path: str | os.PathLike,
    audio_dir: str | os.PathLike,
    voice: str = DEFAULT_VOICE,
    rate: int = DEFAULT_RATE,
    audio_path_template: str = DEFAULT_TEMPLATE,
    overwrite: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> int:
    """Write one spoken-question WAV per (video_id, id) of ``data_path``; return how many were written."""
    data_path, audio_dir = Path(data_path), Path(audio_dir)
    jobs = read_jobs(data_path, audio_path_template)
    manifest = load_manifest(audio_dir)
    root = audio_dir.resolve()
    todo: list[Job] = []
    conflicts: list[str] = []
    for job in jobs:
        target = audio_dir / job.rel_path
        if not target.resolve().is_relative_to(root):
            raise SpokenQuestionError(f"{job.where}: audio path {target} escapes the audio dir {audio_dir}")
        entry = manifest.get(job.rel_path)
        if target.exists() and not overwrite:
            recorded = (entry.get("video_id"), entry.get("id"), entry.get("text")) if entry else None
            if recorded != (job.video_id, job.qid, job.text):
                conflicts.append(_collision_message(job, target, audio_dir / MANIFEST_NAME, entry))
            continue
        todo.append(job)
    if conflicts:
        more = (
            f" ({len(conflicts) - 1} more line(s) of {data_path} conflict too)" if len(conflicts) > 1 else ""
        )
        raise SpokenQuestionError(conflicts[0] + more)
    if not todo:
        print(
            f"{data_path}: all {len(jobs)} spoken questions already present in {audio_dir}", file=sys.stderr
        )
        return 0

    espeak = find_espeak()
    import torchaudio.functional  # noqa: F401  (import torch once here, not concurrently in the workers)

    texts = sorted({job.text for job in todo})
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        spoken = dict(
            zip(
                texts,
                tqdm(
                    pool.map(lambda t: synthesize(t, voice, rate, espeak), texts),
                    total=len(texts),
                    desc=f"tts {data_path.name}",
                    disable=not progress,
                ),
                strict=True,
            )
        )

    audio_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(audio_dir / MANIFEST_NAME, "a", encoding="utf-8") as log:
        for job in tqdm(todo, desc=f"wav {data_path.name}", disable=not progress):
            target = audio_dir / job.rel_path
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".tmp")
            sf.write(tmp, spoken[job.text], TARGET_SR, subtype="PCM_16", format="WAV")
            os.replace(tmp, target)
            entry = {
                "path": job.rel_path,
                "video_id": job.video_id,
                "id": job.qid,
                "text": job.text,
                "voice": voice,
                "rate": rate,
            }
            log.write(json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n")
            log.flush()
            manifest[job.rel_path] = entry
            written += 1
    _write_manifest(audio_dir, manifest)
    print(
        f"{data_path}: wrote {written} WAVs ({len(texts)} distinct texts), skipped {len(jobs) - written} "
        f"up-to-date, into {audio_dir}",
        file=sys.stderr,
    )
    return written


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data_path", required=True, help="JSONL with video_id, id and question per line")
    parser.add_argument("--audio_dir", required=True, help="output folder for the WAVs and manifest.jsonl")
    parser.add_argument("--voice", default=DEFAULT_VOICE, help="espeak-ng voice (espeak-ng --voices)")
    parser.add_argument("--rate", type=int, default=DEFAULT_RATE, help="speaking rate in words per minute")
    parser.add_argument(
        "--audio_path_template",
        default=DEFAULT_TEMPLATE,
        help="path under --audio_dir; placeholders {video_id} and {id}",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing audio even if it differs")
    parser.add_argument("--workers", type=int, default=None, help="parallel espeak-ng processes")
    args = parser.parse_args(argv)
    try:
        speak_questions(
            args.data_path,
            args.audio_dir,
            voice=args.voice,
            rate=args.rate,
            audio_path_template=args.audio_path_template,
            overwrite=args.overwrite,
            workers=args.workers,
        )
    except (SpokenQuestionError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
