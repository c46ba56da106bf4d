"""Choosing an exit threshold on validation data: the fastest setting within a tolerated accuracy drop."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .data import collect_layer_logits
from .exits import ExitConfig, exit_scores, simulate_exits

CALIBRATION_RULES = ("confidence", "entropy", "patience")


@dataclass
class CalibrationResult:
    """The accuracy / depth trade-off of an exit rule on validation data, and the setting chosen.

    Attributes:
        rule: the exit rule calibrated.
        chosen: the chosen threshold (or patience).
        full_accuracy: accuracy at full depth.
        accuracy: accuracy with the chosen setting.
        mean_exit_layer: mean exit layer with the chosen setting.
        expected_speedup: L / mean exit layer with the chosen setting.
        num_layers: the model's depth L.
        curve: one dict per setting tried, with keys `threshold`, `accuracy`, `mean_exit_layer`, `expected_speedup`.
    """

    rule: str
    chosen: float
    full_accuracy: float
    accuracy: float
    mean_exit_layer: float
    expected_speedup: float
    num_layers: int
    curve: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the result as JSON."""
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2)


def calibrate_exits(
    model,
    dataset: Any,
    max_accuracy_drop: float = 0.01,
    rule: str = "confidence",
    thresholds: Sequence[float] | None = None,
    batch_size: int = 32,
    collate_fn: Callable | None = None,
    num_thresholds: int = 100,
    min_layer: int = 1,
) -> CalibrationResult:
    """Chooses the exit setting that minimizes the mean exit layer while keeping accuracy within a tolerated drop.

    The model runs once over the data (every layer's logits); each candidate setting is then evaluated with the same
    decisions early exit makes online. The chosen setting is stored in `model.exit_config`, so `early_exit_predict`,
    `save_pretrained` and pipelines use it.

    Args:
        model: an [`AlignedForSequenceClassification`] (shared classifier or per-layer heads).
        dataset: labelled validation data: a processed `datasets.Dataset` or an iterable of dict batches.
        max_accuracy_drop: tolerated accuracy loss against full depth, as a fraction (0.01 = one point).
        rule: `"confidence"`, `"entropy"` or `"patience"`.
        thresholds: candidate thresholds (or patiences); by default quantiles of the scores seen on the data
            (for patience: 1 to L - 1).
        batch_size: batch size for the pass over the data.
        collate_fn: how to batch dataset rows (e.g. `DataCollatorWithPadding(tokenizer)`).
        num_thresholds: how many score quantiles to try when `thresholds` is not given.
        min_layer: the first layer samples may leave at.

    Returns:
        A [`CalibrationResult`] with the chosen setting and the whole accuracy / mean-exit-layer / speedup curve.

    Raises:
        ValueError: for an unknown rule, a drop outside [0, 1], or unlabelled data.
    """
    if rule not in CALIBRATION_RULES:
        raise ValueError(f"`rule={rule!r}` cannot be calibrated; use one of {CALIBRATION_RULES}.")
    if not 0.0 <= max_accuracy_drop <= 1.0:
        raise ValueError(f"`max_accuracy_drop={max_accuracy_drop}` is a fraction of accuracy between 0 and 1.")
    layer_logits, labels = collect_layer_logits(model, dataset, batch_size=batch_size, collate_fn=collate_fn)
    if labels is None:
        raise ValueError("calibration needs labelled data: the dataset has no `labels` or `label` column.")
    num_layers = layer_logits.shape[0]
    full_accuracy = (layer_logits[-1].argmax(-1) == labels).float().mean().item()
    if thresholds is None:
        thresholds = _default_candidates(layer_logits, rule, num_thresholds)
    curve = [_curve_point(layer_logits, labels, rule, value, min_layer) for value in thresholds]
    best = _fastest_admissible(curve, full_accuracy - max_accuracy_drop)
    chosen = {"patience": int(best["threshold"])} if rule == "patience" else {"threshold": best["threshold"]}
    model.exit_config = ExitConfig(rule=rule, min_layer=min_layer, **chosen)
    return CalibrationResult(
        rule=rule,
        chosen=best["threshold"],
        full_accuracy=full_accuracy,
        accuracy=best["accuracy"],
        mean_exit_layer=best["mean_exit_layer"],
        expected_speedup=best["expected_speedup"],
        num_layers=num_layers,
        curve=curve,
    )


def _fastest_admissible(curve: list[dict[str, float]], min_accuracy: float) -> dict[str, float]:
    """The point of lowest mean exit layer (then highest accuracy) whose accuracy is at least `min_accuracy`.

    Raises:
        ValueError: when no point is admissible.
    """
    admissible = [point for point in curve if point["accuracy"] >= min_accuracy - 1e-12]
    if not admissible:
        raise ValueError(
            "no candidate setting keeps accuracy within `max_accuracy_drop`; include a setting that never exits "
            "(threshold 1.0 for confidence, 0.0 for entropy) or raise the drop."
        )
    return min(admissible, key=lambda point: (point["mean_exit_layer"], -point["accuracy"]))


def _curve_point(
    layer_logits: torch.Tensor, labels: torch.Tensor, rule: str, value: float, min_layer: int
) -> dict[str, float]:
    """Accuracy, mean exit layer and expected speed-up of one candidate setting, simulated on every layer's logits."""
    setting = {"patience": int(value)} if rule == "patience" else {"threshold": float(value)}
    logits, exit_layers = simulate_exits(layer_logits, ExitConfig(rule=rule, min_layer=min_layer, **setting))
    mean_exit_layer = exit_layers.float().mean().item()
    return {
        "threshold": float(value),
        "accuracy": (logits.argmax(-1) == labels).float().mean().item(),
        "mean_exit_layer": mean_exit_layer,
        "expected_speedup": layer_logits.shape[0] / mean_exit_layer,
    }


def _default_candidates(layer_logits: torch.Tensor, rule: str, count: int) -> list[float]:
    """Quantiles of the observed scores (so every candidate changes some decision), plus a never-exit setting."""
    num_layers = layer_logits.shape[0]
    if rule == "patience":
        return list(range(1, num_layers))
    scores = exit_scores(layer_logits[:-1].reshape(-1, layer_logits.shape[-1]), rule).double()
    quantiles = torch.quantile(scores, torch.linspace(0, 1, count, dtype=torch.float64)).tolist()
    never = 1.0 if rule == "confidence" else 0.0
    return sorted({round(value, 6) for value in quantiles if 0.0 < value < 1.0} | {never}, reverse=rule == "entropy")
