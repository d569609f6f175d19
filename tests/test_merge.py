"""merge_stage2_to_bf16.py / surgvqa.merge: adapters merged into an unquantized base, verified, refused when unsafe."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import GREEDY_GAP, VERIFY_FLAGS, checkpoint_greedy_gap, small_training_set
from safetensors.torch import load_file

from surgvqa.merge import (
    VERIFY_TOLERANCE,
    Verification,
    check_chain,
    compare_outputs,
    main,
    merge,
    nf4_round_trip,
    parse_args,
    pickle_files,
    run_outputs,
    verify_inputs,
)

# 4 samples, 2 frames, rank-4 LoRA, a high learning rate: a non-trivial adapter in a few CPU seconds.
TRAIN_FLAGS = [
    "--frame_size", "56", "--max_train_frames", "2", "--per_device_train_batch_size", "2",
    "--learning_rate", "2e-2", "--max_steps", "4", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.0",
    "--save_strategy", "no", "--logging_steps", "50", "--use_cpu", "True", "--seed", "0", "--disable_tqdm", "True",
]
Q_PROJ = "model.language_model.layers.0.self_attn.q_proj"  # module name (adapter keys)
Q_KEY = "model.layers.0.self_attn.q_proj.weight"  # the same weight as save_pretrained writes it


def train(base: Path, data: Path, out: Path) -> Path:
    from surgvqa.train import main as train_main

    args = ["--model_name_or_path", str(base), "--train_data_path", str(data), "--output_dir", str(out)]
    assert train_main(args + TRAIN_FLAGS) == 0
    return out


def run_merge(base: Path, adapters: list[Path], out: Path, *extra: str) -> dict:
    argv = ["--base_model_path", str(base), "--adapter_path", *map(str, adapters), "--output_dir", str(out),
            "--device", "cpu", *extra]
    return merge(parse_args(argv))


def weights(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def lora_delta(adapter: Path, module: str) -> torch.Tensor:
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    a = tensors[f"base_model.model.{module}.lora_A.weight"].double()
    b = tensors[f"base_model.model.{module}.lora_B.weight"].double()
    return (b @ a) * (config["lora_alpha"] / config["r"])


def copy_adapter(adapter: Path, out: Path, **changes) -> Path:
    shutil.copytree(adapter, out)
    config = json.loads((out / "surgvqa_config.json").read_text())
    config.update(changes)
    (out / "surgvqa_config.json").write_text(json.dumps(config))
    if "base_model" in changes:
        peft_config = json.loads((out / "adapter_config.json").read_text())
        peft_config["base_model_name_or_path"] = changes["base_model"]
        (out / "adapter_config.json").write_text(json.dumps(peft_config))
    return out


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory, test_set) -> Path:
    return small_training_set(tmp_path_factory.mktemp("merge"), test_set)


@pytest.fixture(scope="module")
def adapter_a(work, tiny_model_dir) -> Path:
    return train(tiny_model_dir, work / "small.jsonl", work / "adapter_a")


@pytest.fixture(scope="module")
def merged_a(work, tiny_model_dir, adapter_a) -> dict:
    """Stage 1 merged in float32, verified on 2 samples (data and frames from the adapter's record)."""
    return run_merge(tiny_model_dir, [adapter_a], work / "merged_a", "--dtype", "float32", *VERIFY_FLAGS)


@pytest.fixture(scope="module")
def adapter_b(work, merged_a) -> Path:
    """Stage 2: trained on the stage-1 merge."""
    return train(merged_a["output_dir"], work / "small.jsonl", work / "adapter_b")


# ------------------------------------------------------------------------------------------------ the merge
@pytest.fixture(scope="module")
def adapter_a_gap(adapter_a) -> float:
    return checkpoint_greedy_gap(adapter_a)


def test_fp32_merge_reproduces_the_adapter(merged_a, adapter_a, adapter_a_gap, tiny_model_dir):
    lora_b = [t for k, t in load_file(str(adapter_a / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert all(t.abs().max() > 0 for t in lora_b), "training left a lora_B at zero: the test would be vacuous"
    check: Verification = merged_a["verification"]
    print(f"\nfp32 merge: {check.format()}")
    assert check.passed and check.answers_identical
    assert check.compared_positions > 0
    assert check.max_abs_logit_diff <= 1e-5
    assert adapter_a_gap >= GREEDY_GAP  # so "identical answers" cannot depend on the CPU's rounding

    out = merged_a["output_dir"]
    merged, base = weights(out), weights(tiny_model_dir)
    expected = base[Q_KEY].double() + lora_delta(adapter_a, Q_PROJ)
    assert torch.allclose(merged[Q_KEY].double(), expected, atol=1e-6)
    assert not torch.equal(merged[Q_KEY], base[Q_KEY])
    untouched = [k for k in base if k.startswith(("visual.", "audio_tower.")) or "embed_tokens" in k]
    assert untouched and all(torch.equal(merged[k], base[k]) for k in untouched)
    assert set(merged) == set(base)  # no lora_* keys, nothing missing


def test_output_is_standalone_and_documented(merged_a, adapter_a, tiny_model_dir):
    from transformers import AutoModelForImageTextToText, Qwen2_5OmniThinkerForConditionalGeneration

    out = merged_a["output_dir"]
    assert pickle_files(out) == [] and not list(out.glob("*.bin"))
    assert not (out / "adapter_config.json").exists()
    assert (out / "tokenizer_config.json").is_file() and (out / "generation_config.json").is_file()
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(out)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert type(AutoModelForImageTextToText.from_pretrained(out)).__name__ == type(model).__name__

    config = json.loads((out / "surgvqa_config.json").read_text())
    assert config["base_model"] == str(tiny_model_dir.resolve())
    assert config["dtype"] == "float32" and config["merge_verification"]["passed"]
    assert [s["adapter"] for s in config["merged_from"]] == [str(adapter_a.resolve())]
    assert config["merged_from"][0]["base"] == str(tiny_model_dir.resolve())
    assert "lora" not in config and "resized_vocab" not in config
    assert config["preprocessing"] == json.loads((adapter_a / "surgvqa_config.json").read_text())["preprocessing"]
    assert json.loads((out / "merge_verification.json").read_text())["passed"]


def test_evaluate_checkpoint_on_merged_matches_adapter(merged_a, adapter_a, adapter_a_gap, work, test_set):
    from surgvqa.evaluate import main as evaluate_main
    from surgvqa.report import read_predictions

    answers = {}
    for name, checkpoint in (("adapter", adapter_a), ("merged", merged_a["output_dir"])):
        output = work / f"preds_{name}.jsonl"
        code = evaluate_main([
            "--checkpoint_path", str(checkpoint), "--eval_data_path", str(test_set / "in_002-001.jsonl"),
            "--frames_dir", str(test_set / "frames"), "--output_file", str(output), "--limit", "2",
            "--batch_size", "2", "--max_new_tokens", "6", "--device", "cpu",
        ])
        assert code == 0
        answers[name] = [r["prediction"] for r in read_predictions(output)]
    assert adapter_a_gap >= GREEDY_GAP  # the same 2 samples as the verification: no near tie to flip
    assert len(answers["merged"]) == 2 and answers["merged"] == answers["adapter"]


def test_bf16_merge_within_documented_tolerance(work, tiny_model_dir, adapter_a):
    result = run_merge(tiny_model_dir, [adapter_a], work / "merged_bf16", *VERIFY_FLAGS)  # default dtype
    check = result["verification"]
    print(f"\nbf16 merge: {check.format()}")
    assert check.dtype == "bfloat16" and check.passed
    assert check.max_abs_logit_diff <= VERIFY_TOLERANCE["bfloat16"] * max(1.0, check.logit_scale)
    tensors = weights(result["output_dir"])
    assert tensors[Q_KEY].dtype == torch.bfloat16
    assert json.loads((result["output_dir"] / "config.json").read_text())["dtype"] == "bfloat16"


def test_two_stage_chain_equals_sequential_merges(work, tiny_model_dir, adapter_a, adapter_b, merged_a):
    chain = run_merge(tiny_model_dir, [adapter_a, adapter_b], work / "chain", "--dtype", "float32",
                      *VERIFY_FLAGS)
    sequential = run_merge(merged_a["output_dir"], [adapter_b], work / "sequential", "--dtype", "float32")
    print(f"\nchain merge: {chain['verification'].format()}")
    assert chain["verification"].passed

    a, b = weights(chain["output_dir"]), weights(sequential["output_dir"])
    assert set(a) == set(b)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert not torch.equal(a[Q_KEY], weights(merged_a["output_dir"])[Q_KEY])

    from surgvqa.backbones import LoadOptions
    from surgvqa.checkpoint import load_for_inference
    from surgvqa.run_config import RunConfig

    outputs = []
    for path in (chain["output_dir"], sequential["output_dir"]):
        model, processor, _, _ = load_for_inference(path, options=LoadOptions(dtype="float32"))
        args = parse_args(["--base_model_path", "x", "--adapter_path", "y", "--output_dir", "z", *VERIFY_FLAGS])
        dataset, kwargs, data_path = verify_inputs(args, RunConfig.read(path))
        outputs.append(run_outputs(model, processor, dataset, kwargs, 2, 6))
    same = compare_outputs(outputs[0], outputs[1], "float32", None, data_path)
    assert same.answers_identical and same.max_abs_logit_diff <= 1e-5
    assert checkpoint_greedy_gap(chain["output_dir"]) >= GREEDY_GAP

    for result in (chain, sequential):  # both record the whole lineage from the original base
        config = result["config"]
        assert config["base_model"] == str(tiny_model_dir.resolve())
        assert [s["adapter"] for s in config["merged_from"]] == [str(adapter_a.resolve()), str(adapter_b.resolve())]


# ------------------------------------------------------------------------------------------------- refusals
def test_refuses_chain_out_of_order(tiny_model_dir, adapter_a, adapter_b, merged_a):
    with pytest.raises(ValueError, match="trained on"):  # stage 2 alone on the raw base
        check_chain(str(tiny_model_dir), [str(adapter_b)])
    with pytest.raises(ValueError, match="trained on"):  # swapped order
        check_chain(str(tiny_model_dir), [str(adapter_b), str(adapter_a)])
    with pytest.raises(ValueError, match="trained on"):  # stage 1 again on its own merge
        check_chain(str(merged_a["output_dir"]), [str(adapter_a)])
    stages = check_chain(str(tiny_model_dir), [str(adapter_b)], force=True)
    assert stages[0].forced
    assert not any(s.forced for s in check_chain(str(tiny_model_dir), [str(adapter_a), str(adapter_b)]))


def test_refuses_other_base(work, tiny_model_dir, adapter_a):
    other = work / "other_base"
    shutil.copytree(tiny_model_dir, other)
    with pytest.raises(ValueError, match="trained on"):
        run_merge(other, [adapter_a], work / "never")
    assert check_chain(str(other), [str(adapter_a)], force=True)[0].forced
    # a relative spelling of the same directory is the same base
    relative = os.path.relpath(tiny_model_dir, Path.cwd())
    assert not check_chain(relative, [str(adapter_a)])[0].forced


def test_refuses_quantized_base(work, tiny_model_dir, adapter_a):
    with pytest.raises(ValueError, match="never loads the base quantized"):
        run_merge(tiny_model_dir, [adapter_a], work / "never", "--load_in_4bit")
    quantized = work / "quantized_base"
    quantized.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantization_config"):
        run_merge(quantized, [adapter_a], work / "never", "--force")


def test_refuses_resized_vocab_without_rows(work, tiny_model_dir, adapter_a):
    broken = copy_adapter(adapter_a, work / "adapter_resized", resized_vocab=768)
    with pytest.raises(ValueError, match="surgvqa_new_token_rows"):
        run_merge(tiny_model_dir, [broken], work / "never")


def test_refuses_full_omni_on_thinker_base(work, tiny_model_dir, adapter_a):
    with pytest.raises(ValueError, match="full Qwen2.5-Omni base"):
        run_merge(tiny_model_dir, [adapter_a], work / "never", "--full_omni")


def test_refuses_unsafe_output_dir(work, tiny_model_dir, adapter_a, merged_a):
    with pytest.raises(ValueError, match="not empty"):
        run_merge(tiny_model_dir, [adapter_a], merged_a["output_dir"])
    with pytest.raises(ValueError, match="base or an adapter"):
        run_merge(tiny_model_dir, [adapter_a], adapter_a, "--overwrite_output_dir")


def test_main_exit_codes(work, tiny_model_dir, adapter_a, monkeypatch, capsys):
    argv = ["--base_model_path", str(tiny_model_dir), "--adapter_path", str(adapter_a), "--output_dir",
            str(work / "never")]
    assert main(argv + ["--load_in_8bit"]) == 2
    assert "error:" in capsys.readouterr().err
    failed = Verification(samples=1, dtype="float32", max_abs_logit_diff=1.0, logit_scale=1.0,
                          relative_tolerance=1e-5, tolerance=1e-5, compared_positions=3, answers_identical=True,
                          differing_answers=[], data_path="x", passed=False)
    monkeypatch.setattr("surgvqa.merge.merge", lambda args: {"output_dir": None, "verification": failed})
    assert main(argv) == 1


def test_an_output_dir_that_is_a_file_is_refused_before_loading(work, tiny_model_dir, adapter_a, monkeypatch,
                                                                  capsys):
    existing = work / "notes.txt"
    existing.write_text("mine")
    monkeypatch.setattr("surgvqa.merge.load_base", lambda *a, **k: pytest.fail("the base was loaded"))
    argv = ["--base_model_path", str(tiny_model_dir), "--adapter_path", str(adapter_a), "--output_dir",
            str(existing)]
    for extra in ([], ["--overwrite_output_dir"]):
        assert main(argv + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == f"error: --output_dir {existing} is a file, not a directory: choose a new directory " \
            "(nothing was loaded or written)"
    assert existing.read_text() == "mine"


def test_compare_outputs_rules():
    from surgvqa.generate import Prediction

    def preds(*texts):
        return [Prediction(key=("v", str(i)), text=t, stopped_by_eos=True, new_tokens=2, latency_ms=0.0)
                for i, t in enumerate(texts)]

    ref = ([torch.tensor([[10.0, -2.0]])], preds("yes", "no"))
    close = ([torch.tensor([[10.00005, -2.0]])], preds("yes", "no"))
    flipped = ([torch.tensor([[10.00005, -2.0]])], preds("yes", "yes"))
    assert compare_outputs(ref, close, "float32", None, "d").passed  # 5e-5 <= 1e-5 * 10
    assert not compare_outputs(ref, flipped, "float32", None, "d").passed  # fp32 demands identical answers
    assert compare_outputs(ref, flipped, "bfloat16", None, "d").passed  # half precision: logits decide
    assert not compare_outputs(ref, ([torch.tensor([[11.0, -2.0]])], preds("yes", "no")), "bfloat16", None,
                               "d").passed


# ------------------------------------------------------------------------------------------- QLoRA adapters
def test_qlora_adapter_merge_targets(work, tiny_model_dir, adapter_a):
    qlora = copy_adapter(adapter_a, work / "adapter_qlora", quantization="4bit", dtype="bfloat16")
    plain = run_merge(tiny_model_dir, [qlora], work / "qlora_into_base", "--dtype", "float32")
    assert plain["config"]["merged_from"][0]["quantization"] == "4bit"
    assert plain["config"]["merged_from"][0]["merged_into"] == "base"
    assert "quantization" not in plain["config"]

    deq = run_merge(tiny_model_dir, [qlora], work / "qlora_dequantized", "--dtype", "float32",
                    "--merge_into", "dequantized")
    assert deq["config"]["merged_from"][0]["merged_into"] == "nf4-dequantized"
    base, a, b = weights(tiny_model_dir), weights(plain["output_dir"]), weights(deq["output_dir"])
    rounded = nf4_round_trip(base[Q_KEY], torch.bfloat16).double()
    assert torch.allclose(b[Q_KEY].double(), rounded + lora_delta(qlora, Q_PROJ), atol=1e-6)
    assert not torch.allclose(a[Q_KEY], b[Q_KEY], atol=1e-4)
    towers = [k for k in base if k.startswith(("visual.", "lm_head"))]
    assert all(torch.equal(b[k], base[k]) for k in towers)

    with pytest.raises(ValueError, match="no adapter was trained with a 4-bit base"):
        run_merge(tiny_model_dir, [adapter_a], work / "never", "--merge_into", "dequantized")


# ------------------------------------------------------------------------------------------------ full Omni
def build_full_omni(thinker_dir: Path, out: Path) -> Path:
    """A full Qwen2.5-Omni checkpoint (thinker + tiny talker + tiny token2wav) around the tiny thinker."""
    from transformers import (
        Qwen2_5OmniConfig,
        Qwen2_5OmniForConditionalGeneration,
        Qwen2_5OmniThinkerForConditionalGeneration,
    )

    thinker = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(thinker_dir)
    tc = thinker.config
    ids = {k: getattr(tc, k) for k in ("audio_token_index", "image_token_index", "video_token_index",
                                       "vision_start_token_id", "vision_end_token_id", "audio_start_token_id",
                                       "audio_end_token_id")}
    talker = dict(vocab_size=64, embedding_size=tc.text_config.hidden_size, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
                  tts_codec_start_token_id=60, tts_codec_end_token_id=61, tts_codec_pad_token_id=62,
                  tts_codec_mask_token_id=63, tts_text_start_token_id=10, tts_text_end_token_id=11,
                  tts_text_pad_token_id=12, **ids)
    dit = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, emb_dim=16, head_dim=16, num_embeds=64,
               look_ahead_layers=[1], look_backward_layers=[0], enc_emb_dim=16, enc_dim=16,
               enc_channels=[16, 16, 16, 16, 48], enc_attention_channels=8, enc_se_channels=8)
    bigvgan = dict(upsample_initial_channel=32, upsample_rates=[2, 2], upsample_kernel_sizes=[4, 4])
    config = Qwen2_5OmniConfig(thinker_config=tc.to_dict(), talker_config=talker,
                               token2wav_config={"dit_config": dit, "bigvgan_config": bigvgan})
    torch.manual_seed(1)
    full = Qwen2_5OmniForConditionalGeneration(config)
    full.thinker.load_state_dict(thinker.state_dict())
    full.save_pretrained(out)
    torch.save({"Chelsie": {"cond": torch.zeros(16)}}, out / "spk_dict.pt")  # the base's speaker file
    return out


def test_full_omni_keeps_the_talker(work, tiny_model_dir, adapter_a, merged_a):
    from transformers import Qwen2_5OmniForConditionalGeneration

    full = build_full_omni(tiny_model_dir, work / "full_omni")
    adapter = copy_adapter(adapter_a, work / "adapter_on_full", base_model=str(full.resolve()))
    result = run_merge(full, [adapter], work / "merged_full", "--dtype", "float32", "--full_omni",
                       "--verify", "1", "--verify_max_new_tokens", "4")
    assert result["verification"].passed
    out = result["output_dir"]
    assert pickle_files(out) == ["spk_dict.pt"]
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "qwen2_5_omni"
    assert saved["architectures"] == ["Qwen2_5OmniForConditionalGeneration"]  # the stock class, not ours

    reloaded = Qwen2_5OmniForConditionalGeneration.from_pretrained(out)
    assert reloaded.has_talker and reloaded.speaker_map
    base_weights, new_weights = weights(full), weights(out)
    talker = [k for k in base_weights if k.startswith(("talker.", "token2wav."))]
    assert talker and all(torch.equal(new_weights[k], base_weights[k]) for k in talker)
    thinker_only = weights(merged_a["output_dir"])
    assert all(torch.equal(new_weights[f"thinker.{k}"], v) for k, v in thinker_only.items())

    default = run_merge(full, [adapter], work / "merged_full_thinker", "--dtype", "float32")
    config = json.loads((default["output_dir"] / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_omni_thinker" and pickle_files(default["output_dir"]) == []
