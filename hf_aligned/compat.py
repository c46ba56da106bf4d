"""Every use of transformers internals, in one place.

hf_aligned relies on a few names transformers does not document as public API (private attributes, keyword
arguments and tables). Keeping them here means a transformers release that moves one breaks one function, found by
one test, rather than code scattered over the package. The oldest release these were checked against is the minimum
in pyproject.toml.
"""

from __future__ import annotations

import os

from torch import nn
from transformers import PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.pytorch_utils import Conv1D
from transformers.utils import TransformersKwargs, cached_file

__all__ = [
    "Conv1D",
    "SubConfigSpec",
    "attn_implementation",
    "backbone_keyword_names",
    "cached_file_or_none",
    "causal_lm_class",
    "is_causal_lm_only_type",
    "is_image_classification_only_type",
    "mark_initialized",
]


def backbone_keyword_names() -> frozenset[str]:
    """The keyword arguments transformers' models accept through `**kwargs` (`TransformersKwargs`)."""
    return frozenset(TransformersKwargs.__annotations__)


def attn_implementation(config: PreTrainedConfig) -> str | None:
    """The attention implementation a config has resolved to (`"eager"`, `"sdpa"`, ...)."""
    return config._attn_implementation


def mark_initialized(module: nn.Module) -> None:
    """Flags a module's weights as loaded, so transformers' post-construction initialization leaves them alone."""
    for tensor in (*module.parameters(), *module.buffers()):
        tensor._is_hf_initialized = True
    for submodule in module.modules():
        submodule._is_hf_initialized = True


def cached_file_or_none(path: str | os.PathLike, filename: str, **hub_kwargs) -> str | None:
    """The local path of `filename` in a folder or Hub repository, or `None` when the repository has no such file."""
    return cached_file(path, filename, _raise_exceptions_for_missing_entries=False, **hub_kwargs)


def is_causal_lm_only_type(model_type: str) -> bool:
    """Whether transformers has a causal-LM head for a model type but no masked-LM head (a decoder-only LM)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def is_image_classification_only_type(model_type: str) -> bool:
    """Whether transformers has an image-classification head for a model type but no sequence-classification one."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    return (
        model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
        and model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    )


def causal_lm_class(config: PreTrainedConfig) -> type:
    """The causal-LM class `AutoModelForCausalLM` builds for a config (`LlamaForCausalLM` for a `LlamaConfig`)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.auto_factory import _get_model_class

    return _get_model_class(config, AutoModelForCausalLM._model_mapping)
