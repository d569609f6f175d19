"""What every backbone provides (see ``surgvqa.backbones``)."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surgvqa.backbones.common.quantization import bnb_config
from surgvqa.backbones.common.token_merging import kept_video_tokens
from surgvqa.backbones.common.tower_cache import EncoderOutputCache
from surgvqa.errors import UserError

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class LoadOptions:
    """How to load a checkpoint. Every unsupported combination is refused in ``validate``."""

    dtype: str = "auto"  # auto | bfloat16 | float16 | float32 (aliases bf16/fp16/fp32)
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    device_map: Any = None
    trust_remote_code: bool = False

    def torch_dtype(self) -> torch.dtype | str:
        alias = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(self.dtype, self.dtype)
        if alias == "auto":
            return "auto"
        if alias not in DTYPES:
            raise UserError(f"--dtype must be one of auto, bfloat16, float16, float32; got {self.dtype!r}")
        return DTYPES[alias]

    def validate(self) -> None:
        dtype = self.torch_dtype()
        if self.load_in_4bit and self.load_in_8bit:
            raise UserError("--load_in_4bit and --load_in_8bit are exclusive: pick one quantization")
        if self.attn_implementation not in ("sdpa", "eager", "flash_attention_2"):
            raise UserError(
                f"--attn_implementation must be sdpa, eager or flash_attention_2; got {self.attn_implementation!r}"
            )
        if self.attn_implementation == "flash_attention_2":
            if dtype not in (torch.bfloat16, torch.float16):
                raise UserError(
                    "flash_attention_2 runs only in half precision: add --dtype bfloat16 (or float16), "
                    "or use --attn_implementation sdpa"
                )
            if importlib.util.find_spec("flash_attn") is None:
                raise UserError(
                    "flash_attention_2 needs the flash-attn package (pip install flash-attn --no-build-isolation); "
                    "--attn_implementation sdpa needs nothing extra and is nearly as fast for short clips"
                )
        if (self.load_in_4bit or self.load_in_8bit) and importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("4/8-bit loading needs bitsandbytes: pip install bitsandbytes")

    @property
    def quantized(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit


@dataclass(frozen=True)
class PlanLayout:
    """Where the planner (``surgvqa plan``) finds a family's parts (full module names) and what LoRA wraps."""

    backbone: str
    towers: dict[str, str]  # group name → module prefix
    projectors: tuple[str, ...]
    lora_target_regex: str
    quantized_root: str = ""  # bitsandbytes quantizes Linear layers under this prefix ("" = the whole model)
    quant_skip: tuple[str, ...] = ()  # … except these (relative to quantized_root), as transformers matches them
    never_quantized: tuple[str, ...] = ()  # loaded beside the quantized part, in the compute dtype
    fp32_modules: tuple[str, ...] = ()  # kept in fp32 by the loading code
    always_trained: tuple[str, ...] = ()  # modules_to_save the backbone adds itself
    experts: tuple[str, ...] = ()  # suffixes of fused MoE expert parameters (stored as the backbone says)


