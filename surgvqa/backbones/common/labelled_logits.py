"""Causal-LM loss with the LM head applied only to the positions that have a label.

A training sample is ~900 prompt tokens (8 frames at 384 px, the spoken and written question) and 10-20 answer
tokens; only the answer carries labels. Applying the LM head to every position materialises a
``positions x vocabulary`` fp32 logits tensor (Qwen: 152,064 columns, ~0.55 GB per sample, and as much again for its
gradient) of which all but the answer rows are thrown away by the loss. Here the model is asked for the logits of the
positions ``t`` whose next token ``t + 1`` is labelled only: the Trainer passes ``logits_mask =
next_token_selection(labels)`` and every family's model class maps ``hidden[logits_mask]`` through its head
(:func:`head_logits`). The loss is the same token-level cross-entropy as transformers' ``ForCausalLMLoss`` (mean over
labelled tokens, or sum divided by ``num_items_in_batch`` when the Trainer passes it for gradient accumulation / DDP
token averaging).

Generation, which needs the last position's logits, passes no mask. LoRA, QLoRA (the LM head stays unquantized),
gradient checkpointing (the head runs after the checkpointed layers) and DDP are unaffected.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def next_token_selection(labels: torch.Tensor) -> torch.Tensor:
    """Boolean ``(batch, seq)``: position ``t`` is kept when ``labels[:, t + 1]`` is a label (the shift of a causal LM)."""
    selection = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    selection[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return selection


def head_logits(head: torch.nn.Module, hidden: torch.Tensor, logits_mask: torch.Tensor | None) -> torch.Tensor:
    """``head(hidden)``; with ``logits_mask`` (boolean ``(batch, seq)``) only the masked positions, as
    ``(n_masked, vocab)`` rows in row-major order, which :func:`labelled_loss` expects."""
    if logits_mask is None:
        return head(hidden)
    if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(logits_mask.shape):
        raise RuntimeError(f"logits_mask of shape {tuple(logits_mask.shape)} does not fit the hidden states "
                           f"{tuple(hidden.shape)}: train with --loss_on_labelled_only False")
    return head(hidden[logits_mask.to(hidden.device)])


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
            "call the model with logits_mask=next_token_selection(labels)"
        )
    if num_items_in_batch is None:
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="mean")
    loss = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch
