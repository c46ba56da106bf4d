"""Helpers the analyses share: representations checked into per-layer matrices, rank correlation, strict JSON."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

# Keyword arguments of `from_pretrained` that locate files (shared by the config, the weights and side files).
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "trust_remote_code")


def hub_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The `HUB_KWARGS` among a `from_pretrained` call's keyword arguments (left in place)."""
    return {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}


# Per-layer representations: a `[num_layers, num_samples, dim]` array or a list of `[num_samples, dim_k]` matrices.
Representations = torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]


def as_layer_list(reps: Representations) -> list[torch.Tensor]:
    """Validates representations and returns them as a list of K `[N, D_k]` tensors.

    Raises:
        ValueError: for anything but a `[K, N, D]` array or a non-empty list of `[N, D_k]` matrices with equal N.
    """
    if isinstance(reps, (torch.Tensor, np.ndarray)):
        tensor = torch.as_tensor(reps)
        if tensor.ndim != 3:
            raise ValueError(
                f"Representations must have shape [num_layers, num_samples, dim], got {tuple(tensor.shape)}."
            )
        layers = list(tensor.unbind(0))
    else:
        layers = [torch.as_tensor(layer) for layer in reps]
    if not layers:
        raise ValueError("Representations hold no layers.")
    for index, layer in enumerate(layers):
        if layer.ndim != 2:
            raise ValueError(f"Layer {index} must be a [num_samples, dim] matrix, got shape {tuple(layer.shape)}.")
        if not layer.is_floating_point():
            raise TypeError(f"Layer {index} holds {layer.dtype} values; representations must be floating point.")
    sizes = {layer.shape[0] for layer in layers}
    if len(sizes) != 1:
        raise ValueError(f"Every layer must hold the same samples; got sample counts {sorted(sizes)}.")
    return layers


def json_safe(value: Any) -> Any:
    """`value` ready for strict JSON: tensors and arrays become lists, NumPy scalars Python ones, NaN `None`."""
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        value = value.tolist()
    if isinstance(value, Mapping):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`, ties sharing the mean of their ranks (as Spearman's correlation needs)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Start of each run of equal values, then every member of a run gets the mean of the run's 1-based ranks.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], values.size]
    ranks = np.empty(values.size, dtype=np.float64)
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's correlation of two vectors; NaN when either is constant."""
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / denominator if denominator > 0 else math.nan


# Attributes under which attention modules keep a functional dropout probability (e.g. Llama's `attention_dropout`).
_DROPOUT_ATTRIBUTES = ("dropout", "attention_dropout", "attn_dropout", "dropout_p")


def has_active_dropout(model: torch.nn.Module) -> bool:
    """Whether `model` drops anything in train mode: a dropout module with p > 0, or an attention module keeping a
    positive dropout probability as a float (`attention_dropout` of Llama-like families)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            return True
        for name in _DROPOUT_ATTRIBUTES:
            value = getattr(module, name, None)
            if isinstance(value, float) and value > 0:
                return True
    return False
