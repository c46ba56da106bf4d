"""The steps of `hf-aligned analyze` after loading: COS / CKA between layers, per-layer accuracy and probes,
saturation, and the JSON and figures it writes (the command and its arguments are in `cli.py`)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger("hf_aligned.cli")


def similarity_results(reps, model, dataset, args: argparse.Namespace) -> dict[str, Any]:
    """COS and CKA between every pair of layers, their agreement and summaries, with what was analyzed."""
    from .similarity import (
        cka_matrix,
        cosine_similarity_matrix,
        off_diagonal_mean,
        similarity_agreement,
        similarity_by_distance,
    )

    cos, cka = cosine_similarity_matrix(reps), cka_matrix(reps)
    return {
        "model": str(args.model_dir),
        "dataset": str(args.dataset),
        # A single data file is read as one whole split, whatever its name says: no split to record.
        "split": None if Path(args.dataset).is_file() else str(dataset.split or args.split),
        "num_samples": reps.shape[1],
        "pooling": args.pooling or model.config.pooling,
        "stage": args.stage,
        "layers": "rows and columns: embedding output (0) and blocks 1..L",
        "cos": cos,
        "cka": cka,
        "agreement": similarity_agreement(cos, cka),
        "off_diagonal_mean": {"cos": off_diagonal_mean(cos), "cka": off_diagonal_mean(cka)},
        "by_distance": {"cos": similarity_by_distance(cos), "cka": similarity_by_distance(cka)},
    }


def accuracy_curves(model, processed, collate_fn, args, reps, labels, trained_classifier, results) -> dict:
    """Per-layer accuracy of the shared classifier (trained checkpoints) and of linear probes (`--probes`), added to
    `results` and returned as curves to plot: `{label: (values, first layer)}`, the first layer 1 for the classifier
    (after block 1) and 0 for the probes (from the embedding output)."""
    from .probes import classifier_layer_accuracy, linear_probe_accuracy

    curves = {}
    if labels is not None and trained_classifier:
        results["classifier_accuracy"] = classifier_layer_accuracy(
            model, processed, batch_size=args.batch_size, collate_fn=collate_fn
        )
        curves[f"shared classifier (all {len(labels)} samples)"] = (results["classifier_accuracy"], 1)
    elif labels is not None:
        logger.info(f"{args.model_dir} is not an aligned checkpoint: its classifier is untrained, accuracy skipped.")
    if labels is not None and args.probes:
        probes = linear_probe_accuracy(reps, labels)
        results["probe_accuracy"] = probes.to_dict()
        # From the embedding output (layer 0), on the probes' held-out samples only.
        curves[f"linear probe ({probes.num_test} held-out samples)"] = (probes.test_accuracy, 0)
    return curves


def write_analysis(args: argparse.Namespace, results: dict, curves: dict, saturation) -> Path:
    """Writes similarity.json, the heatmaps, the accuracy plot (`curves`: `{label: (values, first layer)}`) and the
    saturation files; returns the folder."""
    from .plotting import plot_layer_accuracy, plot_similarity_heatmaps
    from .utils import json_safe

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    with open(output / "similarity.json", "w", encoding="utf-8") as handle:
        json.dump(json_safe(results), handle, indent=2, allow_nan=False)
    matrices = {"COS": results["cos"], "CKA": results["cka"]}
    plot_similarity_heatmaps(matrices, output / "similarity.png", title=str(args.model_dir))
    if curves:
        values = {name: curve for name, (curve, _) in curves.items()}
        starts = {name: start for name, (_, start) in curves.items()}
        plot_layer_accuracy(values, output / "layer_accuracy.png", first_layer=starts, title=str(args.model_dir))
    if saturation is not None:
        _write_saturation(saturation, output, str(args.model_dir))
    return output


def single_label(model) -> bool:
    return model.config.problem_type in (None, "single_label_classification") and model.config.num_labels >= 2


def analyze_saturation(model, processed, collate_fn, args: argparse.Namespace, reps, labels):
    """Saturation layers and probability vs similarity: `(report for JSON, ProbabilitySimilarity)`."""
    from .data import collect_layer_logits
    from .saturation import probability_similarity, saturation_report

    layer_logits, _ = collect_layer_logits(model, processed, batch_size=args.batch_size, collate_fn=collate_fn)
    report = {
        "model": str(args.model_dir),
        "pooling": args.pooling or model.config.pooling,
        "representation": "f_l(x): block l's hidden states pooled as the similarity analysis does "
        + (
            "(`pooled_layer_states`), before the classifier's final norm and pooler"
            if args.stage == "pre"
            else "(`pooled_layer_states(stage='post')`), after the classifier's final norm, pooler and projection head"
        ),
        **saturation_report(reps, layer_logits, labels),
    }
    return report, probability_similarity(reps, layer_logits, labels)


def _write_saturation(saturation, output: Path, title: str) -> None:
    from .plotting import plot_probability_similarity, plot_saturation
    from .utils import json_safe

    report, pairs = saturation
    with open(output / "saturation.json", "w", encoding="utf-8") as handle:
        json.dump(json_safe(report), handle, indent=2, allow_nan=False)
    plot_saturation({title: report["saturation"]}, output / "saturation.png")
    plot_probability_similarity({title: pairs}, output / "probability_similarity.png")
