"""Where each model family keeps the parts the aligned classifier needs.

Every transformer that hf_aligned can wrap has one list of equal-width blocks; most pre-norm families apply a final
norm after the last block, and BERT-like encoders have a pooler. This module finds those parts once, generically, from
small tables of attribute names, so that adding a family means adding a name here and nothing elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel

from .configuration_aligned import num_hidden_layers

# Attribute names under which families keep the norm applied after their last block (ViT: layernorm, GPT-2 and
# Falcon: ln_f, Llama / Mistral / Qwen: norm, GPT-NeoX / OPT / T5 encoder: final_layer_norm, Phi: final_layernorm).
FINAL_NORM_NAMES = ("norm", "ln_f", "layernorm", "final_layer_norm", "final_layernorm", "norm_f")
# Attribute names of poolers that read the hidden sequence and return one vector (BERT, RoBERTa, ViT, ...).
POOLER_NAMES = ("pooler",)


@dataclass(frozen=True)
class BackboneLayout:
    """Where the parts of one base model live, as dotted attribute paths from the base model.

    Attributes:
        blocks: path of the `nn.ModuleList` of transformer blocks.
        final_norm: path of the norm applied after the last block, or `None` (post-norm encoders).
        pooler: path of the pooler, or `None`.
    """

    blocks: str
    final_norm: str | None
    pooler: str | None


def find_layout(model: PreTrainedModel) -> BackboneLayout:
    """Locates the block list, final norm and pooler of a base model.

    Raises:
        ValueError: naming the model type, when the model has no single list of `num_hidden_layers` blocks (so its
            per-layer representations cannot be read) or when its blocks differ in width (Swin-like hierarchies).
    """
    model_type = model.config.model_type
    num_layers = num_hidden_layers(model.config)
    candidates = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) == num_layers
        and len({type(block) for block in module}) == 1
    ]
    if not candidates:
        raise ValueError(
            f"Model type {model_type!r} has no list of {num_layers} transformer blocks, so its per-layer hidden "
            "states cannot be read. hf_aligned wraps models whose blocks form one `nn.ModuleList` of equal-width "
            "layers (BERT-like encoders, ViT-like image encoders, decoder-only LMs)."
        )
    blocks_path = min(candidates, key=lambda name: (name.count("."), name))
    blocks = model.get_submodule(blocks_path)
    shapes = {_parameter_shapes(block) for block in blocks}
    if len(shapes) != 1:
        raise ValueError(
            f"Model type {model_type!r} has blocks of different widths (a hierarchical, Swin-like model); one "
            "classifier cannot read every layer. Use a model whose blocks all keep the same hidden size."
        )
    owner = blocks_path.rpartition(".")[0]
    return BackboneLayout(
        blocks=blocks_path,
        final_norm=_find_child(model, owner, FINAL_NORM_NAMES, _is_norm),
        pooler=_find_child(model, owner, POOLER_NAMES, lambda module: module is not None),
    )


def detach_module(model: nn.Module, path: str, replacement: nn.Module | None) -> nn.Module:
    """Takes the module at `path` out of `model`, putting `replacement` in its place, and returns it."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    module = getattr(parent, name)
    setattr(parent, name, replacement)
    return module


def _parameter_shapes(module: nn.Module) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(parameter.shape) for parameter in module.parameters())


def _is_norm(module: nn.Module | None) -> bool:
    return module is not None and (
        isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "norm" in type(module).__name__.lower()
    )


def _find_child(model: nn.Module, owner: str, names: tuple[str, ...], accept) -> str | None:
    """Finds the first of `names` on the base model itself, then on the module that owns the block list."""
    scopes = [""] if not owner else ["", owner]
    for scope in scopes:
        parent = model.get_submodule(scope) if scope else model
        for name in names:
            if accept(getattr(parent, name, None)):
                return f"{scope}.{name}" if scope else name
    return None
