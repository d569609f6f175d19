"""--packing: several samples per row give the same loss and the same LoRA gradients as the unpacked batch (text,
text+audio, token merging, eager attention, kept tower outputs); the plan, the positions, the mask; training records
the flag and evaluates unpacked; families and combinations that cannot pack are refused."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import lora_test_model

from surgvqa.backbones import get_backbone
from surgvqa.backbones.common.labelled_logits import labelled_loss, next_token_selection
from surgvqa.backbones.common.packing import packed_attention, repack, segment_ids, text_positions, unpack
from surgvqa.backbones.common.tower_cache import EncoderOutputCache
from surgvqa.collate import IGNORE_INDEX, VQACollator
from surgvqa.data import MediaConfig, SurgicalVQADataset, load_samples
from surgvqa.errors import UserError
from surgvqa.packing import PackedDataset, PackingCollator, plan_packs

#: fp32 on the CPU: the packed and the unpacked batch run the same operations on differently shaped tensors
#: (other reduction orders in the matrix products), so they agree to rounding, not bit for bit
LOSS_TOL = {"rtol": 1e-5, "atol": 1e-6}
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-6}
#: samples of test_set/in_002-001.jsonl with questions (and spoken questions) of different lengths, and the rows
#: they are packed into: two samples, one, three
ORDER = (0, 3, 1, 7, 4, 9)
PACKS = [[0, 1], [2], [3, 4, 5]]


def test_first_fit_decreasing_plan():
    lengths = [50, 70, 30, None, 100, 20, 60, 120]
    packs = plan_packs(lengths, 100)
    assert sorted(i for pack in packs for i in pack) == list(range(len(lengths)))  # every sample once
    assert all(sum(lengths[i] for i in pack) <= 100 for pack in packs if len(pack) > 1)
    assert [3] in packs and [7] in packs and [4] in packs  # unknown length, too long, full: alone
    # longest first, each into the first pack with room: 70+30, 60+20, 50
    assert sorted(packs) == [[0], [1, 2], [3], [4], [5, 6], [7]]
    assert plan_packs(lengths, 100) == packs  # deterministic
    for seed in (0, 1):  # first fit in a seeded random order (training's): the same rules, other neighbours
        mixed = plan_packs(lengths, 100, seed)
        assert sorted(i for pack in mixed for i in pack) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in pack) <= 100 for pack in mixed if len(pack) > 1)
        assert [3] in mixed and [7] in mixed and mixed == plan_packs(lengths, 100, seed)
    assert plan_packs(lengths, 100, 0) != plan_packs(lengths, 100, 1)


def test_positions_restart_and_samples_see_only_themselves():
    lengths = torch.tensor([[3, 2], [4, 0]])
    assert segment_ids(lengths, 6).tolist() == [[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, -1, -1]]
    assert text_positions(lengths, 6).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    ids = torch.arange(12).view(2, 6)
    samples, mask = unpack(ids, lengths)
    assert samples.tolist() == [[0, 1, 2, 0], [3, 4, 0, 0], [6, 7, 8, 9]] and mask.sum(-1).tolist() == [3, 2, 4]
    assert repack(samples, lengths, 6, fill=-1).tolist() == [[0, 1, 2, 3, 4, -1], [6, 7, 8, 9, -1, -1]]
    sdpa = packed_attention(lengths, 6, "sdpa", torch.float32, torch.device("cpu"))
    assert sdpa.shape == (2, 1, 6, 6) and sdpa.dtype == torch.bool
    assert sdpa[0, 0].long().tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                                          [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]]
    eager = packed_attention(lengths, 6, "eager", torch.float32, torch.device("cpu"))
    assert torch.equal(eager == 0, sdpa) and eager.min() == torch.finfo(torch.float32).min
    assert packed_attention(lengths, 6, "flash_attention_2", torch.bfloat16, torch.device("cpu")) is None


# ---------------------------------------------------------------------------------------- same loss and gradients
@pytest.fixture(scope="module")
def items(test_set, audio_dir):
    media = MediaConfig(frames_dir=str(test_set / "frames"), audio_dir=str(audio_dir), frame_size=56,
                        question_modality="text+audio", max_frames=4)
    samples, problems = load_samples(test_set / "in_002-001.jsonl", media)
    assert not problems
    dataset = SurgicalVQADataset(samples, media)
    return [dataset[i] for i in ORDER]


def _step(model, batch: dict, labelled: bool = True, **extra) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and LoRA gradients of one step: the labelled-only loss (training's default) or the model's own."""
    model.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"} | extra
    if labelled:
        loss = labelled_loss(model(**inputs, logits_mask=next_token_selection(batch["labels"])), batch["labels"])
    else:
        loss = model(**inputs, labels=batch["labels"]).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(expected, got):
    (loss_a, grads_a), (loss_b, grads_b) = expected, got
    torch.testing.assert_close(loss_b, loss_a, **LOSS_TOL)
    assert grads_a.keys() == grads_b.keys() and any("lora_A" in n for n in grads_a)
    for name in grads_a:
        assert grads_a[name].abs().sum() > 0, f"{name}: zero gradient, the comparison would prove nothing"
        torch.testing.assert_close(grads_b[name], grads_a[name], **GRAD_TOL, msg=lambda m, n=name: f"{n}: {m}")


