"""Video token merging (``token_kept_ratio``): fewer video tokens enter the language model, same positions for text.

Each video's tokens, as they leave the vision tower's patch merger (one per 2x2 patches of a temporal patch of two
frames), are reduced to ``kept_video_tokens(n, r) = ceil(r * n)`` by bipartite soft matching (ToMe, Bolya et al.
2023, as AuroraCap uses it for video captioning), repeated until the count is reached:

* the current tokens are split into two sets A and B; each token of A is matched with its most similar token of B
  (cosine similarity of the features themselves), and the A tokens with the most similar matches are merged into
  theirs. Matching is over the whole video, so a token merges with a neighbour in its frame group or with the same
  spot of another frame group, whichever is closer. The split is a 3-D checkerboard on the (t, h, w) grid: ToMe's
  alternation in sequence order would put the same spot of consecutive frame groups (``h * w`` tokens apart, an
  even number) always in the same set, where they can never merge;
* a merged token is the size-weighted mean of every original token it holds (``sizes`` counts them);
* a merged token takes the M-RoPE position (t, h, w) of the B token it was merged into (a token it represents),
  computed from the full grid, so the temporal and spatial layout the model was pretrained on is kept and the
  text after the video keeps exactly the positions it has without merging.

The similarity is computed on the features entering the language model (not on the vision tower's keys or on
pixel statistics): they are what the merged token averages, so the two tokens that are closest in that space are
the ones whose mean loses least; and they need no hook inside the vision tower (whose window attention reorders
tokens) and no second image pass in the collator. The count per video is deterministic, so the collator writes
``ceil(r * n)`` placeholders without seeing any feature (:func:`merge_placeholders`), and only which tokens merge
is decided in the model. The matching itself carries no gradient (an argmax); the means do, so a trained vision
LoRA or projector learns through the merge.

The model classes of the families call these functions in their own forward pass (``token_kept_ratio`` on the
model); ``r = 1.0`` is off and the model runs its stock code path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from surgvqa.errors import UserError


def kept_video_tokens(num_tokens: int, token_kept_ratio: float = 1.0) -> int:
    """Video tokens entering the language model when token merging keeps ``token_kept_ratio`` of a video's
    ``num_tokens``: ``ceil(r * n)`` per video (``r = 1.0``: all of them)."""
    if not 0.0 < token_kept_ratio <= 1.0:
        raise UserError(f"token_kept_ratio must be in (0, 1], got {token_kept_ratio!r}")
    return num_tokens if token_kept_ratio == 1.0 else math.ceil(token_kept_ratio * num_tokens)


@dataclass
class MergedVideo:
    """One video after merging: ``k`` tokens out of ``n``."""

    #: (k, hidden) the merged tokens, in the order their positions have in the sequence
    tokens: torch.Tensor
    #: (k,) ascending: the index, among the video's n tokens, of the token whose position each merged token takes
    keep: torch.Tensor
    #: (k,) how many original tokens each merged token averages
    sizes: torch.Tensor
    #: (n,) which merged token each original token went into
    source: torch.Tensor

    @property
    def full_count(self) -> int:
        return int(self.source.numel())


def _split(index: torch.Tensor, grid: tuple[int, int, int] | None, first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The two sets of a round (slots into the current tokens): A is merged into B.

    Tokens whose grid neighbours are alike must land in different sets, or they can never merge. On the full grid
    (``first``), a 3-D checkerboard: parity of t + h + w, so each token's four neighbours in its frame group and the
    same spot in the frame groups before and after are all in the other set. Later rounds sort the survivors by
    spot, then time (the same spot across time stays adjacent) and alternate. Without a grid: ToMe's alternation in
    sequence order.
    """
    m = index.numel()
    order = torch.arange(m, device=index.device)
    if grid is not None:
        _, height, width = grid
        t, h, w = index // (height * width), (index // width) % height, index % width
        if first:
            odd = (t + h + w) % 2 == 1
            if 0 < int(odd.sum()) < m:
                return order[~odd], order[odd]
        order = torch.sort((h * width + w) * grid[0] + t, stable=True).indices
    return order[0::2], order[1::2]


