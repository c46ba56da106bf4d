#!/usr/bin/env python
"""Aligned training of a ViT / DeiT image classifier, evaluated after every layer.

Without arguments it trains a small ViT from scratch on scikit-learn's bundled 8x8 digits (no download), with the
paper's linear layer weights. Any Hugging Face image dataset and any ViT-style checkpoint work too. The training
defaults (`DIGITS_RECIPE`: learning rate 3e-3, 50 epochs, batch 64) suit training from scratch; when fine-tuning a
pretrained checkpoint pass your own, e.g. `--learning_rate 5e-5 --num_train_epochs 3`:

    python examples/run_image_classification.py --output_dir outputs/digits_aligned
    python examples/run_image_classification.py --output_dir outputs/digits_standard --layer_weights last
    python examples/run_image_classification.py --output_dir outputs/cifar --dataset_name cifar10 \
        --model_name_or_path facebook/deit-small-patch16-224 --learning_rate 5e-5 --num_train_epochs 3
    accelerate launch --config_file examples/accelerate/ddp.yaml \
        examples/run_image_classification.py --output_dir outputs/digits_ddp --use_cpu true

Arguments can also come from one JSON file: `python examples/run_image_classification.py args.json`. The script
prints the per-layer accuracy table, saves the model and its image processor to `--output_dir`, and writes the
metrics to `eval_results.json` there. With `--calibration_split_percentage` it holds that part of the training split
out, calibrates the exits on it with a guarantee (`--max_accuracy_drop`, `--calibration_delta`), scores them on the
evaluation split (full vs early-exit accuracy, mean exit layer, measured speed-up) and saves `exit_config.json`,
`calibration.json` and `exit_evaluation.json`:

    python examples/run_image_classification.py --output_dir outputs/digits_exits --calibration_split_percentage 20 \
        --max_accuracy_drop 0.05
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, load_dataset
from transformers import AutoImageProcessor, HfArgumentParser, ViTConfig, ViTImageProcessorPil, set_seed

from hf_aligned import (
    AlignedConfig,
    AlignedForSequenceClassification,
    AlignedTrainer,
    AlignedTrainingArguments,
    ExitCalibrationArguments,
    calibrate_and_evaluate,
    format_exit_report,
    format_layer_table,
)

# Training defaults for a small ViT from scratch on the digits (they replace TrainingArguments' fine-tuning defaults).
DIGITS_RECIPE = {
    "output_dir": "outputs/digits",
    "learning_rate": 3e-3,
    "num_train_epochs": 50.0,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 128,
    "warmup_steps": 0.05,
}


@dataclass
class ModelArguments:
    """Which model to train: a pretrained ViT-style checkpoint, or a small ViT built from scratch."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A ViT/DeiT checkpoint (Hub id or folder). Leave unset to train a small ViT from scratch."},
    )
    pooling: str = field(
        default="auto", metadata={"help": "Token the classifier reads: 'auto' (the CLS token), 'cls' or 'mean'."}
    )
    classifier_sharing: str = field(
        default="shared",
        metadata={
            "help": "'shared': one classifier after every layer (aligned training). 'per_layer': one classifier per "
            "layer, the standard multi-exit baseline."
        },
    )
    num_hidden_layers: int = field(default=8, metadata={"help": "From scratch only: number of blocks."})
    hidden_size: int = field(default=64, metadata={"help": "From scratch only: width of the blocks."})
    num_attention_heads: int = field(default=4, metadata={"help": "From scratch only: attention heads per block."})
    intermediate_size: int = field(default=128, metadata={"help": "From scratch only: MLP width."})
    patch_size: int = field(default=4, metadata={"help": "From scratch only: side of the square patches."})
    image_size: int | None = field(
        default=None, metadata={"help": "From scratch only: images are resized to this side (default: the data's)."}
    )


@dataclass
class DataArguments:
    """Which images to train and evaluate on."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A Hugging Face image dataset (Hub id, or 'imagefolder' with --data_dir). Leave unset for "
            "scikit-learn's bundled 8x8 digits."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    data_dir: str | None = field(default=None, metadata={"help": "Local folder of images, for 'imagefolder'."})
    image_column: str | None = field(
        default=None, metadata={"help": "Column holding the images (default: 'image', 'img' or the first image)."}
    )
    label_column: str = field(default="label", metadata={"help": "Column holding the class labels."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(
        default=None,
        metadata={
            "help": "Split to evaluate on (default: 'validation' or 'test' when present, else a held-out part of "
            "the training split)."
        },
    )
    validation_split_percentage: float = field(
        default=20.0, metadata={"help": "Held-out percentage of the training split when there is no eval split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set."})


def load_digits_dataset() -> Dataset:
    """scikit-learn's bundled 1,797 handwritten 8x8 digits as an image dataset (grayscale, 10 classes)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    features = Features({"image": Image(), "label": ClassLabel(names=[str(digit) for digit in range(10)])})
    return Dataset.from_dict({"image": list(pixels), "label": digits.target.tolist()}, features=features)


