"""Saturation layers and probability vs similarity (the ICLR version's claims 4 and 5) on trained checkpoints.

For each task and model variant (standard fine-tuning, aligned training with the paper's linear layer weights, and
per-layer heads), on the task's evaluation data:
- the saturation layer of every sample (the first layer from which the shared classifier's top-1 prediction stays
  the same up to the last layer): mean, histogram and share saturated by each layer (claim 5: aligned training
  brings more early saturation events);
- per layer l and sample x, cos(f_l(x), f_L(x)) against the probability the classifier at l gives the last layer's
  class and the true class, and their Spearman rank correlations (claim 4: the more similar layer l is to the last
  layer, the higher that probability). f_l(x) is `pooled_layer_states` (block l pooled with the model's pooling,
  before the classifier's final norm and pooler).

Tasks and data: `sst2` (SST-2 dev, 872 sentences), `ag_news` (the 1,600-item test part of `load_ag_news`), both on
MiniLM checkpoints found under `--checkpoints-root/<task>/<variant>/seed<--text-seed>/` (where the recipes benchmark
saves them; its `paper` variant is the aligned model) or given with `--checkpoint TASK/VARIANT=DIR`; `digits` (the 360 held-out images of
`load_digits_dataset`), on a small ViT (8 blocks, width 64) trained here from scratch for each seed when no
checkpoint is saved yet (about a minute per model on one core).

The JSON (`--output`/results.json, by default benchmarks/results/saturation/results.json, committed: docs/results.md
section 4 is rendered from it by `benchmarks/reproduce.py`) is written after every model and the script resumes from
it: models already measured from the same checkpoint are skipped. It records every invocation's command, seeds,
machine, commit and duration. Figures (including the per-sample scatter, which the JSON does not hold) go to
`--figures`.

    python benchmarks/saturation.py --text-seed 1                 # everything found (digits: ~15 min on 1 core)
    python benchmarks/saturation.py --tasks digits --digits-seeds 0 1 2
    python benchmarks/saturation.py --tasks sst2 --checkpoint sst2/aligned=path/to/checkpoint
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, DataCollatorWithPadding

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    OUTPUTS,
    REPO,
    describe_machine,
    digits_vit_config,
    load_ag_news,
    load_digits_dataset,
    load_sst2,
    minilm_path,
    print_table,
    train_aligned_model,
    write_json,
)
from recipes import CHECKPOINTS

from hf_aligned import (
    AlignedConfig,
    AlignedForSequenceClassification,
    collect_layer_logits,
    layer_representations,
    plot_probability_similarity,
    plot_saturation,
    probability_similarity,
    saturation_report,
)
from hf_aligned.utils import json_safe

TASKS = ("sst2", "ag_news", "digits")
# Variant -> (layer weights, classifier sharing), as trained here for digits.
VARIANTS = {"standard": ("last", "shared"), "aligned": ("linear", "shared"), "per_layer": ("linear", "per_layer")}
# Folder names a variant's checkpoint may have under `--checkpoints-root/<task>/`, tried in order.
VARIANT_FOLDERS = {
    "standard": ("standard",),
    "aligned": ("aligned", "paper", "aligned_paper"),
    "per_layer": ("per_layer", "per_layer_heads", "per-layer-heads"),
}
RESULTS = REPO / "benchmarks" / "results" / "saturation"
MAX_LENGTH = 64
DIGITS_EPOCHS = 30


def find_checkpoint(
    root: Path, task: str, variant: str, seed: int, overrides: dict[str, str]
) -> tuple[Path | None, list[str]]:
    """The checkpoint of one text model: `--checkpoint` first, else the first `root/<task>/<variant folder>/seed<seed>`
    that holds a config.json. Returns it (or None) and the paths tried."""
    if f"{task}/{variant}" in overrides:
        candidates = [Path(overrides[f"{task}/{variant}"])]
    else:
        candidates = [root / task / folder / f"seed{seed}" for folder in VARIANT_FOLDERS[variant]]
    found = next((path for path in candidates if (path / "config.json").exists()), None)
    return found, [str(path) for path in candidates]


def shown_path(path: Path) -> str:
    """A path inside the repository relative to it (so the JSON stays valid in another checkout), else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def text_data(task: str, checkpoint: Path):
    """The task's evaluation set tokenized with the checkpoint's tokenizer (MiniLM's when it saved none)."""
    source = checkpoint if (checkpoint / "tokenizer_config.json").exists() else minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    dataset = load_sst2("dev") if task == "sst2" else load_ag_news()["test"]
    tokenized = dataset.map(
        lambda rows: tokenizer(rows["text"], truncation=True, max_length=MAX_LENGTH),
        batched=True,
        remove_columns=["text"],
    )
    return tokenized, DataCollatorWithPadding(tokenizer)


