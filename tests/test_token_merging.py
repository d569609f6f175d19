"""Video token merging (``--token_kept_ratio``): the merge itself, placeholders, M-RoPE positions, the no-op at 1.0,
training, batched generation, evaluation and merging of an adapter trained with it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from surgvqa.backbones import get_backbone
from surgvqa.backbones.common.token_merging import (
    bipartite_merge,
    kept_video_tokens,
    merge_placeholders,
    merge_videos,
    merged_position_ids,
)
from surgvqa.collate import IGNORE_INDEX, VQACollator
from surgvqa.data import MediaConfig, SurgicalVQADataset, load_samples
from surgvqa.generate import eos_token_ids, generate_predictions, new_token_ids

FRAME = 56  # 8 frames of 56 px: a 4 x 2 x 2 grid, 16 video tokens per sample
#: four training samples whose questions differ (the answer is a function of the question text)
MEMORISE_IDS = ("qa_000002", "qa_000004", "qa_000006", "qa_000009")
OMNI = "qwen2_5_omni"


def _inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "keys"}


def _video_id(processor) -> int:
    return processor.tokenizer.convert_tokens_to_ids(processor.video_token)


# ---------------------------------------------------------------------------------------------- the merge
@pytest.mark.parametrize("n,k,grid", [(16, 8, (4, 2, 2)), (16, 4, (4, 2, 2)), (37, 10, None), (16, 16, (4, 2, 2)),
                                      (45, 1, (5, 3, 3)), (2, 1, (1, 1, 2)), (30, 23, (2, 3, 5))])
def test_bipartite_merge_is_a_size_weighted_partition(n, k, grid):
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(n + k), dtype=torch.float64, requires_grad=True)
    merged = bipartite_merge(x, k, grid)
    assert merged.tokens.shape == (k, 8) and merged.keep.shape == merged.sizes.shape == (k,)
    assert merged.source.shape == (n,) and int(merged.source.min()) == 0 and int(merged.source.max()) == k - 1
    assert torch.all(merged.keep[1:] > merged.keep[:-1])  # sequence order kept
    # each merged token holds the tokens that went into it, including the one whose position it takes
    assert torch.equal(merged.source[merged.keep], torch.arange(k))
    assert torch.equal(torch.bincount(merged.source, minlength=k).double(), merged.sizes.double())
    for j in range(k):
        torch.testing.assert_close(merged.tokens[j], x[merged.source == j].mean(0))
    # deterministic, and the gradient of a mean reaches every token it holds
    again = bipartite_merge(x.detach(), k, grid)
    assert torch.equal(again.source, merged.source) and torch.equal(again.keep, merged.keep)
    merged.tokens.sum().backward()
    torch.testing.assert_close(x.grad, (1.0 / merged.sizes[merged.source]).double()[:, None].expand(n, 8))
    if k == n:
        assert torch.equal(merged.tokens, x) and torch.equal(merged.keep, torch.arange(n))


def test_merging_pairs_the_same_spot_across_time_and_neighbours_within_a_frame():
    # two identical frame groups of 2 x 4 tokens: every token has a twin 8 tokens later (same spot, next group)
    frame = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    merged = bipartite_merge(torch.cat([frame, frame]), 8, grid=(2, 2, 4))
    groups = {tuple(torch.nonzero(merged.source == j).squeeze(1).tolist()) for j in range(8)}
    assert groups == {(i, i + 8) for i in range(8)}
    torch.testing.assert_close(merged.tokens, frame[merged.keep % 8])  # each at one of its twins' positions
    assert sorted((merged.keep // 8).tolist()) == [0] * 4 + [1] * 4  # positions spread over both frame groups
    # one frame group whose columns come in identical pairs: neighbours in the same frame merge
    columns = torch.randn(2, 2, 16, generator=torch.Generator().manual_seed(1))
    video = columns.repeat_interleave(2, dim=1).reshape(8, 16)  # (h=2, w=4): w 0 = w 1, w 2 = w 3
    merged = bipartite_merge(video, 4, grid=(1, 2, 4))
    groups = {tuple(torch.nonzero(merged.source == j).squeeze(1).tolist()) for j in range(4)}
    assert groups == {(0, 1), (2, 3), (4, 5), (6, 7)}


def test_merge_placeholders_cuts_each_run_to_the_kept_count():
    v = 9
    rows = [[1, 2, v, v, v, v, v, 3], [4, v, v, v, 5, 6]]
    assert merge_placeholders(rows, v, [5, 3], 0.5) == [[1, 2, v, v, v, 3], [4, v, v, 5, 6]]
    assert merge_placeholders(rows, v, [5, 3], 1.0) == rows
    with pytest.raises(ValueError, match="2 videos in the batch but 1"):
        merge_placeholders(rows[:1], v, [5, 3], 0.5)
    with pytest.raises(ValueError, match="5 placeholders in the prompt, the grid gives 4"):
        merge_placeholders(rows, v, [4, 3], 0.5)
    assert [kept_video_tokens(16, r) for r in (1.0, 0.5, 0.25, 0.3, 0.01)] == [16, 8, 4, 5, 1]
    with pytest.raises(ValueError, match="token_kept_ratio must be in"):
        kept_video_tokens(16, 0.0)


# --------------------------------------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from surgvqa.checkpoint import load_for_inference

    model, processor, _, _ = load_for_inference(tiny_model_dir)
    return model, processor


@pytest.fixture(scope="module")
def items(test_set):
    media = MediaConfig(frames_dir=str(test_set / "frames"), audio_dir=str(test_set / "audio" / "in_002-001"),
                        frame_size=FRAME, question_modality="text+audio", pixel_multiple=28)
    samples, _ = load_samples(test_set / "in_002-001.jsonl", media)
    dataset = SurgicalVQADataset(samples[:4], media)
    return [dataset[i] for i in (0, 3, 1)]  # questions of different lengths: padded rows


def _collate(processor, items, mode: str, ratio: float = 1.0) -> dict:
    return VQACollator(processor, frame_size=FRAME, question_modality="text+audio", mode=mode,
                       token_kept_ratio=ratio)(items)


@pytest.fixture
def omni(loaded):
    """The tiny thinker with merging switched off again after each test."""
    model, processor = loaded
    yield model, processor
    get_backbone(OMNI).enable_token_merging(model, 1.0)


@pytest.mark.parametrize("mode", ["train", "generate"])
def test_ratio_one_is_a_bit_exact_no_op(omni, items, mode):
    model, processor = omni
    plain = _collate(processor, items, mode)
    with torch.no_grad():
        before = model(**_inputs(plain)).logits
    backbone = get_backbone(OMNI)
    backbone.enable_token_merging(model, 0.5)
    backbone.enable_token_merging(model, 1.0)
    assert model.token_kept_ratio == 1.0 and "forward" not in vars(model) and "generate" not in vars(model)
    same = _collate(processor, items, mode, ratio=1.0)
    assert same.keys() == plain.keys()
    assert all(torch.equal(same[k], plain[k]) for k in plain if isinstance(plain[k], torch.Tensor))
    with torch.no_grad():
        after = model(**_inputs(same)).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("mode", ["train", "generate"])
def test_merging_nothing_reproduces_the_logits_exactly(omni, items, mode):
    """r = 0.99 keeps all 16 tokens: the merged path (own positions, encoder outputs handed in) with nothing
    merged gives the model's own logits, bit for bit, with right (train) and left (generate) padding."""
    model, processor = omni
    batch = _collate(processor, items, mode)
    with torch.no_grad():
        reference = model(**_inputs(batch)).logits
    get_backbone(OMNI).enable_token_merging(model, 0.99)
    assert torch.equal(_collate(processor, items, mode, ratio=0.99)["input_ids"], batch["input_ids"])
    with torch.no_grad():
        merged_path = model(**_inputs(batch)).logits
    assert torch.equal(merged_path, reference)


