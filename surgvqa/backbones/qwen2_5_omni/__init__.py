"""Qwen2.5-Omni (``qwen2_5_omni``): ``modeling.py`` (the thinker class), ``processing.py`` (its processor asked
through the shared Qwen encoder), ``backbone.py`` (BACKBONE). Importing this package loads no model code."""

from surgvqa.backbones.qwen2_5_omni.backbone import BACKBONE, QWEN2_5_OMNI, Qwen25Omni

__all__ = ["BACKBONE", "QWEN2_5_OMNI", "Qwen25Omni"]
