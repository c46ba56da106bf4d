"""Figures of layer-wise analyses: similarity heatmaps, accuracy per layer, representation dynamics over training,
saturation layers, probability against similarity and exit calibration curves.

Every function returns a matplotlib `Figure` built without pyplot (no global state, no display needed) and, given
`path`, saves it as PNG. matplotlib is the `plots` extra: `pip install 'hf-aligned[plots]'`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Matrix = torch.Tensor | np.ndarray | Sequence[Sequence[float]]
# Per-layer records of the dynamics callback that start at block 1 (the others start at the embedding output, 0).
BLOCK_KEYS = ("classifier_accuracy", "saturated_by")


def plot_similarity_heatmaps(
    matrices: Mapping[str, Matrix] | Mapping[str, Mapping[str, Matrix]],
    path: str | os.PathLike | None = None,
    first_layer: int = 0,
    title: str | None = None,
) -> Figure:
    """Layer-by-layer similarity heatmaps side by side, on one color scale.

    Args:
        matrices: `{"COS": cos, "CKA": cka}` for one row of panels, or `{"standard": {"COS": ..., "CKA": ...},
            "aligned": {...}}` for one row per model.
        path: where to save the PNG.
        first_layer: the layer index of the first row/column (0 when the embedding output is included).
        title: the figure's title.
    """
    rows = _as_rows(matrices)
    num_rows, num_cols = len(rows), max(len(panels) for panels in rows.values())
    figure = _figure(figsize=(4.2 * num_cols + 0.8, 3.8 * num_rows))
    axes = figure.subplots(num_rows, num_cols, squeeze=False)
    low = min(0.0, *(np.nanmin(_matrix(m)) for panels in rows.values() for m in panels.values()))
    image = None
    for row, (row_name, panels) in enumerate(rows.items()):
        for col in range(num_cols):
            axis = axes[row][col]
            if col >= len(panels):
                axis.set_visible(False)
                continue
            name, matrix = list(panels.items())[col]
            values = _matrix(matrix)
            image = axis.imshow(values, vmin=low, vmax=1.0, cmap="viridis", origin="lower")
            ticks = _layer_ticks(values.shape[0])
            axis.set_xticks(ticks, [str(first_layer + tick) for tick in ticks])
            axis.set_yticks(ticks, [str(first_layer + tick) for tick in ticks])
            label = "layer (0 = embeddings)" if first_layer == 0 else "layer"
            axis.set_xlabel(label)
            axis.set_ylabel(label)
            axis.set_title(name if row_name == "" else f"{row_name}: {name}")
    figure.colorbar(image, ax=axes, shrink=0.85, label="similarity")
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def plot_layer_accuracy(
    curves: Mapping[str, Sequence[float]],
    path: str | os.PathLike | None = None,
    first_layer: int | Mapping[str, int] = 1,
    ylabel: str = "accuracy",
    title: str | None = None,
    chance: float | None = None,
) -> Figure:
    """Accuracy (or any score) against layer, one line per model, on one axis.

    Args:
        curves: `{"standard": [acc after block 1, ...], "aligned": [...], "per-layer heads": [...]}`.
        path: where to save the PNG.
        first_layer: the layer index of each curve's first value (1 for per-block accuracies, 0 for probes that
            include the embedding output), or one per curve name (curves not named start at 1). With a curve that
            starts at 0 the axis says that layer 0 is the embeddings.
        ylabel: the y-axis label.
        title: the axis title.
        chance: draws a dashed line at chance level when given.
    """
    figure = _figure(figsize=(6.0, 4.0))
    axis = figure.subplots()
    starts = first_layer if isinstance(first_layer, Mapping) else dict.fromkeys(curves, first_layer)
    for name, values in curves.items():
        values = np.asarray(values, dtype=np.float64)
        start = starts.get(name, 1)
        axis.plot(np.arange(start, start + len(values)), values, marker="o", label=name)
    if chance is not None:
        axis.axhline(chance, color="gray", linestyle="--", linewidth=1, label="chance")
    axis.xaxis.set_major_locator(_integer_locator())
    axis.set_xlabel("layer (0 = embeddings)" if 0 in [starts.get(name, 1) for name in curves] else "layer")
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    axis.legend()
    if title:
        axis.set_title(title)
    return _save(figure, path)


def plot_dynamics(
    records: Sequence[Mapping[str, Any]],
    path: str | os.PathLike | None = None,
    keys: Sequence[str] = (
        "cka_to_initial",
        "cka_to_previous",
        "classifier_accuracy",
        "probe_accuracy",
        "saturated_by",
    ),
) -> Figure:
    """Layer-by-training-step heatmaps of per-layer quantities recorded during training.

    Args:
        records: the `records` written by [`RepresentationDynamicsCallback`]: dicts with a `step` and, for each
            key, one value per layer (or `None` where it was not measured).
        path: where to save the PNG.
        keys: the per-layer quantities to draw, one panel each (keys missing from every record are skipped).
    """
    if not records:
        raise ValueError("`records` is empty: there is nothing to plot.")
    keys = [key for key in keys if any(record.get(key) is not None for record in records)]
    steps = [record["step"] for record in records]
    figure = _figure(figsize=(4.5 * len(keys) + 0.5, 3.8))
    axes = figure.subplots(1, len(keys), squeeze=False)[0]
    for axis, key in zip(axes, keys):
        width = max(len(record[key]) for record in records if record.get(key) is not None)
        first_layer = 1 if key in BLOCK_KEYS else 0
        grid = np.full((width, len(records)), np.nan)
        for column, record in enumerate(records):
            if record.get(key) is not None:
                grid[:, column] = [math.nan if value is None else value for value in record[key]]
        image = axis.imshow(grid, aspect="auto", origin="lower", cmap="viridis", vmin=0.0, vmax=1.0)
        ticks = _layer_ticks(len(steps))
        axis.set_xticks(ticks, [str(steps[tick]) for tick in ticks])
        layer_ticks = _layer_ticks(width)
        axis.set_yticks(layer_ticks, [str(first_layer + tick) for tick in layer_ticks])
        axis.set_xlabel("step")
        axis.set_ylabel("layer")
        axis.set_title(key.replace("_", " "))
        figure.colorbar(image, ax=axis, shrink=0.85)
    return _save(figure, path)


def plot_saturation(
    summaries: Mapping[str, Any],
    path: str | os.PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """Saturation layers of several models: the share of samples saturating at each layer, and saturated by it.

    Args:
        summaries: model name -> its [`SaturationSummary`] (or that summary's `to_dict()`).
        path: where to save the PNG.
        title: the figure's title.
    """
    if not summaries:
        raise ValueError("`summaries` is empty: give at least one model's saturation summary.")
    rows = {
        name: summary if isinstance(summary, Mapping) else summary.to_dict() for name, summary in summaries.items()
    }
    figure = _figure(figsize=(11.0, 4.0))
    shares, cumulative = figure.subplots(1, 2)
    width = 0.8 / len(rows)
    for index, (name, summary) in enumerate(rows.items()):
        layers = np.arange(1, summary["num_layers"] + 1)
        share = np.asarray(summary["histogram"], dtype=np.float64) / summary["num_samples"]
        shares.bar(
            layers - 0.4 + width * (index + 0.5), share, width=width, label=f"{name} (mean {summary['mean']:.2f})"
        )
        cumulative.plot(layers, summary["saturated_by"], marker="o", label=name)
    shares.set_xlabel("saturation layer")
    shares.set_ylabel("share of samples")
    shares.set_title("saturating at layer l")
    cumulative.set_xlabel("layer")
    cumulative.set_ylabel("share of samples")
    cumulative.set_ylim(0.0, 1.02)
    cumulative.set_title("saturated by layer l")
    for axis in (shares, cumulative):
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def plot_probability_similarity(
    results: Mapping[str, Any],
    path: str | os.PathLike | None = None,
    which: str = "last_class",
    max_points_per_layer: int = 200,
    title: str | None = None,
) -> Figure:
    """Per sample and layer: similarity to the last layer against the classifier's probability, one panel per model.

    Points are colored by layer (1..L-1; the last layer, at cosine 1, is left out) and the per-layer means are
    joined by a line.

    Args:
        results: model name -> its [`ProbabilitySimilarity`].
        path: where to save the PNG.
        which: `"last_class"` (probability of the class the last layer predicts) or `"true_class"`.
        max_points_per_layer: samples drawn per layer (the first ones), to keep the figure light.
        title: the figure's title.
    """
    if which not in ("last_class", "true_class"):
        raise ValueError(f"`which` must be 'last_class' or 'true_class', got {which!r}.")
    if not results:
        raise ValueError("`results` is empty: give at least one model's probability-similarity data.")
    figure = _figure(figsize=(4.6 * len(results) + 0.8, 4.0))
    axes = figure.subplots(1, len(results), squeeze=False)[0]
    scatter = None
    for axis, (name, result) in zip(axes, results.items()):
        probability = getattr(result, f"{which}_probability")
        if probability is None:
            raise ValueError(f"{name!r} has no {which} probabilities (it was computed without labels).")
        cosine, probability = result.cosine.cpu().numpy(), probability.cpu().numpy()
        num_layers = cosine.shape[0]
        shown = slice(0, max_points_per_layer)
        layers = np.repeat(np.arange(1, num_layers), cosine[:-1, shown].shape[1])
        scatter = axis.scatter(
            cosine[:-1, shown].ravel(),
            probability[:-1, shown].ravel(),
            c=layers,
            cmap="viridis",
            vmin=1,
            vmax=max(num_layers - 1, 2),
            s=6,
            alpha=0.4,
        )
        axis.plot(np.nanmean(cosine, axis=1), np.nanmean(probability, axis=1), "k-o", markersize=4, label="layer mean")
        axis.set_xlabel("cos(f_l(x), f_L(x))")
        axis.set_ylabel(f"p({which.replace('_', ' ')}) at layer l")
        axis.set_title(name)
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small", loc="lower right")
    colorbar = figure.colorbar(scatter, ax=axes, shrink=0.85, label="layer l")
    colorbar.locator = _integer_locator()  # layers are whole numbers
    colorbar.update_ticks()
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def plot_calibration(
    result: Any,
    path: str | os.PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """The risk (or, for results without one, the accuracy) against expected speedup for every exit setting a
    calibration tried, the tolerated risk and the chosen setting marked.

    Args:
        result: a [`CalibrationResult`] (or its `to_dict()`).
        path: where to save the PNG.
        title: the figure's title.
    """
    data = result if isinstance(result, Mapping) else result.to_dict()
    figure = _figure(figsize=(5.0, 3.5))
    axis = figure.subplots()
    speedups = [point["expected_speedup"] for point in data["curve"]]
    by_risk = all(point.get("risk") is not None for point in data["curve"])
    key = "risk" if by_risk else "accuracy"
    axis.plot(speedups, [point[key] for point in data["curve"]], marker=".", label=f"rule: {data['rule']}")
    if by_risk:
        axis.axhline(data["max_accuracy_drop"], color="grey", linestyle="--", label="tolerated risk")
    else:
        axis.axhline(data["full_accuracy"], color="grey", linestyle="--", label="full depth")
    chosen = "never exits" if data["chosen"] is None else f"{data['chosen']:g}"
    value = data["empirical_risk"] if by_risk else data["accuracy"]
    axis.scatter([data["expected_speedup"]], [value], color="red", zorder=3, label=f"chosen: {chosen}")
    axis.set_xlabel(f"expected speedup (L / mean exit layer, L = {data['num_layers']})")
    axis.set_ylabel(f"{data.get('risk', '')} risk on calibration data" if by_risk else "accuracy")
    axis.legend()
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def _figure(figsize: tuple[float, float]) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "Plots need matplotlib: `pip install 'hf-aligned[plots]'` (or `pip install matplotlib`)."
        ) from error
    return Figure(figsize=figsize, layout="constrained")


def _save(figure: Figure, path: str | os.PathLike | None) -> Figure:
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        figure.savefig(path, dpi=120)
    return figure


def _as_rows(matrices: Mapping) -> dict[str, dict[str, Matrix]]:
    if not matrices:
        raise ValueError("`matrices` is empty: give at least one named matrix.")
    nested = [isinstance(value, Mapping) for value in matrices.values()]
    if all(nested):
        return {str(name): dict(panels) for name, panels in matrices.items()}
    if any(nested):
        raise ValueError("`matrices` mixes matrices and mappings; give {name: matrix} or {row: {name: matrix}}.")
    return {"": dict(matrices)}


def _matrix(matrix: Matrix) -> np.ndarray:
    values = matrix.detach().cpu().numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix, dtype=float)
    if values.ndim != 2 or values.shape[0] != values.shape[1]:
        raise ValueError(f"A similarity matrix must be square [K, K], got shape {values.shape}.")
    return values.astype(np.float64)


def _integer_locator():
    """A tick locator that puts ticks on whole numbers only (layers)."""
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _layer_ticks(count: int, most: int = 13) -> list[int]:
    step = max(1, math.ceil(count / most))
    return list(range(0, count, step))
