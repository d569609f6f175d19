"""LoRA variants (DoRA, rsLoRA, Gaussian / PiSSA / OLoRA / LoftQ initialisation, LoRA+): each trains through
train_vqa.py, evaluates, and merges with --verify into a model whose greedy answers are the adapter's; PiSSA / OLoRA
adapters are converted so they apply to the original base; LoftQ starts nearer the unquantized weights than the 4-bit
base and stays on it; unsupported combinations are refused before loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import GREEDY_GAP, VERIFY_FLAGS, checkpoint_greedy_gap, qlora_compute, small_training_set

from surgvqa.errors import UserError

# as tests/test_merge.py: 4 samples, 2 frames, rank 4, a high learning rate
TRAIN_FLAGS = [
    "--frame_size", "56", "--max_train_frames", "2", "--per_device_train_batch_size", "2",
    "--learning_rate", "2e-2", "--max_steps", "4", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.0",
    "--save_strategy", "no", "--logging_steps", "50", "--use_cpu", "True", "--seed", "0", "--disable_tqdm", "True",
]
VARIANTS = {
    "dora": ["--use_dora", "True"],
    "rslora": ["--use_rslora", "True"],
    "gaussian": ["--init_lora_weights", "gaussian"],
    "pissa": ["--init_lora_weights", "pissa"],
    "pissa_niter": ["--init_lora_weights", "pissa_niter_4"],
    "olora": ["--init_lora_weights", "olora"],
    "loraplus": ["--loraplus_lr_ratio", "16"],
}
#: the default suite runs these; the others run with the slow tests
DEFAULT = ("dora", "pissa", "loraplus")


@pytest.fixture(scope="module")
def work(tmp_path_factory, test_set) -> Path:
    return small_training_set(tmp_path_factory.mktemp("lora_variants"), test_set)


def train_argv(base: Path, work: Path, out: Path, extra: list[str]) -> list[str]:
    return ["--model_name_or_path", str(base), "--train_data_path", str(work / "small.jsonl"),
            "--frames_dir", str(work / "frames"), "--output_dir", str(out), *TRAIN_FLAGS, *extra]


@pytest.mark.parametrize("variant", [v if v in DEFAULT else pytest.param(v, marks=pytest.mark.slow)
                                     for v in VARIANTS])
def test_variant_trains_evaluates_and_merges_to_the_same_answers(variant, work, tiny_model_dir):
    from surgvqa.evaluate import main as evaluate_main
    from surgvqa.merge import merge, parse_args
    from surgvqa.train import main as train_main

    out = work / variant
    assert train_main(train_argv(tiny_model_dir, work, out, VARIANTS[variant])) == 0
    flag, value = VARIANTS[variant][0].lstrip("-"), VARIANTS[variant][1]
    recorded = json.loads((out / "surgvqa_config.json").read_text())["lora"]
    assert recorded[flag] == type(recorded[flag])(value if value != "True" else True)  # in the run record
    peft_config = json.loads((out / "adapter_config.json").read_text())
    if variant in ("pissa", "pissa_niter", "olora"):  # converted: a plain LoRA of the original base, rank 2r
        assert peft_config["init_lora_weights"] is True and peft_config["r"] == 8
        assert not (out / "initial_adapter").exists()
    elif flag in ("use_dora", "use_rslora"):
        assert peft_config[flag] is True

    predictions = work / f"{variant}.jsonl"
    assert evaluate_main(["--checkpoint_path", str(out), "--eval_data_path", str(work / "small.jsonl"),
                          "--frames_dir", str(work / "frames"), "--output_file", str(predictions),
                          "--batch_size", "2", "--max_new_tokens", "6", "--device", "cpu"]) == 0
    assert len(predictions.read_text().splitlines()) == 1 + 4  # the meta line and one line per sample

    merged = merge(parse_args(["--base_model_path", str(tiny_model_dir), "--adapter_path", str(out),
                               "--output_dir", str(work / f"merged_{variant}"), "--dtype", "float32",
                               *VERIFY_FLAGS]))
    check = merged["verification"]
    print(f"\n{variant}: {check.format()}")
    assert check.passed and check.answers_identical and check.compared_positions > 0
    assert checkpoint_greedy_gap(out) >= GREEDY_GAP  # identical answers cannot hinge on the CPU's rounding


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_converted_adapter_on_the_original_base_is_the_trained_model(init, work, tiny_model_dir):
    """The trained model is residual base + adapter; the saved adapter, converted, applied to the original base
    gives the same logits (fp32: max |difference| <= 1e-4, the rounding of W - BA + BA)."""
    from surgvqa.backbones import LoadOptions
    from surgvqa.checkpoint import load_for_inference
    from surgvqa.collate import VQACollator
    from surgvqa.merge import parse_args as merge_args
    from surgvqa.merge import verify_inputs
    from surgvqa.run_config import RunConfig
    from surgvqa.train import parse_args, train

    out = work / f"logits_{init}"
    trained = train(*parse_args(train_argv(tiny_model_dir, work, out, ["--init_lora_weights", init])))["trainer"].model
    trained.eval()
    residual = dict(trained.named_parameters())
    q_proj = next(k for k in residual if k.endswith("layers.0.self_attn.q_proj.base_layer.weight"))
    converted, processor, _, _ = load_for_inference(out, options=LoadOptions(dtype="float32"))
    original = dict(converted.named_parameters())[q_proj]
    assert not torch.allclose(residual[q_proj], original)  # the run really trained on a residual base

    args = merge_args(["--base_model_path", "x", "--adapter_path", "y", "--output_dir", "z", *VERIFY_FLAGS])
    dataset, kwargs, _ = verify_inputs(args, RunConfig.read(out))
    batch = VQACollator(processor, mode="train", **kwargs)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        expected = trained(**batch).logits
        got = converted(**batch).logits
    assert float((expected - got).abs().max()) <= 1e-4
    assert float(expected.abs().max()) > 1.0  # logits of a real size, not a vacuous comparison


def test_unconverted_adapter_is_refused_by_evaluation_and_merge(work, tiny_model_dir, tmp_path, capsys):
    """A training checkpoint of a PiSSA run holds the adapter of the residual base: refused, saying why."""
    from surgvqa.evaluate import main as evaluate_main
    from surgvqa.merge import check_chain
    from surgvqa.train import main as train_main

    out = tmp_path / "pissa"
    assert train_main(train_argv(tiny_model_dir, work, out, ["--init_lora_weights", "pissa", "--max_steps", "1"])) == 0
    unconverted = shutil.copytree(out, tmp_path / "checkpoint-like")
    config = json.loads((unconverted / "adapter_config.json").read_text())
    config["init_lora_weights"] = "pissa"  # as the Trainer's checkpoints save it
    (unconverted / "adapter_config.json").write_text(json.dumps(config))
    code = evaluate_main(["--checkpoint_path", str(unconverted), "--eval_data_path", str(work / "small.jsonl"),
                          "--frames_dir", str(work / "frames"), "--output_file", str(tmp_path / "p.jsonl")])
    assert code == 2
    err = capsys.readouterr().err
    assert "saved unconverted" in err and "Traceback" not in err
    with pytest.raises(UserError, match="residual base"):
        check_chain(str(tiny_model_dir), [str(unconverted)])
    check_chain(str(tiny_model_dir), [str(out)])  # the converted final adapter is accepted


@pytest.mark.parametrize(("extra", "message"), [
    (["--init_lora_weights", "pissa", "--load_in_4bit", "True", "--bf16", "True"], "drop --load_in_4bit"),
    (["--init_lora_weights", "loftq"], "loftq starts LoRA at the quantization error of a 4-bit base: add "
                                       "--load_in_4bit True"),
    (["--init_lora_weights", "loftq", "--load_in_4bit", "True", "--bf16", "True", "--use_dora", "True"],
     "loftq with --use_dora"),
    (["--init_lora_weights", "pissa_niter_0"], "must be one of"),
    (["--init_lora_weights", "svd"], "must be one of"),
    (["--loraplus_lr_ratio", "0"], "--loraplus_lr_ratio must be > 0"),
])
def test_unsupported_combinations_are_refused_before_loading(extra, message, work, tmp_path, capsys):
    from surgvqa.train import main as train_main

    missing_model = tmp_path / "no-model-here"  # refused before any model loads: the path is never read
    assert train_main(train_argv(missing_model, work, tmp_path / "out", extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("extra", "message"), [
    (["--use_dora", "True"], "--use_dora with --lora_experts"),
    (["--init_lora_weights", "olora"], "olora with --lora_experts"),
    (["--lora_dropout", "0.05"], "--lora_experts needs --lora_dropout 0"),  # the last --lora_dropout counts
])
def test_expert_lora_combinations_peft_lacks_are_refused_before_loading(extra, message, work, tmp_path, capsys):
    from surgvqa.train import main as train_main

    argv = train_argv(tmp_path / "no-model-here", work, tmp_path / "out", ["--lora_experts", "True", *extra])
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("flag", [["--lora_experts", "True"], ["--router_aux_loss_coef", "0.01"]])
def test_moe_flags_on_a_dense_family_are_refused_before_loading(flag, work, tiny_model_dir, tmp_path, capsys):
    from surgvqa.train import main as train_main

    out = tmp_path / "out"
    assert train_main(train_argv(tiny_model_dir, work, out, flag)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag[0]}: backbone 'qwen2_5_omni' has no MoE experts") and "Traceback" not in err
    assert not out.exists()


# -------------------------------------------------------------------------------------------------------- LoftQ
def test_loftq_starts_nearer_the_unquantized_weights_than_the_4bit_base(tiny_model_dir):
    """On every 4-bit linear: ||W - (Q + s B A)|| < ||W - Q|| (W the checkpoint's weight, Q its nf4 rounding, s the
    adapter's scaling), by the norm of the residual's top r singular values; W found under the runtime name."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear4bit
    from safetensors import safe_open

    from surgvqa.backbones import LoadOptions, get_backbone
    from surgvqa.lora import checkpoint_weights, init_loftq

    compute = "bfloat16" if "--bf16" in qlora_compute() else "float32"
    backbone = get_backbone("qwen2_5_omni")
    model = backbone.load(str(tiny_model_dir), LoadOptions(dtype=compute, load_in_4bit=True))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=backbone.lora_target_regex))
    weights = checkpoint_weights(model.get_base_model(), tiny_model_dir)
    # transformers stores the thinker's language model as model.* and loads it as model.language_model.*
    assert weights["model.language_model.layers.0.self_attn.q_proj.weight"][1] == "model.layers.0.self_attn.q_proj.weight"
    assert init_loftq(model, tiny_model_dir) == 14  # 2 layers x 7 linears
    ratios = []
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        file, key = weights[name.removeprefix("base_model.model.") + ".weight"]
        with safe_open(str(file), framework="pt") as handle:
            w = handle.get_tensor(key).float()
        q = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        ba = (module.lora_B["default"].weight @ module.lora_A["default"].weight).detach().float()
        assert module.scaling["default"] == 2.0  # alpha 8 / r 4: B A alone would overshoot
        before, after = torch.linalg.norm(w - q), torch.linalg.norm(w - (q + 2.0 * ba))
        singular = torch.linalg.svdvals(w - q)
        assert float(after) == pytest.approx(float(torch.linalg.norm(singular[4:])), rel=1e-2)
        ratios.append(float(after / before))
        # B A left at the residual's rank-r part, not divided by the scaling (as PEFT's LoftQ sets it): with
        # scaling 2 the model starts exactly as far from W as Q is
        unscaled = torch.linalg.norm(w - (q + 2.0 * (2.0 * ba)))
        assert float(unscaled / before) == pytest.approx(1.0, abs=1e-3)
    print(f"\nLoftQ: ||W - (Q + sBA)|| / ||W - Q|| over {len(ratios)} linears: {min(ratios):.3f}-{max(ratios):.3f}")
    assert max(ratios) < 1.0  # random weights: a white-noise residual, of which rank 4 of 32 removes a few %


