"""``SurgvqaTrainingArguments``: Hugging Face ``TrainingArguments`` plus what a run directory needs.

Its own module because importing ``TrainingArguments`` imports peft (and, when installed, bitsandbytes):
:mod:`surgvqa.arguments` imports it only when it parses arguments, after the command line has decided whether
bitsandbytes is needed (:mod:`surgvqa.lean_imports`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property

from transformers import TrainingArguments


@dataclass
class SurgvqaTrainingArguments(TrainingArguments):
    """Hugging Face ``TrainingArguments`` plus what a run directory needs (see :mod:`surgvqa.rundir`)."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "empty a non-empty --output_dir before training (otherwise such a directory is refused)"},
    )

    @cached_property
    def _setup_devices(self):
        """``--deepspeed`` with ``--use_cpu`` on processes launched together (torchrun) on a machine without an
        accelerator: DeepSpeed over gloo. accelerate (1.16) starts DeepSpeed only when not on CPU, and off CPU finds
        no process-group backend without an accelerator, so the process state is configured here, before
        TrainingArguments sets up its devices, through accelerate's ``use_configured_state``; DeepSpeed picks its
        CPU accelerator itself (``DS_ACCELERATOR=cpu`` forces it)."""
        if self.deepspeed and self.use_cpu and int(os.environ.get("LOCAL_RANK", -1)) != -1:
            import torch
            from accelerate import PartialState

            if not torch.accelerator.is_available() and not PartialState._shared_state:
                os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
                try:
                    PartialState(backend=self.ddp_backend or "gloo")
                finally:
                    del os.environ["ACCELERATE_USE_DEEPSPEED"]
                self.accelerator_config.use_configured_state = True
        return TrainingArguments._setup_devices.func(self)


__all__ = ["SurgvqaTrainingArguments"]