def digits_checkpoint(directory: Path, variant: str, seed: int) -> Path:
    """The digits ViT of one variant and seed: the one saved before, else trained here and saved."""
    path = directory / variant / f"seed{seed}"
    if (path / "config.json").exists():
        return path
    layer_weights, sharing = VARIANTS[variant]
    torch.manual_seed(seed)
    model = AlignedForSequenceClassification(
        AlignedConfig(
            base_config=digits_vit_config(num_layers=8),
            num_labels=10,
            layer_weights=layer_weights,
            classifier_sharing=sharing,
        )
    )
    train = load_digits_dataset(seed=0)["train"]
    train_aligned_model(model, train, path, None, None, DIGITS_EPOCHS, batch_size=32, learning_rate=1e-3, seed=seed)
    return path


def measure(model: AlignedForSequenceClassification, data, collate_fn, batch_size: int) -> tuple[dict, object]:
    """Every number of one model on one data set, and its per-sample probability-similarity pairs for the plot."""
    reps = layer_representations(model, data, batch_size=batch_size, collate_fn=collate_fn)
    layer_logits, labels = collect_layer_logits(model, data, batch_size=batch_size, collate_fn=collate_fn)
    accuracy = (layer_logits.argmax(dim=-1) == labels).double().mean(dim=1).tolist()
    entry = {
        "num_layers": model.num_layers,
        "num_samples": int(labels.numel()),
        "pooling": model.config.pooling,
        "layer_accuracy": accuracy,
        **saturation_report(reps, layer_logits, labels),
    }
    return entry, probability_similarity(reps, layer_logits, labels)


def jobs(args: argparse.Namespace, overrides: dict[str, str]):
    """`(key, task, variant, seed, checkpoint or None, paths tried)` for every model to measure, in order."""
    for task in args.tasks:
        for variant in VARIANTS:
            if task == "digits":
                for seed in args.digits_seeds:
                    yield f"{task}/{variant}/seed{seed}", task, variant, seed, None, []
            else:
                checkpoint, tried = find_checkpoint(args.checkpoints_root, task, variant, args.text_seed, overrides)
                yield f"{task}/{variant}/seed{args.text_seed}", task, variant, args.text_seed, checkpoint, tried


def run(args: argparse.Namespace) -> dict:
    overrides = dict(item.split("=", 1) for item in args.checkpoint)
    path = args.output / "results.json"
    payload = json.loads(path.read_text(encoding="utf-8")) if path.exists() and not args.restart else {}
    payload.setdefault("results", {})
    payload["missing"] = {}
    payload["settings"] = {
        "data": {
            "sst2": "SST-2 dev (872 sentences)",
            "ag_news": "the 1,600-item test part of load_ag_news() (seed 0)",
            "digits": "the 360 held-out images of load_digits_dataset(seed=0)",
        },
        "text_max_length": MAX_LENGTH,
        "digits_model": "ViT from scratch: 8 blocks, width 64, 2x2 patches, 4 heads, no dropout",
        "digits_training": f"{DIGITS_EPOCHS} epochs on the 1,437 training images, batch 32, learning rate 1e-3; "
        "standard: layer weights 'last'; aligned: 'linear', shared classifier; per_layer: 'linear', one head per layer",
    }
    payload["representation"] = (
        "f_l(x) = pooled_layer_states: block l's hidden states pooled with the model's pooling, before the "
        "classifier's final norm and pooler"
    )
    text_tasks = [task for task in args.tasks if task != "digits"]
    invocation = {
        "command": "python benchmarks/saturation.py " + shlex.join(sys.argv[1:]),
        "machine": describe_machine(),
        "torch_threads": torch.get_num_threads(),
        "seeds": sorted(
            {*(args.digits_seeds if "digits" in args.tasks else ()), *((args.text_seed,) if text_tasks else ())}
        ),
    }
    payload.setdefault("runs", []).append(invocation)
    started = time.perf_counter()
    pairs_by_task: dict[str, dict] = {}
    for key, task, variant, seed, checkpoint, tried in jobs(args, overrides):
        if task == "digits":
            checkpoint = digits_checkpoint(args.digits_dir, variant, seed)
        elif checkpoint is None:
            payload["missing"][key] = tried
            print(f"{key}: no checkpoint (tried {', '.join(tried)})")
            continue
        previous = payload["results"].get(key)
        if previous is not None and previous["checkpoint"] == shown_path(checkpoint) and not args.force:
            print(f"{key}: measured before, kept")
            continue
        begun = time.perf_counter()
        model = AlignedForSequenceClassification.from_pretrained(checkpoint).eval()
        if task == "digits":
            data, collate_fn = load_digits_dataset(seed=0)["test"], None
        else:
            data, collate_fn = text_data(task, checkpoint)
        entry, pairs = measure(model, data, collate_fn, args.batch_size)
        entry.update(
            task=task,
            variant=variant,
            seed=seed,
            checkpoint=shown_path(checkpoint),
            commit=invocation["machine"]["commit"],
        )
        entry["seconds"] = round(time.perf_counter() - begun, 1)
        payload["results"][key] = json_safe(entry)
        if seed == min(args.digits_seeds if task == "digits" else [args.text_seed]):
            pairs_by_task.setdefault(task, {})[variant] = pairs
        invocation["duration_s"] = round(time.perf_counter() - started, 1)
        # Written after every model, so an interrupted run keeps what it measured.
        write_json(path, payload)
        print(
            f"{key}: mean saturation layer {entry['saturation']['mean']:.3f}, Spearman(cos, p(last class)) "
            f"{entry['probability_similarity']['last_class']['spearman']:.3f}, accuracy {entry['layer_accuracy'][-1]:.3f}"
        )
    invocation["duration_s"] = round(time.perf_counter() - started, 1)
    write_json(path, payload)
    draw(payload, pairs_by_task, args.figures)
    return payload


