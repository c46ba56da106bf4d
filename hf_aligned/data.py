"""Streaming a dataset through a model in batches: the one loop every analysis (similarity, probes, calibration,
saturation) shares, and the per-layer logits read through it."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

# Batch keys that hold the targets of a batch, in the order they are looked up.
LABEL_KEYS = ("labels", "label", "label_ids")


def iter_model_batches(
    model: nn.Module,
    data: Any,
    batch_size: int = 32,
    collate_fn: Callable[[list[dict]], Mapping[str, Any]] | None = None,
    max_samples: int | None = None,
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor | None]]:
    """Streams `data` as `(model inputs on the model's device, labels or None)` batches.

    Args:
        model: the model the inputs are for; batch keys that its base model's `forward` does not take (text
            columns, ids, labels) are left out of the inputs.
        data: a `datasets.Dataset` or any map-style dataset of already tokenized / processed samples, batched here
            with `collate_fn`; or an iterable of dict batches (a `DataLoader`, a list of dicts).
        batch_size: samples per batch, when `data` is a dataset.
        collate_fn: turns a list of samples into a batch of tensors, when `data` is a dataset. Defaults to
            `transformers.default_data_collator`, which needs equal-length samples; pass
            `DataCollatorWithPadding(tokenizer)` for ragged token lists.
        max_samples: stop after this many samples.

    Raises:
        ValueError: for a non-positive `batch_size` or `max_samples`, or a dataset that cannot be batched.
        TypeError: for data that is neither a dataset nor an iterable of dict batches.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size}.")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"`max_samples` must be a positive integer or None, got {max_samples}.")
    input_names = _model_input_names(model)
    device = _model_device(model)
    seen = 0
    for batch in _with_progress(_batches(data, batch_size, collate_fn, input_names, max_samples)):
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"Expected dict batches (input name -> tensor), got {type(batch).__name__}. Pass a tokenized "
                "`datasets.Dataset` or a DataLoader whose collate function returns dicts."
            )
        inputs = {
            name: torch.as_tensor(value).to(device)
            for name, value in batch.items()
            if name in input_names and value is not None
        }
        if not inputs:
            raise ValueError(
                f"A batch holds none of the model's inputs {sorted(input_names)} (it has {sorted(batch)}); "
                "tokenize / process the data first."
            )
        labels = next((torch.as_tensor(batch[key]) for key in LABEL_KEYS if batch.get(key) is not None), None)
        size = len(next(iter(inputs.values())))
        if max_samples is not None and seen + size > max_samples:
            keep = max_samples - seen
            inputs = {name: value[:keep] for name, value in inputs.items()}
            labels = labels[:keep] if labels is not None else None
            size = keep
        yield inputs, labels
        seen += size
        if max_samples is not None and seen >= max_samples:
            return


# The description of the progress bar batch loops show in this context (None: no bar); set by `show_progress`.
_progress_description: ContextVar[str | None] = ContextVar("hf_aligned_progress", default=None)


def _with_progress(batches: Iterable[Any]) -> Iterable[Any]:
    """`batches` behind a progress bar when this context shows one ([`show_progress`])."""
    description = _progress_description.get()
    if description is None:
        return batches
    from transformers.utils.logging import tqdm

    total = len(batches) if hasattr(batches, "__len__") else None
    # Every batch refreshes the bar (batches take far longer than a refresh), so its last state is always shown.
    return tqdm(batches, desc=description, total=total, unit="batch", leave=False, mininterval=0)


