"""What the calibration benchmark reads: the recipes checkpoints and their per-layer logits over large unseen pools.

For each task (SST-2, AG News), variant (`recommended`, the library default; `per_layer`, one classifier per layer)
and seed (0, 1, 2), the model is trained exactly as benchmarks/recipes.py trains it (same data, seeds and settings,
so every layer's accuracy on the recipes evaluation split reproduces benchmarks/results/recipes.json; each run checks
this and records it), saved under outputs/benchmarks/calibration/checkpoints/, and run once at full depth over:

- `pool`: data the model never trained on, from which calibration and evaluation sets are drawn:
  SST-2: its 2,693 labelled dev + test sentences; AG News: all 7,600 items of its test release minus the 2,400
  this seed trained on (5,200 items);
- `shift` (SST-2 only): 3,000 training *phrases* this seed never trained on, for the distribution-shift example
  (calibrate on phrases, evaluate on sentences).

Each run writes `<task>_<variant>_seed<k>.npz` (`pool_logits` [L, N, C] float32 as
`model(..., output_layer_logits=True).layer_logits` stacks them, `pool_labels`, `shift_logits`, `shift_labels`) and adds its
record to `runs.json` in the output folder; a rerun skips finished runs. One process at a time, one thread:

    OMP_NUM_THREADS=1 python benchmarks/calibration_data.py             # 12 runs, about 3-7 min each on one core
    python benchmarks/calibration_data.py --tasks sst2 --seeds 0        # one task, one seed
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
from common import OUTPUTS, REPO, load_ag_news, load_sst2, write_json

DATA = OUTPUTS / "calibration"
RECIPES = REPO / "benchmarks" / "results" / "recipes.json"
TASKS = ("sst2", "ag_news")
VARIANTS = ("recommended", "per_layer")
SHIFT_SAMPLES = 3000


def pools(task: str, seed: int) -> dict:
    """The unseen pools of one seed's model: `pool` (and `shift` for SST-2), as datasets with `text` and `label`.

    The recipes benchmark shuffles the training data with seed 1000 + seed and uses its first
    `CALIBRATION_SAMPLES + train_samples` rows (recipes.load_task); everything after them was never trained on.
    """
    from datasets import concatenate_datasets
    from recipes import CALIBRATION_SAMPLES, TASK_DEFAULTS

    used = CALIBRATION_SAMPLES + TASK_DEFAULTS[task]["train_samples"]
    if task == "sst2":
        phrases = load_sst2("train").shuffle(seed=1000 + seed)
        return {
            "pool": concatenate_datasets([load_sst2("dev"), load_sst2("test")]),
            "shift": phrases.select(range(used, used + SHIFT_SAMPLES)),
        }
    splits = load_ag_news()
    train = splits["train"].shuffle(seed=1000 + seed)
    held_out = [train.select(range(CALIBRATION_SAMPLES)), train.select(range(used, len(train))), splits["test"]]
    return {"pool": concatenate_datasets(held_out)}


def layer_logits_of(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 64) -> np.ndarray:
    """[L, N, C] float32 full-depth logits of every layer, in the order of `texts` (batched by length)."""
    import torch
    from transformers import DataCollatorWithPadding

    collator = DataCollatorWithPadding(tokenizer)
    encoded = [tokenizer(text, truncation=True, max_length=max_length) for text in texts]
    order = sorted(range(len(texts)), key=lambda index: len(encoded[index]["input_ids"]))
    chunks = []
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = collator([encoded[index] for index in order[start : start + batch_size]])
            chunks.append(model(**batch, output_layer_logits=True).layer_logits.float())
    logits = torch.cat(chunks, dim=1)
    result = torch.empty_like(logits)
    result[:, torch.tensor(order)] = logits
    return result.numpy()


def one_run(task: str, variant: str, seed: int, out: Path) -> dict:
    """Trains one (task, variant, seed) as the recipes benchmark does, then stores its logits over the pools."""
    from common import minilm_path
    from recipes import TASK_DEFAULTS, run_one
    from transformers import AutoTokenizer

    from hf_aligned import AlignedForSequenceClassification

    checkpoint = out / "checkpoints" / task / variant / f"seed{seed}"
    max_length = TASK_DEFAULTS[task]["max_length"]
    record = run_one(task, variant, seed, TASK_DEFAULTS[task]["train_samples"], max_length, checkpoint=checkpoint)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = AlignedForSequenceClassification.from_pretrained(checkpoint).eval()
    arrays = {}
    for name, data in pools(task, seed).items():
        arrays[f"{name}_logits"] = layer_logits_of(model, tokenizer, data["text"], max_length)
        arrays[f"{name}_labels"] = np.asarray(data["label"], dtype=np.int64)
    np.savez(out / f"{task}_{variant}_seed{seed}.npz", **arrays)
    record["logits_time_s"] = round(time.perf_counter() - started, 1)
    record["pool_sizes"] = {name[: -len("_labels")]: len(value) for name, value in arrays.items() if "labels" in name}
    return record


def main() -> None:
    from recipes import isolated, provenance

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=DATA, help="where checkpoints, logits and runs.json go")
    options = parser.parse_args()
    options.out.mkdir(parents=True, exist_ok=True)
    runs_path = options.out / "runs.json"
    runs = json.loads(runs_path.read_text()) if runs_path.exists() else {}
    recipes = json.loads(RECIPES.read_text())["runs"]
    for variant in options.variants:
        for seed in options.seeds:
            for task in options.tasks:
                key = f"{task}/{variant}/{seed}"
                if key in runs and (options.out / f"{task}_{variant}_seed{seed}.npz").exists():
                    continue
                record = isolated(one_run, task, variant, seed, options.out)
                reference = recipes.get(key, {}).get("layer_accuracy")
                if reference is not None:
                    record["recipes_layer_accuracy"] = reference
                    record["max_layer_accuracy_difference"] = max(
                        abs(a - b) for a, b in zip(record["layer_accuracy"], reference)
                    )
                runs[key] = {**record, "provenance": provenance(sys.argv)}
                write_json(runs_path, runs)
                print(
                    f"=== {key}: {runs[key].get('max_layer_accuracy_difference')} {record['wall_time_s']} s",
                    flush=True,
                )


if __name__ == "__main__":
    main()
