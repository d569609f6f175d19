"""Frozen encoder outputs (and M-RoPE positions) kept per item: the same loss and LoRA gradients as running the
towers; towers that train or drop out are never cached."""

from __future__ import annotations

import pytest
import torch
from conftest import lora_test_model

from surgvqa.backbones import get_backbone
from surgvqa.backbones.base import LoadOptions
from surgvqa.backbones.common.tower_cache import EncoderOutputCache, deterministic_frozen
from surgvqa.collate import VQACollator
from surgvqa.data import MediaConfig, SurgicalVQADataset, load_samples


def _items_and_collator(model_dir, test_set, audio_dir, n: int, token_kept_ratio: float = 1.0):
    """``n`` dataset items carrying their index (as EncodedDataset passes them on) and a collator (it sets
    ``media_ids`` from the indices)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    config = MediaConfig(frames_dir=str(test_set / "frames"), audio_dir=str(audio_dir), frame_size=56,
                         question_modality="text+audio")
    samples, problems = load_samples(test_set / "in_002-001.jsonl", config)
    assert not problems
    dataset = SurgicalVQADataset(samples[:n], config)
    collator = VQACollator(processor, question_modality="text+audio", frame_size=56, token_kept_ratio=token_kept_ratio)
    return [dataset[i] | {"index": i} for i in range(n)], collator


@pytest.fixture(scope="module")
def batches(tiny_model_dir, test_set, audio_dir):
    """Two batches of the same items in other compositions (with their media_ids)."""
    items, collator = _items_and_collator(tiny_model_dir, test_set, audio_dir, 4)
    return collator(items), collator([items[2], items[0], items[3]])


def _run(model, batch, cache=None):
    """Loss and LoRA gradients of one step; with ``cache``, the model keeps its tower outputs there."""
    model.zero_grad(set_to_none=True)
    model.base_model.model.tower_cache = cache  # what Backbone.keep_tower_outputs sets
    inputs = {k: v for k, v in batch.items() if k != "media_ids" or cache is not None}
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_same_loss_and_lora_gradients_with_kept_encoder_outputs(tiny_model_dir, batches):
    model = lora_test_model(tiny_model_dir)
    towers = model.base_model.model.model
    runs = {"visual": 0, "audio_tower": 0}
    for name in runs:
        getattr(towers, name).register_forward_hook(lambda *a, n=name: runs.__setitem__(n, runs[n] + 1))
    first, second = batches
    cache = EncoderOutputCache(1 << 30)
    reference = [_run(model, batch) for batch in (first, second)]
    assert runs == {"visual": 2, "audio_tower": 2}
    filled = _run(model, first, cache)  # a miss: the towers run, each item's share is kept
    assert runs == {"visual": 3, "audio_tower": 3} and len(cache.entries) == 8
    assert len(cache.positions) == 4  # each row's M-RoPE positions
    rope = type(towers).get_rope_index
    type(towers).get_rope_index = lambda *a, **k: pytest.fail("positions computed again")
    try:
        served = _run(model, second, cache)  # other composition, all items kept: no tower runs, no rope loop
    finally:
        type(towers).get_rope_index = rope
    assert runs == {"visual": 3, "audio_tower": 3} and cache.hits == 2
    for (loss_a, grads_a), (loss_b, grads_b) in zip(reference, [filled, served], strict=True):
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
        assert grads_a.keys() == grads_b.keys() and any("lora_A" in n for n in grads_a)
        for name in grads_a:
            assert grads_a[name].abs().sum() > 0, name
            torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7)
    assert not {"get_video_features", "get_audio_features", "get_rope_index"} & set(vars(towers))  # nothing patched


def test_trainable_or_dropping_towers_are_not_cached(tiny_model_dir, batches):
    model = lora_test_model(tiny_model_dir)
    towers = model.base_model.model.model
    assert deterministic_frozen(towers.visual) and deterministic_frozen(towers.audio_tower)
    towers.audio_tower.config.dropout = 0.1  # functional dropout read from the config
    assert not deterministic_frozen(towers.audio_tower)
    assert deterministic_frozen(towers.audio_tower.eval())
    next(towers.visual.parameters()).requires_grad_(True)
    assert not deterministic_frozen(towers.visual)
    towers.audio_tower.train()
    cache = EncoderOutputCache(1 << 30)
    _run(model, batches[0], cache)
    assert cache.entries == {}


def test_each_family_keeps_tower_outputs_or_says_it_does_not(tiny_model_dir, caplog):
    from surgvqa.errors import UserError

    omni = get_backbone("qwen2_5_omni")
    model = omni.load(str(tiny_model_dir), LoadOptions(dtype="float32"))
    assert omni.keep_tower_outputs(model, 0.5) and model.tower_cache.max_bytes == 1 << 29
    assert omni.keep_tower_outputs(model, None, default_gb=0.25) and model.tower_cache.max_bytes == 1 << 28
    assert not omni.keep_tower_outputs(model, 0) and not caplog.records and model.tower_cache is None  # dropped
    graft = get_backbone("qwen_vl_whisper")
    with caplog.at_level("INFO"):  # the default on a family without kept outputs: off, said in the log
        assert not graft.keep_tower_outputs(torch.nn.Linear(1, 1), None, default_gb=2.0)
    assert "backbone qwen_vl_whisper keeps no frozen tower outputs" in caplog.text
    assert not graft.keep_tower_outputs(torch.nn.Linear(1, 1), 0)
    for name in ("qwen_vl_whisper", "qwen3_omni_moe"):  # asked for explicitly: refused, naming the family
        with pytest.raises(UserError, match=f"backbone '{name}' keeps no frozen tower outputs: drop --tower_cache_gb"):
            get_backbone(name).keep_tower_outputs(torch.nn.Linear(1, 1), 1.0)
        get_backbone(name).check_tower_cache(None)


def test_position_cache_is_bounded():
    """The M-RoPE positions count against the tower cache's bound: rows beyond it are computed, not kept."""
    calls = []

    def rope(ids, mask):
        calls.append(1)
        return torch.arange(ids.numel() * 3).reshape(3, *ids.shape), torch.zeros(ids.shape[0], 1, dtype=torch.long)

    ids, mask = torch.arange(20).reshape(2, 10), torch.ones(2, 10, dtype=torch.long)
    one_row = 3 * 10 * 8 + 8  # positions (3 x 10 int64) and a delta of one row
    cache = EncoderOutputCache(one_row + one_row // 2)
    cache.rope_index([1, 2], ids, mask, rope)
    assert len(cache.positions) == 1 and cache.bytes == one_row <= cache.max_bytes
    cache.rope_index([1, 2], ids, mask, rope)  # row 2 was not kept: the rope index runs again
    assert len(calls) == 2 and len(cache.positions) == 1
    full = EncoderOutputCache(1 << 20)
    expected, _ = full.rope_index([1, 2], ids, mask, rope)
    positions, _ = full.rope_index([1, 2], ids, mask, rope)  # both rows kept: served
    assert len(calls) == 3 and torch.equal(positions, expected)


def test_kept_encoder_outputs_under_token_merging(tiny_model_dir, test_set, audio_dir):
    """Token merging reads the kept tower outputs and the kept positions of the full (unmerged) rows: the same loss
    and LoRA gradients as running the towers, at r = 0.5."""
    items, collator = _items_and_collator(tiny_model_dir, test_set, audio_dir, 3, token_kept_ratio=0.5)
    first, second = collator(items), collator([items[2], items[0]])
    model = lora_test_model(tiny_model_dir, token_kept_ratio=0.5)
    cache = EncoderOutputCache(1 << 30)
    reference = [_run(model, batch) for batch in (first, second)]
    runs = [_run(model, first, cache), _run(model, second, cache)]
    assert cache.hits >= 2 and cache.positions  # the second batch served from the cache
    for (loss_a, grads_a), (loss_b, grads_b) in zip(reference, runs, strict=True):
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("epochs,kept", [("1", False), ("2", True)])
def test_tower_outputs_are_kept_by_default_only_when_items_are_read_again(tiny_model_dir, test_set, tmp_path, epochs,
                                                                         kept):
    """A one-epoch run reads every item once, so kept tower outputs would never serve: none are kept by default."""
    from conftest import small_training_set

    from surgvqa.train import parse_args, train

    root = small_training_set(tmp_path, test_set)
    trainer = train(*parse_args([
        "--model_name_or_path", str(tiny_model_dir), "--train_data_path", str(root / "small.jsonl"),
        "--frames_dir", str(root / "frames"), "--frame_size", "56", "--max_train_frames", "2",
        "--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "2", "--num_train_epochs", epochs,
        "--save_strategy", "no", "--use_cpu", "True", "--disable_tqdm", "True", "--report_to", "none",
    ]))["trainer"]
    assert trainer.keeps_tower_outputs is kept
