"""Item encodings kept per dataset index (EncodedDataset): a batch assembled from kept items is what the processor
makes of the same items; the bound and the run's reads decide what is kept."""

from __future__ import annotations

import random

import pytest
import torch

from surgvqa.collate import VQACollator
from surgvqa.data import MediaConfig, SurgicalVQADataset, load_samples
from surgvqa.encoded import EncodedDataset, run_reads

FRAME = 56


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


class _Counting:
    """A dataset that counts its reads (an item served from the encodings is not read)."""

    def __init__(self, dataset: SurgicalVQADataset):
        self.dataset, self.samples, self.reads = dataset, dataset.samples, []

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        self.reads.append(i)
        return self.dataset[i]


def _batches(encoded, collator, order: list[int], size: int) -> list[dict]:
    return [collator(encoded.__getitems__(order[i:i + size])) for i in range(0, len(order), size)]


@pytest.mark.parametrize("modality, frames_as, mode", [
    ("text", "video", "train"), ("audio", "video", "train"), ("text+audio", "video", "generate"),
    ("text+audio", "images", "train"),
])
def test_wrapper_gives_the_batches_of_no_cache(processor, test_set, audio_dir, modality, frames_as, mode):
    dataset = _dataset(test_set, audio_dir, modality, max_frames=4 if frames_as == "images" else None)
    collator = VQACollator(processor, question_modality=modality, frame_size=FRAME, frames_as=frames_as, mode=mode)
    counting = _Counting(dataset)
    encoded = EncodedDataset(counting, collator.encode_items, 1 << 30)
    order = list(range(len(dataset)))
    for batch, cached in zip(_batches(dataset_with_index(dataset), collator, order, 4),  # first epoch: all kept
                             _batches(encoded, collator, order, 4), strict=True):
        _assert_same_model_input(batch, cached)
    assert encoded.nbytes > 0 and encoded.misses == len(dataset) and sorted(counting.reads) == order
    random.Random(0).shuffle(order)
    calls = []
    collator._encode = lambda batch: calls.append(batch)  # a later epoch must not run the processor at all
    plain = VQACollator(processor, question_modality=modality, frame_size=FRAME, frames_as=frames_as, mode=mode)
    for i in range(0, len(order), 3):  # other batch compositions, other longest clips
        _assert_same_model_input(plain([dataset[j] | {"index": j} for j in order[i:i + 3]]),
                                 collator(encoded.__getitems__(order[i:i + 3])))
    assert calls == [] and len(counting.reads) == len(dataset) and encoded.hits == len(dataset)


def dataset_with_index(dataset: SurgicalVQADataset):
    """``dataset`` whose items carry their index, as EncodedDataset passes on items it does not keep."""
    return EncodedDataset(dataset, lambda items: pytest.fail("nothing is encoded without a bound"), 0)


def test_rebuilt_batch_gives_the_same_logits(processor, test_set, audio_dir, tiny_model_dir):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    dataset = _dataset(test_set, audio_dir, "text+audio", n=6)
    collator = VQACollator(processor, question_modality="text+audio", frame_size=FRAME)
    encoded = EncodedDataset(dataset, collator.encode_items, 1 << 30)
    encoded.__getitems__([0, 1, 2])
    encoded.__getitems__([3, 4, 5])
    mixed = [0, 4, 2]  # the longest clip differs from both batches the items were kept from
    fresh = collator([dataset[i] for i in mixed])
    rebuilt = collator(encoded.__getitems__(mixed))
    assert "media_ids" in rebuilt and rebuilt["media_ids"].tolist() == mixed
    with torch.no_grad():
        a = model(**fresh).logits
        b = model(**{k: v for k, v in rebuilt.items() if k != "media_ids"}).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bound_and_last_reads(processor, test_set, audio_dir):
    dataset = _dataset(test_set, audio_dir, "text")
    collator = VQACollator(processor, question_modality="text", frame_size=FRAME)
    one = EncodedDataset(dataset, collator.encode_items, 1 << 30)
    one[0]
    size = one.nbytes
    bounded = EncodedDataset(dataset, collator.encode_items, int(2.5 * size))
    bounded.__getitems__(list(range(8)))
    assert len(bounded._kept) == 2 and bounded.nbytes <= 2.5 * size
    bounded.clear()  # the training loop is over
    assert bounded._kept == {} and bounded.nbytes == 0
    off = EncodedDataset(dataset, collator.encode_items, 0)
    item = off[3]
    assert item["frames"] is not None and item["index"] == 3 and "encoding" not in item and off._kept == {}
    # a run reading every item twice: kept after the first read, dropped (memory returned) at the second
    counting = _Counting(dataset)
    twice = EncodedDataset(counting, collator.encode_items, 1 << 30, reads=2)
    twice.__getitems__([0, 1, 2])
    assert sorted(twice._kept) == [0, 1, 2] and twice.nbytes > 0
    again = twice.__getitems__([2, 0, 1])
    assert all("encoding" in item for item in again) and twice._kept == {} and twice.nbytes == 0
    assert counting.reads == [0, 1, 2]
    once = EncodedDataset(counting, collator.encode_items, 1 << 30, reads=1)  # one epoch: nothing is ever kept
    assert all("encoding" not in item for item in once.__getitems__([4, 5])) and once._kept == {}
    assert run_reads(160, 8, 1, 60, 3.0) == 3 and run_reads(160, 8, 1, 61, 3.0) == 4  # the harness: 20 steps an epoch
    assert run_reads(161, 8, 2, 60, 1.0) == 6 and run_reads(160, 8, 1, -1, 2.5) == 3


def test_mixed_batches_of_kept_and_new_items(processor, test_set, audio_dir):
    """A batch of kept and new items is what the processor makes of them; the new ones are encoded together."""
    dataset = _dataset(test_set, audio_dir, "text+audio", n=6)
    collator = VQACollator(processor, question_modality="text+audio", frame_size=FRAME)
    encoded = EncodedDataset(dataset, collator.encode_items, 1 << 30)
    encoded.__getitems__([0, 2])
    calls = []
    encoded.encode = lambda items: calls.append(len(items)) or collator.encode_items(items)
    batch = encoded.__getitems__([4, 0, 3, 2])
    assert [("encoding" in item) for item in batch] == [True, True, True, True] and calls == [2]
    plain = VQACollator(processor, question_modality="text+audio", frame_size=FRAME)
    _assert_same_model_input(plain([dataset[i] for i in (4, 0, 3, 2)]), collator(batch))
    half = [batch[1], dataset[5] | {"index": 5}]  # an item passed on as read (not kept) beside a kept one
    _assert_same_model_input(plain([dataset[0], dataset[5]]), collator(half))
