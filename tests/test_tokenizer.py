"""Pad/eos repair: reuse a spare special token when there is one, add <|pad|> (and rows) only when there is none."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, load_script

from surgvqa.tokenizer import (
    NEW_PAD_TOKEN,
    inspect_tokenizer,
    main,
    plan_repair,
    repair_tokenizer,
    spare_special_token,
    verify,
)

FRAME = 56
TRAIN_IDS = ("qa_000002", "qa_000006", "qa_000009")


def _with_pad_equal_eos(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    config_file = target / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["pad_token"] = config["eos_token"]
    config_file.write_text(json.dumps(config, indent=2))
    return target


def _load(path):
    from transformers import AutoProcessor, Qwen2_5OmniThinkerForConditionalGeneration

    return (Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(path).eval(),
            AutoProcessor.from_pretrained(path))


# ---------------------------------------------------------------------------------------- real Qwen vocabulary
def test_qwen_vocab_pad_equal_eos_reuses_endoftext(qwen_vocab_model_dir, tmp_path):
    broken = _with_pad_equal_eos(qwen_vocab_model_dir, tmp_path / "broken")
    model, processor = _load(broken)
    tok = processor.tokenizer
    assert tok.pad_token_id == tok.eos_token_id == 151645
    assert not inspect_tokenizer(tok).ok
    rows = model.get_input_embeddings().weight.detach().clone()
    head_rows = model.get_output_embeddings().weight.shape[0]
    vocab_before = len(tok)

    report = repair_tokenizer(tok, model)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 151643)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 151645)
    assert report.ok and not report.added_pad and report.resized_embeddings_to is None
    assert any("<|endoftext|>" in a for a in report.actions)
    assert len(tok) == vocab_before
    assert torch.equal(model.get_input_embeddings().weight, rows)  # no resize, no new rows
    assert model.get_output_embeddings().weight.shape[0] == head_rows
    assert model.generation_config.pad_token_id == 151643
    assert 151645 in model.generation_config.eos_token_id
    assert model.config.pad_token_id == 151643


# ------------------------------------------------------------------------------------ no spare special token
def _build_no_spare_model(out: Path) -> Path:
    """A tiny thinker whose tokenizer has only the specials the template emits, pad == eos, and exactly
    len(tokenizer) embedding rows: the repair must add <|pad|> and grow the embeddings."""
    from transformers import GenerationConfig, Qwen2_5OmniThinkerForConditionalGeneration, Qwen2Tokenizer

    make = load_script("make_tiny_model")
    vocab, merges = make._train_tiny_bpe(1024)
    vocab = dict(vocab)
    specials = ["<|im_start|>", "<|im_end|>", *make.MODEL_SPECIFIC_TOKENS.values()]
    for token in specials:
        vocab[token] = len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|im_end|>",
        extra_special_tokens=dict(make.MODEL_SPECIFIC_TOKENS), clean_up_tokenization_spaces=False,
    )
    tok.add_special_tokens({"extra_special_tokens": ["<|im_start|>"]}, replace_extra_special_tokens=False)
    assert len(tok) == len(vocab) and set(tok.all_special_tokens) == set(specials)
    processor = make.build_processor(tok, frame_size=FRAME)
    config = make.build_config(tok, text_hidden=64)
    config.text_config.vocab_size = len(tok)  # no spare rows either
    config.pad_token_id = config.text_config.pad_token_id = tok.pad_token_id
    torch.manual_seed(0)
    model = Qwen2_5OmniThinkerForConditionalGeneration(config)
    torch.nn.init.normal_(model.lm_head.weight, std=64**-0.5)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def no_spare_dir(tmp_path_factory) -> Path:
    return _build_no_spare_model(tmp_path_factory.mktemp("no-spare"))


def test_no_spare_token_adds_pad_and_resizes(no_spare_dir):
    model, processor = _load(no_spare_dir)
    tok = processor.tokenizer
    n = len(tok)
    assert model.get_input_embeddings().num_embeddings == n
    assert spare_special_token(tok) is None
    assert any(NEW_PAD_TOKEN in a for a in plan_repair(tok))
    old = model.get_input_embeddings().weight.detach().clone()

    report = repair_tokenizer(tok, model)
    assert report.added_pad and report.ok
    assert (tok.pad_token, tok.pad_token_id) == (NEW_PAD_TOKEN, n)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id != tok.eos_token_id
    assert report.resized_embeddings_to == n + 1
    assert model.get_input_embeddings().num_embeddings == n + 1
    assert model.get_output_embeddings().weight.shape[0] == n + 1
    assert torch.equal(model.get_input_embeddings().weight[:n], old)  # old rows untouched
    assert model.generation_config.pad_token_id == n


def _train(model_dir: Path, data: Path, frames: Path, out: Path):
    from surgvqa.train import parse_args, train

    args = parse_args([
        "--model_name_or_path", str(model_dir), "--train_data_path", str(data), "--frames_dir", str(frames),
        "--frame_size", str(FRAME), "--max_train_frames", "2", "--output_dir", str(out),
        "--per_device_train_batch_size", "3", "--learning_rate", "1e-2", "--max_steps", "4",
        "--lora_dropout", "0", "--save_strategy", "no", "--use_cpu", "True", "--seed", "0",
        "--disable_tqdm", "True", "--logging_steps", "100",
    ])
    return train(*args)["trainer"]


def test_added_pad_survives_training_and_reload(no_spare_dir, test_set, tmp_path):
    from surgvqa.checkpoint import NEW_ROWS_NAME, load_for_inference
    from surgvqa.collate import VQACollator
    from surgvqa.data import MediaConfig, SurgicalVQADataset, load_samples
    from surgvqa.generate import generate_predictions
    from surgvqa.run_config import RunConfig

    data = tmp_path / "train.jsonl"
    lines = (test_set / "in_002-001.jsonl").read_text().splitlines()
    data.write_text("\n".join(line for line in lines if json.loads(line)["id"] in TRAIN_IDS) + "\n")
    out = tmp_path / "adapter"
    trainer = _train(no_spare_dir, data, test_set / "frames", out)
    trained = trainer.model.eval()
    tok_trained = trainer.processing_class.tokenizer
    n = json.loads((no_spare_dir / "config.json").read_text())["text_config"]["vocab_size"]
    assert tok_trained.pad_token == NEW_PAD_TOKEN

    config = RunConfig.read(out)
    assert config.resized_vocab == n + 1 and config.original_vocab_rows == n
    assert (out / NEW_ROWS_NAME).is_file()

    reloaded, processor, _, _ = load_for_inference(out)
    tok = processor.tokenizer
    assert (tok.pad_token, tok.pad_token_id) == (NEW_PAD_TOKEN, n)
    assert reloaded.get_input_embeddings().num_embeddings == n + 1
    torch.testing.assert_close(reloaded.get_input_embeddings().weight, trained.get_input_embeddings().weight,
                               atol=0, rtol=0)
    torch.testing.assert_close(reloaded.get_output_embeddings().weight, trained.get_output_embeddings().weight,
                               atol=0, rtol=0)

    media = MediaConfig(frames_dir=str(test_set / "frames"), frame_size=FRAME, max_frames=2)
    samples, _ = load_samples(data, media)
    dataset = SurgicalVQADataset(samples, media)
    collator = VQACollator(processor, frame_size=FRAME, mode="generate")
    batch = collator([dataset[i] for i in range(len(dataset))])
    assert (batch["input_ids"] == n).any()  # left padding uses the new <|pad|> row
    inputs = {k: v for k, v in batch.items() if k != "keys"}
    with torch.no_grad():
        a, b = trained(**inputs).logits, reloaded(**inputs).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-5)
    base, _, _, _ = load_for_inference(no_spare_dir)
    with torch.no_grad():
        assert not torch.allclose(base(**inputs).logits[real], b[real], atol=1e-3)  # the adapter does something

    ours = list(generate_predictions(reloaded, tok, dataset, collator, batch_size=3, max_new_tokens=12))
    theirs = list(generate_predictions(trained, tok_trained, dataset, collator, batch_size=3, max_new_tokens=12))
    assert [(p.key, p.text, p.new_tokens, p.stopped_by_eos) for p in ours] == [
        (p.key, p.text, p.new_tokens, p.stopped_by_eos) for p in theirs
    ]


# ------------------------------------------------------------------------------------------------ verify CLI
def test_verify_exit_codes(tiny_model_dir, no_spare_dir, tmp_path, capsys):
    assert main(["verify", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "<|endoftext|>" in out and "<|im_end|>" in out and "stops at end of turn" in out

    broken = _with_pad_equal_eos(tiny_model_dir, tmp_path / "broken")
    assert main(["verify", str(broken)]) == 1
    out = capsys.readouterr().out
    assert "pad token == eos token" in out and "NOT OK" in out
    assert "training would apply: set pad to the existing unused special token '<|endoftext|>'" in out

    code, text = verify(no_spare_dir)
    assert code == 1 and f"add {NEW_PAD_TOKEN!r} as pad" in text

    # a wrong call (exit 2, one "error:" line), not a bad tokenizer (exit 1)
    assert main(["verify", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / "missing") in err and len(err.splitlines()) == 1
    (tmp_path / "empty").mkdir()
    assert main(["verify", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot load a tokenizer from {tmp_path / 'empty'}") and len(err.splitlines()) == 1


def test_verify_command_line(tiny_model_dir, tmp_path):
    """``python -m surgvqa.tokenizer verify`` exits 1 and names the repair, run directly or (when the repo has it)
    through ``bash verify_tokenizer.sh`` (which execs the same module): one subprocess either way."""
    broken = _with_pad_equal_eos(tiny_model_dir, tmp_path / "broken")
    script = REPO / "verify_tokenizer.sh"
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": sys.executable,
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if script.is_file() and shutil.which("bash"):
        command = ["bash", str(script), str(broken)]
        usage = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=REPO, env=env, timeout=30)
        assert usage.returncode == 2 and "usage" in usage.stderr and usage.stderr.startswith("error: ")
    else:
        command = [sys.executable, "-m", "surgvqa.tokenizer", "verify", str(broken)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "pad token == eos token" in result.stdout
    assert "training would apply: set pad to the existing unused special token '<|endoftext|>'" in result.stdout
