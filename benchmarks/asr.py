"""ASR benchmark: does a folded ASR scale (hf_aligned.asr) change per-layer accuracy, training cost or inference cost?

Two models, standard fine-tuning (`layer_weights="last"`) and aligned training, each with and without ASR scales on
every block's attention and MLP output projections (`add_asr`), three seeds:

- a small ViT (6 layers, width 64) trained from scratch on scikit-learn's digits (1,437 training images, 360 held
  out), 30 epochs, batch 32, learning rate 1e-3 (the early-exit benchmark's settings); aligned = linear weights;
- MiniLM (all-MiniLM-L6-v2) on SST-2 with `benchmarks/recipes.py`'s training function and settings (4,000 training
  phrases, mean pooling, batch 32, one epoch, lr 5e-5): its `standard` and `recommended` (aligned, library default)
  variants with ASR are trained here; the rows without ASR are the recipes benchmark's runs of the same settings and
  seeds, read from benchmarks/results/recipes.json.

Every ASR model is saved folded (`fold_asr_on_save=True`); its checkpoint is reloaded and scored again, which checks
that the plain folded model predicts what the trained model with ASR did. The `timing` phase measures, in one process
with one torch thread, alternating the models and keeping the best of N: the training step (forward, backward, AdamW)
with ASR over without, and inference after folding over a model that never had ASR (and, for reference, unfolded
ASR over none).

Results go to benchmarks/results/asr.json after every run; a rerun skips what is there.

    python benchmarks/asr.py --checkpoints /work/bench/outputs/asr            # train everything missing
    python benchmarks/asr.py --phase timing                                   # the time ratios
    python benchmarks/asr.py --phase render                                   # tables into docs/results.md
    python benchmarks/asr.py --tasks digits --seeds 0 --variants aligned_asr  # a piece
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    OUTPUTS,
    REPO,
    asr_scale_deviation,
    best_times,
    digits_vit_config,
    layer_table_header,
    load_digits_dataset,
    mean_std_cell,
    minilm_path,
    write_json,
)
from recipes import (
    TASK_DEFAULTS,
    checkpoint_dir,
    isolated,
    load_results,
    load_task,
    mean_std,
    provenance,
    run_one,
    write_blocks,
)

RESULTS = REPO / "benchmarks" / "results" / "asr.json"
RECIPES_RESULTS = REPO / "benchmarks" / "results" / "recipes.json"
RENDERED_DOCUMENTS = ("docs/results.md", "docs/asr.md")
VARIANTS = ("standard", "aligned", "standard_asr", "aligned_asr")
# The layer weights of each training, and the recipes benchmark's variant of the same training on SST-2.
LAYER_WEIGHTS = {"standard": "last", "aligned": "linear"}
RECIPES_VARIANTS = {"standard": "standard", "aligned": "recommended"}
TASK_VARIANTS = {"digits": VARIANTS, "sst2": ("standard_asr", "aligned_asr")}
DIGITS = {"num_layers": 6, "epochs": 30, "batch_size": 32, "learning_rate": 1e-3}
SST2_SAMPLES = TASK_DEFAULTS["sst2"]["train_samples"]


def split_variant(variant: str) -> tuple[str, bool]:
    """`"aligned_asr"` -> `("aligned", True)`."""
    training, _, asr = variant.partition("_")
    return training, asr == "asr"


def layer_accuracy(model, dataset, collate_fn=None) -> list[float]:
    from hf_aligned import collect_layer_logits

    logits, labels = collect_layer_logits(model, dataset, batch_size=64, collate_fn=collate_fn)
    return (logits.argmax(-1) == labels).float().mean(dim=1).tolist()


def run_digits(variant: str, seed: int, checkpoints: Path) -> dict:
    """Trains the digits ViT from scratch (fresh process), scores it, and scores its reloaded (folded) checkpoint."""
    import torch
    from common import train_aligned_model

    from hf_aligned import AlignedConfig, AlignedForSequenceClassification, add_asr

    torch.set_num_threads(1)
    started = time.perf_counter()
    training, asr = split_variant(variant)
    splits = load_digits_dataset()
    torch.manual_seed(seed)
    config = AlignedConfig(
        base_config=digits_vit_config(DIGITS["num_layers"]), num_labels=10, layer_weights=LAYER_WEIGHTS[training]
    )
    model = AlignedForSequenceClassification(config)
    if asr:
        add_asr(model, seed=seed)
    output = checkpoint_dir("digits", variant, seed, checkpoints)
    model = train_aligned_model(
        model,
        splits["train"],
        output,
        None,
        None,
        epochs=DIGITS["epochs"],
        batch_size=DIGITS["batch_size"],
        learning_rate=DIGITS["learning_rate"],
        seed=seed,
        fold_asr_on_save=asr,
    )
    result = {"layer_accuracy": layer_accuracy(model, splits["test"])}
    if asr:
        result["asr_scale_deviation"] = asr_scale_deviation(model)
    reloaded = AlignedForSequenceClassification.from_pretrained(output)
    result["reloaded_layer_accuracy"] = layer_accuracy(reloaded, splits["test"])
    result["wall_time_s"] = round(time.perf_counter() - started, 1)
    return result


def run_sst2(variant: str, seed: int, checkpoints: Path) -> dict:
    """The recipes benchmark's run of this training with ASR (fresh process), and its reloaded (folded) checkpoint."""
    import torch
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from hf_aligned import AlignedForSequenceClassification

    torch.set_num_threads(1)
    training, _ = split_variant(variant)
    recipe = RECIPES_VARIANTS[training]
    max_length = TASK_DEFAULTS["sst2"]["max_length"]
    result = run_one(
        "sst2",
        recipe,
        seed,
        SST2_SAMPLES,
        max_length,
        checkpoint=checkpoint_dir("sst2", recipe, seed, checkpoints),
        asr=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    _, _, evaluation = load_task("sst2", 0, seed)
    evaluation = evaluation.map(
        lambda rows: tokenizer(rows["text"], truncation=True, max_length=max_length), batched=True
    ).remove_columns(["text"])
    reloaded = AlignedForSequenceClassification.from_pretrained(checkpoint_dir("sst2", recipe, seed, checkpoints))
    result["reloaded_layer_accuracy"] = layer_accuracy(reloaded, evaluation, DataCollatorWithPadding(tokenizer))
    return result


def train_phase(options: argparse.Namespace, results: dict) -> None:
    """Trains every missing (task, variant, seed), one at a time, each in a fresh process; writes JSON after each."""
    for seed in options.seeds:
        for task in options.tasks:
            for variant in options.variants or TASK_VARIANTS[task]:
                key = f"{task}/{variant}/{seed}"
                if variant not in TASK_VARIANTS[task] or key in results["runs"]:
                    continue
                print(f"=== {key}", flush=True)
                runner = run_digits if task == "digits" else run_sst2
                record = isolated(runner, variant, seed, options.checkpoints)
                record.update(task=task, variant=variant, seed=seed, provenance=provenance(sys.argv))
                if task == "sst2":
                    record["train_samples"] = SST2_SAMPLES
                results["runs"][key] = record
                results["summary"] = summarize(results, load_results(RECIPES_RESULTS))
                write_json(options.results, results)
                print(f"    layers {[round(value, 3) for value in record['layer_accuracy']]}", flush=True)


def timing_models(task: str, training: str):
    """A model without ASR, one batch of its inputs and labels, and a few evaluation batches."""
    import torch
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from hf_aligned import AlignedConfig, AlignedForSequenceClassification

    torch.manual_seed(0)
    if task == "digits":
        config = AlignedConfig(
            base_config=digits_vit_config(DIGITS["num_layers"]), num_labels=10, layer_weights=LAYER_WEIGHTS[training]
        )
        model = AlignedForSequenceClassification(config)
        rows = load_digits_dataset()["test"].with_format("torch")
        batches = [{"pixel_values": rows[start : start + 32]["pixel_values"]} for start in range(0, 256, 32)]
        labels = rows[:32]["label"]
    else:
        model = AlignedForSequenceClassification.from_pretrained(
            minilm_path(), num_labels=2, layer_weights=LAYER_WEIGHTS[training]
        )
        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        _, _, evaluation = load_task("sst2", 0, 0)
        collator = DataCollatorWithPadding(tokenizer)
        max_length = TASK_DEFAULTS["sst2"]["max_length"]
        texts, all_labels = evaluation["text"][:128], evaluation["label"][:128]
        batches = [
            dict(collator([tokenizer(text, truncation=True, max_length=max_length) for text in texts[i : i + 32]]))
            for i in range(0, len(texts), 32)
        ]
        labels = torch.tensor(all_labels[:32])
    return model, batches, labels


def measure_times(task: str, training: str, repeats: int, steps: int, passes: int) -> dict:
    """Step time with ASR over without, and inference time folded (and unfolded) over never-had-ASR, one process.

    Each timed call runs `steps` training steps (or `passes` passes over the evaluation batches); the variants
    alternate and the fastest of `repeats` calls counts."""
    import torch

    from hf_aligned import ASRScale, add_asr, fold_asr

    torch.set_num_threads(1)
    plain, batches, labels = timing_models(task, training)
    with_asr = add_asr(copy.deepcopy(plain), seed=0)
    models = {"plain": plain.train(), "asr": with_asr.train()}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-5) for name, model in models.items()}

    def step(name: str):
        def run():
            for _ in range(steps):
                optimizers[name].zero_grad()
                models[name](**batches[0], labels=labels).loss.backward()
                optimizers[name].step()

        return run

    for name in models:
        step(name)()  # warm-up
    step_plain, step_asr = best_times([step("plain"), step("asr")], repeats)
    with torch.no_grad():
        for module in with_asr.modules():  # a trained-looking scale, not the identity a new ASR starts from
            if isinstance(module, ASRScale):
                module.fc2.bias.normal_()
    folded = fold_asr(copy.deepcopy(with_asr)).eval()
    # A copy of the plain model timed like the others: its ratio to the plain model is the noise of the measurement.
    serving = {"plain": plain.eval(), "folded": folded, "unfolded": with_asr.eval(), "control": copy.deepcopy(plain)}

    def infer(model):
        return lambda: [model(**batch, early_exit=False) for _ in range(passes) for batch in batches]

    with torch.no_grad():
        for model in serving.values():
            infer(model)()
        times = dict(zip(serving, best_times([infer(model) for model in serving.values()], repeats)))
    return {
        "step_time_ratio": step_asr / step_plain,
        "inference_time_ratio_folded": times["folded"] / times["plain"],
        "inference_time_ratio_unfolded": times["unfolded"] / times["plain"],
        "inference_time_ratio_control": times["control"] / times["plain"],
        "asr_parameters": sum(p.numel() for n, p in with_asr.named_parameters() if ".asr." in n),
        "parameters": sum(p.numel() for p in plain.parameters()),
        "repeats": repeats,
        "steps_per_timing": steps,
        "passes_per_timing": passes,
        "inference_samples": sum(len(next(iter(batch.values()))) for batch in batches),
        "torch_threads": torch.get_num_threads(),
    }


