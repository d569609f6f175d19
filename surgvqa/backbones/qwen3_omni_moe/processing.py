"""Qwen3-Omni's processing: transformers' ``Qwen3OmniMoeProcessor`` asked through the shared Qwen-style encoder;
its output names each video's clock ``video_second_per_grid``."""

from __future__ import annotations

from surgvqa.backbones.common.qwen_processing import QwenProcessing


class Qwen3OmniMoeProcessing(QwenProcessing):
    clock_keys = ("video_second_per_grid",)


__all__ = ["Qwen3OmniMoeProcessing"]
