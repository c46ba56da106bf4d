"""Streaming a dataset through a model in batches: one place for what every analysis loop needs."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, default_data_collator

LABEL_COLUMNS = ("labels", "label")


def model_batches(
    model: PreTrainedModel,
    data: Any,
    batch_size: int = 32,
    collate_fn: Callable[[list[dict]], dict] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yields batches of model inputs (and `labels`, when the data has them) on the model's device.

    Args:
        model: the model the batches are for; only columns its `forward` accepts are kept.
        data: a `datasets.Dataset` (already tokenized or processed; a `label` column is renamed `labels`), a
            `DataLoader`, or any iterable of dict batches.
        batch_size: batch size when `data` is a dataset.
        collate_fn: how to batch dataset rows, e.g. `DataCollatorWithPadding(tokenizer)` for unpadded token ids;
            defaults to stacking equal-length rows.

    Raises:
        TypeError: if `data` is not a dataset or an iterable of dict batches.
    """
    accepted = set(inspect.signature(model.forward).parameters) | set(LABEL_COLUMNS)
    if hasattr(data, "column_names") and hasattr(data, "__getitem__"):
        columns = [name for name in data.column_names if name in accepted]
        data = DataLoader(
            data.with_format("torch", columns=columns) if hasattr(data, "with_format") else data,
            batch_size=batch_size,
            collate_fn=collate_fn or default_data_collator,
        )
    elif not isinstance(data, Iterable):
        raise TypeError(f"`data` must be a datasets.Dataset, a DataLoader or an iterable of dicts, got {type(data)}.")
    device = model.device
    for batch in data:
        if not isinstance(batch, Mapping):
            raise TypeError(f"batches must be mappings of tensors, got {type(batch).__name__}.")
        batch = {("labels" if name == "label" else name): value for name, value in batch.items() if name in accepted}
        yield {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in batch.items()}
