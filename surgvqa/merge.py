r"""Merge LoRA adapters (stage 1 → stage 2 → …) into an unquantized base and save a standalone checkpoint.

    python merge_stage2_to_bf16.py --base_model_path BASE --adapter_path STAGE1 [STAGE2 …] --output_dir MERGED \
        [--dtype bfloat16|float16|float32] [--verify 16] [--full_omni] [--merge_into base|dequantized]

The base is always loaded unquantized, in ``--dtype`` (default bfloat16), through the backbone registry; merging
into a 4/8-bit model (what the original toolkit did) rounds the merged weights to 4 bits and rules out
FlashAttention, so a quantized base is refused. The output holds sharded safetensors (no pickle), the processor of
the LAST adapter (with its tokenizer repair), the generation config and a ``surgvqa_config.json`` copied from the
last adapter with ``merged_from`` (the chain), ``base_model`` (the original base) and ``dtype`` set, so
``evaluate_checkpoint.py --checkpoint_path MERGED`` preprocesses exactly as in training; ``transformers`` loads it
without PEFT or ``trust_remote_code``.

Chain rule. Adapters are applied and merged in the order given. Every adapter records the model it was trained on
(surgvqa_config ``base_model``, else PEFT's ``base_model_name_or_path``); its *lineage* is that directory's own
``(base_model, merged_from adapters)`` when it is a surgvqa merge, else ``(that path, [])``. The i-th adapter is
accepted only when its lineage equals ``lineage(--base_model_path) + adapters[:i]``: stage 1 was trained on the
base, stage 2 on the merge of stage 1 into that base (e.g. ``MERGED_1`` written by this tool), and so on. Paths
are compared resolved. Anything else (a stage-2 adapter trained on the raw base, a recorded merge dir that no
longer exists, a hub id instead of a local path) is refused; ``--force`` merges anyway and records
``"forced": true`` in the chain.

QLoRA adapters (``quantization == "4bit"``). By default they merge into the bf16 base: the result is a clean
half-precision model, but the adapter was trained against nf4-rounded weights, so ``W + ΔW`` is not exactly the
function evaluated in training (usually slightly better or equal, occasionally off; peft#2321).
``--merge_into dequantized`` instead rounds every LoRA-targeted base linear through nf4 (bitsandbytes
``quantize_4bit``/``dequantize_4bit``, blocksize 64, double quant, from the recorded training dtype, as
``BitsAndBytesConfig(load_in_4bit=True)`` did) and merges into that: the function the adapter actually saw, at the
price of carrying the quantization error into a bf16 checkpoint. Non-targeted linears and the towers stay
original. bitsandbytes 0.50.2 (tested) quantizes on CPU; where a build cannot, this raises a ValueError (use
``--device cuda``).

``--verify N`` runs N samples through the adapter(s) applied live (earlier stages merged, the last one unmerged: the
model the last adapter was trained on) and through the merged model, on exactly the same weights, and compares
the logits at the positions that predict answer tokens and the greedy answers. Pass when
``max|Δlogit| <= tol · max(1, max|logit|)`` with tol = 1e-5 (float32), 5e-3 (float16), 4e-2 (bfloat16)
(``--verify_tolerance`` overrides), and, in float32, every greedy answer identical; in half precision differing
answers (near-ties flipped by one rounding) are reported but only the logit bound decides. It does not measure the
QLoRA nf4 gap (that is a property of the adapter, not of the merge): evaluate both checkpoints for that.
Exit codes: 0 merged (and verified), 1 verification failed (the checkpoint is still written, flagged in its
surgvqa_config and in ``merge_verification.json``), 2 refused.

Qwen2.5-Omni: by default the merged thinker is written as a standalone thinker checkpoint. ``--full_omni`` (base
must be a full ``qwen2_5_omni`` checkpoint) loads the full model, merges into ``.thinker`` and writes the whole
model back, talker and token2wav untouched, plus the base's ``spk_dict.pt`` (the one pickle, loaded by
transformers with ``weights_only=True``; the talker needs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from surgvqa import __version__
from surgvqa.backbones import LoadOptions, backbone_for, read_config
from surgvqa.backbones.base import DTYPES, runnable_attention
from surgvqa.checkpoint import (
    ADAPTER_CONFIG,
    NEW_ROWS_NAME,
    adapter_base,
    is_adapter,
    load_new_token_rows,
)
from surgvqa.errors import ArgumentParser, UserError, existing_dir, run_main
from surgvqa.lean_imports import checkpoint_needs_bitsandbytes, skip_bitsandbytes
from surgvqa.lora import check_converted, check_loftq_base
from surgvqa.run_config import CONFIG_NAME, TRAINING_FIELDS, RunConfig

logger = logging.getLogger("surgvqa.merge")

#: relative logit tolerance per dtype: max|Δ| <= tol * max(1, max|logit|) (see the module docstring)
VERIFY_TOLERANCE = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 4e-2}
VERIFICATION_NAME = "merge_verification.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
#: surgvqa_config fields that describe one adapter, not the merged checkpoint (kept per stage in merged_from)
LORA_ONLY_FIELDS = TRAINING_FIELDS


# ------------------------------------------------------------------------------------------------ arguments
def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="merge_stage2_to_bf16.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base_model_path", required=True, help="local, unquantized base (full Omni or thinker)")
    parser.add_argument("--adapter_path", required=True, nargs="+", help="adapter dirs, merged in this order")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--dtype", choices=sorted(VERIFY_TOLERANCE), default="bfloat16")
    parser.add_argument("--backbone", default=None, help="registry name; default: the adapters' / config.json")
    parser.add_argument("--merge_into", choices=["base", "dequantized"], default="base",
                        help="QLoRA adapters: the original base weights (default) or their nf4 round trip")
    parser.add_argument("--full_omni", action="store_true", help="write the full Omni model (talker kept)")
    parser.add_argument("--force", action="store_true", help="merge even when an adapter's recorded base differs")
    parser.add_argument("--max_shard_size", default="5GB")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (merge and verification)")
    parser.add_argument("--attn_implementation", default="sdpa", help="for loading and --verify")
    parser.add_argument("--overwrite_output_dir", action="store_true")
    parser.add_argument("--load_in_4bit", action="store_true", help=argparse.SUPPRESS)  # refused, see merge()
    parser.add_argument("--load_in_8bit", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--verify", type=int, default=0, metavar="N", help="compare N samples before/after")
    parser.add_argument("--verify_data_path", default=None, help="default: the eval/train JSONL of the last adapter")
    parser.add_argument("--verify_frames_dir", default=None, help="default: recorded, else <data dir>/frames")
    parser.add_argument("--verify_audio_dir", default=None)
    parser.add_argument("--verify_batch_size", type=int, default=4)
    parser.add_argument("--verify_max_new_tokens", type=int, default=32)
    parser.add_argument("--verify_tolerance", type=float, default=None, help="relative logit tolerance override")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


# ------------------------------------------------------------------------------------------------- lineage
def resolve(path: str | Path | None) -> str | None:
    """Absolute resolved path when it exists locally, else the string as given (a hub id, a deleted dir)."""
    if path is None:
        return None
    candidate = Path(path).expanduser()
    return str(candidate.resolve()) if candidate.exists() else str(path)


def lineage(path: str | Path) -> tuple[str, tuple[str, ...]]:
    """(original base, adapters merged into it) of a model directory; a plain model is its own base."""
    config = RunConfig.find(path) if Path(path).is_dir() else None
    if config is not None and config.merged_from and config.base_model:
        return resolve(config.base_model), tuple(resolve(stage["adapter"]) for stage in config.merged_from)
    return resolve(path), ()


@dataclass
class Stage:
    """One adapter of the chain, checked before any weight is loaded."""

    path: Path
    #: the adapter's surgvqa_config.json (None for an adapter trained elsewhere)
    config: RunConfig | None
    recorded_base: str | None
    forced: bool = False
    quantization: str | None = None
    into: str = "base"
    messages: list[str] = field(default_factory=list)

    def record(self) -> dict:
        entry = {
            "adapter": resolve(self.path),
            "base": resolve(self.recorded_base),
            "quantization": self.quantization,
            "merged_into": "nf4-dequantized" if self.into == "dequantized" else "base",
            "forced": self.forced,
        }
        for key in LORA_ONLY_FIELDS:
            if key != "quantization" and self.config is not None:
                entry[key] = getattr(self.config, key)
        return entry


def check_chain(base: str, adapters: list[str], force: bool = False) -> list[Stage]:
    """Validate every adapter and the chain rule (module docstring); raise UserError on the first refusal."""
    base_lineage = lineage(base)
    stages: list[Stage] = []
    for i, raw in enumerate(adapters):
        path = Path(raw)
        if not is_adapter(path):
            raise UserError(f"--adapter_path {path} is not a PEFT adapter directory (no {ADAPTER_CONFIG})")
        check_converted(path)
        config = RunConfig.find(path)
        if config is None and i == len(adapters) - 1:
            raise UserError(
                f"--adapter_path {path} has no {CONFIG_NAME}, so the merged checkpoint could not record how to "
                "preprocess its inputs; merge adapters trained with train_vqa.py"
            )
        if config is not None and config.resized_vocab and not (path / NEW_ROWS_NAME).is_file():
            raise UserError(
                f"{path} resized the vocabulary to {config.resized_vocab} rows but has no {NEW_ROWS_NAME}: the "
                "new embedding rows are lost and the merge would use random ones; re-save the adapter from training"
            )
        stage = Stage(path=path, config=config, recorded_base=adapter_base(path),
                      quantization=config.quantization if config is not None else None)
        expected = (base_lineage[0], base_lineage[1] + tuple(resolve(a) for a in adapters[:i]))
        found = lineage(stage.recorded_base) if stage.recorded_base else None
        if found != expected:
            want = expected[0] if not expected[1] else f"the merge of {list(expected[1])} into {expected[0]}"
            message = (
                f"adapter {i + 1} ({path}) was trained on {stage.recorded_base!r}"
                + (f" (= {list(found[1])} merged into {found[0]})" if found and found[1] else "")
                + f", but at this position of the chain it is merged into {want}"
            )
            if not force:
                raise UserError(
                    message + ". Merging into a different base gives a model nobody trained; fix --base_model_path "
                    "/ the --adapter_path order, or pass --force if the weights are known to be identical"
                )
            logger.warning("--force: %s", message)
            stage.forced = True
        stages.append(stage)
    return stages


# ------------------------------------------------------------------------------------------------- refusals
def base_quantization(base: str | Path) -> dict | None:
    config = read_config(base, "--base_model_path")
    nested = (value.get("quantization_config") for value in config.values() if isinstance(value, dict))
    return config.get("quantization_config") or next((q for q in nested if q), None)  # also in sub-model configs


def check_request(args: argparse.Namespace) -> list[Stage]:
    """Every refusal that needs no weights. Returns the checked chain."""
    if args.load_in_4bit or args.load_in_8bit:
        raise UserError(
            "merging never loads the base quantized: a merge into a 4/8-bit model rounds the merged weights to "
            "4/8 bits and the result cannot use FlashAttention. Drop --load_in_4bit/--load_in_8bit; QLoRA "
            "adapters merge into the bf16 base (or --merge_into dequantized)"
        )
    base = existing_dir(args.base_model_path, "--base_model_path")
    quant = base_quantization(base)
    if quant:
        raise UserError(
            f"{base}/config.json has a quantization_config ({quant.get('quant_method', quant)}): the base is a "
            "quantized checkpoint. Merge into the original unquantized checkpoint instead"
        )
    if args.verify < 0:
        raise UserError("--verify must be >= 0")
    stages = check_chain(str(base), list(args.adapter_path), force=args.force)
    names = {s.config.backbone for s in stages if s.config is not None}
    if args.full_omni:
        backbone = backbone_for(base, args.backbone or next(iter(names), None), flag="--base_model_path")
        problem = backbone.full_model_problem(read_config(base, "--base_model_path"), str(base))
        if problem:
            raise UserError(problem)
    if len(names) > 1:
        raise UserError(f"the adapters were trained on different backbones: {sorted(names)}")
    for stage in stages:
        if stage.quantization == "8bit" and args.merge_into == "dequantized":
            raise UserError(f"{stage.path}: --merge_into dequantized supports nf4 (4bit) QLoRA adapters only")
        if stage.quantization == "4bit" and args.merge_into == "dequantized":
            stage.into = "dequantized"
        check_loftq_base(stage.config.lora if stage.config else None, stage.path, stage.into == "dequantized",
                         "merge with --merge_into dequantized")
    if args.merge_into == "dequantized" and not any(s.into == "dequantized" for s in stages):
        raise UserError(
            "--merge_into dequantized: no adapter was trained with a 4-bit base (surgvqa_config quantization "
            "'4bit'), so there are no nf4 weights to reproduce; drop the option"
        )
    output = Path(args.output_dir)
    protected = {resolve(base), *(resolve(s.path) for s in stages)}
    if resolve(output) in protected:
        raise UserError(f"--output_dir {output} is the base or an adapter directory: choose a new directory")
    if output.exists() and not output.is_dir():
        raise UserError(f"--output_dir {output} is a file, not a directory: choose a new directory (nothing was "
                         "loaded or written)")
    if output.is_dir() and any(output.iterdir()) and not args.overwrite_output_dir:
        raise UserError(f"--output_dir {output} is not empty: pass --overwrite_output_dir or choose a new one")
    return stages


# ------------------------------------------------------------------------------------------------ the merge
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_base(args: argparse.Namespace, backbone_name: str | None):
    """(model to save, thinker to merge into, backbone): unquantized, in --dtype."""
    backbone = backbone_for(args.base_model_path, backbone_name)
    options = LoadOptions(dtype=args.dtype, attn_implementation=args.attn_implementation)
    if args.full_omni:  # the whole checkpoint (Omni: thinker + talker); adapters merge into the thinker
        full, thinker = backbone.load_full(str(args.base_model_path), options)
        return full, thinker, backbone
    model = backbone.load(str(args.base_model_path), options)
    return model, model, backbone


def nf4_round_trip(weight: torch.Tensor, train_dtype: torch.dtype) -> torch.Tensor:
    """``weight`` as a bitsandbytes nf4 (blocksize 64, double quant) Linear4bit dequantizes it."""
    try:
        import bitsandbytes.functional as bnbf

        quantized, state = bnbf.quantize_4bit(weight.to(train_dtype).contiguous(), blocksize=64,
                                              compress_statistics=True, quant_type="nf4")
        restored = bnbf.dequantize_4bit(quantized, state)
    except (ImportError, NotImplementedError, RuntimeError, AttributeError) as err:
        raise UserError(
            f"--merge_into dequantized: bitsandbytes cannot quantize to nf4 on {weight.device} here ({err}); "
            "run with --device cuda or upgrade bitsandbytes (0.50.2 quantizes on CPU)"
        ) from err
    return restored.to(weight.dtype)


def lora_layers(peft_model) -> list[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)]


def dequantize_targets(peft_model, stage: Stage, tower_modules: tuple[str, ...]) -> int:
    """Replace every LoRA-targeted LLM linear's base weight by its nf4 round trip; returns how many."""
    train_dtype = DTYPES.get(str(stage.config.dtype if stage.config else None), torch.bfloat16)
    count = 0
    with torch.no_grad():
        for name, module in lora_layers(peft_model):
            base_layer = module.get_base_layer()
            inner = name.split("base_model.model.", 1)[-1]
            if not isinstance(base_layer, torch.nn.Linear) or any(
                inner == t or inner.startswith(t + ".") for t in tower_modules
            ):
                continue  # towers were never quantized in QLoRA training
            base_layer.weight.data = nf4_round_trip(base_layer.weight.data, train_dtype)
            count += 1
    return count


def apply_stage(thinker, stage: Stage, name: str, tower_modules: tuple[str, ...], force: bool):
    """Load the stage's new embedding rows, then wrap ``thinker`` with its adapter (unmerged)."""
    from peft import PeftModel

    rows = thinker.get_input_embeddings().num_embeddings
    expected = stage.config.original_vocab_rows if stage.config is not None else None
    if expected and expected != rows and not force:
        raise UserError(
            f"{stage.path} was trained on a model with {expected} embedding rows, this chain position has {rows}: "
            "wrong base or wrong order (--force to merge anyway)"
        )
    vocab = stage.config.resized_vocab if stage.config is not None else None
    if vocab and not load_new_token_rows(thinker, stage.path, vocab):  # checked up front; kept as a guard
        raise UserError(f"{stage.path}: {NEW_ROWS_NAME} is missing")
    model = PeftModel.from_pretrained(thinker, str(stage.path), adapter_name=name, is_trainable=False)
    if stage.into == "dequantized":
        count = dequantize_targets(model, stage, tower_modules)
        logger.info("%s: %d targeted linears rounded through nf4 before merging", stage.path, count)
    return model


def merge_stage(peft_model):
    """Merge the live adapter in place (one rounding: fp32 delta added into the base dtype) and unwrap."""
    targets = [module.get_base_layer() for _, module in lora_layers(peft_model)]
    merged = peft_model.merge_and_unload(safe_merge=False)
    for layer in targets:  # a Linear's weight, or the fused expert stacks LoRA reached by target_parameters
        if not all(torch.isfinite(param).all() for param in layer.parameters(recurse=False)):
            raise UserError("non-finite weights after merging: the adapter is broken (NaN/inf in lora_A/B)")
    return merged


