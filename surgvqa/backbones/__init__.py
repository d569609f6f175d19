"""Backbones: the only place that knows model families.

A backbone says how to load a checkpoint (into its model class), which linear layers LoRA wraps, which modules are
towers and projectors, and what its processor makes of the media (``processing_for``). Training, evaluation and
merging ask this table; a backbone never imports them. Adding a family is one package here (``modeling.py``,
``processing.py``, ``backbone.py`` with a module-level ``BACKBONE``; see docs/ARCHITECTURE.md) plus one entry in
:data:`BACKBONES` (nothing registers itself on import).
"""

from __future__ import annotations

import json
from pathlib import Path

from surgvqa.backbones import qwen2_5_omni, qwen3_omni_moe, qwen_vl_whisper
from surgvqa.backbones.base import Backbone, LoadOptions
from surgvqa.errors import UserError

#: every backbone, by name; ``backbone_for`` tries them in this order
BACKBONES: dict[str, Backbone] = {
    backbone.name: backbone
    for backbone in (qwen2_5_omni.BACKBONE, qwen_vl_whisper.BACKBONE, qwen3_omni_moe.BACKBONE)
}


def available() -> list[str]:
    return sorted(BACKBONES)


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise UserError(f"unknown backbone {name!r}; available: {', '.join(available())}") from None


def read_config(path: str | Path, flag: str = "--model_name_or_path") -> dict:
    """A model directory's config.json; ``flag`` is the option that named the directory (for the error)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise UserError(
            f"{config_file} not found: {flag} must be a local model directory "
            "(download the checkpoint first, e.g. `hf download Qwen/Qwen2.5-Omni-7B --local-dir …`)"
        )
    return json.loads(config_file.read_text())


def backbone_for(path: str | Path, name: str | None = None, flag: str = "--model_name_or_path") -> Backbone:
    """The backbone named, or the one whose ``matches`` accepts the checkpoint's config.json."""
    if name:
        return get_backbone(name)
    config = read_config(path, flag)
    for backbone in BACKBONES.values():
        if backbone.matches(config):
            return backbone
    raise UserError(
        f"no backbone matches {path} (model_type={config.get('model_type')!r}); "
        f"pass --backbone with one of: {', '.join(available())}"
    )


def processing_for(processor, **settings):
    """The encoder of the family whose processor ``processor`` is (``Backbone.processing``), with ``settings``; a
    processor no family names (a wrapper, a stand-in) gets the shared Qwen-style encoder."""
    name = type(processor).__name__
    for backbone in BACKBONES.values():
        if backbone.processor_class == name:
            return backbone.processing(processor, **settings)
    from surgvqa.backbones.common.qwen_processing import QwenProcessing

    return QwenProcessing(processor, **settings)


__all__ = ["BACKBONES", "Backbone", "LoadOptions", "available", "backbone_for", "get_backbone", "processing_for",
           "read_config"]