def bipartite_merge(x: torch.Tensor, k: int, grid: tuple[int, int, int] | None = None) -> MergedVideo:
    """Merge the ``n`` tokens ``x`` (n, hidden) of one video down to ``k`` by repeated bipartite soft matching.

    ``grid`` is the video's (t, h, w) token grid (``n = t * h * w``, tokens in that raster order), which lets the
    first round pair neighbours in space and time (see :func:`_split`). Each round merges at most the size of A;
    ``k >= n / 2`` takes one round. Deterministic for a given ``x`` (stable sorts, first index on ties) and
    independent of any other video.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"cannot merge {n} tokens down to {k}")
    if grid is not None and grid[0] * grid[1] * grid[2] != n:
        raise ValueError(f"a {grid[0]}x{grid[1]}x{grid[2]} grid does not hold {n} tokens")
    device = x.device
    precision = torch.promote_types(x.dtype, torch.float32)  # bf16 features are summed in fp32
    sums = x.to(precision)  # size-weighted sums: the merged token is sums / sizes
    sizes = torch.ones(n, device=device, dtype=precision)
    index = torch.arange(n, device=device)  # the original index whose position each current token takes
    source = torch.arange(n, device=device)  # the current token each original token is in
    first = True
    while index.numel() > k:
        m = index.numel()
        a_slots, b_slots = _split(index, grid, first)
        first = False
        count = min(m - k, a_slots.numel())
        with torch.no_grad():
            metric = F.normalize((sums / sizes[:, None]).detach(), dim=-1)
            scores = metric[a_slots] @ metric[b_slots].T
            best, dest = scores.max(dim=-1)
            order = torch.sort(best, descending=True, stable=True).indices
        merged_a, kept_a = order[:count], order[count:]
        # B tokens absorb the merged A tokens (sums and sizes add up: a size-weighted mean of everything held)
        b_sums = sums[b_slots].index_add(0, dest[merged_a], sums[a_slots[merged_a]])
        b_sizes = sizes[b_slots].index_add(0, dest[merged_a], sizes[a_slots[merged_a]])
        # where every current slot goes: kept A and all B survive, in sequence order; a merged A goes with its B
        survivors = torch.cat([a_slots[kept_a], b_slots])
        survivor_sums = torch.cat([sums[a_slots[kept_a]], b_sums])
        survivor_sizes = torch.cat([sizes[a_slots[kept_a]], b_sizes])
        by_position = torch.sort(index[survivors], stable=True).indices
        new_slot = torch.empty(m, dtype=torch.long, device=device)
        new_slot[survivors[by_position]] = torch.arange(survivors.numel(), device=device)
        new_slot[a_slots[merged_a]] = new_slot[b_slots[dest[merged_a]]]
        source = new_slot[source]
        index = index[survivors][by_position]
        sums = survivor_sums[by_position]
        sizes = survivor_sizes[by_position]
    return MergedVideo(tokens=(sums / sizes[:, None]).to(x.dtype), keep=index, sizes=sizes, source=source)


def merge_videos(features: Sequence[torch.Tensor], ratio: float, video_grid_thw: torch.Tensor | None = None,
                 merge_size: int = 1) -> list[MergedVideo]:
    """Each video's features (n_v, hidden) merged down to ``ceil(ratio * n_v)`` tokens; ``video_grid_thw`` (the
    processor's patch grid per video) and the vision tower's spatial ``merge_size`` give each video's token grid."""
    grids: list[tuple[int, int, int] | None] = [None] * len(features)
    if video_grid_thw is not None:
        grids = [(int(t), int(h) // merge_size, int(w) // merge_size) for t, h, w in video_grid_thw.tolist()]
    return [bipartite_merge(f, kept_video_tokens(f.shape[0], ratio), grid)
            for f, grid in zip(features, grids, strict=True)]


# ---------------------------------------------------------------------------------------------- placeholders
def _runs(row: Sequence[int], token_id: int) -> list[tuple[int, int]]:
    """(start, end) of every maximal run of ``token_id`` in ``row``."""
    runs, start = [], None
    for i, token in enumerate([*row, None]):
        if token == token_id and start is None:
            start = i
        elif token != token_id and start is not None:
            runs.append((start, i))
            start = None
    return runs


def merge_placeholders(rows: list[list[int]], video_token_id: int, full_counts: Sequence[int],
                       ratio: float) -> list[list[int]]:
    """The token rows with each video's run of ``n`` placeholders cut to ``kept_video_tokens(n, ratio)``.

    ``full_counts`` lists each video's token count (from its grid) in the order the videos appear in ``rows``.
    """
    out, video = [], 0
    for row in rows:
        new, last = [], 0
        for start, end in _runs(row, video_token_id):
            if video >= len(full_counts) or end - start != full_counts[video]:
                expected = full_counts[video] if video < len(full_counts) else "none"
                raise ValueError(f"video {video}: {end - start} placeholders in the prompt, the grid gives "
                                 f"{expected}: the processor's output is not one placeholder run per video")
            new.extend(row[last:start])
            new.extend([video_token_id] * kept_video_tokens(end - start, ratio))
            last, video = end, video + 1
        new.extend(row[last:])
        out.append(new)
    if video != len(full_counts):
        raise ValueError(f"{len(full_counts)} videos in the batch but {video} placeholder runs in the prompts")
    return out


# ------------------------------------------------------------------------------------------------- positions
def merged_position_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, video_token_id: int,
                        videos: Sequence[MergedVideo],
                        rope_index: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids (3, batch, length), rope_deltas (batch, 1)) of a batch whose videos were merged.

    Every row is expanded back to the full grid (each run of ``k`` placeholders becomes the video's ``n``),
    ``rope_index(full_ids, full_mask)`` (the model's own M-RoPE arithmetic) gives the full positions, and each
    column of the merged row takes its full column: text columns shift by the tokens merged away before them, a
    merged video token takes the column of the token it represents (``keep``). Padding columns get what the model
    gives padding; ``rope_deltas`` is what decoding adds to text positions (largest position + 1 - row length).
    """
    batch, length = input_ids.shape
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    full_rows, maps, video = [], [], 0
    for b in range(batch):
        cols = mask[b].nonzero().squeeze(1)
        ids = input_ids[b, cols]
        pieces, mapping, shift, last = [], [], 0, 0
        for start, end in _runs(ids.tolist(), video_token_id):
            if video >= len(videos) or end - start != videos[video].keep.numel():
                kept = videos[video].keep.numel() if video < len(videos) else "no"
                raise ValueError(f"row {b}: a run of {end - start} video placeholders where merging kept {kept} "
                                 "tokens: the collator and the model disagree on token_kept_ratio")
            merged = videos[video]
            pieces += [ids[last:start], ids.new_full((merged.full_count,), video_token_id)]
            mapping += [torch.arange(last, start, device=ids.device) + shift,
                        start + shift + merged.keep.to(ids.device)]
            shift += merged.full_count - (end - start)
            last, video = end, video + 1
        pieces.append(ids[last:])
        mapping.append(torch.arange(last, ids.numel(), device=ids.device) + shift)
        full_rows.append(torch.cat(pieces))
        maps.append((cols, torch.cat(mapping)))
    if video != len(videos):
        raise ValueError(f"{len(videos)} videos merged but {video} placeholder runs in input_ids")
    # one padding column more than needed: what the model gives padding (Omni 1, Qwen2-VL 0) is read from it
    width = max(row.numel() for row in full_rows) + 1
    full_ids = input_ids.new_zeros((batch, width))
    full_mask = input_ids.new_zeros((batch, width))
    for b, row in enumerate(full_rows):
        full_ids[b, : row.numel()] = row
        full_mask[b, : row.numel()] = 1
    full = rope_index(full_ids, full_mask)
    positions = full[:, :, -1:].expand(3, batch, length).clone()
    deltas = []
    for b, (cols, mapping) in enumerate(maps):
        positions[:, b, cols.to(full.device)] = full[:, b, mapping.to(full.device)]
        deltas.append(int(full[:, b, : full_rows[b].numel()].max()) + 1 - cols.numel())
    return positions, torch.tensor(deltas, device=full.device).unsqueeze(1)


__all__ = ["MergedVideo", "bipartite_merge", "kept_video_tokens", "merge_placeholders", "merge_videos", "merged_position_ids"]
