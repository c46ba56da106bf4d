"""`AlignedTrainer`: transformers' `Trainer` for aligned models, with per-layer loss logging and layer-wise evaluation."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import EvalPrediction, PreTrainedModel, Trainer, TrainingArguments
from transformers.utils import logging

from .asr import asr_folded_state_dict, has_asr, reset_asr
from .card_data import DEFAULT_TAGS, AlignedModelCardData, latest_eval_metrics
from .compat import TrainerCheckpointHooks
from .distributed import check_launch
from .kinds import find_aligned_model
from .model_card import write_model_card
from .training_args import PRETRAINED_CLASSIFIER_LR_RATIO, AlignedTrainingArguments

logger = logging.get_logger(__name__)


class AlignedTrainer(TrainerCheckpointHooks, Trainer):
    r"""[`~transformers.Trainer`] for [`AlignedForSequenceClassification`] models.

    It trains with the model's aligned loss (the per-layer losses combined with the layer weights) and adds:

    - **per-layer training losses** `layer_{l}_loss` in every training log, averaged over the micro-batches since the
      last log and over all processes, so every `report_to` integration (TensorBoard, trackio, ...) records them;
    - **layer-wise evaluation**: `evaluate()` returns `eval_layer_{l}_accuracy`, `eval_layer_{l}_loss` and, for a
      user's `compute_metrics`, `eval_layer_{l}_{name}` for every layer, the last layer's values without the layer
      prefix (`eval_accuracy`, ...), `eval_minimal_depth`, the first layer within `minimal_depth_tolerance` of the
      last layer's accuracy, and `eval_mean_saturation_layer` (single-label classification: the mean first layer from
      which the top-1 prediction no longer changes, see [`saturation_layers`]);
    - **overrides** of the model config's `layer_weights` / `aligned_layers` from [`AlignedTrainingArguments`],
      written into `model.config` so saved checkpoints record what they were trained with.

    An [`AlignedForCausalLM`] trains through the same calls (on batches with `labels`, e.g. packed equal-length blocks
    with `labels = input_ids` and `default_data_collator`, as transformers' run_clm); its evaluation returns
    `eval_layer_{l}_loss`,
    `eval_layer_{l}_perplexity`, `eval_layer_{l}_agreement` (top-1 next-token agreement with the last layer),
    `eval_perplexity` and `eval_minimal_depth` by perplexity (see [`CausalLayerwiseMetrics`]), and its model card
    shows them with the suggested `assistant_early_exit`.

    Standard fine-tuning (`layer_weights="last"`) and the standard multi-exit baseline with one classifier per layer
    (a model built with `classifier_sharing="per_layer"`) train and evaluate through the same calls.

    `predict()` returns per-layer logits of shape `(num_samples, num_layers, num_labels)`, batch first;
    `preprocess_logits_for_metrics` receives them batch first too, `(batch, num_layers, num_labels)`.

    Args:
        model ([`AlignedForSequenceClassification`], *optional*): the model to train (possibly wrapped by peft).
        args ([`AlignedTrainingArguments`] or [`~transformers.TrainingArguments`], *optional*): plain
            `TrainingArguments` are upgraded to `AlignedTrainingArguments` with the aligned fields at their defaults.
        compute_metrics (`Callable[[EvalPrediction], dict]`, *optional*): metrics of one layer's predictions; it is
            called once per layer with `predictions` of shape `(num_samples, num_labels)`.
        kwargs: the other [`~transformers.Trainer`] arguments, by keyword (`train_dataset`, `eval_dataset`,
            `data_collator`, `processing_class`, `model_init`, `callbacks`, ...).

    Example:

    ```python
    >>> from hf_aligned import AlignedForSequenceClassification, AlignedTrainer, AlignedTrainingArguments

    >>> model = AlignedForSequenceClassification.from_pretrained("bert-base-uncased", num_labels=2)
    >>> args = AlignedTrainingArguments("out", layer_weights="linear", eval_strategy="epoch")
    >>> trainer = AlignedTrainer(model, args, train_dataset=train, eval_dataset=dev, processing_class=tokenizer)
    >>> trainer.train()
    >>> trainer.evaluate()["eval_layer_1_accuracy"]
    ```
    """

    # The model returns a per-batch mean loss: Trainer divides it by the gradient accumulation steps.
    loss_is_scaled_for_ga = False
    _tag_names = DEFAULT_TAGS

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | None = None,
        args: TrainingArguments | None = None,
        *,
        compute_metrics: Callable[[EvalPrediction], dict[str, float]] | None = None,
        **kwargs: Any,
    ):
        if args is None:
            args = AlignedTrainingArguments(output_dir="tmp_trainer")
        elif not isinstance(args, AlignedTrainingArguments):
            args = AlignedTrainingArguments.from_training_arguments(args)
        if args.label_smoothing_factor > 0:
            raise ValueError(
                "`label_smoothing_factor` is not supported by AlignedTrainer: the model computes the aligned loss "
                "over every layer itself. Set it to 0."
            )
        if args.batch_eval_metrics:
            raise ValueError(
                "`batch_eval_metrics=True` is not supported by AlignedTrainer: layer-wise metrics need the whole "
                "evaluation set. Use `eval_accumulation_steps` to move predictions to the CPU while evaluating."
            )
        if model is not None:
            self._prepare_aligned_model(model, args)
        self._layer_loss_sum: torch.Tensor | None = None
        self._layer_loss_names: list[str] = []
        super().__init__(model=model, args=args, compute_metrics=None, **kwargs)
        check_launch(self.accelerator.num_processes, self.accelerator.distributed_type.value)
        kind, aligned = find_aligned_model(self.model)
        self.compute_metrics = kind.metrics(aligned, compute_metrics, args.minimal_depth_tolerance)
        if args.classifier_lr_ratio is None and kind.trains_a_new_classifier:
            # The default rate is recorded in the trainer's own copy of the arguments (the caller's stay as given),
            # so `training_args.bin` and the card say which rate the run used.
            ratio = self.classifier_lr_ratio
            self.args = copy.copy(self.args)
            self.args.classifier_lr_ratio = ratio
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(list(self._tag_names))

    @staticmethod
    def _prepare_aligned_model(model: nn.Module, args: AlignedTrainingArguments) -> None:
        """Checks that `model` is an aligned model and writes the arguments' alignment settings into it (its kind's
        [`ModelKind.configure`])."""
        kind, aligned = find_aligned_model(model)
        overrides = kind.configure(aligned, args)
        if overrides:
            logger.info(f"Training with {overrides} (from the training arguments).")

    def call_model_init(self, trial=None) -> nn.Module:
        model = super().call_model_init(trial)
        self._prepare_aligned_model(model, self.args)
        if getattr(self, "compute_metrics", None) is not None:
            self.compute_metrics.model = model
        return model

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The model's aligned loss; in training, also records the per-layer losses for the next log."""
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        layer_losses = outputs.get("layer_losses") if isinstance(outputs, dict) else None
        if model.training and layer_losses is not None:
            recorded = [layer_losses]
            self._layer_loss_names = [f"layer_{layer}_loss" for layer in range(1, len(layer_losses) + 1)]
            if outputs.get("layer_distillation_losses") is not None:
                recorded.append(outputs["layer_distillation_losses"][:-1])
                self._layer_loss_names += [f"layer_{layer}_distillation_loss" for layer in range(1, len(layer_losses))]
            recorded = torch.cat(recorded).detach().float()
            # An aligned causal LM computes only some layers' losses per step (`layers_per_step`, zero weights): each
            # loss is averaged over the steps that computed it. A computed loss that is nan stays nan in the log.
            computed = outputs.get("layer_computed")
            computed = (
                torch.ones_like(recorded, dtype=torch.bool) if computed is None else computed.to(recorded.device)
            )
            computed = torch.cat([computed, computed.new_ones(len(recorded) - len(computed))])
            recorded = torch.stack([torch.where(computed, recorded, 0.0), computed.float()])
            self._layer_loss_sum = recorded if self._layer_loss_sum is None else self._layer_loss_sum + recorded
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Trainer's optimizer, with the new classification layers in their own parameter groups at
        `classifier_lr_ratio * learning_rate` (the schedule scales every group alike)."""
        already_built = self.optimizer is not None  # by an earlier call, or given by the user: left as it is
        optimizer = super().create_optimizer(model)
        if already_built:
            return optimizer
        ratio = self.classifier_lr_ratio
        classifier = {
            id(parameter)
            for name, parameter in (model or self.model).named_parameters()
            if _is_new_classifier_parameter(name)
        }
        for group in list(optimizer.param_groups):
            moved = [parameter for parameter in group["params"] if id(parameter) in classifier]
            if not moved:
                continue
            group["params"] = [parameter for parameter in group["params"] if id(parameter) not in classifier]
            optimizer.add_param_group({**group, "params": moved, "lr": group["lr"] * ratio})
        optimizer.param_groups[:] = [group for group in optimizer.param_groups if group["params"]]
        if ratio != 1.0 and not classifier:
            logger.warning(
                f"classifier_lr_ratio={ratio} found no classification layer among the trainable parameters; every "
                "parameter trains at learning_rate."
            )
        return optimizer

    @property
    def classifier_lr_ratio(self) -> float:
        """The classification layer's learning-rate multiple this trainer uses: the arguments' value, else 100 when
        the classifier is new on a pretrained backbone (`from_pretrained` on a base checkpoint) and 1 otherwise."""
        if self.args.classifier_lr_ratio is not None:
            return self.args.classifier_lr_ratio
        model = self.accelerator.unwrap_model(self.model)
        return PRETRAINED_CLASSIFIER_LR_RATIO if getattr(model, "has_new_classifier", False) else 1.0

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the mean per-layer training losses since the last log to training logs, then logs as usual."""
        if "loss" in logs and self._layer_loss_sum is not None:
            # One collective per log, on every process alike: Trainer calls `log` on all of them.
            total = self.accelerator.gather(self._layer_loss_sum[None]).sum(dim=0)
            means = (total[0] / total[1]).tolist()
            counts = total[1].tolist()
            logs = {
                **logs,
                **{name: mean for name, mean, count in zip(self._layer_loss_names, means, counts) if count},
            }
            self._layer_loss_sum = None
        super().log(logs, start_time)

    def state_dict_to_save(self, state_dict: dict | None) -> dict | None:
        """What a save writes: with `fold_asr_on_save`, the ASR scales folded into the saved weights (only)."""
        model = self.accelerator.unwrap_model(self.model)
        if self.args.fold_asr_on_save and has_asr(model):
            return asr_folded_state_dict(model, state_dict)
        return state_dict

    def after_checkpoint_load(self) -> None:
        """With `fold_asr_on_save`, a checkpoint holds weights with the ASR scales folded in and no ASR tensors, so
        Trainer's (non-strict) load leaves the live model's trained scales on top of them: they are reset to the
        identity, and the model computes exactly the checkpoint's function."""
        model = self.accelerator.unwrap_model(self.model)
        if self.args.fold_asr_on_save and has_asr(model):
            reset_asr(model)

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """Writes hf_aligned's model card (per-layer accuracy, minimal depth, exit trade-off) into `output_dir`.

        `Trainer.push_to_hub` calls this before uploading, so pushed checkpoints carry the same card as
        `model.push_to_hub`. A failing card step logs a warning and never stops training or saving.
        """
        if not self.is_world_process_zero():
            return
        training_args = self.args.to_dict()
        if self.state.global_step > 0:  # what ran: `num_train_epochs` does not say it when `max_steps` is set
            training_args |= {"epochs_run": round(self.state.epoch or 0.0, 2), "steps_run": self.state.global_step}
            if self.args.max_steps > 0:
                training_args.pop("num_train_epochs")
        kind, _ = find_aligned_model(self.model)  # settings of the other model kinds do not apply to this one
        training_args = {
            name: value for name, value in training_args.items() if name not in kind.foreign_card_arguments
        }
        data = AlignedModelCardData(
            model_id=self.args.hub_model_id or model_name,
            base_model=finetuned_from,
            datasets=[dataset_tags] if isinstance(dataset_tags, str) else dataset_tags,
            dataset_name=dataset if isinstance(dataset, str) else None,
            language=language,
            license=license,
            tags=[tags] if isinstance(tags, str) else tags,
            eval_metrics=latest_eval_metrics(self.state.log_history) or None,
            training_args=training_args,
        )
        write_model_card(self.args.output_dir, self.accelerator.unwrap_model(self.model), data)

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Trainer's evaluation step, with the per-layer logits, batch first `(batch, num_layers, num_labels)`, as the
        predictions (Trainer gathers and concatenates predictions along dim 0).

        The forward always runs every layer, also for unlabeled data and a model whose `exit_config` would exit early.
        For an [`AlignedForCausalLM`] the predictions are per-sample, per-layer sums `(batch, num_layers, 2)` (summed
        cross-entropy, tokens agreeing with the last layer) and the labels each sample's counted tokens `(batch,)`
        (see the kinds in `hf_aligned.kinds`).
        """
        kind, _ = find_aligned_model(model)
        return kind.prediction_step(self, model, inputs, prediction_loss_only, ignore_keys)


def _is_new_classifier_parameter(name: str) -> bool:
    """Whether a parameter (by its name in a possibly peft-wrapped model) belongs to a new part of the classifier: the
    classification layer or the projection head, both of which start from random weights."""
    parts = name.split(".")
    # peft wraps the classifier (`classifier.modules_to_save.default.heads.0.out_proj.weight`); the backbone's own
    # modules never sit under `classifier`.
    return "classifier" in parts and ("out_proj" in parts or "projection" in parts)
