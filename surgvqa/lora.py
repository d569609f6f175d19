"""LoRA variants: DoRA, rsLoRA, the initialisations (Gaussian, PiSSA, OLoRA: PEFT's; LoftQ) and LoRA+ (PEFT's).

Each is one flag of :class:`surgvqa.arguments.LoraArguments`, recorded with the others in ``surgvqa_config.json``.
PiSSA and OLoRA move the adapter's starting point into the base weights (the base becomes a residual), so an
adapter trained that way applies to that residual, not to the checkpoint users load. Training therefore saves the
adapter as it was initialised (:data:`INITIAL_ADAPTER`) and converts the final one with PEFT's
``path_initial_model_for_weight_conversion``: a plain LoRA adapter (rank 2r) that applies to the original base.
Evaluation and merging refuse an adapter that was not converted (:func:`check_converted`).

LoftQ starts LoRA at the quantization error of a 4-bit base (:func:`init_loftq`): the adapter then belongs on that
nf4 base, so evaluation needs ``--load_in_4bit`` and merging ``--merge_into dequantized`` (:func:`check_loftq_base`).
PEFT's own LoftQ cannot be used here: ``replace_lora_weights_loftq`` and ``LoraConfig(init_lora_weights="loftq")``
both compute on ``"cuda"`` (or XPU) whatever the model's device, the first reads the checkpoint under the model's
runtime names (transformers renames the keys on load) and neither divides by the adapter's scaling.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from surgvqa.errors import UserError

#: ``--init_lora_weights`` values; ``pissa_niter_N`` is PiSSA through N subspace iterations (fast SVD)
INIT_CHOICES = ("default", "gaussian", "pissa", "pissa_niter_N", "olora", "loftq")
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
    """``LoraConfig.init_lora_weights`` for ``--init_lora_weights`` (LoftQ: PEFT's default, then :func:`init_loftq`)."""
    check_init(init)
    return True if init in ("default", "loftq") else init


def check_variants(lora_args, quantized: str | None) -> None:
    """Refuse, before any model loads, the combinations PEFT does not support (``quantized``: ``"4bit"``,
    ``"8bit"`` or None)."""
    init = lora_args.init_lora_weights
    check_init(init)
    if init == "loftq" and quantized != "4bit":
        raise UserError("--init_lora_weights loftq starts LoRA at the quantization error of a 4-bit base: add "
                        "--load_in_4bit True (or choose another --init_lora_weights)")
    if init == "loftq" and (lora_args.use_dora or lora_args.lora_experts):
        raise UserError(f"--init_lora_weights loftq with {'--use_dora' if lora_args.use_dora else '--lora_experts'}: "
                        "LoftQ initialises plain LoRA pairs on 4-bit linears only; drop one of the two")
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


def checkpoint_weights(model, directory: str | Path) -> dict[str, tuple[Path, str]]:
    """Every weight of the safetensors in ``directory`` by the name it has in ``model`` once loaded: runtime name ->
    (file, key), through transformers' own key conversion for the model's class."""
    from safetensors import safe_open
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    names = dict.fromkeys(model.state_dict(), True)
    found = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - a safetensors handle is not a dict
                found[rename_source_key(key, renamings, converters, model.base_model_prefix, names)[0]] = (file, key)
    return found


def init_loftq(peft_model, checkpoint: str | Path, adapter: str = "default") -> int:
    """LoftQ (one alternation, as PEFT's ``replace_lora_weights_loftq``): each LoRA pair on a 4-bit linear starts at
    the rank-r SVD of ``W - Q`` (``W`` the checkpoint's weight, ``Q`` its nf4 rounding) over the adapter's scaling,
    so the model starts at ``Q + scaling * B @ A``, nearer ``W`` than ``Q``. Returns the number of pairs set."""
    import bitsandbytes as bnb
    import torch
    from peft.tuners.lora import Linear4bit
    from safetensors import safe_open

    weights = checkpoint_weights(peft_model.get_base_model(), checkpoint)
    count = 0
    for name, module in peft_model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        where = weights.get(name.removeprefix("base_model.model.") + ".weight")
        if where is None:
            raise UserError(f"--init_lora_weights loftq: {name} has no weight in the safetensors of {checkpoint}; "
                            "LoftQ needs the base model's unquantized weights (a local safetensors checkpoint)")
        with safe_open(str(where[0]), framework="pt") as handle:
            weight = handle.get_tensor(where[1]).to(module.weight.device, torch.float32)
        quantized = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        u, s, vh = torch.linalg.svd(weight - quantized, full_matrices=False)
        root = (s[: module.r[adapter]] / module.scaling[adapter]).sqrt()
        a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        a.data = (root[:, None] * vh[: len(root)]).to(a.dtype)
        b.data = (u[:, : len(root)] * root).to(b.dtype)
        count += 1
    return count


def applies_to_nf4_base(lora: Mapping[str, Any] | None) -> bool:
    """The run's adapter (its recorded LoRA settings) applies to the nf4 base only: it was initialised with LoftQ."""
    return bool(lora) and lora.get("init_lora_weights") == "loftq"


def check_loftq_base(lora: Mapping[str, Any] | None, adapter: str | Path, nf4_base: bool, fix: str) -> None:
    """Refuse a LoftQ adapter away from the nf4 base it was initialised on: there its B @ A adds the quantization
    error to weights that do not have it."""
    if applies_to_nf4_base(lora) and not nf4_base:
        raise UserError(f"{adapter} was initialised with LoftQ: it starts at the 4-bit base's quantization error and "
                        f"applies to that nf4 base only, not to the 16-bit weights; {fix}")


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


__all__ = ["INITIAL_ADAPTER", "INIT_CHOICES", "applies_to_nf4_base", "changes_base", "check_converted", "check_init", "check_loftq_base",
           "check_variants", "checkpoint_weights", "config_kwargs", "init_loftq", "loraplus_optimizer", "peft_init",
           "save_converted", "save_initial_adapter"]