def test_half_the_video_tokens_with_text_positions_unchanged(omni, items):
    model, processor = omni
    video_id = _video_id(processor)
    full = _collate(processor, items, "train")
    half = _collate(processor, items, "train", ratio=0.5)
    n = (full["input_ids"] == video_id).sum(1)
    k = (half["input_ids"] == video_id).sum(1)
    assert n.tolist() == [16, 16, 16] and k.tolist() == [math.ceil(0.5 * 16)] * 3
    assert (full["attention_mask"].sum(1) - half["attention_mask"].sum(1)).tolist() == (n - k).tolist()
    # labels: exactly the same answer tokens, on the tokens they label, at the end of the real row
    for i in range(len(items)):
        labelled = half["labels"][i] != IGNORE_INDEX
        assert half["labels"][i][labelled].tolist() == full["labels"][i][full["labels"][i] != IGNORE_INDEX].tolist()
        assert torch.equal(half["labels"][i][labelled], half["input_ids"][i][labelled])
        real = torch.nonzero(half["attention_mask"][i]).squeeze(1)
        assert torch.equal(torch.nonzero(labelled).squeeze(1), real[-int(labelled.sum()):])
    # positions: the model's own on the full batch vs ours on the merged one
    inputs = _inputs(half)
    features = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    merged = merge_videos(features.pooler_output, 0.5, inputs["video_grid_thw"], 2)
    audio = half["feature_attention_mask"].sum(-1)

    def rope(ids, mask):
        return model.get_rope_index(ids, None, half["video_grid_thw"], mask, False, audio,
                                    half["video_second_per_grid"])[0]

    ours, deltas = merged_position_ids(half["input_ids"], half["attention_mask"], video_id, merged, rope)
    theirs, _ = model.get_rope_index(full["input_ids"], None, full["video_grid_thw"], full["attention_mask"], False,
                                     full["feature_attention_mask"].sum(-1), full["video_second_per_grid"])
    for i in range(len(items)):
        f_ids, h_ids = full["input_ids"][i], half["input_ids"][i]
        f_video = torch.nonzero(f_ids == video_id).squeeze(1)
        h_video = torch.nonzero(h_ids == video_id).squeeze(1)
        f_len, h_len = int(full["attention_mask"][i].sum()), int(half["attention_mask"][i].sum())
        # text before and after the video: the same positions
        assert torch.equal(ours[:, i, : h_video[0]], theirs[:, i, : f_video[0]])
        after = h_len - int(h_video[-1]) - 1
        assert after > 10
        assert torch.equal(ours[:, i, h_video[-1] + 1: h_len], theirs[:, i, f_video[-1] + 1: f_len])
        # each kept video token sits at the (t, h, w) of the token it represents, from the full grid
        assert torch.equal(ours[:, i, h_video], theirs[:, i, f_video[merged[i].keep]])
        assert int(deltas[i]) == int(theirs[:, i, :f_len].max()) + 1 - h_len
    # the model runs the merged batch and its loss is finite
    get_backbone(OMNI).enable_token_merging(model, 0.5)
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape[1] == half["input_ids"].shape[1] and torch.isfinite(out.loss)


