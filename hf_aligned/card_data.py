"""What a model card shows beyond the model's config, and where it is read from.

[`AlignedModelCardData`] gathers the plain data of a card (evaluation metrics, exit rule and calibration, training
arguments, plots, dataset and license), fills what is unset from a saved model directory, and these helpers turn it
into per-layer results and formatted cells. `model_card.py` renders it with a template per model kind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .exits import EXIT_CONFIG_NAME

LIBRARY_NAME = "hf-aligned"

DEFAULT_TAGS = (LIBRARY_NAME, "aligned-training", "multi-exit", "early-exit")

MODEL_CARD_NAME = "README.md"

# Where a saved model directory keeps its exit calibration (`CalibrationResult.save`).
CALIBRATION_NAME = "calibration.json"

# Written by `Trainer.save_metrics`; when both exist, the later file wins.
RESULTS_FILES = ("all_results.json", "eval_results.json")

# Names that are data files, never Hub dataset ids.
DATA_FILE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt", ".arrow")
PLOT_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg", ".gif")

# Standard `TrainingArguments` fields a card lists; fields that a subclass adds (aligned options) are listed too.
TRAINING_ARGUMENTS_SHOWN = (
    "learning_rate",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "warmup_steps",
    "weight_decay",
    "lr_scheduler_type",
    "optim",
    "seed",
    "bf16",
    "fp16",
)


@dataclasses.dataclass
class AlignedModelCardData:
    """What a model card says beyond the model's config; every field is optional.

    Args:
        model_id: the Hub repository id (or name) used in the title, the usage snippet and the `model-index`.
        base_model: the Hub id of the base model. Defaults to the base checkpoint recorded in the config, when that
            is a Hub id rather than a local folder.
        datasets: Hub ids of the training datasets (card metadata).
        dataset_name: a readable dataset name for the text and the `model-index`. Defaults to `datasets[0]`.
        eval_split: the split the per-layer results were measured on.
        language: language code(s) of the training data.
        license: the license of the weights.
        tags: extra Hub tags, added to hf_aligned's own.
        eval_metrics: evaluation metrics as the trainer reports them: `{prefix}_layer_{l}_{metric}` for every
            layer (1-based) and metric, `{prefix}_minimal_depth`; other keys are ignored.
        metric_prefix: the prefix of `eval_metrics` keys (`"eval"`, or `"test"` for `Trainer.predict`).
        minimal_depth: the minimal depth the task needs. Defaults to `eval_metrics["{prefix}_minimal_depth"]`.
        exit_config: the saved exit rule: an `ExitConfig` or its `to_dict()`. Defaults to the model's.
        calibration: the exit calibration: a `CalibrationResult` or its `to_dict()`, i.e. a `curve` (one dict per
            setting tried, with `threshold`, `accuracy`, `mean_exit_layer`, `expected_speedup`) and optionally
            `rule`, `chosen` (the chosen threshold or patience) and `full_accuracy`.
        training_args: training arguments, e.g. `TrainingArguments.to_dict()`; the card lists the usual
            optimization settings and every field a `TrainingArguments` subclass adds.
        plots: image paths inside the repository (e.g. `"plots/cka.png"`) shown on the card.
    """

    model_id: str | None = None
    base_model: str | None = None
    datasets: list[str] | None = None
    dataset_name: str | None = None
    eval_split: str | None = None
    language: str | list[str] | None = None
    license: str | None = None
    tags: list[str] | None = None
    eval_metrics: dict[str, Any] | None = None
    metric_prefix: str = "eval"
    minimal_depth: int | None = None
    exit_config: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    training_args: dict[str, Any] | None = None
    plots: list[str] | None = None

    def __post_init__(self):
        if isinstance(self.datasets, str):
            self.datasets = [self.datasets]
        if isinstance(self.tags, str):
            self.tags = [self.tags]
        self.exit_config = as_dict(self.exit_config, "exit_config")
        self.calibration = as_dict(self.calibration, "calibration")
        for name in ("eval_metrics", "training_args"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping):
                raise TypeError(f"`{name}` must be a dict, got {type(value).__name__}.")
        curve = (self.calibration or {}).get("curve", [])
        if isinstance(curve, (str, Mapping)) or not isinstance(curve, Sequence):
            raise TypeError(f"`calibration['curve']` must be a list of dicts (one per setting), got {curve!r}.")

    def fill_from_directory(self, model_dir: str | os.PathLike) -> AlignedModelCardData:
        """A copy whose unset fields are read from a saved model directory.

        Reads the evaluation metrics written by `Trainer.save_metrics` (`all_results.json`, `eval_results.json`),
        the exit rule (`exit_config.json`), the exit calibration (`calibration.json`, as `CalibrationResult.save`
        writes it) and the images at the top level or in `plots/`.
        """
        model_dir = Path(model_dir)
        filled = {}
        if self.eval_metrics is None:
            metrics = {}
            for name in RESULTS_FILES:
                metrics.update(read_json(model_dir / name) or {})
            filled["eval_metrics"] = metrics or None
        if self.exit_config is None:
            filled["exit_config"] = read_json(model_dir / EXIT_CONFIG_NAME)
        if self.calibration is None:
            filled["calibration"] = read_json(model_dir / CALIBRATION_NAME)
        if self.plots is None:
            images = [
                path
                for path in (*model_dir.glob("*"), *model_dir.glob("plots/*"))
                if path.is_file() and path.suffix.lower() in PLOT_SUFFIXES
            ]
            filled["plots"] = sorted(path.relative_to(model_dir).as_posix() for path in images) or None
        return dataclasses.replace(self, **filled)


def layer_metrics(metrics: Mapping[str, Any], prefix: str = "eval") -> dict[int, dict[str, float]]:
    """Groups `{prefix}_layer_{l}_{metric}` entries by layer: `{l: {metric: value}}`, layers in ascending order."""
    pattern = re.compile(rf"^{re.escape(prefix)}_layer_(\d+)_(.+)$")
    layers: dict[int, dict[str, float]] = {}
    for key, value in metrics.items():
        match = pattern.match(key)
        if match and isinstance(value, (int, float)) and not isinstance(value, bool):
            layers.setdefault(int(match[1]), {})[match[2]] = float(value)
    return dict(sorted(layers.items()))


def latest_eval_metrics(log_history: Sequence[Mapping[str, Any]], prefix: str = "eval") -> dict[str, Any]:
    """The last evaluation in a `Trainer.state.log_history` that has per-layer metrics (empty if none)."""
    marker = f"{prefix}_layer_"
    for entry in reversed(log_history):
        if any(key.startswith(marker) for key in entry):
            return dict(entry)
    return {}


def training_hyperparameters(training_args: Mapping[str, Any]) -> dict[str, Any]:
    """The training arguments a card lists: the usual optimization settings and every non-standard field."""
    from transformers import TrainingArguments

    standard = {field.name for field in dataclasses.fields(TrainingArguments)}
    shown = {}
    for name, value in training_args.items():
        if name in standard and name not in TRAINING_ARGUMENTS_SHOWN:
            continue
        if value is None or (name == "max_steps" and value <= 0) or (name in ("bf16", "fp16") and not value):
            continue
        shown[name] = value
    return shown


def layer_results(data: AlignedModelCardData, num_layers: int) -> dict[int, dict[str, float]]:
    """The per-layer metrics of `data.eval_metrics`, by 1-based layer.

    Raises:
        ValueError: for results of a layer the model does not have.
    """
    layers = layer_metrics(data.eval_metrics or {}, data.metric_prefix)
    for layer in layers:
        if not 1 <= layer <= num_layers:
            raise ValueError(
                f"`eval_metrics` has results for layer {layer}, but the model has {num_layers} layers; pass the "
                "metrics of this model's evaluation."
            )
    return layers


def card_minimal_depth(data: AlignedModelCardData, num_layers: int) -> int | None:
    depth = data.minimal_depth
    if depth is None:
        depth = (data.eval_metrics or {}).get(f"{data.metric_prefix}_minimal_depth")
    if depth is None:
        return None
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or depth != int(depth):
        raise ValueError(f"`minimal_depth` must be a whole number of layers, got {depth!r}.")
    if not 1 <= depth <= num_layers:
        raise ValueError(f"`minimal_depth={depth}` is outside the model's layers 1..{num_layers}.")
    return int(depth)


def read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def as_dict(value: Any, name: str) -> dict[str, Any] | None:
    """A dict, or the `to_dict()` of an object such as `ExitConfig` or `CalibrationResult`."""
    if value is None or isinstance(value, Mapping):
        return None if value is None else dict(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    raise TypeError(f"`{name}` must be a dict or have a `to_dict()` method, got {type(value).__name__}.")


def ordered_metric_names(layers: Mapping[int, Mapping[str, float]]) -> list[str]:
    """Metric names for table columns: accuracy first, losses last, the rest alphabetically."""
    names = {name for values in layers.values() for name in values}
    return sorted(names, key=lambda name: (name != "accuracy", "loss" in name, name))


def format_metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def hub_model_id(name: str | None) -> str | None:
    """`name` when it reads as a Hub repository id rather than a local folder."""
    if not name or os.path.isabs(name) or name.startswith(".") or os.path.isdir(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def hub_dataset_id(name: str) -> str | None:
    """`name` when it reads as a Hub dataset id: not a local file or folder, not a data file's name."""
    if os.path.exists(name) or Path(name).suffix.lower() in DATA_FILE_SUFFIXES:
        return None
    return hub_model_id(name)


def hub_datasets(datasets: Sequence[str] | None) -> list[str] | None:
    """The Hub dataset ids among `datasets`, for the card metadata (the Hub reads them as links)."""
    return [name for name in datasets or () if hub_dataset_id(name)] or None


def dataset_markdown(datasets: Sequence[str] | None, dataset_name: str | None) -> str | None:
    """The datasets as Hub links, where a name reads as a Hub dataset id (others, e.g. a local file, as they are)."""
    if datasets:
        return ", ".join(
            f"[{dataset}](https://huggingface.co/datasets/{dataset})" if hub_dataset_id(dataset) else f"`{dataset}`"
            for dataset in datasets
        )
    return dataset_name


def framework_versions() -> dict[str, str]:
    import huggingface_hub
    import torch
    import transformers

    from . import __version__

    return {
        "hf_aligned": __version__,
        "transformers": transformers.__version__,
        "PyTorch": torch.__version__,
        "huggingface_hub": huggingface_hub.__version__,
        "Python": platform.python_version(),
    }
