"""Layer-wise representation similarity: pooled representations, sample-wise cosine (COS), linear CKA.

The representations compared are the pooled vectors f_l(x) of the embedding output (l = 0) and every block
(l = 1..L), as returned by `AlignedForSequenceClassification.pooled_layer_states`: before the classifier
(`stage="pre"`, the default) or where its classification layer reads them, after the projection head (`"post"`).
Every statistic is accumulated in float64, on the device the representations live on (CPU or GPU).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import eval_mode, iter_model_batches
from .utils import Representations, as_layer_list, average_ranks, pearson

logger = logging.getLogger(__name__)

# A representation whose centered norm is below this fraction of its norm is constant over samples: its CKA is
# undefined (0 / 0) and reported as NaN rather than as the ratio of two rounding errors.
CONSTANT_TOLERANCE = 1e-10


# ----------------------------------------------------------------------------------------------------------------------
# Reading representations from a model
# ----------------------------------------------------------------------------------------------------------------------


def iter_layer_representations(
    model: nn.Module,
    data: Any,
    pooling: str | None = None,
    batch_size: int = 32,
    collate_fn: Callable[[list[dict]], Mapping[str, Any]] | None = None,
    max_samples: int | None = None,
    stage: str = "pre",
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Streams pooled representations batch by batch: `([L + 1, B, D] float32 on the model's device, labels)`.

    Runs `model.pooled_layer_states` in eval mode without gradients (restoring the model's mode afterwards); the
    attention mask of padded batches decides which tokens are pooled. Use it to feed [`MinibatchCKA`] when the data
    set is too large to hold. The arguments are those of [`layer_representations`].
    """
    if not callable(getattr(model, "pooled_layer_states", None)):
        raise TypeError(
            f"{type(model).__name__} has no `pooled_layer_states`; load the model as "
            "`AlignedForSequenceClassification.from_pretrained(...)` (it wraps any base checkpoint)."
        )
    # The default stage is not passed on, so models whose `pooled_layer_states` has no stages work as well.
    options = {"pooling": pooling} if stage == "pre" else {"pooling": pooling, "stage": stage}
    with eval_mode(model), torch.no_grad():
        for inputs, labels in iter_model_batches(model, data, batch_size, collate_fn, max_samples):
            yield model.pooled_layer_states(**inputs, **options).float(), labels