def timing_phase(options: argparse.Namespace, results: dict) -> None:
    for task in options.tasks:
        for training in LAYER_WEIGHTS:
            key = f"{task}/{training}"
            if key in results.setdefault("timing", {}):
                continue
            print(f"=== timing {key}", flush=True)
            repeats = options.repeats or (30 if task == "digits" else 9)
            steps, passes = (20, 5) if task == "digits" else (2, 1)
            record = isolated(measure_times, task, training, repeats, steps, passes)
            results["timing"][key] = {**record, "provenance": provenance(sys.argv)}
            write_json(options.results, results)


def recipes_runs(recipes: dict) -> dict[str, dict]:
    """The recipes benchmark's SST-2 runs of the trainings without ASR, by this benchmark's key (same settings)."""
    runs = {}
    for training, recipe in RECIPES_VARIANTS.items():
        for record in recipes.get("runs", {}).values():
            if record["task"] == "sst2" and record["variant"] == recipe and record["train_samples"] == SST2_SAMPLES:
                runs[f"sst2/{training}/{record['seed']}"] = {
                    "task": "sst2",
                    "variant": training,
                    "seed": record["seed"],
                    "layer_accuracy": record["layer_accuracy"],
                    "source": "benchmarks/results/recipes.json",
                }
    return runs


