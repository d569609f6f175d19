"""Batched greedy generation shared by ``evaluate_checkpoint.py`` and the in-training evaluation.

Memory is per batch: every batch is generated, decoded and handed back before the next is built, so evaluating
5,000 samples needs no more memory than evaluating 20.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from surgvqa.backbones.base import runnable_attention
from surgvqa.tokenizer import end_of_turn_token


@dataclass
class Prediction:
    key: tuple[str, str]
    text: str
    stopped_by_eos: bool
    new_tokens: int
    latency_ms: float


def new_token_ids(output: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
    """The generated part of ``generate``'s output, whichever convention the model follows.

    Decoder-only ``generate`` returns prompt + new tokens; called with ``inputs_embeds`` only (no ids) it returns the
    new tokens alone. Mixing the two up gives "negative new-token counts" or answers that start inside the prompt.
    """
    if input_ids is None:
        return output
    prompt_len = input_ids.shape[1]
    if output.shape[1] >= prompt_len and torch.equal(output[:, :prompt_len].to(input_ids.device), input_ids):
        return output[:, prompt_len:]
    return output


def decode_new_tokens(tokens: torch.Tensor, tokenizer, eos_ids: Iterable[int]) -> list[tuple[str, bool, int]]:
    """(text, stopped_by_eos, new_tokens) per row; text is cut at the first end-of-turn token."""
    eos_ids = set(int(e) for e in eos_ids)
    pad_id = tokenizer.pad_token_id
    results = []
    for row in tokens.tolist():
        stopped, kept = False, []
        for token in row:
            if token in eos_ids:
                stopped = True
                break
            kept.append(token)
        count = len(kept) + (1 if stopped else 0)
        if not stopped:  # trailing pads only appear after another row finished; never count them
            while kept and kept[-1] == pad_id:
                kept.pop()
            count = len(kept)
        text = tokenizer.decode(kept, skip_special_tokens=True).strip()
        results.append((text, stopped, count))
    return results


def eos_token_ids(model, tokenizer) -> list[int]:
    """Where generation stops: the chat template's end-of-turn token, the tokenizer's eos, the model's eos."""
    end_of_turn = end_of_turn_token(tokenizer)
    ids = {tokenizer.convert_tokens_to_ids(end_of_turn) if end_of_turn else None, tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    ids.discard(None)
    return sorted(int(i) for i in ids)


def _to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype | None) -> dict[str, Any]:
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if dtype is not None and value.is_floating_point() and key in ("pixel_values", "pixel_values_videos",
                                                                           "input_features"):
                value = value.to(dtype)
        moved[key] = value
    return moved


@torch.inference_mode()
def generate_batch(model, tokenizer, batch: dict[str, Any], max_new_tokens: int = 64,
                   synced: bool = False) -> list[Prediction]:
    """Greedy-generate one collated batch (from ``VQACollator(mode="generate")``). ``synced``: the model's
    parameters are sharded over the processes (FSDP, ZeRO-3), so a process whose batch has ended keeps running
    forward passes until every process's has (``synced_gpus``); each process must call this equally often."""
    batch = dict(batch)
    keys = batch.pop("keys")
    batch.pop("labels", None)
    device = next(model.parameters()).device
    dtype = getattr(model, "dtype", None)
    inputs = _to_device(batch, device, dtype)
    eos = eos_token_ids(model, tokenizer)
    start = time.perf_counter()
    with runnable_attention(model):
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
            **({"synced_gpus": True} if synced else {}),
        )
    if not isinstance(output, torch.Tensor):  # GenerateOutput
        output = output.sequences
    elapsed_ms = (time.perf_counter() - start) * 1000 / len(keys)
    tokens = new_token_ids(output, inputs.get("input_ids"))
    return [
        Prediction(key=key, text=text, stopped_by_eos=stopped, new_tokens=n, latency_ms=elapsed_ms)
        for key, (text, stopped, n) in zip(keys, decode_new_tokens(tokens, tokenizer, eos), strict=True)
    ]


def generate_predictions(
    model,
    tokenizer,
    dataset,
    collator,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    num_workers: int = 0,
    synced: bool = False,
) -> Iterator[Prediction]:
    """Stream predictions for a dataset, batch by batch (``synced``: see :func:`generate_batch`)."""
    if collator.mode != "generate":
        raise ValueError("generation needs a collator built with mode='generate' (left padding, no answer)")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator, num_workers=num_workers)
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            yield from generate_batch(model, tokenizer, batch, max_new_tokens=max_new_tokens, synced=synced)
    finally:
        if was_training:
            model.train()
