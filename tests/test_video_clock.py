"""The video clock (M-RoPE time step from the frames actually kept) and pixel budgets (pixel counts, smart_resize)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from surgvqa.backbones.common.qwen_processing import second_per_grid
from surgvqa.collate import VQACollator, frame_times
from surgvqa.data import MediaConfig, SurgicalVQADataset, load_samples
from surgvqa.media import PixelBudget, load_frame

VIDEO_FPS = 30.0  # a 30-fps source; the test_set's frame_numbers step by 4 (7.5 frames per second)


@pytest.fixture(scope="module")
def omni(tiny_model_dir):
    from surgvqa.backbones import LoadOptions, get_backbone

    backbone = get_backbone("qwen2_5_omni")
    model = backbone.load(str(tiny_model_dir), LoadOptions(dtype="float32"))
    processor = backbone.load_processor(str(tiny_model_dir))
    return model, processor


def _temporal_positions(model, processor, batch) -> list[int]:
    """The temporal M-RoPE position of each temporal grid of the (single) video in ``batch``."""
    position_ids, _ = model.get_rope_index(
        batch["input_ids"], video_grid_thw=batch["video_grid_thw"], attention_mask=batch["attention_mask"],
        second_per_grids=batch["video_second_per_grid"],
    )
    video_id = processor.tokenizer.convert_tokens_to_ids(processor.video_token)
    temporal = position_ids[0, 0][batch["input_ids"][0] == video_id]
    t, h, w = batch["video_grid_thw"][0].tolist()
    per_grid = temporal.view(t, (h * w) // 4)  # spatial merge 2x2: h*w/4 tokens per temporal grid
    assert (per_grid == per_grid[:, :1]).all()
    return (per_grid[:, 0] - per_grid[0, 0]).tolist()


def _items(test_set, max_frames):
    media = MediaConfig(frames_dir=str(test_set / "frames"), frame_size=56, max_frames=max_frames)
    samples, _ = load_samples(test_set / "in_002-001.jsonl", media)
    return SurgicalVQADataset(samples[:1], media)[0]


def test_subsampled_clip_keeps_the_clock_of_the_full_clip(omni, test_set):
    """8 frames subsampled to 4: each temporal grid sits where its frames sit in the 8-frame clip (to the
    processor's resolution, one grid step) and exactly at its frames' own time; the constant-fps clock does not."""
    model, processor = omni
    collator = VQACollator(processor, frame_size=56, mode="generate", video_fps=VIDEO_FPS)
    full, sub = _items(test_set, 8), _items(test_set, 4)
    numbers = full["sample"].extra["frame_numbers"]
    assert sub["frame_indices"] == [0, 2, 5, 7]

    pos8 = _temporal_positions(model, processor, collator([full]))
    pos4 = _temporal_positions(model, processor, collator([sub]))
    per_second = model.config.position_id_per_seconds
    step8 = second_per_grid(frame_times(full, 2.0, VIDEO_FPS), 2, 2.0) * per_second  # one grid of the full clip
    assert step8 == pytest.approx(8 / VIDEO_FPS * per_second)
    assert pos8 == [int(g * step8) for g in range(4)]
    # each grid of the subsampled clip starts at its first frame's real time ...
    kept = sub["frame_indices"]
    expected = [int((numbers[kept[2 * g]] - numbers[0]) / VIDEO_FPS * per_second) for g in range(2)]
    assert pos4 == expected
    # ... which lies inside the span of the grid that holds the same frame in the full clip
    for g, position in enumerate(pos4):
        home = pos8[kept[2 * g] // 2]
        assert home <= position < home + step8

    # the constant-fps clock (kept frames assumed adjacent) puts frame 5 where frames 2-3 sit in the full clip
    today = VQACollator(processor, frame_size=56, mode="generate")
    old8 = _temporal_positions(model, processor, today([{**full, "frame_indices": None}]))
    old4 = _temporal_positions(model, processor, today([{**sub, "frame_indices": None}]))
    assert old4 != pos4
    old_step, home = old8[1] - old8[0], old8[kept[2] // 2]
    assert not home <= old4[1] < home + old_step


def test_frame_clock_without_frame_numbers_uses_fps(test_set):
    sub = _items(test_set, 4)
    assert frame_times(sub, 2.0) == [0.0, 1.0, 2.5, 3.5]  # positions 0, 2, 5, 7 at 2 frames per second
    assert second_per_grid([0.0, 1.0, 2.5, 3.5], 2, 2.0) == pytest.approx(2.5)
    assert second_per_grid([0.0, 0.5, 1.0, 1.5], 2, 2.0) == pytest.approx(1.0)  # all kept: the processor's 2/fps
    assert second_per_grid([0.0], 2, 2.0) == pytest.approx(1.0)  # one frame: 2/fps
    # a video file's own presentation times win
    assert frame_times({"frames": [0, 0], "frame_times": [3.0, 3.2]}, 2.0, VIDEO_FPS) == [3.0, 3.2]


def test_video_clock_recorded_in_collator_output(omni, test_set):
    _, processor = omni
    collator = VQACollator(processor, frame_size=56, mode="train", video_fps=VIDEO_FPS)
    batch = collator([_items(test_set, 8), _items(test_set, 4)])
    torch.testing.assert_close(batch["video_second_per_grid"], torch.tensor([8 / VIDEO_FPS, 20 / VIDEO_FPS]))


# ---------------------------------------------------------------------------------------------- pixel budgets
def test_max_pixels_is_a_pixel_count():
    """1352x1080 (REAL-Colon) at 147,456 pixels: grid-aligned, within budget, far closer to it than the old
    longest-edge reading of the same number (isqrt -> 384 px edge -> 364x280 = 101,920 pixels)."""
    budget = PixelBudget(max_pixels=147_456)
    w, h = budget.target_size(1352, 1080)
    assert (w, h) == (420, 336)
    assert w % 28 == 0 and h % 28 == 0 and w * h <= 147_456
    assert w * h > 0.9 * 147_456 and w * h > 364 * 280
    assert abs(w / h - 1352 / 1080) < 0.02
    # Qwen3's 32-px grid
    w3, h3 = PixelBudget(max_pixels=147_456, factor=32).target_size(1352, 1080)
    assert w3 % 32 == 0 and h3 % 32 == 0 and w3 * h3 <= 147_456
    # the longest-edge shortcut is unchanged
    assert PixelBudget(frame_size=384).target_size(1352, 1080) == (364, 280)
    # min_pixels enlarges small frames (onto the grid)
    w, h = PixelBudget(frame_size=384, min_pixels=200 * 200).target_size(100, 80)
    assert w * h >= 200 * 200 and w % 28 == 0 and h % 28 == 0
    with pytest.raises(ValueError, match="pixel count"):
        PixelBudget(max_pixels=100)
    with pytest.raises(ValueError, match="min_pixels"):
        PixelBudget(max_pixels=28 * 28 * 4, min_pixels=28 * 28 * 5)


def test_loader_preflight_and_collator_agree_on_the_budget(omni, tmp_path):
    """A 1352x1080 JPEG under --max_pixels 147456: the dataset's resize, the length pre-flight's size and the
    processor (no second resize) all agree; the token count predicted equals the one produced."""
    import numpy as np
    from PIL import Image

    _, processor = omni
    frames = tmp_path / "frames" / "v1"
    frames.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (1080, 1352, 3), dtype=np.uint8)).save(frames / f"f{i}.jpg")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "q1", "video_id": "v1", "frames": ["f0", "f1"], "question": "Is it?",
                                "answer": "yes"}) + "\n")
    media = MediaConfig(frames_dir=str(tmp_path / "frames"), max_pixels=147_456)
    samples, _ = load_samples(data, media)
    item = SurgicalVQADataset(samples, media)[0]
    assert item["frames"][0].shape == (336, 420, 3)
    assert load_frame(frames / "f0.jpg", media.budget).shape == (336, 420, 3)
    collator = VQACollator(processor, mode="train", max_pixels=147_456)
    assert collator.frame_hw(1352, 1080) == (336, 420)
    batch = collator([item])
    t, h, w = batch["video_grid_thw"][0].tolist()
    assert (h * 14, w * 14) == (336, 420)  # the processor kept the dataset's size
    predicted = collator.sequence_length("Is it?", "yes", collator.frame_hw(1352, 1080), 2, None)
    assert predicted == int(batch["attention_mask"].sum())
    assert math.prod(batch["video_grid_thw"][0].tolist()) // 4 == int(
        (batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids(processor.video_token)).sum()
    )
