"""Layer-wise evaluation: per-layer accuracy, loss and user metrics, the minimal depth, and their table."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import numpy as np
import torch
from transformers import EvalPrediction

from .losses import infer_problem_type, layer_losses
from .saturation import saturation_layers


class ConfiguredModel(Protocol):
    """What layer-wise evaluation needs from a model: its config (for `problem_type`)."""

    config: object


def minimal_depth(accuracies: Sequence[float], tolerance: float = 0.01) -> int:
    """The first 1-based layer whose accuracy is at most `tolerance` below the last layer's.

    Args:
        accuracies: accuracy after every layer, layer 1 first.
        tolerance: the accepted absolute drop, e.g. 0.01 for one point.

    Raises:
        ValueError: when `accuracies` is empty, or the last layer's accuracy is not a number (nothing was counted).
    """
    if len(accuracies) == 0:
        raise ValueError("`accuracies` is empty; give one accuracy per layer.")
    if not accuracies[-1] == accuracies[-1]:
        raise ValueError(
            "The last layer's accuracy is nan (no sample was counted, e.g. every label is -100), so no layer can "
            "be compared with it."
        )
    target = accuracies[-1] - tolerance
    # A tiny slack so that an accuracy that equals the target up to float rounding counts as reaching it.
    return next(layer for layer, accuracy in enumerate(accuracies, start=1) if accuracy >= target - 1e-12)


class LayerwiseMetrics:
    """A `compute_metrics` for [`~transformers.Trainer`] that evaluates the classifier after every layer.

    It reads predictions of shape `(num_samples, num_layers, num_labels)` (per-layer logits, batch first, as
    [`AlignedTrainer`] produces them) or `(num_samples, num_layers)` (class ids, when `preprocess_logits_for_metrics`
    took the argmax) and returns, for every 1-based layer `l`:

    - `layer_{l}_loss`: the model's own loss of that layer's logits over the whole evaluation set;
    - `layer_{l}_accuracy`: the fraction of samples classified right (all labels right, for multi-label problems);
      not reported for regression;
    - `layer_{l}_{name}` for every `name` the user's `compute_metrics` returns when given that layer's predictions;

    plus the last layer's values except the loss without the `layer_{l}_` prefix (so `accuracy` is the model's usual
    accuracy; `loss` is left to Trainer, whose `eval_loss` is the aligned loss), `minimal_depth`, the first layer whose
    accuracy is within `tolerance` of the last layer's (left out when no sample is counted), and, for single-label classification, `mean_saturation_layer`,
    the mean over samples of the first layer from which the top-1 prediction no longer changes (see
    [`saturation_layers`]).

    Args:
        model: the model whose config's `problem_type` decides the per-layer loss ([`layer_losses`]); `None`
            skips the per-layer losses.
        compute_metrics: a user's `compute_metrics`, applied to each layer's predictions in turn.
        tolerance: the accuracy drop `minimal_depth` accepts.
    """

    def __init__(
        self,
        model: ConfiguredModel | None = None,
        compute_metrics: Callable[[EvalPrediction], dict[str, float]] | None = None,
        tolerance: float = 0.01,
    ):
        self.model = model
        self.compute_metrics = compute_metrics
        self.tolerance = tolerance

    def __call__(self, eval_pred: EvalPrediction) -> dict[str, float]:
        predictions = np.asarray(eval_pred.predictions)
        labels = np.asarray(eval_pred.label_ids)
        if predictions.ndim not in (2, 3):
            raise ValueError(
                f"Layer-wise metrics expect predictions of shape (samples, layers, labels) or (samples, layers), got "
                f"{predictions.shape}; `preprocess_logits_for_metrics` must keep the layer dimension (dim 1)."
            )
        num_layers = predictions.shape[1]
        per_layer: list[dict[str, float]] = [{} for _ in range(num_layers)]
        is_logits = predictions.ndim == 3
        problem_type = getattr(getattr(self.model, "config", None), "problem_type", None)
        if is_logits and self.model is not None:
            layer_logits = torch.from_numpy(predictions).float().transpose(0, 1)
            label_tensor = torch.from_numpy(labels)
            problem_type = problem_type or infer_problem_type(layer_logits.shape[-1], label_tensor)
            losses = layer_losses(layer_logits, label_tensor, problem_type)
            for metrics, loss in zip(per_layer, losses.tolist()):
                metrics["loss"] = loss
        if problem_type != "regression" and not (is_logits and predictions.shape[2] == 1):
            for metrics, accuracy in zip(per_layer, _layer_accuracies(predictions, labels, problem_type)):
                metrics["accuracy"] = accuracy
        if self.compute_metrics is not None:
            for layer, metrics in enumerate(per_layer):
                layer_pred = EvalPrediction(
                    predictions=predictions[:, layer],
                    label_ids=labels,
                    inputs=eval_pred.inputs,
                    losses=eval_pred.losses,
                )
                metrics.update(self.compute_metrics(layer_pred))
        result = {
            f"layer_{layer}_{name}": value
            for layer, metrics in enumerate(per_layer, start=1)
            for name, value in metrics.items()
        }
        # `loss` stays Trainer's own `eval_loss` (the aligned loss), so only the other last-layer values are copied.
        result.update({name: value for name, value in per_layer[-1].items() if name != "loss"})
        if "accuracy" in per_layer[-1] and not np.isnan(per_layer[-1]["accuracy"]):  # nan: nothing was counted
            result["minimal_depth"] = minimal_depth([metrics["accuracy"] for metrics in per_layer], self.tolerance)
        if _is_single_label(predictions, labels, problem_type):
            saturation = saturation_layers(torch.from_numpy(predictions).transpose(0, 1))
            result["mean_saturation_layer"] = float(saturation.double().mean())
        return result


def _is_single_label(predictions: np.ndarray, labels: np.ndarray, problem_type: str | None) -> bool:
    """Whether the predictions are one class per sample: scores of at least 2 classes, or integer class ids."""
    if problem_type not in (None, "single_label_classification") or labels.ndim > 1:
        return False
    if predictions.ndim == 3:
        return predictions.shape[2] >= 2
    return not np.issubdtype(predictions.dtype, np.floating)


def _layer_accuracies(predictions: np.ndarray, labels: np.ndarray, problem_type: str | None) -> list[float]:
    """Accuracy of every layer's predictions, `(samples, layers[, labels])` against `labels`."""
    if problem_type == "multi_label_classification":
        # Subset accuracy: a sample counts when every label's decision (logit > 0) is right.
        correct = ((predictions > 0) == (labels[:, None] > 0.5)).all(axis=2)
        return correct.mean(axis=0).tolist()
    predicted = predictions.argmax(axis=2) if predictions.ndim == 3 else predictions
    labels = labels.reshape(-1)
    counted = labels != -100
    correct = predicted[counted] == labels[counted, None]
    return correct.mean(axis=0).tolist() if counted.any() else [float("nan")] * predictions.shape[1]


