"""What every backbone provides (see ``surgvqa.backbones``)."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

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

    def matches(self, config: dict) -> bool:
        raise NotImplementedError

    def load(self, path: str, options: LoadOptions):
        """Return the model for ``path`` (processor loading is shared: ``load_processor``)."""
        raise NotImplementedError

    def load_processor(self, path: str, trust_remote_code: bool = False):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)

    def quantization_config(self, options: LoadOptions):
        """bitsandbytes config keeping towers, projectors and lm_head in full precision (full names only:
        bitsandbytes silently ignores short names that match no module path prefix)."""
        if not options.quantized:
            return None
        from transformers import BitsAndBytesConfig

        skip = [*self.tower_modules, *self.projector_modules, "lm_head"]
        if options.load_in_4bit:
            return BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
                llm_int8_skip_modules=skip,
            )
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)

    def make_trainable(self, model, lora_config, stage: int | None = None, init_from: str | None = None):
        """Wrap ``model`` for training. Default: PEFT LoRA with ``lora_config`` (staged backbones override)."""
        if stage not in (None, 2) or init_from is not None:
            raise ValueError(
                f"backbone {self.name!r} trains in one stage: --stage and --init_from apply to staged backbones only"
            )
        from peft import get_peft_model

        return get_peft_model(model, lora_config)

    def lm_head(self, model) -> torch.nn.Module:
        """The module that maps hidden states to vocabulary logits (labelled-only loss hooks its input)."""
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError(f"backbone {self.name!r}: the model has no output embedding (LM head)")
        return head

    def save_extras(self, model, output_dir: str) -> None:
        """Write backbone-specific trained weights beside the adapter (nothing for single-stage backbones)."""

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
