"""Packed rows on the model side: several training samples in one row, each attending only to itself and keeping
the M-RoPE positions it has alone.

A packed batch names its layout in ``packed_lengths`` (rows, most samples in a row): the token count of each sample
of a row, in order, zero-padded; a row's samples sit back to back from column 0 and padding follows. A family's
model class that supports packing takes it as a forward argument (a code path of its own, as for token merging):

* positions: the family's own position function runs on the samples as an ordinary right-padded batch
  (:func:`unpack`: one row per sample, in row-major order, so the media grids are met in the order the processor
  wrote them), and each sample's positions go back to its place in the packed row (:func:`repack`). M-RoPE's
  temporal row is not ``+1`` per token inside a sample (video tokens share a time step, text after a video jumps),
  so sample boundaries are never inferred from the positions;
* attention: a block-diagonal causal mask (:func:`packed_attention`) for SDPA and eager attention, built with
  transformers' own mask functions in the format each expects (boolean for SDPA, additive for eager) and handed to
  the model as a 4D ``attention_mask``, which transformers uses as given. Padding columns form one more block of
  their own, so no query row is empty (an all-masked row would give NaN in SDPA); nothing reads their outputs.
  FlashAttention-2 gets no mask: its variable-length kernel finds the samples in the text position row (a fourth
  position row on top of the three M-RoPE rows, restarting at 0 for every sample), which transformers reads only
  for a batch of one row.
"""

from __future__ import annotations

import torch

#: attention implementations a packed batch can run on
PACKED_ATTENTION = ("sdpa", "eager", "flash_attention_2")


def sample_spans(packed_lengths: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(row, start column, length)`` of every sample of a packed batch, in row-major order."""
    spans = []
    for row, lengths in enumerate(packed_lengths.tolist()):
        start = 0
        for length in lengths:
            if length > 0:
                spans.append((row, start, int(length)))
                start += int(length)
    return spans


def unpack(input_ids: torch.Tensor, packed_lengths: torch.Tensor, pad_id: int = 0
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples of a packed batch as an ordinary right-padded batch: ``(ids, attention_mask)``, one row per
    sample in row-major order."""
    spans = sample_spans(packed_lengths)
    longest = max(length for _, _, length in spans)
    ids = input_ids.new_full((len(spans), longest), pad_id)
    mask = input_ids.new_zeros((len(spans), longest))
    for i, (row, start, length) in enumerate(spans):
        ids[i, :length] = input_ids[row, start:start + length]
        mask[i, :length] = 1
    return ids, mask


def repack(values: torch.Tensor, packed_lengths: torch.Tensor, length: int, fill: int = 1) -> torch.Tensor:
    """Per-sample ``values`` (..., samples, longest) back in the packed layout (..., rows, length); padding columns
    get ``fill``."""
    rows = packed_lengths.shape[0]
    out = values.new_full((*values.shape[:-2], rows, length), fill)
    for i, (row, start, size) in enumerate(sample_spans(packed_lengths)):
        out[..., row, start:start + size] = values[..., i, :size]
    return out


def segment_ids(packed_lengths: torch.Tensor, length: int) -> torch.Tensor:
    """(rows, length): which sample of its row each column holds (0, 1, ...); padding columns are -1."""
    segments = torch.full((packed_lengths.shape[0], length), -1, dtype=torch.long, device=packed_lengths.device)
    for row, lengths in enumerate(packed_lengths.tolist()):
        start = 0
        for index, size in enumerate(size for size in lengths if size > 0):
            segments[row, start:start + size] = index
            start += size
    return segments


def text_positions(packed_lengths: torch.Tensor, length: int) -> torch.Tensor:
    """(rows, length): 0, 1, ... restarting at every sample (and once more for the padding): the text position
    row FlashAttention-2's variable-length path reads the samples' boundaries from."""
    segments = segment_ids(packed_lengths, length)
    columns = torch.arange(length, device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, columns, torch.zeros_like(columns)).cummax(dim=-1).values
    return columns - first


def packed_attention(packed_lengths: torch.Tensor, length: int, implementation: str, dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor | None:
    """The attention mask of a packed batch for ``implementation``: (rows, 1, length, length), causal within each
    sample and nothing across samples (boolean for SDPA, additive in ``dtype`` for eager); None for
    FlashAttention-2 (it reads :func:`text_positions`)."""
    from transformers.masking_utils import (
        and_masks,
        causal_mask_function,
        eager_mask,
        packed_sequence_mask_function,
        sdpa_mask,
    )

    if implementation == "flash_attention_2":
        return None
    if implementation not in PACKED_ATTENTION:
        raise ValueError(f"packed rows need one of {', '.join(PACKED_ATTENTION)} attention, not {implementation!r}")
    segments = segment_ids(packed_lengths, length).to(device)
    function = and_masks(causal_mask_function, packed_sequence_mask_function(segments))
    build = sdpa_mask if implementation == "sdpa" else eager_mask
    return build(batch_size=segments.shape[0], q_length=length, kv_length=length, q_offset=0, kv_offset=0,
                 mask_function=function, attention_mask=None, allow_is_causal_skip=False, dtype=dtype,
                 device=device)


__all__ = ["PACKED_ATTENTION", "packed_attention", "repack", "sample_spans", "segment_ids", "text_positions",
           "unpack"]
