"""Every use of transformers internals, in one place.

hf_aligned relies on a few names transformers does not document as public API (private attributes, keyword
arguments and tables). Keeping them here means a transformers release that moves one breaks one function, found by
one test, rather than code scattered over the package. The oldest release these were checked against is the minimum
in pyproject.toml.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn
from transformers import PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.pytorch_utils import Conv1D
from transformers.utils import TransformersKwargs, cached_file

__all__ = [
    "Conv1D",
    "SubConfigSpec",
    "TrainerCheckpointHooks",
    "attn_implementation",
    "backbone_keyword_names",
    "build_from_config",
    "cached_file_or_none",
    "causal_lm_class",
    "is_causal_lm_only_type",
    "is_image_classification_only_type",
    "mark_initialized",
    "name_or_path",
    "prepare_trainer_inputs",
    "set_name_or_path",
    "set_no_split_modules",
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


def name_or_path(config: PreTrainedConfig) -> str:
    """Where a config was loaded from (a Hub id or a folder; empty for a config built in code)."""
    return config._name_or_path


def set_name_or_path(config: PreTrainedConfig, path: str) -> None:
    """Records where a config (and its model) was loaded from, as `from_pretrained` does."""
    config._name_or_path = path


def set_no_split_modules(model: nn.Module, names: set[str]) -> None:
    """Names the module classes that must not be split across devices or FSDP shards (`_no_split_modules`, which
    accelerate's transformer-based auto-wrap policy reads)."""
    model._no_split_modules = names


def build_from_config(model_class: type, config: PreTrainedConfig, **kwargs: Any) -> Any:
    """A randomly initialized model of `model_class` from a config, as `AutoModel*.from_config` builds one
    (`dtype`, `attn_implementation`, ... in `kwargs`)."""
    return model_class._from_config(config, **kwargs)


def prepare_trainer_inputs(trainer: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """A batch moved to the trainer's device (and prepared for its context parallelism), as `Trainer` does."""
    return trainer._prepare_inputs(inputs)


class TrainerCheckpointHooks:
    """Hooks into `Trainer`'s private saving and loading steps, as public methods a trainer subclass overrides:
    `state_dict_to_save(state_dict)` (what `_save` writes) and `after_checkpoint_load()` (after a resume or
    `load_best_model_at_end` loaded weights into the live model). Put it before `Trainer` among the bases."""

    def state_dict_to_save(self, state_dict: dict | None) -> dict | None:
        return state_dict

    def after_checkpoint_load(self) -> None:
        """Runs after a checkpoint's weights were loaded into the live model."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict=self.state_dict_to_save(state_dict))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.after_checkpoint_load()

    def _load_best_model(self) -> None:
        super()._load_best_model()
        self.after_checkpoint_load()
