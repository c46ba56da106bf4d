"""The `hf-aligned` command line: one subcommand per task (`hf-aligned --help` lists them)."""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .card_data import AlignedModelCardData
from .cli_analyze import accuracy_curves, analyze_saturation, similarity_results, single_label, write_analysis
from .hub import HubPushError, push_aligned_model

logger = logging.getLogger("hf_aligned.cli")

# Local data files `--dataset` accepts, and the `datasets` builder that reads each.
DATA_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Text columns tried, in order, when `--text-column` is not given.
TEXT_COLUMN_CANDIDATES = ("text", "sentence", "content", "question", "document")
# Splits tried, in order, when `--split` is not given.
SPLIT_CANDIDATES = ("validation", "test", "train")


def build_parser() -> argparse.ArgumentParser:
    """The `hf-aligned` parser; each subcommand registers itself with one `add_*_command(subparsers)` function."""
    parser = argparse.ArgumentParser(
        prog="hf-aligned",
        description="Layer-aligned training and single-classifier multi-exit inference for Hugging Face Transformers.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_analyze_command(subparsers)
    add_calibrate_command(subparsers)
    add_push_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `hf-aligned` console script."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.run(args) or 0


# ----------------------------------------------------------------------------------------------------------------------
# hf-aligned analyze
# ----------------------------------------------------------------------------------------------------------------------


def add_analyze_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="Layer-wise representation similarity (COS, CKA), per-layer accuracy and saturation of a model.",
        description=(
            "Reads the pooled representation after every layer of MODEL_DIR on a data set and writes the COS and "
            "CKA matrices, their agreement, per-layer accuracy of the shared classifier (and optionally of linear "
            "probes) as similarity.json, with heatmaps and an accuracy plot as PNG. For an aligned checkpoint of a "
            "single-label classifier it also writes saturation.json: the saturation layer distribution (the first "
            "layer from which the top-1 prediction no longer changes) and, per layer and sample, the cosine "
            "similarity to the last layer against the classifier's probability of the last layer's class (and of "
            "the true class), with their rank correlations; plotted as saturation.png and probability_similarity.png."
        ),
    )
    parser.add_argument(
        "model_dir", metavar="MODEL_DIR", help="An aligned checkpoint (or a plain base checkpoint) folder or Hub id."
    )
    parser.add_argument(
        "--dataset",
        required=True,
        help="A local .csv/.tsv/.json/.jsonl/.parquet file, a folder written by `Dataset.save_to_disk`, or a Hub "
        "dataset name.",
    )
    parser.add_argument("--dataset-config", default=None, help="The Hub dataset's configuration name (e.g. 'sst2').")
    parser.add_argument(
        "--split", default=None, help="The split to read; defaults to the first of validation, test, train."
    )
    parser.add_argument(
        "--text-column", default=None, help=f"Text column; defaults to the first of {TEXT_COLUMN_CANDIDATES}."
    )
    parser.add_argument("--text-pair-column", default=None, help="Second text column, for sentence-pair tasks.")
    parser.add_argument("--image-column", default="image", help="Image column, for image models.")
    parser.add_argument(
        "--label-column", default="label", help="Label column; without it only the similarities are computed."
    )
    parser.add_argument("--max-samples", type=_positive_int, default=None, help="Read at most this many samples.")
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="Samples per forward pass.")
    parser.add_argument("--max-length", type=_positive_int, default=256, help="Truncate texts to this many tokens.")
    parser.add_argument(
        "--pooling", choices=("cls", "last", "mean"), default=None, help="Pooling; defaults to the model's."
    )
    parser.add_argument(
        "--stage",
        choices=("pre", "post"),
        default="pre",
        help="Where each layer's representation is read: 'pre', the pooled block output before the classifier "
        "(default); 'post', what the classification layer reads, after the classifier's final norm, pooler and "
        "projection head. Needs the model's own pooling.",
    )
    parser.add_argument("--probes", action="store_true", help="Also train a linear probe per layer (scikit-learn).")
    parser.add_argument("--device", default=None, help="Where to run the model; defaults to cuda when available.")
    parser.add_argument("--output", required=True, help="Folder for similarity.json and the plots.")
    parser.set_defaults(run=run_analyze)


