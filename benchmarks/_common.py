"""Shared helpers for the benchmarks: cached tiny model and synthetic data, peak RSS, child processes, tables.

Not a benchmark itself (``make bench`` runs every ``benchmarks/*.py``, so running this file just prints a note).
Everything built here lives under ``runs/bench/`` (git-ignored) in directories named by a hash of the script that
builds them and of the settings, so a changed generator gives a fresh build and concurrent runs never share a
half-written directory (each build happens in a temporary directory that is renamed into place).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH_ROOT = REPO / "runs" / "bench"
RESULT_PREFIX = "BENCH_RESULT "

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from scripts import load_script  # noqa: E402  (re-exported for the benchmarks)


# ------------------------------------------------------------------------------------------- build caching
def _digest(*parts: object, files: Sequence[Path] = ()) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode())
    for file in files:
        h.update(file.read_bytes())
    return h.hexdigest()[:12]


def cached_build(name: str, key: str, build: Callable[[Path], object]) -> Path:
    """``runs/bench/<name>-<key>``, built once by ``build(tmp_dir)`` in a temporary directory renamed into place."""
    target = BENCH_ROOT / f"{name}-{key}"
    if (target / ".complete").is_file():
        return target
    BENCH_ROOT.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=BENCH_ROOT))
    try:
        build(tmp)
        (tmp / ".complete").write_text("ok\n")
        try:
            tmp.rename(target)
        except OSError:  # someone else finished first
            if not (target / ".complete").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_model(seed: int = 0, vocab: str = "tiny") -> Path:
    """The tiny random Qwen2.5-Omni thinker + processor of ``scripts/make_tiny_model.py`` (cached)."""
    script = REPO / "scripts" / "make_tiny_model.py"
    key = _digest(seed, vocab, files=[script])

    def build(out: Path) -> None:
        log(f"building the tiny model (seed {seed}, {vocab} vocab) ...")
        load_script("make_tiny_model").build_tiny_model(out, seed=seed, vocab=vocab)

    return cached_build(f"tiny-omni-{vocab}", key, build)


def synthetic_set(num_samples: int, frame_size: int, seed: int = 7) -> Path:
    """A ``make_dataset`` set without spoken questions: ``DIR/in_template.jsonl`` + ``DIR/frames`` (cached)."""
    script = REPO / "scripts" / "make_synthetic_dataset.py"
    key = _digest(num_samples, frame_size, seed, files=[script])

    def build(out: Path) -> None:
        log(f"rendering a synthetic set of {num_samples} samples at {frame_size} px ...")
        load_script("make_synthetic_dataset").make_dataset(
            out, None, seed, num_samples=num_samples, frame_size=frame_size, audio=False, progress=False
        )

    return cached_build(f"data-{num_samples}x{frame_size}px-seed{seed}", key, build)


def write_tone_wavs(jsonl: Path, audio_dir: Path, seconds: float = 3.0, rate: int = 16000) -> int:
    """A ``seconds``-long 16 kHz mono PCM_16 WAV (tone + noise) at ``audio_dir/{video_id}/{id}.wav`` per line."""
    import numpy as np
    import soundfile as sf

    written = 0
    t = np.arange(int(seconds * rate), dtype=np.float32) / rate
    for index, line in enumerate(jsonl.read_text().splitlines()):
        if not line.strip():
            continue
        rec = json.loads(line)
        path = audio_dir / rec["video_id"] / f"{rec['id']}.wav"
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(index)
        wave = 0.3 * np.sin(2 * np.pi * (180 + 20 * (index % 10)) * t) + 0.05 * rng.standard_normal(t.size)
        sf.write(str(path), wave.astype(np.float32), rate, subtype="PCM_16")
        written += 1
    return written


def subset_jsonl(src: Path, n: int, dst: Path) -> Path:
    """The first ``n`` lines of ``src`` written to ``dst`` (raises if ``src`` has fewer)."""
    lines = [ln for ln in src.read_text().splitlines() if ln.strip()]
    if len(lines) < n:
        raise ValueError(f"{src} has {len(lines)} lines, {n} wanted")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(f"{ln}\n" for ln in lines[:n]))
    return dst


# --------------------------------------------------------------------------------------------------- memory
class TimedCollator:
    """Delegates to the collator and adds up the seconds spent in it (``mode`` passes through)."""

    def __init__(self, collator) -> None:
        self.collator = collator
        self.mode = collator.mode
        self.seconds = 0.0

    def __call__(self, items):
        start = time.perf_counter()
        batch = self.collator(items)
        self.seconds += time.perf_counter() - start
        return batch


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (``ru_maxrss``: KiB on Linux) in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float:
    """Current resident set size in MiB (/proc/self/status VmRSS; ru_maxrss where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


# --------------------------------------------------------------------------------------------- subprocesses
def emit_result(result: dict) -> None:
    """Child side: print the result as one marked JSON line on stdout."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_children(jobs: Sequence[tuple[Path, Sequence[str]]], parallel: int = 2, timeout: float = 900) -> list[dict]:
    """Run each ``python script args`` in a fresh process, ``parallel`` at a time; return what each passed to
    :func:`emit_result`, in order. Peak RSS (``ru_maxrss``) is per process, so running side by side keeps the
    peaks comparable; wall-clock numbers from children that ran side by side are for information only."""
    pending = list(enumerate(jobs))
    running: list[tuple[int, list[str], subprocess.Popen, float, Path]] = []
    results: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="surgvqa-bench-children-") as tmp:
        while pending or running:
            while pending and len(running) < max(1, parallel):
                index, (script, args) = pending.pop(0)
                cmd = [sys.executable, str(script), *args]
                out = Path(tmp) / f"{index}.log"
                handle = out.open("w")
                proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, text=True, cwd=REPO)
                handle.close()
                running.append((index, cmd, proc, time.perf_counter(), out))
            time.sleep(0.2)
            for entry in list(running):
                index, cmd, proc, start, out = entry
                if proc.poll() is None:
                    if time.perf_counter() - start > timeout:
                        proc.kill()
                        proc.wait()
                    else:
                        continue
                running.remove(entry)
                text = out.read_text()
                found = [ln[len(RESULT_PREFIX):] for ln in text.splitlines() if ln.startswith(RESULT_PREFIX)]
                if proc.returncode != 0 or not found:
                    for other in running:
                        other[2].kill()
                    tail = "\n".join(text.splitlines()[-40:])
                    raise RuntimeError(f"child {' '.join(cmd)} failed (exit {proc.returncode}):\n{tail}")
                result = json.loads(found[-1])
                result.setdefault("wall_s", round(time.perf_counter() - start, 2))
                results[index] = result
    return [results[i] for i in range(len(jobs))]


def run_child(script: Path, args: Sequence[str], timeout: float = 900) -> dict:
    """Run ``python script args`` in a fresh process and return the dict it passed to :func:`emit_result`."""
    return run_children([(script, args)], parallel=1, timeout=timeout)[0]


# --------------------------------------------------------------------------------------------------- output
def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None) -> None:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if title:
        print(f"\n{title}")
    line = "  ".join("-" * w for w in widths)
    print("  ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)))
    print(line)
    for row in cells[1:]:
        print("  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(row, widths, strict=True)))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def _numeric(text: str) -> bool:
    try:
        float(text.replace(",", "").rstrip("x%"))
    except ValueError:
        return False
    return True


def goal_line(name: str, value: float, goal: float, higher_is_better: bool) -> bool:
    """Print ``name: value (goal >= / <= goal): MET / MISSED`` and return whether it is met."""
    met = value >= goal if higher_is_better else value <= goal
    op = ">=" if higher_is_better else "<="
    print(f"{name}: {value:.3f} (goal {op} {goal:g}) -> {'MET' if met else 'MISSED'}")
    return met


def add_threads_arg(parser) -> None:
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (default 1: OpenMP threads on a busy 2-core machine make timings erratic; "
        "DataLoader workers also run with 1); 0 keeps torch's default",
    )


def set_threads(threads: int) -> None:
    """``torch.set_num_threads(threads)`` unless ``threads`` is 0 (torch's default: one per core)."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def environment_line(threads: int | None = None) -> str:
    """Python, torch, intra-op threads, CPUs and load average (the machine may be shared: read ratios, not times).

    ``threads``: the ``--threads`` the child processes got, for a parent that does not import torch itself.
    """
    import platform
    from importlib.metadata import version

    torch = sys.modules.get("torch")
    if threads is not None:
        threads_text = f"--threads {threads} in the child processes"
    elif torch is not None:
        threads_text = f"{torch.get_num_threads()} intra-op thread(s)"
    else:
        threads_text = "torch not imported"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (
        f"python {platform.python_version()}, torch {version('torch')} ({threads_text}), {os.cpu_count()} CPU(s), "
        f"{platform.machine()}, load average {load}"
    )


if __name__ == "__main__":
    print("benchmarks/_common.py holds shared helpers; run benchmarks/data_throughput.py, eval_memory.py or "
          "eval_throughput.py")
