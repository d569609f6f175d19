"""``QwenVLWhisperConfig``: a Qwen-VL model, a Whisper encoder and an audio projector (``model_type`` qwen_vl_whisper).

Importing this module registers the config with ``AutoConfig`` (as a custom transformers model does), so
``AutoConfig`` / ``AutoTokenizer`` read a graft directory's config.json.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from surgvqa.backbones.qwen_vl_whisper.constants import MODEL_TYPE, STAGES


class QwenVLWhisperConfig(PreTrainedConfig):
    r"""A Qwen-VL model, a Whisper encoder and an audio projector. ``vl_model_path`` / ``audio_encoder_path``
    (absolute, or relative to the directory holding this config) say where the weights of the two are.

    ``graft_stage``: 0 created, 1 projector aligned (stage-1 output), 2 stage-2 LoRA merged into the LLM; a merged
    graft also records the adapters merged (``merged_adapters``, in order) and the graft they were merged into
    (``merged_base``)."""

    model_type = MODEL_TYPE
    sub_configs_defaults = {
        "vl_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2_vl"),
        "audio_config": SubConfigSpec(config_class=AutoConfig, model_type="whisper"),
    }

    vl_config: dict | PreTrainedConfig | None = None
    audio_config: dict | PreTrainedConfig | None = None
    vl_model_path: str | None = None
    audio_encoder_path: str | None = None
    projector_type: str = "linear"
    audio_pooling: int = 2
    audio_window: str = "full"
    trim_audio: bool = True
    audio_token_id: int | None = None
    audio_bos_token_id: int | None = None
    audio_eos_token_id: int | None = None
    graft_stage: int = 0
    merged_adapters: list[str] | None = None
    merged_base: str | None = None
    tie_word_embeddings: bool = False

    def get_text_config(self, decoder=None, encoder=None):
        return self.vl_config.get_text_config(decoder=decoder, encoder=encoder)

    def describe(self) -> str:
        """One line: what the graft is made of, which stage it is, how it hears."""
        vl = f"{self.vl_config.model_type} ({Path(str(self.vl_model_path)).name})"
        encoder = f"Whisper encoder (d_model {self.audio_config.d_model}, {Path(str(self.audio_encoder_path)).name})"
        stage = STAGES.get(int(self.graft_stage), f"stage {self.graft_stage}")
        if self.merged_adapters:
            stage += f": {', '.join(self.merged_adapters)} merged into {self.merged_base}"
        window = "30 s encoder window" if self.audio_window == "full" else "encoder window cut to the clip"
        output = f"output trimmed, {self.audio_pooling}x pooled" if self.trim_audio else "all 1,500 frames"
        return (f"{MODEL_TYPE}: {vl} + {encoder}, {self.projector_type} projector; {stage}; "
                f"audio: {window}, {output}")


AutoConfig.register(MODEL_TYPE, QwenVLWhisperConfig, exist_ok=True)
