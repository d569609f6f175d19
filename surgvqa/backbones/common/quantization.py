"""Quantized models: the bitsandbytes config of a load, and their preparation for (Q)LoRA training (only the
normalisation layers, and trainable half-precision modules, run in fp32)."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def bnb_config(options, skip_modules: list[str]):
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
