"""Which files belong to each card: the frames (or video file) and spoken question of every predicted
(video_id, id), found through the eval data file that the predictions' meta line names and checked by
``surgvqa.samples.load_samples``. A card whose question differs from the data file's gets no media at all."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from surgvqa.html_report.runs import Key, Run, file_sha256, record_key, show_key
from surgvqa.media import MediaConfig
from surgvqa.report import PredictionsMeta
from surgvqa.samples import load_samples


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


def find_data_file(meta: PredictionsMeta | None, predictions: Path) -> tuple[Path | None, str | None]:
    """The eval data file named in the meta line (as recorded, else beside the predictions file), or
    ``(None, why)`` when it is named but not found; ``(None, None)`` when the meta line names none."""
    recorded = meta.eval_data_path if meta else None
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
    data_path, missing = find_data_file(run.meta, run.path)
    if missing:
        notes.append(missing)
    located: dict[Key, Located] = {}
    if data_path is not None:
        meta = run.meta or PredictionsMeta()
        frames_root = frames_dir if frames_dir is not None else meta.frames_dir
        audio_root = audio_dir if audio_dir is not None else meta.audio_dir
        media = MediaConfig(
            frames_dir=str(frames_root) if frames_root else None,
            audio_dir=str(audio_root) if audio_root else None,
            frame_path_template=frame_path_template or meta.preprocessing.frame_path_template,
            audio_path_template=audio_path_template or meta.preprocessing.audio_path_template,
            question_modality="text+audio" if audio_root else "text",
        )
        recorded_hash = meta.eval_data_sha256
        if recorded_hash and str(recorded_hash).split(":")[-1] != file_sha256(data_path):
            notes.append(
                f"the eval data file {data_path} changed since the run (its sha256 differs from the meta line's); "
                "a card shows media only where the data file's question for its (video_id, id) is the "
                "prediction's question"
            )
        located = _load_located(data_path, media, notes)

    out: dict[Key, Located] = {}
    for rec in run.records:
        key = record_key(rec)
        loc = located.get(key)
        if loc is None:
            if data_path is not None:
                reason = f"{show_key(key)} is not in the eval data file {data_path}"
            elif missing:
                reason = "the eval data file was not found (see the note at the top)"
            else:
                reason = "the predictions file names no eval data file (it has no surgvqa_meta line)"
            loc = Located(problems=[f"no media: {reason}"])
        elif loc.question is not None and rec.get("question") is not None and loc.question != rec["question"]:
            loc = Located(problems=[
                f"media not shown: the data file's question for {show_key(key)} is {loc.question!r}, not this "
                "prediction's question (the data file changed since the run?)"
            ])
        out[key] = loc
    return out, notes


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


def _load_located(data_path: Path, media: MediaConfig, notes: list[str]) -> dict[Key, Located]:
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