def test_mismatched_ratio_is_an_error(omni, items):
    model, processor = omni
    get_backbone(OMNI).enable_token_merging(model, 0.25)
    with pytest.raises(ValueError, match="disagree on token_kept_ratio"):
        model(**_inputs(_collate(processor, items, "generate", ratio=0.5)))
    with pytest.raises(ValueError, match="computes position_ids from the full video grid"):
        batch = _inputs(_collate(processor, items, "generate", ratio=0.25))
        model(**batch, position_ids=torch.zeros((3, *batch["input_ids"].shape), dtype=torch.long))


def test_length_estimate_counts_the_kept_tokens(loaded, items):
    _, processor = loaded
    for ratio in (1.0, 0.5, 0.25):
        collator = VQACollator(processor, frame_size=FRAME, question_modality="text+audio", token_kept_ratio=ratio)
        for item in items:
            sample = item["sample"]
            counts = collator.token_counts(sample.question, sample.answer, (FRAME, FRAME), 8, len(item["audio"]))
            assert counts["video"] == kept_video_tokens(16, ratio)
            assert counts["total"] == int(collator([item])["attention_mask"].sum())
    with pytest.raises(ValueError, match="needs frames_as='video'"):
        VQACollator(processor, frames_as="images", token_kept_ratio=0.5)