def _batches(processor, items, modality: str, ratio: float = 1.0, indexed: bool = False) -> tuple[dict, dict]:
    """The unpacked batch of the items and the same items packed as :data:`PACKS`; ``indexed``: the items carry
    their dataset index, as training's items do (the batch's ``media_ids``, for kept tower outputs)."""
    collator = VQACollator(processor, question_modality=modality, frame_size=56, mode="train",
                           token_kept_ratio=ratio)
    if indexed:
        items = [{**item, "index": i} for i, item in enumerate(items)]
    plain = collator(items)
    packed = PackingCollator(collator)([[items[i] for i in pack] for pack in PACKS])
    return plain, packed


@pytest.mark.parametrize("modality,ratio,attention", [
    ("text", 1.0, "sdpa"),
    ("text+audio", 1.0, "sdpa"),
    ("text+audio", 0.5, "sdpa"),  # token merging on
    ("text+audio", 1.0, "eager"),
])
def test_same_loss_and_lora_gradients_as_the_unpacked_batch(tiny_model_dir, items, processor, modality, ratio,
                                                             attention):
    plain, packed = _batches(processor, items, modality, ratio)
    lengths = plain["attention_mask"].sum(-1)
    assert len(set(lengths.tolist())) == len(ORDER)  # samples of different lengths
    assert packed["input_ids"].shape[0] == len(PACKS) and packed["packed_lengths"].sum() == lengths.sum()
    assert packed["packed_lengths"].tolist() == [[int(lengths[i]) for i in p] + [0] * (3 - len(p)) for p in PACKS]
    assert int((packed["labels"] != IGNORE_INDEX).sum()) == int((plain["labels"] != IGNORE_INDEX).sum())
    model = lora_test_model(tiny_model_dir, attention, token_kept_ratio=ratio)
    _assert_same(_step(model, plain), _step(model, packed))
    _assert_same(_step(model, plain, labelled=False), _step(model, packed, labelled=False))
    # the control: the same rows without their layout (one sequence per row, attending across samples) differ
    unaware = {k: v for k, v in packed.items() if k != "packed_lengths"}
    assert abs(float(_step(model, unaware)[0]) - float(_step(model, plain)[0])) > 1e-3


def test_flash_attention_layout_isolates_the_samples(tiny_model_dir, items, processor, monkeypatch):
    """FlashAttention-2's path (no mask; a text position row restarting at every sample, from which the kernel's
    sequence boundaries are read) checked where it can run here: on SDPA, transformers builds the mask from the same
    text row (its packed-sequence detection), and the loss and gradients are the unpacked batch's."""
    import surgvqa.backbones.qwen2_5_omni.modeling as modeling

    plain, packed = _batches(processor, items, "text+audio")
    model = lora_test_model(tiny_model_dir)
    expected = _step(model, plain)
    monkeypatch.setattr(modeling, "packed_attention", lambda *args: None)  # what it returns for FlashAttention-2
    _assert_same(expected, _step(model, packed))


def test_kept_tower_outputs_serve_packed_rows(tiny_model_dir, items, processor):
    """The towers run once for the packed batch, then serve it from their kept outputs: the same loss and gradients
    as the unpacked batch every time."""
    plain, packed = _batches(processor, items, "text+audio", indexed=True)
    assert packed["media_ids"].shape == (len(ORDER),)
    model = lora_test_model(tiny_model_dir)
    expected = _step(model, {k: v for k, v in plain.items() if k != "media_ids"})
    cache = EncoderOutputCache(1 << 30)
    model.base_model.model.tower_cache = cache  # what Backbone.keep_tower_outputs sets
    for _ in range(2):
        _assert_same(expected, _step(model, packed))
    assert cache.misses == 2 and cache.hits == 2  # video and audio: run once, then kept


