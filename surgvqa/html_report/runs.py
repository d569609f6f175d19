"""Predictions files read and scored for the report: a :class:`Run` per file, the fields of its meta line, and
the paired comparison of two runs. Every number comes from ``surgvqa.metrics``; nothing here writes HTML."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgvqa.clusters import Clustering
from surgvqa.errors import UserError
from surgvqa.media import ABLATION_REMOVES
from surgvqa.metrics import UNTYPED, paired_comparison, predicted_label, score_record, summarize
from surgvqa.report import PredictionsMeta, read_predictions, read_predictions_meta

Key = tuple[str | None, str]


class ReportError(UserError):
    """A user error: a missing or unreadable input, an output that would overwrite something else."""


def record_key(record: Mapping[str, Any]) -> Key:
    return (record.get("video_id") or None, str(record["id"]))


def show_key(key: Key) -> str:
    return f"(video_id={key[0]!r}, id={key[1]!r})"


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# ------------------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    """One predictions file, scored: records, meta, the summary and per-record strict hits / predicted labels."""

    path: Path
    label: str
    meta: PredictionsMeta | None
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    hits: list[dict[str, bool | None]]
    labels: list[str]
    by_key: dict[Key, int]


def load_run(path: Path, label: str | None = None, *, clustering: Clustering | None = None) -> Run:
    """Read and score one predictions file (our format with or without its meta line, or the original toolkit's)
    under ``clustering`` (default: the one its meta line records)."""
    if not path.exists():
        raise ReportError(f"predictions file {path} not found; pass the --output_file of evaluate_checkpoint.py")
    if not path.is_file():
        raise ReportError(f"{path} is a directory; pass the predictions JSONL file inside it")
    meta = read_predictions_meta(path)
    records = read_predictions(path)
    if not records:
        raise ReportError(f"{path} holds no predictions; re-run the evaluation")
    known = meta or PredictionsMeta()
    summary = summarize(records, candidates=known.candidates, clustering=clustering or known.clustering)
    per_type = summary["per_type"]
    hits = [score_record(r, summary["candidates"]) for r in records]
    labels = [
        predicted_label(r.get("prediction") or "", per_type[r.get("question_type") or UNTYPED]["candidates"])
        for r in records
    ]
    by_key: dict[Key, int] = {}
    for i, rec in enumerate(records):
        by_key.setdefault(record_key(rec), i)
    if label is None:
        ablate = known.ablate
        label = f"{path.stem} (ablate={ablate})" if ablate else path.stem
    return Run(path, label, meta, records, summary, hits, labels, by_key)


# --------------------------------------------------------------------------------------------------- compare
@dataclass
class Pairing:
    """A paired comparison: ``run`` is the run that lacks something (the ablated one) or else the compared run,
    ``reference`` the other; ``result`` is ``surgvqa.metrics.paired_comparison(run, reference)``."""

    run: Run
    reference: Run
    result: dict[str, Any]


def pair_runs(this: Run, other: Run, *, clustering: Clustering | None = None) -> Pairing:
    """Pair this report's run with a compared run, scored with this run's closed answer sets and clustered under
    ``clustering`` (default: the one this run's meta line records). An ablated run is always the "run" (so the
    verdict reads "video carries X pts"), whichever of the two files it is."""
    ablated = [(run.meta or PredictionsMeta()).ablate for run in (this, other)]
    run, reference = (this, other) if ablated[0] and not ablated[1] else (other, this)
    ablate = (run.meta or PredictionsMeta()).ablate
    result = paired_comparison(run.records, reference.records, this.summary["candidates"],
                               removed=ABLATION_REMOVES.get(ablate, ablate) if ablate else None,
                               clustering=clustering or (this.meta or PredictionsMeta()).clustering)
    return Pairing(run, reference, result)
