"""`AlignedTextClassificationPipeline`: transformers' text-classification pipeline for aligned models, truncating
long texts by default and optionally adding each text's exit layer to its result."""

from __future__ import annotations

from typing import Any

from transformers import AutoModelForSequenceClassification, TextClassificationPipeline
from transformers.pipelines import PIPELINE_REGISTRY

TASK = "aligned-text-classification"
# Above this, a tokenizer's `model_max_length` is transformers' placeholder for "unset" (int(1e30)), no real length.
UNSET_MAX_LENGTH = 10**12


def position_limit(model: Any) -> int | None:
    """The longest input the model's position embeddings take: `max_position_embeddings` of its text config, less the
    positions RoBERTa-like embeddings reserve before their first real one; `None` when the config has no limit."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if not isinstance(limit, int) or isinstance(limit, bool):
        return None
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    padding = getattr(getattr(embeddings, "position_embeddings", None), "padding_idx", None)
    return limit - padding - 1 if isinstance(padding, int) else limit


class AlignedTextClassificationPipeline(TextClassificationPipeline):
    """transformers' `TextClassificationPipeline` with two additions for an [`AlignedForSequenceClassification`]:

    - texts longer than the tokenizer's `model_max_length` are truncated to it (`truncation=True` by default, where
      transformers' pipeline lets a long text reach the model and fail there); pass `truncation=False` to turn it off.
      The examples save the tokenizer with the length they trained with. A tokenizer without a length (transformers'
      huge placeholder) truncates to the model's position limit (`max_position_embeddings`), or to `max_length=`.
    - `return_exit_layer=True` (at construction or per call) serves the texts with early exit and adds
      `"exit_layer"`, the 1-based layer at which the text left the model under its `exit_config`, to each result
      (the last layer for every text while the exit config has exits off).

    Build it with `pipeline("aligned-text-classification", model=..., tokenizer=...)` or directly
    `AlignedTextClassificationPipeline(model=..., tokenizer=...)`; every other argument is the parent's.

    Example:

    ```python
    >>> from transformers import pipeline
    >>> classify = pipeline("aligned-text-classification", model=model, tokenizer=tokenizer, return_exit_layer=True)
    >>> classify("a long review ...")
    [{'label': 'positive', 'score': 0.97, 'exit_layer': 3}]
    ```
    """

    def __init__(self, *args, **kwargs):
        """The parent's constructor, with truncation on unless `truncation` is given.

        Raises:
            ValueError: when truncating by default, the tokenizer has no real `model_max_length` (transformers'
                placeholder for "unset") and the model no `max_position_embeddings`: pass `max_length`.
        """
        super().__init__(*args, **kwargs)
        if "truncation" in self._preprocess_params:
            return
        self._preprocess_params["truncation"] = True
        if "max_length" in self._preprocess_params or self.tokenizer.model_max_length <= UNSET_MAX_LENGTH:
            return
        limit = position_limit(self.model)
        if limit is None:
            raise ValueError(
                f"The tokenizer's `model_max_length` is unset ({self.tokenizer.model_max_length}) and "
                f"{type(self.model).__name__} has no `max_position_embeddings`, so there is no length to truncate "
                "texts to: pass `max_length=...` (or `truncation=False`), or set `tokenizer.model_max_length`."
            )
        self._preprocess_params["max_length"] = limit

    def _sanitize_parameters(self, return_exit_layer: bool | None = None, **kwargs):
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(**kwargs)
        if return_exit_layer is not None:
            postprocess_params["return_exit_layer"] = bool(return_exit_layer)
            # Exit layers come from a call served with early exit (under the model's `exit_config`; with exits off
            # every text leaves at the last layer), whatever the model's default for a plain call.
            forward_params["early_exit"] = True if return_exit_layer else None
        return preprocess_params, forward_params, postprocess_params

    def _forward(self, model_inputs: dict[str, Any], early_exit: bool | None = None) -> Any:
        if early_exit is None:
            return super()._forward(model_inputs)
        return self.model(**model_inputs, early_exit=early_exit)

    def postprocess(self, model_outputs, return_exit_layer: bool = False, **kwargs) -> Any:
        """The parent's result, with `"exit_layer"` in every dictionary when `return_exit_layer` is set.

        Raises:
            ValueError: with `return_exit_layer` when the model returned no exit layers.
        """
        result = super().postprocess(model_outputs, **kwargs)
        if not return_exit_layer:
            return result
        exit_layers = model_outputs.get("exit_layers")
        if exit_layers is None:
            raise ValueError("`return_exit_layer=True` needs the model's exit layers, but it ran the full forward.")
        layer = int(exit_layers.reshape(-1)[0])
        if isinstance(result, dict):
            return {**result, "exit_layer": layer}
        return [{**row, "exit_layer": layer} for row in result]


PIPELINE_REGISTRY.register_pipeline(
    TASK, pipeline_class=AlignedTextClassificationPipeline, pt_model=AutoModelForSequenceClassification, type="text"
)
