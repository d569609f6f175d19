"""Start-up: keep bitsandbytes out of a process that quantizes nothing (and DeepSpeed out of one that does not use
it, :func:`skip_deepspeed`).

peft imports bitsandbytes whenever it is installed (``peft/helpers.py``), and transformers imports peft with
``TrainingArguments``; bitsandbytes in turn imports ``torch._inductor`` (torch.compile) and starts its compile worker
pool. For an unquantized run that is seconds of start-up and a pool shut down at exit, for nothing.
:func:`skip_bitsandbytes` makes ``import bitsandbytes`` behave as if the package were not installed, for this
process only; peft and transformers then take their "not installed" paths, which an unquantized run never leaves.

Only the command-line entry points call it (``main()`` reading ``sys.argv``), and only after deciding from the
arguments that nothing is quantized: a library caller's process is never changed. This module imports nothing heavy.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def skip_bitsandbytes(needed: bool) -> bool:
    """Block ``import bitsandbytes`` for this process unless ``needed``; True when it is now blocked.

    Does nothing once bitsandbytes (or peft, which imports it) is already imported.
    """
    if needed or "bitsandbytes" in sys.modules or "peft" in sys.modules:
        return sys.modules.get("bitsandbytes", False) is None
    sys.modules["bitsandbytes"] = None  # importlib: "import of bitsandbytes halted"; find_spec() returns None
    return True


def needs_deepspeed(argv: list[str]) -> bool:
    """Whether a training command uses DeepSpeed: a ``--deepspeed`` flag, a ``deepspeed`` key in a YAML/JSON config
    given first, or ``accelerate launch`` with a DeepSpeed config (``ACCELERATE_USE_DEEPSPEED``)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes"):
        return True
    if any(arg == "--deepspeed" or arg.startswith("--deepspeed=") for arg in argv):
        return True
    if argv and is_recipe(argv[0]):
        try:
            values = recipe_values(argv[0])
        except Exception:  # unreadable: the real parser reports it; keep DeepSpeed importable meanwhile
            return True
        return not isinstance(values, dict) or bool(values.get("deepspeed"))
    return False


def is_recipe(arg: str) -> bool:
    """Whether a first training argument names a YAML/JSON recipe rather than a flag."""
    return arg.endswith((".yaml", ".yml", ".json")) and not arg.startswith("-")


def recipe_values(path: str) -> Any:
    """A recipe's contents as YAML reads them (JSON is YAML), unchecked: for the start-up guards, which only look
    for a few keys; training's parser reads and checks it (``surgvqa.arguments.read_recipe``)."""
    import yaml

    return yaml.safe_load(Path(path).read_text())


def skip_deepspeed(needed: bool) -> bool:
    """Block ``import deepspeed`` for this process unless ``needed``; True when it is now blocked.

    Where DeepSpeed is installed, accelerate imports it (with its CPU-Adam ops and ``deepspeed.comm``, ~20 MiB
    resident) the first time the Trainer unwraps the model, whether or not the run uses DeepSpeed.
    """
    if needed or "deepspeed" in sys.modules:
        return sys.modules.get("deepspeed", False) is None
    sys.modules["deepspeed"] = None  # as for bitsandbytes: find_spec() returns None, "not installed" paths taken
    return True


def checkpoint_needs_bitsandbytes(path: str | Path | None) -> bool:
    """A checkpoint saved quantized (``quantization_config`` in its config.json, or a surgvqa run trained on a
    4/8-bit base) loads through bitsandbytes."""
    if not path:
        return False
    directory = Path(path)
    for name in ("config.json", "surgvqa_config.json", "adapter_config.json"):
        file = directory / name
        if not file.is_file():
            continue
        try:
            config = json.loads(file.read_text())
        except (OSError, ValueError):
            return True  # unreadable: let the real loader decide, with bitsandbytes available
        if config.get("quantization_config") or config.get("quantization"):
            return True
        base = config.get("base_model_name_or_path") if name == "adapter_config.json" else None
        if base and base != str(path) and Path(base).is_dir() and checkpoint_needs_bitsandbytes(base):
            return True
    return False

