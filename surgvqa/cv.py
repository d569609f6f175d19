"""``surgvqa cv``: leave-one-video-out. How would this recipe score on a new video of this kind?

    surgvqa cv --data_path all.jsonl --frames_dir frames --output_dir runs/cv [--folds 002-001,002-004] \
        [--val_policy next|none] -- <training flags: --model_name_or_path … --max_steps …>

For a data file with V videos, fold k tests on video k (never trained on, never used to choose anything); with
``--val_policy next`` (default) the next video (in sorted order, wrapping) is the validation file the training
flags may use to choose a checkpoint (``--eval_strategy``, ``--load_best_model_at_end``), and the other V - 2 videos
train; with ``none`` the other V - 1 videos train and no validation file is passed. Each fold is a normal run
directory (``<output_dir>/fold-<k>-<video>/run``, trained by ``surgvqa train --resume_from_checkpoint auto``, so a
killed fold resumes from its last complete checkpoint; a finished training is not repeated) followed by a normal
evaluation
(``test_predictions.jsonl``, resumable too). A fold is finished when its ``fold.json`` exists; a finished fold is
never redone. ``cv.json`` and ``cv.html`` hold the per-fold table, the mean, standard deviation and t-interval
over the folds (the answer to "a new video"), and the pooled clustered interval of all folds' predictions.
The training flags may start with a YAML/JSON recipe (as for ``surgvqa train``); neither the flags nor the recipe
may set what cv sets per fold (data files, media roots, output directory), and ``cv_settings.json`` records the
recipe's sha256 beside the flags, so a later call with other flags or an edited recipe is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from surgvqa.clusters import Clustering, clustered_summary
from surgvqa.errors import UserError, existing_dir, existing_file, one_line_errors, run_main
from surgvqa.html_report.markup import esc, kv_table, pct
from surgvqa.lean_imports import is_recipe
from surgvqa.lora import applies_to_nf4_base
from surgvqa.metrics import closed_sets, question_type, score_record
from surgvqa.report import format_ci, read_predictions, read_predictions_meta
from surgvqa.run_config import RunConfig
from surgvqa.stats import t_quantile, wilson_interval

VAL_POLICIES = ("next", "none")
FOLD_DONE = "fold.json"
#: training flags cv sets itself for every fold
OWN_TRAIN_FLAGS = ("--train_data_path", "--eval_data_path", "--output_dir", "--frames_dir", "--audio_dir",
                   "--eval_frames_dir", "--eval_audio_dir", "--resume_from_checkpoint")


@dataclass
class CvArguments:
    data_path: str = field(metadata={"help": "the JSONL of every video (REAL-Colon-VQA schema)"})
    output_dir: str = field(metadata={"help": "one directory per fold is made here, plus cv.json and cv.html"})
    frames_dir: str | None = field(default=None, metadata={"help": "frames root (default: beside --data_path)"})
    audio_dir: str | None = field(default=None, metadata={"help": "spoken questions root"})
    folds: str | None = field(default=None, metadata={
        "help": "comma-separated test videos (or 1-based fold numbers) to run now; default: every fold"})
    val_policy: str = field(default="next", metadata={"help": "next (the next video validates) | none"})
    eval_batch_size: int = field(default=8, metadata={"help": "evaluation batch (evaluate --batch_size)"})
    max_new_tokens: int = field(default=64)
    device: str | None = field(default=None, metadata={"help": "evaluation device (default: cuda when available)"})
    cluster_by: str | None = field(default=None, metadata={"help": "as for evaluate (default: segment)"})
    cluster_gap: int | None = field(default=None)
    bootstrap: int | None = field(default=None)
    bootstrap_seed: int | None = field(default=None)


@dataclass
class Fold:
    number: int
    test: str
    val: str | None
    train: list[str]
    directory: Path


def _videos(records: list[dict[str, Any]], path: str) -> list[str]:
    missing = [i for i, r in enumerate(records, 1) if not r.get("video_id")]
    if missing:
        raise UserError(f"{path}:{missing[0]}: no video_id; leave-one-video-out needs every line's video_id")
    return sorted({str(r["video_id"]) for r in records})


def plan_folds(videos: list[str], output_dir: Path, val_policy: str) -> list[Fold]:
    """Every fold: its test video, validation video (``next``: the following one, wrapping) and training videos."""
    if val_policy not in VAL_POLICIES:
        raise UserError(f"--val_policy must be one of {', '.join(VAL_POLICIES)}, got {val_policy!r}")
    need = 3 if val_policy == "next" else 2
    if len(videos) < need:
        raise UserError(f"leave-one-video-out with --val_policy {val_policy} needs at least {need} videos; the data "
                        f"file has {len(videos)} ({', '.join(videos)})")
    folds = []
    for k, test in enumerate(videos):
        val = videos[(k + 1) % len(videos)] if val_policy == "next" else None
        train = [v for v in videos if v not in (test, val)]
        folds.append(Fold(k + 1, test, val, train, output_dir / f"fold-{k + 1:02d}-{test}"))
    return folds


def select(folds: list[Fold], wanted: str | None) -> list[Fold]:
    if not wanted:
        return folds
    chosen = []
    for item in (w.strip() for w in wanted.split(",") if w.strip()):
        match = [f for f in folds if f.test == item or str(f.number) == item]
        if not match:
            raise UserError(f"--folds {item!r} is neither a video of the data file nor a fold number 1-{len(folds)}")
        chosen += [f for f in match if f not in chosen]
    return chosen


def _write_if_new(path: Path, text: str) -> None:
    """Write a fold's data file; an existing one must hold the same lines (a finished fold is never re-split)."""
    if path.exists():
        if path.read_text(encoding="utf-8") != text:
            raise UserError(f"{path} exists with other lines than this data file gives; the data file changed since "
                            "this cross-validation began: use another --output_dir")
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _lines(records: list[dict[str, Any]], videos: list[str]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records if r["video_id"] in videos)


