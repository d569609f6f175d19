"""surgvqa plan: exact tokens, exact weights, quantized storage, the budget search and the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from surgvqa.backbones.common.token_merging import kept_video_tokens
from surgvqa.plan import PlanArguments, Planner, _largest, main, parse_bytes, sample_tokens

REPO = Path(__file__).resolve().parents[1]
OMNI_7B = REPO / "configs" / "models" / "qwen2_5_omni_7b_thinker.json"
VL_7B = REPO / "configs" / "models" / "qwen2_5_vl_7b.json"


def planner(model: Path, processor: Path | None = None, **kwargs) -> Planner:
    return Planner(PlanArguments(model=str(model), processor=str(processor) if processor else None, **kwargs))


def storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def loaded_tensors(model):
    """Parameters plus bitsandbytes quantization state (absmax, codes, nested state, int8 scales)."""
    for param in model.parameters():
        yield param
        state = getattr(param, "quant_state", None)
        if state is not None:
            yield from (state.absmax, state.code)
            if state.nested:
                yield from (state.offset, state.state2.absmax, state.state2.code)
        if getattr(param, "SCB", None) is not None:
            yield param.SCB


# ------------------------------------------------------------------------------------------------- tokens
@pytest.fixture(scope="module")
def tiny_planner(tiny_model_dir) -> Planner:
    return planner(tiny_model_dir)


@pytest.mark.parametrize("modality", ["text", "text+audio"])
def test_token_counts_equal_what_the_processor_produces(tiny_planner, modality):
    """5 frame sizes x 3 frame counts (one odd: padded to the temporal patch), with and without a spoken question:
    the planner's video / audio / total counts are those of the collated batch."""
    from surgvqa.collate import VQACollator
    from surgvqa.media import fit_to_budget

    processor = tiny_planner.processor
    tokenizer = processor.tokenizer
    video_id = tokenizer.convert_tokens_to_ids("<|VIDEO|>")
    audio_id = tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    args = tiny_planner.args
    args.question_modality, args.audio_seconds = modality, 2.5
    rng = np.random.default_rng(0)
    for size in (56, 112, 168, 280, 384):
        w, h = fit_to_budget(1352, 1080, size)
        for frames in (2, 7, 16):
            tokens = sample_tokens(processor, args, frames, size, "train")
            item = {
                "sample": SimpleNamespace(key=("v", "1"), question=args.question, answer=args.answer, source="t"),
                "frames": [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(frames)],
                "audio": rng.standard_normal(40000).astype(np.float32) if "audio" in modality else None,
            }
            collator = VQACollator(processor, question_modality=modality, frame_size=size, mode="train")
            batch = collator([item])
            ids = batch["input_ids"][0]
            where = f"{frames} frames at {size} px, {modality}"
            assert tokens.frame_hw == (h, w), where
            assert tokens.video == int((ids == video_id).sum()), where
            assert tokens.audio == int((ids == audio_id).sum()), where
            assert tokens.total == ids.numel(), where
            assert tokens.answer == int((batch["labels"][0] != -100).sum()), where
            assert tokens.text == tokens.total - tokens.video - tokens.audio, where
            assert tokens.patches == batch["pixel_values_videos"].shape[0], where