# --------------------------------------------------------------------------------------------- verification
@dataclass
class Verification:
    samples: int
    dtype: str
    max_abs_logit_diff: float
    logit_scale: float
    relative_tolerance: float
    tolerance: float
    compared_positions: int
    answers_identical: bool
    differing_answers: list[dict]
    data_path: str
    passed: bool = False

    def format(self) -> str:
        lines = [
            f"verify: {self.samples} samples from {self.data_path} ({self.dtype})",
            f"  max |logit difference| {self.max_abs_logit_diff:.3g} over {self.compared_positions} answer positions"
            f" (logit scale {self.logit_scale:.3g}; tolerance {self.tolerance:.3g} = "
            f"{self.relative_tolerance:g} x max(1, scale))",
            f"  greedy answers identical: {self.answers_identical}"
            + (f" ({len(self.differing_answers)} differ)" if self.differing_answers else ""),
            f"  {'PASSED' if self.passed else 'FAILED'}",
        ]
        return "\n".join(lines)


def verify_inputs(args: argparse.Namespace, config: RunConfig):
    """(dataset, collator kwargs, data path) from the --verify_* flags and the last adapter's RunConfig."""
    from surgvqa.data import SurgicalVQADataset, load_samples

    data_path = args.verify_data_path
    frames_dir, audio_dir = args.verify_frames_dir, args.verify_audio_dir
    if data_path is None:
        for path_key, frames_key, audio_key in (("eval_data_path", "eval_frames_dir", "eval_audio_dir"),
                                                ("train_data_path", "frames_dir", "audio_dir")):
            recorded = getattr(config, path_key)
            if recorded and Path(recorded).is_file():
                data_path = recorded
                frames_dir = frames_dir or getattr(config, frames_key) or config.frames_dir
                audio_dir = audio_dir or getattr(config, audio_key) or config.audio_dir
                break
    if data_path is None:
        raise UserError("--verify needs --verify_data_path (the adapter records no existing eval/train JSONL)")
    media = config.preprocessing.media_config(frames_dir, audio_dir)
    samples, _ = load_samples(data_path, media, skip_bad=True)
    if not samples:
        raise UserError(f"--verify: no usable sample in {data_path}")
    dataset = SurgicalVQADataset(samples[: args.verify], media)
    return dataset, config.preprocessing.collator_kwargs(), str(data_path)


