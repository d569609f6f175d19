"""Item encodings kept per dataset index, so a later epoch neither decodes an item's media nor runs the processor.

``EncodedDataset(dataset, encode)[i]`` is ``{"sample", "index", "encoding"}``; ``encode(items)`` (the collator's
:meth:`~surgvqa.collate.VQACollator.encode_items`) encodes the items of a batch not kept yet in one processor call,
split per item, and the collator assembles the batch. An encoding is kept under ``i`` while the bound allows and
until the item's last read of the run (``reads``: the epochs the run starts), so a one-epoch run keeps nothing. Items
not to be kept (bound 0, a last read) pass through as the dataset makes them, with their ``index``, and the collator
encodes their batch at once. Keyed by index: a training run's items do not change while it runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset


def encoding_bytes(encoding: dict[str, Any]) -> int:
    return 8 * len(encoding["ids"]) + sum(t.numel() * t.element_size() for t in encoding["tensors"].values())


class EncodedDataset(Dataset):
    """``dataset`` with each item's encoding kept under its index, up to ``max_bytes``, until its ``reads``-th read
    (None: to the end)."""

    def __init__(self, dataset, encode: Callable[[list[dict]], list[dict[str, Any]] | None], max_bytes: int = 0,
                 reads: int | None = None) -> None:
        self.dataset, self.encode, self.max_bytes, self.reads = dataset, encode, max_bytes, reads
        self.nbytes = self.hits = self.misses = 0
        self._kept: dict[int, dict[str, Any]] = {}
        self._read: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """One batch's items (the DataLoader asks for them together): kept encodings served, the others read and,
        when any of them is to be kept, encoded in one call."""
        out: list[dict[str, Any] | None] = [None] * len(indices)
        todo: list[tuple[int, int, bool]] = []  # (position in the batch, index, read for the last time)
        for pos, i in enumerate(indices):
            self._read[i] = self._read.get(i, 0) + 1
            last = self.reads is not None and self._read[i] >= self.reads
            encoding = self._kept.pop(i, None) if last else self._kept.get(i)
            self.nbytes -= encoding_bytes(encoding) if last and encoding is not None else 0
            if encoding is None:
                todo.append((pos, i, last))
            else:
                out[pos] = {"sample": self.dataset.samples[i], "index": i, "encoding": encoding}
        self.hits += len(indices) - len(todo)
        self.misses += len(todo)
        items = [{**self.dataset[i], "index": i} for _, i, _ in todo]
        keeping = self.max_bytes > 0 and not all(last for _, _, last in todo)
        encodings = (self.encode(items) if items and keeping else None) or [None] * len(items)
        if keeping and items and encodings[0] is None:  # an encoding that cannot be split per item: stop keeping
            self.max_bytes = 0
        for (pos, i, last), item, encoding in zip(todo, items, encodings, strict=True):
            if encoding is not None and not last and self.nbytes + encoding_bytes(encoding) <= self.max_bytes:
                self._kept[i] = encoding
                self.nbytes += encoding_bytes(encoding)
            out[pos] = item if encoding is None else {"sample": item["sample"], "index": i, "encoding": encoding}
        return out

    def clear(self) -> None:
        """Drop every kept encoding (the run reads no item again)."""
        self._kept.clear()
        self.nbytes = 0


def run_reads(items: int, batch: int, accumulation: int, max_steps: int, num_train_epochs: float) -> int:
    """The epochs a training run starts (the Trainer's count), i.e. how often it reads each of its ``items``:
    ``batch`` items per forward (all processes), ``accumulation`` forwards per optimizer step."""
    steps_per_epoch = max(1, -(-items // max(1, batch)) // max(1, accumulation))
    return -(-max_steps // steps_per_epoch) if max_steps > 0 else max(1, math.ceil(num_train_epochs))


__all__ = ["EncodedDataset", "encoding_bytes", "run_reads"]
