"""`RepresentationDynamicsCallback`: how each layer's representation moves during training, for any `Trainer`."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

from .data import collect_layer_logits
from .modeling_aligned import REPRESENTATION_STAGES
from .probes import classifier_layer_accuracy, linear_probe_accuracy
from .saturation import saturation_layers, summarize_saturation
from .similarity import layer_representations, layerwise_cka
from .utils import json_safe

logger = logging.get_logger(__name__)


class RepresentationDynamicsCallback(TrainerCallback):
    """Tracks per-layer representation change and per-layer accuracy on a fixed probe set through training.

    At the start of training and at every evaluation, the probe set's pooled representations (embedding output and
    every block) are read and compared, layer by layer, with linear CKA against those at the previous evaluation and
    at the start (Sharon & Dar, 2024); the shared classifier's accuracy after every block (and, optionally, a linear
    probe's accuracy per layer and the saturation layers of [`saturation_layers`]) is measured too. The records are
    written as JSON into the output directory after every evaluation, and drawn as layer-by-step heatmaps when
    training ends. Works with any `Trainer` whose model has `pooled_layer_states` (an
    [`AlignedForSequenceClassification`]).

    Every process computes the measurements (the model may be sharded); only the main process writes files.

    Args:
        probe_dataset: a small, fixed, tokenized `datasets.Dataset` (or iterable of dict batches) with labels, e.g.
            a few hundred validation samples.
        batch_size: samples per forward pass.
        collate_fn: batches dataset samples (e.g. `DataCollatorWithPadding(tokenizer)`); defaults to
            `default_data_collator`.
        max_samples: read at most this many samples of `probe_dataset`.
        pooling: pooling of the representations; defaults to the model's.
        stage: where the representations are read: `"pre"` (the pooled block outputs, before the classifier) or
            `"post"` (what the classification layer reads, after the projection head); see
            `AlignedForSequenceClassification.pooled_layer_states`.
        linear_probes: also train a logistic-regression probe per layer at every evaluation (needs scikit-learn).
        probe_test_size: fraction of the probe set held out to score the linear probes.
        track_saturation: also record, at every evaluation, the probe set's `mean_saturation_layer` and
            `saturated_by` (the share of samples whose top-1 prediction no longer changes from layer l on, for
            l = 1..L); costs one more forward pass over the probe set. Needs a single-label classifier.
        file_name: base name of the written files (`<file_name>.json`, `<file_name>.png`).
        plot: draw the heatmaps at the end of training (needs matplotlib; skipped with a warning without it).

    Example:

    ```python
    >>> callback = RepresentationDynamicsCallback(tokenized["validation"].select(range(256)), collate_fn=collator)
    >>> trainer = Trainer(model=model, args=args, train_dataset=..., eval_dataset=..., callbacks=[callback])
    >>> trainer.train()  # writes <output_dir>/representation_dynamics.json and .png
    ```
    """

    def __init__(
        self,
        probe_dataset: Any,
        batch_size: int = 32,
        collate_fn: Callable[[list[dict]], Mapping[str, Any]] | None = None,
        max_samples: int | None = None,
        pooling: str | None = None,
        stage: str = "pre",
        linear_probes: bool = False,
        probe_test_size: float = 0.25,
        track_saturation: bool = False,
        file_name: str = "representation_dynamics",
        plot: bool = True,
    ):
        if not 0.0 < probe_test_size < 1.0:
            raise ValueError(f"`probe_test_size` must lie strictly between 0 and 1, got {probe_test_size}.")
        if stage not in REPRESENTATION_STAGES:
            raise ValueError(f"`stage={stage!r}` is not supported; use one of {REPRESENTATION_STAGES}.")
        self.probe_dataset = probe_dataset
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.max_samples = max_samples
        self.pooling = pooling
        self.stage = stage
        self.linear_probes = linear_probes
        self.probe_test_size = probe_test_size
        self.track_saturation = track_saturation
        self.file_name = file_name
        self.plot = plot
        self.records: list[dict[str, Any]] = []
        self._initial: torch.Tensor | None = None
        self._previous: torch.Tensor | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._initial is None:
            self._measure(args, state, kwargs["model"])

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # Several evaluation sets trigger one `on_evaluate` each at the same step: measure once.
        if self.records and self.records[-1]["step"] == state.global_step:
            return
        self._measure(args, state, kwargs["model"])

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if not (self.plot and state.is_world_process_zero and self.records):
            return
        from .plotting import plot_dynamics

        try:
            plot_dynamics(self.records, os.path.join(args.output_dir, f"{self.file_name}.png"))
        except ImportError as error:
            logger.warning(f"Representation dynamics not plotted: {error}")

    def _measure(self, args: TrainingArguments, state: TrainerState, model: torch.nn.Module) -> None:
        reps, labels = layer_representations(
            model,
            self.probe_dataset,
            pooling=self.pooling,
            batch_size=self.batch_size,
            collate_fn=self.collate_fn,
            max_samples=self.max_samples,
            return_labels=True,
            stage=self.stage,
        )
        if self._initial is None:
            self._initial = reps
        record: dict[str, Any] = {
            "step": state.global_step,
            "epoch": state.epoch,
            "cka_to_initial": layerwise_cka(self._initial, reps),
            "cka_to_previous": None if self._previous is None else layerwise_cka(self._previous, reps),
            "classifier_accuracy": None,
        }
        self._previous = reps
        if self.track_saturation:
            layer_logits, _ = collect_layer_logits(
                model, self.probe_dataset, self.batch_size, self.collate_fn, self.max_samples
            )
            summary = summarize_saturation(saturation_layers(layer_logits), layer_logits.shape[0])
            record["mean_saturation_layer"] = summary.mean
            record["saturated_by"] = summary.saturated_by
        if labels is not None:
            record["classifier_accuracy"] = classifier_layer_accuracy(
                model, self.probe_dataset, self.batch_size, self.collate_fn, self.max_samples
            )
            if self.linear_probes:
                probes = linear_probe_accuracy(reps, labels, test_size=self.probe_test_size, seed=args.seed)
                record["probe_accuracy"] = probes.test_accuracy
        self.records.append(record)
        if state.is_world_process_zero:
            self._write(args, reps.shape[1])

    def _write(self, args: TrainingArguments, num_samples: int) -> None:
        os.makedirs(args.output_dir, exist_ok=True)
        content = {
            "num_samples": num_samples,
            "stage": self.stage,
            "num_layers": len(self.records[0]["cka_to_initial"]) - 1,
            "layers": "cka_* and probe_accuracy: embedding output (0) and blocks 1..L; classifier_accuracy and "
            "saturated_by: 1..L",
            "records": self.records,
        }
        with open(os.path.join(args.output_dir, f"{self.file_name}.json"), "w", encoding="utf-8") as handle:
            json.dump(json_safe(content), handle, indent=2, allow_nan=False)