class Backbone:
    """Interface of a model family. Subclasses fill the class attributes and ``load``."""

    name: str = ""
    #: PEFT ``target_modules`` regex: the language model's attention and MLP projections only.
    lora_target_regex: str = ""
    #: regex for LoRA on the vision tower (opt-in).
    vision_lora_regex: str = ""
    #: full module names of the encoder towers (frozen; kept unquantized).
    tower_modules: tuple[str, ...] = ()
    #: full module names of the multimodal projectors (``modules_to_save`` when trained).
    projector_modules: tuple[str, ...] = ()
    #: the module holding the Conv3d patch embedding, if any (torch 2.9 CUDA regression check).
    conv3d_patch_embed: str | None = None
    #: full name of the language model's decoder layer list (the weights ``check_quantized`` counts).
    language_layers: str = "model.language_model.layers"
    #: suffixes of fused MoE expert parameters (experts x rows x cols) of the language model (MoE families)
    expert_parameters: tuple[str, ...] = ()

    def expert_stored_bytes(self, shape: tuple[int, ...], quantization: str | None) -> int | None:
        """Bytes one fused expert parameter of ``shape`` takes as loaded with ``quantization`` ("4bit", "8bit",
        None); None: unquantized, in the compute dtype."""
        return None

    #: the class name of the family's processor (``surgvqa.backbones.processing_for`` finds the family by it)
    processor_class: str = ""

    def matches(self, config: dict) -> bool:
        raise NotImplementedError

    def processing(self, processor, **settings):
        """The family's ``processing.py`` encoder of ``processor`` with one run's settings (frames_as, frame_size,
        max_pixels, min_pixels, fps, token_kept_ratio): ``encode``, token counts, the vision grid."""
        raise NotImplementedError

    def vision_grid(self, processor) -> int:
        """Pixels per side of one vision token of ``processor`` (frames are resized onto this grid)."""
        return self.processing(processor).grid

    def load(self, path: str, options: LoadOptions):
        """Return the model for ``path`` (processor loading is shared: ``load_processor``)."""
        raise NotImplementedError

    def load_processor(self, path: str, trust_remote_code: bool = False):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)

    def quantization_config(self, options: LoadOptions):
        """bitsandbytes config keeping towers, projectors and lm_head in full precision."""
        return bnb_config(options, [*self.tower_modules, *self.projector_modules, "lm_head"])

    def from_pretrained_kwargs(self, options: LoadOptions) -> dict[str, Any]:
        """The ``from_pretrained`` arguments ``options`` set: dtype, attention, quantization, device map."""
        return {"dtype": options.torch_dtype(), "attn_implementation": options.attn_implementation,
                "quantization_config": self.quantization_config(options), "device_map": options.device_map,
                "trust_remote_code": options.trust_remote_code}

    # -- the full checkpoint, for merging (a model family whose checkpoint holds more than ``load`` returns)
    #: files beside the weights of a full checkpoint that a full-model merge copies (loaded by transformers)
    full_model_files: tuple[str, ...] = ()

    def full_model_problem(self, config: dict, path: str) -> str | None:
        """Why ``path`` (its config.json is ``config``) cannot be loaded whole for a full-model merge; None if it
        can."""
        return (f"--full_omni: backbone {self.name!r} has no full-model form with parts beyond the language model; "
                "drop --full_omni")

    def load_full(self, path: str, options: LoadOptions) -> tuple[Any, Any]:
        """(the whole model, the part adapters were trained on), unquantized, for a full-model merge."""
        raise UserError(self.full_model_problem({}, path))

    def put_back(self, full, merged):
        """``full`` with its trained part replaced by ``merged`` (the inverse of ``load_full``)."""
        raise UserError(self.full_model_problem({}, ""))

    def make_trainable(self, model, lora_config, stage: int | None = None, init_from: str | None = None):
        """Wrap ``model`` for training. Default: PEFT LoRA with ``lora_config`` (staged backbones override)."""
        if stage not in (None, 2) or init_from is not None:
            raise UserError(
                f"backbone {self.name!r} trains in one stage: --stage and --init_from apply to staged backbones only"
            )
        from peft import get_peft_model

        return get_peft_model(model, lora_config)

    def check_moe_settings(self, lora_experts: bool, router_aux_loss_coef: float) -> None:
        """Refuse the MoE settings (--lora_experts, --router_aux_loss_coef) on a family without experts: asked
        before the model loads, and again by the methods that apply them."""
        if not self.expert_parameters and (lora_experts or router_aux_loss_coef):
            flag = "--lora_experts" if lora_experts else "--router_aux_loss_coef"
            raise UserError(f"{flag}: backbone {self.name!r} has no MoE experts; drop it")

    def check_sharding(self, sharding: str | None) -> None:
        """Refuse sharded training (``--fsdp``, ZeRO-3) where this family writes files of its own from the model's
        weights (``save_extras``): one process holds only its shard of them. Families that write none accept it."""

    def expert_lora_parameters(self, model, options: LoadOptions) -> list[str]:
        """PEFT ``target_parameters`` for --lora_experts (MoE families); refused by families without experts."""
        self.check_moe_settings(True, 0.0)
        return []

    def set_router_aux_loss(self, model, coefficient: float) -> None:
        """The weight of the MoE router's load-balancing loss (MoE families); others accept only 0."""
        self.check_moe_settings(False, coefficient)

    def save_extras(self, model, output_dir: str, config) -> dict[str, Any]:
        """Write backbone-specific trained weights beside the adapter; return the ``RunConfig`` fields to update
        (``config`` is the run's RunConfig). Nothing for single-stage backbones."""
        return {}

    def save_merged(self, model, output_dir: str, config=None, **kwargs) -> None:
        """Write a merged model; ``config`` is the merged checkpoint's RunConfig (base, adapters merged)."""
        model.save_pretrained(output_dir, **kwargs)

    def enable_token_merging(self, model, ratio: float) -> None:
        """Merge each video's tokens down to ``kept_video_tokens(n, ratio)`` in every forward and generate call of
        ``model`` (a PEFT or DDP wrapper is looked through): the family's model class reads its ``token_kept_ratio``.
        ``ratio = 1.0`` turns merging off. The collator must write as many placeholders
        (``VQACollator(token_kept_ratio=ratio)``). A family whose model has no merging refuses ``ratio < 1``."""
        kept_video_tokens(1, ratio)
        inner = unwrap(model)
        if hasattr(inner, "token_kept_ratio"):
            inner.token_kept_ratio = float(ratio)
        elif ratio != 1.0:
            raise UserError(f"backbone {self.name!r} has no video token merging: drop --token_kept_ratio "
                            "(or set it to 1.0)")

    #: whether the family's model class serves frozen towers' outputs from its ``tower_cache``
    keeps_tower_outputs: bool = False
    #: whether the family's model class takes packed rows (``forward(..., packed_lengths=...)``: several samples
    #: per row, each with its own positions and attention; :mod:`surgvqa.backbones.common.packing`)
    packs_rows: bool = False

    def check_packing(self, packing: bool) -> None:
        """Refuse ``--packing`` on a family whose model class has no packed-row code path (asked before loading)."""
        if packing and not self.packs_rows:
            raise UserError(f"--packing: backbone {self.name!r} cannot pack samples into rows (its model has no "
                            "code path giving each packed sample its own positions and attention); drop --packing")

    def check_tower_cache(self, max_gb: float | None) -> None:
        """Refuse ``--tower_cache_gb`` > 0 asked of a family whose model keeps no tower outputs."""
        if max_gb and max_gb > 0 and not self.keeps_tower_outputs:
            raise UserError(f"backbone {self.name!r} keeps no frozen tower outputs: drop --tower_cache_gb (or 0)")

    def keep_tower_outputs(self, model, max_gb: float | None, default_gb: float = 0.0) -> bool:
        """Keep the frozen towers' outputs and M-RoPE positions of training items up to ``max_gb`` (None:
        ``default_gb``, said in the log by a family that keeps none) for the forward calls of ``model`` naming their
        items (``media_ids``); whether they are kept. 0 drops what ``model`` kept."""
        self.check_tower_cache(max_gb)
        bound = default_gb if max_gb is None else max_gb
        if bound > 0 and not self.keeps_tower_outputs:
            logger.info("backbone %s keeps no frozen tower outputs: its towers run on every batch", self.name)
        if not self.keeps_tower_outputs:
            return False
        unwrap(model).tower_cache = EncoderOutputCache(int(bound * 1024**3)) if bound > 0 else None
        return bound > 0

    # -- the planner (``surgvqa plan``): the model ``load`` would return, built on the meta device from a config
    #: the sub-config ``load`` takes from a full checkpoint's config (Omni: the thinker's), if any
    loaded_part: str | None = None
    #: the transformers class ``plan_model`` builds (the stock class of what ``load`` returns)
    planned_class: str = ""

    def plans(self, config: dict) -> bool:
        """Whether ``surgvqa plan`` reads ``config`` (a config.json) as this family's model."""
        return self.matches(config)

    def plan_layout(self, config: dict) -> PlanLayout:
        towers = {("audio tower" if "audio" in prefix else "vision tower"): prefix for prefix in self.tower_modules}
        return PlanLayout(self.name, towers, self.projector_modules, self.lora_target_regex,
                          quant_skip=(*self.tower_modules, *self.projector_modules, "lm_head"),
                          experts=self.expert_parameters)

    def plan_config(self, config: dict, checkpoint: Path | None):
        """The transformers config of what ``load`` loads, built offline from ``config`` (``checkpoint``: its
        directory, None for a bare config JSON)."""
        from transformers import CONFIG_MAPPING

        model_type = config.get("model_type")
        if model_type not in CONFIG_MAPPING:
            raise UserError(f"unknown model_type {model_type!r} in the config")
        built = CONFIG_MAPPING[model_type].from_dict({k: v for k, v in config.items() if k != "model_type"})
        return getattr(built, self.loaded_part) if self.loaded_part and hasattr(built, self.loaded_part) else built

    def plan_model(self, config):
        """The model on the meta device: exact shapes, no memory, no weights."""
        import transformers

        if not self.planned_class:
            raise UserError(f"the planner cannot build {self.name} models")
        build = getattr(transformers, self.planned_class)._from_config  # imported before the meta context
        with torch.device("meta"):
            return build(config)

    def plan_processor(self, path: str, config: dict):
        """The processor the planner counts tokens with (``path``: a directory holding one)."""
        return self.load_processor(path)

    def describe(self, model) -> str:
        """One line saying what ``model`` is, for logs and evaluation output."""
        return f"{self.name}: {getattr(model, 'name_or_path', '') or type(model).__name__}"

    def warn_if_slow_conv3d(self) -> str | None:
        """torch 2.9.x on CUDA runs Qwen's Conv3d patch embedding 4-20x slower (pytorch#166122)."""
        if self.conv3d_patch_embed is None or not torch.cuda.is_available():
            return None
        if torch.__version__.startswith("2.9."):
            message = (
                f"torch {torch.__version__} has a CUDA Conv3d regression (pytorch#166122, #166643): the "
                f"{self.name} vision patch embedding runs 4-20x slower and bf16 needs far more memory. "
                "Install torch==2.8.0 torchvision==0.23.0 torchaudio==2.8.0."
            )
            logger.warning(message)
            return message
        return None


