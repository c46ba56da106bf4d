#!/usr/bin/env python
"""Aligned training of a decoder-only language model, evaluated after every layer, ready for self-speculative decoding.

The texts come from a Hugging Face dataset (Hub name) or local text / csv / json / jsonl files; the model is a
checkpoint (`--model_name_or_path`, Hub id or folder) or a small one built from a config (`--model_type llama
--config_overrides hidden_size=256,num_hidden_layers=8`), with a tokenizer from `--tokenizer_name` or one trained on
the training texts (`--train_tokenizer_vocab_size 2048`). Texts are joined with the end-of-text token and cut into
`--block_size` blocks.

    python examples/run_causal_lm.py --output_dir outputs/lm_aligned --model_type llama \
        --config_overrides hidden_size=256,intermediate_size=688,num_hidden_layers=8,num_attention_heads=4 \
        --train_tokenizer_vocab_size 2048 --train_file ../shared/data/ag_news/test.csv --text_column description \
        --validation_split_percentage 5 --max_steps 500 --learning_rate 1e-3
    python examples/run_causal_lm.py --output_dir outputs/gpt2_aligned --model_name_or_path gpt2 \
        --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 --num_train_epochs 1

It prints every layer's perplexity and agreement with the last layer, the suggested `assistant_early_exit`, and saves
a plain checkpoint (loadable with `AutoModelForCausalLM`, no hf_aligned needed) with its tokenizer and model card.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from datasets import DatasetDict, load_dataset
from transformers import (
    AutoConfig,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedTokenizerFast,
    default_data_collator,
    set_seed,
)

from hf_aligned import AlignedForCausalLM, AlignedTrainer, AlignedTrainingArguments, suggest_assistant_early_exit

FILE_LOADERS = {".txt": "text", ".csv": "csv", ".json": "json", ".jsonl": "json"}
END_OF_TEXT = "<|endoftext|>"


@dataclass
class ModelArguments:
    """Which model to train and with which tokenizer."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Checkpoint (Hub id or folder)."})
    model_type: str | None = field(default=None, metadata={"help": "Build a new model of this type (e.g. llama)."})
    config_overrides: str | None = field(
        default=None, metadata={"help": "With --model_type: comma-separated key=value config settings."}
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer (default: the checkpoint's)."})
    train_tokenizer_vocab_size: int | None = field(
        default=None, metadata={"help": "Train a byte-level BPE tokenizer of this size on the training texts."}
    )


@dataclass
class DataArguments:
    """Which texts to train and evaluate on."""

    dataset_name: str | None = field(default=None, metadata={"help": "A Hugging Face dataset name."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    train_file: str | None = field(default=None, metadata={"help": "Local .txt/.csv/.json/.jsonl training file."})
    validation_file: str | None = field(default=None, metadata={"help": "Local evaluation file, same format."})
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Without an evaluation split: the share of the training texts held out."}
    )
    text_column: str = field(default="text", metadata={"help": "The column holding the text."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training block."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many evaluation blocks."})


def load_texts(data_args: DataArguments, seed: int) -> DatasetDict:
    """The `train` and `eval` texts, in one `text` column."""
    if data_args.dataset_name is not None:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    elif data_args.train_file is not None:
        suffix = Path(data_args.train_file).suffix
        if suffix not in FILE_LOADERS:
            raise ValueError(f"--train_file must end with one of {sorted(FILE_LOADERS)}, got {data_args.train_file}.")
        files = {"train": data_args.train_file}
        if data_args.validation_file is not None:
            files["validation"] = data_args.validation_file
        raw = load_dataset(FILE_LOADERS[suffix], data_files=files)
    else:
        raise ValueError("Give --dataset_name or --train_file.")
    eval_split = next((name for name in ("validation", "test") if name in raw), None)
    if eval_split is None:
        held_out = raw["train"].train_test_split(test_size=data_args.validation_split_percentage / 100, seed=seed)
        raw = DatasetDict({"train": held_out["train"], "validation": held_out["test"]})
        eval_split = "validation"
    if data_args.text_column not in raw["train"].column_names:
        raise ValueError(f"--text_column {data_args.text_column!r} is not one of {raw['train'].column_names}.")
    splits = DatasetDict({"train": raw["train"], "eval": raw[eval_split]})
    splits = splits.select_columns([data_args.text_column])
    return splits if data_args.text_column == "text" else splits.rename_column(data_args.text_column, "text")


def load_tokenizer(model_args: ModelArguments, texts: list[str]):
    if model_args.train_tokenizer_vocab_size is not None:
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(texts, vocab_size=model_args.train_tokenizer_vocab_size, special_tokens=[END_OF_TEXT])
        return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT)
    name = model_args.tokenizer_name or model_args.model_name_or_path
    if name is None:
        raise ValueError("A model built from --model_type needs --tokenizer_name or --train_tokenizer_vocab_size.")
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_args: ModelArguments, tokenizer):
    if model_args.model_name_or_path is not None:
        return AlignedForCausalLM.from_pretrained(model_args.model_name_or_path)
    if model_args.model_type is None:
        raise ValueError("Give --model_name_or_path or --model_type.")
    # The overrides go to the constructor, so the settings derived from them follow (a Llama's `head_dim` and
    # `num_key_value_heads` from `hidden_size` and `num_attention_heads`, not the 7B defaults).
    parsed = AutoConfig.for_model(model_args.model_type)
    overrides = {}
    if model_args.config_overrides:
        parsed.update_from_string(model_args.config_overrides)
        keys = [item.split("=", 1)[0].strip() for item in model_args.config_overrides.split(",")]
        overrides = {key: getattr(parsed, key) for key in keys}
    config = AutoConfig.for_model(model_args.model_type, **{"vocab_size": len(tokenizer), **overrides})
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = None
    return AlignedForCausalLM.from_config(config)


def pack(splits: DatasetDict, tokenizer, block_size: int) -> DatasetDict:
    """Tokenized texts joined with end-of-text tokens and cut into `block_size`-token blocks, with `labels` equal to
    `input_ids` (as transformers' run_clm): every block is full, so nothing is padded and every end-of-text token is
    trained on and scored (a padding collator would mask it when the pad token is the end-of-text token)."""

    def blocks(batch: dict) -> dict:
        ids = [
            token for encoded in tokenizer(batch["text"])["input_ids"] for token in (*encoded, tokenizer.eos_token_id)
        ]
        cut = [ids[start : start + block_size] for start in range(0, len(ids) - block_size + 1, block_size)]
        return {"input_ids": cut, "labels": [list(block) for block in cut]}

    return splits.map(blocks, batched=True, remove_columns=["text"])


def run(argv: list[str] | None = None) -> tuple[AlignedTrainer, dict[str, float]]:
    """Trains, saves and evaluates; returns the trainer and its metrics (`eval_layer_{l}_perplexity`, ...)."""
    parser = HfArgumentParser((ModelArguments, DataArguments, AlignedTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(argv[0])
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)
    with training_args.main_process_first(desc="loading the data"):
        splits = load_texts(data_args, training_args.seed)
    tokenizer = load_tokenizer(model_args, splits["train"]["text"])
    with training_args.main_process_first(desc="tokenizing"):
        splits = pack(splits, tokenizer, data_args.block_size)
    if model_args.model_name_or_path is None:
        # A model built from a config knows no longer texts than its blocks: its saved tokenizer says so. A pretrained
        # checkpoint keeps its tokenizer's length (GPT-2's 1024), which its positions were trained on.
        tokenizer.model_max_length = data_args.block_size
    for split, limit in (("train", data_args.max_train_samples), ("eval", data_args.max_eval_samples)):
        if limit is not None:
            splits[split] = splits[split].select(range(min(limit, len(splits[split]))))
    set_seed(training_args.seed)
    trainer = AlignedTrainer(
        model=load_model(model_args, tokenizer),
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["eval"],
        data_collator=default_data_collator,  # equal-length packed blocks that carry their labels
        processing_class=tokenizer,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = trainer.evaluate()
    trainer.save_metrics("eval", metrics)
    trainer.save_model()  # the plain checkpoint and its tokenizer
    trainer.create_model_card()  # README.md: every layer's perplexity and the suggested assistant_early_exit
    return trainer, metrics


def main() -> None:
    trainer, metrics = run()
    if not trainer.is_world_process_zero():
        return
    num_layers = trainer.model.config.num_hidden_layers
    print("| Layer | perplexity | agreement with the last layer |\n|---|---|---|")
    for layer in range(1, num_layers + 1):
        perplexity, agreement = (metrics[f"eval_layer_{layer}_{name}"] for name in ("perplexity", "agreement"))
        print(f"| {layer} | {perplexity:.2f} | {agreement:.3f} |")
    agreement = [metrics[f"eval_layer_{layer}_agreement"] for layer in range(1, num_layers + 1)]
    estimate = suggest_assistant_early_exit(agreement)
    if estimate is None:
        print("no draft: no layer is expected to make self-speculative decoding faster than plain decoding")
    else:
        print(f"suggested assistant_early_exit: {estimate.assistant_early_exit} ({estimate.expected_speedup:.2f}x)")


if __name__ == "__main__":
    main()
