"""What a surgvqa output directory holds, and how to load any checkpoint for inference.

A training output (or a ``checkpoint-N`` inside it) holds the PEFT adapter (safetensors), the repaired processor,
``surgvqa_config.json`` (:class:`surgvqa.run_config.RunConfig`: backbone, base model, preprocessing, LoRA,
tokenizer repair) and, only when the vocabulary
grew, ``surgvqa_new_token_rows.safetensors`` with the new embedding rows. ``load_for_inference`` accepts an adapter
directory, a merged model directory or a plain base model (zero-shot). ``weights_sha256`` names a checkpoint's
weights in a predictions file's meta line.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from surgvqa.backbones import Backbone, LoadOptions, backbone_for
from surgvqa.errors import UserError
from surgvqa.lora import check_converted, check_loftq_base
from surgvqa.run_config import RunConfig, resolve_recorded_path

logger = logging.getLogger(__name__)

NEW_ROWS_NAME = "surgvqa_new_token_rows.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def recorded_base(path: str | Path) -> tuple[str | None, str | None]:
    """(base model, its path relative to ``path``) as an adapter recorded them: surgvqa_config.json first, then
    PEFT's ``base_model_name_or_path`` (relative paths there are taken relative to the adapter directory)."""
    config = RunConfig.find(path)
    if config is not None and config.base_model:
        return config.base_model, config.base_model_relative
    peft = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    return peft.get("base_model_name_or_path"), None


def adapter_base(path: str | Path) -> str | None:
    """The base model an adapter was trained on, resolved to a directory that exists now (the recorded absolute
    path, else the same position relative to the adapter: both were moved); the recorded string if none exists."""
    base, relative = recorded_base(path)
    return resolve_recorded_path(base, path, relative) or base


def base_for_adapter(path: str | Path, base_model_path: str | None = None) -> str:
    """The existing base model directory to load an adapter on: ``base_model_path`` when given, else the recorded
    one (see :func:`adapter_base`). A missing one is a :class:`UserError` naming ``--base_model_path``."""
    if base_model_path:
        if not Path(base_model_path).is_dir():
            raise UserError(f"--base_model_path {base_model_path} is not a directory; pass the local model the "
                            "adapter was trained on")
        return base_model_path
    base, relative = recorded_base(path)
    if not base:
        raise UserError(f"{path} is an adapter without a recorded base model: pass --base_model_path (the local "
                        "model it was trained on)")
    found = resolve_recorded_path(base, path, relative)
    if found is None:
        tried = [base] + ([str(Path(path) / relative)] if relative else [])
        raise UserError(f"{path} was trained on {base}, which does not exist here (tried {', '.join(tried)}); "
                        "pass --base_model_path with the local model it was trained on")
    return found


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
) -> tuple[Any, Any, Backbone, RunConfig | None]:
    """(model, processor, backbone, record) for an adapter dir, a merged model dir or a base model: ``record`` is
    the checkpoint's surgvqa_config.json (None when it has none), ``backbone`` the one that loaded it."""
    options = options or LoadOptions()
    checkpoint_path = Path(checkpoint_path)
    run = RunConfig.find(checkpoint_path)
    backbone_name = backbone or (run.backbone if run is not None else None)
    if is_adapter(checkpoint_path):
        from peft import PeftModel

        check_converted(checkpoint_path)  # before any weight loads
        check_loftq_base(run.lora if run else None, checkpoint_path, options.load_in_4bit,
                         "evaluate with --load_in_4bit True")
        base = base_for_adapter(checkpoint_path, base_model_path)
        chosen = backbone_for(base, backbone_name, flag="--base_model_path")
        model = chosen.load(str(base), options)
        processor = chosen.load_processor(str(checkpoint_path), options.trust_remote_code)
        vocab = run.resized_vocab if run is not None else None
        if vocab:
            if not load_new_token_rows(model, checkpoint_path, vocab):
                raise UserError(
                    f"{checkpoint_path} records a vocabulary resize to {vocab} but has no {NEW_ROWS_NAME}; "
                    "the adapter cannot be reloaded identically — re-save it from training"
                )
        model = PeftModel.from_pretrained(model, str(checkpoint_path), is_trainable=False)
        if merge_adapter:
            model = model.merge_and_unload()
        logger.info("loaded adapter %s on base %s", checkpoint_path, base)
    else:
        chosen = backbone_for(checkpoint_path, backbone_name, flag="--checkpoint_path")
        model = chosen.load(str(checkpoint_path), options)
        processor = chosen.load_processor(str(checkpoint_path), options.trust_remote_code)
    from surgvqa.tokenizer import repair_tokenizer

    repair_tokenizer(processor.tokenizer, model)
    model.eval()
    return model, processor, chosen, run


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# Model weights in a checkpoint directory (an adapter, a merged model, a base model): *.safetensors / *.bin but
# training_args.bin.
_NOT_WEIGHTS = {"training_args.bin"}


def weights_sha256(checkpoint_path: str | Path) -> str:
    """One sha256 over the relative paths and bytes of every ``*.safetensors`` / ``*.bin`` weight file of a
    checkpoint directory, sub-directories included (a graft keeps its parts in ``vl_model/``, ``audio_encoder/``)
    but not the ``checkpoint-N/`` folders of a training output. A 7B model directory is read once (~15 GB); an
    adapter is a few MB."""
    root = Path(checkpoint_path)
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.suffix in (".safetensors", ".bin") and p.name not in _NOT_WEIGHTS
        and not any(part.startswith("checkpoint-") for part in p.relative_to(root).parts[:-1])
    ) if root.is_dir() else []
    if not files:
        raise UserError(
            f"--checkpoint_path {root} holds no weight files (*.safetensors / *.bin); give an adapter, merged "
            "model or base model directory"
        )
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + sha256_file(path).encode() + b"\n")
    return digest.hexdigest()