@torch.inference_mode()
def run_outputs(model, processor, dataset, collator_kwargs: dict, batch_size: int, max_new_tokens: int):
    """(answer-position logits per sample, greedy predictions) of ``model`` on ``dataset``."""
    from torch.utils.data import DataLoader

    from surgvqa.collate import IGNORE_INDEX, VQACollator
    from surgvqa.generate import _to_device, generate_batch

    model.eval()
    device = next(model.parameters()).device
    dtype = getattr(model, "dtype", None)
    logits_out: list[torch.Tensor] = []
    train = VQACollator(processor, mode="train", **collator_kwargs)
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=train):
        labels = batch.pop("labels")
        with runnable_attention(model):
            logits = model(**_to_device(batch, device, dtype)).logits.float().cpu()
        scored = labels[:, 1:] != IGNORE_INDEX  # the logit at t predicts token t + 1
        logits_out.extend(logits[i, :-1][scored[i]] for i in range(len(labels)))
    generate = VQACollator(processor, mode="generate", **collator_kwargs)
    predictions = []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=generate):
        predictions.extend(generate_batch(model, processor.tokenizer, batch, max_new_tokens=max_new_tokens))
    return logits_out, predictions


def compare_outputs(reference, merged, dtype: str, tolerance: float | None, data_path: str) -> Verification:
    ref_logits, ref_preds = reference
    new_logits, new_preds = merged
    diff = max((float((a - b).abs().max()) for a, b in zip(ref_logits, new_logits, strict=True) if a.numel()),
               default=0.0)
    scale = max((float(a.abs().max()) for a in ref_logits if a.numel()), default=0.0)
    rtol = tolerance if tolerance is not None else VERIFY_TOLERANCE[dtype]
    differing = [
        {"key": list(a.key), "adapter": a.text, "merged": b.text}
        for a, b in zip(ref_preds, new_preds, strict=True)
        if (a.text, a.stopped_by_eos) != (b.text, b.stopped_by_eos)
    ]
    result = Verification(
        samples=len(ref_preds), dtype=dtype, max_abs_logit_diff=diff, logit_scale=scale, relative_tolerance=rtol,
        tolerance=rtol * max(1.0, scale), compared_positions=sum(a.shape[0] for a in ref_logits),
        answers_identical=not differing, differing_answers=differing, data_path=data_path,
    )
    result.passed = diff <= result.tolerance and (result.answers_identical or dtype != "float32")
    return result


