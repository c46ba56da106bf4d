"""What a wrapped base model takes: checking a call's inputs against its forward and completing them.

[`BaseModelInputs`] is built once per model from the base model's `forward` signature; every call of the classifier
(`forward`, `early_exit_predict`, `pooled_layer_states`) checks and completes its inputs through it, so an unknown
keyword, a call without inputs or an empty batch fails the same way everywhere, naming the fix.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable

import torch
from transformers import PreTrainedModel

from .compat import backbone_keyword_names
from .configuration_aligned import is_decoder_only

MAIN_INPUTS = ("input_ids", "inputs_embeds", "pixel_values")


class BaseModelInputs:
    """The inputs a base model's forward takes, and how one call's inputs are checked and completed for it.

    Args:
        backbone: the base model.
        extra_names: names some callers accept besides the base model's (named in the hint of a wrong keyword).
    """

    def __init__(self, backbone: PreTrainedModel, extra_names: Iterable[str] = ()):
        parameters = inspect.signature(backbone.forward).parameters
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        self.names = (
            frozenset(name for name, parameter in parameters.items() if parameter.kind not in variadic)
            | backbone_keyword_names()
        )
        self.extra_names = tuple(sorted(extra_names))
        self.accepts_use_cache = "use_cache" in parameters
        self.positions_from_mask = is_decoder_only(backbone.config) and "position_ids" in parameters
        self.model_type = backbone.config.model_type
        self.main_input_name = backbone.main_input_name

    def prepare(self, caller: str = "forward", **inputs) -> dict[str, torch.Tensor]:
        """The base model's inputs: the non-`None` ones, `use_cache=False` where the base model would build a cache,
        and, for decoder-only models given a padding mask, positions that count real tokens only (as `generate`
        does), so a left-padded sequence is encoded exactly like the same sequence alone.

        Raises:
            TypeError: naming the arguments the base model does not take (`caller` names the method in the message).
            ValueError: when no input (`input_ids`, `inputs_embeds`, `pixel_values`) is given, or the batch is empty.
        """
        model_inputs = {name: value for name, value in inputs.items() if value is not None}
        self.check(model_inputs, caller)
        if self.accepts_use_cache:
            model_inputs["use_cache"] = False
        attention_mask = model_inputs.get("attention_mask")
        if self.positions_from_mask and attention_mask is not None and "position_ids" not in model_inputs:
            model_inputs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return model_inputs

    def check(self, model_inputs: dict, caller: str) -> None:
        """Checks a call's inputs (see [`prepare`]); `early_exit_predict` also names `extra_names` in its hints."""
        unknown = sorted(set(model_inputs) - self.names)
        if unknown:
            early_exit = caller == "early_exit_predict"
            known = sorted(self.names) + (list(self.extra_names) if early_exit else [])
            hints = {name: difflib.get_close_matches(name, known, n=1) for name in unknown}
            hint = "; ".join(
                f"did you mean {match[0]!r} instead of {name!r}?" for name, match in hints.items() if match
            )
            raise TypeError(
                f"{caller}() got unexpected keyword arguments {unknown}: the {self.model_type!r} base model does not "
                "take them"
                + (" and they are not ExitConfig fields" if early_exit else "")
                + (f" ({hint})." if hint else ".")
            )
        main_inputs = [name for name in MAIN_INPUTS if name in model_inputs]
        if not main_inputs:
            raise ValueError(
                f"{caller}() got no inputs: pass `{self.main_input_name}` (or `inputs_embeds`), e.g. the output of "
                "the model's tokenizer or image processor."
            )
        batch = model_inputs[main_inputs[0]]
        if not isinstance(batch, torch.Tensor):
            raise TypeError(
                f"{caller}() got `{main_inputs[0]}` as a {type(batch).__name__}; pass a tensor, e.g. "
                "`tokenizer(texts, padding=True, return_tensors='pt')` or `torch.tensor(ids)`."
            )
        if batch.dim() == 0 or batch.shape[0] == 0:
            raise ValueError(
                f"{caller}() got an empty batch (`{main_inputs[0]}` of shape {tuple(batch.shape)}); pass at least "
                "one sample."
            )


def non_padding_mask(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor | None:
    """1 on the tokens that are not padding (`None` when the model has no pad token): what `"last"` pooling reads
    without an attention mask."""
    return None if pad_token_id is None else (input_ids != pad_token_id).long()