@contextmanager
def show_progress(description: str) -> Iterator[None]:
    """Within the block, passes over a dataset in this thread / context ([`iter_model_batches`]) show a progress bar
    named `description` (transformers' tqdm, on stderr; `transformers.utils.logging.disable_progress_bar()` hides
    it), as the `hf-aligned` command does for its long steps."""
    token = _progress_description.set(description)
    try:
        yield
    finally:
        _progress_description.reset(token)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Puts `model` in eval mode for the duration of the block, then restores its previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def collect_layer_logits(
    model: nn.Module,
    data: Any,
    batch_size: int = 32,
    collate_fn: Callable[[list[dict]], Mapping[str, Any]] | None = None,
    max_samples: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The classifier's scores after every block on a data set, `([L, N, C] float32 on the CPU, labels or None)`.

    Runs the full forward (no early exit) in eval mode without gradients, restoring the model's mode afterwards.
    `data`, `batch_size`, `collate_fn` and `max_samples` are as in [`iter_model_batches`]; labels are `None` unless
    every batch carries them.
    """
    chunks, label_chunks = [], []
    with eval_mode(model), torch.no_grad():
        for inputs, labels in iter_model_batches(model, data, batch_size, collate_fn, max_samples):
            chunks.append(model(**inputs, output_layer_logits=True).layer_logits.float().cpu())
            label_chunks.append(labels)
    if not chunks:
        raise ValueError("`data` yielded no samples.")
    labels = None if any(item is None for item in label_chunks) else torch.cat([item.cpu() for item in label_chunks])
    return torch.cat(chunks, dim=1), labels


def _model_input_names(model: nn.Module) -> set[str]:
    """Named inputs of the base model's `forward`, less `labels` (for wrappers, those of the model itself)."""
    base = getattr(model, "base_model", model)
    parameters = inspect.signature(base.forward).parameters.values()
    named = {p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return named - {"labels", "return_dict", "output_hidden_states", "output_attentions", "use_cache"}


def _model_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def _batches(
    data: Any,
    batch_size: int,
    collate_fn: Callable | None,
    input_names: set[str],
    max_samples: int | None,
) -> Iterable[Mapping[str, Any]]:
    from torch.utils.data import DataLoader

    if isinstance(data, DataLoader) or not _is_map_style(data):
        if not isinstance(data, Iterable) or isinstance(data, (str, bytes, Mapping)):
            raise TypeError(
                f"`data` must be a dataset or an iterable of dict batches, got {type(data).__name__}. For a single "
                "batch, pass `[batch]`."
            )
        return data
    if max_samples is not None and hasattr(data, "select") and max_samples < len(data):
        data = data.select(range(max_samples))
    if collate_fn is None:
        from transformers import default_data_collator

        collate_fn = _explain_collate_errors(default_data_collator)
    kept = input_names | set(LABEL_KEYS)

    def collate(samples: list[Mapping[str, Any]]) -> Mapping[str, Any]:
        # Columns the model does not read (raw text, ids) would trip the collator: leave them out first.
        return collate_fn([{key: value for key, value in sample.items() if key in kept} for sample in samples])

    return DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate)


def _is_map_style(data: Any) -> bool:
    return hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (list, tuple))


def _explain_collate_errors(collate_fn: Callable) -> Callable:
    def collate(samples: list[dict]) -> Mapping[str, Any]:
        try:
            return collate_fn(samples)
        except (ValueError, RuntimeError, TypeError) as error:
            ragged = _ragged_columns(samples)
            if not ragged:
                raise
            raise ValueError(
                f"Could not batch the dataset's samples: {ragged} have different lengths from sample to sample "
                f"({error}). Pad them: pass `collate_fn=DataCollatorWithPadding(tokenizer)`, or tokenize with "
                "`padding='max_length'`."
            ) from error

    return collate


def _ragged_columns(samples: list[Mapping[str, Any]]) -> list[str]:
    """The columns whose sequences have different lengths in different samples (those that need padding)."""

    def length(value: Any) -> int | None:
        if isinstance(value, (list, tuple)) or getattr(value, "ndim", 0) > 0:
            return len(value)
        return None

    ragged = []
    for key in samples[0] if samples else ():
        if len({length(sample.get(key)) for sample in samples}) > 1:
            ragged.append(key)
    return ragged
