"""The graft package against the files it must read and write: a graft saved by the single-module code of commit
adb9dbc (tests/fixtures/legacy_graft) loads with its settings and gives that code's outputs; saving goes through
the library (ProcessorMixin files, AutoConfig / AutoProcessor / AutoModelForImageTextToText) and takes the
state_dict Trainer hands over (ZeRO-3 / FSDP gather it); the package imports nothing above the backbones."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from surgvqa.backbones import LoadOptions
from surgvqa.backbones.qwen_vl_whisper import BACKBONE

LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy_graft"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def legacy(tmp_path_factory) -> Path:
    """A copy of the fixture (nothing a test does can write into the repository)."""
    return Path(shutil.copytree(LEGACY, tmp_path_factory.mktemp("legacy") / "graft"))


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(LEGACY / "reference_outputs.safetensors"))


def _reference_batches(processor) -> list[dict]:
    """The fixture README's inputs, one sample per batch, features cut to the clip's frames (as the collator)."""
    rng = np.random.default_rng(0)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "audio"},
                                             {"type": "text", "text": "Is the scope moving forward?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batches = []
    for seconds in (1.0, 2.3):
        frames = [rng.integers(0, 256, size=(56, 56, 3), dtype=np.uint8) for _ in range(4)]
        clip = (rng.normal(size=int(seconds * 16000)) * 0.1).astype(np.float32)
        encoded = processor(text=[text], videos=[frames], audio=[clip], return_tensors="pt", padding=True,
                            videos_kwargs={"size": {"shortest_edge": 784, "longest_edge": 3136}, "fps": 2.0,
                                           "do_sample_frames": False})
        real = int(encoded["feature_attention_mask"].sum())
        encoded["input_features"] = encoded["input_features"][..., :real]
        encoded["feature_attention_mask"] = encoded["feature_attention_mask"][:, :real]
        batches.append(encoded)
    return batches


def _assert_reference_outputs(model, processor, reference) -> None:
    for i, batch in enumerate(_reference_batches(processor)):
        for key in ("input_ids", "video_grid_thw", "second_per_grid_ts", "feature_attention_mask"):
            assert torch.equal(batch[key], reference[f"{key}_{i}"]), (key, i)
        for window in ("trimmed", "full"):
            model.config.audio_window = window
            with torch.no_grad():
                logits = model(**batch).logits[0, -1]
                audio = model.get_audio_features(batch["input_features"], batch["feature_attention_mask"])
            torch.testing.assert_close(audio, reference[f"audio_{window}_{i}"], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(logits, reference[f"logits_{window}_{i}"], rtol=1e-4, atol=1e-4)
    model.config.audio_window = "trimmed"  # the fixture's own setting


def test_legacy_graft_loads_with_its_settings(legacy):
    from safetensors.torch import load_file

    model = BACKBONE.load(str(legacy), LoadOptions(dtype="float32"))
    processor = BACKBONE.load_processor(str(legacy))
    record = json.loads((legacy / "graft_processor.json").read_text())
    assert type(processor).__name__ == "QwenVLWhisperProcessor"
    assert processor.vl_processor_class == record["vl_processor_class"] == "Qwen2_5_VLProcessor"
    assert (processor.audio_pooling, processor.trim_audio) == (1, True)  # not the defaults (2, True)
    assert processor.feature_extractor.feature_size == record["feature_extractor"]["feature_size"] == 128
    config = json.loads((legacy / "config.json").read_text())
    assert [processor.audio_bos_token_id, processor.audio_token_id, processor.audio_eos_token_id] == [
        config["audio_bos_token_id"], config["audio_token_id"], config["audio_eos_token_id"]]
    assert processor.tokenizer.chat_template == processor.chat_template and "<|AUDIO|>" in processor.chat_template
    assert (model.config.projector_type, model.config.audio_pooling, model.config.audio_window) == (
        "mlp", 1, "trimmed")
    assert model.config.graft_stage == 0 and model.config.merged_adapters is None
    assert type(model.vl_model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    saved = load_file(str(legacy / "projector.safetensors"))
    for name, tensor in model.audio_projector.state_dict().items():
        assert torch.equal(tensor, saved[f"audio_projector.{name}"]), name
    assert "qwen2_5_vl" in BACKBONE.describe(model) and "stage" not in BACKBONE.describe(model).split(";")[0]


def test_legacy_graft_gives_the_outputs_of_the_code_that_saved_it(legacy, reference):
    model = BACKBONE.load(str(legacy), LoadOptions(dtype="float32"))
    _assert_reference_outputs(model, BACKBONE.load_processor(str(legacy)), reference)


def test_resaved_in_the_library_format_and_loaded_by_the_auto_classes(legacy, reference, tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from surgvqa.backbones.qwen_vl_whisper.configuration import QwenVLWhisperConfig
    from surgvqa.backbones.qwen_vl_whisper.modeling import QwenVLWhisperForConditionalGeneration
    from surgvqa.backbones.qwen_vl_whisper.processing import QwenVLWhisperProcessor

    model = BACKBONE.load(str(legacy), LoadOptions(dtype="float32"))
    BACKBONE.load_processor(str(legacy)).save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "graft_processor.json").exists()
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "QwenVLWhisperProcessor" and saved["audio_pooling"] == 1
    assert saved["feature_extractor"]["feature_extractor_type"] == "WhisperFeatureExtractor"
    assert isinstance(AutoConfig.from_pretrained(tmp_path), QwenVLWhisperConfig)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(processor, QwenVLWhisperProcessor) and processor.audio_pooling == 1
    again = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32)
    assert isinstance(again, QwenVLWhisperForConditionalGeneration)
    assert again.config.vl_model_path.endswith("vl_model") and again.config.audio_window == "trimmed"
    _assert_reference_outputs(again, processor, reference)


def test_save_pretrained_writes_the_state_dict_it_is_given(legacy, tmp_path):
    """Under ZeRO-3 / FSDP the module holds shards and Trainer passes the gathered state_dict: every tensor written
    comes from it, and the other arguments reach the parts' save_pretrained (here: sharding)."""
    from safetensors.torch import load_file

    from surgvqa.backbones.qwen_vl_whisper.modeling import QwenVLWhisperForConditionalGeneration

    model = BACKBONE.load(str(legacy), LoadOptions(dtype="float32"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    changed = ("audio_projector.layers.0.bias", "vl_model.lm_head.weight", "audio_encoder.conv1.bias")
    for key in changed:
        state[key] += 1.0
    model.save_pretrained(tmp_path / "full", state_dict=state, max_shard_size="100KB")
    assert (tmp_path / "full" / "vl_model" / "model.safetensors.index.json").is_file()  # sharded as asked
    again = QwenVLWhisperForConditionalGeneration.from_pretrained(tmp_path / "full", dtype=torch.float32)
    for key, tensor in again.state_dict().items():
        assert torch.equal(tensor, state[key]), key
    assert not torch.equal(again.audio_projector.layers[0].bias, model.audio_projector.layers[0].bias)

    model.save_mode = "projector"  # stage-1 training: the projector only, also from the given state_dict
    model.save_pretrained(tmp_path / "stage1", state_dict=state)
    assert not (tmp_path / "stage1" / "vl_model").exists()
    written = load_file(str(tmp_path / "stage1" / "projector.safetensors"))
    assert torch.equal(written["audio_projector.layers.0.bias"], state["audio_projector.layers.0.bias"])
    model.save_pretrained(tmp_path / "elsewhere", is_main_process=False)
    assert not (tmp_path / "elsewhere").exists()
    with pytest.raises(ValueError, match="upload"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)


def test_from_pretrained_passes_its_arguments_to_the_vl_model(legacy):
    from surgvqa.backbones.qwen_vl_whisper.modeling import QwenVLWhisperForConditionalGeneration

    model = QwenVLWhisperForConditionalGeneration.from_pretrained(legacy, dtype=torch.bfloat16,
                                                                  attn_implementation="eager")
    assert model.vl_model.dtype == torch.bfloat16 and model.audio_encoder.dtype == torch.bfloat16
    assert next(model.audio_projector.parameters()).dtype == torch.float32
    assert model.vl_model.config._attn_implementation == "eager"
    assert model.audio_encoder.config._attn_implementation == "eager"


def test_package_imports_nothing_above_the_backbones():
    """The backbone package is cheap to import (no transformers model code) and depends on nothing above
    ``surgvqa.backbones`` but the leaf modules; its model, processor and command modules neither."""
    code = (
        "import json, sys\n"
        "import surgvqa.backbones.qwen_vl_whisper\n"
        "heavy = [m for m in ('transformers.modeling_utils', 'transformers.processing_utils') if m in sys.modules]\n"
        "from surgvqa.backbones.qwen_vl_whisper import backbone, create, modeling, processing\n"
        "print(json.dumps([heavy, sorted(m for m in sys.modules if m.startswith('surgvqa'))]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    heavy, ours = json.loads(out.stdout.strip().splitlines()[-1])
    assert heavy == []
    assert "surgvqa.backbones.qwen_vl_whisper.modeling" in ours
    leaves = {"surgvqa", "surgvqa.errors", "surgvqa.media", "surgvqa.metrics", "surgvqa.prompts", "surgvqa.run_config",
              "surgvqa.versions"}
    assert [m for m in ours if m not in leaves and not m.startswith("surgvqa.backbones")] == []
