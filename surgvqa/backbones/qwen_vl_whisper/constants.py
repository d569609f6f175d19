"""Names a graft directory and its processor agree on (no transformers import: the backbone reads these cheaply)."""

from __future__ import annotations

MODEL_TYPE = "qwen_vl_whisper"
PROJECTOR_FILE = "projector.safetensors"
#: key prefix of the projector's tensors in projector.safetensors (their names in the graft's state dict)
PROJECTOR_PREFIX = "audio_projector."
#: subdirectories of a self-contained save (merged models, tiny fixtures)
VL_SUBDIR = "vl_model"
ENCODER_SUBDIR = "audio_encoder"
#: the processor record of grafts saved before the processor was a ``ProcessorMixin`` (read, never written)
LEGACY_PROCESSOR_FILE = "graft_processor.json"
AUDIO_TOKENS = {"audio_bos_token": "<|audio_bos|>", "audio_token": "<|AUDIO|>", "audio_eos_token": "<|audio_eos|>"}
#: VL model and processor classes by ``model_type`` of the VL config
VL_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}
VL_PROCESSOR_CLASSES = {
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
}
#: VL families whose vision embeddings the graft splices itself (exact ``input_ids`` masks, no deepstack)
SPLICES_VISION = ("qwen2_vl", "qwen2_5_vl")
SAMPLING_RATE = 16000
#: what ``graft_stage`` in config.json means
STAGES = {0: "created (projector untrained)", 1: "stage 1 (projector aligned)", 2: "stage 2 (LoRA merged into the LLM)"}
