"""Finds the parts the aligned classifier needs in a base model: its blocks, final norm and pooler.

Listed families take their layout from the table in `layouts`; a user's `AlignedConfig(layout=...)` overrides it;
other families are searched generically. Every layout is checked against the built model before it is used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import replace

from torch import nn
from transformers import PreTrainedModel
from transformers.utils import logging

from .compat import cached_file_or_none
from .configuration_aligned import num_hidden_layers
from .layouts import BackboneLayout, refusal_reason, table_layout

__all__ = ["BackboneLayout", "detach_module", "find_layout", "sentence_transformers_pooling"]

logger = logging.get_logger(__name__)

# Attribute names under which unlisted families keep the norm applied after their last block (ViT: layernorm,
# GPT-2 and Falcon: ln_f, Llama / Mistral / Qwen: norm, GPT-NeoX / OPT: final_layer_norm, Phi: final_layernorm,
# ModernBERT: final_norm).
FINAL_NORM_NAMES = ("norm", "ln_f", "layernorm", "final_layer_norm", "final_layernorm", "norm_f", "final_norm")
# Attribute names of poolers that read the hidden sequence and return one vector (BERT, RoBERTa, ViT, ...).
POOLER_NAMES = ("pooler",)
# sentence-transformers pooling modes, in the order they are checked, and the pooling they map to.
SENTENCE_TRANSFORMERS_POOLING = (
    ("pooling_mode_mean_tokens", "mean"),
    ("pooling_mode_cls_token", "cls"),
    ("pooling_mode_lasttoken", "last"),
)


def find_layout(model: PreTrainedModel, override: BackboneLayout | dict | None = None) -> BackboneLayout:
    """Locates the block list, final norm and pooler of a base model.

    Args:
        model: the base model (an `AutoModel`).
        override: the layout to use instead of the table or the search (`AlignedConfig.layout`).

    Raises:
        ValueError: naming the model type, for families hf_aligned cannot wrap (encoder-decoder, dual-encoder and
            hierarchical models, each with its reason), when no list or several lists of `num_hidden_layers` blocks
            of the hidden size are found, or when a listed or given layout does not match the model.
    """
    config = model.config
    model_type = config.model_type
    reason = refusal_reason(model_type, bool(getattr(config, "is_encoder_decoder", False)))
    if reason is not None:
        raise ValueError(reason)
    if override is not None:
        layout, source = BackboneLayout.from_dict(override), "`layout`"
    else:
        layout = table_layout(model_type)
        if layout is None:
            return _search_layout(model)
        # A model built without its pooler (`add_pooling_layer=False`) or final norm simply goes without it.
        absent = {name: None for name in ("final_norm", "pooler") if _get_module(model, getattr(layout, name)) is None}
        layout, source = replace(layout, **absent), f"hf_aligned's layout table entry for {model_type!r}"
    _check_layout(model, layout, source)
    return layout


def _search_layout(model: PreTrainedModel) -> BackboneLayout:
    """The generic search: the shallowest list of `num_hidden_layers` modules that output the hidden size."""
    model_type = model.config.model_type
    num_layers = num_hidden_layers(model.config)
    hidden_size = getattr(model.config.get_text_config(), "hidden_size", None)
    lists = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers
    }
    if not lists:
        raise ValueError(
            f"Model type {model_type!r} has no list of {num_layers} transformer blocks, so its per-layer hidden "
            "states cannot be read. hf_aligned wraps models whose blocks form one `nn.ModuleList` of equal-width "
            "layers (BERT-like encoders, ViT-like image encoders, decoder-only LMs); if yours keeps them elsewhere, "
            "name them with `AlignedConfig(layout={'blocks': ...})`."
        )
    candidates = [name for name, blocks in lists.items() if _keeps_width(blocks, hidden_size)]
    if not candidates:
        raise ValueError(
            f"Model type {model_type!r} has blocks of different widths ({', '.join(lists)} do not all output the "
            f"hidden size {hidden_size}); one classifier cannot read every layer. Use a model whose blocks all keep "
            "the same hidden size."
        )
    depth = min(name.count(".") for name in candidates)
    shallowest = [name for name in candidates if name.count(".") == depth]
    if len(shallowest) > 1:
        raise ValueError(
            f"Model type {model_type!r} has several lists of {num_layers} blocks that could be its layers: "
            f"{shallowest}. Name the list whose modules output the layers' hidden states (with sublayers in "
            "parallel lists, the list of each layer's last sublayer) with "
            f"`AlignedConfig(layout={{'blocks': ..., 'final_norm': ..., 'pooler': ...}})`."
        )
    blocks_path = shallowest[0]
    owner = blocks_path.rpartition(".")[0]
    return BackboneLayout(
        blocks=blocks_path,
        final_norm=_find_child(model, owner, FINAL_NORM_NAMES, _is_norm),
        pooler=_find_child(model, owner, POOLER_NAMES, lambda module: module is not None),
    )


def _check_layout(model: PreTrainedModel, layout: BackboneLayout, source: str) -> None:
    """Raises a `ValueError` naming `source` when a layout's paths do not lead to the parts it names."""
    model_type = model.config.model_type
    num_layers = num_hidden_layers(model.config)
    hidden_size = getattr(model.config.get_text_config(), "hidden_size", None)
    fix = "Pass `AlignedConfig(layout={'blocks': ..., 'final_norm': ..., 'pooler': ...})` with this model's paths."
    for name, path in layout.to_dict().items():
        if path is not None and _get_module(model, path) is None:
            raise ValueError(
                f"{source} names {name} {path!r}, but this {model_type!r} model has no such module "
                f"(its top-level modules: {[child for child, _ in model.named_children()]}). {fix}"
            )
    blocks = model.get_submodule(layout.blocks)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) != num_layers:
        raise ValueError(
            f"{source} names blocks {layout.blocks!r}, but in this {model_type!r} model that is not an "
            f"`nn.ModuleList` of {num_layers} modules (`num_hidden_layers`). {fix}"
        )
    if not _keeps_width(blocks, hidden_size):
        raise ValueError(
            f"{source} names blocks {layout.blocks!r}, but in this {model_type!r} model they do not all output the "
            f"hidden size {hidden_size}; one classifier cannot read every layer. {fix}"
        )