def _run(command: list[str], log: Path, what: str) -> None:
    """A surgvqa command in a child process, its output appended to ``log``; a failure names the log."""
    with log.open("a", encoding="utf-8") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        handle.flush()
        rc = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, check=False).returncode
    if rc != 0:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(True)[-5:])
        raise UserError(f"{what} failed (exit {rc}); its log is {log}; last lines:\n{tail}")


def run_fold(fold: Fold, args: CvArguments, records: list[dict[str, Any]], train_flags: list[str]) -> dict:
    """Train, evaluate and record one fold (each step resumes what a killed run left)."""
    data = fold.directory / "data"
    data.mkdir(parents=True, exist_ok=True)
    files = {"train": data / "train.jsonl", "test": data / "test.jsonl"}
    if fold.val:
        files["val"] = data / "val.jsonl"
    for name, videos in (("train", fold.train), ("test", [fold.test]), ("val", [fold.val])):
        if name in files:
            _write_if_new(files[name], _lines(records, videos))
    media = ["--frames_dir", args.frames_dir] if args.frames_dir else []
    media += ["--audio_dir", args.audio_dir] if args.audio_dir else []
    run_dir = fold.directory / "run"
    command = [sys.executable, "-m", "surgvqa", "train", *train_flags, "--train_data_path", str(files["train"]),
               "--output_dir", str(run_dir), "--resume_from_checkpoint", "auto", *media]
    if fold.val:
        command += ["--eval_data_path", str(files["val"])]
    if not (run_dir / "training_args.json").exists():  # written after the final adapter: training finished
        _run(command, fold.directory / "train.log", f"fold {fold.number} ({fold.test}) training")
    predictions = fold.directory / "test_predictions.jsonl"
    clustering = [f"--{k}={v}" for k, v in (("cluster_by", args.cluster_by), ("cluster_gap", args.cluster_gap),
                                            ("bootstrap", args.bootstrap), ("bootstrap_seed", args.bootstrap_seed))
                  if v is not None]
    summary_file = predictions.with_name("test_predictions.summary.json")
    if not summary_file.exists():  # --resume continues a partial file (or just scores a complete one)
        evaluate = [sys.executable, "-m", "surgvqa", "evaluate", "--checkpoint_path", str(run_dir),
                    "--eval_data_path", str(files["test"]), "--output_file", str(predictions),
                    "--batch_size", str(args.eval_batch_size), "--max_new_tokens", str(args.max_new_tokens),
                    "--resume", "True", *media, *clustering]
        if args.device:
            evaluate += ["--device", args.device]
        run = RunConfig.find(run_dir)
        if run is not None and applies_to_nf4_base(run.lora):  # LoftQ: the adapter starts from the nf4 base
            evaluate += ["--load_in_4bit", "True"]
        _run(evaluate, fold.directory / "evaluate.log", f"fold {fold.number} ({fold.test}) evaluation")
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    result = {"fold": fold.number, "test_video": fold.test, "val_video": fold.val, "train_videos": fold.train,
              "n": summary["n"], "accuracy": summary["accuracy"], "wilson_ci95": summary["accuracy_ci95"],
              "clustered_ci95": summary["clustered"]["accuracy"]["ci95"],
              "n_segments": summary["clustered"]["accuracy"]["n_clusters"],
              "predictions": str(predictions), "run_dir": str(run_dir)}
    tmp = fold.directory / (FOLD_DONE + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, fold.directory / FOLD_DONE)  # written last: the fold is finished
    return result