def test_graft_merges_in_its_own_splice(graft_for_merging, items):
    model, processor = graft_for_merging
    backbone = get_backbone("qwen_vl_whisper")
    video_id = _video_id(processor)
    for mode in ("train", "generate"):
        batch = _collate(processor, items, mode)
        with torch.no_grad():
            reference = model(**_inputs(batch)).logits
        backbone.enable_token_merging(model, 0.99)  # nothing merged: bit-exact
        with torch.no_grad():
            assert torch.equal(model(**_inputs(batch)).logits, reference)
        backbone.enable_token_merging(model, 0.5)
        half = _collate(processor, items, mode, ratio=0.5)
        assert (half["input_ids"] == video_id).sum(1).tolist() == [8, 8, 8]
        with torch.no_grad():
            out = model(**_inputs(half))
        assert out.logits.shape[:2] == half["input_ids"].shape
        backbone.enable_token_merging(model, 1.0)
    # the graft generates from inputs_embeds: its output is the new tokens alone, never a negative count
    backbone.enable_token_merging(model, 0.5)
    half = _inputs(_collate(processor, items, "generate", ratio=0.5))
    with torch.no_grad():
        output = model.generate(**half, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert output.shape == (3, 4) and torch.equal(new_token_ids(output, half["input_ids"]), output)
    backbone.enable_token_merging(model, 1.0)


@pytest.fixture(scope="module")
def graft_for_merging(tmp_path_factory):
    from scripts import load_script
    from surgvqa.checkpoint import load_for_inference

    path = load_script("make_tiny_graft").build_tiny_graft(tmp_path_factory.mktemp("graft-merge"), seed=0)
    model, processor, _, _ = load_for_inference(path)
    return model, processor


# -------------------------------------------------------------------------------- an adapter trained at 0.5
@pytest.fixture(scope="module")
def merged_adapter(tmp_path_factory, tiny_model_dir, test_set) -> tuple[Path, Path]:
    """40 steps at lr 1e-2 on four samples (8 frames: 16 video tokens merged to 8): greedy decoding reproduces
    the answers with a top-1 - top-2 logit margin above 5 at every step. The in-training evaluation (loss and
    generated answers, on the same four samples) runs once, at the end."""
    from surgvqa.train import parse_args, train

    work = tmp_path_factory.mktemp("merged-adapter")
    data = work / "train.jsonl"
    lines = (test_set / "in_002-001.jsonl").read_text().splitlines()
    data.write_text("\n".join(line for line in lines if json.loads(line)["id"] in MEMORISE_IDS) + "\n")
    (work / "frames").symlink_to(test_set / "frames", target_is_directory=True)
    out = work / "adapter"
    trainer = train(*parse_args([
        "--model_name_or_path", str(tiny_model_dir), "--train_data_path", str(data),
        "--frames_dir", str(work / "frames"), "--frame_size", str(FRAME), "--token_kept_ratio", "0.5",
        "--output_dir", str(out), "--per_device_train_batch_size", "4", "--learning_rate", "1e-2",
        "--max_steps", "40", "--lora_dropout", "0", "--save_strategy", "no", "--logging_steps", "10",
        "--eval_data_path", str(data), "--eval_strategy", "steps", "--eval_steps", "40",
        "--per_device_eval_batch_size", "4", "--eval_generate_samples", "4", "--eval_max_new_tokens", "32",
        "--use_cpu", "True", "--seed", "0", "--disable_tqdm", "True",
    ]))["trainer"]
    (work / "log_history.json").write_text(json.dumps(trainer.state.log_history))
    return out, data


@pytest.fixture(scope="module")
def adapter_model(merged_adapter, test_set):
    from surgvqa.checkpoint import load_for_inference
    from surgvqa.run_config import RunConfig

    adapter, data = merged_adapter
    config = RunConfig.read(adapter)
    model, processor, _, _ = load_for_inference(adapter)
    get_backbone(config.backbone).enable_token_merging(model, config.preprocessing.token_kept_ratio)
    media = config.preprocessing.media_config(str(test_set / "frames"), None)
    media.pixel_multiple = 28
    samples, _ = load_samples(data, media)
    dataset = SurgicalVQADataset(samples, media)
    collator = VQACollator(processor, mode="generate", **config.preprocessing.collator_kwargs())
    return model, processor, config, dataset, collator


def test_training_records_the_ratio_and_evaluates_with_it(merged_adapter):
    adapter, _ = merged_adapter
    record = json.loads((adapter / "surgvqa_config.json").read_text())
    assert record["preprocessing"]["token_kept_ratio"] == 0.5
    assert json.loads((adapter / "train_results.json").read_text())["train_loss"] > 0
    # in-training evaluation, merged as in training: teacher-forced loss and generated answers
    (evaluation,) = [e for e in json.loads((adapter.parent / "log_history.json").read_text()) if "eval_loss" in e]
    assert evaluation["step"] == 40 and 0 < evaluation["eval_loss"] < 0.5
    assert evaluation["eval_accuracy"] == 1.0 and evaluation["eval_generated"] == 4


def test_batch_one_and_four_give_the_same_answers_and_exact_new_tokens(adapter_model):
    model, processor, _, dataset, collator = adapter_model
    tok = processor.tokenizer
    one = list(generate_predictions(model, tok, dataset, collator, batch_size=1, max_new_tokens=32))
    four = list(generate_predictions(model, tok, dataset, collator, batch_size=4, max_new_tokens=32))
    assert [(p.key, p.text, p.stopped_by_eos, p.new_tokens) for p in one] == [
        (p.key, p.text, p.stopped_by_eos, p.new_tokens) for p in four]
    by_key = {s.key: s for s in dataset.samples}
    for prediction in four:
        sample = by_key[prediction.key]
        assert prediction.text == sample.answer and prediction.stopped_by_eos
        # the answer and <|im_end|>, nothing of the prompt: no negative or prompt-sized counts
        assert prediction.new_tokens == len(tok(sample.answer, add_special_tokens=False)["input_ids"]) + 1

    # the raw output: prompt (with the merged placeholder count) + new tokens, exactly
    batch = _inputs(collator([dataset[i] for i in range(4)]))
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # left padding in play
    assert ((batch["input_ids"] == _video_id(processor)).sum(1) == 8).all()
    eos = eos_token_ids(model, tok)
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=32, do_sample=False, eos_token_id=eos,
                                pad_token_id=tok.pad_token_id)
    assert torch.equal(output[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    new = new_token_ids(output, batch["input_ids"])
    assert new.shape[1] == output.shape[1] - batch["input_ids"].shape[1] == max(p.new_tokens for p in four)

    # the merge of each video does not depend on its batch
    inner = model.get_base_model().model
    together = merge_videos(inner.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"])
                            .pooler_output, 0.5, batch["video_grid_thw"], 2)
    for row in range(4):
        single = _inputs(collator([dataset[row]]))
        alone = merge_videos(inner.get_video_features(single["pixel_values_videos"], single["video_grid_thw"])
                             .pooler_output, 0.5, single["video_grid_thw"], 2)
        assert torch.equal(alone[0].source, together[row].source)


def test_generate_decodes_as_a_full_forward_does(adapter_model):
    """Cached decoding (positions continued from the prompt's last one) gives the tokens that a fresh forward over
    prompt + answer so far gives (positions recomputed from the full grid every step)."""
    model, processor, _, dataset, collator = adapter_model
    tok = processor.tokenizer
    batch = _inputs(collator([dataset[i] for i in range(4)]))
    steps = 6
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                eos_token_id=eos_token_ids(model, tok), pad_token_id=tok.pad_token_id)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        for _ in range(steps):
            logits = model(**{**batch, "input_ids": ids, "attention_mask": mask}).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(output, ids)


def test_evaluate_and_merge_an_adapter_trained_with_merging(merged_adapter, adapter_model, tmp_path):
    from surgvqa.evaluate import main as evaluate_main
    from surgvqa.merge import main as merge_main
    from surgvqa.report import read_predictions

    adapter, data = merged_adapter
    frames = adapter.parent / "frames"
    flags = ["--eval_data_path", str(data), "--frames_dir", str(frames), "--batch_size", "4",
             "--max_new_tokens", "32", "--device", "cpu"]
    assert evaluate_main(["--checkpoint_path", str(adapter), "--output_file", str(tmp_path / "a.jsonl"), *flags]) == 0
    summary = json.loads((tmp_path / "a.summary.json").read_text())
    assert summary["token_kept_ratio"] == 0.5 and summary["accuracy"] == 1.0

    merged = tmp_path / "merged"
    assert merge_main(["--base_model_path", str(adapter_model[2].base_model), "--adapter_path", str(adapter),
                       "--output_dir", str(merged), "--dtype", "float32", "--device", "cpu", "--verify", "4",
                       "--verify_batch_size", "4", "--verify_max_new_tokens", "32"]) == 0
    verification = json.loads((merged / "merge_verification.json").read_text())
    assert verification["answers_identical"] and verification["samples"] == 4
    assert json.loads((merged / "surgvqa_config.json").read_text())["preprocessing"]["token_kept_ratio"] == 0.5

    assert evaluate_main(["--checkpoint_path", str(merged), "--output_file", str(tmp_path / "m.jsonl"), *flags]) == 0
    assert [r["prediction"] for r in read_predictions(tmp_path / "m.jsonl")] == \
        [r["prediction"] for r in read_predictions(tmp_path / "a.jsonl")]
    # overridable: the same adapter without merging (what it was not trained for), recorded as such
    assert evaluate_main(["--checkpoint_path", str(adapter), "--output_file", str(tmp_path / "off.jsonl"),
                          "--token_kept_ratio", "1.0", *flags]) == 0
    assert json.loads((tmp_path / "off.summary.json").read_text())["token_kept_ratio"] == 1.0


@pytest.mark.parametrize("extra,message", [
    (["--token_kept_ratio", "0"], "--token_kept_ratio must be in"),
    (["--token_kept_ratio", "1.5"], "--token_kept_ratio must be in"),
    (["--token_kept_ratio", "0.5", "--frames_as", "images"], "needs --frames_as video"),
])
def test_bad_ratio_is_a_user_error(extra, message, test_set, tmp_path, capsys):
    from surgvqa.train import main as train_main

    code = train_main(["--model_name_or_path", str(tmp_path), "--train_data_path", str(test_set / "in_002-001.jsonl"),
                       "--output_dir", str(tmp_path / "out"), *extra])
    assert code == 2 and message in capsys.readouterr().err
