"""Model cards for aligned checkpoints: accuracy after every layer, minimal depth, the early-exit trade-off, usage.

A card is built from the model's config (base model, layers, pooling, layer weights) and from plain data gathered
during training and calibration ([`AlignedModelCardData`]): the trainer's evaluation metrics
(`eval_layer_{l}_{metric}`, `eval_minimal_depth`), the exit calibration curve and the saved exit rule, the training
arguments and plots. It is rendered with `huggingface_hub.ModelCard` from the Jinja template that ships inside the
package (`hf_aligned/model_cards/`, also reachable as `model_cards/` at the top of the repository), and its metadata
carries a `model-index` with one result per layer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import PreTrainedModel
from transformers.utils import logging

from .compat import is_image_classification_only_type
from .configuration_aligned import AlignedConfig
from .exits import EXIT_CONFIG_NAME
from .modeling_causal_lm import ALIGNED_TRAINING_KEY, AlignedForCausalLM, suggest_assistant_early_exit

logger = logging.get_logger(__name__)

CARD_TEMPLATE = Path(__file__).parent / "model_cards" / "aligned_model_card.md"
LIBRARY_NAME = "hf-aligned"
DEFAULT_TAGS = (LIBRARY_NAME, "aligned-training", "multi-exit", "early-exit")
MODEL_CARD_NAME = "README.md"
# Where a saved model directory keeps its exit calibration (`CalibrationResult.save`).
CALIBRATION_NAME = "calibration.json"
# Written by `Trainer.save_metrics`; when both exist, the later file wins.
RESULTS_FILES = ("all_results.json", "eval_results.json")
PLOT_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg", ".gif")
CURVE_KEYS = ("threshold", "accuracy", "mean_exit_layer", "expected_speedup")
# The most calibration settings the trade-off table lists (the chosen one is always among them).
MAX_CURVE_ROWS = 11
# The `ExitConfig` field each exit rule compares with (the `threshold` column of a calibration curve).
RULE_PARAMETERS = {
    **dict.fromkeys(("confidence", "margin", "entropy", "agreement"), "threshold"),
    "patience": "patience",
    "fixed": "exit_layer",
}
# Standard `TrainingArguments` fields a card lists; fields that a subclass adds (aligned options) are listed too.
# Names that are data files, never Hub dataset ids.
DATA_FILE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt", ".arrow")
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
LAYER_WEIGHT_DESCRIPTIONS = {
    "linear": "linear in depth, λ_l = 2l / (L(L+1))",
    "uniform": "uniform",
    "last": "last layer only (standard fine-tuning)",
}


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
        self.exit_config = _as_dict(self.exit_config, "exit_config")
        self.calibration = _as_dict(self.calibration, "calibration")
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
                metrics.update(_read_json(model_dir / name) or {})
            filled["eval_metrics"] = metrics or None
        if self.exit_config is None:
            filled["exit_config"] = _read_json(model_dir / EXIT_CONFIG_NAME)
        if self.calibration is None:
            filled["calibration"] = _read_json(model_dir / CALIBRATION_NAME)
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


def build_model_card(
    model_or_config: PreTrainedModel | AlignedConfig, data: AlignedModelCardData | None = None
) -> ModelCard:
    """Renders the model card of an aligned model.

    Args:
        model_or_config: an [`AlignedForSequenceClassification`] (its `exit_config`, when set, fills
            `data.exit_config`), an [`AlignedForCausalLM`] (possibly wrapped by peft) or an [`AlignedConfig`].
        data: results and metadata to show; see [`AlignedModelCardData`].

    Returns:
        A `huggingface_hub.ModelCard`; `card.save(path)` writes it, `card.push_to_hub(repo_id)` uploads it.

    Raises:
        TypeError: if `model_or_config` is neither an aligned model nor an `AlignedConfig`.
        ValueError: if the data contradicts the model (a layer that does not exist) or a calibration point lacks a
            key.
    """
    if hasattr(model_or_config, "get_base_model"):  # a peft wrapper: the card describes the model it wraps
        model_or_config = model_or_config.get_base_model()
    if isinstance(model_or_config, AlignedForCausalLM):
        return build_causal_lm_card(model_or_config, data)
    config = getattr(model_or_config, "config", model_or_config)
    if not isinstance(config, AlignedConfig):
        raise TypeError(
            f"`model_or_config` must be an aligned model or an `AlignedConfig`, got {type(model_or_config).__name__}."
        )
    data = data or AlignedModelCardData()
    num_layers = config.num_layers
    layers = _layer_results(data, num_layers)
    exits = _exit_summary(model_or_config, data)
    base_model_name = data.base_model or config.base_config._name_or_path or None
    base_model_id = _hub_model_id(base_model_name)
    task = "image-classification" if _is_image_model(config) else "text-classification"
    model_name = data.model_id or f"aligned-{config.base_config.model_type}"
    dataset_name = data.dataset_name or (data.datasets[0] if data.datasets else None)
    metric_names = _ordered_metric_names(layers)
    eval_results = _eval_results(layers, exits["rows"], exits["rule"], task, dataset_name, data.eval_split)
    card_data = ModelCardData(
        base_model=base_model_id,
        datasets=_hub_datasets(data.datasets),
        language=data.language,
        license=data.license,
        library_name=LIBRARY_NAME,
        pipeline_tag=task,
        tags=list(dict.fromkeys([*DEFAULT_TAGS, task, config.base_config.model_type, *(data.tags or [])])),
        metrics=[name for name in metric_names if "loss" not in name] or None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(CARD_TEMPLATE),
        **_card_context(config, data, layers, exits, task, model_name, base_model_name, base_model_id),
    )


def _card_context(
    config: AlignedConfig,
    data: AlignedModelCardData,
    layers: dict[int, dict[str, float]],
    exits: dict[str, Any],
    task: str,
    model_name: str,
    base_model_name: str | None,
    base_model_id: str | None,
) -> dict[str, Any]:
    """The values the card template reads (everything but the metadata)."""
    num_layers = config.num_layers
    minimal_depth = _minimal_depth(data, num_layers)
    metric_names = _ordered_metric_names(layers)
    dataset_name = data.dataset_name or (data.datasets[0] if data.datasets else None)
    labels = [config.id2label[index] for index in sorted(config.id2label)]
    return {
        "title": model_name.split("/")[-1],
        "model_path": data.model_id or "path/to/checkpoint",
        "task_description": task.replace("-", " "),
        "is_text": task == "text-classification",
        "processor_class": "AutoTokenizer" if task == "text-classification" else "AutoImageProcessor",
        "example_input": '["An example sentence."]' if task == "text-classification" else "images",
        "shared_classifier": config.classifier_sharing == "shared",
        "num_layers": num_layers,
        "num_labels": len(labels),
        "labels": labels,
        "pooling": config.pooling,
        "use_pooler": config.use_pooler,
        "projection_head": config.projection_head,
        "layer_weights_description": _layer_weights_description(config),
        "training_options_description": _training_options_description(config),
        "base_model_markdown": _base_model_markdown(base_model_name, base_model_id, config),
        "dataset_markdown": _dataset_markdown(data.datasets, dataset_name),
        "eval_split": data.eval_split,
        "metric_names": metric_names,
        "layer_rows": [
            {"layer": layer, "cells": [_format_metric(values.get(name)) for name in metric_names]}
            for layer, values in layers.items()
        ],
        "minimal_depth": minimal_depth,
        "minimal_depth_note": _minimal_depth_note(layers, minimal_depth, num_layers),
        "exit_settings": ", ".join(f"`{name}={value}`" for name, value in exits["settings"].items()),
        "exit_rule": exits["rule"],
        "exit_parameter": "Patience" if exits["rule"] == "patience" else "Threshold",
        "full_accuracy": exits["full_accuracy"],
        "exit_rows": _rows_shown(exits["rows"]),
        "exit_guarantee": exits["guarantee"],
        "num_exit_settings": len(exits["rows"]),
        "hyperparameters": training_hyperparameters(data.training_args or {}),
        "plots": [{"path": path, "title": Path(path).stem.replace("_", " ")} for path in data.plots or []],
        "versions": _framework_versions(),
    }


def _causal_usage_lines(model_path: str, exit_layer: int | None) -> list[str]:
    """The causal-LM card's usage section: plain transformers, with the suggested draft depth when there is one."""
    draft = "" if exit_layer is None else f", assistant_early_exit={exit_layer}"
    lines = [
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{model_path}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{model_path}")',
        'inputs = tokenizer("An example prompt", return_tensors="pt")',
        f"output = model.generate(**inputs, max_new_tokens=40{draft})",
        "```",
    ]
    if exit_layer is not None:
        lines += [
            "",
            "For families whose forward runs every block whatever `num_hidden_layers` says (GPT-2), load it with "
            "`hf_aligned.AlignedForCausalLM.from_pretrained` for the same call.",
        ]
    return lines


