"""The early-exit runner: classify after each block and really remove the samples that left from the batch.

[`run_early_exit`] runs the base model's blocks with hooks that, after each block, classify the samples still
running, record those that leave (with the rule of `exits.py`), and shrink the running batch (and every per-sample
tensor the blocks receive) before the next block. Nothing is computed for a sample after it left.
[`classify_with_early_exit`] is what `AlignedForSequenceClassification.early_exit_predict` runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .block_hooks import BlockObserver, observe_blocks
from .exits import EarlyExitResult, ExitConfig, ExitDecider, ExitLedger
from .outputs import EarlyExitOutput
from .utils import has_active_dropout

logger = logging.get_logger(__name__)

# Per-sample tensors the blocks receive are recognised by their batch dimension; these arguments never have one.
NON_BATCH_ARGUMENTS = frozenset({"cache_position"})
# What torch says when tensors of different batch sizes meet: the failure a per-sample input left uncut causes.
SHAPE_MISMATCH = re.compile(r"size of tensor|must match the size|shape .* is invalid|expanded size|Sizes of tensors")
MAIN_INPUTS = ("input_ids", "inputs_embeds", "pixel_values")


def classify_with_early_exit(
    backbone: nn.Module,
    blocks: nn.ModuleList,
    classifier: nn.Module,
    model_inputs: dict[str, Any],
    exit_config: ExitConfig,
    pooling_mask: torch.Tensor | None,
    problem_type: str | None,
) -> EarlyExitOutput:
    """Classifies a batch with early exit: each sample leaves at the first layer where the rule fires.

    Args:
        backbone: the base model, called once on `model_inputs` (checked and completed by the model).
        blocks: its list of blocks (carrying the hooks of `install_block_hooks`).
        classifier: the model's `AlignedClassifier` (`classifier.head(layer)` scores after block `layer`).
        exit_config: a validated exit rule.
        pooling_mask: the mask the classifier pools with.
        problem_type: the model's problem type: regression predicts the value, classification the class.
    """
    batch_source = next(model_inputs[name] for name in MAIN_INPUTS if name in model_inputs)
    result = run_early_exit(
        blocks=blocks,
        run_base_model=lambda: backbone(**model_inputs),
        classify=lambda layer, hidden, mask: classifier.head(layer)(hidden, mask),
        exit_config=exit_config,
        batch_size=batch_source.shape[0],
        pooling_mask=pooling_mask,
        model_type=backbone.config.model_type,
    )
    single_output = result.logits.shape[-1] == 1 or problem_type == "regression"
    predictions = result.logits.squeeze(-1) if single_output else result.logits.argmax(dim=-1)
    return EarlyExitOutput(
        predictions=predictions,
        logits=result.logits,
        exit_layers=result.exit_layers,
        layers_computed=result.layers_computed,
        num_layers=len(blocks),
    )


class EarlyExitMixin:
    """Serving with early exit, for [`AlignedForSequenceClassification`]: `early_exit_predict`, and the decision of
    when a plain `forward` call exits early. Reads the model's `backbone`, `blocks`, `classifier`, `config`,
    `exit_config`, `num_layers`, `_inputs` and `pooling_mask`."""

    @torch.no_grad()
    def early_exit_predict(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        exit_config: ExitConfig | None = None,
        **inputs,
    ) -> EarlyExitOutput:
        """Classifies a batch, letting each sample leave at the first layer where the exit rule fires.

        Blocks run one at a time; after each, the shared classifier scores the samples still running and those that
        leave are removed from the batch (and from every per-sample tensor the blocks take: masks, positions, rotary
        tables) before the next block, so no compute is spent on them. Results do not depend on how samples are
        batched.

        Args:
            exit_config ([`ExitConfig`], *optional*): the exit rule; defaults to `self.exit_config`.
            inputs: the base model's inputs (`input_ids`, `attention_mask`, `pixel_values`, ...) and any
                [`ExitConfig`] field to override for this call (`threshold=0.9`, `rule="patience"`, ...).

        Returns:
            [`EarlyExitOutput`] with `predictions`, `logits` at the exit layer, `exit_layers` and
            `layers_computed`.

        Raises:
            TypeError: naming arguments that are neither base-model inputs nor `ExitConfig` fields (with the closest
                valid name).
            ValueError: for an invalid exit setting, a call without inputs or an empty batch.

        Safe to call from several threads at once. In train mode it runs as asked (dropout active) and warns once.

        Example:

        ```python
        >>> out = model.early_exit_predict(**batch, threshold=0.9)
        >>> out.exit_layers, out.ideal_speedup
        ```
        """
        overrides = {name: inputs.pop(name) for name in list(inputs) if name in ExitConfig.__dataclass_fields__}
        model_inputs = self._inputs("early_exit_predict", input_ids=input_ids, attention_mask=attention_mask, **inputs)
        exit_config = (exit_config or self.exit_config).update(**overrides)
        exit_config.validate(self.num_layers)
        if self.training and has_active_dropout(self):
            logger.warning_once(
                "early_exit_predict runs in train mode: dropout is active, so predictions and exits change from call "
                "to call. Call `model.eval()` before serving."
            )
        check_exit_rule(exit_config, self.config.problem_type, self.config.num_labels)
        return classify_with_early_exit(
            self.backbone,
            self.blocks,
            self.classifier,
            model_inputs,
            exit_config,
            self.pooling_mask(input_ids, attention_mask),
            self.config.problem_type,
        )

    def _exits_early(self, early_exit: bool | None, every_layer: bool) -> bool:
        """Whether `forward` serves the call with early exit: as asked, else an inference call whose exit config
        lets samples leave early (see `forward`).

        Raises:
            ValueError: for `early_exit=True` with labels, hidden states, attentions or layer logits (`every_layer`).
        """
        if early_exit is None:
            return not (self.training or every_layer or self.exit_config.never_exits or torch.compiler.is_compiling())
        if early_exit and every_layer:
            raise ValueError(
                "`early_exit=True` returns each sample's logits at its exit layer only: it computes no loss, hidden "
                "states, attentions or layer logits. Leave `early_exit` unset (or pass False) with `labels`, "
                "`output_hidden_states`, `output_attentions` or `output_layer_logits`."
            )
        return early_exit


def check_exit_rule(exit_config: ExitConfig, problem_type: str | None, num_labels: int) -> None:
    """Refuses a rule that reads class probabilities for a regression or multi-label model; the default exit
    config (no sample leaves early) reads none, so it serves every problem type.

    Raises:
        ValueError: naming the rule and the model's problem type.
    """
    if problem_type is None and num_labels == 1:
        problem_type = "regression"  # what the loss infers for one output
    if exit_config.rule == "fixed" or exit_config.never_exits:
        return
    if problem_type not in (None, "single_label_classification"):
        raise ValueError(
            f"rule {exit_config.rule!r} reads class probabilities, but this model's problem_type is "
            f"{problem_type!r}; use rule='fixed' for it."
        )


class _AllSamplesLeft(Exception):
    """Stops the base model's forward once no sample is running."""


class _EarlyExitRun(BlockObserver):
    """One early-exit call's state: the running samples (in its ledger) and the inputs cut down to them.

    Exits are decided on the running samples' logits; the batch is compacted (hidden states, per-sample inputs, the
    decider's counters) only after a block where some sample left, so a block where nobody leaves costs the
    classifier, the rule and one count.
    """

    def __init__(self, blocks, classify, decider, batch_size, pooling_mask, device):
        super().__init__(blocks)
        self.classify = classify
        self.decider = decider
        self.batch_size = batch_size
        self.pooling_mask = pooling_mask
        self.ledger = ExitLedger(batch_size, device)
        self.layers_computed = 0
        # Per-sample tensors cut down to the running samples, by identity of the full tensor (kept alive with it).
        self._selected: dict[int, tuple[Any, Any]] = {}

    def _select(self, value: Any) -> Any:
        running = self.ledger.running
        if running is None or value is None or isinstance(value, (bool, int, float, str)):
            return value
        cached = self._selected.get(id(value))
        if cached is None:
            cached = self._selected[id(value)] = (value, _select_samples(value, running, self.batch_size))
        return cached[1]

    def before_block(self, layer: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self.layers_computed += self.ledger.num_running
        if self.ledger.running is None:
            return None
        hidden, *rest = args  # the hidden states come from the previous block, already cut down
        return (hidden, *(self._select(value) for value in rest)), {
            name: value if name in NON_BATCH_ARGUMENTS else self._select(value) for name, value in kwargs.items()
        }

    def after_block(self, layer: int, output: Any) -> Any:
        if not self.decider.classifies_at(layer):
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        layer_logits = self.classify(layer, hidden, self._select(self.pooling_mask))
        leaving = self.decider.leaves(layer, layer_logits)
        num_leaving = int(leaving.sum())  # the one host sync per classified block
        if num_leaving == 0:
            return None
        kept = self.ledger.record(layer, layer_logits, leaving, num_leaving)
        if self.ledger.num_running == 0:
            raise _AllSamplesLeft
        self._selected = {}
        self.decider.keep(kept)
        hidden = hidden[kept]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def run_early_exit(
    blocks: nn.ModuleList,
    run_base_model: Callable[[], Any],
    classify: Callable[[int, torch.Tensor, torch.Tensor | None], torch.Tensor],
    exit_config: ExitConfig,
    batch_size: int,
    pooling_mask: torch.Tensor | None,
    model_type: str = "",
) -> EarlyExitResult:
    """Runs the base model block by block, letting samples leave and shrinking the batch as they do.

    The blocks must carry the hooks of [`install_block_hooks`] (the model installs them when it is built); the
    call's state lives in its own observer, so concurrent calls on one model do not interfere.

    Args:
        blocks: the base model's list of blocks.
        run_base_model: calls the base model on the full batch (its own embeddings, masks and position tables are
            built once, for the full batch; hooks cut them down to the running samples before each block).
        classify: `classify(layer, hidden_states, pooling_mask)` gives the classifier's logits after 1-based `layer`
            for the running samples.
        exit_config: when samples leave.
        batch_size: the number of samples.
        pooling_mask: the `(batch, seq)` mask the classifier pools with, or `None`.
        model_type: the base model's type, for error messages.

    Returns:
        The logits and exit layer of every sample, and the number of (block, sample) pairs computed.

    Raises:
        ValueError: when, after samples left, a block fails on inputs of mismatched batch sizes (a per-sample input
            early exit did not recognise). Any other error passes through unchanged.
    """
    device = next(blocks[0].parameters()).device
    decider = ExitDecider(exit_config, len(blocks), batch_size, device)
    run = _EarlyExitRun(blocks, classify, decider, batch_size, pooling_mask, device)
    try:
        with observe_blocks(run):
            run_base_model()
    except _AllSamplesLeft:
        ledger = run.ledger
        return EarlyExitResult(
            logits=ledger.logits, exit_layers=ledger.exit_layers, layers_computed=run.layers_computed
        )
    except RuntimeError as error:
        if run.ledger.num_running == batch_size or not _is_shape_mismatch(error):
            raise
        raise ValueError(
            f"Early exit could not shrink the batch of this {model_type!r} model after samples left: a block received a "
            f"per-sample input it could not cut down ({error}). Run early exit with batch size 1, or open an issue "
            "with the model type."
        ) from error
    raise RuntimeError(
        f"{run.ledger.num_running} samples never left the model; the exit rule must end at the last layer."
    )


def _is_shape_mismatch(error: RuntimeError) -> bool:
    """Whether an error raised inside a block means tensors of different batch sizes met (and nothing else)."""
    if isinstance(error, torch.OutOfMemoryError):
        return False
    return bool(SHAPE_MISMATCH.search(str(error)))


def _select_samples(value: Any, running: torch.Tensor, batch_size: int) -> Any:
    """Keeps the running samples of every tensor whose first dimension is the batch (recursing into containers)."""
    if isinstance(value, torch.Tensor):
        return value[running] if value.dim() > 0 and value.shape[0] == batch_size else value
    if isinstance(value, (tuple, list)):
        return type(value)(_select_samples(item, running, batch_size) for item in value)
    if isinstance(value, Mapping):
        return {key: _select_samples(item, running, batch_size) for key, item in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if type(value).__name__ == "BlockMask":
        raise ValueError(
            "Early exit cannot shrink flex-attention block masks; load the model with attn_implementation='sdpa' "
            "or 'eager'."
        )
    return value
