"""The outputs of the aligned models: what a forward call and an early-exit call return."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast, ModelOutput


@dataclass
class AlignedSequenceClassifierOutput(ModelOutput):
    """Output of [`AlignedForSequenceClassification`].

    Args:
        loss (`torch.Tensor` of shape `()`, *optional*, returned when `labels` is provided):
            The aligned loss: per-layer losses combined with the configured layer weights.
        logits (`torch.Tensor` of shape `(batch_size, num_labels)`):
            The classifier's scores after the last block (the same as `layer_logits[-1]`), or, when the call exited
            early, at each sample's exit layer.
        hidden_states (`tuple(torch.Tensor)`, *optional*):
            The base model's hidden states, when `output_hidden_states=True`.
        attentions (`tuple(torch.Tensor)`, *optional*):
            The base model's attention weights, when `output_attentions=True`.
        layer_logits (`torch.Tensor` of shape `(num_layers, batch_size, num_labels)`, *optional*, returned when
            `output_layer_logits=True`):
            The classifier's scores after every block, block 1 first.
        layer_losses (`torch.Tensor` of shape `(num_layers,)`, *optional*, returned when `labels` is provided):
            The loss of every block's scores, before weighting.
        layer_distillation_losses (`torch.Tensor` of shape `(num_layers,)`, *optional*):
            With `config.distillation_weight > 0` and labels: every block's self-distillation loss (KL divergence
            of its softened prediction from the last block's, times T²; 0 for the last block), before weighting.
        exit_layers (`torch.Tensor` of shape `(batch_size,)`, *optional*):
            When the forward exited early: the 1-based layer each sample left at (then `logits` are the scores at
            that layer).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    # hidden_states and attentions right after logits, where transformers' classifiers have them (so `to_tuple()`
    # positions mean the same); the aligned extras follow.
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    layer_logits: torch.Tensor | None = None
    layer_losses: torch.Tensor | None = None
    layer_distillation_losses: torch.Tensor | None = None
    exit_layers: torch.Tensor | None = None


@dataclass
class EarlyExitOutput(ModelOutput):
    """Output of [`AlignedForSequenceClassification.early_exit_predict`].

    Args:
        predictions (`torch.Tensor` of shape `(batch_size,)`): the predicted class of each sample (for a
            regression model, its predicted value).
        logits (`torch.Tensor` of shape `(batch_size, num_labels)`): the scores at each sample's exit layer.
        exit_layers (`torch.Tensor` of shape `(batch_size,)`): the 1-based layer at which each sample left.
        layers_computed (`int`): blocks actually run, summed over samples (a full forward computes
            `batch_size * num_layers`).
        num_layers (`int`): the model's depth L.
    """

    predictions: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    exit_layers: torch.Tensor | None = None
    layers_computed: int | None = None
    num_layers: int | None = None

    @property
    def ideal_speedup(self) -> float:
        """L divided by the mean exit layer: the speedup if blocks were all the compute."""
        return self.num_layers * len(self.exit_layers) / self.layers_computed


@dataclass
class AlignedCausalLMOutput(CausalLMOutputWithPast):
    """Output of [`AlignedForCausalLM`] called with `labels`.

    Args:
        loss (`torch.Tensor` of shape `()`): Σ_l λ_l · (next-token cross-entropy after block l).
        logits (`torch.Tensor` of shape `(batch_size, sequence_length, vocab_size)`): the last block's logits.
        layer_losses (`torch.Tensor` of shape `(num_layers,)`): every block's mean next-token cross-entropy over the
            tokens whose label is not -100; `nan` for blocks whose loss this call did not compute (weight 0, or not
            drawn with `layers_per_step` in train mode). With `output_layer_agreement=True` every block's loss is
            computed.
        layer_agreement (`torch.Tensor` of shape `(num_layers,)`, *optional*): with `output_layer_agreement=True`,
            the fraction of those tokens where block l's top-1 next token equals the last block's, which is what a
            draft exiting after block l gets accepted on.
        layer_computed (`torch.BoolTensor` of shape `(num_layers,)`): which blocks' losses this call computed (the
            others are the `nan` placeholders above), so a computed loss that is itself `nan` (a diverged run) is
            told apart from a skipped one.
        layer_sample_sums (`torch.Tensor` of shape `(batch_size, num_layers, 2)`, *optional*): with
            `output_layer_agreement=True`, each sample's summed next-token cross-entropy after every block and its
            number of tokens agreeing with the last block (the last block's entry: its number of counted tokens), from
            which evaluation forms exact token averages over any set of samples.
    """

    layer_losses: torch.Tensor | None = None
    layer_agreement: torch.Tensor | None = None
    layer_computed: torch.Tensor | None = None
    layer_sample_sums: torch.Tensor | None = None