def summarize(results: dict, recipes: dict) -> dict:
    """Per task and variant: every layer's accuracy (mean ± std over seeds); per ASR variant, its paired differences
    to the same training without ASR and the largest accuracy change of its reloaded, folded checkpoint."""
    runs = {**recipes_runs(recipes), **results["runs"]}
    summary: dict = {}
    for task, variants in TASK_VARIANTS.items():
        by_variant = {variant: {} for variant in VARIANTS}
        for record in runs.values():
            if record["task"] == task:
                by_variant[record["variant"]][record["seed"]] = record
        for variant, records in by_variant.items():
            if not records:
                continue
            layers = list(zip(*(record["layer_accuracy"] for record in records.values())))
            entry = {
                "seeds": sorted(records),
                "layer_accuracy": [mean_std(list(values)) for values in layers],
                "source": "this benchmark" if variant in variants else "benchmarks/results/recipes.json",
            }
            training, asr = split_variant(variant)
            without = by_variant[training]
            paired = [(records[seed], without[seed]) for seed in sorted(records) if seed in without]
            if asr and paired:
                middle = len(layers) // 2 - 1
                entry["last_layer_vs_without"] = mean_std(
                    [a["layer_accuracy"][-1] - b["layer_accuracy"][-1] for a, b in paired]
                )
                entry["middle_layer_vs_without"] = mean_std(
                    [a["layer_accuracy"][middle] - b["layer_accuracy"][middle] for a, b in paired]
                )
            deviations = [
                record["asr_scale_deviation"] for record in records.values() if "asr_scale_deviation" in record
            ]
            if deviations:
                entry["asr_scale_deviation"] = {
                    "runs": len(deviations),
                    "mean": mean_std([deviation["mean"] for deviation in deviations]),
                    "max": max(deviation["max"] for deviation in deviations),
                }
            if asr:
                entry["reloaded_max_accuracy_change"] = max(
                    abs(x - y)
                    for record in records.values()
                    for x, y in zip(record["layer_accuracy"], record["reloaded_layer_accuracy"])
                )
            summary.setdefault(task, {})[variant] = entry
    return summary