def run_analyze(args: argparse.Namespace) -> int:
    """Runs `hf-aligned analyze` (see `hf-aligned analyze --help`)."""
    from .similarity import layer_representations

    if args.stage == "post" and args.pooling is not None:
        raise ValueError(
            f"`--stage post` reads the vectors the classifier reads, with the model's own pooling; drop "
            f"`--pooling {args.pooling}` or use `--stage pre`."
        )
    with _step("loading the model and the data"):
        model, trained_classifier = _load_analyzed_model(args)
        dataset, processed, collate_fn = _load_analyzed_data(model, args)
    with _step(f"every layer's representation of {len(processed)} samples"):
        reps, labels = layer_representations(
            model,
            processed,
            pooling=args.pooling,
            batch_size=args.batch_size,
            collate_fn=collate_fn,
            return_labels=True,
            stage=args.stage,
        )
    with _step("COS and CKA between layers"):
        results = similarity_results(reps, model, dataset, args)
    with _step("per-layer accuracy" + (" and linear probes" if args.probes else "")):
        curves = accuracy_curves(model, processed, collate_fn, args, reps, labels, trained_classifier, results)
    if trained_classifier and single_label(model):
        with _step("saturation"):
            saturation = analyze_saturation(model, processed, collate_fn, args, reps, labels)
    else:
        saturation = None
        logger.info("Saturation skipped: it needs an aligned checkpoint of a single-label classifier.")
    output = write_analysis(args, results, curves, saturation)
    agreement = results["agreement"]
    print(
        f"{reps.shape[1]} samples, {reps.shape[0]} layers: mean off-diagonal COS "
        f"{results['off_diagonal_mean']['cos']:.4f}, CKA {results['off_diagonal_mean']['cka']:.4f}; "
        f"agreement Spearman {agreement['spearman']:.4f}, Pearson {agreement['pearson']:.4f}. "
        f"Written to {output}."
    )
    if saturation is not None:
        report = saturation[0]
        print(
            f"Mean saturation layer {report['saturation']['mean']:.3f}; Spearman of cosine to the last layer and "
            f"the last layer's class probability {report['probability_similarity']['last_class']['spearman']:.4f}."
        )
    return 0


