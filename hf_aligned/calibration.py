"""Choosing an exit setting from data: the fastest one whose risk on new data is certified, or (without a guarantee)
the fastest one within a tolerated drop on the calibration data itself.

The default, `method="ltt"`, is Learn-then-Test: a grid of settings fixed before seeing the data is tested from the
most conservative setting down with exact binomial p-values (`risk_control`), and the fastest setting certified is
chosen. With probability at least `1 - delta` over the calibration sample, its risk on new inputs exchangeable with
the calibration inputs is at most `max_accuracy_drop`.

In detail, `calibrate_exits(method="ltt")` tests the settings of [`calibration_grid`] (or `thresholds`, which must be
fixed before seeing the data) from the most conservative down, stops at the first it cannot certify, and picks the
certified setting with the lowest mean exit layer. `method="empirical"` picks the fastest setting whose risk *on the
calibration data* is within `max_accuracy_drop` (for `risk="accuracy"`: the net accuracy drop); it has **no
guarantee**: on new data the drop exceeds the tolerance about half the time.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .data import collect_layer_logits
from .exits import THRESHOLD_RULES, ExitConfig, exit_scores, simulate_exits
from .risk_control import binomial_p_values, clopper_pearson_upper, fixed_sequence_test, minimum_samples

logger = logging.getLogger(__name__)

CALIBRATION_RULES = ("confidence", "margin", "entropy", "agreement", "patience")
# The exit score calibrated by default: the highest certified speed-up on SST-2 (tied with confidence and entropy:
# with two classes they order samples alike) and on AG News (benchmarks/calibration.py, docs/early_exit.md).
DEFAULT_CALIBRATION_RULE = "margin"
CALIBRATION_METHODS = ("ltt", "empirical")
RISKS = ("consistency", "accuracy")
IGNORE_INDEX = -100
# The fixed grid: thresholds at geometric distances from the never-exiting end of each score.
GRID_SIZE = 100
GRID_RANGE = (1e-6, 0.99)
GRID_STEP = 0.005


@dataclass
class CalibrationResult:
    """The exit setting chosen from calibration data, what it promises, and the trade-off of every setting tried.

    Attributes:
        rule: the exit rule calibrated.
        chosen: the chosen threshold (or patience); `None` when no setting that exits early could be certified
            (the model then never exits early).
        full_accuracy: accuracy at full depth on the labelled calibration samples (`None` without labels).
        accuracy: accuracy with the chosen setting on them (`None` without labels).
        mean_exit_layer: mean exit layer with the chosen setting.
        expected_speedup: L / mean exit layer (blocks computed, not wall-clock time).
        num_layers: the model's depth L.
        method: `"ltt"` (certified) or `"empirical"` (no guarantee).
        risk: `"consistency"` (exit prediction differs from full depth) or `"accuracy"` (exit wrong where full
            depth is right; for `"empirical"`: the net accuracy drop).
        max_accuracy_drop: the tolerated risk epsilon, a fraction.
        delta: the allowed probability that the promise fails (`"ltt"` only).
        num_samples: samples the risk was measured on (labelled ones for `risk="accuracy"`).
        empirical_risk: the chosen setting's risk on the calibration samples.
        risk_bound: its `1 - delta` Clopper-Pearson upper bound (`"ltt"` only; at most `max_accuracy_drop`).
        min_layer: the first layer samples may leave at.
        curve: one dict per setting tried (`threshold`, `accuracy`, `risk`, `mean_exit_layer`, `expected_speedup`,
            and `p_value` for `"ltt"`), in the order tested.
    """

    rule: str
    chosen: float | None
    full_accuracy: float | None
    accuracy: float | None
    mean_exit_layer: float
    expected_speedup: float
    num_layers: int
    method: str = "empirical"
    risk: str = "accuracy"
    max_accuracy_drop: float = 0.01
    delta: float | None = None
    num_samples: int = 0
    empirical_risk: float = 0.0
    risk_bound: float | None = None
    min_layer: int = 1
    curve: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def __repr__(self) -> str:
        chosen = "never exits" if self.chosen is None else f"{_parameter(self.rule)}={self.chosen:g}"
        return (
            f"CalibrationResult(rule={self.rule!r}, {chosen}, mean exit layer {self.mean_exit_layer:.2f} of "
            f"{self.num_layers} ({self.expected_speedup:.2f}x): {self.guarantee()})"
        )

    def guarantee(self) -> str:
        """The promise in one sentence, e.g. "disagrees with full depth on at most 1% of inputs, with 90%
        confidence, calibrated on 1,000 samples (for new inputs exchangeable with them)"."""
        return describe_guarantee(self.to_dict())

    def to_exit_config(self) -> ExitConfig:
        """The chosen setting as an [`ExitConfig`] carrying its calibration record (never exits when `chosen` is
        `None`)."""
        record = {name: getattr(self, name) for name in CALIBRATION_RECORD}
        if self.chosen is None:
            return ExitConfig(min_layer=self.min_layer, calibration=record)
        return ExitConfig(
            rule=self.rule, min_layer=self.min_layer, calibration=record, **_setting(self.rule, self.chosen)
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the result as JSON."""
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2)


# What `exit_config.json` keeps of a calibration (`ExitConfig.calibration`).
CALIBRATION_RECORD = (
    "method",
    "risk",
    "max_accuracy_drop",
    "delta",
    "num_samples",
    "empirical_risk",
    "risk_bound",
)


def describe_guarantee(record: dict[str, Any]) -> str:
    """The promise of a calibration record (`CalibrationResult.to_dict()` or `ExitConfig.calibration`) in words."""
    epsilon, samples = f"{record['max_accuracy_drop'] * 100:g}%", f"{record['num_samples']:,}"
    if record["method"] != "ltt":
        what = "accuracy" if record["risk"] == "accuracy" else "agreement with full depth"
        return (
            f"has no guarantee: its {what} was within {epsilon} of full depth on the {samples} calibration samples "
            "only (method='empirical')"
        )
    if record["risk"] == "consistency":
        claim = f"disagrees with full depth on at most {epsilon} of inputs"
    else:
        claim = (
            f"is wrong where full depth is right on at most {epsilon} of inputs (so loses at most {epsilon} accuracy)"
        )
    return (
        f"{claim}, with {(1 - record['delta']) * 100:g}% confidence, calibrated on {samples} samples "
        "(for new inputs exchangeable with them)"
    )


def _parameter(rule: str) -> str:
    return "patience" if rule == "patience" else "threshold"


def _setting(rule: str, value: float) -> dict[str, Any]:
    return {"patience": int(value)} if rule == "patience" else {"threshold": float(value)}


def calibration_grid(rule: str, num_layers: int, num_thresholds: int = GRID_SIZE) -> list[float]:
    """The settings Learn-then-Test tests, fixed before seeing data, most conservative first.

    Thresholds: `num_thresholds` at geometric distances (1e-6 to 0.99) from the end where nothing exits, which
    resolve the confident end, plus every multiple of 0.005 in (0, 1), which resolves the middle: from 0.999999 down
    to 0.005 for `"confidence"`, `"margin"` and `"agreement"`, from 1e-6 up to 0.995 for `"entropy"`. Patience runs
    from L - 1 (never before the last layer) down to 1.
    """
    if rule == "patience":
        return list(range(num_layers - 1, 0, -1))
    distances = {round(float(value), 9) for value in np.geomspace(*GRID_RANGE, num_thresholds)}
    distances |= {round(step * GRID_STEP, 9) for step in range(1, round(1 / GRID_STEP))}
    if not THRESHOLD_RULES[rule]:
        return sorted(distances)
    return sorted({round(1.0 - value, 9) for value in distances}, reverse=True)


def exit_outcomes(
    layer_logits: torch.Tensor, rule: str, values: Sequence[float], min_layer: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prediction and exit layer of every sample under each setting, as early exit decides them online.

    Args:
        layer_logits: `(num_layers, num_samples, num_labels)` logits of every layer.
        rule: the exit rule.
        values: its thresholds (or patiences).
        min_layer: the first layer samples may leave at.

    Returns:
        `(len(values), num_samples)` predicted classes and 1-based exit layers.
    """
    predictions, exit_layers = [], []
    for value in values:
        logits, layers = simulate_exits(
            layer_logits, ExitConfig(rule=rule, min_layer=min_layer, **_setting(rule, value))
        )
        predictions.append(logits.argmax(-1))
        exit_layers.append(layers)
    return torch.stack(predictions), torch.stack(exit_layers)


def exit_losses(
    predictions: torch.Tensor, full_predictions: torch.Tensor, labels: torch.Tensor | None, risk: str
) -> torch.Tensor:
    """Per setting and sample, whether the exit setting incurs the risk's loss (boolean, `predictions`' shape).

    `"consistency"`: the exit prediction differs from the full-depth one; `"accuracy"`: it is wrong where the
    full-depth prediction is right. Samples labelled -100 never incur the accuracy loss (drop them before counting).
    """
    if risk == "consistency":
        return predictions != full_predictions
    return (predictions != labels) & (full_predictions == labels)


def calibrate_exits(
    model=None,
    dataset: Any = None,
    *,
    layer_logits: torch.Tensor | np.ndarray | None = None,
    labels: torch.Tensor | np.ndarray | Sequence[int] | None = None,
    max_accuracy_drop: float = 0.01,
    delta: float = 0.1,
    risk: str = "consistency",
    method: str = "ltt",
    rule: str = DEFAULT_CALIBRATION_RULE,
    thresholds: Sequence[float] | None = None,
    min_layer: int = 1,
    batch_size: int = 32,
    collate_fn: Callable | None = None,
    num_thresholds: int = GRID_SIZE,
) -> CalibrationResult:
    """Chooses the fastest exit setting whose risk on new data is at most `max_accuracy_drop`, with confidence
    `1 - delta` (`method="ltt"`), and stores it in `model.exit_config`. The model runs once over the data at full
    depth; each setting is then applied offline as early exit applies it online (the methods: the module docstring).

    Args:
        model: an [`AlignedForSequenceClassification`] (shared classifier or per-layer heads); optional with
            `layer_logits` (the result's `to_exit_config()` gives the setting).
        dataset: calibration data: a `datasets.Dataset` or dict batches; labels optional for `risk="consistency"`.
        layer_logits: instead of `dataset`: stored `(num_layers, num_samples, num_labels)` logits, as
            `model(..., output_layer_logits=True).layer_logits` stacks them (`Trainer.predict` gives
            `(num_samples, num_layers, num_labels)`: transpose its first two axes).
        labels: with `layer_logits`: the `(num_samples,)` labels, if any.
        max_accuracy_drop: the tolerated risk epsilon, a fraction (0.01 = one point).
        delta: the allowed probability that the promise fails (`"ltt"`), in (0, 1).
        risk: `"consistency"` (exit prediction differs from full depth; needs no labels, and bounds the accuracy
            drop too) or `"accuracy"` (exit wrong where full depth is right; needs labels).
        method: `"ltt"` or `"empirical"`.
        rule: `"margin"` (default: top-1 minus top-2 probability, the most speed-up certified in the benchmark),
            `"confidence"`, `"entropy"`, `"agreement"` or `"patience"`.
        thresholds: candidates (or patiences); default [`calibration_grid`] (`"ltt"`) or score quantiles.
        min_layer: the first layer samples may leave at.
        batch_size, collate_fn: how `dataset` is batched (e.g. `DataCollatorWithPadding(tokenizer)`).
        num_thresholds: the grid size (`"ltt"`) or number of score quantiles (`"empirical"`).

    Returns:
        A [`CalibrationResult`]: the chosen setting, its guarantee and the curve of every setting tried.

    Raises:
        ValueError: for an unknown rule, method or risk, a level outside (0, 1), `risk="accuracy"` without labels,
            inconsistent inputs, or (`"ltt"`) fewer samples than any certificate needs (~ln(1/delta) / epsilon).
    """
    _check_choices(rule, method, risk, max_accuracy_drop, delta)
    layer_logits, labels = _calibration_logits(model, dataset, layer_logits, labels, batch_size, collate_fn)
    layer_logits, labels = _checked_samples(model, layer_logits, labels, risk, method, max_accuracy_drop, delta)
    thresholds = _candidates(layer_logits, rule, method, thresholds, num_thresholds)
    result = _choose(layer_logits, labels, rule, thresholds, min_layer, risk, method, max_accuracy_drop, delta)
    if model is not None:
        model.exit_config = result.to_exit_config()
    if result.chosen is None:
        logger.warning(
            "No setting that exits early could be certified (%s); it never exits early.", result.guarantee()
        )
    return result


def _checked_samples(model, layer_logits, labels, risk: str, method: str, max_accuracy_drop: float, delta: float):
    """The samples the risk is measured on, after checking the logits fit the model and (`"ltt"`) are enough.

    Raises:
        ValueError: for logits of another depth than the model's, or too few samples for any certificate.
    """
    if model is not None and layer_logits.shape[0] != model.num_layers:
        raise ValueError(f"`layer_logits` has {layer_logits.shape[0]} layers, the model {model.num_layers}.")
    layer_logits, labels = _samples_at_risk(layer_logits, labels, risk)
    if method == "ltt":
        _check_enough(layer_logits.shape[1], max_accuracy_drop, delta, risk)
    return layer_logits, labels


def _candidates(
    layer_logits: torch.Tensor, rule: str, method: str, thresholds: Sequence[float] | None, count: int
) -> list[float]:
    """The settings to try: the given `thresholds` in testing order, else the fixed grid (`"ltt"`) or quantiles of the
    scores seen on the data (`"empirical"`)."""
    if thresholds is not None:
        return _ordered(rule, thresholds)
    if method == "ltt":
        return calibration_grid(rule, layer_logits.shape[0], count)
    return _quantile_candidates(layer_logits, rule, count)


def _check_enough(num_samples: int, max_accuracy_drop: float, delta: float, risk: str) -> None:
    needed = minimum_samples(max_accuracy_drop, delta)
    if num_samples < needed:
        raise ValueError(
            f"calibrating with max_accuracy_drop={max_accuracy_drop} and delta={delta} needs at least {needed} "
            f"{'labelled ' if risk == 'accuracy' else ''}samples (ln(1/delta) / -ln(1 - max_accuracy_drop)); got "
            f"{num_samples}. Pass more data, raise max_accuracy_drop or delta, or use method='empirical' (no "
            "guarantee)."
        )


def _check_choices(rule: str, method: str, risk: str, max_accuracy_drop: float, delta: float) -> None:
    if rule not in CALIBRATION_RULES:
        raise ValueError(f"`rule={rule!r}` cannot be calibrated; use one of {CALIBRATION_RULES}.")
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"`method={method!r}` is not a calibration method; use one of {CALIBRATION_METHODS}.")
    if risk not in RISKS:
        raise ValueError(f"`risk={risk!r}` is not a risk; use one of {RISKS}.")
    if isinstance(max_accuracy_drop, bool) or not 0.0 <= max_accuracy_drop <= 1.0:
        raise ValueError(f"`max_accuracy_drop={max_accuracy_drop}` is a fraction of accuracy between 0 and 1.")
    if method == "ltt" and not 0.0 < max_accuracy_drop < 1.0:
        raise ValueError(
            f"`max_accuracy_drop={max_accuracy_drop}` must lie strictly between 0 and 1 for method='ltt'."
        )
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 < delta < 1.0:
        raise ValueError(f"`delta={delta!r}` is a probability strictly between 0 and 1 (0.1: 90% confidence).")


