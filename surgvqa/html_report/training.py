"""The training section: loss and eval-accuracy curves from ``trainer_state.json`` (the run's own, else its
latest checkpoint's), the run's settings (:class:`surgvqa.run_config.RunConfig`) and its training arguments."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgvqa.html_report.charts import svg_lines
from surgvqa.html_report.markup import esc, kv_table, pct
from surgvqa.html_report.runs import ReportError
from surgvqa.run_config import CONFIG_NAME, RunConfig


def read_run_settings(directory: Path) -> dict[str, Any] | None:
    """The run's settings (``surgvqa_config.json``, read and validated by :class:`surgvqa.run_config.RunConfig`)
    as a dict, or None when the directory has none."""
    config = RunConfig.find(directory)
    return None if config is None else config.to_dict()


def _checkpoints(train_dir: Path) -> list[Path]:
    found = []
    for child in train_dir.glob("checkpoint-*"):
        suffix = child.name.split("-", 1)[1]
        if child.is_dir() and suffix.isdigit():
            found.append((int(suffix), child))
    return [p for _, p in sorted(found)]


@dataclass
class Training:
    """What a training output directory tells the report; a part it lacks is None and named in ``notes``."""

    directory: Path
    state_path: Path | None
    state: dict[str, Any] | None
    settings: dict[str, Any] | None
    settings_path: Path | None
    args: dict[str, Any] | None
    notes: list[str]


def load_training(train_dir: str | Path) -> Training:
    """``trainer_state.json`` (the run's own, else its latest checkpoint's), the run's settings and its training
    arguments. A directory with none of them is a user error; a missing part becomes a note."""
    directory = Path(train_dir)
    if not directory.is_dir():
        raise ReportError(f"--train_dir {directory} is not a directory; pass the training --output_dir")
    places = [directory, *reversed(_checkpoints(directory))]
    state_path = next((p / "trainer_state.json" for p in places if (p / "trainer_state.json").is_file()), None)
    settings_dir = next((p for p in places if (p / CONFIG_NAME).is_file()), None)
    args_path = next((p / "training_args.json" for p in places if (p / "training_args.json").is_file()), None)
    if state_path is None and settings_dir is None:
        raise ReportError(
            f"--train_dir {directory} holds no trainer_state.json and no {CONFIG_NAME} (nor any "
            "checkpoint-N folder with them); pass the --output_dir of the training run"
        )
    notes = []
    state = None
    if state_path is None:
        notes.append(
            f"{directory} holds no trainer_state.json (the Trainer writes it into each checkpoint-N; a run trained "
            "with --save_strategy no keeps none), so there are no training curves"
        )
    else:
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ReportError(f"{state_path}:{err.lineno}: invalid JSON ({err.msg})") from err
    args = None
    if args_path is not None:
        try:
            args = json.loads(args_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            notes.append(f"{args_path} is not valid JSON; training arguments not shown")
    settings = read_run_settings(settings_dir) if settings_dir else None
    return Training(directory, state_path, state, settings,
                    settings_dir / CONFIG_NAME if settings_dir else None, args, notes)


TRAINING_ARG_KEYS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "warmup_ratio", "warmup_steps", "lr_scheduler_type", "weight_decay", "optim", "bf16", "fp16", "seed",
    "eval_strategy", "save_strategy", "metric_for_best_model", "load_best_model_at_end", "gradient_checkpointing",
)


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for k, v in obj.items():
        if isinstance(v, Mapping) and v:
            rows.extend(_flatten(v, f"{prefix}{k}."))
        else:
            rows.append((f"{prefix}{k}", v))
    return rows


def _points(history: list[Any], key: str) -> list[tuple[float, float]]:
    """(step, value) of every log entry with ``key`` and a numeric step; a value that is no number reads as NaN."""
    out = []
    for entry in history:
        if isinstance(entry, Mapping) and key in entry and _finite(entry.get("step")):
            value = entry[key]
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            out.append((entry["step"], float(value) if ok else math.nan))
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def nonfinite_note(name: str, points: list[tuple[float, float]]) -> str | None:
    """"train loss became NaN at step 6 (3 of 10 logged values are not finite: drawn as gaps, marked x)"; None when
    every value is a finite number."""
    bad = [(step, value) for step, value in points if not _finite(value)]
    if not bad:
        return None
    step, value = bad[0]
    shown = "NaN" if math.isnan(value) else "inf" if value > 0 else "-inf"
    return (f"{name} became {shown} at step {step} ({len(bad)} of {len(points)} logged values are not finite: "
            "drawn as gaps, marked x); the run diverged there (fp16 overflow, a too high learning rate)")


def section_training(training: Training) -> str:
    """Loss and eval-accuracy curves, the trainer state's facts and the run's settings."""
    parts = ['<section id="training"><h2>Training</h2>']
    parts.append(f'<p class="muted mono">{esc(training.directory)}</p>')
    state = training.state or {}
    history = state.get("log_history") or []
    loss, eval_loss, eval_acc = (_points(history, key) for key in ("loss", "eval_loss", "eval_accuracy"))
    best = state.get("best_model_checkpoint")
    best_step = None
    if best and str(best).rsplit("-", 1)[-1].isdigit():
        best_step = int(str(best).rsplit("-", 1)[-1])
    notes = [note for name, points in (("train loss", loss), ("eval loss", eval_loss), ("eval accuracy", eval_acc))
             if (note := nonfinite_note(name, points))]
    charts = []
    if loss or eval_loss:
        series = [s for s in (("train loss", loss), ("eval loss", eval_loss)) if s[1]]
        charts.append(("loss", svg_lines(series, y_label="loss", marker_x=best_step, marker_label="best")))
    if eval_acc:
        charts.append(("eval accuracy (generated answers, strict)",
                       svg_lines([("eval_accuracy", eval_acc)], y_label="eval accuracy", y_range=(0.0, 1.0),
                                 marker_x=best_step, marker_label="best", percent=True)))
    if notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    if charts:
        parts.append('<div class="grid2 even">')
        for title, svg in charts:
            parts.append(f'<div class="panel"><h3>{esc(title)}</h3>{svg}</div>')
        parts.append("</div>")
    elif training.state is not None:
        parts.append('<p class="muted">trainer_state.json has no logged loss or evaluation yet.</p>')
    if training.state is not None:
        facts = [("trainer_state.json", str(training.state_path)), ("global_step", state.get("global_step")),
                 ("epoch", state.get("epoch"))]
        if best:
            facts += [("best checkpoint", best), ("best metric", state.get("best_metric"))]
        finite_acc = [p for p in eval_acc if _finite(p[1])]
        if finite_acc:
            top = max(finite_acc, key=lambda p: p[1])
            facts.append(("highest eval_accuracy", f"{pct(top[1])} at step {top[0]}"))
        parts.append(f'<div class="panel" style="margin-top:12px">{kv_table(facts)}</div>')
    settings_rows: list[tuple[str, Any]] = []
    if training.settings is not None:
        settings_rows += [(k, v) for k, v in _flatten(training.settings) if k != "tokenizer_repair"]
    if training.args:
        settings_rows += [(f"training_args.{k}", training.args[k]) for k in TRAINING_ARG_KEYS if k in training.args]
    if settings_rows:
        source = training.settings_path or training.directory
        half = (len(settings_rows) + 1) // 2
        parts.append(f'<h3>Settings <span class="muted mono">{esc(source)}</span></h3>'
                     f'<div class="panel grid2 even">{kv_table(settings_rows[:half])}'
                     f'{kv_table(settings_rows[half:])}</div>')
    parts.append("</section>")
    return "".join(parts)
