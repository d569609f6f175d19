"""What every backbone provides (see ``surgvqa.backbones``)."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

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
            raise ValueError(f"--dtype must be one of auto, bfloat16, float16, float32; got {self.dtype!r}")
        return DTYPES[alias]

    def validate(self) -> None:
        dtype = self.torch_dtype()
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("--load_in_4bit and --load_in_8bit are exclusive: pick one quantization")
        if self.attn_implementation not in ("sdpa", "eager", "flash_attention_2"):
            raise ValueError(
                f"--attn_implementation must be sdpa, eager or flash_attention_2; got {self.attn_implementation!r}"
            )
        if self.attn_implementation == "flash_attention_2":
            if dtype not in (torch.bfloat16, torch.float16):
                raise ValueError(
                    "flash_attention_2 runs only in half precision: add --dtype bfloat16 (or float16), "
                    "or use --attn_implementation sdpa"
                )
            if importlib.util.find_spec("flash_attn") is None:
                raise ValueError(
                    "flash_attention_2 needs the flash-attn package (pip install flash-attn --no-build-isolation); "
                    "--attn_implementation sdpa needs nothing extra and is nearly as fast for short clips"
                )
        if (self.load_in_4bit or self.load_in_8bit) and importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("4/8-bit loading needs bitsandbytes: pip install bitsandbytes")

    @property
    def quantized(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit


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

    def matches(self, config: dict) -> bool:
        raise NotImplementedError

    def load(self, path: str, options: LoadOptions):
        """Return the model for ``path`` (processor loading is shared: ``load_processor``)."""
        raise NotImplementedError

    def load_processor(self, path: str, trust_remote_code: bool = False):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)

    def quantization_config(self, options: LoadOptions):
        """bitsandbytes config keeping towers, projectors and lm_head in full precision."""
        return bnb_config(options, [*self.tower_modules, *self.projector_modules, "lm_head"])

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
        raise ValueError(self.full_model_problem({}, path))

    def put_back(self, full, merged):
        """``full`` with its trained part replaced by ``merged`` (the inverse of ``load_full``)."""
        raise ValueError(self.full_model_problem({}, ""))

    def make_trainable(self, model, lora_config, stage: int | None = None, init_from: str | None = None):
        """Wrap ``model`` for training. Default: PEFT LoRA with ``lora_config`` (staged backbones override)."""
        if stage not in (None, 2) or init_from is not None:
            raise ValueError(
                f"backbone {self.name!r} trains in one stage: --stage and --init_from apply to staged backbones only"
            )
        from peft import get_peft_model

        return get_peft_model(model, lora_config)

    def expert_lora_parameters(self, model, options: LoadOptions) -> list[str]:
        """PEFT ``target_parameters`` for --lora_experts (MoE families); refused by families without experts."""
        raise ValueError(f"--lora_experts: backbone {self.name!r} has no MoE experts; drop it")

    def set_router_aux_loss(self, model, coefficient: float) -> None:
        """The weight of the MoE router's load-balancing loss (MoE families); others accept only 0."""
        if coefficient:
            raise ValueError(f"--router_aux_loss_coef: backbone {self.name!r} has no MoE router; drop it")

    def lm_head(self, model) -> torch.nn.Module:
        """The module that maps hidden states to vocabulary logits (labelled-only loss hooks its input)."""
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError(f"backbone {self.name!r}: the model has no output embedding (LM head)")
        return head

    def save_extras(self, model, output_dir: str, config) -> dict[str, Any]:
        """Write backbone-specific trained weights beside the adapter; return the ``RunConfig`` fields to update
        (``config`` is the run's RunConfig). Nothing for single-stage backbones."""
        return {}

    def save_merged(self, model, output_dir: str, config=None, **kwargs) -> None:
        """Write a merged model; ``config`` is the merged checkpoint's RunConfig (base, adapters merged)."""
        model.save_pretrained(output_dir, **kwargs)

    def enable_token_merging(self, model, ratio: float) -> None:
        """Merge each video's tokens down to ``kept_video_tokens(n, ratio)`` in every forward and generate call of
        ``model`` (a PEFT or DDP wrapper is looked through); ``ratio = 1.0`` turns merging off. The collator must
        write as many placeholders (``VQACollator(token_kept_ratio=ratio)``). Families without merging refuse
        ``ratio < 1``."""
        kept_video_tokens(1, ratio)
        if ratio != 1.0:
            raise ValueError(f"backbone {self.name!r} has no video token merging: drop --token_kept_ratio "
                             "(or set it to 1.0)")

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
def bnb_config(options: LoadOptions, skip_modules: list[str]):
    """The bitsandbytes config of ``options`` (None when unquantized): nf4 + double quant + bf16 compute for 4-bit,
    LLM.int8 for 8-bit. ``skip_modules`` stay in full precision; give full module paths (bitsandbytes silently
    ignores short names that match no module path prefix)."""
    if not options.quantized:
        return None
    from transformers import BitsAndBytesConfig

    if options.load_in_4bit:
        # fp32 compute only when asked for (--dtype float32: CPUs whose torch has no bf16 kernels, tests)
        compute = torch.float32 if options.torch_dtype() == torch.float32 else torch.bfloat16
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            llm_int8_skip_modules=list(skip_modules),
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip_modules))


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
    from surgvqa.errors import UserError

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