def _calibration_logits(model, dataset, layer_logits, labels, batch_size, collate_fn):
    """`(layer_logits [L, N, C] float, labels [N] long or None)` from the dataset or from the stored logits."""
    if (dataset is None) == (layer_logits is None):
        raise ValueError("pass either `dataset` (the model runs over it) or `layer_logits` (stored logits), not both.")
    if dataset is not None:
        if model is None:
            raise ValueError("calibrating on a `dataset` needs the `model`; or pass stored `layer_logits`.")
        if labels is not None:
            raise ValueError("`labels` go with `layer_logits`; a `dataset` carries its own labels.")
        return collect_layer_logits(model, dataset, batch_size=batch_size, collate_fn=collate_fn)
    layer_logits = torch.as_tensor(np.asarray(layer_logits) if not torch.is_tensor(layer_logits) else layer_logits)
    if layer_logits.dim() != 3 or not layer_logits.is_floating_point():
        raise ValueError(
            f"`layer_logits` must be floating-point logits shaped (num_layers, num_samples, num_labels), got shape "
            f"{tuple(layer_logits.shape)}."
        )
    if labels is not None:
        labels = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels).long().reshape(-1)
        if labels.shape[0] != layer_logits.shape[1]:
            raise ValueError(
                f"`labels` has {labels.shape[0]} entries but `layer_logits` {layer_logits.shape[1]} samples (axis 1); "
                "`Trainer.predict` gives (num_samples, num_layers, num_labels): transpose its first two axes."
            )
    return layer_logits.float().cpu(), labels


