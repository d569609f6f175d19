"""The Trainer of surgvqa: labelled-only loss, eval loss without kept logits, generation-scored eval accuracy,
and surgvqa_config.json written into every checkpoint.

Imported by :func:`surgvqa.train.train` when training starts (importing ``transformers.Trainer`` imports peft).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from transformers import Trainer, TrainerCallback

from surgvqa.backbones import get_backbone
from surgvqa.backbones.labelled_loss import labelled_loss, labelled_positions_only
from surgvqa.checkpoint import save_new_token_rows
from surgvqa.generate import generate_predictions
from surgvqa.metrics import strict_hit
from surgvqa.run_config import RunConfig


class VQATrainer(Trainer):
    """Eval loss without keeping logits, plus generation-scored accuracy on a bounded subset.

    ``lm_head`` (the model's output embedding): training and evaluation loss apply it only to the labelled positions
    (:mod:`surgvqa.backbones.labelled_loss`); ``None`` keeps the model's own loss on full logits.
    """

    def __init__(self, *args, generation_eval: dict | None = None, lm_head=None, **kwargs):
        if lm_head is not None:
            kwargs["compute_loss_func"] = labelled_loss
        super().__init__(*args, **kwargs)
        self.generation_eval = generation_eval
        self.lm_head = lm_head

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        if self.lm_head is None or labels is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with labelled_positions_only(self.lm_head, labels):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self.generation_eval:
            extra = self.generation_accuracy(metric_key_prefix)
            self.log(extra)
            metrics.update(extra)
        return metrics

    def generation_accuracy(self, prefix: str = "eval") -> dict[str, float]:
        spec = self.generation_eval
        dataset, collator = spec["dataset"], spec["collator"]
        model = self.accelerator.unwrap_model(self.model)
        hits, no_eos = 0, 0
        candidates = spec["candidates"]
        by_key = {s.key: s for s in dataset.samples}
        for prediction in generate_predictions(
            model, self.processing_class.tokenizer, dataset, collator,
            batch_size=spec["batch_size"], max_new_tokens=spec["max_new_tokens"],
        ):
            sample = by_key[prediction.key]
            hits += strict_hit(prediction.text, sample.short_answer, candidates.get(sample.question_type, []))
            no_eos += not prediction.stopped_by_eos
        n = len(dataset)
        return {f"{prefix}_accuracy": hits / n, f"{prefix}_no_eos": no_eos / n}


class SurgvqaConfigCallback(TrainerCallback):
    """Write surgvqa_config.json (and new embedding rows) into every checkpoint so each one is evaluable."""

    def __init__(self, config: RunConfig, original_rows: int):
        self.config = config
        self.original_rows = original_rows

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if path.is_dir():
                save_outputs_extras(path, self.config, model, self.original_rows)
        return control


def save_outputs_extras(path: Path, config: RunConfig, model, original_rows: int) -> None:
    if model is not None:
        config = dataclasses.replace(config, **get_backbone(config.backbone).save_extras(model, str(path), config))
    config.write(path)
    if config.resized_vocab and model is not None:
        save_new_token_rows(model, path, original_rows)


__all__ = ["SurgvqaConfigCallback", "VQATrainer", "save_outputs_extras"]