# ------------------------------------------------------------------------------- shared by every backbone module
#: the share of the language model's layer weights a 4/8-bit load may leave unquantized (norms, MoE routers)
UNQUANTIZED_LIMIT = 0.01


def quantized_numel(module: torch.nn.Module) -> tuple[int, int, dict[str, str]]:
    """(quantized, unquantized, {parameter name: dtype} of the unquantized) weight counts of ``module``'s own
    parameters: bitsandbytes 4-bit parameters count their logical size; a module that stores weights in its own
    quantized form says so with a ``quantized_numel()`` method (its buffers are then not looked at)."""
    own = getattr(module, "quantized_numel", None)
    if callable(own):
        return int(own()), 0, {}
    quantized = unquantized = 0
    kept: dict[str, str] = {}
    for name, param in module.named_parameters(recurse=False):
        state = getattr(param, "quant_state", None)
        if state is not None:
            quantized += math.prod(state.shape)
        elif not param.is_floating_point():
            quantized += param.numel()
        else:
            unquantized += param.numel()
            kept[name] = str(param.dtype).replace("torch.", "")
    return quantized, unquantized, kept


def check_quantized(model, backbone: Backbone, options: LoadOptions, limit: float = UNQUANTIZED_LIMIT) -> None:
    """Never a silent 16-bit "4-bit" model: with --load_in_4bit/--load_in_8bit, the weights of the language model's
    decoder layers (``backbone.language_layers``) left in 16/32-bit may be at most ``limit`` of them (norms and MoE
    routers are); otherwise stop with a UserError naming the modules, layer indices folded to ``*``."""
    if not options.quantized:
        return
    prefix = backbone.language_layers + "."
    quantized = unquantized = 0
    groups: dict[str, list] = {}
    for name, module in model.named_modules():
        if not name.startswith(prefix) and f".{prefix}" not in name:
            continue
        q, u, kept = quantized_numel(module)
        quantized, unquantized = quantized + q, unquantized + u
        if u:
            group = groups.setdefault(re.sub(r"\.\d+(\.|$)", r".*\1", name), [0, set()])
            group[0] += u
            group[1].update(f"{k} {v}" for k, v in kept.items())
    total = quantized + unquantized
    if total == 0:
        raise UserError(f"--load_in_{'4' if options.load_in_4bit else '8'}bit: backbone {backbone.name!r} found no "
                        f"weights under {backbone.language_layers} to check; the model's layout is not the one "
                        "the backbone expects")
    if unquantized / total <= limit:
        return
    worst = sorted(groups.items(), key=lambda item: -item[1][0])
    listed = "; ".join(f"{name} ({', '.join(sorted(kinds))}): {count:,}" for name, (count, kinds) in worst[:8])
    raise UserError(
        f"--load_in_{'4' if options.load_in_4bit else '8'}bit left {unquantized:,} of the language model's "
        f"{total:,} layer weights ({unquantized / total:.1%}, more than {limit:.0%}) unquantized: {listed}. "
        "bitsandbytes quantizes nn.Linear modules only; load this model with a backbone that quantizes these "
        "modules, or drop --load_in_4bit/--load_in_8bit"
    )


def unwrap(model):
    """The family's model inside a DDP and/or PEFT wrapper (or the model itself)."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def on_vision_grid(frames: Iterable[np.ndarray], grid: int, max_edge: int | None = None) -> bool:
    """Whether every frame's sides are multiples of ``grid`` (and, with ``max_edge``, no longer than it), so the
    processor has nothing left to resize."""
    for frame in frames:
        height, width = np.asarray(frame).shape[:2]
        if height % grid or width % grid or (max_edge is not None and max(height, width) > max_edge):
            return False
    return True


def runnable_attention(model) -> contextlib.AbstractContextManager:
    """A context in which ``model``'s attention can run on this machine. torch's CPU SDPA kernels for bf16/fp16
    need AVX-512 (on an AVX2-only CPU, e.g. many AMD machines, they raise "pack_vnni2 is only supported when avx512
    is supported"), so there half-precision attention on the CPU uses torch's math kernel instead."""
    param = next(model.parameters(), None)
    dtype = getattr(model, "dtype", None) or (param.dtype if param is not None else None)
    if (param is None or param.device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16)
            or torch.backends.cpu.get_cpu_capability().startswith("AVX512")):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])
