"""Run directories: one run per ``--output_dir``, resumable after a crash, never mixed with another run.

A training output directory holds one run. Before any weight loads, :func:`plan_output_dir` decides from
``--output_dir``, ``--resume_from_checkpoint`` and ``--overwrite_output_dir`` what happens:

* empty or missing directory: a fresh run;
* a directory with files and ``--overwrite_output_dir True``: emptied first (nothing of the old run stays beside the
  new one), then a fresh run;
* ``--resume_from_checkpoint True`` (or ``last``): the last *complete* checkpoint of the directory;
* ``--resume_from_checkpoint auto`` (what ``train_with_eval_FINAL.sh`` passes): the last complete checkpoint when the
  directory holds the same run (the same ``surgvqa_config.json`` settings), a fresh run in an empty directory, and a
  refusal naming the differing settings when it holds another run;
* ``--resume_from_checkpoint PATH``: that checkpoint, which must be complete;
* anything else in a directory with files: refused, saying which of the above to use.

A checkpoint is complete when its ``surgvqa_config.json`` exists: training writes it from the Trainer's ``on_save``
callback, which runs after the Trainer has written the weights, optimizer, scheduler, RNG and ``trainer_state.json``.
A checkpoint whose writing was cut short by a kill has no such file (or no readable ``trainer_state.json`` for its
step) and is never picked.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgvqa.errors import UserError
from surgvqa.run_config import CONFIG_NAME as RUN_RECORD

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
#: settings that may differ between two invocations of the same run
_NOT_COMPARED = frozenset({"surgvqa_version", "schema_version", "base_model_relative"})
AUTO = "auto"
LAST = ("true", "last")


class RunDirError(UserError):
    """The output directory cannot be used as asked (another run's files, nothing to resume from, ...)."""


@dataclass
class RunDirPlan:
    """What to do with the output directory before training."""

    output_dir: Path
    resume_from: str | None = None
    empty_first: bool = False
    #: the settings of the run being continued (compared in :func:`check_same_run`)
    recorded: dict[str, Any] | None = None
    #: an explicit --resume_from_checkpoint may extend the run (num_train_epochs, max_steps); auto may not
    extending: bool = False
    notes: list[str] = field(default_factory=list)


def checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-N`` directory, oldest first (complete or not)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def incomplete_reason(checkpoint: str | Path) -> str | None:
    """Why a checkpoint directory is not a complete checkpoint (``None`` when it is)."""
    path = Path(checkpoint)
    if not path.is_dir():
        return f"{path} is not a directory"
    if not (path / RUN_RECORD).is_file():
        return f"{path} has no {RUN_RECORD} (its writing was cut short)"
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as err:
        return f"{path} has no readable trainer_state.json ({err})"
    match = _CHECKPOINT.match(path.name)
    if match and state.get("global_step") != int(match.group(1)):
        return f"{path}: trainer_state.json records step {state.get('global_step')}, not {match.group(1)}"
    if not any(path.glob("*.safetensors")):
        return f"{path} has no weights (*.safetensors)"
    return None


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, skipping (and logging) incomplete ones."""
    for step, path in reversed(checkpoints(output_dir)):
        reason = incomplete_reason(path)
        if reason is None:
            return path
        logger.warning("skipping checkpoint-%d: %s", step, reason)
    return None


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def plan_output_dir(output_dir: str | Path, resume_from_checkpoint: str | bool | None, overwrite: bool,
                    protected: Iterable[str | Path | None] = ()) -> RunDirPlan:
    """Decide (reading only) what to do with ``output_dir``; raise :class:`RunDirError` when it cannot be used.

    ``protected``: paths that must not lie inside a directory about to be emptied (data, frames, the base model).
    """
    out = Path(output_dir)
    plan = RunDirPlan(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--output_dir {out} is a file, not a directory; choose a directory")
    contents = sorted(out.iterdir()) if out.is_dir() else []
    resume = resume_from_checkpoint
    mode = str(resume).strip().lower() if resume not in (None, False, "") else None
    if mode == "false" or (mode == AUTO and overwrite):  # auto is the recipe's default; an explicit overwrite wins
        mode = None
    if overwrite and mode is not None:
        raise RunDirError(
            "--overwrite_output_dir True empties the directory, --resume_from_checkpoint continues a run in it: "
            "pass one of them"
        )
    if mode is not None and mode not in LAST and mode != AUTO:
        reason = incomplete_reason(resume)
        if reason is not None:
            raise RunDirError(
                f"--resume_from_checkpoint {resume}: not a complete checkpoint ({reason}); pass "
                "--resume_from_checkpoint True to resume from the last complete checkpoint of --output_dir"
            )
        plan.resume_from = str(resume)
        plan.recorded = _read_record(Path(resume) / RUN_RECORD) or _read_record(out / RUN_RECORD)
        plan.extending = True
        return plan
    if mode in LAST:
        last = last_complete_checkpoint(out)
        if last is None:
            found = ", ".join(p.name for _, p in checkpoints(out)) or "none"
            raise RunDirError(
                f"--resume_from_checkpoint {resume}: no complete checkpoint in {out} (checkpoint directories: "
                f"{found}); start a fresh run without the flag, in an empty directory"
            )
        plan.resume_from = str(last)
        plan.recorded = _read_record(last / RUN_RECORD) or _read_record(out / RUN_RECORD)
        plan.extending = True
        return plan
    if not contents:
        return plan
    if overwrite:
        _refuse_protected(out, protected)
        plan.empty_first = True
        plan.notes.append(f"--overwrite_output_dir: emptying {out} ({len(contents)} entries) before training")
        return plan
    if mode == AUTO:
        recorded = _read_record(out / RUN_RECORD)
        if recorded is None:
            raise RunDirError(
                f"--output_dir {out} holds files but no {RUN_RECORD}: not a surgvqa run. Choose another "
                "--output_dir, or pass --overwrite_output_dir True to empty it"
            )
        plan.recorded = recorded
        last = last_complete_checkpoint(out)
        if last is not None:
            plan.resume_from = str(last)
        else:  # the same run's leftovers from before its first complete checkpoint: start it again
            plan.empty_first = True
            plan.notes.append(f"{out} holds no complete checkpoint of this run: starting it again from step 0")
        return plan
    names = ", ".join(p.name for p in contents[:5]) + (", ..." if len(contents) > 5 else "")
    if checkpoints(out):
        raise RunDirError(
            f"--output_dir {out} holds checkpoints of an earlier run ({names}). Pass --resume_from_checkpoint True "
            "to continue it, --overwrite_output_dir True to delete it and start over, or choose another --output_dir"
        )
    raise RunDirError(
        f"--output_dir {out} is not empty ({names}): training would overwrite or mix with those files. Choose "
        "another --output_dir, or pass --overwrite_output_dir True to empty it first"
    )


def _refuse_protected(out: Path, protected: Iterable[str | Path | None]) -> None:
    root = out.resolve()
    home = Path.home().resolve()
    if root in (Path(root.anchor), home) or root in Path.cwd().resolve().parents or root == Path.cwd().resolve():
        raise RunDirError(f"--overwrite_output_dir would empty {root}; choose a dedicated --output_dir")
    for item in protected:
        if not item:
            continue
        path = Path(item).resolve()
        if path == root or root in path.parents:
            raise RunDirError(
                f"--overwrite_output_dir would empty {root}, which holds {path} (an input of this run); choose "
                "another --output_dir"
            )


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``key: recorded -> current`` for every setting that differs (nested dicts compared key by key)."""
    out = []
    for key in sorted(set(recorded) | set(current)):
        if not prefix and key in _NOT_COMPARED:
            continue
        a, b = recorded.get(key), current.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += differences(a, b, f"{prefix}{key}.")
        elif json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


#: what an explicit --resume_from_checkpoint may change: how long the run goes on
_EXTENDABLE = ("training.num_train_epochs:", "training.max_steps:")


def check_same_run(plan: RunDirPlan, current: Mapping[str, Any]) -> None:
    """Refuse to continue a run whose recorded settings differ from ``current`` (the settings known before the
    model loads; only the keys of ``current`` are compared). An explicit ``--resume_from_checkpoint`` may extend the
    run (more epochs or steps); ``auto`` (the recipe rerun after a crash) may not."""
    if plan.recorded is None:
        return
    current = json.loads(json.dumps(current))
    diff = differences({k: plan.recorded.get(k) for k in current}, current)
    if plan.extending:
        diff = [d for d in diff if not d.startswith(_EXTENDABLE)]
    if diff:
        raise RunDirError(
            f"--output_dir {plan.output_dir} holds another run: its {RUN_RECORD} differs in "
            + "; ".join(diff[:8]) + ("; ..." if len(diff) > 8 else "")
            + ". To continue it, use its recorded settings; otherwise choose another OUTPUT_DIR / --output_dir, or "
            "pass --overwrite_output_dir True to delete that run"
        )


def apply_plan(plan: RunDirPlan) -> None:
    """Empty the directory when the plan says so (its entries, not the directory itself, which may be a mount)."""
    for note in plan.notes:
        logger.warning(note)
    if plan.empty_first and plan.output_dir.is_dir():
        for entry in plan.output_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    plan.output_dir.mkdir(parents=True, exist_ok=True)
