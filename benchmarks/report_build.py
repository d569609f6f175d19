#!/usr/bin/env python
"""HTML report for 1,000 predictions: file size and build time, embedded thumbnails next to --link_media.

    python benchmarks/report_build.py [--quick] [--samples N] [--rounds R] [--frame_size PX]

Data: a synthetic set (scripts/make_synthetic_dataset.py, 8 JPEG frames per clip at --frame_size px, 3 questions
per clip, cached under runs/bench/) with a 3 s 16 kHz WAV per question, and a predictions file in the format
evaluate_checkpoint.py writes (seeded: about 60 % of the answers right). Each round builds the report once with
embedded media and once with --link_media, in that order, in this process; the median round is reported. A cold
``python -m surgvqa.html_report`` (imports included) is timed once. When Debian's chromium is installed, the time
until the embedded report's load event in headless chromium is shown too.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, cached_build, environment_line, log, median, print_table, synthetic_set  # noqa: E402
from _common import write_tone_wavs as _tones  # noqa: E402


def make_predictions(data: Path, frames: Path, audio: Path, out: Path, seed: int = 0) -> Path:
    """A predictions file with a meta line: each answer right with probability 0.6, else another gold answer."""
    rows = [json.loads(x) for x in data.read_text().splitlines() if x.strip()]
    by_type: dict[str, list[str]] = {}
    for r in rows:
        by_type.setdefault(r["question_type"], []).append(r["answer"])
    rng = random.Random(seed)
    lines = [json.dumps({"surgvqa_meta": {"eval_data_path": str(data), "frames_dir": str(frames),
                                          "audio_dir": str(audio), "ablate": None}})]
    for r in rows:
        prediction = r["answer"] if rng.random() < 0.6 else rng.choice(by_type[r["question_type"]])
        lines.append(json.dumps({
            "video_id": r["video_id"], "id": r["id"], "question_type": r["question_type"], "question": r["question"],
            "answer": r["answer"], "short_answer": r["short_answer"], "prediction": prediction,
            "stopped_by_eos": rng.random() > 0.02, "new_tokens": rng.randint(6, 20),
        }))
    out.write_text("\n".join(lines) + "\n")
    return out


def browser_load_seconds(report: Path) -> float | None:
    chromium = shutil.which("chromium")
    if chromium is None:
        return None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync"]
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(profile, executable_path=chromium, headless=True, args=flags)
        page = context.new_page()
        start = time.perf_counter()
        page.goto(report.as_uri(), wait_until="load", timeout=120_000)
        page.wait_for_function("document.querySelector('#f-count').textContent.length > 0")
        seconds = time.perf_counter() - start
        context.close()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 samples, 1 round")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--frame_size", type=int, default=384)
    args = parser.parse_args()
    samples = args.samples or (300 if args.quick else 1000)
    rounds = args.rounds or (1 if args.quick else 3)

    from surgvqa.html_report import build_report

    data_dir = synthetic_set(samples, args.frame_size)
    audio = cached_build(f"tones-{samples}x{args.frame_size}px", "v1",
                         lambda out: _tones(data_dir / "in_template.jsonl", out))
    work = REPO / "runs" / "bench" / "report_build"
    work.mkdir(parents=True, exist_ok=True)
    preds = make_predictions(data_dir / "in_template.jsonl", data_dir / "frames", audio, work / "preds.jsonl")
    rows = [json.loads(x) for x in (data_dir / "in_template.jsonl").read_text().splitlines() if x.strip()]
    frames = {(r["video_id"], f) for r in rows for f in r["frames"]}
    log(f"{samples} predictions, {len(frames)} distinct frames, {samples} spoken questions; {rounds} round(s)")

    times: dict[str, list[float]] = {"embedded": [], "link_media": []}
    cpu: dict[str, list[float]] = {"embedded": [], "link_media": []}
    sizes: dict[str, int] = {}
    for _ in range(rounds):
        for name in times:
            out = work / f"report-{name}.html"
            start, start_cpu = time.perf_counter(), time.process_time()
            build_report(preds, out, link_media=name == "link_media")
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)  # all threads of this process
            sizes[name] = out.stat().st_size
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "surgvqa.html_report", str(preds), "--output",
                    str(work / "report-cold.html")], check=True, cwd=REPO, capture_output=True)
    cold = time.perf_counter() - start
    load = browser_load_seconds(work / "report-embedded.html")

    left_out = "left out: the report reached its size cap" in (work / "report-embedded.html").read_text("utf-8")
    print(environment_line())
    print_table(
        ["report", "size MB", "build s (median)", "CPU s (median)", "s per 1,000 predictions"],
        [[name, sizes[name] / 2**20, median(t), median(cpu[name]), median(t) * 1000 / samples]
         for name, t in times.items()],
        title=f"HTML report for {samples} predictions ({len(frames)} distinct {args.frame_size}px frames)",
    )
    print(f"cold `python -m surgvqa.html_report` (imports + embedded build): {cold:.1f} s")
    if load is not None:
        print(f"headless chromium, embedded report until load + viewer ready: {load:.1f} s")
    print(f"media left out by the size cap: {'yes (see the note at the top of the report)' if left_out else 'none'}")
    print(f"report_build: {samples} predictions -> embedded {sizes['embedded'] / 2**20:.1f} MB in "
          f"{median(times['embedded']):.1f} s ({median(cpu['embedded']):.1f} CPU s), --link_media "
          f"{sizes['link_media'] / 2**20:.1f} MB in {median(times['link_media']):.1f} s "
          f"({median(cpu['link_media']):.1f} CPU s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