def draw(payload: dict, pairs_by_task: dict[str, dict], output: Path) -> None:
    """Per task: the saturation distributions of its first seed, and the probability-similarity scatter of the models
    measured in this run."""
    output.mkdir(parents=True, exist_ok=True)
    for task in TASKS:
        entries = [entry for entry in payload["results"].values() if entry["task"] == task]
        if entries:
            first_seed = min(entry["seed"] for entry in entries)
            summaries = {entry["variant"]: entry["saturation"] for entry in entries if entry["seed"] == first_seed}
            plot_saturation(summaries, output / f"{task}_saturation.png", title=f"{task}: saturation layers")
        if task in pairs_by_task:
            plot_probability_similarity(
                pairs_by_task[task], output / f"{task}_probability_similarity.png", title=f"{task}: first seed"
            )


def print_summary(payload: dict) -> None:
    rows = [
        [
            key,
            entry["layer_accuracy"][-1],
            entry["saturation"]["mean"],
            entry["probability_similarity"]["last_class"]["spearman"],
            entry["probability_similarity"]["true_class"]["spearman"],
        ]
        for key, entry in payload["results"].items()
    ]
    print_table(
        "Saturation and probability vs similarity",
        ["model", "accuracy", "mean saturation layer", "Spearman p(last class)", "Spearman p(true class)"],
        rows,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument(
        "--checkpoints-root",
        type=Path,
        default=CHECKPOINTS / "checkpoints",
        help="Folder with <task>/<variant>/seed<N>/ text checkpoints (the recipes benchmark's).",
    )
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="TASK/VARIANT=DIR",
        help="A text checkpoint, overriding --checkpoints-root (e.g. sst2/aligned=outputs/x); repeatable.",
    )
    parser.add_argument("--text-seed", type=int, default=0, help="The seed the text checkpoints were trained with.")
    parser.add_argument("--digits-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--digits-dir", type=Path, default=OUTPUTS / "saturation_models" / "digits")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own).")
    parser.add_argument("--output", type=Path, default=RESULTS, help="Where results.json goes (committed).")
    parser.add_argument("--figures", type=Path, default=OUTPUTS / "saturation", help="Where the figures go.")
    parser.add_argument("--restart", action="store_true", help="Forget the JSON's earlier results.")
    parser.add_argument(
        "--force", action="store_true", help="Measure again models measured before (and redraw their scatter)."
    )
    args = parser.parse_args(argv)
    known = {f"{task}/{variant}" for task in TASKS if task != "digits" for variant in VARIANTS}
    bad = [item for item in args.checkpoint if item.split("=", 1)[0] not in known or "=" not in item]
    if bad:
        parser.error(f"--checkpoint takes TASK/VARIANT=DIR with TASK/VARIANT one of {sorted(known)}, got {bad}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print_summary(run(args))


if __name__ == "__main__":
    main()