def layer_values(metrics: Mapping[str, float], name: str = "accuracy", prefix: str = "eval") -> list[float]:
    """The per-layer values `{prefix}_layer_{l}_{name}` of a metrics dict, layer 1 first."""
    values = []
    while (key := f"{prefix}_layer_{len(values) + 1}_{name}") in metrics:
        values.append(metrics[key])
    return values


def format_layer_table(
    metrics_by_run: Mapping[str, Mapping[str, float]], name: str = "accuracy", prefix: str = "eval"
) -> str:
    """A plain-text table of one per-layer metric for several runs side by side, with each run's minimal depth.

    Args:
        metrics_by_run: run name -> the metrics `trainer.evaluate()` returned for it.
        name: the per-layer metric to show.
        prefix: the metric key prefix used at evaluation.
    """
    columns = {run: layer_values(metrics, name, prefix) for run, metrics in metrics_by_run.items()}
    num_layers = max((len(values) for values in columns.values()), default=0)
    width = max([12, *(len(run) for run in columns)])
    lines = ["layer".ljust(13) + "".join(run.rjust(width + 2) for run in columns)]
    for layer in range(1, num_layers + 1):
        cells = [f"{values[layer - 1]:.4f}" if layer <= len(values) else "-" for values in columns.values()]
        lines.append(str(layer).ljust(13) + "".join(cell.rjust(width + 2) for cell in cells))
    depths = [str(metrics.get(f"{prefix}_minimal_depth", "-")) for metrics in metrics_by_run.values()]
    lines.append("minimal depth".ljust(13) + "".join(depth.rjust(width + 2) for depth in depths))
    return "\n".join(lines)


class CausalLayerwiseMetrics:
    """A `compute_metrics` for [`AlignedForCausalLM`] evaluated by [`AlignedTrainer`]: next-token loss, perplexity
    and top-1 agreement with the last layer after every layer.

    [`AlignedTrainer`] reduces every evaluation sample to per-layer sums, `predictions` of shape
    `(samples, num_layers, 2)` (summed cross-entropy, tokens agreeing with the last layer) and `label_ids` of shape
    `(samples,)` (tokens counted), so the metrics are exact token averages over the whole set with no logits kept,
    also when a distributed evaluation repeats samples to even out its last batches (they are dropped by sample).
    It returns `layer_{l}_loss`, `layer_{l}_perplexity` and `layer_{l}_agreement` for every 1-based layer `l`, the
    last layer's `perplexity`, and `minimal_depth`: the first layer whose perplexity is at most
    (1 + `tolerance`) times the last layer's (left out when the last layer's loss is nan, as when no token is counted).
    """

    def __init__(self, tolerance: float = 0.01):
        self.tolerance = tolerance

    def __call__(self, eval_pred: EvalPrediction) -> dict[str, float]:
        sums = np.asarray(eval_pred.predictions, dtype=np.float64)
        counts = np.asarray(eval_pred.label_ids, dtype=np.float64)
        if sums.ndim != 3 or sums.shape[2] != 2:
            raise ValueError(
                f"Causal-LM layer metrics expect per-sample sums of shape (samples, layers, 2), got {sums.shape}."
            )
        tokens = counts.sum()
        with np.errstate(invalid="ignore", divide="ignore"):  # no counted token: nan, and no minimal depth
            losses = sums[:, :, 0].sum(axis=0) / tokens
            agreement = sums[:, :, 1].sum(axis=0) / tokens
        perplexities = np.exp(losses)
        result = {}
        for layer, (loss, perplexity, agree) in enumerate(zip(losses, perplexities, agreement), start=1):
            result.update(
                {
                    f"layer_{layer}_loss": float(loss),
                    f"layer_{layer}_perplexity": float(perplexity),
                    f"layer_{layer}_agreement": float(agree),
                }
            )
        result["perplexity"] = float(perplexities[-1])
        if np.isnan(perplexities[-1]):  # a diverged last layer: no depth compares with it
            return result
        limit = perplexities[-1] * (1.0 + self.tolerance) * (1 + 1e-12)
        result["minimal_depth"] = next(layer for layer, value in enumerate(perplexities, start=1) if value <= limit)
        return result