def vision_grid(processor) -> int:
    """Pixels per side of one vision token: the patch size times the spatial merge of ``processor``'s video (else
    image) processor, or of ``processor`` itself. 28 for Qwen2-VL, Qwen2.5-VL and Qwen2.5-Omni, 32 for Qwen3-VL."""
    for part in (processor, getattr(processor, "video_processor", None), getattr(processor, "image_processor", None)):
        patch = getattr(part, "patch_size", None)
        if isinstance(patch, int) and patch > 0:
            return patch * int(getattr(part, "merge_size", 1) or 1)
    raise ValueError(f"{type(processor).__name__} has no vision patch size: not a Qwen-style vision processor")


def on_vision_grid(frames: Iterable[np.ndarray], grid: int, max_edge: int | None = None) -> bool:
    """Whether every frame's sides are multiples of ``grid`` (and, with ``max_edge``, no longer than it), so the
    processor has nothing left to resize."""
    for frame in frames:
        height, width = np.asarray(frame).shape[:2]
        if height % grid or width % grid or (max_edge is not None and max(height, width) > max_edge):
            return False
    return True


def kept_video_tokens(num_tokens: int, token_kept_ratio: float = 1.0) -> int:
    """Video tokens entering the language model when token merging keeps ``token_kept_ratio`` of a video's
    ``num_tokens``: ``ceil(r * n)`` per video (``r = 1.0``: all of them)."""
    if not 0.0 < token_kept_ratio <= 1.0:
        raise ValueError(f"token_kept_ratio must be in (0, 1], got {token_kept_ratio!r}")
    return num_tokens if token_kept_ratio == 1.0 else math.ceil(token_kept_ratio * num_tokens)


def num_audio_tokens(processor, samples: int) -> int:
    """Audio tokens a clip of ``samples`` (16 kHz) becomes: the count the family's processor exposes
    (``_get_num_multimodal_tokens(audio_lengths=...)``), asked here and nowhere else."""
    counter = getattr(processor, "_get_num_multimodal_tokens", None)
    counts = counter(audio_lengths=[samples]) if counter is not None else None
    tokens = getattr(counts, "num_audio_tokens", None) if counts is not None else None
    if not tokens:
        raise ValueError(f"{type(processor).__name__} does not count audio tokens: this model family takes no "
                         "spoken questions; use --question_modality text")
    return int(tokens[0])


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


# ------------------------------------------------------------------------------------- quantized training prep
_HALF = (torch.float16, torch.bfloat16)
_NORM_CLASSES = tuple(c for c in (torch.nn.LayerNorm, torch.nn.GroupNorm, getattr(torch.nn, "RMSNorm", None)) if c)


def is_norm(module: torch.nn.Module) -> bool:
    """LayerNorm / RMSNorm / GroupNorm modules (by class, or by the name transformers gives its RMSNorms)."""
    if isinstance(module, _NORM_CLASSES):
        return True
    name = type(module).__name__
    return name.endswith(("RMSNorm", "LayerNorm")) and any(True for _ in module.parameters(recurse=False))


def compute_in_fp32(module: torch.nn.Module) -> int:
    """Hold ``module``'s own half-precision parameters in fp32 and run it in fp32: its floating inputs are cast to
    fp32 and its output back to the input's dtype, so the layers around it keep their dtype (with or without
    autocast). Returns the number of parameters upcast."""
    upcast = 0
    for param in module.parameters(recurse=False):
        if param.dtype in _HALF:
            param.data = param.data.float()
            upcast += param.numel()
    if getattr(module, "_surgvqa_fp32", False):
        return upcast

    def before(mod, args):
        floating = [a for a in args if torch.is_tensor(a) and a.is_floating_point()]
        mod._surgvqa_dtype = floating[0].dtype if floating else None
        return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    def after(mod, args, output):
        dtype = getattr(mod, "_surgvqa_dtype", None)
        if dtype is not None and torch.is_tensor(output) and output.is_floating_point() and output.dtype != dtype:
            return output.to(dtype)
        return output

    module.register_forward_pre_hook(before)
    module.register_forward_hook(after)
    module._surgvqa_fp32 = True
    return upcast


def prepare_quantized_for_training(model, *, gradient_checkpointing: bool,
                                   gradient_checkpointing_kwargs: dict | None = None) -> dict[str, int]:
    """Freeze a 4/8-bit model for (Q)LoRA, upcasting only what needs fp32.

    PEFT's ``prepare_model_for_kbit_training`` casts every parameter that is not 4-bit to fp32: the vision and audio
    towers, the embeddings and the lm_head (about 2.4 B parameters on Qwen2.5-Omni-7B, +4.7 GB). Here only the
    normalisation layers run in fp32 (:func:`compute_in_fp32`: their statistics are the numerically fragile part);
    towers, embeddings and lm_head stay in the compute dtype. Trainable parameters are upcast after the adapters are
    added (:func:`upcast_trainable`). With gradient checkpointing the input embeddings' output requires grad, so the
    checkpointed blocks of a frozen model still carry gradients to the adapters.

    Returns ``{"norm_params_fp32": n, "params_kept_half": m}``.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    upcast = sum(compute_in_fp32(module) for module in model.modules() if is_norm(module))
    kept = sum(p.numel() for p in model.parameters() if p.dtype in _HALF)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        model.enable_input_require_grads()
    logger.info("quantized model prepared: %d norm parameters in fp32, %d parameters kept in half precision",
                upcast, kept)
    return {"norm_params_fp32": upcast, "params_kept_half": kept}


def upcast_trainable(model) -> int:
    """Run every module with trainable half-precision parameters (e.g. projectors in ``modules_to_save``) in fp32,
    so the optimizer updates fp32 weights; LoRA weights are fp32 already (PEFT). Returns the parameters upcast."""
    upcast = 0
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if any(p.requires_grad and p.dtype in _HALF for p in own):
            upcast += compute_in_fp32(module)
    return upcast
