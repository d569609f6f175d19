"""Audio lengths and the Whisper encoder window: one rule for the processor's placeholders and the model's tokens.

Every function here treats each clip of a batch by its own length (``lengths``: real mel frames per clip), so a
clip's audio tokens do not depend on which other clips share its batch:

- ``audio_window="full"`` (:func:`fit_window`): each clip gets its own 30 s window, its frames past its own end set
  to what zero-padded audio gives, whatever the batch padded them with;
- ``audio_window="trimmed"`` (:func:`encode_trimmed`): the encoder runs on the batch's longest clip, but each clip's
  convolutions see zeros past its end (as alone) and its attention sees only its own frames (key-padding mask).
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: WhisperFeatureExtractor's log-mel scaling: log10(max(power, 1e-10)), floored at (max - 8), then (x + 4) / 4
_LOG_FLOOR = (-10.0 + 4.0) / 4.0
_DYNAMIC_RANGE = 8.0 / 4.0


def mel_frames(num_samples: int, hop_length: int = 160, max_frames: int = 3000) -> int:
    """Mel frames holding real audio (Whisper: one per 10 ms), capped at the 30 s window."""
    return min(math.ceil(num_samples / hop_length), max_frames)


def encoder_frames(frames: int) -> int:
    """Whisper's stride-2 conv: output frames for ``frames`` mel frames (3000 → 1500)."""
    return (frames - 1) // 2 + 1


def audio_token_count(num_samples: int, *, pooling: int = 2, trim: bool = True, hop_length: int = 160,
                      max_frames: int = 3000) -> int:
    """``<|AUDIO|>`` placeholders for ``num_samples`` of 16 kHz audio (processor and model use this one rule)."""
    frames = mel_frames(num_samples, hop_length, max_frames) if trim else max_frames
    return encoder_frames(frames) // pooling


def _frame_mask(lengths: torch.Tensor, frames: int) -> torch.Tensor:
    """(batch, frames) True where a frame is one of the clip's own."""
    return torch.arange(frames, device=lengths.device)[None, :] < lengths[:, None]


def fit_window(features: torch.Tensor, window: int, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Features of exactly Whisper's 30 s window, as if each clip had been zero-padded to 30 s before the log-mel:
    zero samples give log10(1e-10), floored at the clip's maximum minus 8 (scaled: max - 2, never below -1.5).

    ``lengths`` (real frames per clip; default: all frames given) decides where each clip ends: its later frames -
    the batch's padding - are replaced, and its maximum is taken over its own frames only."""
    batch, bins, given = features.shape
    if lengths is None:
        lengths = torch.full((batch,), given, device=features.device)
    lengths = lengths.to(features.device).clamp(max=min(given, window))
    if given < window:
        features = torch.cat([features, features.new_zeros(batch, bins, window - given)], dim=-1)
    features = features[..., :window]
    own = _frame_mask(lengths, window)[:, None, :]
    peak = features.masked_fill(~own, float("-inf")).amax(dim=(1, 2))
    floor = torch.clamp(peak - _DYNAMIC_RANGE, min=_LOG_FLOOR)
    return torch.where(own, features, floor[:, None, None].to(features.dtype))


def encode_trimmed(encoder, features: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """``WhisperEncoder.forward`` on fewer than 3,000 frames (same layers, the first positions only), each clip as
    if alone: zeros past its end into both convolutions (their zero padding), and a key-padding mask so its frames
    attend only to its own. Returns (batch, encoder frames of the longest, d_model); rows past a clip's
    :func:`encoder_frames` are padding for the caller to cut."""
    batch, _, given = features.shape
    if lengths is None:
        lengths = torch.full((batch,), given, device=features.device)
    lengths = lengths.to(features.device).clamp(max=given)
    own = _frame_mask(lengths, given)[:, None, :].to(features.dtype)
    hidden = nn.functional.gelu(encoder.conv1(features * own)) * own
    hidden = nn.functional.gelu(encoder.conv2(hidden)).permute(0, 2, 1)
    hidden = hidden + encoder.embed_positions.weight[: hidden.shape[1]].to(hidden.dtype)
    hidden = nn.functional.dropout(hidden, p=encoder.dropout, training=encoder.training)
    keys = _frame_mask((lengths - 1).div(2, rounding_mode="floor") + 1, hidden.shape[1])
    mask = None
    if not bool(keys.all()):  # (batch, 1, 1, keys), additive: what WhisperAttention (sdpa / eager) adds to scores
        mask = torch.zeros(keys.shape, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(~keys, torch.finfo(hidden.dtype).min)[:, None, None, :]
    for layer in encoder.layers:
        hidden = layer(hidden, mask)
    return encoder.layer_norm(hidden)