@contextmanager
def _step(description: str) -> Iterator[None]:
    """Announces a step of a command on stderr, shows a progress bar over its passes through the data, and says how
    long it took (as transformers' tools report long work)."""
    from .data import show_progress

    print(f"hf-aligned: {description} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with show_progress(description):
        yield
    print(f"hf-aligned: {description}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def _load_analyzed_model(args: argparse.Namespace):
    """The model to analyze, on its device and in eval mode, and whether its classifier was trained (an aligned
    checkpoint) rather than new (a base checkpoint)."""
    import torch
    from transformers import AutoConfig

    from .configuration_aligned import AlignedConfig
    from .modeling_aligned import AlignedForSequenceClassification

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AlignedForSequenceClassification.from_pretrained(args.model_dir).to(device).eval()
    return model, isinstance(AutoConfig.from_pretrained(args.model_dir), AlignedConfig)


def _load_analyzed_data(model, args: argparse.Namespace):
    """The split to analyze: raw, processed for the model, and its collator."""
    from transformers import AutoTokenizer, DataCollatorWithPadding, default_data_collator

    dataset = _load_split(args.dataset, args.dataset_config, args.split)
    if args.max_samples is not None and args.max_samples < len(dataset):
        dataset = dataset.select(range(args.max_samples))
    has_labels = args.label_column in dataset.column_names
    if not has_labels:
        logger.info(f"No column {args.label_column!r}: skipping per-layer accuracy.")
    if model.base_model.main_input_name == "pixel_values":
        return dataset, _process_images(dataset, args, has_labels), default_data_collator
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    # transformers 5 may leave `label2id` unset when only `id2label` was given: invert the latter.
    label2id = {name: int(index) for index, name in (model.config.id2label or {}).items()}
    processed = _tokenize(dataset, tokenizer, args, has_labels, label2id)
    return dataset, processed, DataCollatorWithPadding(tokenizer)


def _load_split(name: str, config_name: str | None, split: str | None):
    """One split of a local data file, a `save_to_disk` folder or a Hub dataset."""
    import datasets

    path = Path(name)
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
    elif path.is_file():
        builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"`--dataset {name}`: unsupported file type {path.suffix!r}; use one of "
                f"{sorted(DATA_FILE_BUILDERS)} or a Hub dataset name."
            )
        # Tab-separated text is read without quote handling: sentences may contain quote characters.
        options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if path.suffix.lower() == ".tsv" else {}
        loaded = datasets.load_dataset(builder, data_files={"train": str(path)}, **options)
        if split not in (None, "train"):
            raise ValueError(f"`--split {split}`: a single data file has only the split 'train'.")
    elif path.suffix.lower() in DATA_FILE_BUILDERS:
        raise ValueError(f"`--dataset {name}`: no such file.")
    else:
        loaded = datasets.load_dataset(name, config_name)
    if isinstance(loaded, datasets.Dataset):
        return loaded
    if split is None:
        split = next((candidate for candidate in SPLIT_CANDIDATES if candidate in loaded), None)
        if split is None:
            split = next(iter(loaded))
    if split not in loaded:
        raise ValueError(f"`--split {split}`: the dataset has the splits {sorted(loaded)}.")
    return loaded[split]


def _tokenize(dataset, tokenizer, args: argparse.Namespace, has_labels: bool, label2id: dict[str, int]):
    text_column = args.text_column or next((c for c in TEXT_COLUMN_CANDIDATES if c in dataset.column_names), None)
    if text_column not in dataset.column_names:
        raise ValueError(
            f"`--text-column {text_column}` is not a column of the dataset; pass one of {dataset.column_names}."
        )
    if args.text_pair_column is not None and args.text_pair_column not in dataset.column_names:
        raise ValueError(
            f"`--text-pair-column {args.text_pair_column}` is not a column of the dataset; pass one of "
            f"{dataset.column_names}."
        )
    label_of = _label_mapping(dataset, args.label_column, label2id) if has_labels else None

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        pair = batch[args.text_pair_column] if args.text_pair_column else None
        encoded = dict(tokenizer(batch[text_column], pair, truncation=True, max_length=args.max_length))
        if label_of is not None:
            encoded["labels"] = [label_of(label) for label in batch[args.label_column]]
        return encoded

    return dataset.map(tokenize, batched=True, remove_columns=dataset.column_names)


def _process_images(dataset, args: argparse.Namespace, has_labels: bool):
    from transformers import AutoImageProcessor

    if args.image_column not in dataset.column_names:
        raise ValueError(
            f"`--image-column {args.image_column}` is not a column of the dataset; its columns are "
            f"{dataset.column_names}."
        )
    processor = AutoImageProcessor.from_pretrained(args.model_dir)

    def process(batch: dict[str, list]) -> dict[str, Any]:
        processed = {"pixel_values": processor(images=batch[args.image_column], return_tensors="pt")["pixel_values"]}
        if has_labels:
            processed["labels"] = batch[args.label_column]
        return processed

    return dataset.with_transform(process)


def _label_mapping(dataset, column: str, label2id: dict[str, int]):
    """Maps label values to class ids: integers as they are, names through the model's `label2id`."""
    values = dataset.unique(column)
    names = [value for value in values if isinstance(value, str)]
    if not names:
        return int
    unknown = sorted(set(names) - set(label2id))
    if unknown:
        raise ValueError(
            f"Labels {unknown[:5]} of column {column!r} are not in the model's label2id {label2id}; map them to "
            "class ids first or pass the right `--label-column`."
        )
    return lambda value: label2id[value] if isinstance(value, str) else int(value)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


# ----------------------------------------------------------------------------------------------------------------------
# hf-aligned calibrate
# ----------------------------------------------------------------------------------------------------------------------


def add_calibrate_command(subparsers: argparse._SubParsersAction) -> None:
    from .calibration import CALIBRATION_RULES, DEFAULT_CALIBRATION_RULE, RISKS

    parser = subparsers.add_parser(
        "calibrate",
        help="Chooses the exit setting with a guarantee and writes exit_config.json beside the model.",
        description="Runs MODEL_DIR once over calibration data and chooses the fastest exit setting whose risk on "
        "new data from the same distribution is at most --max-accuracy-drop with probability 1 - --delta (Learn "
        "then Test; docs/early_exit.md). Writes exit_config.json (the setting and how it was calibrated), "
        "calibration.json (every setting tried) and calibration.png (the trade-off) into the model folder.",
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="An aligned checkpoint folder.")
    parser.add_argument(
        "--data", dest="dataset", required=True, help="A data file, `save_to_disk` folder or Hub name."
    )
    parser.add_argument("--split", default=None, help="The split to read; defaults to validation, test, train.")
    parser.add_argument(
        "--text-column", default=None, help=f"Text column; by default one of {TEXT_COLUMN_CANDIDATES}."
    )
    parser.add_argument("--label-column", default="label", help="Label column (needed for --risk accuracy).")
    parser.add_argument("--max-samples", type=_positive_int, default=None, help="Read at most this many samples.")
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="Samples per forward pass.")
    parser.add_argument("--max-length", type=_positive_int, default=256, help="Truncate texts to this many tokens.")
    parser.add_argument("--max-accuracy-drop", type=float, default=0.01, help="Tolerated risk, a fraction (0.01).")
    parser.add_argument("--delta", type=float, default=0.1, help="Allowed probability that the promise fails (0.1).")
    parser.add_argument("--risk", choices=RISKS, default="consistency", help="What is bounded (default consistency).")
    parser.add_argument("--rule", choices=CALIBRATION_RULES, default=DEFAULT_CALIBRATION_RULE, help="The exit score.")
    parser.add_argument("--device", default=None, help="Where to run the model; defaults to cuda when available.")
    parser.set_defaults(run=run_calibrate, dataset_config=None, text_pair_column=None, image_column="image")


