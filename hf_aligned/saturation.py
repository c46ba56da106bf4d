"""Saturation layers and the probability-similarity relation: the ICLR version's analysis claims, measured.

Two readings of the shared classifier applied after every block (`layer_logits`), for single-label classification:

- **saturation layer** of a sample: the first 1-based layer l from which the top-1 prediction stays the same up to
  the last layer L (the paper's claim 5 is that aligned training brings more early saturation events). Every sample saturates at layer L at the latest: a sample whose prediction still changes at the
  last layer has saturation layer L. It is the hindsight view of early exit's patience rule, which leaves once the
  prediction has held for p more layers: a sample with saturation layer s has left by layer min(s + p, L), and a
  sample that leaves at or after s leaves with the full-depth prediction; only samples leaving before s (their
  prediction held p layers, then changed) can disagree with full depth.
- **probability vs similarity** (claim 4): per layer l and sample x, the cosine similarity of f_l(x) to f_L(x)
  against the probability the classifier at l gives the last layer's class (and the true class). f_l(x) is the
  pooled representation that similarity analyses compare (`pooled_layer_states`: block l's hidden states reduced with
  the model's pooling, before the classifier's final norm and pooler).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from .similarity import sample_cosine
from .utils import as_layer_list, average_ranks, pearson

# ----------------------------------------------------------------------------------------------------------------------
# Saturation layers
# ----------------------------------------------------------------------------------------------------------------------


def layer_predictions(layer_logits: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Top-1 class of every layer and sample, `[L, N]` int64, from `[L, N, C]` scores or `[L, N]` class ids.

    Ties go to the lowest class index (as `argmax`).

    Raises:
        ValueError: for another shape, no layers or samples, or a single score per sample (regression or one
            binary logit, for which top-1 is not defined).
    """
    values = torch.as_tensor(layer_logits)
    if values.ndim == 2 and not values.is_floating_point():
        predictions = values.long()
    elif values.ndim == 3:
        if values.shape[2] < 2:
            raise ValueError(
                f"`layer_logits` has {values.shape[2]} score per sample; saturation needs one score per class "
                "(single-label classification with at least 2 classes)."
            )
        predictions = values.argmax(dim=2)
    else:
        raise ValueError(
            "`layer_logits` must be scores of shape [num_layers, num_samples, num_labels] (the model's "
            f"`layer_logits`) or integer class ids [num_layers, num_samples], got {values.dtype} of shape "
            f"{tuple(values.shape)}."
        )
    if predictions.shape[0] == 0 or predictions.shape[1] == 0:
        raise ValueError(f"`layer_logits` holds no layers or no samples (shape {tuple(values.shape)}).")
    return predictions


