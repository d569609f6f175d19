"""Predictions files in, summaries out (a library; re-scoring's command line is ``evaluate_checkpoint.py
--score_predictions``): reading predictions files (ours, with their meta line, and the original toolkit's format),
the summary of a run, the printed per-type table, the per-type plot, the printed paired comparison.

A predictions file written by the evaluator is self-describing: its first line is ``{"surgvqa_meta": {...}}``
(checkpoint and weights hash, eval data and its hash, ablation, preprocessing, generation settings, the scoring
version and the closed answer set per type used), every other line one prediction record keyed on
(video_id, id). Nothing here trusts the per-metric hits stored in a file: scores are always re-computed from the
prediction and the gold answers by ``surgvqa.metrics``.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections import Counter
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgvqa.clusters import CLUSTER_DEFAULTS, Clustering
from surgvqa.errors import UserError
from surgvqa.metrics import summarize
from surgvqa.preprocessing import Preprocessing, field_names
from surgvqa.records import build, migrate

META_KEY = "surgvqa_meta"
#: the meta line's layout (``format``; :data:`META_MIGRATIONS` reads older ones). 1 (or none): every setting at the
#: top level, ``preprocessing`` naming their source. 2: ``preprocessing`` and ``clustering`` are records of their own.
META_FORMAT = 2
#: the preprocessing settings evaluation does not use, and those a summary leaves to the meta line (long ones)
NOT_EVALUATION, _NOT_IN_SUMMARY = ("max_train_frames",), ("frame_path_template", "audio_path_template", "system_prompt")


def _field(resume: Any = False, summary: Any = False, **default: Any) -> Any:
    """A meta field. ``resume``: compared by ``--resume`` (True, or the fields of a nested record to compare);
    ``summary``: repeated in the run's summary (True, the name it has there, or a nested record's fields)."""
    return field(**(default or {"default": None}), metadata={"resume": resume, "summary": summary})


@dataclass
class PredictionsMeta:
    """The first line of a predictions file (``{"surgvqa_meta": {...}}``): everything that decides the file's lines
    and what re-scoring needs. A field a file does not hold is unknown (None), unless a migration says what its
    absence meant (a preprocessing or clustering setting: its default)."""

    format: int = META_FORMAT
    surgvqa_version: str | None = None
    checkpoint: str | None = _field(summary=True)
    checkpoint_sha256: str | None = _field(resume=True, summary=True)
    base_model: str | None = _field(resume=True)
    backbone: str | None = _field(resume=True)
    eval_data_path: str | None = _field(summary=True)
    eval_data_sha256: str | None = _field(resume=True, summary=True)
    frames_dir: str | None = _field(resume=True)
    audio_dir: str | None = _field(resume=True)
    ablate: str | None = _field(resume=True, summary=True)
    ablation_seed: int | None = _field(resume=True, summary=True)
    #: where the preprocessing came from: "surgvqa_config.json" | "flags" | "defaults"
    preprocessing_source: str | None = _field(summary="preprocessing")
    #: every setting; ``--resume`` compares those evaluation uses, the summary repeats the short ones
    preprocessing: Preprocessing = _field(resume=field_names(but=NOT_EVALUATION),
                                          summary=field_names(but=(*NOT_EVALUATION, *_NOT_IN_SUMMARY)),
                                          default_factory=Preprocessing)
    max_new_tokens: int | None = _field(resume=True, summary=True)
    dtype: str | None = _field(resume=True)
    load_in_4bit: bool | None = _field(resume=True)
    limit: int | None = _field(summary=True)
    skip_bad_samples: bool | None = _field(summary=True)
    skipped_bad_samples: int | None = _field(summary=True)
    n_samples: int | None = None
    scoring: str | None = _field(resume=True)
    baseline: str | float | None = None
    #: the closed answer set per question type the run scored with
    candidates: dict[str, list[str]] | None = _field(resume=True)
    clustering: Clustering = field(default_factory=Clustering)

    @classmethod
    def from_dict(cls, raw: Any, source: str) -> PredictionsMeta:
        """Validate a meta line's object (migrating an older format first); errors name the key and ``source``."""
        raw = migrate(raw, source, key="format", current=META_FORMAT, migrations=META_MIGRATIONS, error=UserError,
                      absent=1)
        return build(cls, raw, source, UserError)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def mismatch(self, run: PredictionsMeta) -> str | None:
        """The first field ``--resume`` compares that differs from ``run``'s, described; None when they match."""
        for spec in dataclasses.fields(self):
            names = spec.metadata.get("resume")
            was, now = getattr(self, spec.name), getattr(run, spec.name)
            pairs = [(spec.name, was, now)] if names is True else [
                (f"{spec.name}.{name}", getattr(was, name), getattr(now, name)) for name in names or ()]
            for name, a, b in pairs:
                if a != b:
                    return f"{name} differs ({json.dumps(a)[:80]} in the file, {json.dumps(b)[:80]} in this run)"
        return None

    def summary_fields(self) -> dict[str, Any]:
        """The settings a run's summary repeats, under their names there."""
        out: dict[str, Any] = {}
        for spec in dataclasses.fields(self):
            how, value = spec.metadata.get("summary"), getattr(self, spec.name)
            if isinstance(how, tuple):
                out.update((name, getattr(value, name)) for name in how)
            elif how:
                out[spec.name if how is True else how] = value
        return out


