"""Scoring an exit setting on labelled data (accuracy against full depth, where samples leave, the speed-up), and the
calibrate-then-score step of the example scripts."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .calibration import DEFAULT_CALIBRATION_RULE, CalibrationResult, calibrate_exits, labelled_accuracies
from .data import eval_mode, iter_model_batches
from .exits import ExitConfig
from .risk_control import minimum_samples


@dataclass
class ExitEvaluation:
    """How an exit setting does on a labelled split, against the full forward.

    Attributes:
        exit_config: the setting evaluated (`ExitConfig.to_dict()`).
        num_samples: samples scored (labels of -100 are left out of the accuracies, not of the speed).
        full_accuracy: accuracy at full depth.
        accuracy: accuracy with early exit.
        accuracy_drop: `full_accuracy - accuracy`.
        disagreement: share of samples whose early-exit prediction differs from the full-depth one.
        mean_exit_layer: mean 1-based exit layer.
        exit_histogram: number of samples leaving after each layer, layer 1 first.
        ideal_speedup: L / mean exit layer (blocks computed).
        measured_speedup: wall-clock time of the full forward over that of `early_exit_predict` on the same
            batches, timed alternately (best of `repeats` each); `None` when not measured.
    """

    exit_config: dict[str, Any]
    num_samples: int
    full_accuracy: float | None
    accuracy: float | None
    accuracy_drop: float | None
    disagreement: float
    mean_exit_layer: float
    exit_histogram: list[int]
    ideal_speedup: float
    measured_speedup: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_exits(
    model,
    dataset: Any,
    exit_config: ExitConfig | None = None,
    *,
    batch_size: int = 32,
    collate_fn: Callable | None = None,
    measure_speed: bool = True,
    repeats: int = 3,
) -> ExitEvaluation:
    """Scores an exit setting (default: `model.exit_config`) on a labelled split, as serving would run it.

    Every batch runs through `early_exit_predict` (the online path, which really skips the blocks of samples that
    left) and through the full forward; predictions are compared with the labels and with each other. With
    `measure_speed`, the two are timed alternately over all batches, `repeats` times each, and the ratio of their
    best times is the measured speed-up (run it on an idle machine, with the batch size you serve with).

    Args:
        model: an [`AlignedForSequenceClassification`].
        dataset: evaluation data: a processed `datasets.Dataset` or an iterable of dict batches (labels optional;
            without them only the disagreement, exit layers and speed are reported).
        exit_config: the setting to score; `model.exit_config` by default.
        batch_size: batch size (also the one timed).
        collate_fn: how to batch dataset rows (e.g. `DataCollatorWithPadding(tokenizer)`).
        measure_speed: whether to time the two paths.
        repeats: timed runs of each path when measuring speed.

    Returns:
        An [`ExitEvaluation`].
    """
    if repeats < 1:
        raise ValueError(f"`repeats` must be a positive integer, got {repeats}.")
    exit_config = exit_config or model.exit_config
    exit_config.validate(model.num_layers)
    batches = list(iter_model_batches(model, dataset, batch_size, collate_fn))
    if not batches:
        raise ValueError("`dataset` yielded no samples.")
    with eval_mode(model), torch.no_grad():
        full = torch.cat([model(**inputs, early_exit=False).logits.argmax(-1).cpu() for inputs, _ in batches])
        outputs = [model.early_exit_predict(**inputs, exit_config=exit_config) for inputs, _ in batches]
        measured = _speedup(model, batches, exit_config, repeats) if measure_speed else None
    predictions = torch.cat([output.predictions.cpu() for output in outputs])
    exit_layers = torch.cat([output.exit_layers.cpu() for output in outputs])
    labels = None if any(y is None for _, y in batches) else torch.cat([y.cpu() for _, y in batches])
    accuracies, full_accuracy = labelled_accuracies(predictions[None], full, labels)
    accuracy = None if accuracies is None else accuracies[0]
    mean_exit_layer = exit_layers.float().mean().item()
    return ExitEvaluation(
        exit_config=exit_config.to_dict(),
        num_samples=len(predictions),
        full_accuracy=full_accuracy,
        accuracy=accuracy,
        accuracy_drop=None if accuracy is None else full_accuracy - accuracy,
        disagreement=(predictions != full).float().mean().item(),
        mean_exit_layer=mean_exit_layer,
        exit_histogram=torch.bincount(exit_layers - 1, minlength=model.num_layers).tolist(),
        ideal_speedup=model.num_layers / mean_exit_layer,
        measured_speedup=measured,
    )


def _speedup(model, batches, exit_config: ExitConfig, repeats: int) -> float:
    """Best full-forward time over best early-exit time, the two run alternately over the same batches."""
    runs = (
        lambda: [model(**inputs, early_exit=False) for inputs, _ in batches],
        lambda: [model.early_exit_predict(**inputs, exit_config=exit_config) for inputs, _ in batches],
    )
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for index, run in enumerate(runs):
            start = time.perf_counter()
            run()
            best[index] = min(best[index], time.perf_counter() - start)
    return best[0] / best[1]


@dataclass
class ExitCalibrationArguments:
    """Calibration options of the example scripts (`HfArgumentParser` reads them as `--max_accuracy_drop` ...).

    Attributes:
        calibration_split_percentage: percentage of the training data held out (never trained on) to calibrate the
            exits on; 0 (default) calibrates nothing unless the script gets a calibration file.
        max_accuracy_drop: the tolerated risk epsilon (`calibrate_exits`).
        calibration_delta: the allowed probability that the promise fails.
        calibration_risk: `"consistency"` or `"accuracy"`.
        calibration_method: `"ltt"` (certified) or `"empirical"` (no guarantee).
        exit_rule: the exit score calibrated.
    """

    calibration_split_percentage: float = field(
        default=0.0,
        metadata={"help": "Percentage of the training data held out to calibrate the exits on (0: none)."},
    )
    max_accuracy_drop: float = field(default=0.01, metadata={"help": "Tolerated risk epsilon (0.01 = 1 point)."})
    calibration_delta: float = field(default=0.1, metadata={"help": "Allowed probability that the promise fails."})
    calibration_risk: str = field(default="consistency", metadata={"help": "'consistency' or 'accuracy'."})
    calibration_method: str = field(default="ltt", metadata={"help": "'ltt' (certified) or 'empirical'."})
    exit_rule: str = field(default=DEFAULT_CALIBRATION_RULE, metadata={"help": "The exit score calibrated."})

    def check_size(self, num_samples: int) -> None:
        """Fails before training when the calibration split is too small for the requested guarantee.

        Raises:
            ValueError: giving the number of samples needed.
        """
        if self.calibration_method != "ltt" or num_samples == 0:
            return
        needed = minimum_samples(self.max_accuracy_drop, self.calibration_delta)
        if num_samples < needed:
            raise ValueError(
                f"the calibration split has {num_samples} samples; a guarantee at max_accuracy_drop="
                f"{self.max_accuracy_drop} and calibration_delta={self.calibration_delta} needs at least {needed}. "
                "Raise --calibration_split_percentage, pass a larger calibration file, or relax the guarantee."
            )


def calibrate_and_evaluate(
    model,
    calibration: Any,
    evaluation: Any,
    arguments: ExitCalibrationArguments | None = None,
    *,
    collate_fn: Callable | None = None,
    batch_size: int = 32,
    output_dir: str | os.PathLike | None = None,
) -> tuple[CalibrationResult, ExitEvaluation]:
    """Calibrates the exits on one split and scores the chosen setting on another; the whole job of the examples.

    With `output_dir`, writes `exit_config.json` (the setting and its guarantee), `calibration.json` (every setting
    tried, which the model card reads) and `exit_evaluation.json` (the scores) there.

    Returns:
        The [`CalibrationResult`] and the [`ExitEvaluation`] on `evaluation` (with the measured speed-up).
    """
    arguments = arguments or ExitCalibrationArguments()
    result = calibrate_exits(
        model,
        calibration,
        max_accuracy_drop=arguments.max_accuracy_drop,
        delta=arguments.calibration_delta,
        risk=arguments.calibration_risk,
        method=arguments.calibration_method,
        rule=arguments.exit_rule,
        batch_size=batch_size,
        collate_fn=collate_fn,
    )
    scores = evaluate_exits(model, evaluation, batch_size=batch_size, collate_fn=collate_fn)
    if output_dir is not None:
        model.exit_config.save_pretrained(output_dir)
        result.save(os.path.join(output_dir, "calibration.json"))
        with open(os.path.join(output_dir, "exit_evaluation.json"), "w", encoding="utf-8") as handle:
            json.dump({**scores.to_dict(), "guarantee": result.guarantee()}, handle, indent=2)
    return result, scores


def format_exit_report(result: CalibrationResult, scores: ExitEvaluation) -> str:
    """Lines for a console: the calibrated setting and its guarantee, then full vs early-exit accuracy, mean exit
    layer and ideal / measured speed-up on the evaluation split."""
    accuracy = (
        f"accuracy {scores.full_accuracy:.4f} at full depth, {scores.accuracy:.4f} with early exit "
        f"(drop {scores.accuracy_drop * 100:+.2f} pt); "
        if scores.accuracy is not None
        else ""
    )
    measured = f", measured {scores.measured_speedup:.2f}x" if scores.measured_speedup is not None else ""
    return (
        f"exits: {result!r}\n"
        f"evaluation ({scores.num_samples} samples): {accuracy}mean exit layer {scores.mean_exit_layer:.2f}, "
        f"speed-up {scores.ideal_speedup:.2f}x ideal{measured}"
    )
