"""Qwen2.5-Omni (``qwen2_5_omni``), laid out like a transformers model folder:

    modeling.py     Qwen25OmniThinker: the thinker with token merging, kept tower outputs, labelled-only logits
    backbone.py     the backbone training, evaluation and merging use (BACKBONE)

The processor is transformers' own ``Qwen2_5OmniProcessor``. Importing this package loads no model code.
"""

from surgvqa.backbones.qwen2_5_omni.backbone import BACKBONE, QWEN2_5_OMNI, Qwen25Omni

__all__ = ["BACKBONE", "QWEN2_5_OMNI", "Qwen25Omni"]
