"""The graft's files of weights: where its parts are, the Whisper encoder out of any Whisper checkpoint, and
projector.safetensors (the one tensor file a graft directory always holds)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from surgvqa.backbones.qwen_vl_whisper.constants import PROJECTOR_FILE, PROJECTOR_PREFIX
from surgvqa.errors import UserError


def resolve_part(path: str | None, graft_dir: str | Path) -> Path:
    """A part's directory as config.json records it: absolute, or relative to the graft directory."""
    if not path:
        raise UserError(f"{graft_dir}/config.json records no path for a part of the graft")
    candidate = Path(path).expanduser()
    if not candidate.is_absolute():
        candidate = Path(graft_dir) / candidate
    if not (candidate / "config.json").is_file():
        raise UserError(f"{graft_dir}: the graft refers to {candidate}, which holds no config.json")
    return candidate.resolve()


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise UserError(f"{path} has no model.safetensors (pickled .bin checkpoints are not loaded)")


def mark_initialized(module: nn.Module) -> None:
    """Loaded weights must survive the composite's ``post_init`` (which initializes unflagged modules)."""
    for sub in module.modules():
        sub._is_hf_initialized = True
        for tensor in [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]:
            tensor._is_hf_initialized = True


def load_whisper_encoder(path: str | Path, dtype: torch.dtype | None = None, device=None):
    """The encoder of any Whisper checkpoint directory (WhisperForConditionalGeneration, WhisperModel or an
    encoder-only save): only the encoder's tensors are read."""
    from safetensors import safe_open
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    path = Path(path)
    config = WhisperConfig.from_pretrained(str(path))
    with torch.device("meta"):
        encoder = WhisperEncoder(config)
    wanted = set(encoder.state_dict())
    state: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(path):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                for prefix in ("model.encoder.", "encoder.", ""):
                    if key.startswith(prefix) and key[len(prefix):] in wanted:
                        state[key[len(prefix):]] = handle.get_tensor(key)
                        break
    missing = sorted(wanted - set(state))
    if missing:
        raise UserError(f"{path}: no Whisper encoder weights for {missing[:5]}{' …' if len(missing) > 5 else ''}")
    encoder.load_state_dict(state, strict=True, assign=True)
    encoder.to(device=device or "cpu", dtype=dtype or torch.float32)
    encoder.requires_grad_(False)
    mark_initialized(encoder)
    return encoder


def write_projector(state: dict[str, torch.Tensor], directory: str | Path) -> Path:
    """projector.safetensors from the projector's state dict (module-relative keys), keyed by the names the
    tensors have in the graft (``audio_projector.…``)."""
    from safetensors.torch import save_file

    if not state:
        raise ValueError("no audio projector weights to write")
    file = Path(directory) / PROJECTOR_FILE
    file.parent.mkdir(parents=True, exist_ok=True)
    tensors = {PROJECTOR_PREFIX + k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(file), metadata={"format": "pt"})
    return file


def read_projector(file: str | Path) -> dict[str, torch.Tensor]:
    """The projector's state dict (module-relative keys) from projector.safetensors."""
    from safetensors.torch import load_file

    return {k.removeprefix(PROJECTOR_PREFIX): v for k, v in load_file(str(file)).items()}


def write_projector_index(keys, directory: str | Path) -> Path:
    """A safetensors index naming projector.safetensors as the file holding the graft's trained weights (the
    projector's module-relative ``keys``): Trainer's ``resume_from_checkpoint`` then finds and loads them (the frozen
    VL model and encoder stay where config.json points; Trainer's warning about their "missing" keys is expected)."""
    index = Path(directory) / "model.safetensors.index.json"
    weight_map = {PROJECTOR_PREFIX + k: PROJECTOR_FILE for k in keys}
    record = {"metadata": {"surgvqa": "projector only: the VL model and the Whisper encoder are read from the "
                                      "vl_model_path / audio_encoder_path of config.json"},
              "weight_map": weight_map}
    index.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return index