# ---------------------------------------------------------------------------------------------------- output
def merged_config(stages: list[Stage], args: argparse.Namespace, backbone_name: str, rows: int) -> RunConfig:
    """The last adapter's RunConfig, turned into the record of a merged checkpoint."""
    last = stages[-1].config
    assert last is not None  # check_chain refuses a last adapter without one
    base_record = RunConfig.find(args.base_model_path)
    prior = (base_record.merged_from if base_record is not None else None) or []
    original_base, _ = lineage(args.base_model_path)
    return dataclasses.replace(
        last,
        **dict.fromkeys(LORA_ONLY_FIELDS),
        backbone=last.backbone or backbone_name,
        base_model=original_base,
        merged_from=[*prior, *(stage.record() for stage in stages)],
        dtype=args.dtype,
        vocab_rows=rows,
        full_omni=bool(args.full_omni),
        merged_with=f"surgvqa {__version__}",
    )


def pickle_files(directory: Path, allowed: tuple[str, ...] = ()) -> list[str]:
    return sorted(
        p.name for p in directory.rglob("*") if p.suffix in PICKLE_SUFFIXES and p.name not in allowed
    )


def save_output(model, processor, config: RunConfig, args: argparse.Namespace, backbone,
                extra_files: tuple[str, ...] = ()) -> Path:
    """Write the merged checkpoint through the backbone; ``extra_files`` (the backbone's full-model files, e.g.
    Omni's speaker dictionary) are copied from the base."""
    output = Path(args.output_dir)
    if output.is_dir() and args.overwrite_output_dir:  # files an earlier merge wrote and this one may not
        stale = [*output.glob("*.safetensors"), *(output / n for n in (
            "model.safetensors.index.json", *extra_files, VERIFICATION_NAME))]
        for file in stale:
            file.unlink(missing_ok=True)
    output.mkdir(parents=True, exist_ok=True)
    backbone.save_merged(model, output, config, max_shard_size=args.max_shard_size)
    processor.save_pretrained(output)
    allowed: list[str] = []
    for name in extra_files:
        if (Path(args.base_model_path) / name).is_file():
            shutil.copy2(Path(args.base_model_path) / name, output / name)
            allowed.append(name)
    config.write(output)
    found = pickle_files(output, tuple(allowed))
    if found:
        raise ValueError(f"pickle files were written to {output}: {found}; the merged checkpoint must be safetensors")
    return output


