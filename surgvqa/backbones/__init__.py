"""Backbone registry: the only place that knows model families.

A backbone says how to load a checkpoint (dtype, attention, quantization), which linear layers LoRA wraps, which
modules are encoder towers and projectors, and how a prompt refers to the media. Training, evaluation and merging
ask the registry; adding a family is one new module here plus one ``register`` call.
"""

from __future__ import annotations

import json
from pathlib import Path

from surgvqa.backbones.base import Backbone, LoadOptions
from surgvqa.errors import UserError

_REGISTRY: dict[str, Backbone] = {}


def register(backbone: Backbone) -> Backbone:
    if backbone.name in _REGISTRY:
        raise ValueError(f"backbone {backbone.name!r} is registered twice")
    _REGISTRY[backbone.name] = backbone
    return backbone


def available() -> list[str]:
    return sorted(_REGISTRY)


def get_backbone(name: str) -> Backbone:
    try:
        return _REGISTRY[name]
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
    for backbone in _REGISTRY.values():
        if backbone.matches(config):
            return backbone
    raise UserError(
        f"no backbone matches {path} (model_type={config.get('model_type')!r}); "
        f"pass --backbone with one of: {', '.join(available())}"
    )


import surgvqa.backbones.qwen_vl_whisper  # noqa: E402, F401  (registers itself)
from surgvqa.backbones import qwen2_5_omni  # noqa: E402  (registers itself)

__all__ = ["Backbone", "LoadOptions", "available", "backbone_for", "get_backbone", "qwen2_5_omni", "register"]