def _meta_from_v1(raw: dict[str, Any]) -> dict[str, Any]:
    """Format 1 → 2: the preprocessing settings and the clustering into records of their own."""
    if "preprocessing" in raw:
        raw["preprocessing_source"] = raw.pop("preprocessing")
    raw["preprocessing"] = {name: raw.pop(name) for name in field_names() if name in raw}
    raw["clustering"] = {spec.name: raw.pop(old) for spec, old in zip(dataclasses.fields(Clustering),
                                                                      CLUSTER_DEFAULTS, strict=True) if old in raw}
    return raw


#: ``META_MIGRATIONS[v]`` turns a format-``v`` meta line into a format-``v + 1`` one
META_MIGRATIONS = {1: _meta_from_v1}

# Our format (written by the evaluator) and the original toolkit's format.
OURS_REQUIRED = ("id", "question_type", "short_answer", "answer", "prediction")
ORIGINAL_REQUIRED = ("question_id", "question_type", "ground_truth", "short_answer", "predicted_answer")
ORIGINAL_RENAMES = {"question_id": "id", "ground_truth": "answer", "predicted_answer": "prediction"}


def _normalize_record(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "prediction" in obj or "predicted_answer" not in obj:
        required, rec = OURS_REQUIRED, dict(obj)
    else:
        required = ORIGINAL_REQUIRED
        rec = {ORIGINAL_RENAMES.get(k, k): v for k, v in obj.items()}
    missing = [f for f in required if f not in obj]
    if missing:
        kind = "original toolkit" if required is ORIGINAL_REQUIRED else "surgvqa"
        raise UserError(f"{where}: missing field(s) {', '.join(missing)} ({kind} predictions format)")
    if rec["prediction"] is None:
        rec["prediction"] = ""
    for name in ("prediction", "short_answer", "answer", "question_type"):
        if not isinstance(rec[name], str):
            raise UserError(f"{where}: field {name!r} must be a string, got {type(rec[name]).__name__}")
    return rec


def read_predictions_meta(path: str | Path) -> PredictionsMeta | None:
    """The run description on the first line of a predictions file, or None (a file of the original toolkit or an
    older surgvqa): the one reader of meta lines. Reads only that line, so it also works on a ``.partial`` file cut
    by a kill."""
    path = Path(path)
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            if line.lstrip().startswith("["):
                return None
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:1: malformed JSON line ({exc.msg})") from exc
            if isinstance(obj, dict) and META_KEY in obj:
                return PredictionsMeta.from_dict(obj[META_KEY], f"{path}:1: {META_KEY}")
            return None
    return None


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """The prediction records of a file (JSONL or a JSON list), our format or the original toolkit's; the meta
    line is skipped (see :func:`read_predictions_meta`).

    The original format's question_id/ground_truth/predicted_answer become id/answer/prediction. Records without
    video_id are keyed on id alone, with a warning (ids repeat across videos in REAL-Colon-VQA).
    Raises ValueError naming file:line (or file[item]) for malformed lines, missing fields and a meta line that is
    not the first line.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory; give a predictions file (.jsonl)")
    if not path.is_file():
        raise UserError(f"{path} not found; give a predictions file (.jsonl)")
    text = path.read_text(encoding="utf-8")
    items: list[tuple[str, Any]] = []
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from exc
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of records")
        items = [(f"{path}[item {i}]", obj) for i, obj in enumerate(data)]
    else:
        first = True
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: malformed JSON line ({exc.msg})") from exc
            if isinstance(obj, dict) and META_KEY in obj:
                if not first:
                    raise UserError(f"{path}:{lineno}: a {META_KEY} line must be the first line of the file")
                first = False
                continue
            first = False
            items.append((f"{path}:{lineno}", obj))
    records = [_normalize_record(obj, where) for where, obj in items]

    no_video = sum(1 for r in records if r.get("video_id") in (None, ""))
    if no_video:
        warnings.warn(
            f"{path}: {no_video} record(s) have no video_id; keying on question id alone (ids may collide "
            "across videos)",
            stacklevel=2,
        )
    keys = Counter((r.get("video_id") or None, r["id"]) for r in records)
    dupes = sum(c - 1 for c in keys.values() if c > 1)
    if dupes:
        warnings.warn(f"{path}: {dupes} duplicate (video_id, id) key(s); every line is scored", stacklevel=2)
    return records


def summarize_run(
    records: Sequence[Mapping[str, Any]],
    meta: PredictionsMeta | None,
    baseline: str | float | None = None,
    clustering: Clustering | None = None,
) -> dict[str, Any]:
    """The summary of a run: a pure function of its records and meta line (the evaluator and re-scoring both call
    this, so re-scoring a file reproduces the run's summary number for number).

    The closed answer sets are the meta line's (the ones the run used, gathered from the whole eval file before
    ``--limit`` / after ``--skip_bad_samples``); without a meta line they are gathered from the records' gold
    answers (``candidates_source: "records"``). ``baseline``: None = the run's (meta) or "majority";
    ``clustering``: None = the run's (meta) or the defaults.
    """
    candidates = meta.candidates if meta else None
    if baseline is None:
        baseline = meta.baseline if meta and meta.baseline is not None else "majority"
    summary = summarize(records, baseline=baseline, candidates=candidates,
                        clustering=clustering or (meta.clustering if meta else None))
    summary["candidates_source"] = "meta" if candidates is not None else "records"
    summary.update(meta.summary_fields() if meta else dict.fromkeys(PredictionsMeta().summary_fields()))
    if summary["preprocessing"] == "defaults":  # a checkpoint without surgvqa_config.json, defaults allowed
        summary["allow_default_preprocessing"] = True
    return summary


def summary_path_for(output_file: str | Path) -> Path:
    """``preds.jsonl`` -> ``preds.summary.json``; any other name gets ``.summary.json`` appended."""
    p = Path(output_file)
    if p.suffix == ".jsonl":
        return p.with_suffix(".summary.json")
    return p.with_name(p.name + ".summary.json")


def rescored_summary_path_for(predictions: str | Path) -> Path:
    """``preds.jsonl`` -> ``preds.jsonl.rescored.summary.json`` (re-scoring never replaces the run's summary)."""
    p = Path(predictions)
    return p.with_name(p.name + ".rescored.summary.json")


def partial_path_for(output_file: str | Path) -> Path:
    """``preds.jsonl`` -> ``preds.jsonl.partial``: where an evaluation streams its lines until it completes."""
    p = Path(output_file)
    return p.with_name(p.name + ".partial")


def write_summary(summary: Mapping[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _aligned(rows: Sequence[Sequence[str]], right: Container[int]) -> list[str]:
    """Rows as text columns two spaces apart (columns in ``right`` right-justified), a dashed rule under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        cells = (c.rjust(w) if j in right else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths, strict=True)))
        lines.append("  ".join(cells))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def format_ci(interval: Sequence[float] | None) -> str:
    """``[lo, hi]`` in points with one decimal, or ``n/a``."""
    return "n/a" if interval is None else f"[{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def format_clustered(summary: Mapping[str, Any]) -> list[str]:
    """The overall line with the clustered interval as the headline (Wilson beside it), the per-video table and
    the clustering's note (one video, one cluster, a fallback)."""
    clustered = summary.get("clustered")
    if not clustered:
        return []
    how = clustered["clustering"]
    acc = clustered["accuracy"]
    unit = how["unit"]
    lines = []
    if acc["ci95"] is None:
        lines.append(f"clustered: no clustered interval: {acc['reason']}")
    else:
        deff = "" if not acc["design_effect"] else (
            f"; design effect {acc['design_effect']:.2f}, effective n {acc['effective_n']:.0f} of {summary['n']}")
        lines.append(f"clustered: {acc['n_clusters']} {unit}s of {how['n_videos']} video(s), {how['bootstrap']} "
                     f"resamples, seed {how['bootstrap_seed']}{deff}")
    for name, label in (("k_acc", "K-ACC"), ("substring", "substring")):
        if clustered[name]["ci95"] is not None:
            lines.append(f"  {label} clustered 95% CI {format_ci(clustered[name]['ci95'])}")
    across = clustered.get("across_videos")
    if across and across["ci95"] is not None:
        lines.append(f"  videos resampled too (wider): {format_ci(across['ci95'])}")
    if how["n_videos"] > 1:
        rows = [("video", "n", "acc", "clustered 95% CI", f"{unit}s", "Wilson 95% CI")]
        for video, v in clustered["per_video"].items():
            rows.append((video or "-", str(v["n"]), _pct(v["accuracy"]), format_ci(v["clustered"]["ci95"]),
                         str(v["clustered"]["n_clusters"]), format_ci(v["ci95"])))
        lines += ["", *(line.rstrip() for line in _aligned(rows, right={1, 2, 4}))]
    if clustered.get("note"):
        lines.append(f"note: {clustered['note']}")
    return lines


def format_table(summary: Mapping[str, Any]) -> str:
    """A per-type table (n, strict accuracy, clustered and Wilson CI, baselines, top predicted answer, COLLAPSE) +
    overall (the clustered lines of :func:`format_clustered` after it)."""
    per_type = summary["per_type"]
    clustered_types = (summary.get("clustered") or {}).get("per_type", {})
    header = ("type", "n", "acc", "clustered 95% CI", "Wilson 95% CI", "major.", "chance", "top predicted (share)",
              "flag")
    rows = [header]
    for qtype, t in per_type.items():
        lo, hi = t["ci95"]
        rows.append(
            (
                qtype,
                str(t["n"]),
                _pct(t["accuracy"]),
                format_ci(clustered_types.get(qtype, {}).get("ci95")),
                f"[{100 * lo:.1f}, {100 * hi:.1f}]",
                _pct(t["majority_baseline"]),
                _pct(t["chance_baseline"]),
                f"{t['top_predicted']} ({_pct(t['top_predicted_share'])})",
                "COLLAPSE" if t["collapse"] else "",
            )
        )
    lines = [line.rstrip() for line in _aligned(rows, right={1, 2, 5, 6})]
    lo, hi = summary["accuracy_ci95"]
    n = summary["n"]
    delta = summary["delta_vs_baseline"]
    lines.append("")
    clustered_ci = ((summary.get("clustered") or {}).get("accuracy") or {}).get("ci95")
    headline = f"{format_ci(clustered_ci)} clustered, Wilson [{100 * lo:.1f}, {100 * hi:.1f}]" if clustered_ci else (
        f"[{100 * lo:.1f}, {100 * hi:.1f}] Wilson")
    lines.append(
        f"overall: n={n}  strict accuracy {_pct(summary['accuracy'])} {headline}  "
        f"vs {summary['baseline_kind']} baseline {_pct(summary['baseline'])}: {100 * delta:+.1f} pts"
    )
    lines.append(
        f"baselines: majority {_pct(summary['majority_baseline'])}  chance {_pct(summary['chance_baseline'])}"
    )
    meteor = (
        _pct(summary["meteor"])
        if summary.get("meteor") is not None
        else (f"unavailable ({summary.get('meteor_unavailable')})")
    )
    lines.append(
        f"K-ACC {_pct(summary['k_acc'])} (n={summary['k_acc_n']} counted)  substring {_pct(summary['substring_acc'])}"
        f"  exact match {_pct(summary['exact_match'])}  BLEU-4 {summary['bleu4']:.3f}  ROUGE-L {summary['rouge_l']:.3f}"
        f"  METEOR {meteor}"
    )
    eos_unknown = summary.get("eos_unknown", 0)
    lines.append(
        f"no EOS (loops / cut at max tokens): {summary['no_eos']} / {n}"
        + (f"  ({eos_unknown} without stopped_by_eos)" if eos_unknown else "")
    )
    lines += format_clustered(summary)
    collapsed = summary.get("collapsed_types") or []
    lines.append(f"collapsed types: {', '.join(collapsed) if collapsed else 'none'}")
    return "\n".join(lines)


def plot_per_type(summary: Mapping[str, Any], png_path: str | Path) -> Path:
    """Bar chart of per-type strict accuracy with Wilson 95% error bars and majority/chance markers (Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    per_type = summary["per_type"]
    names = list(per_type)
    acc = [per_type[t]["accuracy"] for t in names]
    err_lo = [max(0.0, a - per_type[t]["ci95"][0]) for a, t in zip(acc, names, strict=True)]
    err_hi = [max(0.0, per_type[t]["ci95"][1] - a) for a, t in zip(acc, names, strict=True)]
    xs = list(range(len(names)))
    fig = Figure(figsize=(max(6.0, 0.45 * len(names) + 2), 5.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = ["tab:red" if per_type[t]["collapse"] else "tab:blue" for t in names]
    ax.bar(xs, acc, yerr=[err_lo, err_hi], capsize=3, color=colors, label="strict accuracy (95% CI)")
    for key, marker, size, color, label in (
        ("majority_baseline", "_", 300, "black", "majority baseline"),
        ("chance_baseline", "x", 25, "gray", "chance"),
    ):
        ax.scatter(xs, [per_type[t][key] for t in names], marker=marker, s=size, color=color, zorder=3, label=label)
    ax.set_xticks(xs)
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title(f"per-type strict accuracy (n={summary['n']}; red = collapse)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    return png_path


def predictions_path_for(path: str | Path) -> Path:
    """The predictions file behind ``path``: ``path`` itself, or the file a summary JSON describes.

    A summary written by the evaluator records its predictions file (``predictions_file``); older summaries are
    matched by name (``X.summary.json`` -> ``X.jsonl`` or ``X``; ``X.rescored.summary.json`` -> ``X``).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found; give a predictions file or the summary written beside one")
    if path.is_dir():
        raise UserError(f"{path} is a directory; give a predictions file or the summary written beside one")
    if not path.name.endswith(".summary.json"):
        return path
    try:
        recorded = json.loads(path.read_text(encoding="utf-8")).get("predictions_file")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise UserError(f"{path}: not a summary JSON ({exc})") from exc
    candidates = [Path(recorded)] if recorded else []
    stem = path.name[: -len(".summary.json")]
    if stem.endswith(".rescored"):
        candidates.append(path.with_name(stem[: -len(".rescored")]))
    candidates += [path.with_name(stem + ".jsonl"), path.with_name(stem)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UserError(
        f"{path} is a summary, but its predictions file is not there (tried {', '.join(map(str, candidates))}); "
        "give the predictions file itself"
    )


def format_paired_comparison(
    comparison: Mapping[str, Any], label: str = "run", reference_label: str = "reference"
) -> str:
    """Printable form of ``metrics.paired_comparison``: one row per type, then the overall verdict."""
    header = ("type", "n", label, reference_label, "run - ref [95% CI]", "b", "c", "McNemar p",
              "clustered [95% CI]", "clustered p")
    rows = [header]

    def row(name: str, v: Mapping[str, Any]) -> tuple[str, ...]:
        if not v["n"]:
            return (name, "0", "", "", "", "", "", "", "", "")
        lo, hi = v["difference_ci95"]
        clustered = v.get("clustered") or {}
        cci = clustered.get("ci95")
        return (
            name,
            str(v["n"]),
            _pct(v["run_accuracy"]),
            _pct(v["reference_accuracy"]),
            f"{100 * v['difference']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]",
            str(v["b"]),
            str(v["c"]),
            f"{v['p_value']:.2g}",
            "n/a" if cci is None else f"[{100 * cci[0]:+.1f}, {100 * cci[1]:+.1f}]",
            "n/a" if not clustered else f"{clustered['p_value']:.2g}",
        )

    rows += [row(t, v) for t, v in comparison["per_type"].items()]
    rows.append(row("overall", comparison["overall"]))
    how = comparison.get("clustering") or {}
    unit = f"{how['unit']}s" if how else "clusters"
    lines = [
        f"paired comparison: {label} vs {reference_label} on the same samples (b = {reference_label} right and "
        f"{label} wrong, c = the reverse; points; clustered = cluster bootstrap and clustered McNemar over {unit})",
        *_aligned(rows, right=range(1, len(header))),
    ]
    for name in ("only_in_run", "only_in_reference", "gold_differs"):
        listed = comparison[name]
        if listed["n"]:
            lines.append(f"{name.replace('_', ' ')}: {listed['n']} (e.g. {listed['examples'][:3]})")
    lines.append(f"verdict: {comparison['verdict']}")
    return "\n".join(lines)
