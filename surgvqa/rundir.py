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

A run directory counts as used only once training has written its first checkpoint or its final files: a start that
failed before (a bad flag found late, an over-long sample) leaves only its run record (and the frame cache, logs), and
the corrected rerun starts afresh there.

Resuming (``auto``, ``True``/``last``, a path) also compares what the run was trained on: the run record holds a
fingerprint of every input (:func:`input_fingerprints`: the training and evaluation JSONL by size and sha256; the
media files their samples use by a stat manifest, i.e. a sha256 over each file's path, size and mtime, which is cheap
and catches a replaced or re-extracted frame set but not a rewrite that restores size and mtime; the base model by
the sha256 of its weight files, as evaluation records a checkpoint). A changed input is refused, naming it, unless
``--allow_changed_data True`` is given; the change is then recorded (``data_changes``). A run record written before
fingerprints existed resumes with a warning that the data could not be compared.

A checkpoint is complete when its ``surgvqa_config.json`` exists: training writes it from the Trainer's ``on_save``
callback, which runs after the Trainer has written the weights, optimizer, scheduler, RNG and ``trainer_state.json``.
A checkpoint whose writing was cut short by a kill has no such file (or no readable ``trainer_state.json`` for its
step) and is never picked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgvqa.checkpoint import sha256_file, weights_sha256
from surgvqa.errors import UserError
from surgvqa.run_config import CONFIG_NAME as RUN_RECORD
from surgvqa.run_config import RunConfig, RunConfigError

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
    """A run's recorded settings in the current layout (an older schema migrated, so its preprocessing compares
    field by field with this run's); a record that does not validate is compared as written."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    try:
        return RunConfig.from_dict(raw, str(path)).to_dict()
    except RunConfigError:
        return raw


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
    if _failed_start(out, contents):
        plan.empty_first = True
        plan.notes.append(f"{out} holds only what a start that failed before its first checkpoint left "
                          f"({', '.join(p.name for p in contents)}): starting the run afresh")
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


#: what a training start leaves before its first checkpoint: the run record, the default frame cache, the logs
_START_LEFTOVERS = {RUN_RECORD: False, "frame_cache": True, "runs": True}  # name: is a directory


def _failed_start(out: Path, contents: list[Path]) -> bool:
    """A directory holding this toolkit's run record and nothing a training step writes (no checkpoint, no final
    files): a start that failed before training began (it is reused, not refused)."""
    names = {p.name: p for p in contents}
    if RUN_RECORD not in names or _read_record(out / RUN_RECORD) is None:
        return False
    return all(name in _START_LEFTOVERS and path.is_dir() == _START_LEFTOVERS[name] and not path.is_symlink()
               for name, path in names.items())


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


# ------------------------------------------------------------------------------------------------ inputs
def file_fingerprint(path: str | Path | None) -> dict[str, Any] | None:
    """``{"path", "size", "sha256"}`` of a data file (None for none)."""
    if not path:
        return None
    resolved = Path(path).resolve()
    return {"path": str(resolved), "size": resolved.stat().st_size, "sha256": sha256_file(resolved)}


def media_manifest(paths: Iterable[str | Path]) -> dict[str, Any]:
    """A stat manifest of media files: their count, total bytes and one sha256 over each file's resolved path, size
    and mtime (ns), sorted. Cheap (one stat per file, no read); a missing file counts as size -1."""
    digest = hashlib.sha256()
    count = total = 0
    for path in sorted({os.path.abspath(os.fspath(p)) for p in paths}):
        try:
            st = os.stat(path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, 0
        digest.update(f"{path}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
        count += 1
        total += max(size, 0)
    return {"files": count, "bytes": total, "stat_manifest_sha256": digest.hexdigest()}


def sample_media(samples: Sequence[Any]) -> list[str]:
    """Every frame, video and audio file the samples use (what a :class:`surgvqa.data.Sample` names)."""
    out: list[str] = []
    for sample in samples:
        out += [str(p) for p in getattr(sample, "frame_paths", None) or []]
        out += [str(p) for p in (getattr(sample, "video_path", None), getattr(sample, "audio_path", None)) if p]
    return out


def input_fingerprints(train_data: str | None, eval_data: str | None, train_samples: Sequence[Any],
                       eval_samples: Sequence[Any], base_model: str) -> dict[str, Any]:
    """What a run is trained on, as its record holds it (see the module docstring for what each part checks)."""
    base: dict[str, Any] = {"path": base_model, "weights_sha256": None}
    if Path(base_model).is_dir():
        try:
            base["weights_sha256"] = weights_sha256(base_model)
        except ValueError:  # no weight files: the loader says so
            pass
    inputs = {"train_data": file_fingerprint(train_data), "train_media": media_manifest(sample_media(train_samples)),
              "base_model": base}
    if eval_data:
        inputs["eval_data"] = file_fingerprint(eval_data)
        inputs["eval_media"] = media_manifest(sample_media(eval_samples))
    return inputs


_INPUT_NAMES = {"train_data": "training data", "eval_data": "evaluation data",
                "train_media": "the media files of the training samples (frames, videos, audio)",
                "eval_media": "the media files of the evaluation samples (frames, videos, audio)",
                "base_model": "the base model's weights"}


def changed_inputs(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """One line per input whose fingerprint differs, naming the input and what differs."""
    out = []
    for key, name in _INPUT_NAMES.items():
        a, b = recorded.get(key), current.get(key)
        if a == b:
            continue
        a, b = a or {}, b or {}
        where = b.get("path") or a.get("path")
        details = [f"{field} {a.get(field)!r} -> {b.get(field)!r}" for field in
                   ("path", "size", "sha256", "files", "bytes", "stat_manifest_sha256", "weights_sha256")
                   if a.get(field) != b.get(field)]
        out.append(f"{name}{f' {where}' if where else ''} changed ({', '.join(details)})")
    return out


def check_same_inputs(plan: RunDirPlan, current: Mapping[str, Any], allow: bool) -> list[str]:
    """Refuse to resume a run on inputs other than those it was trained on (``--allow_changed_data True`` lets it,
    and the caller records the returned changes). A record without fingerprints (an older run) is resumed with a
    warning."""
    if plan.resume_from is None or plan.recorded is None:
        return []
    recorded = plan.recorded.get("inputs")
    if recorded is None:
        logger.warning("%s records no fingerprints of its inputs (written before they were recorded): resuming "
                       "without checking that the data is the same", plan.resume_from)
        return []
    changed = changed_inputs(recorded, current)
    if changed and not allow:
        raise RunDirError(
            f"cannot resume from {plan.resume_from}: it was trained on other inputs: " + "; ".join(changed)
            + ". Restore them, start a new run in another --output_dir, or pass --allow_changed_data True to "
            "continue on the changed inputs (recorded in " + RUN_RECORD + ")"
        )
    for line in changed:
        logger.warning("resuming on changed inputs (--allow_changed_data True): %s", line)
    return changed
