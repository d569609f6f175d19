"""Frozen encoder outputs kept per item: a later epoch reuses what the vision and audio towers made of an item.

With LoRA on the language model only, the towers are frozen and deterministic (no trainable parameter, no dropout):
an item's frames and spoken question give the same embeddings every epoch. :func:`reuse_encoder_outputs` wraps the
model's ``get_video_features`` / ``get_image_features`` / ``get_audio_features`` for one forward pass: items whose
outputs are kept (keyed on the item's ``media_ids``, a hash of what the item is made of, see
:func:`surgvqa.collate.media_id`) are served from memory, a batch with any item not kept runs the tower as usual and
keeps each item's share. The language model is shown the embeddings the tower made of the same pixels and samples.
The M-RoPE position ids of each row (a Python loop over the tokens in ``get_rope_index``) are kept the same way.

A tower that is trainable (vision LoRA, a trained projector inside it) or has a dropout probability above 0 while in
training mode is never cached. Outputs are kept on the CPU (bounded by ``max_bytes``) and moved back to the model's
device when used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

#: the feature getters of a multimodal model, the tower each one runs, and the items it sees per call
_GETTERS = {"get_video_features": "visual", "get_image_features": "visual", "get_audio_features": "audio_tower"}


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
    """Per item and getter: the tower's output rows (CPU tensors), added while under ``max_bytes``."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.entries: dict[tuple[str, int], torch.Tensor] = {}
        #: (item, hash of the row's real tokens) -> (M-RoPE positions of those tokens, delta): a few KB per item
        self.positions: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def get(self, getter: str, ids: list[int]) -> list[torch.Tensor] | None:
        parts = [self.entries.get((getter, i)) for i in ids]
        if None in parts:
            self.misses += 1
            return None
        self.hits += 1
        return parts  # type: ignore[return-value]

    def put(self, getter: str, ids: list[int], parts: list[torch.Tensor]) -> None:
        for i, part in zip(ids, parts, strict=True):
            size = part.numel() * part.element_size()
            if (getter, i) not in self.entries and self.bytes + size <= self.max_bytes:
                self.entries[(getter, i)] = part.detach().to("cpu", copy=True)
                self.bytes += size


def feature_model(model: torch.nn.Module) -> torch.nn.Module | None:
    """The submodule that runs the towers through ``get_*_features`` (under PEFT, DDP, ...), or None."""
    for module in model.modules():
        if hasattr(module, "get_audio_features") and hasattr(module, "audio_tower") and hasattr(module, "visual"):
            return module
    return None


@contextlib.contextmanager
def reuse_encoder_outputs(model: torch.nn.Module, cache: EncoderOutputCache, media_ids: torch.Tensor | None
                          ) -> Iterator[None]:
    """For one forward pass of ``model`` on a batch whose rows are the items ``media_ids``: frozen towers' outputs
    served from / kept in ``cache`` (see the module docstring). A no-op when the model has no such towers or no ids."""
    owner = feature_model(model) if media_ids is not None else None
    if owner is None:
        yield
        return
    ids = [int(i) for i in media_ids.tolist()]
    wrapped = []
    for name, tower_name in _GETTERS.items():
        tower = getattr(owner, tower_name, None)
        if hasattr(owner, name) and tower is not None and deterministic_frozen(tower):
            original = getattr(owner, name)
            setattr(owner, name, _cached_getter(name, original, owner, cache, ids))
            wrapped.append(name)
    if hasattr(owner, "get_rope_index"):
        owner.get_rope_index = _cached_rope_index(owner.get_rope_index, cache, ids)
        wrapped.append("get_rope_index")
    try:
        yield
    finally:
        for name in wrapped:
            delattr(owner, name)  # the class's method again


