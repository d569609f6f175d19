"""The backbone table and what only a backbone (or its processor) knows: grid, quantization, the full checkpoint."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cpu_kernel_path, kernel_path_of, require_kernel_path
from PIL import Image

from surgvqa.backbones import (
    BACKBONES,
    backbone_for,
    get_backbone,
    qwen2_5_omni,
    qwen3_omni_moe,
    qwen_vl_whisper,
)
from surgvqa.backbones.base import LoadOptions, on_vision_grid
from surgvqa.backbones.common.quantization import bnb_config
from surgvqa.backbones.common.qwen_processing import vision_grid
from surgvqa.collate import VQACollator
from surgvqa.data import MediaConfig, Sample, SurgicalVQADataset
from surgvqa.errors import UserError


def test_static_table_lists_each_module_backbone():
    assert BACKBONES == {"qwen2_5_omni": qwen2_5_omni.BACKBONE, "qwen_vl_whisper": qwen_vl_whisper.BACKBONE,
                         "qwen3_omni_moe": qwen3_omni_moe.BACKBONE}
    assert get_backbone("qwen2_5_omni") is qwen2_5_omni.BACKBONE
    with pytest.raises(UserError, match="available: qwen2_5_omni, qwen3_omni_moe, qwen_vl_whisper"):
        get_backbone("llava")


def test_backbone_for_names_the_flag(tmp_path):
    with pytest.raises(UserError, match="--base_model_path must be a local model directory"):
        backbone_for(tmp_path / "missing", flag="--base_model_path")


def test_vision_grid_is_the_processors_patch_times_merge(tiny_model_dir):
    from transformers import AutoProcessor

    assert vision_grid(AutoProcessor.from_pretrained(tiny_model_dir)) == 28  # Qwen2.5-Omni: 14 x 2
    qwen3_like = types.SimpleNamespace(video_processor=types.SimpleNamespace(patch_size=16, merge_size=2))
    assert vision_grid(qwen3_like) == 32
    with pytest.raises(ValueError, match="no vision patch size"):
        vision_grid(types.SimpleNamespace())


def test_on_vision_grid():
    frames = [np.zeros((56, 84, 3), np.uint8), np.zeros((28, 28, 3), np.uint8)]
    assert on_vision_grid(frames, 28) and on_vision_grid(frames, 28, max_edge=84)
    assert not on_vision_grid(frames, 28, max_edge=56)  # 84 px is over the budget
    assert not on_vision_grid(frames, 32)


def test_frames_are_resized_onto_the_backbones_grid(tmp_path):
    Image.fromarray(np.full((300, 400, 3), 128, np.uint8)).save(tmp_path / "f.jpg")
    sample = Sample(video_id="v", id="q", question="?", answer="a", frame_paths=(tmp_path / "f.jpg",))
    for grid, expected in ((28, (196, 252)), (32, (192, 256))):
        media = MediaConfig(frames_dir=str(tmp_path), frame_size=256, pixel_multiple=grid)
        (frame,) = SurgicalVQADataset([sample], media)[0]["frames"]
        assert frame.shape[:2] == expected and on_vision_grid([frame], grid, max_edge=256)
    with pytest.raises(ValueError, match="frame_size must be an int >= 32"):
        MediaConfig(frames_dir=str(tmp_path), frame_size=28, pixel_multiple=32)


def test_one_bitsandbytes_config():
    assert bnb_config(LoadOptions(), ["model.visual"]) is None
    four = bnb_config(LoadOptions(load_in_4bit=True), ["model.visual", "lm_head"])
    assert (four.load_in_4bit, four.bnb_4bit_quant_type, four.bnb_4bit_use_double_quant) == (True, "nf4", True)
    assert four.bnb_4bit_compute_dtype == torch.bfloat16 and four.llm_int8_skip_modules == ["model.visual", "lm_head"]
    eight = qwen2_5_omni.BACKBONE.quantization_config(LoadOptions(load_in_8bit=True))
    assert eight.load_in_8bit and {"model.visual", "model.audio_tower", "lm_head"} <= set(eight.llm_int8_skip_modules)


def test_full_model_merge_is_a_backbone_question():
    omni = qwen2_5_omni.BACKBONE
    assert omni.full_model_problem({"model_type": "qwen2_5_omni"}, "/m") is None
    assert "full Qwen2.5-Omni base" in omni.full_model_problem({"model_type": "qwen2_5_omni_thinker"}, "/m")
    assert omni.full_model_files == ("spk_dict.pt",)
    graft = qwen_vl_whisper.BACKBONE
    assert "has no full-model form" in graft.full_model_problem({"model_type": "qwen_vl_whisper"}, "/g")
    assert graft.full_model_files == ()


def test_end_of_turn_comes_from_the_chat_template(tiny_model_dir):
    """Labels end with whatever special token the template writes after an answer: nothing assumes <|im_end|>."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    for owner in (processor, processor.tokenizer):
        owner.chat_template = owner.chat_template.replace("<|im_end|>", "<|box_end|>")
    sample = Sample(video_id="v", id="q", question="Is NBI on?", answer="No.")
    item = {"sample": sample, "frames": [np.zeros((56, 56, 3), np.uint8)] * 2, "audio": None}
    batch = VQACollator(processor, frame_size=56, mode="train")([item])
    labels = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert labels[-1] == processor.tokenizer.convert_tokens_to_ids("<|box_end|>")
    assert processor.tokenizer.decode(labels) == "No.<|box_end|>"


