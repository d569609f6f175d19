"""Loss on labelled positions only: same loss and same LoRA gradients as full logits; generation untouched."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import lora_test_model

from surgvqa.backbones.common.labelled_logits import labelled_loss, next_token_selection
from surgvqa.collate import IGNORE_INDEX, VQACollator
from surgvqa.data import Sample

ANSWERS = ["Yes, the scope is advancing.", "The lesion appears in the upper-left quadrant.", "No.", "A catheter."]


def _batch(processor, n: int = 4, modality: str = "text+audio") -> dict:
    items = []
    for i in range(n):
        rng = np.random.default_rng(i)
        frames = [rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in range(4)]
        audio = (0.1 * rng.standard_normal(16000 + 4000 * i)).astype(np.float32)
        sample = Sample(video_id="002-001", id=f"qa_{i}", question=f"Question number {i}?" + " really" * i,
                        answer=ANSWERS[i % len(ANSWERS)], source=f"mem:{i}")
        items.append({"sample": sample, "frames": frames, "audio": audio})
    return VQACollator(processor, question_modality=modality, frame_size=56, mode="train")(items)


def _loss_and_grads(model, batch, labelled: bool = False, num_items=None):
    model.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if not labelled:
        kwargs = {"num_items_in_batch": num_items} if num_items is not None else {}
        loss = model(**inputs, labels=batch["labels"], **kwargs).loss
    else:
        outputs = model(**inputs, logits_mask=next_token_selection(batch["labels"]))
        assert outputs.logits.dim() == 2
        assert outputs.logits.shape[0] == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        loss = labelled_loss(outputs, batch["labels"], num_items_in_batch=num_items)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _processor(model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir)


def _assert_same(full, labelled):
    (loss_a, grads_a), (loss_b, grads_b) = full, labelled
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and any("lora_A" in n for n in grads_a)
    for name in grads_a:
        assert grads_a[name].abs().sum() > 0, f"{name}: zero gradient, the comparison would prove nothing"
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("num_items", [None, 37])
def test_same_loss_and_lora_gradients_as_full_logits(tiny_model_dir, num_items):
    processor = _processor(tiny_model_dir)
    batch = _batch(processor)
    model = lora_test_model(tiny_model_dir)
    n = torch.tensor(num_items) if num_items is not None else None
    _assert_same(_loss_and_grads(model, batch, num_items=n), _loss_and_grads(model, batch, True, num_items=n))


def test_same_under_gradient_checkpointing_and_qwen_vocabulary(qwen_vocab_model_dir):
    processor = _processor(qwen_vocab_model_dir)
    batch = _batch(processor, n=3, modality="text")
    model = lora_test_model(qwen_vocab_model_dir, gradient_checkpointing=True)
    assert model.get_output_embeddings().out_features > 150_000
    _assert_same(_loss_and_grads(model, batch), _loss_and_grads(model, batch, True))


def test_generation_sees_full_logits_and_a_wrong_mask_is_an_error(tiny_model_dir):
    processor = _processor(tiny_model_dir)
    batch = _batch(processor, n=2)
    model = lora_test_model(tiny_model_dir)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        labelled = model(**inputs, logits_mask=next_token_selection(batch["labels"])).logits
        full = model(**inputs).logits  # no mask: every position, as generation needs
        assert full.shape[:2] == batch["input_ids"].shape
        torch.testing.assert_close(labelled, full[next_token_selection(batch["labels"])])
        with pytest.raises(RuntimeError, match="does not fit the hidden states"):
            model(**inputs, logits_mask=next_token_selection(batch["labels"])[:, 1:])


def test_selection_is_the_causal_shift():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6, IGNORE_INDEX], [IGNORE_INDEX, 7, 8, 9, 10]])
    assert next_token_selection(labels).tolist() == [
        [False, True, True, False, False],
        [True, True, True, True, False],
    ]


def test_training_logs_the_same_losses_either_way(tiny_model_dir, test_set, tmp_path):
    """Three Trainer steps (gradient accumulation 2) log the same losses and gradient norms either way."""
    from surgvqa.train import parse_args, train

    def run(out, labelled: str) -> list[tuple[float, float]]:
        result = train(*parse_args([
            "--model_name_or_path", str(tiny_model_dir), "--train_data_path", str(test_set / "in_002-001.jsonl"),
            "--frames_dir", str(test_set / "frames"), "--frame_size", "56", "--output_dir", str(out),
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--learning_rate", "3e-3",
            "--max_steps", "3", "--logging_steps", "1", "--save_strategy", "no", "--use_cpu", "True", "--seed", "0",
            "--data_seed", "0", "--disable_tqdm", "True", "--frame_cache", "none", "--lora_dropout", "0",
            "--loss_on_labelled_only", labelled,
        ]))
        assert result["trainer"].labelled_only == (labelled == "True")
        logged = [(h["loss"], h["grad_norm"]) for h in result["trainer"].state.log_history if "loss" in h]
        assert len(logged) == 3 and all(loss > 0 for loss, _ in logged)
        return logged

    full = run(tmp_path / "full", "False")
    labelled = run(tmp_path / "labelled", "True")
    assert np.allclose(labelled, full, rtol=1e-4, atol=0), (labelled, full)


@pytest.mark.slow
def test_ddp_two_processes_same_losses_and_one_shared_frame_cache(tiny_model_dir, test_set, tmp_path):
    """Two CPU processes (gloo) with labelled-only logits log the losses of full logits; both ranks decode into one
    disk frame cache, whose entries are whole .npy files."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    shared = tmp_path / "frames-cache"

    def run(name: str, labelled: str, port: int) -> list[float]:
        out = tmp_path / name
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
             str(repo / "train_vqa.py"), "--model_name_or_path", str(tiny_model_dir),
             "--train_data_path", str(test_set / "in_002-001.jsonl"), "--frames_dir", str(test_set / "frames"),
             "--frame_size", "56", "--output_dir", str(out), "--per_device_train_batch_size", "2",
             "--learning_rate", "3e-3", "--max_steps", "3", "--logging_steps", "1", "--save_strategy", "no",
             "--use_cpu", "True", "--seed", "0", "--data_seed", "0", "--disable_tqdm", "True", "--lora_dropout", "0",
             "--ddp_backend", "gloo", "--frame_cache_dir", str(shared), "--loss_on_labelled_only", labelled],
            env=env, capture_output=True, text=True, timeout=900,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        state = json.loads((out / "trainer_state.json").read_text())
        return [entry["loss"] for entry in state["log_history"] if "loss" in entry]

    full = run("full", "False", 29541)
    labelled = run("labelled", "True", 29542)
    assert len(full) == 3 and np.allclose(labelled, full, rtol=1e-4, atol=0), (labelled, full)
    entries = sorted(shared.rglob("*.npy"))
    assert entries and not list(shared.rglob("*.tmp"))
    assert all(np.load(entry).dtype == np.uint8 for entry in entries)