def _cached_getter(name: str, original, owner: torch.nn.Module, cache: EncoderOutputCache, ids: list[int]):
    def getter(*args: Any, **kwargs: Any):
        items = _item_sizes(name, owner, args, kwargs)
        if items is None or len(items) != len(ids):  # not one entry per item (e.g. several videos per item)
            return original(*args, **kwargs)
        parts = cache.get(name, ids)
        if parts is not None:
            return _output(name, parts, items, _device(args, kwargs))
        out = original(*args, **kwargs)
        if getattr(out, "deepstack_features", None) is None:  # deepstack features (Qwen3) are not kept: none kept
            cache.put(name, ids, _split_output(name, out, items))
        return out

    return getter


def _cached_rope_index(original, cache: EncoderOutputCache, ids: list[int]):
    """The M-RoPE position ids of each row (3 x its real tokens) and its delta, kept under the item and the row's
    tokens: they follow from the tokens, the grids and the video clock alone (the item's media)."""

    def get_rope_index(input_ids=None, *args: Any, **kwargs: Any):
        mask = _arg(args, kwargs, 2, "attention_mask")
        if input_ids is None or mask is None or mask.dim() != 2 or input_ids.shape[0] != len(ids):
            return original(input_ids, *args, **kwargs)
        real = mask == 1
        keys = [(i, hash(row[keep].cpu().numpy().tobytes())) for i, row, keep in zip(ids, input_ids, real, strict=True)]
        kept = [cache.positions.get(key) for key in keys]
        if None not in kept:
            positions = torch.ones((3, *input_ids.shape), dtype=kept[0][0].dtype,  # float ids for Qwen3-Omni
                                   device=input_ids.device)
            for row, (pos, _) in enumerate(kept):
                positions[:, row, real[row]] = pos.to(positions.device)
            deltas = torch.stack([delta for _, delta in kept]).to(input_ids.device)
            return positions, deltas
        positions, deltas = original(input_ids, *args, **kwargs)
        if positions.shape == (3, *input_ids.shape) and deltas.shape[0] == len(ids):
            for row, key in enumerate(keys):
                cache.positions.setdefault(key, (positions[:, row, real[row]].cpu(), deltas[row].cpu()))
        return positions, deltas

    return get_rope_index


def _arg(args: tuple, kwargs: dict, index: int, key: str):
    return args[index] if len(args) > index else kwargs.get(key)


def _device(args: tuple, kwargs: dict) -> torch.device:
    return _arg(args, kwargs, 0, "input_features" if "input_features" in kwargs else "pixel_values").device


def _item_sizes(name: str, owner: torch.nn.Module, args: tuple, kwargs: dict) -> list[int] | None:
    """Per item: output rows (audio) or number of entries of ``pooler_output`` (vision: 1 video, or n frames)."""
    if name == "get_audio_features":
        mask = _arg(args, kwargs, 1, "feature_attention_mask")
        output_lengths = getattr(owner.audio_tower, "_get_feat_extract_output_lengths", None)
        if mask is None or output_lengths is None:  # a tower that does not say its output lengths: it runs
            return None
        _, lengths = output_lengths(mask.sum(-1))
        return [int(n) for n in lengths.tolist()]
    grid = _arg(args, kwargs, 1, "video_grid_thw" if name == "get_video_features" else "image_grid_thw")
    if grid is None:
        return None
    if name == "get_video_features":
        return [1] * grid.shape[0]
    return None  # images: which frames belong to which item is not known here; the tower runs


def _split_output(name: str, out, items: list[int]) -> list[torch.Tensor]:
    if name == "get_audio_features":
        return list(torch.split(out.last_hidden_state, items))
    return [torch.as_tensor(t) for t in out.pooler_output]  # one video per item


def _output(name: str, parts: list[torch.Tensor], items: list[int], device: torch.device):
    from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling

    parts = [p.to(device) for p in parts]
    if name == "get_audio_features":
        return BaseModelOutput(last_hidden_state=torch.cat(parts))
    return BaseModelOutputWithPooling(pooler_output=tuple(parts))