def _samples_at_risk(layer_logits: torch.Tensor, labels: torch.Tensor | None, risk: str):
    """The samples the risk is measured on: all of them for consistency, the labelled ones (not -100) for accuracy."""
    if labels is not None and bool((labels == IGNORE_INDEX).all()):
        labels = None
    if risk == "consistency":
        return layer_logits, labels
    if labels is None:
        raise ValueError(
            "risk='accuracy' needs labelled data (a `labels` or `label` column, or `labels=`); use "
            "risk='consistency', which needs no labels."
        )
    keep = labels != IGNORE_INDEX
    return layer_logits[:, keep], labels[keep]


def _ordered(rule: str, thresholds: Sequence[float]) -> list[float]:
    """Given candidates, most conservative first (the order Learn-then-Test tests them in)."""
    values = [float(value) for value in thresholds]
    if not values:
        raise ValueError("`thresholds` is empty; pass at least one candidate setting, or None for the default grid.")
    return sorted(values, reverse=rule == "patience" or THRESHOLD_RULES.get(rule, True))


def _quantile_candidates(layer_logits: torch.Tensor, rule: str, count: int) -> list[float]:
    """`method="empirical"`'s candidates: quantiles of the observed scores (so every candidate changes some
    decision), plus the setting that never exits; most conservative first."""
    num_layers = layer_logits.shape[0]
    if rule == "patience":
        return list(range(num_layers - 1, 0, -1)) or [1]
    if num_layers < 2:
        return [1.0 if THRESHOLD_RULES[rule] else 0.0]
    scores = exit_scores(layer_logits[:-1].reshape(-1, layer_logits.shape[-1]), rule).double()
    quantiles = torch.quantile(scores, torch.linspace(0, 1, count, dtype=torch.float64)).tolist()
    sure = THRESHOLD_RULES[rule]
    never = 1.0 if sure else 0.0
    return sorted({round(value, 6) for value in quantiles if 0.0 < value < 1.0} | {never}, reverse=sure)


