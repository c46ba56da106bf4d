"""Model cards of aligned checkpoints, for both model kinds: one renderer, one template per kind.

A card is built from the model's config (base model, layers, alignment settings) and from plain data gathered during
training and calibration ([`AlignedModelCardData`]). It is rendered with `huggingface_hub.ModelCard` from the Jinja
template of the model's kind that ships inside the package (`hf_aligned/model_cards/`): a classifier's card shows the
accuracy after every layer, the minimal depth and the early-exit trade-off, and its metadata carries a `model-index`
with one result per layer; a causal LM's card shows every layer's perplexity and agreement with the last layer and the
suggested `assistant_early_exit`. The hf_aligned push (`hf_aligned.hub`) and the command line use these cards.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.utils import logging

from .alignment import ALIGNED_TRAINING_KEY, CAUSAL_LM, CLASSIFICATION, AlignmentSettings, model_kind
from .card_data import (
    DEFAULT_TAGS,
    LIBRARY_NAME,
    MODEL_CARD_NAME,
    AlignedModelCardData,
    as_dict,
    card_minimal_depth,
    dataset_markdown,
    format_metric,
    framework_versions,
    hub_datasets,
    hub_model_id,
    layer_results,
    ordered_metric_names,
    training_hyperparameters,
)
from .compat import is_image_classification_only_type, name_or_path
from .configuration_aligned import AlignedConfig, num_hidden_layers
from .speculative import suggest_assistant_early_exit

logger = logging.get_logger(__name__)

TEMPLATES = Path(__file__).parent / "model_cards"
# The template of each model kind's card.
CARD_TEMPLATES = {
    CLASSIFICATION: TEMPLATES / "aligned_model_card.md",
    CAUSAL_LM: TEMPLATES / "causal_lm_model_card.md",
}
CURVE_KEYS = ("threshold", "accuracy", "mean_exit_layer", "expected_speedup")
# The most calibration settings the trade-off table lists (the chosen one is always among them).
MAX_CURVE_ROWS = 11
# The `ExitConfig` field each exit rule compares with (the `threshold` column of a calibration curve).
RULE_PARAMETERS = {
    **dict.fromkeys(("confidence", "margin", "entropy", "agreement"), "threshold"),
    "patience": "patience",
    "fixed": "exit_layer",
}
LAYER_WEIGHT_DESCRIPTIONS = {
    "linear": "linear in depth, λ_l = 2l / (L(L+1))",
    "uniform": "uniform",
    "last": "last layer only (standard fine-tuning)",
}


def build_model_card(
    model_or_config: PreTrainedModel | PreTrainedConfig, data: AlignedModelCardData | None = None
) -> ModelCard:
    """Renders the model card of an aligned model of either kind, from its kind's template.

    Args:
        model_or_config: an [`AlignedForSequenceClassification`] (its `exit_config`, when set, fills
            `data.exit_config`) or its [`AlignedConfig`]; an [`AlignedForCausalLM`] (also inside a peft wrapper) or
            its config.
        data: results and metadata to show; see [`AlignedModelCardData`].

    Returns:
        A `huggingface_hub.ModelCard`; `card.save(path)` writes it, `card.push_to_hub(repo_id)` uploads it.

    Raises:
        TypeError: if `model_or_config` is neither an aligned model nor an aligned model's config.
        ValueError: if the data contradicts the model (a layer that does not exist) or a calibration point lacks a
            key.
    """
    if hasattr(model_or_config, "get_base_model"):  # a peft wrapper: the card describes the model it wraps
        model_or_config = model_or_config.get_base_model()
    config = getattr(model_or_config, "config", model_or_config)
    kind = model_kind(config)
    if kind is None:
        raise TypeError(
            f"`model_or_config` must be an aligned model or an `AlignedConfig`, got {type(model_or_config).__name__}."
        )
    return CARD_BUILDERS[kind](model_or_config, data or AlignedModelCardData())


def build_classification_card(
    model_or_config: PreTrainedModel | AlignedConfig, data: AlignedModelCardData
) -> ModelCard:
    """The card of an aligned classifier (see [`build_model_card`])."""
    config = getattr(model_or_config, "config", model_or_config)
    data = data or AlignedModelCardData()
    num_layers = config.num_layers
    layers = layer_results(data, num_layers)
    exits = _exit_summary(model_or_config, data)
    base_model_name = data.base_model or name_or_path(config.base_config) or None
    base_model_id = hub_model_id(base_model_name)
    task = "image-classification" if _is_image_model(config) else "text-classification"
    model_name = data.model_id or f"aligned-{config.base_config.model_type}"
    dataset_name = data.dataset_name or (data.datasets[0] if data.datasets else None)
    metric_names = ordered_metric_names(layers)
    eval_results = _eval_results(layers, exits["rows"], exits["rule"], task, dataset_name, data.eval_split)
    card_data = ModelCardData(
        base_model=base_model_id,
        datasets=hub_datasets(data.datasets),
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
        template_path=str(CARD_TEMPLATES[CLASSIFICATION]),
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
    minimal_depth = card_minimal_depth(data, num_layers)
    metric_names = ordered_metric_names(layers)
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
        "dataset_markdown": dataset_markdown(data.datasets, dataset_name),
        "eval_split": data.eval_split,
        "metric_names": metric_names,
        "layer_rows": [
            {"layer": layer, "cells": [format_metric(values.get(name)) for name in metric_names]}
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
        "versions": framework_versions(),
    }


def _exit_summary(model_or_config: PreTrainedModel | AlignedConfig, data: AlignedModelCardData) -> dict[str, Any]:
    """The saved exit rule's settings, the calibrated rule, its curve as table rows (the chosen one marked) and the
    calibration's full-depth accuracy, from the card data or else the model's own `exit_config`."""
    exit_config = data.exit_config
    if exit_config is None:
        exit_config = as_dict(getattr(model_or_config, "exit_config", None), "the model's exit_config")
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
        "full_accuracy": format_metric(calibration.get("full_accuracy")) if calibration.get("full_accuracy") else None,
        "guarantee": _exit_guarantee(exit_config or {}, calibration),
    }


def _exit_guarantee(exit_config: Mapping[str, Any], calibration: Mapping[str, Any]) -> str | None:
    """What the saved setting promises, from its calibration record (`exit_config.json`) or the calibration data."""
    from .calibration import describe_guarantee

    record = exit_config.get("calibration") or (calibration if "method" in calibration else None)
    return describe_guarantee(record) if record else None


def build_causal_lm_card(
    model_or_config: PreTrainedModel | PreTrainedConfig, data: AlignedModelCardData | None = None
) -> ModelCard:
    """The card of an aligned causal LM: how it was trained, every layer's perplexity and agreement with the last
    layer (from `eval_metrics`), the suggested `assistant_early_exit`, and usage without hf_aligned."""
    data = data or AlignedModelCardData()
    config = getattr(model_or_config, "config", model_or_config)
    num_layers = num_hidden_layers(config)
    layers = layer_results(data, num_layers)
    model_type = config.model_type
    card_data = ModelCardData(
        base_model=hub_model_id(data.base_model or name_or_path(config) or None),
        datasets=hub_datasets(data.datasets),
        language=data.language,
        license=data.license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=[*DEFAULT_TAGS, "self-speculative-decoding", model_type, *(data.tags or [])],
    )
    alignment = AlignmentSettings.from_dict(getattr(config, ALIGNED_TRAINING_KEY, None), CAUSAL_LM)
    names = [name for name in ("loss", "perplexity", "agreement") if any(name in row for row in layers.values())]
    context = {
        "title": (data.model_id or f"aligned-{model_type}").split("/")[-1],
        "model_type": model_type,
        "num_layers": num_layers,
        "settings_key": ALIGNED_TRAINING_KEY,
        "settings_json": json.dumps(alignment.to_dict(CAUSAL_LM)),
        "metric_names": names,
        "layer_rows": [
            {"layer": layer, "cells": [format_metric(row.get(name)) for name in names]}
            for layer, row in layers.items()
        ],
        "model_path": data.model_id or "path/to/checkpoint",
        "hyperparameters": training_hyperparameters(data.training_args or {}),
        "versions": framework_versions(),
        **_draft_suggestion(layers, num_layers),
    }
    return ModelCard.from_template(card_data, template_path=str(CARD_TEMPLATES[CAUSAL_LM]), **context)


def _draft_suggestion(layers: Mapping[int, Mapping[str, float]], num_layers: int) -> dict[str, Any]:
    """The draft depth a causal LM's card suggests: from the agreement metrics when every layer has one (none when no
    draft is expected to help), else a shallow draft for the usage example."""
    agreement = [layers.get(layer, {}).get("agreement") for layer in range(1, num_layers + 1)]
    measured = None not in agreement
    suggestion = suggest_assistant_early_exit(agreement) if measured else None
    if suggestion is not None:
        exit_layer = suggestion.assistant_early_exit
    else:
        exit_layer = None if measured else max(1, num_layers // 4)
    return {
        "layers_measured": measured,
        "suggestion": suggestion is not None,
        "exit_layer": exit_layer,
        "suggestion_acceptance": f"{suggestion.acceptance:.1%}" if suggestion else None,
        "suggestion_speedup": f"{suggestion.expected_speedup:.2f}" if suggestion else None,
    }


# How each model kind's card is built.
CARD_BUILDERS: dict[str, Callable[..., ModelCard]] = {
    CLASSIFICATION: build_classification_card,
    CAUSAL_LM: build_causal_lm_card,
}


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
                "accuracy": format_metric(point["accuracy"]),
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


def _base_model_markdown(name: str | None, hub_id: str | None, config: AlignedConfig) -> str:
    model_type = config.base_config.model_type
    if hub_id is not None:
        return f"[{hub_id}](https://huggingface.co/{hub_id}) (`{model_type}`)"
    if name:
        # The folder's last two parts: a checkpoint folder is often named generically (`model`, `checkpoint-500`).
        return f"a `{model_type}` checkpoint from the local folder `{'/'.join(Path(name).parts[-2:])}`"
    return f"a randomly initialized `{model_type}` model"


def _is_image_model(config: AlignedConfig) -> bool:
    return is_image_classification_only_type(config.base_config.model_type)
