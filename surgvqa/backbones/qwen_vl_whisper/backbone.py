"""The ``qwen_vl_whisper`` backbone: how training, evaluation and merging load, train, save and describe a graft.

Imports no transformers code at import time (the model and processor modules load on first use).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from surgvqa.backbones.base import Backbone, LoadOptions, PlanLayout, check_quantized
from surgvqa.backbones.base import unwrap as unwrap_model
from surgvqa.backbones.common.quantization import bnb_config
from surgvqa.backbones.qwen_vl_whisper.constants import MODEL_TYPE, PROJECTOR_FILE, VL_CLASSES
from surgvqa.backbones.qwen_vl_whisper.weights import read_projector, resolve_part, write_projector
from surgvqa.errors import UserError

logger = logging.getLogger(__name__)

#: bare Qwen-VL checkpoints the planner reads as the graft's VL part (no Whisper encoder)
PLANNED_BARE_VL = ("qwen2_vl", "qwen2_5_vl")


class QwenVLWhisper(Backbone):
    name = MODEL_TYPE
    lora_target_regex = (
        r"vl_model\.model\.language_model\.layers\.\d+\."
        r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
    )
    vision_lora_regex = (
        r"vl_model\.model\.visual\.blocks\.\d+\."
        r"(attn\.(qkv|proj)|mlp\.(fc1|fc2|gate_proj|up_proj|down_proj|linear_fc1|linear_fc2))"
    )
    tower_modules = ("vl_model.model.visual", "audio_encoder")
    projector_modules = ("audio_projector", "vl_model.model.visual.merger")
    conv3d_patch_embed = "vl_model.model.visual.patch_embed"
    language_layers = "vl_model.model.language_model.layers"
    audio_projector_module = "audio_projector"
    processor_class = "QwenVLWhisperProcessor"

    def matches(self, config: dict) -> bool:
        return config.get("model_type") == MODEL_TYPE

    def processing(self, processor, **settings):
        from surgvqa.backbones.qwen_vl_whisper.processing import QwenVLWhisperProcessing

        return QwenVLWhisperProcessing(processor, **settings)

    def vl_quantization_config(self, options: LoadOptions):
        """bitsandbytes config for the VL model (vision tower, merger and lm_head stay unquantized; the VL model
        loads itself, so the names are relative to it); the Whisper encoder and the projector are never quantized."""
        return bnb_config(options, ["model.visual", "model.visual.merger", "lm_head"])

    def load(self, path: str, options: LoadOptions):
        from surgvqa.backbones.qwen_vl_whisper.modeling import QwenVLWhisperForConditionalGeneration

        options.validate()
        kwargs = {"dtype": options.torch_dtype(), "attn_implementation": options.attn_implementation}
        quantization = self.vl_quantization_config(options)
        if quantization is not None:
            kwargs["quantization_config"] = quantization
        if options.device_map is not None:
            kwargs["device_map"] = options.device_map
        model = QwenVLWhisperForConditionalGeneration.from_pretrained(path, **kwargs)
        check_quantized(model, self, options)
        self.warn_if_slow_conv3d()
        return model

    def load_processor(self, path: str, trust_remote_code: bool = False):
        from surgvqa.backbones.qwen_vl_whisper.processing import QwenVLWhisperProcessor

        return QwenVLWhisperProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)

    # -- the planner: a graft directory, or a bare Qwen-VL planned as the graft's VL part
    def plans(self, config: dict) -> bool:
        return self.matches(config) or config.get("model_type") in PLANNED_BARE_VL

    def plan_layout(self, config: dict) -> PlanLayout:
        audio = self.audio_projector_module
        if config.get("model_type") in PLANNED_BARE_VL:  # names relative to the VL model
            return PlanLayout(
                "qwen_vl (the qwen_vl_whisper graft's VL model, no audio)", {"vision tower": "model.visual"},
                tuple(p.removeprefix("vl_model.") for p in self.projector_modules if p.startswith("vl_model.")),
                self.lora_target_regex.replace(r"vl_model\.", "", 1), quant_skip=("model.visual", "lm_head"))
        return PlanLayout(
            self.name, super().plan_layout(config).towers, self.projector_modules, self.lora_target_regex,
            quantized_root="vl_model.", quant_skip=("model.visual", "lm_head"),
            never_quantized=("audio_encoder", audio), fp32_modules=(audio,), always_trained=(audio,))

    def plan_config(self, config: dict, checkpoint: Path | None):
        if not self.matches(config):
            return super().plan_config(config, checkpoint)
        if checkpoint is None:
            raise UserError("a qwen_vl_whisper graft is planned from its directory (create_graft writes it)")
        from surgvqa.backbones.qwen_vl_whisper.configuration import QwenVLWhisperConfig

        return QwenVLWhisperConfig.from_pretrained(str(checkpoint))

    def plan_model(self, config):
        import torch
        import transformers

        from surgvqa.backbones.qwen_vl_whisper.modeling import QwenVLWhisperForConditionalGeneration

        if config.model_type == MODEL_TYPE:
            build = QwenVLWhisperForConditionalGeneration
        elif config.model_type in PLANNED_BARE_VL:
            build = getattr(transformers, VL_CLASSES[config.model_type])._from_config
        else:
            raise UserError(f"the planner builds {MODEL_TYPE} and {', '.join(PLANNED_BARE_VL)}; got {config.model_type!r}")
        with torch.device("meta"):
            return build(config)

    def plan_processor(self, path: str, config: dict):
        if config.get("model_type") in PLANNED_BARE_VL:
            from transformers import AutoProcessor

            return AutoProcessor.from_pretrained(path)
        return self.load_processor(path)

    def describe(self, model) -> str:
        """One line for logs and evaluation output: parts, stage (merged adapters and their base), audio path."""
        text = unwrap(model).config.describe()
        return text + ("; + LoRA adapter (unmerged)" if hasattr(model, "peft_config") else "")

    def enable_token_merging(self, model, ratio: float) -> None:
        """Video token merging in the graft's own embedding splice (Qwen2-VL / Qwen2.5-VL grafts)."""
        from surgvqa.backbones.qwen_vl_whisper.constants import SPLICES_VISION

        graft = unwrap(model)
        if ratio != 1.0 and graft.vl_type not in SPLICES_VISION:
            raise UserError(f"--token_kept_ratio: token merging is not available for {graft.vl_type} grafts "
                            f"(only {', '.join(SPLICES_VISION)}); drop it")
        super().enable_token_merging(graft, ratio)

    # -- training ---------------------------------------------------------------------------------------------
    def make_trainable(self, model, lora_config, stage: int | None = None, init_from: str | None = None):
        """Stage 1: only the audio projector trains (no PEFT; saving writes the projector and config). Stage 2
        (the default): LoRA on the LLM plus the projector as ``modules_to_save``."""
        stage = 2 if stage is None else int(stage)
        if stage not in (1, 2):
            raise UserError(f"--stage must be 1 (projector alignment) or 2 (LoRA + projector), got {stage}")
        if hasattr(model, "peft_config"):
            raise ValueError("make_trainable expects the bare graft, not a PEFT model")
        graft = unwrap(model)
        if init_from:
            self._check_same_parts(graft, init_from)
            load_projector(graft, init_from)
            logger.info("audio projector initialised from %s", init_from)
        elif stage == 2 and graft.config.graft_stage < 1:
            logger.warning("stage 2 on a graft whose projector was never aligned (graft_stage %d): run --stage 1 "
                           "first and pass --init_from STAGE1_DIR (or train on the stage-1 directory)",
                           graft.config.graft_stage)
        graft._surgvqa_training = {"stage": stage,
                                   "init_from": str(Path(init_from).resolve()) if init_from else None}
        if stage == 1:
            graft.requires_grad_(False)
            graft.audio_projector.requires_grad_(True)
            graft.save_mode = "projector"
            graft.config.graft_stage = 1
            trainable = sum(p.numel() for p in graft.parameters() if p.requires_grad)
            total = sum(p.numel() for p in graft.parameters())
            logger.info("stage 1: training the audio projector only (%d of %d parameters)", trainable, total)
            return graft
        from peft import get_peft_model

        modules = list(lora_config.modules_to_save or [])
        if self.audio_projector_module not in modules:
            modules.append(self.audio_projector_module)
        lora_config.modules_to_save = modules
        graft.config.graft_stage = max(graft.config.graft_stage, 1)
        return get_peft_model(graft, lora_config)

    @staticmethod
    def _check_same_parts(graft, init_from: str) -> None:
        """--init_from must be a stage-1 directory of the same VL model and encoder: stage 2 records it as its
        base, so inference loads that directory's parts under the adapter."""
        config_file = Path(init_from) / "config.json"
        recorded = json.loads(config_file.read_text()) if config_file.is_file() else {}
        if recorded.get("model_type") != MODEL_TYPE:
            raise UserError(f"--init_from {init_from}: not a qwen_vl_whisper graft directory (stage-1 output)")
        for key in ("vl_model_path", "audio_encoder_path"):
            theirs = resolve_part(recorded.get(key), init_from)
            ours = Path(getattr(graft.config, key)).resolve()
            if theirs != ours:
                raise UserError(f"--init_from {init_from}: its {key} is {theirs}, this graft's is {ours}")

    # -- saving -----------------------------------------------------------------------------------------------
    def check_sharding(self, sharding: str | None) -> None:
        if sharding:
            raise UserError(f"{sharding} on the {self.name!r} graft: its projector file is written from the model's "
                            "weights by one process, which holds only its shard of them; train the graft with DDP "
                            "(torchrun, no --fsdp / ZeRO-3)")

    def save_extras(self, model, output_dir: str, config) -> dict[str, Any]:
        """The graft's record for the run's RunConfig (``config``): encoder, stage; stage 2 also writes the trained
        projector (projector.safetensors, the modules_to_save copy) and records the stage-1 directory as its base."""
        graft = unwrap(model)
        training = getattr(graft, "_surgvqa_training", None) or {"stage": None, "init_from": None}
        record = {
            "stage": training["stage"],
            "init_from": training["init_from"],
            "vl_model": graft.config.vl_model_path,
            "vl_model_type": graft.vl_type,
            "audio_encoder": graft.config.audio_encoder_path,
            "projector": graft.config.projector_type,
            "projector_file": PROJECTOR_FILE,
            "audio_pooling": graft.config.audio_pooling,
            "audio_window": graft.config.audio_window,
            "trim_audio": graft.config.trim_audio,
        }
        updates: dict[str, Any] = {}
        if training["stage"] == 2:
            write_projector(projector_module(model).state_dict(), output_dir)
            if training["init_from"]:
                record["model_name_or_path"] = config.base_model
                updates["base_model"] = training["init_from"]
        updates["graft"] = record
        return updates

    def save_merged(self, model, output_dir: str, config=None, **kwargs) -> None:
        """Write a merged graft (after ``merge_and_unload``) as one self-contained directory: the merged VL model
        (a plain transformers checkpoint in ``vl_model/``), the encoder (``audio_encoder/``), the projector and a
        config that says what it is: ``graft_stage`` 2, the adapters merged (``config.merged_from``) and the
        graft they were merged into (``config.base_model``); ``config`` is the merged RunConfig. ``kwargs`` go to
        ``save_pretrained``."""
        if hasattr(model, "peft_config"):
            raise ValueError("save_merged expects a merged model (call merge_and_unload first)")
        graft = unwrap(model)
        graft.config.graft_stage = 2
        merged_from = (config.merged_from if config is not None else None) or []
        graft.config.merged_adapters = [stage["adapter"] for stage in merged_from] or None
        graft.config.merged_base = config.base_model if config is not None else None
        graft.save_pretrained(output_dir, save_towers=True, **kwargs)


