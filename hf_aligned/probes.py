"""Per-layer accuracy: the model's own classifier after every block, and linear probes on frozen representations.

The shared classifier's accuracy after block l says what *the model* can do when it exits there; a logistic
regression probe trained on layer l's pooled representation says what is *linearly decodable* there. Reading the
two side by side separates "the information is not there yet" from "the classifier cannot read it".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import eval_mode, iter_model_batches
from .utils import as_layer_list


@dataclass
class ProbeResults:
    """Accuracy of one linear probe per layer.

    Attributes:
        train_accuracy: accuracy on the probe's own training samples, one value per layer.
        test_accuracy: accuracy on the held-out samples, one value per layer.
        num_train: number of training samples.
        num_test: number of held-out samples.
    """

    train_accuracy: list[float]
    test_accuracy: list[float]
    num_train: int
    num_test: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def linear_probe_accuracy(
    reps: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    test_size: float = 0.25,
    seed: int = 0,
    regularization: float = 1.0,
    max_iter: int = 1000,
) -> ProbeResults:
    """Trains a logistic-regression probe on every layer's frozen representations and measures held-out accuracy.

    Every layer uses the same stratified train/test split; features are standardized with statistics of the
    training part only. Needs the `probes` extra (scikit-learn).

    Args:
        reps: `[K, N, D]` representations (e.g. from [`layer_representations`]), or a list of K `[N, D_k]` matrices.
        labels: `[N]` class labels.
        test_size: fraction of the samples held out for testing.
        seed: seed of the split and of the solver.
        regularization: inverse L2 regularization strength (scikit-learn's `C`).
        max_iter: solver iterations.

    Raises:
        ValueError: for labels that do not match the samples, fewer than two classes, or a bad `test_size`.
    """
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import train_test_split
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError as error:
        raise ImportError(
            "Linear probes need scikit-learn: `pip install 'hf-aligned[probes]'` (or `pip install scikit-learn`)."
        ) from error
    layers = [layer.detach().cpu().to(torch.float64).numpy() for layer in as_layer_list(reps)]
    targets = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if targets.ndim != 1 or len(targets) != len(layers[0]):
        raise ValueError(
            f"`labels` must hold one class per sample ({len(layers[0])}), got shape {tuple(targets.shape)}."
        )
    classes, counts = np.unique(targets, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"A probe needs at least 2 classes; `labels` holds only {classes.tolist()}.")
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"`test_size` must lie strictly between 0 and 1, got {test_size}.")
    train_index, test_index = train_test_split(
        np.arange(len(targets)),
        test_size=test_size,
        random_state=seed,
        stratify=targets if counts.min() >= 2 else None,
    )
    train_accuracy, test_accuracy = [], []
    for features in layers:
        probe = make_pipeline(
            StandardScaler(), LogisticRegression(C=regularization, max_iter=max_iter, random_state=seed)
        )
        probe.fit(features[train_index], targets[train_index])
        train_accuracy.append(float(probe.score(features[train_index], targets[train_index])))
        test_accuracy.append(float(probe.score(features[test_index], targets[test_index])))
    return ProbeResults(train_accuracy, test_accuracy, num_train=len(train_index), num_test=len(test_index))


def classifier_layer_accuracy(
    model: nn.Module,
    data: Any,
    batch_size: int = 32,
    collate_fn: Callable[[list[dict]], Mapping[str, Any]] | None = None,
    max_samples: int | None = None,
) -> list[float]:
    """Accuracy of the model's own classifier after every block, `[L]` (block 1 first).

    Reads `layer_logits` of an [`AlignedForSequenceClassification`] in eval mode without gradients; samples whose
    label is -100 are ignored. `data`, `batch_size`, `collate_fn` and `max_samples` are as in
    [`layer_representations`]; the batches must carry labels (`labels`, `label` or `label_ids`).
    """
    correct, total = None, 0
    with eval_mode(model), torch.no_grad():
        for inputs, labels in iter_model_batches(model, data, batch_size, collate_fn, max_samples):
            if labels is None:
                raise ValueError("Per-layer accuracy needs labels: the batches hold no `labels` / `label` column.")
            layer_logits = model(**inputs, output_layer_logits=True).layer_logits
            labels = labels.to(layer_logits.device).view(-1)
            counted = labels != -100
            hits = ((layer_logits.argmax(dim=-1) == labels) & counted).sum(dim=1).double()
            correct = hits if correct is None else correct + hits
            total += int(counted.sum())
    if correct is None or total == 0:
        raise ValueError("`data` yielded no labelled samples.")
    return (correct / total).tolist()
