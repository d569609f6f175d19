"""Item encodings kept per dataset index: a later epoch reads an item's prompt ids and media tensors from memory
instead of decoding its frames and audio and running the processor again.

:class:`EncodedDataset` wraps the dataset of a training run: ``encoded[i]`` is ``{"sample", "index", "encoding"}``,
the encoding made by ``encode(items)`` (the collator's :meth:`~surgvqa.collate.VQACollator.encode_items`: the
family's encoder, once for the items of a batch not kept yet, split per item), which the collator assembles into a
batch. The encoding is kept under ``i`` while the
bound allows and while the run will read the item again: ``reads`` says how often each item is read in the whole
run (the epochs ``max_steps`` needs), so an item read for the last time is dropped and a one-epoch run keeps
nothing. An item's encoding holds its own media only (the collator pads a batch), so whichever items a batch
combines, it is what the processor makes of them together.

Keyed by index: the dataset's items must not change during the run (a training run's samples and media are fixed
and fingerprinted when it starts). Items not to be kept (no bound, ``max_bytes`` 0, or a last read) pass through as the
dataset makes them, with their ``index``, and the collator encodes their batch at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset


def encoding_bytes(encoding: dict[str, Any]) -> int:
    """Memory an item's encoding holds: its prompt ids and its tensors."""
    return 8 * len(encoding["ids"]) + sum(t.numel() * t.element_size() for t in encoding["tensors"].values())


class EncodedDataset(Dataset):
    """``dataset`` with each item's encoding (``encode(items)``, one per item) kept under its index, up to ``max_bytes``, until its
    last read of the run (``reads``: reads of every item in the run; None: keep to the end)."""

    def __init__(self, dataset, encode: Callable[[list[dict]], list[dict[str, Any]] | None], max_bytes: int = 0,
                 reads: int | None = None) -> None:
        self.dataset = dataset
        self.encode = encode
        self.max_bytes = max_bytes
        self.reads = reads
        self.nbytes = 0
        self.hits = self.misses = 0
        self._kept: dict[int, dict[str, Any]] = {}
        self._read: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """The items of one batch (the DataLoader asks for them together): kept encodings served, the others read
        from the dataset and encoded in one call when any of them is to be kept, else passed on as they are (the
        collator then encodes the batch at once)."""
        out: list[dict[str, Any] | None] = [None] * len(indices)
        todo: list[tuple[int, int, bool]] = []  # (position in the batch, index, read for the last time)
        for pos, i in enumerate(indices):
            count = self._read[i] = self._read.get(i, 0) + 1
            last = self.reads is not None and count >= self.reads
            encoding = self._kept.pop(i, None) if last else self._kept.get(i)
            if encoding is None:
                todo.append((pos, i, last))
                continue
            self.hits += 1
            if last:
                self.nbytes -= encoding_bytes(encoding)
            out[pos] = {"sample": self.dataset.samples[i], "index": i, "encoding": encoding}
        self.misses += len(todo)
        items = [{**self.dataset[i], "index": i} for _, i, _ in todo]
        keeping = self.max_bytes > 0 and not all(last for _, _, last in todo)
        encodings = self.encode(items) if items and keeping else None
        if encodings is None:  # nothing to keep (or an encoding that cannot be kept per item)
            if keeping:
                self.max_bytes = 0
            for (pos, _, _), item in zip(todo, items, strict=True):
                out[pos] = item
            return out
        for (pos, i, last), item, encoding in zip(todo, items, encodings, strict=True):
            size = encoding_bytes(encoding)
            if not last and self.nbytes + size <= self.max_bytes:
                self._kept[i] = encoding
                self.nbytes += size
            out[pos] = {"sample": item["sample"], "index": i, "encoding": encoding}
        return out


    def clear(self) -> None:
        """Drop every kept encoding (the run reads no item again)."""
        self._kept.clear()
        self.nbytes = 0


def run_reads(steps_per_epoch: int, max_steps: int, num_train_epochs: float) -> int:
    """How often a training run reads each item: the epochs it starts (the Trainer's count: ``max_steps`` > 0
    optimizer steps of ``steps_per_epoch`` per epoch, else ``num_train_epochs`` rounded up)."""
    if max_steps > 0:
        return -(-max_steps // max(1, steps_per_epoch))
    return max(1, math.ceil(num_train_epochs))


__all__ = ["EncodedDataset", "encoding_bytes", "run_reads"]
