"""The Trainer of surgvqa: labelled-only loss, eval loss without kept logits, generation-scored eval accuracy,
and surgvqa_config.json written into every checkpoint.

Imported by :func:`surgvqa.train.train` when training starts (importing ``transformers.Trainer`` imports peft).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback

from surgvqa.backbones import get_backbone
from surgvqa.backbones.common.labelled_logits import labelled_loss, next_token_selection
from surgvqa.checkpoint import save_new_token_rows
from surgvqa.data import SurgicalVQADataset
from surgvqa.generate import generate_predictions
from surgvqa.lora import loraplus_optimizer
from surgvqa.metrics import strict_hit
from surgvqa.run_config import RunConfig

logger = logging.getLogger(__name__)


class VQATrainer(Trainer):
    """Eval loss without keeping logits, plus generation-scored accuracy on a bounded subset.

    ``loraplus_lr_ratio``: LoRA+ (see :func:`surgvqa.lora.loraplus_optimizer`). ``router_aux_loss_coef``: the
    weight of an MoE router's load-balancing loss in the labelled-only loss.
    ``labelled_only``: training and evaluation loss ask the model for the logits of the labelled positions only
    (``logits_mask``, :mod:`surgvqa.backbones.common.labelled_logits`); False keeps the model's own loss on full
    logits. ``keeps_tower_outputs``: the model keeps its frozen towers' outputs (``Backbone.keep_tower_outputs``),
    so training batches pass their ``media_ids`` on (else they are dropped). ``eval_collator``: the collator of the
    evaluation batches (None: the training one).

    The accuracy is computed inside ``evaluation_loop``, so ``eval_accuracy`` is in the metrics that are logged,
    passed to ``on_evaluate`` (``EarlyStoppingCallback``) and used for ``metric_for_best_model`` /
    ``load_best_model_at_end``. Generation is split across processes (each generates about N / world_size
    samples) and the per-sample results are gathered, so every process reports the same numbers.
    """

    def __init__(self, *args, generation_eval: dict | None = None, labelled_only: bool = False,
                 keeps_tower_outputs: bool = False, eval_collator=None, loraplus_lr_ratio: float | None = None,
                 router_aux_loss_coef: float = 0.0, **kwargs):
        self.router_aux_loss_coef = router_aux_loss_coef
        if labelled_only:
            kwargs["compute_loss_func"] = self.labelled_loss
        super().__init__(*args, **kwargs)
        self.generation_eval = generation_eval
        self.labelled_only = labelled_only
        self.keeps_tower_outputs = keeps_tower_outputs
        self.eval_collator = eval_collator
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self._eval_loader = None  # kept with persistent workers, as the Trainer keeps its own
        if self.is_fsdp_enabled or (self.is_deepspeed_enabled
                                    and self.accelerator.state.deepspeed_plugin.zero_stage == 3):
            self.add_callback(ShardingCheck())

    def create_accelerator_and_postprocess(self):
        """The Trainer's accelerator; with ``--fsdp`` on CPU processes (gloo), FSDP is switched on here.

        accelerate (1.16, ``AcceleratorState.__init__``) enables FSDP for multi-accelerator runs only: on CPU it keeps
        ``MULTI_CPU`` and the Trainer would wrap the model in DDP, unsharded. torch's ``fully_shard`` runs on CPU with
        gloo, and accelerate's FSDP code path (``fsdp2_prepare_model``, the state-dict gathering on save) does not
        depend on the device, so the state is set to FSDP with the Trainer's own plugin before anything is prepared.
        :class:`ShardingCheck` confirms at the start of training that the parameters are sharded."""
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is None or self.is_fsdp_enabled:
            return
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = self.accelerator.state
        if state.distributed_type != DistributedType.MULTI_CPU:
            if state.num_processes == 1:
                logger.warning("--fsdp with one process: nothing to shard over, the model trains unsharded (launch "
                               "N processes with torchrun or accelerate launch to shard)")
            return
        plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.fsdp_plugin = plugin
        state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.is_fsdp_enabled = True

    def _run_epoch(self, *args, **kwargs):
        """An epoch of training, none once the run is at its last step.

        A run resumed from the checkpoint of its last step (killed before its final files) would otherwise train on:
        the Trainer (5.24 and 5.25, ``_run_epoch``) skips the batches of the epoch that were trained, then runs one more
        optimizer step before it compares ``global_step`` with ``max_steps``."""
        if self.state.global_step >= self.state.max_steps:
            if self.state.global_step > self.state.max_steps:
                logger.warning("the checkpoint resumed is at step %d, past this run's last step %d: nothing is "
                               "trained, the final adapter is the checkpoint's", self.state.global_step,
                               self.state.max_steps)
            self.control.should_training_stop = True
            return
        super()._run_epoch(*args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log, without the ``train_loss`` of a ``train()`` call that ran no step: it would be 0.0
        (the loss of no step), where a resumed run at its last step has nothing to average."""
        if "train_loss" in logs and self.state.global_step == getattr(self, "_initial_global_step", None):
            logs.pop("train_loss")
            logger.info("resumed at step %d of %d: nothing left to train, the final adapter is the checkpoint's",
                        self.state.global_step, self.state.max_steps)
        super().log(logs, start_time)

    def labelled_loss(self, outputs, labels, num_items_in_batch=None):
        """The loss of the labelled-position logits, plus an MoE router's weighted load-balancing loss when one is
        asked for (``router_aux_loss_coef``): the model adds that term only when it computes the loss itself."""
        loss = labelled_loss(outputs, labels, num_items_in_batch)
        aux = outputs.get("aux_loss") if hasattr(outputs, "get") else None
        if self.router_aux_loss_coef and aux is not None:
            loss = loss + self.router_aux_loss_coef * aux.to(loss.device)
        return loss

    def create_optimizer(self, model=None):
        """With ``loraplus_lr_ratio``: the LoRA+ optimizer (B matrices at that multiple of the learning rate)."""
        if self.loraplus_lr_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        self.optimizer = loraplus_optimizer(self, self.loraplus_lr_ratio)
        return self.optimizer

    def get_eval_dataloader(self, eval_dataset=None):
        """With ``eval_collator``: evaluation batches through their own collator (evaluation items carry no
        ``media_ids``)."""
        args = self.args
        if self.eval_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        if eval_dataset is None and self._eval_loader is not None and args.dataloader_persistent_workers:
            return self._eval_loader
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        workers = {"persistent_workers": args.dataloader_persistent_workers,
                   "prefetch_factor": args.dataloader_prefetch_factor} if args.dataloader_num_workers else {}
        loader = self.accelerator.prepare(DataLoader(
            dataset, batch_size=args.eval_batch_size, sampler=self._get_eval_sampler(dataset),
            collate_fn=self.eval_collator, num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory, drop_last=args.dataloader_drop_last, **workers))
        if eval_dataset is None:
            self._eval_loader = loader
        return loader

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        if not (model.training and self.keeps_tower_outputs):  # kept tower outputs are for training items
            inputs.pop("media_ids", None)
        if model.training:  # a training forward needs no key/value cache (the model would build one)
            inputs["use_cache"] = False
        labels = inputs.get("labels")
        if self.labelled_only and labels is not None:
            inputs["logits_mask"] = next_token_selection(labels)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def floating_point_ops(self, inputs) -> int:
        """Trainer's estimate (6 x input tokens x non-embedding parameters) with the parameter count taken once:
        the Trainer would walk every parameter of the model at every step to log ``total_flos``."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if getattr(self, "_non_embedding_parameters", None) is None:
            self._non_embedding_parameters = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._non_embedding_parameters

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        if self.generation_eval and description == "Evaluation":
            output.metrics.update(self.generation_accuracy(metric_key_prefix))
        return output

    def generation_accuracy(self, prefix: str = "eval") -> dict[str, float]:
        from accelerate.utils import gather_object

        spec = self.generation_eval
        dataset, collator = spec["dataset"], spec["collator"]
        model = self.accelerator.unwrap_model(self.model)
        candidates = spec["candidates"]
        local: list[tuple[int, bool, bool]] = []
        # sharded parameters (FSDP, ZeRO-3): every forward pass is collective, so every process generates the same
        # number of batches (the last sample repeated where the split is uneven) and in step (synced generation)
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        with self.accelerator.split_between_processes(list(range(len(dataset.samples))),
                                                      apply_padding=sharded) as mine:
            part = SurgicalVQADataset([dataset.samples[i] for i in mine], dataset.media,
                                      frame_cache=dataset.frame_cache)
            index = {dataset.samples[i].key: i for i in mine}
            by_key = {s.key: s for s in part.samples}
            if part.samples:
                for prediction in generate_predictions(
                    model, self.processing_class.tokenizer, part, collator,
                    batch_size=spec["batch_size"], max_new_tokens=spec["max_new_tokens"], synced=sharded,
                ):
                    sample = by_key[prediction.key]
                    hit = strict_hit(prediction.text, sample.short_answer, candidates.get(sample.question_type, []))
                    local.append((index[prediction.key], hit, not prediction.stopped_by_eos))
        per_rank = gather_object([len({i for i, _, _ in local})])
        results = list({i: (i, hit, no_eos) for i, hit, no_eos in gather_object(local)}.values())
        n = len(results)
        if n != len(dataset.samples):
            raise RuntimeError(f"generation eval gathered {n} results for {len(dataset.samples)} samples")
        return {
            f"{prefix}_accuracy": sum(hit for _, hit, _ in results) / n,
            f"{prefix}_no_eos": sum(no_eos for _, _, no_eos in results) / n,
            f"{prefix}_generated": float(n),
            f"{prefix}_generated_per_process": float(max(per_rank)),
        }


class ShardingCheck(TrainerCallback):
    """With FSDP or ZeRO-3: log how the parameters are sharded once the model is prepared, and stop a run whose
    parameters are not sharded at all (a model trained unsharded while sharding was asked for)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from torch.distributed.tensor import DTensor

        params = list(model.parameters()) if model is not None else []
        fsdp = [p for p in params if isinstance(p, DTensor)]
        zero3 = [p for p in params if hasattr(p, "ds_tensor")]  # DeepSpeed's partitioned parameters
        if fsdp:
            kind, sharded, local, total = "FSDP2", fsdp, sum(p.to_local().numel() for p in fsdp), sum(
                p.numel() for p in fsdp)
        elif zero3:
            kind, sharded, local, total = "ZeRO-3", zero3, sum(p.ds_tensor.numel() for p in zero3), sum(
                p.ds_numel for p in zero3)
        else:
            raise RuntimeError("sharding (--fsdp / a ZeRO-3 --deepspeed config) was asked for but no parameter of the "
                               "prepared model is sharded: the run would train unsharded; check the accelerate / "
                               "torch / deepspeed versions")
        logger.info("%s: %d of %d parameter tensors sharded over %d processes; this process holds %d of their %d "
                    "elements", kind, len(sharded), len(params), args.world_size, local, total)
        return control


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


__all__ = ["ShardingCheck", "SurgvqaConfigCallback", "VQATrainer", "save_outputs_extras"]
