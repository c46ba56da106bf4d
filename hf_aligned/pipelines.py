"""`AlignedTextClassificationPipeline`: transformers' text-classification pipeline for aligned models, truncating
long texts by default and optionally adding each text's exit layer to its result."""

from __future__ import annotations

from typing import Any

from transformers import AutoModelForSequenceClassification, TextClassificationPipeline
from transformers.pipelines import PIPELINE_REGISTRY

TASK = "aligned-text-classification"


class AlignedTextClassificationPipeline(TextClassificationPipeline):
    """transformers' `TextClassificationPipeline` with two additions for an [`AlignedForSequenceClassification`]:

    - texts longer than the tokenizer's `model_max_length` are truncated to it (`truncation=True` by default, where
      transformers' pipeline lets a long text reach the model and fail there); pass `truncation=False` to turn it off.
      The examples save the tokenizer with the length they trained with.
    - `return_exit_layer=True` (at construction or per call) adds `"exit_layer"`, the 1-based layer at which the text
      left the model under its `exit_config`, to each result.

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
        super().__init__(*args, **kwargs)
        self._preprocess_params.setdefault("truncation", True)

    def _sanitize_parameters(self, return_exit_layer: bool | None = None, **kwargs):
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(**kwargs)
        if return_exit_layer is not None:
            postprocess_params["return_exit_layer"] = bool(return_exit_layer)
        return preprocess_params, forward_params, postprocess_params

    def postprocess(self, model_outputs, return_exit_layer: bool = False, **kwargs) -> Any:
        """The parent's result, with `"exit_layer"` in every dictionary when `return_exit_layer` is set.

        Raises:
            ValueError: with `return_exit_layer` when the model returned no exit layers (it was not served with early
                exit, e.g. in train mode).
        """
        result = super().postprocess(model_outputs, **kwargs)
        if not return_exit_layer:
            return result
        exit_layers = model_outputs.get("exit_layers")
        if exit_layers is None:
            raise ValueError(
                "`return_exit_layer=True` needs the model's exit layers, but it ran the full forward: put it in eval "
                "mode (`model.eval()`) so pipeline calls are served with early exit."
            )
        layer = int(exit_layers.reshape(-1)[0])
        if isinstance(result, dict):
            return {**result, "exit_layer": layer}
        return [{**row, "exit_layer": layer} for row in result]


PIPELINE_REGISTRY.register_pipeline(
    TASK, pipeline_class=AlignedTextClassificationPipeline, pt_model=AutoModelForSequenceClassification, type="text"
)