def _layer_results(data: AlignedModelCardData, num_layers: int) -> dict[int, dict[str, float]]:
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


def _exit_summary(model_or_config: PreTrainedModel | AlignedConfig, data: AlignedModelCardData) -> dict[str, Any]:
    """The saved exit rule's settings, the calibrated rule, its curve as table rows (the chosen one marked) and the
    calibration's full-depth accuracy, from the card data or else the model's own `exit_config`."""
    exit_config = data.exit_config
    if exit_config is None:
        exit_config = _as_dict(getattr(model_or_config, "exit_config", None), "the model's exit_config")
    settings = _exit_settings(exit_config or {})
    calibration = data.calibration or {}
    rule = calibration.get("rule") or settings.get("rule")
    chosen = calibration.get("chosen")
    if chosen is None and settings.get("rule") == rule:
        chosen = settings.get(RULE_PARAMETERS.get(rule))
    return {
        "settings": settings,
        "rule": rule,
        "rows": _exit_rows(calibration.get("curve", []), chosen),
        "full_accuracy": _format_metric(calibration.get("full_accuracy"))
        if calibration.get("full_accuracy")
        else None,
        "guarantee": _exit_guarantee(exit_config or {}, calibration),
    }


def _exit_guarantee(exit_config: Mapping[str, Any], calibration: Mapping[str, Any]) -> str | None:
    """What the saved setting promises, from its calibration record (`exit_config.json`) or the calibration data."""
    from .calibration import describe_guarantee

    record = exit_config.get("calibration") or (calibration if "method" in calibration else None)
    return describe_guarantee(record) if record else None