def load_image_datasets(data_args: DataArguments, seed: int, calibration_percentage: float = 0.0) -> DatasetDict:
    """The train and eval splits (and `calibration`, held out of the training split when `calibration_percentage` is
    set), with the image column named `image` and the label column `label`."""
    if data_args.dataset_name is None:
        raw = DatasetDict({"train": load_digits_dataset()})
    else:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name, data_dir=data_args.data_dir)
    eval_split = data_args.eval_split or next((split for split in ("validation", "test") if split in raw), None)
    if eval_split is None:
        held_out = raw[data_args.train_split].train_test_split(
            test_size=data_args.validation_split_percentage / 100, seed=seed, stratify_by_column=data_args.label_column
        )
        splits = DatasetDict({"train": held_out["train"], "eval": held_out["test"]})
    else:
        splits = DatasetDict({"train": raw[data_args.train_split], "eval": raw[eval_split]})
    if calibration_percentage:
        held_out = splits["train"].train_test_split(
            test_size=calibration_percentage / 100, seed=seed, stratify_by_column=data_args.label_column
        )
        splits = DatasetDict({**splits, "train": held_out["train"], "calibration": held_out["test"]})
    image_column = data_args.image_column or _find_image_column(splits["train"])
    splits = splits.select_columns([image_column, data_args.label_column])
    if image_column != "image":
        splits = splits.rename_column(image_column, "image")
    if data_args.label_column != "label":
        splits = splits.rename_column(data_args.label_column, "label")
    for split, limit in (("train", data_args.max_train_samples), ("eval", data_args.max_eval_samples)):
        if limit is not None:
            splits[split] = splits[split].select(range(min(limit, len(splits[split]))))
    return splits


def _find_image_column(dataset: Dataset) -> str:
    for name in ("image", "img"):
        if name in dataset.column_names:
            return name
    for name, feature in dataset.features.items():
        if isinstance(feature, Image):
            return name
    raise ValueError(f"No image column among {dataset.column_names}; name it with --image_column.")


def build_model_and_processor(
    model_args: ModelArguments, labels: list[str], sample_image
) -> tuple[AlignedForSequenceClassification, ViTImageProcessorPil]:
    """The aligned model (pretrained or from scratch) and the image processor that feeds it."""
    aligned_kwargs = {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: index for index, label in enumerate(labels)},
        "pooling": model_args.pooling,
        "classifier_sharing": model_args.classifier_sharing,
    }
    if model_args.model_name_or_path is not None:
        model = AlignedForSequenceClassification.from_pretrained(model_args.model_name_or_path, **aligned_kwargs)
        processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path)
        return model, processor
    image_size = model_args.image_size or max(sample_image.size)
    num_channels = 1 if sample_image.mode in ("L", "I", "F", "1") else 3
    base_config = ViTConfig(
        image_size=image_size,
        patch_size=model_args.patch_size,
        num_channels=num_channels,
        hidden_size=model_args.hidden_size,
        num_hidden_layers=model_args.num_hidden_layers,
        num_attention_heads=model_args.num_attention_heads,
        intermediate_size=model_args.intermediate_size,
    )
    model = AlignedForSequenceClassification(AlignedConfig(base_config=base_config, **aligned_kwargs))
    processor = ViTImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5] * num_channels,
        image_std=[0.5] * num_channels,
    )
    return model, processor


def run(argv: list[str] | None = None) -> tuple[AlignedTrainer, dict[str, float]]:
    """Trains, saves and evaluates; returns the trainer and its evaluation metrics (`eval_layer_{l}_accuracy`, ...)."""
    parser = HfArgumentParser((ModelArguments, DataArguments, ExitCalibrationArguments, AlignedTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        values = json.loads(Path(argv[0]).read_text())
        model_args, data_args, exit_args, training_args = parser.parse_dict({**DIGITS_RECIPE, **values})
    else:
        parser.set_defaults(**DIGITS_RECIPE)
        model_args, data_args, exit_args, training_args = parser.parse_args_into_dataclasses(argv)
    # The transform below reads the `image` column, which Trainer would otherwise drop as unknown to the model.
    training_args.remove_unused_columns = False

    splits = load_image_datasets(data_args, training_args.seed, exit_args.calibration_split_percentage)
    exit_args.check_size(len(splits["calibration"]) if "calibration" in splits else 0)
    labels = splits["train"].features["label"].names
    set_seed(training_args.seed)
    model, processor = build_model_and_processor(model_args, labels, splits["train"][0]["image"])
    mode = "L" if model.config.base_config.num_channels == 1 else "RGB"

    def transform(batch: dict) -> dict:
        images = [image.convert(mode) for image in batch["image"]]
        return {"pixel_values": processor(images, return_tensors="pt")["pixel_values"], "labels": batch["label"]}

    trainer = AlignedTrainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"].with_transform(transform),
        eval_dataset=splits["eval"].with_transform(transform),
        data_collator=collate_images,
        processing_class=processor,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    trainer.save_state()  # trainer_state.json: the log history with the per-layer training losses
    metrics = trainer.evaluate()
    trainer.save_metrics("eval", metrics)
    if "calibration" in splits and trainer.is_world_process_zero():
        result, scores = calibrate_and_evaluate(
            trainer.model,
            splits["calibration"].with_transform(transform),
            trainer.eval_dataset,
            exit_args,
            collate_fn=collate_images,
            batch_size=training_args.per_device_eval_batch_size,
            output_dir=training_args.output_dir,
        )
        print(format_exit_report(result, scores))
    return trainer, metrics


def collate_images(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stacks transformed examples into a batch."""
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples]),
    }


def main() -> None:
    trainer, metrics = run()
    if trainer.is_world_process_zero():
        print(format_layer_table({"eval accuracy": metrics}))


if __name__ == "__main__":
    main()
