"""LoRA variants, all PEFT's own: DoRA, rsLoRA, the initialisations (Gaussian, PiSSA, OLoRA) and LoRA+.

Each is one flag of :class:`surgvqa.arguments.LoraArguments`, recorded with the others in ``surgvqa_config.json``.
PiSSA and OLoRA move the adapter's starting point into the base weights (the base becomes a residual), so an
adapter trained that way applies to that residual, not to the checkpoint users load. Training therefore saves the
adapter as it was initialised (:data:`INITIAL_ADAPTER`) and converts the final one with PEFT's
``path_initial_model_for_weight_conversion``: a plain LoRA adapter (rank 2r) that applies to the original base.
Evaluation and merging refuse an adapter that was not converted (:func:`check_converted`).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from surgvqa.errors import UserError

#: ``--init_lora_weights`` values; ``pissa_niter_N`` is PiSSA through N subspace iterations (fast SVD)
INIT_CHOICES = ("default", "gaussian", "pissa", "pissa_niter_N", "olora")
#: where training keeps the adapter as initialised, inside the output directory (for the conversion)
INITIAL_ADAPTER = "initial_adapter"
_PISSA_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")


def check_init(init: str) -> None:
    """A :class:`UserError` unless ``init`` is one of :data:`INIT_CHOICES`."""
    if init == "pissa_niter_N" or not (init in INIT_CHOICES or _PISSA_NITER.fullmatch(init)):
        raise UserError(f"--init_lora_weights must be one of {', '.join(INIT_CHOICES)} (N >= 1); got {init!r}")


def changes_base(init: str | bool | None) -> bool:
    """Whether PEFT's initialisation ``init`` rewrites the base weights (PiSSA, OLoRA)."""
    return isinstance(init, str) and (init.lower().startswith("pissa") or init.lower() == "olora")


def peft_init(init: str) -> bool | str:
    """``LoraConfig.init_lora_weights`` for ``--init_lora_weights``."""
    check_init(init)
    return True if init == "default" else init


def check_variants(lora_args, quantized: str | None) -> None:
    """Refuse, before any model loads, the combinations PEFT does not support (``quantized``: ``"4bit"``,
    ``"8bit"`` or None)."""
    init = lora_args.init_lora_weights
    if init == "loftq":
        raise UserError("--init_lora_weights loftq is not supported: PEFT's LoftQ on a 4-bit base reads the "
                        "unquantized weights from the checkpoint under the model's runtime names, which transformers "
                        "renames on load (the thinker's model.language_model.* is stored as model.*). Use pissa or "
                        "olora on a 16-bit base, or the default init with --load_in_4bit")
    check_init(init)
    if init.startswith("pissa") and quantized:
        raise UserError(f"--init_lora_weights {init} takes the SVD of each 16/32-bit base weight, which PEFT does not "
                        f"do on a {quantized} base: drop --load_in_{quantized} (or use --init_lora_weights olora)")
    if lora_args.loraplus_lr_ratio is not None and lora_args.loraplus_lr_ratio <= 0:
        raise UserError(f"--loraplus_lr_ratio must be > 0 (the B matrices' learning rate over the A matrices'; "
                        f"16 in the LoRA+ paper), got {lora_args.loraplus_lr_ratio}")
    if lora_args.lora_experts:  # PEFT's LoRA on parameters (target_parameters) is plain LoRA without dropout
        if lora_args.use_dora or changes_base(init):
            flag = "--use_dora" if lora_args.use_dora else f"--init_lora_weights {init}"
            raise UserError(f"{flag} with --lora_experts: PEFT's LoRA on the fused expert parameters does not work "
                            "with LoRA variants; drop one of the two")
        if lora_args.lora_dropout:
            raise UserError(f"--lora_experts needs --lora_dropout 0 (PEFT's LoRA on parameters has no dropout); got "
                            f"{lora_args.lora_dropout}")
    if lora_args.stage == 1 and (lora_args.use_dora or lora_args.use_rslora or init != "default"
                                 or lora_args.loraplus_lr_ratio is not None):
        raise UserError("--stage 1 trains the projector only: --use_dora, --use_rslora, --init_lora_weights and "
                        "--loraplus_lr_ratio apply to LoRA (--stage 2)")


def config_kwargs(lora_args) -> dict[str, Any]:
    """The variant fields of PEFT's ``LoraConfig``."""
    return {"use_dora": lora_args.use_dora, "use_rslora": lora_args.use_rslora,
            "init_lora_weights": peft_init(lora_args.init_lora_weights)}


def save_initial_adapter(peft_model, output_dir: str | Path) -> Path:
    """The adapter as initialised, for :func:`save_converted` (PEFT wants it saved as a plain LoRA adapter)."""
    path = Path(output_dir) / INITIAL_ADAPTER
    config = peft_model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True
    try:
        peft_model.save_pretrained(str(path))
    finally:
        config.init_lora_weights = init
    return path


def save_converted(peft_model, output_dir: str | Path) -> None:
    """The trained PiSSA/OLoRA adapter, converted to a plain LoRA adapter of the original base (PEFT's own
    conversion: rank 2r), over the adapter the Trainer saved in ``output_dir``."""
    initial = Path(output_dir) / INITIAL_ADAPTER
    peft_model.save_pretrained(str(output_dir), path_initial_model_for_weight_conversion=str(initial))
    shutil.rmtree(initial)  # only the conversion reads it; a resumed run saves it again from the same seed


def check_converted(adapter_dir: str | Path) -> None:
    """Refuse an adapter trained from PiSSA/OLoRA and saved unconverted (a Trainer checkpoint): it applies to the
    residual base of its run, so on the original base it would give another model."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        return
    init = json.loads(path.read_text()).get("init_lora_weights")
    if changes_base(init):
        raise UserError(f"{adapter_dir}: this adapter was trained from --init_lora_weights {init} and saved "
                        "unconverted (a training checkpoint): it applies to the run's residual base, not to the "
                        "model you load. Use the final output directory (training converts it), or resume "
                        "training from this checkpoint to the end")


def loraplus_optimizer(trainer, ratio: float):
    """LoRA+: the Trainer's own optimizer (class and settings from its arguments) with the B matrices at
    ``ratio`` times the learning rate, through PEFT's helper."""
    from peft.optimizers import create_loraplus_optimizer

    optimizer_cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    lr = kwargs.pop("lr", trainer.args.learning_rate)
    return create_loraplus_optimizer(trainer.model, optimizer_cls, lr=lr, loraplus_lr_ratio=ratio,
                                     loraplus_weight_decay=trainer.args.weight_decay, **kwargs)


__all__ = ["INITIAL_ADAPTER", "INIT_CHOICES", "changes_base", "check_converted", "check_init",
           "check_variants", "config_kwargs", "loraplus_optimizer", "peft_init", "save_converted",
           "save_initial_adapter"]
