#!/usr/bin/env python
"""`make demo`: standard training vs aligned training vs per-layer heads, side by side, on a small ViT.

Trains the same small ViT (8 blocks, width 64, 4x4 patches) from scratch on scikit-learn's bundled 8x8 digits three
times with `examples/run_image_classification.py`: standard fine-tuning (only the last layer's loss), aligned training
(one shared classifier, the paper's linear layer weights) and the standard multi-exit baseline (one classifier per
layer, same weights). Then it prints the accuracy of every layer's exit for the three and each one's minimal depth,
and saves the models, a JSON of the metrics and a plot of accuracy vs layer under `--output_dir`. No network needed;
a few minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from run_image_classification import run

from hf_aligned import format_layer_table, layer_values

RUNS = {
    "standard": ["--layer_weights", "last"],
    "aligned": ["--layer_weights", "linear"],
    "per-layer heads": ["--layer_weights", "linear", "--classifier_sharing", "per_layer"],
}


def plot_accuracy_by_layer(metrics_by_run: dict[str, dict[str, float]], path: Path) -> None:
    """Saves a line plot of each run's per-layer accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for run_name, metrics in metrics_by_run.items():
        accuracies = layer_values(metrics)
        axes.plot(range(1, len(accuracies) + 1), accuracies, marker="o", label=run_name)
    axes.set_xlabel("layer (exit after block l)")
    axes.set_ylabel("eval accuracy")
    axes.set_title("Digits, small ViT: accuracy of the classifier after every layer")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    # The model is so small that splitting its operations over threads gains nothing, while spinning threads slow it
    # down many times over as soon as another job shares the cores.
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/demo", help="Where the models, metrics and plot go.")
    parser.add_argument("--num_train_epochs", default="50", help="Epochs per model (about 23 steps each).")
    options = parser.parse_args()
    output_dir = Path(options.output_dir)
    common = [
        "--num_train_epochs",
        options.num_train_epochs,
        "--logging_strategy",
        "no",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
    ]
    metrics_by_run = {}
    for run_name, extra in RUNS.items():
        print(f"\n=== {run_name} ===", flush=True)
        run_dir = output_dir / run_name.replace(" ", "_").replace("-", "_")
        _, metrics_by_run[run_name] = run(["--output_dir", str(run_dir), *common, *extra])
    (output_dir / "metrics.json").write_text(json.dumps(metrics_by_run, indent=2))
    plot_accuracy_by_layer(metrics_by_run, output_dir / "accuracy_vs_layer.png")
    print("\nEval accuracy of the classifier after every layer (digits, 360 held-out images):")
    print(format_layer_table(metrics_by_run))
    print(f"\nModels, metrics.json and accuracy_vs_layer.png are in {output_dir}/")


if __name__ == "__main__":
    main()
