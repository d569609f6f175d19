"""Sequence packing for training (``--packing``): several samples per row, up to ``--model_max_length`` tokens.

* **Which samples share a row** is decided once, before training, from the pre-flight token counts the length check
  computes anyway (:meth:`surgvqa.collate.VQACollator.sequence_length`: frame size and audio length, nothing
  decoded): first fit, the samples taken in a random order seeded by the run's seed (:func:`plan_packs`). Not
  first-fit decreasing: it fills rows a little better (22 rows instead of 23 for the 160 samples of the
  LLaMA-Factory comparison at 1024 tokens) but puts samples of similar length together, and a sample's length
  follows its question type (the question and answer texts), so every row would hold one kind of question. The
  packs stay the same every epoch; the Trainer's sampler shuffles their order, and
  ``--per_device_train_batch_size`` counts rows (packs), as in LLaMA-Factory.
* **A packed batch** is the ordinary batch of all its samples (:class:`~surgvqa.collate.VQACollator`: one encoder
  call, answers, labels, the media tensors in sample order), whose token rows are then laid end to end, pack by
  pack (:class:`PackingCollator`), plus ``packed_lengths``: each row's sample lengths. Labels move with their
  tokens, so the labelled-only loss sees exactly the labelled tokens of the unpacked batch.
* **The model** keeps every sample apart: each sample's own M-RoPE positions (the family's position function, per
  sample) and a block-diagonal causal mask (:mod:`surgvqa.backbones.common.packing`). Token merging and kept tower
  outputs are per sample and work unchanged.

Evaluation and generation never pack (their collators are the plain one).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from surgvqa.collate import IGNORE_INDEX, VQACollator

logger = logging.getLogger("surgvqa.train")


def plan_packs(lengths: Sequence[int | None], capacity: int, seed: int | None = None) -> list[list[int]]:
    """Sample indices grouped into packs of at most ``capacity`` tokens, first fit: each sample into the first pack
    with room, else a new pack; the samples taken in a random order seeded by ``seed`` (None: longest first,
    first-fit decreasing). A sample of unknown length (``None``: video files, whose frame count is known only once
    decoded) or longer than ``capacity`` gets a pack of its own. Deterministic; the samples of a pack keep their
    order in the data."""
    packs: list[list[int]] = []
    room: list[int] = []
    order = [i for i, n in enumerate(lengths) if n is not None]
    if seed is None:
        order.sort(key=lambda i: -lengths[i])
    else:
        random.Random(seed).shuffle(order)
    for i in order:
        n = lengths[i]
        for p, free in enumerate(room):
            if n <= free:
                packs[p].append(i)
                room[p] -= n
                break
        else:
            packs.append([i])
            room.append(capacity - n)
    alone = [[i] for i, n in enumerate(lengths) if n is None]
    return sorted((sorted(pack) for pack in packs + alone), key=lambda pack: pack[0])


class PackedDataset(Dataset):
    """The packs of a dataset: item ``i`` is the list of the dataset items of pack ``i``."""

    def __init__(self, dataset: Dataset, packs: list[list[int]]):
        self.dataset = dataset
        self.packs = packs

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, index: int) -> list[dict]:
        pack = self.packs[index]
        if hasattr(self.dataset, "__getitems__"):  # a pack read at once (EncodedDataset: one processor call)
            return self.dataset.__getitems__(pack)
        return [self.dataset[i] for i in pack]


@dataclass
class PackingCollator:
    """Packs (lists of dataset items) → one row per pack: the plain collator's batch of all their samples with the
    token rows laid end to end, plus ``packed_lengths`` (rows, most samples in a row). Training only."""

    collator: VQACollator

    def __post_init__(self) -> None:
        if self.collator.mode != "train":
            raise ValueError("packing is for training batches: generation and evaluation collate samples one per row")

    def __call__(self, packs: list[list[dict]]) -> dict[str, Any]:
        batch = self.collator([item for pack in packs for item in pack])
        lengths = batch["attention_mask"].sum(-1).tolist()
        rows, labels, sizes, first = [], [], [], 0
        for pack in packs:
            members = range(first, first + len(pack))
            rows.append(torch.cat([batch["input_ids"][i, :lengths[i]] for i in members]))
            labels.append(torch.cat([batch["labels"][i, :lengths[i]] for i in members]))
            sizes.append(torch.tensor([lengths[i] for i in members], dtype=torch.long))
            first += len(pack)
        limit = self.collator.model_max_length
        for pack, row in zip(packs, rows, strict=True):
            if limit is not None and row.numel() > limit:
                keys = ", ".join(str(item["sample"].key) for item in pack)
                raise RuntimeError(f"a pack of {row.numel()} tokens > model_max_length {limit} ({keys}): the "
                                   "pre-flight token counts disagree with the collator")
        batch["input_ids"] = pad_sequence(rows, batch_first=True,
                                          padding_value=self.collator.processor.tokenizer.pad_token_id)
        batch["labels"] = pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX)
        batch["attention_mask"] = pad_sequence([torch.ones_like(row) for row in rows], batch_first=True)
        batch["packed_lengths"] = pad_sequence(sizes, batch_first=True)
        return batch


def packed_training_set(dataset: Dataset, collator: VQACollator, lengths: Sequence[int | None], max_length: int,
                        seed: int) -> tuple[PackedDataset, PackingCollator]:
    """``--packing``: the training set as packs of at most ``max_length`` tokens (:func:`plan_packs` on the
    pre-flight token counts ``lengths``, in the order ``seed`` gives) and the collator laying each pack out as one
    row."""
    packs = plan_packs(lengths, max_length, seed)
    known = [n for n in lengths if n is not None]
    logger.info("packing: %d samples in %d rows of up to %d tokens (first fit in a seeded random order; %.1f %% of "
                "the rows' tokens are samples)", len(lengths), len(packs), max_length,
                100 * sum(known) / (len(packs) * max_length) if known else 0.0)
    return PackedDataset(dataset, packs), PackingCollator(collator)


__all__ = ["PackedDataset", "PackingCollator", "packed_training_set", "plan_packs"]