LABELS = {
    "standard": "standard",
    "aligned": "aligned",
    "standard_asr": "standard + ASR",
    "aligned_asr": "aligned + ASR",
}
TASK_LABELS = {
    "digits": "digits ViT (360 held-out images)",
    "sst2": "MiniLM, SST-2 (872 dev sentences)",
}


def accuracy_table(summary: dict, task: str) -> str:
    """Markdown: every layer's accuracy (%), mean ± std over seeds, one row per variant."""
    variants = summary[task]
    num_layers = len(next(iter(variants.values()))["layer_accuracy"])
    lines = layer_table_header([TASK_LABELS[task], "seeds"], num_layers)
    for variant in VARIANTS:
        if variant in variants:
            entry = variants[variant]
            source = "" if entry["source"] == "this benchmark" else " (recipes benchmark)"
            cells = " | ".join(mean_std_cell(value) for value in entry["layer_accuracy"])
            lines.append(f"| {LABELS[variant]}{source} | {len(entry['seeds'])} | {cells} |")
    return "\n".join(lines)


def effects_table(summary: dict, timing: dict) -> str:
    """Markdown: what ASR changes, per task and training: accuracy (paired by seed), cost, and the fold's exactness."""
    lines = [
        "| model | training | last layer, ASR - without (pt) | middle layer, ASR - without (pt) | "
        "folded checkpoint: largest accuracy change (pt) | training step time, ASR / without | "
        "inference time, folded / never had ASR | inference time, unfolded ASR / without | "
        "inference time, control: a copy of the model without / itself | ASR parameters | "
        "trained scales: mean \\|s - 1\\| (largest) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task in TASK_VARIANTS:
        for training in LAYER_WEIGHTS:
            entry = summary.get(task, {}).get(f"{training}_asr", {})
            times = timing.get(f"{task}/{training}")
            cells = [
                mean_std_cell(entry["last_layer_vs_without"], signed=True) if "last_layer_vs_without" in entry else "",
                mean_std_cell(entry["middle_layer_vs_without"], signed=True)
                if "middle_layer_vs_without" in entry
                else "",
                f"{entry['reloaded_max_accuracy_change'] * 100:.2f}" if entry else "",
                f"{times['step_time_ratio']:.3f}" if times else "",
                f"{times['inference_time_ratio_folded']:.3f}" if times else "",
                f"{times['inference_time_ratio_unfolded']:.3f}" if times else "",
                f"{times['inference_time_ratio_control']:.3f}" if times else "",
                f"{times['asr_parameters'] / times['parameters'] * 100:.1f}% of the model" if times else "",
                _deviation_cell(entry.get("asr_scale_deviation"), len(entry.get("seeds", []))),
            ]
            lines.append(f"| {TASK_LABELS[task].split(' (')[0]} | {training} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _deviation_cell(deviation: dict | None, seeds: int) -> str:
    if not deviation:
        return ""
    runs = "" if deviation["runs"] == seeds else f" ({deviation['runs']} of {seeds} seeds)"
    return f"{mean_std_cell(deviation['mean'], scale=1, digits=4)} ({deviation['max']:.4f}){runs}"


def render_blocks(results: dict) -> dict[str, str]:
    """Every rendered block, by name: `<!-- BEGIN name -->` ... `<!-- END name -->` in the documents."""
    summary = results["summary"]
    blocks = {"asr-effects": effects_table(summary, results.get("timing", {}))}
    for task in summary:
        blocks[f"asr-accuracy-{task}"] = accuracy_table(summary, task)
    return blocks


def render_documents(results: dict, root: Path = REPO) -> list[Path]:
    """Rewrites the rendered blocks of the documents from `results`; returns the files changed."""
    return write_blocks(render_blocks(results), RENDERED_DOCUMENTS, root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=["train", "timing", "summary", "render"], default="train")
    parser.add_argument("--tasks", nargs="+", choices=list(TASK_VARIANTS), default=list(TASK_VARIANTS))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, help="timing: best of this many (default 30 digits, 9 MiniLM)")
    parser.add_argument("--checkpoints", type=Path, default=OUTPUTS / "asr", help="where checkpoints are written")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the JSON file read, extended and written")
    options = parser.parse_args()
    results = load_results(options.results)
    if options.phase == "train":
        train_phase(options, results)
    elif options.phase == "timing":
        timing_phase(options, results)
    results["summary"] = summarize(results, load_results(RECIPES_RESULTS))
    results["recipes_rows"] = "SST-2 rows without ASR: benchmarks/results/recipes.json (same settings and seeds)"
    for task in results["summary"]:
        print(f"\n{accuracy_table(results['summary'], task)}")
    print(f"\n{effects_table(results['summary'], results.get('timing', {}))}\n")
    write_json(options.results, results)
    if options.phase == "render":
        for path in render_documents(results):
            print(f"rendered {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
