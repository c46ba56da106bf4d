"""Self-speculative decoding of an aligned causal LM: the first k blocks draft tokens that the full model verifies.

[`early_exit_draft`] makes the draft (a view of the model's first k blocks, sharing every weight),
[`draft_generation_kwargs`] turns `generate(..., assistant_early_exit=k)` into transformers' assisted generation with
that draft, and [`suggest_assistant_early_exit`] picks k from measured layer agreement.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PreTrainedModel

# Generation settings of the draft (transformers reads them from the assistant model's generation config).
DRAFT_SETTINGS = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")


def early_exit_draft(
    model: PreTrainedModel, blocks: nn.ModuleList, blocks_path: str, num_layers: int
) -> PreTrainedModel:
    """A view of `model` with only its first `num_layers` blocks, sharing every weight: the draft model of
    self-speculative decoding. Nothing of `model` changes, so calls in other threads are unaffected.

    Args:
        blocks: the model's list of blocks, found at `blocks_path` below its base model.

    Raises:
        ValueError: if `num_layers` is not between 1 and L - 1.
    """
    total = len(blocks)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers < total:
        raise ValueError(
            f"`assistant_early_exit={num_layers!r}` must be an integer between 1 and {total - 1} (the "
            "draft runs that many of the model's blocks)."
        )
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = num_layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:num_layers]
    draft = _shallow_copy(model)
    draft.config = config
    draft.generation_config = copy.deepcopy(model.generation_config)
    module = draft
    path = [model.base_model_prefix, *blocks_path.split(".")]
    for name in path[:-1]:
        child = _shallow_copy(module._modules[name])
        if getattr(child, "config", None) is model.config:
            child.config = config
        module._modules[name] = child
        module = child
    module._modules[path[-1]] = nn.ModuleList(list(blocks)[:num_layers])
    return draft


def draft_generation_kwargs(model: PreTrainedModel, assistant_early_exit: int | None, kwargs: dict[str, Any]) -> dict:
    """The keyword arguments of transformers' `generate` for a call with `assistant_early_exit` (or a generation
    config that sets it): assisted generation with the model's [`early_exit_draft`], the draft's settings
    (`DRAFT_SETTINGS`) taken from the call, else the model's generation config. Without a draft depth, `kwargs` as
    they are.

    Raises:
        ValueError: for a depth outside [1, L - 1], or together with an `assistant_model`.
    """
    source = kwargs.get("generation_config") or model.generation_config
    if assistant_early_exit is None:
        assistant_early_exit = getattr(source, "assistant_early_exit", None)
    if assistant_early_exit is None:
        return kwargs
    kwargs = dict(kwargs)
    if kwargs.get("assistant_model") is not None:
        raise ValueError("Pass either `assistant_early_exit` or `assistant_model`, not both.")
    if getattr(source, "assistant_early_exit", None) is not None:
        # transformers would draft with its own early exit too: the draft below replaces it.
        kwargs["generation_config"] = copy.deepcopy(source)
        kwargs["generation_config"].assistant_early_exit = None
    draft = model.early_exit_draft(assistant_early_exit)
    for name in DRAFT_SETTINGS:
        value = kwargs.pop(name, None)
        value = value if value is not None else getattr(source, name, None)
        if value is not None:
            setattr(draft.generation_config, name, value)
    kwargs["assistant_model"] = draft
    return kwargs


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object sharing `module`'s parameters, buffers and hooks, with its own table of submodules."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    return clone


@dataclass(frozen=True)
class SpeculationEstimate:
    """A draft depth for self-speculative decoding and what a simple cost model expects of it.

    Attributes:
        assistant_early_exit: the number of blocks k the draft runs.
        num_assistant_tokens: the draft length g the estimate assumes.
        expected_speedup: expected tokens per full-model-equivalent of compute, relative to plain decoding.
        acceptance: the agreement of block k with the last block that the estimate used.
    """

    assistant_early_exit: int
    num_assistant_tokens: int
    expected_speedup: float
    acceptance: float


def suggest_assistant_early_exit(
    layer_agreement: Sequence[float], max_assistant_tokens: int = 16, draft_overhead: float = 0.0
) -> SpeculationEstimate | None:
    """Picks the draft depth k that a speculative-decoding cost model expects to be fastest.

    With acceptance a_k (block k's top-1 agreement with the last block, e.g. `eval_layer_{k}_agreement`), a draft of
    g tokens yields (1 - a^(g+1)) / (1 - a) tokens per round and costs g · c_k + 1 full forwards, where
    c_k = k / L + `draft_overhead` is a draft step's cost relative to a full step (blocks dominate the compute).

    Args:
        layer_agreement: one agreement per block, block 1 first (the last is 1).
        max_assistant_tokens: the longest draft considered.
        draft_overhead: per-step draft cost not proportional to depth (embedding, head, framework), as a fraction of
            a full step.

    Returns:
        The fastest draft, or `None` when no draft is expected to beat plain decoding (best speed-up <= 1): decode
        without `assistant_early_exit` then.

    Raises:
        ValueError: for fewer than 2 layers, agreements outside [0, 1], a `max_assistant_tokens` that is not a
            positive integer or a negative `draft_overhead`.
    """
    agreement = [float(value) for value in layer_agreement]
    if len(agreement) < 2 or any(not 0.0 <= value <= 1.0 for value in agreement):
        raise ValueError(f"`layer_agreement` needs one value in [0, 1] per block (at least 2), got {agreement}.")
    if isinstance(max_assistant_tokens, bool) or not isinstance(max_assistant_tokens, int) or max_assistant_tokens < 1:
        raise ValueError(f"`max_assistant_tokens={max_assistant_tokens!r}` must be a positive integer (default 16).")
    if not 0.0 <= draft_overhead < float("inf"):
        raise ValueError(
            f"`draft_overhead={draft_overhead!r}` must be a finite non-negative fraction of a full step (default 0)."
        )
    num_layers = len(agreement)
    best = None
    for layer, alpha in enumerate(agreement[:-1], start=1):
        cost = layer / num_layers + draft_overhead
        for tokens in range(1, max_assistant_tokens + 1):
            produced = tokens + 1 if alpha >= 1.0 else (1 - alpha ** (tokens + 1)) / (1 - alpha)
            speedup = produced / (tokens * cost + 1)
            if best is None or speedup > best.expected_speedup:
                best = SpeculationEstimate(layer, tokens, speedup, alpha)
    return best if best.expected_speedup > 1.0 else None