def test_packed_rows_refuse_generation_inputs(tiny_model_dir, items, processor):
    _, packed = _batches(processor, items, "text")
    model = lora_test_model(tiny_model_dir)
    inputs = {k: v for k, v in packed.items() if k != "labels"}
    with pytest.raises(ValueError, match="training forwards only"):
        model(**inputs, use_cache=True)
    with pytest.raises(ValueError, match="training batches"):
        PackingCollator(VQACollator(processor, frame_size=56, mode="generate"))


def test_a_pack_over_the_length_limit_is_an_error(tiny_model_dir, items, processor):
    lengths = VQACollator(processor, frame_size=56)(items[:2])["attention_mask"].sum(-1).tolist()
    limit = int(sum(lengths)) - 1  # each sample fits, the two together do not
    packer = PackingCollator(VQACollator(processor, frame_size=56, model_max_length=limit))
    assert packer([[items[0]], [items[1]]])["input_ids"].shape[0] == 2
    with pytest.raises(RuntimeError, match=f"> model_max_length {limit}"):
        packer([items[:2]])


# ------------------------------------------------------------------------------------------------------- training
def test_training_packs_records_the_flag_and_evaluates_unpacked(tiny_model_dir, test_set, tmp_path, caplog):
    from surgvqa.arguments import parse_args
    from surgvqa.train import train

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join((test_set / "in_002-001.jsonl").read_text().splitlines()[:10]) + "\n")
    out = tmp_path / "out"
    flags = ["--model_name_or_path", str(tiny_model_dir), "--train_data_path", str(data),
             "--eval_data_path", str(data), "--frames_dir", str(test_set / "frames"), "--frame_size", "56",
             "--max_train_frames", "4", "--model_max_length", "300", "--output_dir", str(out),
             "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "4", "--num_train_epochs", "1",
             "--eval_strategy", "epoch", "--save_strategy", "no", "--logging_steps", "1", "--use_cpu", "True",
             "--seed", "0", "--disable_tqdm", "True", "--report_to", "none", "--packing", "True"]
    with caplog.at_level("INFO", logger="surgvqa.train"):
        trainer = train(*parse_args(flags))["trainer"]
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("packing:"))
    rows = int(line.split(" in ")[1].split()[0])
    assert line.startswith("packing: 10 samples in") and 1 < rows < 10
    assert json.loads((out / "surgvqa_config.json").read_text())["packing"] is True
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert max(e["step"] for e in history) == rows  # one step per row (a pack) at batch 1
    losses = [e["loss"] for e in history if "loss" in e] + [e["eval_loss"] for e in history if "eval_loss" in e]
    assert losses and all(loss == loss and 0 < loss < 50 for loss in losses)
    batch = next(iter(trainer.get_eval_dataloader()))  # evaluation batches: one sample per row, no layout
    assert "packed_lengths" not in batch and batch["input_ids"].shape[0] == 4


def test_packed_dataset_serves_its_packs(items):
    dataset = PackedDataset(items, [[1, 0], [2]])
    assert len(dataset) == 2 and [i["sample"].key for i in dataset[0]] == [items[1]["sample"].key,
                                                                            items[0]["sample"].key]


@pytest.mark.parametrize("name", ["qwen3_omni_moe", "qwen_vl_whisper"])
def test_families_without_packed_rows_refuse_it(name):
    get_backbone(name).check_packing(False)
    with pytest.raises(UserError, match=f"--packing: backbone '{name}'"):
        get_backbone(name).check_packing(True)


@pytest.mark.parametrize("extra,message", [
    (["--train_sampling_strategy", "group_by_length"], "--packing with --train_sampling_strategy"),
    (["--attn_implementation", "flash_attention_2", "--per_device_train_batch_size", "2"],
     "--packing on flash_attention_2 takes --per_device_train_batch_size 1"),
])
def test_combinations_that_cannot_pack_are_user_errors(extra, message, test_set, tmp_path, capsys):
    from surgvqa.train import main as train_main

    code = train_main(["--model_name_or_path", str(tmp_path), "--train_data_path", str(test_set / "in_002-001.jsonl"),
                       "--output_dir", str(tmp_path / "out"), "--packing", "True", *extra])
    assert code == 2 and message in capsys.readouterr().err