def merge(args: argparse.Namespace) -> dict[str, Any]:
    """Check, load, merge, (verify,) save. Returns {"output_dir", "verification", "config"}."""
    stages = check_request(args)
    last = stages[-1]
    verify_data = verify_inputs(args, last.config) if args.verify else None  # fail before loading weights
    device = pick_device(args.device)
    backbone_name = args.backbone or last.config.backbone
    to_save, thinker, backbone = load_base(args, backbone_name)
    to_save.to(device)
    towers = tuple(backbone.tower_modules)

    for i, stage in enumerate(stages[:-1]):
        logger.info("stage %d: merging %s", i + 1, stage.path)
        thinker = merge_stage(apply_stage(thinker, stage, f"stage{i + 1}", towers, args.force))

    processor = backbone.load_processor(str(last.path))
    if verify_data is not None:  # frames are resized onto the backbone's vision grid
        verify_data[0].media = dataclasses.replace(verify_data[0].media, pixel_multiple=backbone.vision_grid(processor))
    # the verification feeds the model as the last adapter was trained (its video token merging included)
    backbone.enable_token_merging(thinker, last.config.preprocessing.token_kept_ratio)
    live = apply_stage(thinker, last, f"stage{len(stages)}", towers, args.force)
    from surgvqa.tokenizer import repair_tokenizer

    report = repair_tokenizer(processor.tokenizer, live.get_base_model())
    if report.resized_embeddings_to:
        raise UserError(f"the tokenizer of {last.path} has more tokens than the merged model has rows")

    verification = reference = None
    if verify_data is not None:
        dataset, collator_kwargs, data_path = verify_data
        reference = run_outputs(live, processor, dataset, collator_kwargs, args.verify_batch_size,
                                args.verify_max_new_tokens)
    logger.info("stage %d: merging %s", len(stages), last.path)
    thinker = merge_stage(live)
    to_save = backbone.put_back(to_save, thinker) if args.full_omni else thinker
    if verify_data is not None:
        merged = run_outputs(thinker, processor, dataset, collator_kwargs, args.verify_batch_size,
                             args.verify_max_new_tokens)
        verification = compare_outputs(reference, merged, args.dtype, args.verify_tolerance, data_path)
        print(verification.format())

    backbone.enable_token_merging(thinker, 1.0)  # saved as loaded: merging is a run setting, not in the weights
    config = merged_config(stages, args, backbone.name, thinker.get_input_embeddings().num_embeddings)
    if verification is not None:
        config.merge_verification = {k: v for k, v in asdict(verification).items() if k != "differing_answers"}
    output = save_output(to_save, processor, config, args, backbone,
                         backbone.full_model_files if args.full_omni else ())
    if verification is not None:
        (output / VERIFICATION_NAME).write_text(json.dumps(asdict(verification), indent=2) + "\n")
    print(f"merged {len(stages)} adapter(s) into {args.base_model_path} ({args.dtype}) -> {output}")
    return {"output_dir": output, "verification": verification, "config": config.to_dict()}


def main(argv: list[str] | None = None) -> int:
    """``merge_stage2_to_bf16.py``: 0 merged (and verified); 1 verification failed; 2 refused (``error: …``)."""
    def body() -> int:
        args = parse_args(argv)
        if argv is None:  # the command line: bitsandbytes only for the nf4 round trip or a quantized base
            skip_bitsandbytes(args.merge_into == "dequantized" or checkpoint_needs_bitsandbytes(args.base_model_path))
        verification = merge(args)["verification"]
        if verification is not None and not verification.passed:
            print("error: verification FAILED (the checkpoint was written, flagged in surgvqa_config.json)",
                  file=sys.stderr)
            return 1
        return 0

    return run_main(body, logs=True)


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["VERIFY_TOLERANCE", "Verification", "check_chain", "lineage", "main", "merge", "parse_args"]