def test_kernel_paths_beyond_the_cpu_are_skipped_with_the_reason():
    """A test may only force a kernel path the CPU has: on an AVX2-only CPU the avx512 path skips (saying why)
    instead of dying with SIGILL; the lower paths run everywhere."""
    assert kernel_path_of("AVX512") == "avx512" and kernel_path_of("DEFAULT") == "default"
    assert kernel_path_of("ZVECTOR") == "default"  # another architecture: only the default path is known here
    with pytest.raises(pytest.skip.Exception, match="this CPU's highest kernel path is avx2"):
        require_kernel_path("avx512", cpu_path="avx2")
    for path in ("default", "avx2"):
        require_kernel_path(path, cpu_path="avx2")  # no skip
    assert cpu_kernel_path() in ("default", "avx2", "avx512")


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_half_precision_attention_runs_on_every_cpu_kernel_path(capability):
    """torch's CPU SDPA kernel for bf16 needs AVX-512 at longer sequences; runnable_attention falls back to the
    math kernel on the other paths, so bf16 evaluation and merge verification run on any x86 CPU."""
    import os
    import subprocess
    import sys

    require_kernel_path(capability)

    code = (
        "import torch, torch.nn.functional as F\n"
        "from surgvqa.backbones.base import runnable_attention\n"
        "model = torch.nn.Linear(4, 4).to(torch.bfloat16)\n"
        "q = torch.randn(1, 2, 128, 16, dtype=torch.bfloat16)\n"
        "with runnable_attention(model):\n"
        "    out = F.scaled_dot_product_attention(q, q, q, is_causal=True)\n"
        "ref = F.scaled_dot_product_attention(q.float(), q.float(), q.float(), is_causal=True)\n"
        "print(float((out.float() - ref).abs().max()))\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip().splitlines()[-1]) < 0.05  # bf16 rounding of a softmax-weighted mean


def _safetensors_keys(directory: Path) -> list[str]:
    from safetensors import safe_open

    keys: list[str] = []
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            keys.extend(handle.keys())
    return sorted(keys)


def test_the_family_class_saves_what_the_stock_class_loads(tiny_model_dir, tmp_path):
    """Qwen25OmniThinker adds code paths, no weights: its save is the stock checkpoint (same tensor names, config
    naming the stock class), and a LoRA adapter trained on it is the adapter of the stock class."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration as Stock

    from surgvqa.backbones.qwen2_5_omni.modeling import Qwen25OmniThinker

    ours = qwen2_5_omni.BACKBONE.load(str(tiny_model_dir), LoadOptions(dtype="float32"))
    assert type(ours) is Qwen25OmniThinker
    ours.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["architectures"] == [Stock.__name__]
    stock = Stock.from_pretrained(tmp_path / "saved")
    assert type(stock) is Stock
    stock.save_pretrained(tmp_path / "stock")
    assert _safetensors_keys(tmp_path / "saved") == _safetensors_keys(tmp_path / "stock")
    theirs = stock.state_dict()
    assert all(torch.equal(value, theirs[name]) for name, value in ours.state_dict().items())

    adapters = {}
    for name, model in (("ours", ours), ("stock", Stock.from_pretrained(tiny_model_dir))):
        torch.manual_seed(0)
        config = LoraConfig(r=4, target_modules=qwen2_5_omni.BACKBONE.lora_target_regex, task_type="CAUSAL_LM")
        get_peft_model(model, config).save_pretrained(tmp_path / f"adapter-{name}")
        adapters[name] = (json.loads((tmp_path / f"adapter-{name}" / "adapter_config.json").read_text()),
                          _safetensors_keys(tmp_path / f"adapter-{name}"))
    assert adapters["ours"] == adapters["stock"] and adapters["ours"][1]