def run_calibrate(args: argparse.Namespace) -> int:
    """Runs `hf-aligned calibrate` (see `hf-aligned calibrate --help`)."""
    from .calibration import calibrate_exits
    from .plotting import plot_calibration

    folder = Path(args.model_dir)
    if not folder.is_dir():
        raise ValueError(f"MODEL_DIR {args.model_dir!r} must be a local folder: exit_config.json is written there.")
    model, _ = _load_analyzed_model(args)
    _, processed, collate_fn = _load_analyzed_data(model, args)
    options = {name: getattr(args, name) for name in ("max_accuracy_drop", "delta", "risk", "rule", "batch_size")}
    result = calibrate_exits(model, processed, collate_fn=collate_fn, **options)
    model.exit_config.save_pretrained(folder)
    result.save(folder / "calibration.json")
    plot_calibration(result, folder / "calibration.png")
    print(f"{result!r}\nWritten: {folder / 'exit_config.json'}, calibration.json, calibration.png.")
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# hf-aligned push
# ----------------------------------------------------------------------------------------------------------------------


def add_push_command(subparsers: argparse._SubParsersAction) -> None:
    """Adds `push MODEL_DIR REPO_ID` to the `hf-aligned` command; `args.run(args)` runs it."""
    parser = subparsers.add_parser(
        "push",
        help="upload a saved aligned model and its model card to the Hub in one commit",
        description=(
            "Upload a directory written by save_pretrained or Trainer.save_model to the Hugging Face Hub in one "
            "commit. Its README.md is kept; without one (or with --new-card) a card is generated from the "
            "directory's config, metrics (all_results.json, eval_results.json), exit_config.json, calibration.json and "
            "images."
        ),
    )
    parser.add_argument("model_dir", help="directory holding config.json and the weights")
    parser.add_argument("repo_id", help="Hub repository, namespace/name (created if missing)")
    parser.add_argument("--private", action="store_true", default=None, help="create the repository private")
    parser.add_argument("--revision", help="branch to commit to (created if missing)")
    parser.add_argument("--commit-message", help="commit message (default: 'Upload aligned model')")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the token saved by `hf auth login`)")
    parser.add_argument("--new-card", action="store_true", help="generate the card even if README.md exists")
    parser.add_argument("--dataset", action="append", help="Hub id of a training dataset (repeatable)")
    parser.add_argument("--license", help="license of the weights, e.g. apache-2.0")
    parser.add_argument("--language", action="append", help="language code of the training data (repeatable)")
    parser.set_defaults(run=run_push_command)


def run_push_command(args: argparse.Namespace) -> int:
    """Runs `hf-aligned push`; prints the commit URL, or the error and returns 1 when the push fails."""
    card_data = None
    if args.new_card or args.dataset or args.license or args.language:
        card_data = AlignedModelCardData(datasets=args.dataset, license=args.license, language=args.language)
    try:
        info = push_aligned_model(
            args.model_dir,
            args.repo_id,
            card_data=card_data,
            private=args.private,
            token=args.token,
            revision=args.revision,
            commit_message=args.commit_message,
            create_pr=args.create_pr,
        )
    except HubPushError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(info.pr_url or info.commit_url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
