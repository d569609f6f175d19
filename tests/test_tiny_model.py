"""The tiny random Qwen2.5-Omni thinker: real classes, reloadable, deterministic, placeholder counts pinned."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import load_script

from surgvqa.collate import VQACollator
from surgvqa.data import Sample

NUM_FRAMES, FRAME = 8, 56
AUDIO_SECONDS, SR = 3, 16000
#: 8 frames of 56 px: temporal 8/2 = 4, spatial 56/14 = 4 x 4 patches, merged 2x2 -> 4 * 4 * 4 / 4 = 16
VIDEO_TOKENS = 16
#: 3 s at 16 kHz -> 300 mel frames -> conv stride 2 -> 150 -> pooling 2 -> 75
AUDIO_TOKENS = 75
#: LoRA steps and learning rate that memorise test_set/in_002-001.jsonl on the --vocab qwen tiny model
QWEN_VOCAB_STEPS, QWEN_VOCAB_LR = "150", "5e-3"


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    frames = [rng.integers(0, 256, (FRAME, FRAME, 3), dtype=np.uint8) for _ in range(NUM_FRAMES)]
    audio = (0.1 * rng.standard_normal(AUDIO_SECONDS * SR)).astype(np.float32)
    sample = Sample(video_id="002-001", id="qa_1", question="Is the scope advancing?", answer="Yes, it is.")
    return {"sample": sample, "frames": frames, "audio": audio}


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from transformers import AutoProcessor, Qwen2_5OmniThinkerForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    return model, processor


def test_reload_forward_generate_and_placeholder_counts(loaded):
    from transformers import Qwen2_5OmniProcessor, Qwen2_5OmniThinkerForConditionalGeneration

    model, processor = loaded
    assert isinstance(model, Qwen2_5OmniThinkerForConditionalGeneration)
    assert isinstance(processor, Qwen2_5OmniProcessor)
    tok = processor.tokenizer
    item = _inputs()

    batch = VQACollator(processor, question_modality="text+audio", frame_size=FRAME)([item])
    ids = batch["input_ids"][0]
    assert int((ids == tok.convert_tokens_to_ids("<|VIDEO|>")).sum()) == VIDEO_TOKENS
    assert int((ids == tok.convert_tokens_to_ids("<|AUDIO|>")).sum()) == AUDIO_TOKENS
    assert batch["video_grid_thw"].tolist() == [[4, 4, 4]]
    assert batch["pixel_values_videos"].shape == (4 * 4 * 4, 3 * 2 * 14 * 14)
    assert batch["input_features"].shape == (1, 128, AUDIO_SECONDS * 100)

    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (1, ids.shape[0], model.config.text_config.vocab_size)
    assert torch.isfinite(out.loss) and out.loss.item() > 1.0  # untrained: nowhere near the answer

    gen = VQACollator(processor, question_modality="text+audio", frame_size=FRAME, mode="generate")([item])
    assert gen.pop("keys") == [("002-001", "qa_1")]
    with torch.no_grad():
        output = model.generate(**gen, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert output.shape == (1, gen["input_ids"].shape[1] + 5)
    assert torch.equal(output[:, : gen["input_ids"].shape[1]], gen["input_ids"])


def test_processor_default_would_upscale_and_collator_does_not(loaded):
    """Qwen2_5OmniProcessor.videos_kwargs (a class attribute) overrides the saved video processor size: without an
    explicit pixel budget 56 px frames are upscaled to >= 128 * 28 * 28 pixels."""
    _, processor = loaded
    tok = processor.tokenizer
    collator = VQACollator(processor, question_modality="text", frame_size=FRAME)
    item = _inputs()
    text = collator.prompt_text(item["sample"].question, NUM_FRAMES)

    naive = processor(text=[text], videos=[item["frames"]], return_tensors="pt")
    naive_tokens = int((naive["input_ids"][0] == tok.convert_tokens_to_ids("<|VIDEO|>")).sum())
    t, h, w = naive["video_grid_thw"][0].tolist()
    assert h * w * 14 * 14 >= 128 * 28 * 28  # the class-level shortest_edge
    assert naive_tokens >= 20 * VIDEO_TOKENS

    ours = collator([item])
    assert int((ours["input_ids"][0] == tok.convert_tokens_to_ids("<|VIDEO|>")).sum()) == VIDEO_TOKENS
    assert ours["video_grid_thw"].tolist() == [[t, 4, 4]]


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_deterministic_for_a_seed_and_small(tiny_model_dir, tmp_path):
    make = load_script("make_tiny_model")
    again = make.build_tiny_model(tmp_path / "again", seed=0, vocab="tiny")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert _digest(again / name) == _digest(tiny_model_dir / name), name
    total = sum(f.stat().st_size for f in tiny_model_dir.iterdir())
    assert total < 5e6, f"tiny model is {total / 1e6:.1f} MB"

    # another seed gives other weights but the very same tokenizer and config
    from safetensors.torch import load_file

    make.build_tiny_model(tmp_path / "seed1", seed=1, vocab="tiny")
    a, b = load_file(str(tiny_model_dir / "model.safetensors")), load_file(str(tmp_path / "seed1/model.safetensors"))
    assert a.keys() == b.keys()
    assert not torch.equal(a["lm_head.weight"], b["lm_head.weight"])
    assert _digest(tmp_path / "seed1/tokenizer.json") == _digest(tiny_model_dir / "tokenizer.json")


def test_qwen_vocab_special_token_ids(qwen_vocab_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen_vocab_model_dir)
    expected = {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<|AUDIO|>": 151646,
        "<|vision_bos|>": 151652,
        "<|IMAGE|>": 151655,
        "<|VIDEO|>": 151656,
    }
    assert {t: tok.convert_tokens_to_ids(t) for t in expected} == expected
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 151643)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 151645)
    assert tok("Is the scope advancing?")["input_ids"] == [3872, 279, 6891, 43069, 30]  # the real Qwen BPE

    config = AutoConfig.from_pretrained(qwen_vocab_model_dir)
    assert config.audio_token_index == 151646
    assert config.video_token_index == 151656
    assert config.image_token_index == 151655
    assert config.vision_start_token_id == 151652
    assert config.pad_token_id == 151643 and config.eos_token_id == 151645
    assert config.text_config.vocab_size >= len(tok)
    generation = json.loads((qwen_vocab_model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 151645 and generation["pad_token_id"] == 151643


@pytest.mark.slow
def test_qwen_vocab_model_learns_its_training_answers(qwen_vocab_model_dir, test_set, tmp_path):
    """The fixture closest to a real checkpoint (real ids, real special tokens, 151,680-row embedding) can be
    fine-tuned: LoRA on the 50 samples of test_set/in_002-001.jsonl, then greedy answers to the same samples score
    at least 15 points above the majority baseline (strict accuracy) and every one stops at <|im_end|>.
    About a CPU-minute of training."""
    from surgvqa.evaluate import main as evaluate_main
    from surgvqa.train import main as train_main

    data, frames = test_set / "in_002-001.jsonl", test_set / "frames"
    adapter = tmp_path / "adapter"
    assert train_main([
        "--model_name_or_path", str(qwen_vocab_model_dir), "--train_data_path", str(data), "--frames_dir", str(frames),
        "--frame_size", str(FRAME), "--output_dir", str(adapter), "--per_device_train_batch_size", "5",
        "--learning_rate", QWEN_VOCAB_LR, "--max_steps", QWEN_VOCAB_STEPS, "--lora_dropout", "0",
        "--save_strategy", "no", "--logging_steps", "10", "--use_cpu", "True", "--seed", "0", "--disable_tqdm", "True",
    ]) == 0
    out = tmp_path / "train_answers.jsonl"
    assert evaluate_main(["--checkpoint_path", str(adapter), "--eval_data_path", str(data), "--frames_dir",
                          str(frames), "--output_file", str(out), "--batch_size", "10", "--max_new_tokens", "24",
                          "--device", "cpu"]) == 0
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["n"] == 50 and summary["no_eos"] == 0
    assert summary["accuracy"] >= summary["majority_baseline"] + 0.15, (summary["accuracy"], summary["majority_baseline"])
