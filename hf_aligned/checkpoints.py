"""Checkpoints of the classifier: wrapping a plain base checkpoint, and cutting a model to its first k blocks.

[`wrap_base_checkpoint`] is what `AlignedForSequenceClassification.from_pretrained` runs on a plain base checkpoint
(BERT, ViT, GPT-2, Llama, ...): the base model keeps every pretrained weight and only the classification layer is new.
[`truncated_copy`] is `truncate(k)`: a standalone copy with the first k blocks whose settings are cut and re-validated,
so it always saves and reloads.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from transformers import AutoModel, PreTrainedConfig
from transformers.utils import logging

from .alignment import CLASSIFICATION, KIND_FIELDS
from .backbones import sentence_transformers_pooling
from .compat import set_name_or_path
from .configuration_aligned import AlignedConfig
from .exits import ExitConfig
from .utils import hub_kwargs

logger = logging.get_logger(__name__)

# Keyword arguments that configure the aligned classifier rather than the base model it wraps: its alignment
# settings, the classifier's own structure and its labels.
ALIGNED_KWARGS = (
    *KIND_FIELDS[CLASSIFICATION],
    "pooling",
    "projection_head",
    "use_pooler",
    "classifier_dropout",
    "layout",
    "num_labels",
    "id2label",
    "label2id",
    "problem_type",
)


def wrap_base_checkpoint(model_class: type, path: str | os.PathLike, base_config: PreTrainedConfig | None, **kwargs):
    """An aligned classifier of `model_class` around a plain base checkpoint (see
    `AlignedForSequenceClassification.from_pretrained`): `ALIGNED_KWARGS` configure the classifier, the other keyword
    arguments go to the base model's `from_pretrained`; with `output_loading_info=True`, `(model, loading_info)`."""
    aligned_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in ALIGNED_KWARGS}
    locating = hub_kwargs(kwargs)
    output_loading_info = kwargs.pop("output_loading_info", False)
    base_model, loading_info = AutoModel.from_pretrained(path, config=base_config, output_loading_info=True, **kwargs)
    if aligned_kwargs.get("pooling", "auto") == "auto":
        aligned_kwargs["pooling"] = sentence_transformers_pooling(path, locating) or "auto"
    if aligned_kwargs.get("use_pooler") is None and any(
        key.startswith("pooler.") for key in loading_info["missing_keys"]
    ):
        # The checkpoint has no trained pooler: a randomly initialized one would only get in the way.
        aligned_kwargs["use_pooler"] = False
    config = AlignedConfig(base_config=base_model.config, **aligned_kwargs)
    set_name_or_path(config, str(path))
    model = model_class(config, base_model=base_model)
    # The new classifier follows the base model's dtype and the device its last block was loaded on.
    model.classifier.to(device=next(model.blocks[-1].parameters()).device, dtype=base_model.dtype)
    model.eval()
    if not output_loading_info:
        return model
    return model, _wrapped_loading_info(model, loading_info)


def truncated_copy(model: Any, num_layers: int) -> Any:
    """A standalone copy of an aligned classifier with only its first `num_layers` blocks (see
    `AlignedForSequenceClassification.truncate`).

    Raises:
        ValueError: for a depth out of range, or cut settings that would not load.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= model.num_layers:
        raise ValueError(f"`num_layers={num_layers!r}` must be an integer between 1 and {model.num_layers}.")
    trained = [layer for layer, weight in enumerate(model.config.resolved_layer_weights, start=1) if weight > 0]
    truncated = copy.deepcopy(model)
    del truncated.blocks[num_layers:]
    base_config = truncated.backbone.config
    base_config.get_text_config().num_hidden_layers = num_layers
    layer_types = getattr(base_config, "layer_types", None)
    if isinstance(layer_types, list):
        base_config.layer_types = layer_types[:num_layers]
    config = truncated.config
    config.base_config = base_config
    if min(trained) > num_layers:
        # No kept block carried a loss (e.g. a `layer_weights="last"` baseline): the copy says so by recording the
        # standard setting of its own depth, the loss on its last block, rather than weights it never had.
        logger.warning(
            f"truncate({num_layers}) keeps none of the layers trained with a loss ({trained}): the classifier was not "
            f'trained after blocks 1-{num_layers}. The copy records layer_weights="last" (its block {num_layers}).'
        )
        config.layer_weights, config.aligned_layers = "last", None
    elif not isinstance(config.layer_weights, str):
        config.layer_weights = config.layer_weights[:num_layers]
    if config.aligned_layers is not None:
        config.aligned_layers = [layer for layer in config.aligned_layers if layer <= num_layers]
    try:
        AlignedConfig.from_dict(config.to_dict())
    except ValueError as error:
        raise ValueError(f"truncate({num_layers}) would save settings that do not load: {error}") from error
    if config.classifier_sharing == "per_layer":
        del truncated.classifier.heads[num_layers:]
    truncated.exit_config = ExitConfig()
    return truncated


def _wrapped_loading_info(model: Any, base_info: dict) -> dict:
    """The loading info of a wrapped base checkpoint, named as in the aligned model: the base model's keys under
    `backbone.`, plus the new classification layer (and projection head) as missing keys."""
    moved = {"norm", "pooler"}  # the base model's own parts, loaded with it
    new_keys = [
        f"classifier.{name}" for name, _ in model.classifier.named_parameters() if name.split(".")[2] not in moved
    ]
    info = {
        key: [f"backbone.{name}" for name in base_info.get(key, [])] for key in ("missing_keys", "unexpected_keys")
    }
    info["missing_keys"] += new_keys
    info["mismatched_keys"] = list(base_info.get("mismatched_keys", []))
    info["error_msgs"] = list(base_info.get("error_msgs", []))
    return info