def build_causal_lm_card(model: AlignedForCausalLM, data: AlignedModelCardData | None = None) -> ModelCard:
    """The card of an aligned causal LM: how it was trained, every layer's perplexity and agreement with the last
    layer (from `eval_metrics`), the suggested `assistant_early_exit`, and usage without hf_aligned."""
    data = data or AlignedModelCardData()
    num_layers = model.num_layers
    layers = _layer_results(data, num_layers)
    model_type = model.config.model_type
    model_name = data.model_id or f"aligned-{model_type}"
    base_model_id = _hub_model_id(data.base_model or model.config._name_or_path or None)
    card_data = ModelCardData(
        base_model=base_model_id,
        datasets=_hub_datasets(data.datasets),
        language=data.language,
        license=data.license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=[*DEFAULT_TAGS, "self-speculative-decoding", model_type, *(data.tags or [])],
    )
    lines = [
        f"# {model_name.split('/')[-1]}",
        "",
        f"A {model_type} language model of {num_layers} layers trained with **hf_aligned**'s aligned "
        "training ([arXiv:2406.14479](https://arxiv.org/abs/2406.14479)): its own final norm and LM head "
        "predict the next token after every layer, so its first layers draft tokens for self-speculative decoding. "
        "The checkpoint is a plain transformers checkpoint; hf_aligned is not needed to use it.",
        "",
        f"Trained with `{ALIGNED_TRAINING_KEY}` = `{json.dumps(model.alignment.to_dict())}` (also in `config.json`).",
    ]
    agreement = [layers.get(layer, {}).get("agreement") for layer in range(1, num_layers + 1)]
    layers_measured = None not in agreement
    suggestion = suggest_assistant_early_exit(agreement) if layers_measured else None
    # Without agreement metrics the usage shows a shallow draft; with them, the suggestion or (none helps) no draft.
    exit_layer = (
        suggestion.assistant_early_exit if suggestion else None if layers_measured else max(1, num_layers // 4)
    )
    if layers:
        names = [name for name in ("loss", "perplexity", "agreement") if any(name in row for row in layers.values())]
        lines += ["", "## Every layer as a next-token predictor", ""]
        lines += ["| Layer | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        lines += [
            f"| {layer} | " + " | ".join(_format_metric(row.get(name)) for name in names) + " |"
            for layer, row in layers.items()
        ]
        lines += ["", "Agreement: the share of tokens whose top-1 prediction equals the last layer's."]
    if suggestion:
        lines += [
            "",
            f"Suggested `assistant_early_exit={exit_layer}`: layer {exit_layer} agrees with the last layer on "
            f"{suggestion.acceptance:.1%} of tokens, for an expected {suggestion.expected_speedup:.2f}x speed-up of "
            "greedy decoding when blocks dominate the cost (`hf_aligned.suggest_assistant_early_exit`).",
        ]
    elif layers_measured:
        lines += [
            "",
            "No draft suggested: no layer agrees with the last layer often enough for self-speculative decoding to "
            "be expected to beat plain greedy decoding (`hf_aligned.suggest_assistant_early_exit`).",
        ]
    lines += _causal_usage_lines(data.model_id or "path/to/checkpoint", exit_layer)
    hyperparameters = training_hyperparameters(data.training_args or {})
    if hyperparameters:
        lines += ["", "## Training hyperparameters", ""]
        lines += [f"- {name}: {value}" for name, value in hyperparameters.items()]
    versions = ", ".join(f"{name} {version}" for name, version in _framework_versions().items())
    lines += ["", f"Framework versions: {versions}.", ""]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_model_card(
    output_dir: str | os.PathLike,
    model_or_config: PreTrainedModel | AlignedConfig,
    data: AlignedModelCardData | None = None,
) -> Path | None:
    """Writes `README.md` into a saved model directory; a card that cannot be built from the directory's files
    (unreadable or inconsistent results, a failed write) is logged as a warning instead of raised, so it never breaks
    training or saving. Other errors (bugs) pass through.

    Fields of `data` left unset are read from the directory (see [`AlignedModelCardData.fill_from_directory`]), so
    a trainer can call this right after saving. An existing `README.md` is replaced.

    Returns:
        The path of the card, or `None` if it could not be written.
    """
    try:
        data = (data or AlignedModelCardData()).fill_from_directory(output_dir)
        path = Path(output_dir) / MODEL_CARD_NAME
        build_model_card(model_or_config, data).save(path)
        return path
    except (OSError, ValueError) as error:  # the card is a courtesy: bad files or a failed write are only logged
        logger.warning(f"Could not write the model card in {output_dir}: {type(error).__name__}: {error}")
        return None


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _as_dict(value: Any, name: str) -> dict[str, Any] | None:
    """A dict, or the `to_dict()` of an object such as `ExitConfig` or `CalibrationResult`."""
    if value is None or isinstance(value, Mapping):
        return None if value is None else dict(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    raise TypeError(f"`{name}` must be a dict or have a `to_dict()` method, got {type(value).__name__}.")


def _exit_settings(exit_config: Mapping[str, Any]) -> dict[str, Any]:
    """What a card says about a saved exit rule: the rule, the value it compares with and the layer bounds set.

    Empty when the rule lets no sample leave (`ExitConfig.never_exits`: confidence 1.0 without a `max_layer`).
    """
    rule = exit_config.get("rule")
    if rule not in RULE_PARAMETERS:
        return {name: value for name, value in exit_config.items() if value is not None}
    parameter = RULE_PARAMETERS[rule]
    settings = {"rule": rule, parameter: exit_config.get(parameter)}
    if exit_config.get("min_layer", 1) != 1:
        settings["min_layer"] = exit_config["min_layer"]
    if exit_config.get("max_layer") is not None:
        settings["max_layer"] = exit_config["max_layer"]
    if rule == "confidence" and (settings["threshold"] or 1.0) >= 1.0 and "max_layer" not in settings:
        return {}
    return settings


def _minimal_depth(data: AlignedModelCardData, num_layers: int) -> int | None:
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


def _exit_rows(curve: Sequence[Mapping[str, Any]], chosen: float | None) -> list[dict[str, Any]]:
    """Formats the exit calibration curve; the row of the chosen setting is marked `chosen`."""
    rows = []
    for index, point in enumerate(curve):
        missing = [key for key in CURVE_KEYS if not isinstance(point, Mapping) or key not in point]
        if missing:
            raise ValueError(
                f"`calibration['curve'][{index}]` lacks {missing}; every point of an exit calibration curve needs "
                f"{CURVE_KEYS}."
            )
        rows.append(
            {
                "threshold": f"{point['threshold']:g}",
                "accuracy": _format_metric(point["accuracy"]),
                "mean_exit_layer": f"{point['mean_exit_layer']:.2f}",
                "expected_speedup": f"{point['expected_speedup']:.2f}x",
                "chosen": chosen is not None and math.isclose(point["threshold"], chosen),
                "point": point,
            }
        )
    return rows


def _rows_shown(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """At most `MAX_CURVE_ROWS` rows, evenly spread over the curve, first, last and chosen rows included."""
    if len(rows) <= MAX_CURVE_ROWS:
        return list(rows)
    step = (len(rows) - 1) / (MAX_CURVE_ROWS - 2)
    indices = {round(index * step) for index in range(MAX_CURVE_ROWS - 1)}
    indices |= {index for index, row in enumerate(rows) if row["chosen"]}
    return [rows[index] for index in sorted(indices)]


def _eval_results(
    layers: Mapping[int, Mapping[str, float]],
    exit_rows: Sequence[Mapping[str, Any]],
    exit_rule: str | None,
    task: str,
    dataset_name: str | None,
    split: str | None,
) -> list[EvalResult]:
    """The `model-index` entries: every layer's metrics (losses excluded) and the chosen early-exit setting."""
    common = {
        "task_type": task,
        "dataset_type": dataset_name or "unknown",
        "dataset_name": dataset_name or "Unknown",
        "dataset_split": split,
    }
    results = [
        EvalResult(metric_type=metric, metric_name=f"Layer {layer} {metric}", metric_value=value, **common)
        for layer, values in layers.items()
        for metric, value in values.items()
        if "loss" not in metric
    ]
    for row in exit_rows:
        if row["chosen"] and row["point"]["accuracy"] is not None:
            point = row["point"]
            setting = f"{exit_rule} {row['threshold']}" if exit_rule else row["threshold"]
            name = f"Early-exit accuracy ({setting}, {point['expected_speedup']:.2f}x speed-up)"
            results.append(
                EvalResult(metric_type="accuracy", metric_name=name, metric_value=point["accuracy"], **common)
            )
    return results


def _ordered_metric_names(layers: Mapping[int, Mapping[str, float]]) -> list[str]:
    """Metric names for table columns: accuracy first, losses last, the rest alphabetically."""
    names = {name for values in layers.values() for name in values}
    return sorted(names, key=lambda name: (name != "accuracy", "loss" in name, name))


def _format_metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _minimal_depth_note(layers: Mapping[int, Mapping[str, float]], depth: int | None, num_layers: int) -> str | None:
    if depth is None or "accuracy" not in layers.get(depth, {}) or "accuracy" not in layers.get(num_layers, {}):
        return None
    return (
        f"accuracy {layers[depth]['accuracy']:.4f} after layer {depth} against {layers[num_layers]['accuracy']:.4f} "
        f"after layer {num_layers}"
    )


def _layer_weights_description(config: AlignedConfig) -> str:
    scheme = config.layer_weights
    description = LAYER_WEIGHT_DESCRIPTIONS.get(scheme, "custom") if isinstance(scheme, str) else "custom"
    weights = ", ".join(f"{weight:.3f}" for weight in config.resolved_layer_weights)
    aligned = ""
    if config.aligned_layers is not None:
        aligned = f" on layers {', '.join(str(layer) for layer in config.aligned_layers)}"
    return f"{description}{aligned} ({weights})"


def _training_options_description(config: AlignedConfig) -> str:
    """How the classifier was trained, beyond the layer weights: classifier updates and self-distillation."""
    if config.classifier_sharing != "shared":
        updates = "each layer's classifier trained by its own layer's loss"
    elif config.classifier_update == "last":
        updates = "shared classifier updated by the last layer's loss only (`classifier_update='last'`)"
    else:
        updates = "shared classifier updated by every layer's loss (`classifier_update='all'`)"
    if config.distillation_weight > 0:
        return (
            f"{updates}; self-distillation towards the last layer with weight {config.distillation_weight:g} at "
            f"temperature {config.distillation_temperature:g}"
        )
    return f"{updates}; no self-distillation"


def _hub_model_id(name: str | None) -> str | None:
    """`name` when it reads as a Hub repository id rather than a local folder."""
    if not name or os.path.isabs(name) or name.startswith(".") or os.path.isdir(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _hub_dataset_id(name: str) -> str | None:
    """`name` when it reads as a Hub dataset id: not a local file or folder, not a data file's name."""
    if os.path.exists(name) or Path(name).suffix.lower() in DATA_FILE_SUFFIXES:
        return None
    return _hub_model_id(name)


def _hub_datasets(datasets: Sequence[str] | None) -> list[str] | None:
    """The Hub dataset ids among `datasets`, for the card metadata (the Hub reads them as links)."""
    return [name for name in datasets or () if _hub_dataset_id(name)] or None


def _base_model_markdown(name: str | None, hub_id: str | None, config: AlignedConfig) -> str:
    model_type = config.base_config.model_type
    if hub_id is not None:
        return f"[{hub_id}](https://huggingface.co/{hub_id}) (`{model_type}`)"
    if name:
        # The folder's last two parts: a checkpoint folder is often named generically (`model`, `checkpoint-500`).
        return f"a `{model_type}` checkpoint from the local folder `{'/'.join(Path(name).parts[-2:])}`"
    return f"a randomly initialized `{model_type}` model"


def _dataset_markdown(datasets: Sequence[str] | None, dataset_name: str | None) -> str | None:
    """The datasets as Hub links, where a name reads as a Hub dataset id (others, e.g. a local file, as they are)."""
    if datasets:
        return ", ".join(
            f"[{dataset}](https://huggingface.co/datasets/{dataset})" if _hub_dataset_id(dataset) else f"`{dataset}`"
            for dataset in datasets
        )
    return dataset_name


def _is_image_model(config: AlignedConfig) -> bool:
    return is_image_classification_only_type(config.base_config.model_type)


def _framework_versions() -> dict[str, str]:
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
