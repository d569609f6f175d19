"""``SurgvqaTrainingArguments``: Hugging Face ``TrainingArguments`` plus what a run directory needs.

Its own module because importing ``TrainingArguments`` imports peft (and, when installed, bitsandbytes):
:mod:`surgvqa.arguments` imports it only when it parses arguments, after the command line has decided whether
bitsandbytes is needed (:mod:`surgvqa.lean_imports`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments


@dataclass
class SurgvqaTrainingArguments(TrainingArguments):
    """Hugging Face ``TrainingArguments`` plus what a run directory needs (see :mod:`surgvqa.rundir`)."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "empty a non-empty --output_dir before training (otherwise such a directory is refused)"},
    )


__all__ = ["SurgvqaTrainingArguments"]