def layer_representations(
    model: nn.Module,
    data: Any,
    pooling: str | None = None,
    batch_size: int = 32,
    collate_fn: Callable[[list[dict]], Mapping[str, Any]] | None = None,
    max_samples: int | None = None,
    device: str | torch.device = "cpu",
    return_labels: bool = False,
    stage: str = "pre",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
    """Pooled representations of the embedding output and of every block, `[L + 1, N, D]` float32.

    Args:
        model: an [`AlignedForSequenceClassification`] (or any model with `pooled_layer_states`).
        data: a tokenized `datasets.Dataset` (or map-style dataset of processed samples), or an iterable of dict
            batches such as a `DataLoader`. Keys the model does not take are ignored.
        pooling: `"cls"`, `"last"` or `"mean"`; defaults to the model's own pooling.
        batch_size: samples per forward pass, when `data` is a dataset.
        collate_fn: batches dataset samples; defaults to `default_data_collator` (pass
            `DataCollatorWithPadding(tokenizer)` for ragged token lists).
        max_samples: read at most this many samples.
        device: where the result is gathered (`"cpu"` by default, to keep accelerator memory free).
        return_labels: also return the labels found in the batches (`labels` / `label` / `label_ids`), or `None`.
        stage: `"pre"`: the pooled block outputs, before any part of the classifier; `"post"`: the vectors the
            classification layer reads, after the classifier's final norm, pooler and projection head (see
            `AlignedForSequenceClassification.pooled_layer_states`).

    Returns:
        The representations, or `(representations, labels)` when `return_labels` is set.

    Example:

    ```python
    >>> reps = layer_representations(model, tokenized_dataset, collate_fn=DataCollatorWithPadding(tokenizer))
    >>> reps.shape  # (num_layers + 1, num_samples, hidden_size)
    ```
    """
    chunks, label_chunks = [], []
    for states, labels in iter_layer_representations(model, data, pooling, batch_size, collate_fn, max_samples, stage):
        chunks.append(states.to(device))
        label_chunks.append(labels)
    if not chunks:
        raise ValueError("`data` yielded no samples.")
    representations = torch.cat(chunks, dim=1)
    if not return_labels:
        return representations
    if any(labels is None for labels in label_chunks):
        return representations, None
    return representations, torch.cat([labels.cpu() for labels in label_chunks])


# ----------------------------------------------------------------------------------------------------------------------
# Sample-wise cosine similarity (COS)
# ----------------------------------------------------------------------------------------------------------------------


def sample_cosine(reps: Representations, i: int, j: int) -> torch.Tensor:
    """Cosine similarity of each sample's layer-`i` and layer-`j` representations, `[N]` float64.

    A zero vector has cosine 0 with everything. Layer indices follow `reps` (0 = embedding output).
    """
    layers = as_layer_list(reps)
    return (_unit(layers[i]) * _unit(layers[j])).sum(dim=-1)


def cosine_similarity_matrix(reps: Representations, chunk_size: int = 1024) -> torch.Tensor:
    """Mean sample-wise cosine similarity between every pair of layers (the paper's COS), `[K, K]` float64.

    COS(i, j) = mean over samples of cos(f_i(x), f_j(x)); it needs no centering, so it can be read per sample
    (see [`sample_cosine`]). All layers must have the same width.

    Args:
        reps: `[K, N, D]` representations (e.g. from [`layer_representations`]), or a list of K `[N, D]` matrices.
        chunk_size: samples normalized at a time (bounds the float64 working memory).
    """
    layers = as_layer_list(reps)
    widths = {layer.shape[1] for layer in layers}
    if len(widths) != 1:
        raise ValueError(f"COS compares vectors of equal width; the layers have widths {sorted(widths)}.")
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive integer, got {chunk_size}.")
    num_samples = layers[0].shape[0]
    total = torch.zeros(len(layers), len(layers), dtype=torch.float64, device=layers[0].device)
    for start in range(0, num_samples, chunk_size):
        # sum_n <u_i(n), u_j(n)> is the dot product of the flattened unit vectors of layers i and j.
        units = torch.stack([_unit(layer[start : start + chunk_size]) for layer in layers]).flatten(1)
        total += units @ units.T
    return total / num_samples


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    return F.normalize(vectors.to(torch.float64), dim=-1)


# ----------------------------------------------------------------------------------------------------------------------
# Linear CKA, exact
# ----------------------------------------------------------------------------------------------------------------------


def linear_cka(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Linear CKA of two representations of the same N samples, `[N, D_x]` and `[N, D_y]`.

    CKA(X, Y) = ||Yᵀ X||_F² / (||Xᵀ X||_F · ||Yᵀ Y||_F) with column-centered X and Y, computed exactly in float64.
    Returns NaN when either representation is constant over the samples (CKA is then 0 / 0).
    """
    return float(cka_matrix([x, y])[0, 1])


def cka_matrix(reps: Representations, chunk_size: int = 4096) -> torch.Tensor:
    """Linear CKA between every pair of layers, `[K, K]` float64 (exact, column-centered).

    Each layer is centered once (in float64); every pair's cross term is one product, computed once for the upper
    triangle: ||Xⱼᵀ Xᵢ||_F² in feature space when N ≥ D, or ⟨Kᵢ, Kⱼ⟩ between centered Gram matrices when N < D.
    Products run in the representations' own precision: float32 representations (what models give) are multiplied in
    float32 over chunks of samples whose partial sums are accumulated in float64, which is twice as fast as float64
    products and agrees with them to about 1e-8; float64 representations, or a float32 matmul precision other than
    `"highest"` (TF32 / bfloat16 matmuls), get float64 products. Layers that are constant over the samples get NaN
    rows and columns.

    Args:
        reps: `[K, N, D]` representations, or a list of K `[N, D_k]` matrices (widths may differ).
        chunk_size: samples per float32 partial product.
    """
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive integer, got {chunk_size}.")
    layers = as_layer_list(reps)
    widths = [layer.shape[1] for layer in layers]
    # All layers side by side, each centered in float64 and stored in the product precision.
    stacked = torch.empty(layers[0].shape[0], sum(widths), dtype=_product_dtype(layers), device=layers[0].device)
    constant = []
    for layer, start in zip(layers, itertools.accumulate([0, *widths])):
        centered = _center(layer)
        scale = torch.linalg.vector_norm(layer.to(torch.float64))
        constant.append(torch.linalg.vector_norm(centered) <= CONSTANT_TOLERANCE * scale)
        stacked[:, start : start + layer.shape[1]] = centered
    hsic = _linear_hsic_matrix(stacked, widths, chunk_size)
    norms = hsic.diagonal().sqrt()
    cka = hsic / (norms[:, None] * norms[None, :])
    constant = torch.stack(constant)
    cka[constant, :] = math.nan
    cka[:, constant] = math.nan
    return cka


def layerwise_cka(first: Representations, second: Representations) -> list[float]:
    """CKA between layer l of `first` and layer l of `second`, for every l (e.g. one model at two checkpoints).

    Args:
        first: `[K, N, D]` representations (or a list of K `[N, D_k]` matrices).
        second: the same K layers of the same N samples, from another model or checkpoint.
    """
    a, b = as_layer_list(first), as_layer_list(second)
    if len(a) != len(b) or a[0].shape[0] != b[0].shape[0]:
        raise ValueError(
            f"`first` and `second` must hold the same layers of the same samples; got {len(a)} layers of "
            f"{a[0].shape[0]} samples and {len(b)} layers of {b[0].shape[0]} samples."
        )
    return [linear_cka(x, y.to(x.device)) for x, y in zip(a, b)]


def _linear_hsic_matrix(stacked: torch.Tensor, widths: list[int], chunk_size: int) -> torch.Tensor:
    """Unnormalized biased linear HSIC ||X̄ⱼᵀ X̄ᵢ||_F² for every pair of layers, from `[N, ΣD]` centered layers."""
    count = len(widths)
    offsets = list(itertools.accumulate([0, *widths]))
    if stacked.shape[0] < max(widths):
        # Gram space is smaller here; the Gram matrices take no more memory than the layers themselves.
        blocks = [stacked[:, offsets[i] : offsets[i + 1]].double() for i in range(count)]
        grams = torch.stack([block @ block.T for block in blocks]).flatten(1)
        return grams @ grams.T
    device = stacked.device
    layer_of_column = torch.repeat_interleave(torch.arange(count, device=device), torch.tensor(widths, device=device))
    hsic = torch.zeros(count, count, dtype=torch.float64, device=device)
    for i in range(count):
        # One product per layer against itself and every later layer: each unordered pair is computed once.
        cross = _cross_product(stacked[:, offsets[i] : offsets[i + 1]], stacked[:, offsets[i] :], chunk_size)
        hsic[i, i:].index_add_(0, layer_of_column[offsets[i] :] - i, cross.square().sum(dim=0))
    return hsic.triu() + hsic.triu(diagonal=1).T


def _cross_product(x: torch.Tensor, y: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """xᵀ y in float64: float32 products over chunks of samples with float64 partial sums, or one float64 product."""
    if x.dtype == torch.float64:
        return x.T @ y
    cross = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], chunk_size):
        cross += x[start : start + chunk_size].T @ y[start : start + chunk_size]
    return cross


def _product_dtype(layers: list[torch.Tensor]) -> torch.dtype:
    exact_float32 = torch.get_float32_matmul_precision() == "highest"
    if exact_float32 and all(layer.dtype in (torch.float32, torch.float16, torch.bfloat16) for layer in layers):
        return torch.float32
    return torch.float64


def _center(layer: torch.Tensor) -> torch.Tensor:
    layer = layer.to(torch.float64)
    return layer - layer.mean(dim=0, keepdim=True)


# ----------------------------------------------------------------------------------------------------------------------
# Linear CKA, minibatch (unbiased HSIC)
# ----------------------------------------------------------------------------------------------------------------------


class MinibatchCKA:
    """Linear CKA accumulated over minibatches with the unbiased HSIC estimator, for data too large to hold.

    Following Nguyen, Raghu & Kornblith (2021): for every minibatch the unbiased HSIC of Song et al. (2012) is
    computed between every pair of layers; CKA = mean HSIC(X, Y) / sqrt(mean HSIC(X, X) · mean HSIC(Y, Y)). Being
    unbiased, the average over small batches does not drift with the batch size as the biased estimator would.

    Example:

    ```python
    >>> accumulator = MinibatchCKA()
    >>> for states, _ in iter_layer_representations(model, dataset, batch_size=256):
    ...     accumulator.update(states)
    >>> cka = accumulator.compute()  # [L + 1, L + 1]
    ```
    """

    def __init__(self):
        self.hsic_sum: torch.Tensor | None = None
        self.num_batches = 0

    def update(self, reps: Representations) -> None:
        """Adds one minibatch: `[K, B, D]` representations or a list of K `[B, D_k]` matrices.

        Batches of fewer than 4 samples (for which the unbiased estimator is undefined) are skipped with a warning.
        """
        layers = as_layer_list(reps)
        batch_size = layers[0].shape[0]
        if batch_size < 4:
            logger.warning(f"Skipping a minibatch of {batch_size} samples: unbiased HSIC needs at least 4.")
            return
        if self.hsic_sum is not None and self.hsic_sum.shape[0] != len(layers):
            raise ValueError(
                f"This accumulator holds {self.hsic_sum.shape[0]} layers but the batch has {len(layers)}; use one "
                "`MinibatchCKA` per set of layers."
            )
        hsic = unbiased_hsic_matrix(layers)
        self.hsic_sum = hsic if self.hsic_sum is None else self.hsic_sum + hsic.to(self.hsic_sum.device)
        self.num_batches += 1

    def compute(self) -> torch.Tensor:
        """The CKA matrix `[K, K]` float64 from the batches seen so far (NaN where a layer's HSIC is not positive)."""
        if self.hsic_sum is None:
            raise ValueError("`MinibatchCKA.compute()` called before any batch of at least 4 samples was added.")
        hsic = self.hsic_sum / self.num_batches
        norms = hsic.diagonal().clamp(min=0.0).sqrt()
        cka = hsic / (norms[:, None] * norms[None, :])
        invalid = norms <= 0
        cka[invalid, :] = math.nan
        cka[:, invalid] = math.nan
        return cka


def minibatch_cka(batches: Iterable[Representations | tuple[Representations, Any]]) -> torch.Tensor:
    """CKA matrix `[K, K]` from a stream of minibatches, with [`MinibatchCKA`].

    Args:
        batches: `[K, B, D]` representation batches, or `(representations, labels)` pairs as yielded by
            [`iter_layer_representations`].

    Example:

    ```python
    >>> cka = minibatch_cka(iter_layer_representations(model, dataset, batch_size=256))
    ```
    """
    accumulator = MinibatchCKA()
    for batch in batches:
        accumulator.update(batch[0] if isinstance(batch, tuple) else batch)
    return accumulator.compute()


def unbiased_hsic_matrix(reps: Representations) -> torch.Tensor:
    """The unbiased linear HSIC estimator (Song et al., 2012) between every pair of layers of one batch, `[K, K]`.

    With K̃ the Gram matrix with its diagonal set to zero and n the batch size:
    HSIC₁(K, L) = [tr(K̃L̃) + 1ᵀK̃1 · 1ᵀL̃1 / ((n-1)(n-2)) - 2/(n-2) · 1ᵀK̃L̃1] / (n(n-3)).
    """
    layers = as_layer_list(reps)
    n = layers[0].shape[0]
    if n < 4:
        raise ValueError(f"The unbiased HSIC estimator needs at least 4 samples, got {n}.")
    grams = torch.stack([layer.to(torch.float64) @ layer.to(torch.float64).T for layer in layers])
    grams.diagonal(dim1=1, dim2=2).zero_()
    row_sums = grams.sum(dim=2)
    totals = row_sums.sum(dim=1)
    flat = grams.flatten(1)
    trace = flat @ flat.T
    return (
        trace + totals[:, None] * totals[None, :] / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * row_sums @ row_sums.T
    ) / (n * (n - 3))


# ----------------------------------------------------------------------------------------------------------------------
# Summaries of similarity matrices
# ----------------------------------------------------------------------------------------------------------------------


def similarity_agreement(first: torch.Tensor | np.ndarray, second: torch.Tensor | np.ndarray) -> dict[str, float]:
    """How well two layer-similarity matrices agree (e.g. COS and CKA): correlations over off-diagonal entries.

    Both matrices are symmetric, so each pair of layers i < j is counted once; pairs where either matrix is NaN are
    left out.

    Returns:
        `{"spearman": ..., "pearson": ..., "num_pairs": ...}` (Spearman with average ranks for ties).
    """
    a, b = _as_numpy_matrix(first, "first"), _as_numpy_matrix(second, "second")
    if a.shape != b.shape:
        raise ValueError(f"The matrices differ in shape: {a.shape} vs {b.shape}.")
    rows, cols = np.triu_indices(a.shape[0], k=1)
    x, y = a[rows, cols], b[rows, cols]
    kept = ~(np.isnan(x) | np.isnan(y))
    x, y = x[kept], y[kept]
    if x.size < 2:
        raise ValueError(f"Need at least 2 off-diagonal pairs without NaN to correlate, got {x.size}.")
    return {
        "spearman": pearson(average_ranks(x), average_ranks(y)),
        "pearson": pearson(x, y),
        "num_pairs": int(x.size),
    }


def off_diagonal_mean(matrix: torch.Tensor | np.ndarray) -> float:
    """Mean of the off-diagonal entries of a similarity matrix, ignoring NaN."""
    values = _as_numpy_matrix(matrix, "matrix")
    return _nan_mean(values[~np.eye(values.shape[0], dtype=bool)])


def similarity_by_distance(matrix: torch.Tensor | np.ndarray) -> list[float]:
    """Mean similarity of layer pairs `k` apart, for k = 1..K-1 (shows similarity falling with layer distance).

    NaN entries are ignored; a distance with no defined entry gives NaN.
    """
    values = _as_numpy_matrix(matrix, "matrix")
    return [_nan_mean(np.diagonal(values, offset=k)) for k in range(1, values.shape[0])]


def _nan_mean(values: np.ndarray) -> float:
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else math.nan


def _as_numpy_matrix(matrix: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    values = matrix.detach().cpu().numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix)
    values = values.astype(np.float64)
    if values.ndim != 2 or values.shape[0] != values.shape[1]:
        raise ValueError(f"`{name}` must be a square [K, K] matrix, got shape {values.shape}.")
    return values
