"""What differs between the two model kinds, for training and evaluation, behind one small interface.

[`AlignedTrainer`] trains and evaluates an [`AlignedForSequenceClassification`] and an [`AlignedForCausalLM`] through
the same calls; everything that differs between them (which training arguments apply, what evaluation collects per
batch, which layer-wise metrics read it) is a method of that kind's [`ModelKind`], found once with
[`find_aligned_model`]. Adding a third model kind means adding one class here, not `if` branches in the trainer.
(The model card differs by kind too: its template and context live in `model_card.py`, keyed by the same names.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from transformers import EvalPrediction, Trainer

from .alignment import CAUSAL_LM, CLASSIFICATION, KIND_FIELDS, foreign_settings_message
from .compat import prepare_trainer_inputs
from .losses import shifted_labels
from .metrics import CausalLayerwiseMetrics, LayerwiseMetrics
from .modeling_aligned import AlignedForSequenceClassification
from .modeling_causal_lm import AlignedForCausalLM
from .outputs import AlignedSequenceClassifierOutput

if TYPE_CHECKING:
    from .training_args import AlignedTrainingArguments

# Every output field except the per-layer logits: evaluation collects `layer_logits` alone as the predictions.
_NON_PREDICTION_OUTPUTS = [
    item.name for item in dataclasses.fields(AlignedSequenceClassifierOutput) if item.name != "layer_logits"
]
# Training arguments that configure a classifier's training only (a recipe sets them too).
CLASSIFIER_ARGUMENTS = (
    "recipe",
    "classifier_update",
    "distillation_weight",
    "distillation_temperature",
    "classifier_lr_ratio",
)

Step = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


class ModelKind:
    """The per-kind behaviour of training and evaluation; one instance per model kind (see `KINDS`)."""

    name: ClassVar[str]
    model_class: ClassVar[type]
    # Training arguments that apply only to the other model kinds: refused, by name, when set.
    foreign_arguments: ClassVar[tuple[str, ...]] = ()
    # Training arguments a card of this kind leaves out (they configure the other kinds only).
    foreign_card_arguments: ClassVar[frozenset[str]] = frozenset()
    # Whether training gives the model a new classification layer (with its own learning-rate ratio).
    trains_a_new_classifier: ClassVar[bool] = False

    def owns(self, model: nn.Module) -> bool:
        return isinstance(model, self.model_class)

    def configure(self, model: nn.Module, args: AlignedTrainingArguments) -> dict[str, Any]:
        """Checks the training arguments against this kind and writes the alignment settings they set into `model`
        (validated first, so a bad one changes nothing). Returns the settings the arguments set.

        Raises:
            ValueError: naming the arguments that do not apply to this kind, or a setting that does not fit.
        """
        given = [name for name in self.foreign_arguments if getattr(args, name, None) is not None]
        if given:
            raise ValueError(foreign_settings_message(given, self.name))
        overrides = {
            name: getattr(args, name) for name in KIND_FIELDS[self.name] if getattr(args, name, None) is not None
        }
        model.configure_alignment(**overrides)
        return overrides

    def metrics(
        self, model: nn.Module, compute_metrics: Callable[[EvalPrediction], dict] | None, tolerance: float
    ) -> Callable[[EvalPrediction], dict[str, float]]:
        """The trainer's `compute_metrics`: this kind's layer-wise metrics (with the user's, where supported)."""
        raise NotImplementedError

    def prediction_step(
        self,
        trainer: Trainer,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None,
    ) -> Step:
        """One evaluation step: the loss and what [`metrics`] reads, batch first (Trainer concatenates along dim 0)."""
        raise NotImplementedError


class ClassificationKind(ModelKind):
    """[`AlignedForSequenceClassification`]: per-layer logits are the predictions, any `compute_metrics` applies."""

    name = CLASSIFICATION
    model_class = AlignedForSequenceClassification
    trains_a_new_classifier = True

    def metrics(self, model, compute_metrics, tolerance):
        return LayerwiseMetrics(model, compute_metrics, tolerance)

    def prediction_step(self, trainer, model, inputs, prediction_loss_only, ignore_keys):
        """The per-layer logits, batch first `(batch, num_layers, num_labels)`; every layer runs, also for unlabeled
        data and a model whose `exit_config` would exit early."""
        loss, layer_logits, labels = Trainer.prediction_step(
            trainer,
            model,
            {**inputs, "output_layer_logits": True},
            prediction_loss_only,
            ignore_keys=[*(ignore_keys or []), *_NON_PREDICTION_OUTPUTS],
        )
        if layer_logits is not None:
            layer_logits = layer_logits.transpose(0, 1).contiguous()
        return loss, layer_logits, labels


class CausalLMKind(ModelKind):
    """[`AlignedForCausalLM`]: evaluation keeps per-batch sums, never logits; classifier options do not apply."""

    name = CAUSAL_LM
    model_class = AlignedForCausalLM
    foreign_arguments = CLASSIFIER_ARGUMENTS
    foreign_card_arguments = frozenset({*CLASSIFIER_ARGUMENTS, "fold_asr_on_save"})

    def metrics(self, model, compute_metrics, tolerance):
        if compute_metrics is not None:
            raise ValueError(
                "`compute_metrics` is not supported for AlignedForCausalLM: evaluation reports every layer's "
                "loss, perplexity and agreement from per-sample sums, without keeping logits."
            )
        return CausalLayerwiseMetrics(tolerance)

    def prediction_step(self, trainer, model, inputs, prediction_loss_only, ignore_keys):
        """Per-sample, per-layer sums `(batch, num_layers, 2)` (summed cross-entropy, tokens agreeing with the last
        layer) as predictions and each sample's counted tokens `(batch,)` as labels: one row per sample, so that
        `gather_for_metrics` drops exactly the samples a distributed evaluation repeated to even out its batches."""
        inputs = prepare_trainer_inputs(trainer, inputs)
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError(
                "Evaluating an AlignedForCausalLM needs `labels` (the input ids, -100 on padding): pack the texts "
                "into equal-length blocks with `labels = input_ids` and use `default_data_collator` (as transformers' "
                "run_clm), which keeps end-of-text tokens in the loss."
            )
        with torch.no_grad(), trainer.compute_loss_context_manager():
            outputs = model(**inputs, output_layer_agreement=True)
        loss = outputs.loss.detach().mean()
        if prediction_loss_only:
            return loss, None, None
        counted = (shifted_labels(labels) != -100).sum(dim=1).to(outputs.layer_sample_sums.dtype)
        return loss, outputs.layer_sample_sums.detach(), counted


KINDS: tuple[ModelKind, ...] = (ClassificationKind(), CausalLMKind())


def find_aligned_model(model: nn.Module | None) -> tuple[ModelKind, nn.Module]:
    """The kind of an aligned model and the model itself, also inside a peft or DDP wrapper.

    Raises:
        TypeError: when `model` holds no aligned model, naming how to make one.
    """
    candidate = model
    for _ in range(3):
        for kind in KINDS:
            if kind.owns(candidate):
                return kind, candidate
        inner = getattr(candidate, "module", None)
        if inner is None and hasattr(candidate, "get_base_model"):
            inner = candidate.get_base_model()
        candidate = inner
    raise TypeError(
        f"AlignedTrainer trains aligned models, got {type(model).__name__}. Wrap the base model with "
        "`AlignedForSequenceClassification.from_pretrained(...)` or, for a language model, "
        "`AlignedForCausalLM.from_pretrained(...)` (use `layer_weights='last'` for standard fine-tuning)."
    )