def _keeps_width(blocks: nn.ModuleList, hidden_size: int | None) -> bool:
    """Whether every block outputs `hidden_size` features (or, with no known hidden size, the same number).

    A block's output width is that of its last module with a known output size (a linear layer's `out_features`,
    a norm's size, a GPT-2 `Conv1D`'s `nf`), so blocks of different classes (hybrid attention / state-space stacks)
    or with an `Identity` in place of a norm still count as one width.
    """
    widths = {_output_width(block) for block in blocks} - {None}
    return widths == {hidden_size} if hidden_size is not None and widths else len(widths) <= 1


def _output_width(block: nn.Module) -> int | None:
    for module in reversed(list(block.modules())):
        for attribute in ("out_features", "nf"):
            if isinstance(getattr(module, attribute, None), int):
                return getattr(module, attribute)
        shape = getattr(module, "normalized_shape", None)
        if isinstance(shape, (tuple, list)) and shape:
            return int(shape[-1])
        weight = getattr(module, "weight", None)
        # A parameter partitioned by DeepSpeed ZeRO-3 is empty here and keeps its full shape in `ds_shape`.
        shape = getattr(weight, "ds_shape", None) or getattr(weight, "shape", None)
        if _is_norm(module) and isinstance(weight, nn.Parameter) and len(shape) == 1:
            return int(shape[0])
    return None


def _get_module(model: nn.Module, path: str | None) -> nn.Module | None:
    if path is None:
        return None
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def detach_module(model: nn.Module, path: str, replacement: nn.Module | None) -> nn.Module:
    """Takes the module at `path` out of `model`, putting `replacement` in its place, and returns it."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    module = getattr(parent, name)
    setattr(parent, name, replacement)
    return module


def _is_norm(module: nn.Module | None) -> bool:
    return module is not None and (
        isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "norm" in type(module).__name__.lower()
    )


def _find_child(
    model: nn.Module, owner: str, names: tuple[str, ...], accept: Callable[[nn.Module | None], bool]
) -> str | None:
    """Finds the first of `names` on the base model itself, then on the module that owns the block list."""
    scopes = [""] if not owner else ["", owner]
    for scope in scopes:
        parent = model.get_submodule(scope) if scope else model
        for name in names:
            if accept(getattr(parent, name, None)):
                return f"{scope}.{name}" if scope else name
    return None


def sentence_transformers_pooling(path: str | os.PathLike, hub_kwargs: dict) -> str | None:
    """The pooling a sentence-transformers checkpoint was trained with (`"mean"`, `"cls"`, `"last"`), if any."""
    modules_file = cached_file_or_none(path, "modules.json", **hub_kwargs)
    if modules_file is None:
        return None
    with open(modules_file, encoding="utf-8") as handle:
        modules = json.load(handle)
    pooling_dirs = [module["path"] for module in modules if module.get("type", "").endswith("models.Pooling")]
    if not pooling_dirs:
        return None
    subfolder = "/".join(part for part in (hub_kwargs.get("subfolder"), pooling_dirs[0]) if part)
    pooling_file = cached_file_or_none(path, "config.json", **{**hub_kwargs, "subfolder": subfolder})
    if pooling_file is None:
        return None
    with open(pooling_file, encoding="utf-8") as handle:
        pooling_config = json.load(handle)
    for key, pooling in SENTENCE_TRANSFORMERS_POOLING:
        if pooling_config.get(key):
            return pooling
    logger.warning(f"{path} uses a sentence-transformers pooling hf_aligned does not support; using the default.")
    return None