def _choose(layer_logits, labels, rule, values, min_layer, risk, method, epsilon, delta) -> CalibrationResult:
    """Applies every setting, measures its risk and picks the fastest admissible one (see `calibrate_exits`)."""
    num_layers = layer_logits.shape[0]
    full = layer_logits[-1].argmax(-1)
    predictions, exit_layers = exit_outcomes(layer_logits, rule, values, min_layer)
    counts = exit_losses(predictions, full, labels, risk).sum(1).numpy()
    num_samples = predictions.shape[1]
    mean_layers = exit_layers.float().mean(1).tolist()
    accuracies, full_accuracy = labelled_accuracies(predictions, full, labels)
    if method == "ltt":
        p_values = binomial_p_values(counts, num_samples, epsilon)
        admissible = list(range(int(fixed_sequence_test(p_values, delta))))
        rates = (counts / num_samples).tolist()
    else:
        p_values = None
        rates = (
            [full_accuracy - accuracy for accuracy in accuracies]
            if risk == "accuracy"
            else (counts / num_samples).tolist()
        )
        admissible = [index for index, rate in enumerate(rates) if rate <= epsilon + 1e-12]
        if not admissible:
            raise ValueError(
                "no candidate setting keeps the risk within `max_accuracy_drop`; include a setting that never exits "
                "(threshold 1.0 for confidence, 0.0 for entropy) or raise the drop."
            )
    curve = _curve(values, accuracies, rates, mean_layers, num_layers, p_values)
    best = min(admissible, key=lambda index: (mean_layers[index], rates[index], index)) if admissible else None
    point = (
        curve[best] if best is not None else {"accuracy": full_accuracy, "risk": 0.0, "mean_exit_layer": num_layers}
    )
    return CalibrationResult(
        rule=rule,
        chosen=None if best is None else values[best],
        full_accuracy=full_accuracy,
        accuracy=point["accuracy"],
        mean_exit_layer=point["mean_exit_layer"],
        expected_speedup=num_layers / point["mean_exit_layer"],
        num_layers=num_layers,
        method=method,
        risk=risk,
        max_accuracy_drop=epsilon,
        delta=delta if method == "ltt" else None,
        num_samples=num_samples,
        empirical_risk=point["risk"],
        risk_bound=(
            clopper_pearson_upper(int(counts[best]) if best is not None else 0, num_samples, delta)
            if method == "ltt"
            else None
        ),
        min_layer=min_layer,
        curve=curve,
    )


def _curve(values, accuracies, rates, mean_layers, num_layers, p_values) -> list[dict[str, Any]]:
    """One point per setting tried, in the order tested."""
    return [
        {
            "threshold": value,
            "accuracy": None if accuracies is None else accuracies[index],
            "risk": rates[index],
            "mean_exit_layer": mean_layers[index],
            "expected_speedup": num_layers / mean_layers[index],
            **({} if p_values is None else {"p_value": float(p_values[index])}),
        }
        for index, value in enumerate(values)
    ]


def labelled_accuracies(predictions: torch.Tensor, full: torch.Tensor, labels: torch.Tensor | None):
    """Each setting's accuracy (`predictions` is `(settings, samples)`) and the full-depth accuracy, on the samples
    labelled other than -100; `(None, None)` without labels or with none counted."""
    if labels is None:
        return None, None
    labelled = labels != IGNORE_INDEX
    if not bool(labelled.any()):
        return None, None
    truth = labels[labelled]
    accuracies = (predictions[:, labelled] == truth).float().mean(1).tolist()
    return accuracies, (full[labelled] == truth).float().mean().item()
