"""What a surgvqa output directory holds, and how to load any checkpoint for inference.

A training output (or a ``checkpoint-N`` inside it) holds the PEFT adapter (safetensors), the repaired processor,
``surgvqa_config.json`` (backbone, base model, preprocessing, LoRA, tokenizer repair) and, only when the vocabulary
grew, ``surgvqa_new_token_rows.safetensors`` with the new embedding rows. ``load_for_inference`` accepts an adapter
directory, a merged model directory or a plain base model (zero-shot).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from surgvqa.backbones import LoadOptions, backbone_for

logger = logging.getLogger(__name__)

CONFIG_NAME = "surgvqa_config.json"
NEW_ROWS_NAME = "surgvqa_new_token_rows.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def read_surgvqa_config(path: str | Path) -> dict:
    file = Path(path) / CONFIG_NAME
    return json.loads(file.read_text()) if file.is_file() else {}


def write_surgvqa_config(path: str | Path, config: dict) -> Path:
    file = Path(path) / CONFIG_NAME
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return file


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> str | None:
    """The base model an adapter was trained on (surgvqa_config first, then PEFT's record)."""
    recorded = read_surgvqa_config(path).get("base_model")
    if recorded:
        return recorded
    config = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    return config.get("base_model_name_or_path")


def save_new_token_rows(model, output_dir: str | Path, first_new_row: int) -> Path | None:
    """Save embedding/lm_head rows added by a vocabulary resize so a reload is bit-identical."""
    embed = model.get_input_embeddings().weight
    if embed.shape[0] <= first_new_row:
        return None
    tensors = {"embed_tokens": embed[first_new_row:].detach().cpu().contiguous()}
    head = model.get_output_embeddings()
    if head is not None and head.weight.shape[0] > first_new_row:
        tensors["lm_head"] = head.weight[first_new_row:].detach().cpu().contiguous()
    file = Path(output_dir) / NEW_ROWS_NAME
    save_file(tensors, str(file), metadata={"first_new_row": str(first_new_row)})
    return file


def load_new_token_rows(model, checkpoint: str | Path, vocab_size: int) -> bool:
    """Resize ``model`` to ``vocab_size`` and copy the saved new rows in. Returns False if nothing was saved."""
    file = Path(checkpoint) / NEW_ROWS_NAME
    if not file.is_file():
        return False
    from safetensors import safe_open

    with safe_open(str(file), "pt") as handle:
        first = int(handle.metadata()["first_new_row"])
    tensors = load_file(str(file))
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        embed[first:] = tensors["embed_tokens"].to(embed.dtype)
        if "lm_head" in tensors:
            head = model.get_output_embeddings().weight
            head[first:] = tensors["lm_head"].to(head.dtype)
    return True


def load_for_inference(
    checkpoint_path: str | Path,
    base_model_path: str | None = None,
    options: LoadOptions | None = None,
    backbone: str | None = None,
    merge_adapter: bool = False,
) -> tuple[Any, Any, dict]:
    """(model, processor, surgvqa_config) for an adapter dir, a merged model dir or a base model."""
    options = options or LoadOptions()
    checkpoint_path = Path(checkpoint_path)
    config = read_surgvqa_config(checkpoint_path)
    backbone_name = backbone or config.get("backbone")
    if is_adapter(checkpoint_path):
        from peft import PeftModel

        base = base_model_path or adapter_base(checkpoint_path)
        if not base:
            raise ValueError(f"{checkpoint_path} is an adapter without a recorded base model: pass --base_model_path")
        chosen = backbone_for(base, backbone_name)
        model = chosen.load(str(base), options)
        processor = chosen.load_processor(str(checkpoint_path), options.trust_remote_code)
        vocab = config.get("resized_vocab")
        if vocab:
            if not load_new_token_rows(model, checkpoint_path, vocab):
                raise ValueError(
                    f"{checkpoint_path} records a vocabulary resize to {vocab} but has no {NEW_ROWS_NAME}; "
                    "the adapter cannot be reloaded identically — re-save it from training"
                )
        model = PeftModel.from_pretrained(model, str(checkpoint_path), is_trainable=False)
        if merge_adapter:
            model = model.merge_and_unload()
        logger.info("loaded adapter %s on base %s", checkpoint_path, base)
    else:
        chosen = backbone_for(checkpoint_path, backbone_name)
        model = chosen.load(str(checkpoint_path), options)
        processor = chosen.load_processor(str(checkpoint_path), options.trust_remote_code)
    from surgvqa.tokenizer import repair_tokenizer

    repair_tokenizer(processor.tokenizer, model)
    model.eval()
    config.setdefault("backbone", chosen.name)
    return model, processor, config
