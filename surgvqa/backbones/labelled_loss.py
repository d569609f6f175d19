"""Causal-LM loss with the LM head applied only to the positions that have a label.

A training sample is ~900 prompt tokens (8 frames at 384 px, the spoken and written question) and 10-20 answer
tokens; only the answer carries labels. Applying the LM head to every position materialises a
``positions x vocabulary`` fp32 logits tensor (Qwen: 152,064 columns, ~0.55 GB per sample, and as much again for its
gradient) of which all but the answer rows are thrown away by the loss. Here a forward pre-hook on the model's output
embedding (the LM head) hands it only the hidden states of positions ``t`` whose next token ``t + 1`` is labelled, and
the loss is the same token-level cross-entropy as transformers' ``ForCausalLMLoss`` (mean over labelled tokens, or sum
divided by ``num_items_in_batch`` when the Trainer passes it for gradient accumulation / DDP token averaging).

Nothing else changes: the hook lives only inside :func:`labelled_positions_only` (training and evaluation loss), so
generation, which needs the last position's logits, never sees it. LoRA, QLoRA (the LM head stays unquantized),
gradient checkpointing (the head runs after the checkpointed layers) and DDP (the hook sits on the module DDP wraps)
are unaffected.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def next_token_selection(labels: torch.Tensor) -> torch.Tensor:
    """Boolean ``(batch, seq)``: position ``t`` is kept when ``labels[:, t + 1]`` is a label (the shift of a causal LM)."""
    selection = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    selection[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return selection


@contextlib.contextmanager
def labelled_positions_only(head: torch.nn.Module, labels: torch.Tensor) -> Iterator[None]:
    """While active, ``head`` (the LM head) maps only the labelled positions: its output is ``(n_labelled, vocab)``.

    The model's ``logits`` are then rows in the order of ``labels[:, 1:][labels[:, 1:] != -100]`` (row-major), which
    :func:`labelled_loss` expects.
    """
    selection = next_token_selection(labels)

    def keep_labelled(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(selection.shape):
            raise RuntimeError(
                f"the LM head got hidden states of shape {tuple(hidden.shape)} but the labels are "
                f"{tuple(selection.shape)}: this model slices its hidden states before the head, so labelled-only "
                "logits cannot be used with it; train with --loss_on_labelled_only False"
            )
        return (hidden[selection.to(hidden.device)], *args[1:])

    handle = head.register_forward_pre_hook(keep_labelled)
    try:
        yield
    finally:
        handle.remove()


def labelled_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
                  ) -> torch.Tensor:
    """Cross-entropy of the labelled-position logits (``compute_loss_func`` of the Trainer).

    Equal to transformers' ``ForCausalLMLoss`` on full logits: fp32 logits, ``sum / num_items_in_batch`` when that is
    given, else the mean over labelled tokens (NaN when there are none, as there).
    """
    logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
    shifted = labels[:, 1:]
    targets = shifted[shifted != IGNORE_INDEX].to(logits.device)
    if logits.dim() != 2 or logits.shape[0] != targets.numel():
        raise RuntimeError(
            f"expected logits for the {targets.numel()} labelled positions, got shape {tuple(logits.shape)}: "
            "run the forward pass inside labelled_positions_only(...)"
        )
    if num_items_in_batch is None:
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="mean")
    loss = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch
