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

The package, in the order its modules import each other (each imports only those above it):

    markup.py    escaping, percentages, key-value tables
    runs.py      predictions files read and scored (``Run``), meta-line fields, paired comparisons
    charts.py    the SVG charts
    locate.py    which frames, video file and spoken question belong to each (video_id, id)
    media.py     thumbnails and audio encoded into size-capped stores, or relative links
    sections.py  summary, per question type, paired comparison
    training.py  training curves and the run's settings
    viewer.py    the sample cards and their filters
    page.py      the document around the sections (CSS/JS from ``templates/`` inline)
    __init__.py  ``build_report`` (these steps in order) and the command line

The size caps and encoders named here are the ones ``build_report`` reads when it runs, so a caller (or a test)
can change them on this package.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from surgvqa.clusters import Clustering
from surgvqa.errors import ArgumentParser, run_main, writable_file
from surgvqa.html_report.locate import Located, find_data_file, locate_media
from surgvqa.html_report.media import (
    THUMB_MAX_PIXELS,
    Encoded,
    MediaOutput,
    MediaStore,
    audio_ogg,
    thumbnail_jpeg,
    video_thumbs,
)
from surgvqa.html_report.page import check_output, render_page
from surgvqa.html_report.runs import Key, ReportError, load_run, pair_runs, record_key
from surgvqa.html_report.sections import section_compare, section_summary, section_types
from surgvqa.html_report.training import load_training, section_training
from surgvqa.html_report.viewer import render_card, section_samples
from surgvqa.report import read_predictions, read_predictions_meta

__all__ = [
    "MAX_EMBEDDED_AUDIO_BYTES",
    "MAX_EMBEDDED_FRAME_BYTES",
    "THUMB_MAX_PIXELS",
    "ReportError",
    "audio_ogg",
    "build_parser",
    "build_report",
    "main",
    "read_predictions",
    "read_predictions_meta",
    "thumbnail_jpeg",
    "video_thumbs",
]

# Embedded media stop at these sizes (base64 text); cards past the cap say so and the page notes it.
MAX_EMBEDDED_FRAME_BYTES = 24 * 2**20
MAX_EMBEDDED_AUDIO_BYTES = 12 * 2**20


def embed_media(located: Mapping[Key, Located], order: Iterable[Key], media: MediaOutput) -> None:
    """Encode the frames (or video frames) and spoken questions of the cards, in card order, into the stores,
    with this package's encoders (``thumbnail_jpeg``, ``video_thumbs``, ``audio_ogg``)."""
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
    clustering: Clustering | None = None,
) -> Path:
    """Write one self-contained HTML report for a predictions file and return its path.

    ``compare``: other predictions files of the same samples (e.g. ablations), paired by (video_id, id).
    ``frames_dir``/``audio_dir`` and the templates override the ones recorded in the predictions' meta line.
    ``train_dir``: the training output, for loss and eval-accuracy curves and the run's settings.
    ``link_media``: link frames and audio by path relative to the report instead of embedding thumbnails.
    ``clustering``: how every run and comparison is clustered (default: each file's meta line), so a report built
    beside a re-scored summary shows the same clustered numbers.
    Raises ReportError (a ValueError) for user errors; an existing file is replaced only if it is a surgvqa report.
    """
    pred_path = Path(predictions)
    out = Path(output)
    compare_paths = [Path(p) for p in compare]
    check_output(out, [pred_path, *compare_paths])
    run = load_run(pred_path, clustering=clustering)
    data_path, _ = find_data_file(run.meta, run.path)
    if data_path is not None:
        check_output(out, [data_path])
    compared = [load_run(p, clustering=clustering) for p in compare_paths]
    seen: Counter[str] = Counter()
    for r in [run, *compared]:
        seen[r.label] += 1
        if seen[r.label] > 1:
            r.label = f"{r.label} #{seen[r.label]}"
    pairings = [pair_runs(run, c, clustering=clustering) for c in compared]
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

    frames, audio = MediaStore("f", MAX_EMBEDDED_FRAME_BYTES), MediaStore("a", MAX_EMBEDDED_AUDIO_BYTES)
    media = MediaOutput(link=link_media, out_dir=out.resolve().parent, frames=frames, audio=audio)
    embed_media(located, (record_key(r) for r in run.records), media)
    cards = [render_card(i, run, located, compared, media) for i in range(len(run.records))]
    for store, what in ((media.frames, "frame thumbnail"), (media.audio, "spoken question")):
        if store.left_out:
            notes.append(
                f"{store.left_out} {what}(s) left out: embedded media reached the cap of "
                f"{store.cap / 2**20:.0f} MB; the cards past it say so. Build with --link_media to link every file."
            )
    missing = sum(1 for k in {record_key(r) for r in run.records} if located[k].problems)
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
    """``surgvqa report`` / ``python -m surgvqa.html_report``: build the report, print its size and build time."""
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
