"""The collator's encoding cache: a batch rebuilt from kept items is what the processor makes of the same items."""

from __future__ import annotations

import os
import random

import pytest
import torch

from surgvqa.collate import VQACollator
from surgvqa.data import MediaConfig, SurgicalVQADataset, load_samples

FRAME = 56


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


def _dataset(test_set, audio_dir, modality: str, n: int = 12, **media) -> SurgicalVQADataset:
    config = MediaConfig(frames_dir=str(test_set / "frames"), audio_dir=str(audio_dir), frame_size=FRAME,
                         question_modality=modality, **media)
    samples, problems = load_samples(test_set / "in_002-001.jsonl", config)
    assert not problems
    return SurgicalVQADataset(samples[:n], config)


def _assert_same_model_input(a: dict, b: dict) -> None:
    a, b = ({k: v for k, v in batch.items() if k != "media_ids"} for batch in (a, b))  # item ids, not model input
    assert a.keys() == b.keys()
    for key, value in a.items():
        if key == "input_features":  # frames past a clip's end are padding the audio tower never reads
            mask = a["feature_attention_mask"].bool()
            assert value.shape == b[key].shape
            assert torch.equal(value.permute(0, 2, 1)[mask], b[key].permute(0, 2, 1)[mask])
        elif isinstance(value, torch.Tensor):
            assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


@pytest.mark.parametrize("modality, frames_as, mode", [
    ("text", "video", "train"), ("audio", "video", "train"), ("text+audio", "video", "generate"),
    ("text+audio", "images", "train"),
])
def test_rebuilt_batches_equal_the_processors(processor, test_set, audio_dir, modality, frames_as, mode):
    dataset = _dataset(test_set, audio_dir, modality, max_frames=4 if frames_as == "images" else None)
    items = [dataset[i] for i in range(len(dataset))]
    plain = VQACollator(processor, question_modality=modality, frame_size=FRAME, frames_as=frames_as, mode=mode)
    cached = VQACollator(processor, question_modality=modality, frame_size=FRAME, frames_as=frames_as, mode=mode,
                         encoding_cache_gb=1)
    for i in range(0, len(items), 4):  # first epoch: the processor runs, every item is kept
        _assert_same_model_input(plain(items[i:i + 4]), cached(items[i:i + 4]))
    assert len(cached._encodings) == len(items)
    order = list(range(len(items)))
    random.Random(0).shuffle(order)
    calls = []
    cached._encode = lambda batch: calls.append(batch)  # a later epoch must not run the processor at all
    for i in range(0, len(items), 3):  # other batch compositions, other longest clips
        batch = [items[j] for j in order[i:i + 3]]
        _assert_same_model_input(plain(batch), cached(batch))
    assert calls == []


def test_rebuilt_batch_gives_the_same_logits(processor, test_set, audio_dir, tiny_model_dir):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    dataset = _dataset(test_set, audio_dir, "text+audio", n=6)
    items = [dataset[i] for i in range(6)]
    cached = VQACollator(processor, question_modality="text+audio", frame_size=FRAME, encoding_cache_gb=1)
    cached(items[:3])
    cached(items[3:])
    mixed = [items[0], items[4], items[2]]  # the longest clip differs from both batches the items were kept from
    fresh = VQACollator(processor, question_modality="text+audio", frame_size=FRAME)(mixed)
    rebuilt = cached(mixed)
    with torch.no_grad():
        a = model(**fresh).logits
        b = model(**rebuilt).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bound_and_items_without_a_key(processor, test_set, audio_dir):
    dataset = _dataset(test_set, audio_dir, "text")
    items = [dataset[i] for i in range(8)]
    one = VQACollator(processor, question_modality="text", frame_size=FRAME, encoding_cache_gb=1)
    one(items[:1])
    size = one._encoding_bytes
    bounded = VQACollator(processor, question_modality="text", frame_size=FRAME, encoding_cache_gb=2.5 * size / 1024**3)
    bounded(items)
    assert len(bounded._encodings) == 2 and bounded._encoding_bytes <= 2.5 * size
    anonymous = [{k: v for k, v in item.items() if k != "media_key"} for item in items]
    unkeyed = VQACollator(processor, question_modality="text", frame_size=FRAME, encoding_cache_gb=1)
    unkeyed(anonymous)
    assert unkeyed._encodings == {}


def _samples_on_copied_frames(tmp_path, test_set, audio_dir):
    """(config, samples) over a copy of the test frames, so a test may rewrite one."""
    import shutil

    frames = tmp_path / "frames"
    shutil.copytree(test_set / "frames", frames)
    config = MediaConfig(frames_dir=str(frames), audio_dir=str(audio_dir), frame_size=FRAME,
                         question_modality="text+audio")
    samples, _ = load_samples(test_set / "in_002-001.jsonl", config)
    return config, samples


def test_media_key_changes_with_what_the_item_is_made_of(tmp_path, test_set, audio_dir):
    config, samples = _samples_on_copied_frames(tmp_path, test_set, audio_dir)
    dataset = SurgicalVQADataset(samples[:2], config)
    key = dataset[0]["media_key"]
    assert key == dataset[0]["media_key"] and key != dataset[1]["media_key"]
    first = samples[0].frame_paths[0]
    stat = os.stat(first)
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1000))  # a rewritten frame
    assert dataset[0]["media_key"] != key
    other_settings = [
        SurgicalVQADataset(samples[:1], config, max_frames=4),
        SurgicalVQADataset(samples[:1], MediaConfig(**{**config.__dict__, "ablate": "audio"})),
        SurgicalVQADataset([samples[0].__class__(**{**samples[0].__dict__, "question": "Another question?"})],
                           config),
    ]
    keys = {dataset[0]["media_key"], *(d[0]["media_key"] for d in other_settings)}
    assert len(keys) == 4


def test_items_come_without_media_once_kept_and_mixed_batches(processor, test_set, audio_dir, tmp_path):
    """A dataset asking the collator (has_encoding) skips the media of kept items; the collator builds a batch of
    kept and new items as the processor would; a rewritten file changes the key, so it is decoded again."""
    config, samples = _samples_on_copied_frames(tmp_path, test_set, audio_dir)
    plain_data = SurgicalVQADataset(samples[:6], config)
    collator = VQACollator(processor, question_modality="text+audio", frame_size=FRAME, encoding_cache_gb=1)
    dataset = SurgicalVQADataset(samples[:6], config, has_encoding=collator.has_encoding)
    plain = VQACollator(processor, question_modality="text+audio", frame_size=FRAME)
    first = [dataset[i] for i in range(3)]
    assert all(item["frames"] is not None and item["audio"] is not None for item in first)
    batch = collator(first)
    assert batch["media_ids"].shape == (3,) and len(set(batch["media_ids"].tolist())) == 3
    again = [dataset[i] for i in (4, 0, 3, 2)]  # two kept (no media), two new
    assert [item["frames"] is None for item in again] == [False, True, False, True]
    assert all(item["audio"] is None for item in again if item["frames"] is None)
    assert again[1]["media_key"] == first[0]["media_key"]
    _assert_same_model_input(plain([plain_data[i] for i in (4, 0, 3, 2)]), collator(again))
    assert len(collator._encodings) == 5
    path = samples[0].frame_paths[0]
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1000))
    assert dataset[0]["frames"] is not None  # rewritten: a new key, decoded again
    with pytest.raises(RuntimeError, match="without its media"):
        VQACollator(processor, question_modality="text+audio", frame_size=FRAME, encoding_cache_gb=1)([again[1]])
