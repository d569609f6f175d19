"""Greedy generation: new-token extraction, decoding, batch-size invariance (left padding), memorised answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import MEMORISED_MARGIN, answer_margins

from surgvqa.collate import VQACollator
from surgvqa.data import MediaConfig, SurgicalVQADataset, load_samples
from surgvqa.generate import decode_new_tokens, eos_token_ids, generate_predictions, new_token_ids

FRAME = 56
#: three training samples whose questions differ, so the answer is a function of the question text
MEMORISE_IDS = ("qa_000002", "qa_000006", "qa_000009")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# ------------------------------------------------------------------------------------------------ unit tests
def test_new_token_ids_both_conventions():
    prompt = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    new = torch.tensor([[9, 8, 2], [7, 2, 0]])
    full = torch.cat([prompt, new], dim=1)
    assert torch.equal(new_token_ids(full, prompt), new)  # decoder-only generate: prompt + new
    assert torch.equal(new_token_ids(new, prompt), new)  # inputs_embeds generate: new only
    assert torch.equal(new_token_ids(new, None), new)
    assert torch.equal(new_token_ids(prompt, prompt), prompt[:, :0])  # nothing generated
    # new-only output that is longer than the prompt but does not start with it stays whole
    long_new = torch.arange(12).reshape(2, 6)
    assert torch.equal(new_token_ids(long_new, prompt), long_new)


def test_decode_new_tokens(tokenizer):
    tok = tokenizer
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id
    assert pad != eos
    words = tok("Yes, the scope is advancing.", add_special_tokens=False)["input_ids"]
    other = tok("No.", add_special_tokens=False)["input_ids"]
    rows = [
        words + [eos] + [pad] * 3,  # stopped, padded after another row finished
        other + [eos, *words],  # stopped: everything after <|im_end|> is ignored
        words + [pad] * 4,  # not stopped (ran out of tokens), trailing pads are not text
        other + [pad] + other + [pad],  # a pad inside the text
    ]
    width = max(len(r) for r in rows)
    rows = [r + [pad] * (width - len(r)) for r in rows]
    results = decode_new_tokens(torch.tensor(rows), tok, [eos])
    assert results[0] == ("Yes, the scope is advancing.", True, len(words) + 1)
    assert results[1] == ("No.", True, len(other) + 1)
    assert results[2] == ("Yes, the scope is advancing.", False, len(words))
    assert results[3][1:] == (False, 2 * len(other) + 1)
    assert results[3][0].replace(" ", "") == "No.No."
    # several stop ids (eos list from a generation config)
    assert decode_new_tokens(torch.tensor([other + [pad, pad]]), tok, [eos, pad]) == [("No.", True, len(other) + 1)]


# ------------------------------------------------------------------------------------------ trained adapters
def _dataset(test_set: Path, data: Path, max_frames: int | None = None, n: int | None = None):
    media = MediaConfig(frames_dir=str(test_set / "frames"), frame_size=FRAME, max_frames=max_frames)
    samples, _ = load_samples(data, media)
    return SurgicalVQADataset(samples[:n] if n else samples, media)


def test_batch_size_does_not_change_predictions(memorised_model):
    """Left padding changes nothing: the same text (the answers are memorised with a margin, so no near tie can
    flip a token) and, step by step, the same scores."""
    model, processor, _, dataset = memorised_model
    tok = processor.tokenizer
    collator = VQACollator(processor, frame_size=FRAME, mode="generate")

    one = list(generate_predictions(model, tok, dataset, collator, batch_size=1, max_new_tokens=24))
    three = list(generate_predictions(model, tok, dataset, collator, batch_size=3, max_new_tokens=24))
    assert [p.key for p in one] == [p.key for p in three] == [s.key for s in dataset.samples]
    assert [(p.text, p.stopped_by_eos, p.new_tokens) for p in one] == [
        (p.text, p.stopped_by_eos, p.new_tokens) for p in three
    ]
    assert all(p.text for p in one)

    # and not only the argmax: the scores of every step agree, row by row, whatever the left padding
    batch = collator([dataset[i] for i in range(len(dataset))])
    batch.pop("keys")
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # rows of different lengths: padded
    eos = eos_token_ids(model, tok)

    def run(inputs):
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=eos,
                                  pad_token_id=tok.pad_token_id, output_scores=True, return_dict_in_generate=True)

    together = run(batch)
    for row in range(len(dataset)):
        single = collator([dataset[row]])
        single.pop("keys")
        alone = run(single)
        steps = min(len(alone.scores), len(together.scores))
        for step in range(steps):
            torch.testing.assert_close(alone.scores[step][0], together.scores[step][row], atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def memorised_adapter(tmp_path_factory, tiny_model_dir, test_set) -> tuple[Path, Path]:
    """Three samples (2 frames each) trained until every answer token leads by a wide logit margin.

    The questions differ, so the answers follow from the text. 100 steps at lr 5e-3 leave every gold token about
    10 logits ahead of the next one (training loss ~2e-5); 30 steps at 1e-2 left some a fraction of a logit ahead
    (loss 0.08), and a CPU with other float rounding (AMD, ``ATEN_CPU_CAPABILITY=avx512``) decoded
    "primarimarimarily". ~10 s on one core.
    """
    from surgvqa.train import main as train_main

    work = tmp_path_factory.mktemp("memorised")
    data = work / "train.jsonl"
    lines = (test_set / "in_002-001.jsonl").read_text().splitlines()
    data.write_text("\n".join(line for line in lines if json.loads(line)["id"] in MEMORISE_IDS) + "\n")
    out = work / "adapter"
    code = train_main([
        "--model_name_or_path", str(tiny_model_dir), "--train_data_path", str(data),
        "--frames_dir", str(test_set / "frames"), "--frame_size", str(FRAME), "--max_train_frames", "2",
        "--output_dir", str(out), "--per_device_train_batch_size", "3", "--learning_rate", "5e-3",
        "--max_steps", "100", "--lora_dropout", "0", "--save_strategy", "no",
        "--logging_steps", "10", "--use_cpu", "True", "--seed", "0", "--disable_tqdm", "True",
    ])
    assert code == 0
    return out, data


@pytest.fixture(scope="module")
def memorised_model(memorised_adapter, test_set):
    from surgvqa.checkpoint import load_for_inference

    adapter, data = memorised_adapter
    model, processor, _, config = load_for_inference(adapter)
    dataset = _dataset(test_set, data, max_frames=config.preprocessing.max_eval_frames)
    return model, processor, config, dataset


def test_memorised_answers_lead_by_a_clear_margin(memorised_model):
    """The precondition of every greedy-text assertion below: no answer token is a near tie."""
    model, processor, _, dataset = memorised_model
    margins = answer_margins(model, processor, [dataset[i] for i in range(len(dataset))], FRAME)
    assert len(margins) == len(MEMORISE_IDS)
    assert min(margins.values()) >= MEMORISED_MARGIN, margins


def test_greedy_generation_reproduces_training_answers(memorised_adapter, memorised_model):
    adapter, _ = memorised_adapter
    model, processor, config, dataset = memorised_model
    losses = json.loads((adapter / "train_results.json").read_text())
    assert losses["train_loss"] > 0
    assert config.preprocessing.max_train_frames == 2
    collator = VQACollator(processor, frame_size=FRAME, mode="generate")
    predictions = list(generate_predictions(model, processor.tokenizer, dataset, collator, batch_size=3,
                                            max_new_tokens=32))
    by_key = {s.key: s for s in dataset.samples}
    assert len(predictions) == len(MEMORISE_IDS)
    for prediction in predictions:
        sample = by_key[prediction.key]
        assert prediction.stopped_by_eos, prediction
        assert sample.short_answer.lower() in prediction.text.lower()
        assert prediction.text == sample.answer
        answer_tokens = len(processor.tokenizer(sample.answer, add_special_tokens=False)["input_ids"])
        assert prediction.new_tokens == answer_tokens + 1  # the answer and <|im_end|>, nothing after it
