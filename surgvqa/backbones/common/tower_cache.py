"""Frozen tower outputs kept per item: a later epoch reuses what the vision and audio towers made of an item.

With LoRA on the language model only, the towers are frozen and deterministic (no trainable parameter, no dropout):
an item's frames and spoken question give the same embeddings every epoch. A family's model class that holds an
:class:`EncoderOutputCache` (its ``tower_cache``) asks it in its forward pass when the batch names its items
(``media_ids``: the rows' indices in the training set, :mod:`surgvqa.encoded`): items whose outputs are kept are
served from memory, a batch with any item not kept runs the tower as usual and keeps each item's share.
The language model is shown the embeddings the tower made of the same pixels and samples. The M-RoPE position ids
of each row (a Python loop over the tokens in ``get_rope_index``) are kept the same way.

A tower that is trainable (vision LoRA, a trained projector inside it) or has a dropout probability above 0 while in
training mode is never cached (:func:`deterministic_frozen`). Outputs and positions are kept on the CPU, bounded
together by ``max_bytes``, and moved back to the model's device when used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def deterministic_frozen(tower: torch.nn.Module) -> bool:
    """No trainable parameter, and no dropout that could act (the module in eval mode, or every probability 0)."""
    if any(p.requires_grad for p in tower.parameters()):
        return False
    if not tower.training:
        return True
    for module in tower.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            return False
        config = getattr(module, "config", None)
        if config is not None and any(
            "dropout" in name and isinstance(value, (int, float)) and value > 0
            for name, value in vars(config).items()
        ):
            return False
    return True


class EncoderOutputCache:
    """Per item and tower: the tower's output rows (CPU tensors); per item and row of tokens: its M-RoPE positions;
    both added while their bytes together stay under ``max_bytes``."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.entries: dict[tuple[str, int], torch.Tensor] = {}
        #: (item, hash of the row's real tokens) -> (M-RoPE positions of those tokens, delta): a few KB per row
        self.positions: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def rows(self, kind: str, ids: list[int], run: Callable[[], list[torch.Tensor]], device: torch.device
             ) -> list[torch.Tensor]:
        """Each item's output rows of the tower ``kind``: all kept ones, else ``run()`` (one tensor per item),
        each item's share kept while the bound allows."""
        parts = [self.entries.get((kind, i)) for i in ids]
        if None not in parts:
            self.hits += 1
            return [part.to(device) for part in parts]
        self.misses += 1
        parts = run()
        for i, part in zip(ids, parts, strict=True):
            if (kind, i) not in self.entries and self._fits(part):
                self.entries[(kind, i)] = part.detach().to("cpu", copy=True)
        return parts

    def _fits(self, *tensors: torch.Tensor) -> bool:  # counted when they fit
        size = sum(t.numel() * t.element_size() for t in tensors)
        fits = self.bytes + size <= self.max_bytes
        self.bytes += size if fits else 0
        return fits

    def rope_index(self, ids: list[int], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   run: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """``run(input_ids, attention_mask)`` (the model's rope index: positions (3, batch, length), deltas), each row
        kept under its item and its real tokens: the positions follow from the tokens, the grids and the video clock
        alone (the item's media). Padding columns get position 1, as the Qwen rope index gives them."""
        if attention_mask is None or attention_mask.dim() != 2 or input_ids.shape[0] != len(ids):
            return run(input_ids, attention_mask)
        real = attention_mask == 1
        keys = [(i, hash(row[keep].cpu().numpy().tobytes())) for i, row, keep in zip(ids, input_ids, real, strict=True)]
        kept = [self.positions.get(key) for key in keys]
        if None not in kept:
            positions = torch.ones((3, *input_ids.shape), dtype=input_ids.dtype, device=input_ids.device)
            for row, (pos, _) in enumerate(kept):
                positions[:, row, real[row]] = pos.to(positions.device)
            return positions, torch.stack([delta for _, delta in kept]).to(input_ids.device)
        positions, deltas = run(input_ids, attention_mask)
        if positions.shape == (3, *input_ids.shape) and deltas.shape[0] == len(ids):
            for row, key in enumerate(keys):
                kept = (positions[:, row, real[row]].cpu(), deltas[row].cpu())
                if key not in self.positions and self._fits(*kept):
                    self.positions[key] = kept
        return positions, deltas


__all__ = ["EncoderOutputCache", "deterministic_frozen"]