def test_token_kept_ratio_keeps_ceil_r_n_video_tokens(tiny_planner):
    args = tiny_planner.args
    full = sample_tokens(tiny_planner.processor, args, 8, 224, "train")
    args.token_kept_ratio = 0.3
    try:
        merged = sample_tokens(tiny_planner.processor, args, 8, 224, "train")
    finally:
        args.token_kept_ratio = 1.0
    assert merged.video == -(-3 * full.video // 10) == kept_video_tokens(full.video, 0.3)
    assert merged.total == full.total - full.video + merged.video
    assert kept_video_tokens(130, 1.0) == 130 and kept_video_tokens(130, 0.5) == 65
    with pytest.raises(ValueError, match="token_kept_ratio"):
        kept_video_tokens(10, 0.0)


# ------------------------------------------------------------------------------------------------ weights
def _small_model_dir(tmp_path: Path) -> Path:
    from conftest import load_script

    tiny = load_script("make_tiny_model")
    tokenizer = tiny.build_tokenizer("tiny")
    config = tiny.build_config(tokenizer, text_hidden=256, tower_hidden=64, layers=3)
    config.text_config.intermediate_size = 688
    config.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("which", ["tiny", "small"])
def test_parameter_counts_equal_the_instantiated_model(which, tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, Qwen2_5OmniThinkerForConditionalGeneration

    from surgvqa.backbones import get_backbone

    model_dir = tiny_model_dir if which == "tiny" else _small_model_dir(tmp_path)
    plan = planner(model_dir, tiny_model_dir)
    torch.manual_seed(0)
    model = Qwen2_5OmniThinkerForConditionalGeneration(AutoConfig.from_pretrained(model_dir))
    groups = {g.group: g.params for g in plan.groups}
    assert sum(groups.values()) == sum(p.numel() for p in model.parameters())
    inner = model.model
    merger = sum(p.numel() for p in inner.visual.merger.parameters())
    audio_proj = sum(p.numel() for p in inner.audio_tower.proj.parameters())
    assert groups["vision tower"] == sum(p.numel() for p in inner.visual.parameters()) - merger
    assert groups["audio tower"] == sum(p.numel() for p in inner.audio_tower.parameters()) - audio_proj
    assert groups["projectors"] == merger + audio_proj
    assert groups["lm_head"] == model.lm_head.weight.numel()
    assert groups["embeddings"] == model.get_input_embeddings().weight.numel()
    peft_model = get_peft_model(model, LoraConfig(r=16, target_modules=get_backbone("qwen2_5_omni").lora_target_regex))
    assert plan.lora == sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert plan.shape.layers == model.config.text_config.num_hidden_layers


def test_bf16_bytes_equal_the_loaded_model(tiny_model_dir):
    from surgvqa.backbones import LoadOptions, backbone_for

    plan = planner(tiny_model_dir, dtype="bfloat16")
    model = backbone_for(str(tiny_model_dir)).load(str(tiny_model_dir), LoadOptions(dtype="bfloat16"))
    assert sum(g.eval_bytes for g in plan.groups) == storage_bytes(model.parameters())


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_storage_equals_the_bitsandbytes_loaded_model(tiny_model_dir, bits):
    """Eval: as loaded (towers, projectors, lm_head unquantized, in bf16). Train: after the training preparation,
    which keeps them in bf16 and holds only the norms in fp32."""
    pytest.importorskip("bitsandbytes")
    from surgvqa.backbones import LoadOptions, backbone_for
    from surgvqa.backbones.common.quantization import prepare_quantized_for_training

    plan = planner(tiny_model_dir, dtype="bfloat16", load_in_4bit=bits == 4, load_in_8bit=bits == 8)
    options = LoadOptions(dtype="bfloat16", load_in_4bit=bits == 4, load_in_8bit=bits == 8)
    try:
        model = backbone_for(str(tiny_model_dir)).load(str(tiny_model_dir), options)
    except (RuntimeError, NotImplementedError) as err:  # pragma: no cover - depends on the bitsandbytes build
        pytest.skip(f"bitsandbytes cannot load {bits}-bit on this machine: {err}")
    quantized = [n for n, m in model.named_modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    assert quantized and all(n.startswith("model.language_model.layers.") for n in quantized)
    assert sum(g.eval_bytes for g in plan.groups) == storage_bytes(loaded_tensors(model))
    prepare_quantized_for_training(model, gradient_checkpointing=False)
    assert sum(g.train_bytes for g in plan.groups) == storage_bytes(loaded_tensors(model))


# ------------------------------------------------------------------------------------------ shipped configs
def test_shipped_7b_configs_build_offline_with_the_published_sizes(qwen_vocab_model_dir):
    omni = planner(OMNI_7B, qwen_vocab_model_dir, question_modality="text+audio")
    groups = {g.group: g.params for g in omni.groups}
    assert sum(groups.values()) == 8_931_813_888
    assert groups["lm_head"] == groups["embeddings"] == 152_064 * 3_584  # untied
    assert omni.lora == 40_370_176  # r 16 on q,k,v,o,gate,up,down of 28 layers
    # 8 frames of 1352x1080 at 384 px -> 364x280 -> 4 frame pairs x 13 x 10 merged patches; 3 s of audio -> 75
    tokens = sample_tokens(omni.processor, omni.args, mode="train")
    assert (tokens.video, tokens.audio, tokens.frame_hw) == (520, 75, (280, 364))
    # the Qwen2.5-VL config: weights need no processor
    from surgvqa.plan import build_config, layout_for, meta_model, weights

    config = json.loads(VL_7B.read_text())
    model = meta_model(build_config(config, None))
    rows = {g.group: g.params for g in weights(model, layout_for(config), PlanArguments(model=str(VL_7B)))}
    assert sum(rows.values()) == 8_292_166_656
    assert "audio tower" not in rows


# --------------------------------------------------------------------------------------------- the budget
def test_largest_finds_the_boundary():
    for limit in (1, 2, 3, 10, 37, 100):
        assert _largest(lambda v, limit=limit: v <= limit, 1, 1, 1000) == limit
    assert _largest(lambda v: v <= 50, 2, 2, 1000) == 50
    assert _largest(lambda v: v <= 51, 28, 28, 28 * 96) == 28
    assert _largest(lambda v: False, 2, 2, 1000) is None
    assert _largest(lambda v: True, 2, 2, 64) == 64


def test_budget_search_returns_the_largest_setting_that_fits(tiny_model_dir):
    plan = planner(tiny_model_dir, budget="1GiB", overhead="0GiB", dtype="float32", device="cpu",
                   model_max_length=100_000)
    base = plan.eval_total(sample_tokens(plan.processor, plan.args, mode="generate"))["total"]
    plan.args.budget = f"{(base + 40 * 2**20) / 2**20:.0f}MiB"  # room for a little more than the plan
    found = plan.search()
    frames = found["eval"]["max_frames"]
    assert frames is not None and frames >= plan.args.frames

    def eval_total(n_frames: int) -> int:
        return plan.eval_total(sample_tokens(plan.processor, plan.args, n_frames, mode="generate"))["total"]

    assert plan.fits(eval_total(frames)) and not plan.fits(eval_total(frames + 2))
    batch = found["eval"]["max_batch"]
    tokens = sample_tokens(plan.processor, plan.args, mode="generate")
    assert plan.fits(plan.eval_total(tokens, batch)["total"]) and not plan.fits(plan.eval_total(tokens, batch + 1)["total"])


def test_parse_bytes():
    assert parse_bytes("40GiB") == 40 * 2**30
    assert parse_bytes("24GB") == 24 * 10**9
    assert parse_bytes("1.5G") == int(1.5 * 2**30)
    assert parse_bytes("512MiB") == 512 * 2**20
    for bad in ("40", "lots", "GiB"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


# ------------------------------------------------------------------------------------------------ the CLI
def test_cli_json_and_table(tiny_model_dir, capsys):
    assert main(["--model", str(tiny_model_dir), "--frames", "4", "--frame_size", "112", "--question_modality",
                 "text+audio", "--budget", "8GiB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["tokens"]["total"] == sum(plan["tokens"][k] for k in ("video", "image", "audio", "text"))
    train = plan["train"]
    assert train["total"] == sum(train["parts"].values()) and train["parts"]["activations"] > 0
    assert plan["eval"]["parts"]["kv_cache"] > 0
    assert plan["budget"]["train_fits"] and plan["budget"]["eval"]["max_batch"] >= 8
    assert main(["--model", str(tiny_model_dir), "--gradient_checkpointing", "--logits", "labelled"]) == 0
    table = capsys.readouterr().out
    assert "tokens per sample" in table and "train_gc" in table and "total" in table


@pytest.mark.parametrize("model", ["tiny", "omni-7b"])
def test_labelled_logits_and_checkpointing_lower_the_training_plan(tiny_model_dir, model):
    """Labelled-only logits shrink the LM-head phase and never raise the step's peak; they lower it where the head
    is the largest phase (the 7B's 152,064-row vocabulary). Checkpointing lowers the peak."""
    full = planner(OMNI_7B if model == "omni-7b" else tiny_model_dir, tiny_model_dir, frames=16, frame_size=224)
    full.args.logits = "full"
    tokens = sample_tokens(full.processor, full.args, mode="train")
    base = full.train_total(tokens)
    full.args.logits = "labelled"
    labelled = full.train_total(tokens)
    assert labelled["activation_phases"]["head"] < base["activation_phases"]["head"]
    assert labelled["parts"]["activations"] <= base["parts"]["activations"]
    if max(base["activation_phases"], key=base["activation_phases"].get) == "head":
        assert labelled["parts"]["activations"] < base["parts"]["activations"]
    assert model == "tiny" or labelled["parts"]["activations"] < base["parts"]["activations"]
    full.args.logits, full.args.gradient_checkpointing = "full", True
    assert full.train_total(tokens)["parts"]["activations"] < base["parts"]["activations"]


@pytest.mark.parametrize("argv, message", [
    (["--budget", "lots"], "memory size"),
    (["--load_in_4bit", "--load_in_8bit"], "exclusive"),
    (["--token_kept_ratio", "1.5"], "token_kept_ratio"),
    (["--gpus", "1", "--shard", "fsdp2"], "--shard fsdp2 with --gpus 1: there is nothing to divide"),
    (["--gpus", "2", "--shard", "ddp"], "--shard must be one of fsdp2, zero3"),
    (["--gpus", "0"], "--gpus must be >= 1"),
    (["--gpus", "2", "--shard", "fsdp2", "--load_in_4bit"], "FSDP2 leaves out of sharding"),
    (["--gpus", "8", "--shard", "zero3", "--load_in_8bit"], "ZeRO-3 cannot partition"),
])
def test_cli_user_errors_are_one_line(tiny_model_dir, capsys, argv, message):
    assert main(["--model", str(tiny_model_dir), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_config_without_processor_says_how_to_get_one(capsys):
    assert main(["--model", str(OMNI_7B)]) == 2
    assert "--processor" in capsys.readouterr().err


def test_a_processor_directory_with_only_a_tokenizer_is_one_error_line(tiny_model_dir, tmp_path, capsys):
    only_tokenizer = tmp_path / "tokenizer-only"
    only_tokenizer.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_model_dir / name).is_file():
            (only_tokenizer / name).write_bytes((tiny_model_dir / name).read_bytes())
    assert main(["--model", str(OMNI_7B), "--processor", str(only_tokenizer)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --processor {only_tokenizer}: ") and err.count("\n") == 1
    assert "holds no complete processor" in err


def test_a_sequence_over_model_max_length_does_not_fit_length(tiny_model_dir, capsys):
    """72 frames x 384 px at 4-bit with checkpointing fit 80 GiB in memory, but not in --model_max_length 4096."""
    argv = ["--model", str(OMNI_7B), "--processor", str(tiny_model_dir), "--frames", "72", "--budget", "80GiB",
            "--load_in_4bit", "--gradient_checkpointing"]
    assert main([*argv, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["length"]["train_sequence"] > plan["length"]["model_max_length"] == 4096
    assert plan["length"]["train_fits"] is False
    assert plan["budget"]["train_fits"] is False and plan["budget"]["train_verdict"] == "does not fit (length)"
    assert plan["budget"]["eval_verdict"] == "fits"
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "train does not fit (length), eval fits" in table and "over --model_max_length 4,096" in table
    # raising the limit makes it fit
    assert main([*argv, "--model_max_length", "8192", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["budget"]["train_verdict"] == "fits"


def test_absurd_sizes_get_one_line_not_a_plan(tiny_model_dir, capsys):
    assert main(["--model", str(OMNI_7B), "--processor", str(tiny_model_dir), "--frames", "100000", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: --frames 100000 x --frame_size 384 make ")
    assert "32,768 positions the model reads" in captured.err and captured.err.count("\n") == 1


def test_shipped_coefficients_cover_every_regime_and_mode():
    from surgvqa.plan import MODES, load_coefficients

    fits = load_coefficients()["fits"]["cpu"]
    for regime in ("float32", "bfloat16", "4bit"):
        for mode in MODES:
            entry = fits[regime][mode]
            assert entry["coefficients"] and all(v >= 0 for v in entry["coefficients"].values())
            assert entry["max_abs_rel_error"] <= 0.15, (regime, mode)


def test_shipped_fit_reproduces_every_measured_cpu_point():
    """The planner's activation model with the shipped coefficients, on the counts and peaks the calibration sweep
    stored (benchmarks/memory_calibration_cpu.json): within 15 % of every measured peak, and the sweep measured
    each phase (the step's peak is the largest)."""
    from surgvqa.memory_model import PHASES, fitted_bytes, load_coefficients

    fits = load_coefficients()["fits"]["cpu"]
    sweep = json.loads((REPO / "benchmarks" / "memory_calibration_cpu.json").read_text())
    assert {p["mode"] for p in sweep["points"]} == set(PHASES)
    for p in sweep["points"]:
        assert set(p["phases"]) == set(PHASES[p["mode"]]) and max(p["phases"].values()) == p["measured"]
        planned = p["exact"] + fitted_bytes(fits[p["regime"]][p["mode"]], p["features"])
        assert abs(planned - p["measured"]) <= 0.15 * p["measured"], (p["config"], p["regime"], p["mode"], p["setting"])


def test_activations_are_the_largest_phase():
    """Checkpointing keeps only each layer's input: more layers grow that term alone; the recomputed layer and the
    logits do not. The step's activations are the largest phase total, not their sum."""
    from surgvqa.memory_model import PHASES, Shape, activation_features, fitted_bytes

    shape = Shape(layers=4, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=1000,
                  logits_to_keep=True)
    for mode, phases in PHASES.items():
        features = activation_features(shape, 2, 100, 100, mode)
        assert {k.split(":")[0] for k in features} == set(phases)
    gc4 = activation_features(shape, 1, 100, 100, "train_gc")
    shape.layers = 8
    gc8 = activation_features(shape, 1, 100, 100, "train_gc")
    assert {k for k in gc4 if gc4[k] != gc8[k]} == {f"{phase}:token_layer_hidden" for phase in PHASES["train_gc"]}
    fit = {"coefficients": {"head:logit": 2.0, "backward:token_mlp": 4.0, "forward:attention": 1.0}}
    head, backward, forward = 2.0 * 100 * 1000, 4.0 * 100 * 128, 1.0 * 4 * 100 * 100
    assert fitted_bytes(fit, gc8) == max(head, backward, forward)


def test_inputs_are_copied_to_the_compute_dtype_only_when_it_is_not_fp32(tiny_model_dir):
    """The towers cast pixel values and mel features to their own dtype: a bf16 model holds an fp32 and a bf16
    copy of each, an fp32 model only the fp32 one."""
    fp32 = planner(tiny_model_dir, dtype="float32", question_modality="text+audio")
    bf16 = planner(tiny_model_dir, dtype="bfloat16", question_modality="text+audio")
    tokens = sample_tokens(fp32.processor, fp32.args, mode="train")
    assert tokens.patches and tokens.mel_frames
    ids = 3 * 8 * 2 * tokens.total
    fp32_inputs = 2 * (tokens.patches * fp32.shape.patch_dim + tokens.mel_frames * 128) * 4
    assert fp32.inputs_bytes(tokens, 2) == ids + fp32_inputs
    assert bf16.inputs_bytes(tokens, 2) == ids + fp32_inputs * 6 // 4


def test_optimizer_step_term_counts_the_trainable_parameters(tiny_model_dir):
    """The backward phase ends with the optimizer step, whose temporaries scale with the trainable parameters
    (LoRA of rank r): the ``step`` feature is that count, in the backward phase only."""
    from surgvqa.memory_model import activation_features

    plans = {rank: planner(tiny_model_dir, lora_r=rank) for rank in (4, 16)}
    for plan in plans.values():
        assert plan.shape.trainable == plan.trainable()["params"] > 0
        for mode in ("train", "train_gc"):
            features = activation_features(plan.shape, 1, 100, 100, mode)
            assert {k for k in features if k.endswith(":step")} == {"backward:step"}
            assert features["backward:step"] == plan.trainable()["params"]
    assert plans[16].shape.trainable == 4 * plans[4].shape.trainable


def test_dora_adds_its_magnitudes_and_the_norm_of_one_merged_weight(tiny_model_dir):
    """DoRA's trainable parameters are PEFT's own count (LoRA pairs plus one magnitude per output of each adapted
    Linear); training and generation hold one layer's W + BA (fp32) beside W (bf16) for its norm."""
    from peft import LoraConfig, get_peft_model

    from surgvqa.backbones import LoadOptions, backbone_for

    lora, dora = planner(tiny_model_dir, lora_r=4), planner(tiny_model_dir, lora_r=4, use_dora=True)
    backbone = backbone_for(str(tiny_model_dir))
    model = backbone.load(str(tiny_model_dir), LoadOptions(dtype="float32"))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=backbone.lora_target_regex, use_dora=True))
    assert dora.lora == sum(p.numel() for p in peft_model.parameters() if p.requires_grad) > lora.lora
    largest = max(m.base_layer.weight.numel() for m in peft_model.modules() if hasattr(m, "lora_magnitude_vector"))
    tokens = sample_tokens(dora.processor, dora.args, mode="train")
    assert dora.train_breakdown(tokens)[1]["dora_norm"] == largest * (4 + 2) > 0
    assert dora.eval_breakdown(tokens)[0]["dora_norm"] == largest * 6
    assert lora.train_breakdown(tokens)[1]["dora_norm"] == 0


# -------------------------------------------------------------------------------------- sharded over GPUs
QWEN3_30B = REPO / "configs" / "models" / "qwen3_omni_30b_a3b_thinker.json"


@pytest.fixture(scope="module")
def omni_7b_one_gpu(qwen_vocab_model_dir):
    """The one-GPU plan of Qwen2.5-Omni-7B (text+audio) and one training sample's tokens."""
    one = planner(OMNI_7B, qwen_vocab_model_dir, question_modality="text+audio")
    return one, sample_tokens(one.processor, one.args, mode="train")


@pytest.mark.parametrize("shard", ["fsdp2", "zero3"])
@pytest.mark.parametrize("gpus", [2, 8])
def test_sharded_plan_divides_weights_gradients_and_optimizer_by_the_gpus(qwen_vocab_model_dir, omni_7b_one_gpu,
                                                                          shard, gpus):
    """Qwen2.5-Omni-7B, bf16 LoRA: per GPU, the weights (the frozen base too), LoRA parameters, gradients and
    optimizer state are the one-GPU plan's divided by N (rounded up), inputs and activations are the one-GPU plan's,
    and the gathered weights are the root unit plus two decoder layers (FSDP2) or stage3_max_live_parameters of
    bf16 (ZeRO-3, configs/zero3.json)."""
    from surgvqa.memory_model import ZERO3_MAX_LIVE_PARAMETERS

    one, tokens = omni_7b_one_gpu
    many = planner(OMNI_7B, qwen_vocab_model_dir, question_modality="text+audio", gpus=gpus, shard=shard)
    single, sharded = one.train_total(tokens)["parts"], many.train_total(tokens)["parts"]
    assert single["weights"] == sum(g.train_bytes for g in one.groups) > 15 * 2**30
    for key in ("weights", "trainable_params", "gradients", "optimizer"):
        assert sharded[key] == -(-single[key] // gpus), key
    for key in ("inputs", "activations"):
        assert sharded[key] == single[key], key
    units = many.units
    decoder_layer = sum(p.numel() for p in many.model.get_submodule("model.language_model.layers.0").parameters())
    assert units.largest_class == "Qwen2_5OmniDecoderLayer" and units.largest_bytes == 2 * decoder_layer
    assert units.total_elements == sum(p.numel() for p in many.model.parameters())
    head_and_embeddings = 2 * (many.model.get_output_embeddings().weight.numel()
                               + many.model.get_input_embeddings().weight.numel())
    assert head_and_embeddings < units.root_bytes < head_and_embeddings + 2**20  # plus the norms
    expected = (units.root_bytes + 2 * units.largest_bytes if shard == "fsdp2"
                else 2 * min(units.total_elements, ZERO3_MAX_LIVE_PARAMETERS))
    assert sharded["gathered"] == expected
    assert "gathered" not in single and "ddp_buckets" not in single


def test_zero3_plan_reads_the_shipped_configs_live_parameters():
    from surgvqa.memory_model import ZERO3_MAX_LIVE_PARAMETERS

    config = json.loads((REPO / "configs" / "zero3.json").read_text())["zero_optimization"]
    assert config["stage"] == 3 and config["stage3_gather_16bit_weights_on_model_save"] is True
    assert config["stage3_max_live_parameters"] == ZERO3_MAX_LIVE_PARAMETERS


def test_gpus_without_shard_is_ddp_everything_on_every_gpu(qwen_vocab_model_dir, capsys):
    """--gpus 4 alone: the one-GPU plan plus DDP's gradient buckets (a copy of the gradients), nothing divided."""
    one = planner(OMNI_7B, qwen_vocab_model_dir)
    ddp = planner(OMNI_7B, qwen_vocab_model_dir, gpus=4)
    tokens = sample_tokens(one.processor, one.args, mode="train")
    single, each = one.train_total(tokens), ddp.train_total(tokens)
    assert each["parts"]["ddp_buckets"] == single["parts"]["gradients"]
    assert each["total"] == single["total"] + single["parts"]["gradients"]
    assert main(["--model", str(OMNI_7B), "--processor", str(qwen_vocab_model_dir), "--gpus", "4"]) == 0
    assert "DDP over 4 GPUs: every GPU holds the whole model" in capsys.readouterr().out


def test_30b_a3b_bf16_sharded_over_2_and_8_gpus(qwen3_processor, capsys):
    """Qwen3-Omni-30B-A3B in bf16 (8 frames x 384 px, text+audio, LoRA r16): 59 GiB of weights, which no 40 GiB GPU
    holds; FSDP2's largest unit is one decoder layer with its 128 experts; over 2 GPUs the step fits 48 GiB but not
    40 GiB (39.1 GiB + 1 GiB overhead), over 8 it fits 24 GiB."""
    from surgvqa.plan import make_plan

    def plan(gpus: int, budget: str, shard: str | None = "fsdp2"):
        return make_plan(PlanArguments(model=str(QWEN3_30B), processor=str(qwen3_processor), gpus=gpus, shard=shard,
                                       question_modality="text+audio", budget=budget))

    one = plan(1, "40GiB", None)
    two, eight = plan(2, "48GiB"), plan(8, "24GiB")
    assert one.train["parts"]["weights"] > 58 * 2**30 and not one.budget["train_fits"]
    for sharded, n in ((two, 2), (eight, 8)):
        assert sharded.train["parts"]["weights"] == -(-one.train["parts"]["weights"] // n)
        assert sharded.train["parts"]["optimizer"] == -(-one.train["parts"]["optimizer"] // n)
        assert sharded.train["parts"]["activations"] == one.train["parts"]["activations"]
        assert sharded.sharding["largest_class"] == "Qwen3OmniMoeThinkerTextDecoderLayer"
        assert sharded.sharding["largest_elements"] > 128 * 3 * 2048 * 768  # the layer's experts are in its unit
    assert two.budget["train_fits"] and eight.budget["train_fits"]
    assert not plan(2, "40GiB").budget["train_fits"]
    assert main(["--model", str(QWEN3_30B), "--processor", str(qwen3_processor), "--gpus", "8", "--shard",
                 "fsdp2"]) == 0
    table = capsys.readouterr().out
    assert "per GPU of 8" in table and "fsdp2 over 8 GPUs" in table and "gathered full weights" in table