def test_loftq_trains_evaluates_on_the_4bit_base_and_merges_to_the_same_answers(work, tiny_model_dir, tmp_path,
                                                                                capsys):
    """QLoRA + LoftQ through train_vqa.py; evaluated on the nf4 base (refused on the 16-bit one); merged into the
    nf4-dequantized base with --verify: identical greedy answers (fp32) or logits within tolerance (bf16)."""
    from surgvqa.evaluate import main as evaluate_main
    from surgvqa.merge import merge, parse_args
    from surgvqa.train import main as train_main

    compute = qlora_compute()
    out = work / "loftq"
    assert train_main(train_argv(tiny_model_dir, work, out, ["--init_lora_weights", "loftq", "--load_in_4bit",
                                                             "True", *compute])) == 0
    record = json.loads((out / "surgvqa_config.json").read_text())
    assert record["lora"]["init_lora_weights"] == "loftq" and record["quantization"] == "4bit"
    evaluate = ["--checkpoint_path", str(out), "--eval_data_path", str(work / "small.jsonl"), "--frames_dir",
                str(work / "frames"), "--batch_size", "2", "--max_new_tokens", "6", "--device", "cpu"]
    assert evaluate_main([*evaluate, "--output_file", str(tmp_path / "bf16.jsonl")]) == 2
    assert "evaluate with --load_in_4bit True" in capsys.readouterr().err
    predictions = tmp_path / "nf4.jsonl"
    assert evaluate_main([*evaluate, "--output_file", str(predictions), "--load_in_4bit", "True"]) == 0
    assert len(predictions.read_text().splitlines()) == 1 + 4

    argv = ["--base_model_path", str(tiny_model_dir), "--adapter_path", str(out), "--dtype", "float32", *VERIFY_FLAGS]
    with pytest.raises(UserError, match="merge with --merge_into dequantized"):
        merge(parse_args([*argv, "--output_dir", str(tmp_path / "into_base")]))
    merged = merge(parse_args([*argv, "--output_dir", str(tmp_path / "merged"), "--merge_into", "dequantized"]))
    check = merged["verification"]
    print(f"\nloftq: {check.format()}")
    assert check.passed and check.answers_identical and check.compared_positions > 0
    assert checkpoint_greedy_gap(out, load_in_4bit=True) >= GREEDY_GAP  # not a tie the CPU's rounding decides