def across_folds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, sample standard deviation and 95 % t-interval of the per-fold accuracies (each fold one video)."""
    accs = [r["accuracy"] for r in results]
    k = len(accs)
    mean = sum(accs) / k if k else None
    if k < 2:
        return {"folds": k, "mean": mean, "sd": None, "t_ci95": None,
                "reason": "one finished fold: no spread across videos yet"}
    sd = math.sqrt(sum((a - mean) ** 2 for a in accs) / (k - 1))
    half = t_quantile(0.975, k - 1) * sd / math.sqrt(k)
    return {"folds": k, "mean": mean, "sd": sd, "t_ci95": [mean - half, mean + half], "reason": None}


def pooled(results: list[dict[str, Any]], clustering: Clustering) -> dict[str, Any]:
    """Every finished fold's predictions together (segments of all test videos): each fold's records scored with
    that fold's own closed answer sets (its meta line's, as its summary was), so the pooled accuracy is the
    n-weighted mean of the fold accuracies, and the clustered interval of those hits."""
    records: list[dict[str, Any]] = []
    scores: list[dict[str, bool | None]] = []
    for r in results:
        fold_records = read_predictions(r["predictions"])
        meta = read_predictions_meta(r["predictions"])
        sets = closed_sets(fold_records, meta.candidates if meta else None)  # as in its summary
        scores += [score_record(x, sets) for x in fold_records]
        records += fold_records
    clustered = clustered_summary(records, scores, [question_type(x) for x in records], clustering)
    n, hits = len(records), sum(bool(s["accuracy"]) for s in scores)
    return {"n": n, "accuracy": hits / n, "accuracy_hits": hits, "wilson_ci95": list(wilson_interval(hits, n)),
            "clustered": clustered["accuracy"], "across_videos": clustered["across_videos"]}


def render_text(report: dict[str, Any]) -> str:
    lines = [f"leave-one-video-out: {report['finished']} of {report['n_folds']} folds finished", "",
             "fold  test video  val video  n     acc     clustered 95% CI  Wilson 95% CI"]
    for r in report["folds"]:
        lines.append(f"{r['fold']:>4}  {r['test_video']:<10}  {r['val_video'] or '-':<9}  {r['n']:<4}  "
                     f"{pct(r['accuracy']):>6}  {format_ci(r['clustered_ci95']):<16}  {format_ci(r['wilson_ci95'])}")
    over = report["across_folds"]
    if over["t_ci95"]:
        lines.append(f"\nacross folds (a new video): mean {pct(over['mean'])}, sd {100 * over['sd']:.1f} pts, 95% "
                     f"t-interval {format_ci(over['t_ci95'])} over {over['folds']} videos")
    else:
        lines.append(f"\nacross folds: {over['reason']}")
    if report.get("pooled"):
        p = report["pooled"]
        lines.append(f"pooled predictions (these videos' stretches): {pct(p['accuracy'])} clustered "
                     f"{format_ci(p['clustered']['ci95'])}, Wilson {format_ci(p['wilson_ci95'])}, n = {p['n']}")
    return "\n".join(lines)


def render_html(report: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{r['fold']}</td><td>{esc(r['test_video'])}</td><td>{esc(r['val_video'] or '-')}</td>"
        f"<td>{r['n']}</td><td>{pct(r['accuracy'])}</td><td>{format_ci(r['clustered_ci95'])}</td>"
        f"<td>{format_ci(r['wilson_ci95'])}</td><td class='l'>{esc(r['predictions'])}</td></tr>"
        for r in report["folds"])
    over, p = report["across_folds"], report.get("pooled") or {}
    facts = [("folds finished", f"{report['finished']} of {report['n_folds']}"),
             ("mean over folds", pct(over["mean"])),
             ("sd over folds (pts)", "n/a" if over["sd"] is None else f"{100 * over['sd']:.1f}"),
             ("95 % t-interval over folds (a new video)", format_ci(over["t_ci95"]) if over["t_ci95"]
              else over["reason"]),
             ("pooled clustered 95 % CI (these videos' stretches)", format_ci((p.get("clustered") or {}).get("ci95"))),
             ("pooled Wilson 95 % CI", format_ci(p.get("wilson_ci95")))]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>surgvqa cv</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:3px 8px;text-align:right}.l{text-align:left}</style></head><body>"
            f"<h1>Leave-one-video-out: {esc(report['data_path'])}</h1>{kv_table(facts)}<h2>Per fold</h2>"
            "<table id=\"folds\"><thead><tr><th>fold</th><th>test video</th><th>validation video</th><th>n</th>"
            "<th>strict acc.</th><th>clustered 95 % CI</th><th>Wilson 95 % CI</th><th class=\"l\">predictions</th>"
            f"</tr></thead><tbody>{rows}</tbody></table></body></html>\n")


def parse_args(argv: list[str]) -> tuple[CvArguments, list[str]]:
    from transformers import HfArgumentParser

    own, train_flags = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = one_line_errors(HfArgumentParser(CvArguments, prog="surgvqa cv", description=__doc__.split("\n\n")[0]))
    (args,) = parser.parse_args_into_dataclasses(own)
    clash = [f for f in train_flags if f.split("=")[0] in OWN_TRAIN_FLAGS]
    if clash:
        raise UserError(f"surgvqa cv sets {', '.join(clash)} for every fold itself; drop them from the training flags")
    recipe = recipe_of(train_flags)
    if recipe:
        from surgvqa.arguments import read_recipe

        own = sorted(set(read_recipe(str(recipe))) & {f.removeprefix("--") for f in OWN_TRAIN_FLAGS})
        if own:
            raise UserError(f"{recipe}: surgvqa cv sets {', '.join(own)} for every fold itself; a recipe for "
                            "cross-validation must not set them: remove them from the file (or use a copy "
                            "without them)")
    return args, train_flags


def recipe_of(train_flags: list[str]) -> Path | None:
    """The YAML/JSON recipe the training flags start with (as ``surgvqa train`` reads them), or None."""
    return Path(train_flags[0]) if train_flags and is_recipe(train_flags[0]) else None


def cross_validate(args: CvArguments, train_flags: list[str]) -> dict[str, Any]:
    existing_file(args.data_path, "--data_path")
    for name in ("frames_dir", "audio_dir"):
        if getattr(args, name):
            existing_dir(getattr(args, name), f"--{name}")
    clustering = Clustering().given(cluster_by=args.cluster_by, cluster_gap=args.cluster_gap,
                                    bootstrap=args.bootstrap, bootstrap_seed=args.bootstrap_seed)
    text = Path(args.data_path).read_text(encoding="utf-8")
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    out = Path(args.output_dir)
    folds = plan_folds(_videos(records, args.data_path), out, args.val_policy)
    out.mkdir(parents=True, exist_ok=True)
    # what decides a fold's numbers: a later call must match, so finished folds are never mixed with other ones
    settings = {"data_path": str(Path(args.data_path).resolve()),
                "data_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "val_policy": args.val_policy,
                "frames_dir": args.frames_dir and str(Path(args.frames_dir).resolve()),
                "audio_dir": args.audio_dir and str(Path(args.audio_dir).resolve()),
                "max_new_tokens": args.max_new_tokens, "clustering": clustering.as_meta(), "train_flags": train_flags}
    recipe = recipe_of(train_flags)
    if recipe:  # the flags name the recipe; its contents decide the folds too
        settings["recipe_sha256"] = hashlib.sha256(existing_file(str(recipe), "the recipe").read_bytes()).hexdigest()
    recorded = out / "cv_settings.json"
    if recorded.exists() and json.loads(recorded.read_text(encoding="utf-8")) != settings:
        raise UserError(f"{out} holds a cross-validation with other settings ({recorded}: flags, recipe file, data "
                        "or clustering differ); finished folds are never mixed with another recipe: use another "
                        "--output_dir")
    recorded.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    for fold in select(folds, args.folds):
        if (fold.directory / FOLD_DONE).exists():
            print(f"fold {fold.number} ({fold.test}): finished earlier, kept")
            continue
        print(f"fold {fold.number} ({fold.test}): training on {', '.join(fold.train)}"
              + (f", validating on {fold.val}" if fold.val else "") + " ...", flush=True)
        run_fold(fold, args, records, train_flags)
    results = [json.loads((f.directory / FOLD_DONE).read_text(encoding="utf-8")) for f in folds
               if (f.directory / FOLD_DONE).exists()]
    report = {**settings, "n_folds": len(folds), "finished": len(results), "folds": results,
              "across_folds": across_folds(results), "pooled": pooled(results, clustering) if results else None,
              "arguments": asdict(args)}
    (out / "cv.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "cv.html").write_text(render_html(report), encoding="utf-8")
    print(render_text(report))
    print(f"cv: {out / 'cv.json'} and {out / 'cv.html'}")
    return report


def main(argv: list[str] | None = None) -> int:
    """``surgvqa cv``: 0 done; 2 a user error (``error: …``); a fold's failure names its log."""
    return run_main(lambda: cross_validate(*parse_args(list(sys.argv[1:] if argv is None else argv))))


if __name__ == "__main__":
    raise SystemExit(main())