def saturation_layers(layer_logits: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The saturation layer of every sample, `[N]` int64, 1-based.

    A sample's saturation layer is the first layer l such that the top-1 prediction at every layer l..L equals the
    prediction at the last layer L; it is L for a sample whose prediction changes at the last layer.

    Args:
        layer_logits: `[L, N, C]` scores, layer first, as `AlignedForSequenceClassification` returns them in
            `layer_logits`; or `[L, N]` integer class ids. Ties go to the lowest class index.

    Example:

    ```python
    >>> saturation_layers(model(**batch, output_layer_logits=True).layer_logits)
    tensor([1, 4, 6, 2])
    ```
    """
    predictions = layer_predictions(layer_logits)
    agrees = predictions == predictions[-1:]
    # Layers l..L all agree with L exactly for l in the trailing run of agreement: its length counts back from L.
    trailing = agrees.flip(0).int().cumprod(dim=0).sum(dim=0)
    return predictions.shape[0] - trailing + 1


@dataclass
class SaturationSummary:
    """The distribution of saturation layers over a set of samples.

    Attributes:
        num_layers: L.
        num_samples: N.
        mean: mean saturation layer.
        histogram: number of samples whose saturation layer is l, for l = 1..L.
        saturated_by: share of samples saturated at or before layer l, for l = 1..L (the last is 1.0).
    """

    num_layers: int
    num_samples: int
    mean: float
    histogram: list[int]
    saturated_by: list[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize_saturation(saturation: torch.Tensor | np.ndarray, num_layers: int) -> SaturationSummary:
    """Summarizes per-sample saturation layers (from [`saturation_layers`]).

    Raises:
        ValueError: for no samples, or a layer outside 1..`num_layers`.
    """
    layers = torch.as_tensor(saturation).long().reshape(-1)
    if layers.numel() == 0:
        raise ValueError("`saturation` holds no samples.")
    if int(layers.min()) < 1 or int(layers.max()) > num_layers:
        raise ValueError(
            f"Saturation layers must lie in 1..{num_layers} (`num_layers`), got {int(layers.min())}..{int(layers.max())}."
        )
    histogram = torch.bincount(layers - 1, minlength=num_layers)
    return SaturationSummary(
        num_layers=num_layers,
        num_samples=layers.numel(),
        mean=float(layers.double().mean()),
        histogram=histogram.tolist(),
        saturated_by=(histogram.cumsum(0).double() / layers.numel()).tolist(),
    )


# ----------------------------------------------------------------------------------------------------------------------
# Probability vs similarity
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ProbabilitySimilarity:
    """Per layer and sample: similarity to the last layer and the classifier's probabilities at that layer.

    Attributes:
        cosine: `[L, N]` float64, cos(f_l(x), f_L(x)) for blocks l = 1..L (row L is 1).
        last_class_probability: `[L, N]` float64, the probability the classifier at layer l gives the class the last
            layer predicts.
        true_class_probability: `[L, N]` float64, the same for the true class; `None` without labels.
    """

    cosine: torch.Tensor
    last_class_probability: torch.Tensor
    true_class_probability: torch.Tensor | None = None

    @property
    def num_layers(self) -> int:
        return self.cosine.shape[0]

    def summary(self) -> dict[str, Any]:
        """Per-layer means and rank correlations (Spearman, average ranks for ties) of similarity and probability.

        - `spearman`: over all (layer, sample) pairs of layers 1..L-1 (the last layer, where the cosine is 1 by
          definition, is left out);
        - `spearman_within_layer`: over samples, at each layer 1..L-1 (NaN where a value is constant);
        - `spearman_of_layer_means`: over the L per-layer means.

        Each is given for the last layer's class (`last_class`) and, with labels, the true class (`true_class`).
        """
        probabilities = {"last_class": self.last_class_probability}
        if self.true_class_probability is not None:
            probabilities["true_class"] = self.true_class_probability
        cosine = self.cosine.cpu().numpy()
        result: dict[str, Any] = {
            "num_layers": self.num_layers,
            "num_samples": self.cosine.shape[1],
            "mean_cosine": cosine.mean(axis=1).tolist(),
        }
        for name, probability in probabilities.items():
            values = probability.cpu().numpy()
            # Unlabelled samples (-100) hold NaN as their true-class probability: they are left out.
            kept = ~np.isnan(values[-1])
            means = values[:, kept].mean(axis=1)
            result[f"mean_{name}_probability"] = means.tolist()
            result[name] = {
                "spearman": spearman(cosine[:-1].ravel(), values[:-1].ravel()),
                "spearman_within_layer": [spearman(x, y) for x, y in zip(cosine[:-1], values[:-1])],
                "spearman_of_layer_means": spearman(cosine[:, kept].mean(axis=1), means),
            }
        return result


def probability_similarity(
    reps: torch.Tensor | np.ndarray,
    layer_logits: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | None = None,
) -> ProbabilitySimilarity:
    """Pairs each layer's similarity to the last layer with the classifier's probabilities at that layer.

    Args:
        reps: `[L + 1, N, D]` pooled representations of the embedding output and every block (from
            [`layer_representations`]).
        layer_logits: `[L, N, C]` scores of the classifier after every block (the model's `layer_logits`).
        labels: `[N]` class ids, for the true class's probability; samples labelled -100 get NaN.

    Raises:
        ValueError: when the layers or samples of `reps`, `layer_logits` and `labels` do not match.
    """
    layers = as_layer_list(reps)
    scores = torch.as_tensor(layer_logits)
    if scores.ndim != 3 or scores.shape[2] < 2 or not scores.is_floating_point():
        raise ValueError(
            "`layer_logits` must hold scores of shape [num_layers, num_samples, num_labels] with at least 2 labels, "
            f"got {scores.dtype} of shape {tuple(scores.shape)}."
        )
    num_layers, num_samples = scores.shape[:2]
    if len(layers) != num_layers + 1 or layers[0].shape[0] != num_samples:
        raise ValueError(
            f"`reps` must hold the embedding output and the {num_layers} blocks of `layer_logits` for its "
            f"{num_samples} samples ([{num_layers + 1}, {num_samples}, D]); got {len(layers)} layers of "
            f"{layers[0].shape[0]} samples."
        )
    cosine = torch.stack([sample_cosine(layers, layer, num_layers).cpu() for layer in range(1, num_layers + 1)])
    probabilities = scores.detach().cpu().double().softmax(dim=2)
    last_class = probabilities[-1].argmax(dim=1)
    last_class_probability = probabilities.gather(2, last_class.expand(num_layers, -1)[..., None])[..., 0]
    true_class_probability = None
    if labels is not None:
        targets = torch.as_tensor(labels).cpu().long().reshape(-1)
        if targets.shape[0] != num_samples:
            raise ValueError(f"`labels` must hold one class per sample ({num_samples}), got {targets.shape[0]}.")
        counted = targets != -100
        if ((targets < 0) & counted).any() or (targets >= scores.shape[2]).any():
            raise ValueError(f"`labels` must be class ids in [0, {scores.shape[2]}) or -100 (ignored).")
        picked = probabilities.gather(2, targets.clamp(min=0).expand(num_layers, -1)[..., None])[..., 0]
        true_class_probability = picked.masked_fill(~counted, math.nan)
    return ProbabilitySimilarity(cosine, last_class_probability, true_class_probability)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation with average ranks for ties, ignoring pairs with NaN; NaN when undefined."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    kept = ~(np.isnan(x) | np.isnan(y))
    x, y = x[kept], y[kept]
    if x.size < 2:
        return math.nan
    return pearson(average_ranks(x), average_ranks(y))


# ----------------------------------------------------------------------------------------------------------------------
# Reading a model
# ----------------------------------------------------------------------------------------------------------------------


def saturation_report(
    reps: torch.Tensor, layer_logits: torch.Tensor, labels: torch.Tensor | None = None
) -> dict[str, Any]:
    """Both analyses of one model on one data set, as plain data for JSON.

    Returns:
        `{"saturation": SaturationSummary.to_dict(), "probability_similarity": ProbabilitySimilarity.summary()}`,
        plus `"saturation_by_correctness"` (the mean saturation layer of samples the last layer gets right and
        wrong) when `labels` are given.
    """
    saturation = saturation_layers(layer_logits)
    report: dict[str, Any] = {
        "saturation": summarize_saturation(saturation, layer_logits.shape[0]).to_dict(),
        "probability_similarity": probability_similarity(reps, layer_logits, labels).summary(),
    }
    if labels is not None:
        targets = labels.reshape(-1)
        counted = targets != -100
        correct = layer_logits[-1].argmax(dim=-1) == targets
        groups = {"correct": correct & counted, "wrong": ~correct & counted}
        report["saturation_by_correctness"] = {
            name: float(saturation[mask].double().mean()) if mask.any() else math.nan for name, mask in groups.items()
        }
    return report