def unwrap(model):
    """The graft inside a PeftModel or a DDP wrapper (or the graft itself)."""
    graft = unwrap_model(model)
    if type(graft).__name__ != "QwenVLWhisperForConditionalGeneration":
        raise ValueError(f"{type(model).__name__} holds no qwen_vl_whisper graft")
    return graft


def projector_module(model):
    """The projector that is active: the trained copy when PEFT wraps it in ``modules_to_save``."""
    projector = unwrap(model).audio_projector
    if hasattr(projector, "modules_to_save"):
        active = projector.active_adapters if hasattr(projector, "active_adapters") else [projector.active_adapter]
        projector = projector.modules_to_save[active[0]]
    return projector


def load_projector(model, directory: str | Path) -> None:
    """Copy ``directory``'s projector.safetensors into the graft's (active) projector, checking the shapes."""
    file = Path(directory) / PROJECTOR_FILE
    if not file.is_file():
        raise UserError(f"--init_from {directory}: no {PROJECTOR_FILE} (expected a stage-1 output directory)")
    target = projector_module(model)
    state = read_projector(file)
    expected = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        raise UserError(f"--init_from {directory}: projector {found} does not fit this graft's {expected}")
    target.load_state_dict(state, strict=True)


BACKBONE = QwenVLWhisper()
