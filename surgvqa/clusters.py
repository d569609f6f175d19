"""Which questions are not independent: clusters of questions (segments of a video, clips, videos), defined once,
and the cluster-bootstrap intervals of a run's accuracies built on them.

Questions on one clip, and clips that overlap or nearly touch in one video, show the same scene: a model right on
one is likely right on the others. A *segment* is a maximal run of clips of one video whose frame ranges overlap
or lie within ``gap`` frames of each other (frame ranges from a record's ``frame_numbers``, else from the last
number in each frame name). Segments nest in videos. Everything here is a pure function of the predictions
records, so re-scoring a file recomputes the same clusters and, with the same seed, the same intervals. The
methods and their measured coverage are in EVAL_STRATEGY.md §2.6.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from surgvqa.errors import UserError
from surgvqa.stats import BOOTSTRAP_SCHEMES, cluster_interval, clustered_paired, wilson_interval

CLUSTER_BY = ("segment", "clip", "video", "none")
#: the flags of the clustering (and its keys in a summary), with their defaults
CLUSTER_DEFAULTS: dict[str, Any] = {"cluster_by": "segment", "cluster_gap": 30, "bootstrap": 2000,
                                    "bootstrap_seed": 0}
MIN_RESAMPLES = 100
_LAST_NUMBER = re.compile(r"(\d+)\D*$")


@dataclass(frozen=True)
class Clustering:
    """How questions are clustered and resampled: ``by`` one of CLUSTER_BY, ``gap`` in frames (segments only),
    ``resamples`` bootstrap sets, ``seed`` of the bootstrap."""

    by: str = CLUSTER_DEFAULTS["cluster_by"]
    gap: int = CLUSTER_DEFAULTS["cluster_gap"]
    resamples: int = CLUSTER_DEFAULTS["bootstrap"]
    seed: int = CLUSTER_DEFAULTS["bootstrap_seed"]

    def __post_init__(self) -> None:
        if self.by not in CLUSTER_BY:
            raise UserError(f"--cluster_by must be one of {', '.join(CLUSTER_BY)}, got {self.by!r}")
        if not isinstance(self.gap, int) or self.gap < 0:
            raise UserError(f"--cluster_gap must be a whole number of frames >= 0, got {self.gap!r}")
        if not isinstance(self.resamples, int) or self.resamples < MIN_RESAMPLES:
            raise UserError(f"--bootstrap must be at least {MIN_RESAMPLES} resamples, got {self.resamples!r}")

    def given(self, **flags: Any) -> Clustering:
        """This clustering with the flags given (not None) on top (keys as in CLUSTER_DEFAULTS)."""
        values = {**self.as_meta(), **{k: v for k, v in flags.items() if v is not None}}
        return Clustering(*(values[k] for k in CLUSTER_DEFAULTS))

    def as_meta(self) -> dict[str, Any]:
        return dict(zip(CLUSTER_DEFAULTS, asdict(self).values(), strict=True))


@dataclass
class Assignment:
    """Each record's cluster: ``clusters[i]`` = (video, cluster number within the video); ``unit`` names the
    cluster (segment | clip | video | question); ``scheme``: how they are resampled (``stats.BOOTSTRAP_SCHEMES``)."""

    clusters: list[tuple[str, int]]
    unit: str
    scheme: str
    fallback: str | None = None


def frame_span(record: Mapping[str, Any]) -> tuple[int, int] | None:
    """(first, last) frame number of a record's clip: its ``frame_numbers``, else the last number in each of its
    ``frames`` names; None when neither gives a number for every frame."""
    numbers = record.get("frame_numbers")
    if not (isinstance(numbers, list) and numbers and all(type(x) is int for x in numbers)):
        frames = record.get("frames")
        if not (isinstance(frames, list) and frames):
            return None
        found = [_LAST_NUMBER.search(str(f)) for f in frames]
        if not all(found):
            return None
        numbers = [int(m.group(1)) for m in found if m]
    return (min(numbers), max(numbers))


def clip_fields(frame_paths: Sequence[Any], frame_numbers: Any) -> dict[str, Any]:
    """What a predictions record keeps of its clip (frame names, frame numbers), so re-scoring finds the segments
    from the predictions file alone."""
    out: dict[str, Any] = {}
    if frame_paths:
        out["frames"] = [Path(p).stem for p in frame_paths]
    if isinstance(frame_numbers, list):
        out["frame_numbers"] = frame_numbers
    return out


def _clip_key(record: Mapping[str, Any]) -> tuple | None:
    for name in ("frames", "frame_numbers"):
        value = record.get(name)
        if isinstance(value, list) and value:
            return (name, *map(str, value))
    return None


def segments(spans: Sequence[tuple[int, int]], gap: int) -> list[int]:
    """Segment number of each span of one video: spans that overlap or lie within ``gap`` frames are joined."""
    order = sorted(range(len(spans)), key=lambda i: spans[i])
    out = [0] * len(spans)
    current, end = -1, None
    for i in order:
        lo, hi = spans[i]
        if end is None or lo > end + gap:
            current += 1
            end = hi
        else:
            end = max(end, hi)
        out[i] = current
    return out


def _question_numbers(records: Sequence[Mapping[str, Any]], videos: Sequence[str]) -> list[int]:
    """Each record's rank by (video, id, line): a cluster number that does not depend on the order of the lines
    (only on it among duplicate keys)."""
    order = sorted(range(len(records)), key=lambda i: (videos[i], str(records[i].get("id")), i))
    ranks = [0] * len(records)
    for rank, i in enumerate(order):
        ranks[i] = rank
    return ranks


def assign(records: Sequence[Mapping[str, Any]], clustering: Clustering) -> Assignment:
    """The cluster of every record under ``clustering`` (falling back to clips, then to single questions within
    their video, when the records lack what a segment or a clip needs; ``fallback`` says why)."""
    videos = [str(r.get("video_id") or "") for r in records]
    if clustering.by == "none":
        return Assignment([("", i) for i in _question_numbers(records, videos)], "question", "flat")
    if clustering.by == "video":
        return Assignment([(v, 0) for v in videos], "video", "flat")
    fallback = None
    if clustering.by == "segment":
        spans = [frame_span(r) for r in records]
        missing = sum(s is None for s in spans)
        if not missing:
            clusters: list[tuple[str, int]] = [("", 0)] * len(records)
            for video in sorted(set(videos)):
                members = [i for i, v in enumerate(videos) if v == video]
                for i, seg in zip(members, segments([spans[i] for i in members], clustering.gap), strict=True):
                    clusters[i] = (video, seg)
            return Assignment(clusters, "segment", "flat")
        fallback = (f"{missing} of {len(records)} records carry neither frame_numbers nor numbered frame names, so "
                    "segments cannot be found")
    keys = [_clip_key(r) for r in records]
    if all(k is not None for k in keys):
        numbers = {key: i for i, key in enumerate(sorted(set(zip(videos, keys, strict=True))))}  # order-free
        clusters = [(v, numbers[(v, k)]) for v, k in zip(videos, keys, strict=True)]
        if fallback:
            fallback += ": clusters are clips (the questions on one frames list)"
        return Assignment(clusters, "clip", "flat", fallback=fallback)
    reason = "the records carry no frames list (a file written before surgvqa recorded them)"
    fallback = f"{fallback}; {reason}" if fallback else reason
    return Assignment([(v, i) for v, i in zip(videos, _question_numbers(records, videos), strict=True)], "question",
                      "flat",
                      fallback=fallback + ": each question is its own cluster")


def _block(outcomes: Sequence[bool | None], assignment: Assignment, members: Sequence[int],
           clustering: Clustering, scheme: str | None = None) -> dict[str, Any]:
    """Cluster-bootstrap interval of the mean of ``outcomes`` over ``members`` (None outcomes not counted)."""
    sums: dict[tuple[str, int], int] = {}
    sizes: dict[tuple[str, int], int] = {}
    for i in members:
        if outcomes[i] is None:
            continue
        key = assignment.clusters[i]
        sums[key] = sums.get(key, 0) + bool(outcomes[i])
        sizes[key] = sizes.get(key, 0) + 1
    keys = sorted(sizes)  # the bootstrap draws clusters by position: a fixed order, whatever the order of the lines
    return cluster_interval([sums[k] for k in keys], [sizes[k] for k in keys], [k[0] for k in keys],
                            clustering.resamples, clustering.seed,
                            scheme or assignment.scheme)


def one_video_note(video: str, unit: str) -> str:
    """What a clustered interval on a single video covers, and what does not."""
    return (f"one video ({video or 'no video_id'}): the clustered interval covers other {unit}s of this video, not "
            "new videos; how a new video of this kind would score needs several held-out videos "
            "(leave-one-video-out: surgvqa cv, EVAL_STRATEGY.md §2.6)")


def clustered_summary(records: Sequence[Mapping[str, Any]], scores: Sequence[Mapping[str, bool | None]],
                      types: Sequence[str], clustering: Clustering) -> dict[str, Any]:
    """The clustered part of a run's summary: the clustering used, the cluster-bootstrap interval (with design
    effect and effective n) of accuracy, K-ACC and substring, per question type and per video (``per_video``:
    n, accuracy, Wilson and clustered interval), and ``note`` (one video, one cluster) or None."""
    assignment = assign(records, clustering)
    everyone = range(len(records))
    video_ids = sorted({str(r.get("video_id") or "") for r in records})
    out: dict[str, Any] = {
        "clustering": {**clustering.as_meta(), "unit": assignment.unit, "fallback": assignment.fallback,
                       "method": BOOTSTRAP_SCHEMES[assignment.scheme], "n_videos": len(video_ids),
                       "n_clusters": len(set(assignment.clusters))},
    }
    for metric in ("accuracy", "k_acc", "substring"):
        out[metric] = _block([s[metric] for s in scores], assignment, everyone, clustering)
    by_type: dict[str, list[int]] = {}
    for i, qtype in enumerate(types):
        by_type.setdefault(qtype, []).append(i)
    out["per_type"] = {t: _block([s["accuracy"] for s in scores], assignment, by_type[t], clustering)
                       for t in sorted(by_type)}
    per_video: dict[str, Any] = {}
    for video in video_ids:
        members = [i for i, r in enumerate(records) if str(r.get("video_id") or "") == video]
        hits = sum(bool(scores[i]["accuracy"]) for i in members)
        per_video[video] = {
            "n": len(members), "hits": hits, "accuracy": hits / len(members),
            "ci95": list(wilson_interval(hits, len(members))),
            "clustered": _block([s["accuracy"] for s in scores], assignment, members, clustering),
        }
    out["per_video"] = per_video
    # Videos drawn, then clusters within them: wider (within-video noise counted at both levels); see §2.6
    several = len(video_ids) > 1 and assignment.unit != "video" and clustering.by != "none"
    out["across_videos"] = (_block([s["accuracy"] for s in scores], assignment, everyone, clustering, "nested")
                            if several else None)
    notes = []
    if out["accuracy"]["n_clusters"] < 2:
        notes.append(f"the scored questions form a single {assignment.unit}: {out['accuracy']['reason']}")
    if len(video_ids) == 1 and assignment.unit != "video":
        notes.append(one_video_note(video_ids[0], assignment.unit))
    if assignment.fallback:
        notes.append(f"clusters: {assignment.fallback}")
    out["note"] = "; ".join(notes) or None
    return out


def clustered_pairs(pairs: Sequence[tuple[bool, bool]], assignment: Assignment, clustering: Clustering,
                    mask: Sequence[bool] | None = None) -> dict[str, Any] | None:
    """The clustered paired comparison of ``pairs`` (the records of ``assignment`` where ``mask`` is true, in
    order), or None with ``--cluster_by none`` or no pair."""
    keys = [k for i, k in enumerate(assignment.clusters) if mask is None or mask[i]]
    if clustering.by == "none" or not pairs:
        return None
    return clustered_paired(pairs, keys, assignment.unit, clustering.resamples, clustering.seed, assignment.scheme)
