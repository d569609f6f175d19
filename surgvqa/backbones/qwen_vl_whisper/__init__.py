"""Qwen-VL + Whisper encoder graft (``qwen_vl_whisper``): plain transformers classes, no fork, no remote code.

A Qwen2-VL / Qwen2.5-VL / Qwen3-VL model (``*ForConditionalGeneration``), the encoder of any Whisper checkpoint and
an audio projector (linear or 2-layer MLP, Whisper ``d_model`` → LLM hidden) form one ``PreTrainedModel``. Laid out
like a transformers model folder:

    configuration.py   QwenVLWhisperConfig (model_type "qwen_vl_whisper"; registered with AutoConfig)
    modeling.py        QwenVLWhisperForConditionalGeneration: projector, embedding splice, M-RoPE, save/load
    processing.py      QwenVLWhisperProcessor (ProcessorMixin; registered with AutoProcessor)
    audio.py           the audio-length rule and the per-clip Whisper window (full / trimmed)
    weights.py         projector.safetensors, the Whisper encoder out of any Whisper checkpoint
    create.py          create_graft and its command: python -m surgvqa.backbones.qwen_vl_whisper create ...
    backbone.py        the backbone training, evaluation and merging use (BACKBONE)

Audio. The encoder output is trimmed to the real audio length (a 3 s question gives 150 encoder frames, not
Whisper's fixed 1,500), optionally average-pooled 2x (75), projected and spliced at the ``<|AUDIO|>`` placeholders;
the processor expands each ``<|audio_bos|><|AUDIO|><|audio_eos|>`` to exactly that many. By default the encoder
still sees Whisper's 30 s window (``audio_window="full"``: the regime it was trained in, only the output is cut);
``audio_window="trimmed"`` also cuts the encoder input (faster, slightly off-distribution). Either way each clip is
encoded by its own length, so its tokens - and the answer - do not depend on the other clips of its batch.
``trim_audio=False`` reproduces the original system (all 1,500 frames fed to the LLM).

On disk (one format for every stage; ``checkpoint.load_for_inference`` and ``backbone_for`` need nothing else)::

    GRAFT/config.json              model_type "qwen_vl_whisper"; vl_model_path, audio_encoder_path (absolute, or
                                   relative to GRAFT), vl_config, audio_config, projector/pooling/window settings,
                                   audio token ids, graft_stage (0 created, 1 projector aligned, 2 LoRA merged;
                                   merged grafts also list merged_adapters and their merged_base)
    GRAFT/projector.safetensors    the audio projector only
    GRAFT/generation_config.json
    GRAFT/processor_config.json, tokenizer*, chat_template.jinja   the processor (ProcessorMixin files; grafts
                                   saved before it was one hold the VL processor's files + graft_processor.json,
                                   still read)
    GRAFT/vl_model/, audio_encoder/  only in self-contained saves (merged models, tiny fixtures)

``--stage 1`` training output is such a directory holding only the aligned projector; ``--stage 2 --init_from
STAGE1`` trains LoRA on the LLM plus the projector (``modules_to_save``) and records STAGE1 as its ``base_model``. A
merged model is written self-contained (``BACKBONE.save_merged``).

Importing this package is cheap (no transformers model code); ``modeling``, ``processing`` and ``create`` load on use.
"""

from surgvqa.backbones.qwen_vl_whisper.audio import audio_token_count
from surgvqa.backbones.qwen_vl_whisper.backbone import BACKBONE, QwenVLWhisper
from surgvqa.backbones.qwen_vl_whisper.constants import MODEL_TYPE

__all__ = ["BACKBONE", "MODEL_TYPE", "QwenVLWhisper", "audio_token_count"]
