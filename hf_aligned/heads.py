"""The heads that turn a block's hidden states into predictions, the same after every block.

- [`ClassificationHead`] / [`AlignedClassifier`]: the classifier of [`AlignedForSequenceClassification`] (the base
  model's own final norm and pooler, an optional projection head, a new linear layer), shared by every layer or one
  per layer;
- [`CausalLMHead`] / `CAUSAL_LM_HEADS`: how each language-model family turns its final normed hidden states into
  logits, which [`AlignedForCausalLM`] reproduces after every block.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN


def pool_hidden_states(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """Reduces `(batch, seq, dim)` hidden states to one `(batch, dim)` vector per sample.

    Args:
        hidden_states: one layer's hidden states.
        attention_mask: `(batch, seq)`, 1 on real tokens and 0 on padding; `None` means no padding.
        pooling: `"cls"` (first token), `"last"` (last non-padding token, with left or right padding) or `"mean"`
            (mean over non-padding tokens).
    """
    if pooling == "cls":
        return hidden_states[:, 0]
    if attention_mask is None:
        return hidden_states[:, -1] if pooling == "last" else hidden_states.mean(dim=1)
    # Positions and lengths are integers: in bf16 / fp16, integers above 256 / 2048 are not exact.
    mask = attention_mask.to(device=hidden_states.device, dtype=torch.long) != 0
    if pooling == "last":
        positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
        last = (mask * positions).argmax(dim=1)
        return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last]
    # Sum in at least float32, so long sequences in half precision do not lose the small terms.
    accumulate = torch.promote_types(hidden_states.dtype, torch.float32)
    summed = torch.einsum("bsd,bs->bd", hidden_states.to(accumulate), mask.to(accumulate))
    lengths = mask.sum(dim=1, keepdim=True).clamp(min=1)
    return (summed / lengths).to(hidden_states.dtype)


def build_projection_head(settings: dict, input_size: int) -> nn.Sequential:
    """The projection head MLP: `settings["num_layers"]` times linear → activation, each `settings["hidden_size"]`
    wide (`settings` as resolved by `AlignedConfig`)."""
    layers, width = [], input_size
    for _ in range(settings["num_layers"]):
        layers += [nn.Linear(width, settings["hidden_size"]), ACT2FN[settings["activation"]]]
        width = settings["hidden_size"]
    return nn.Sequential(*layers)


class ClassificationHead(nn.Module):
    """The base model's final parts plus a classification layer: final norm → pooling → pooler → projection head →
    dropout → linear.

    The norm and the pooler are the base model's own modules (moved here from the base model, so each is applied
    exactly once, after whichever block the head reads); the projection head (an MLP, optional) and the linear
    classification layer are new.
    """

    def __init__(
        self,
        hidden_size: int,
        num_labels: int,
        dropout: float,
        pooling: str,
        norm: nn.Module | None,
        pooler: nn.Module | None,
        projection_head: dict | None = None,
    ):
        super().__init__()
        self.pooling = pooling
        self.norm = norm if norm is not None else nn.Identity()
        self.pooler = pooler
        self.projection = None if projection_head is None else build_projection_head(projection_head, hidden_size)
        self.dropout = nn.Dropout(dropout)
        features = hidden_size if projection_head is None else projection_head["hidden_size"]
        self.out_proj = nn.Linear(features, num_labels)

    def represent(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Maps one layer's `(batch, seq, dim)` hidden states to its pooled `(batch, dim)` vector (after the final norm
        and pooler): what the projection head reads, or without one the classification layer."""
        if self.pooler is not None:
            # A pooler selects its token itself, from the normed sequence, exactly as in the base model.
            return self.pooler(self.norm(hidden_states))
        if self.pooling == "mean":
            return pool_hidden_states(self.norm(hidden_states), attention_mask, "mean")
        # The norm acts per token, so norming the selected token alone gives the same vector, cheaper.
        return self.norm(pool_hidden_states(hidden_states, attention_mask, self.pooling))

    def features(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The vector the classification layer reads: `represent`, then the projection head when there is one."""
        pooled = self.represent(hidden_states, attention_mask)
        return pooled if self.projection is None else self.projection(pooled)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Maps the classification layer's input vectors `(..., features)` to scores `(..., num_labels)`."""
        return self.out_proj(self.dropout(features))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.project(self.features(hidden_states, attention_mask))


class AlignedClassifier(nn.Module):
    """The classifier of an aligned model: one head shared by every layer, or one head per layer (the baseline)."""

    def __init__(self, heads: Sequence[ClassificationHead], shared: bool):
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.shared = shared

    def head(self, layer: int) -> ClassificationHead:
        """The head that classifies after 1-based block `layer`."""
        return self.heads[0] if self.shared else self.heads[layer - 1]

    def forward(
        self,
        layer_hidden_states: Sequence[torch.Tensor],
        attention_mask: torch.Tensor | None,
        layers: Sequence[int],
        frozen_layers: frozenset[int] = frozenset(),
    ) -> torch.Tensor:
        """Scores `(len(layers), batch, num_labels)` for the hidden states of the given 1-based blocks.

        Args:
            frozen_layers: blocks whose scores give the shared head's parameters no gradient (gradient still flows
                into the hidden states): the `classifier_update="last"` option.
        """
        if not frozen_layers:
            pooled = torch.stack(
                [
                    self.head(layer).features(hidden, attention_mask)
                    for layer, hidden in zip(layers, layer_hidden_states)
                ]
            )
            if self.shared:
                return self.heads[0].project(pooled)
            return torch.stack([self.head(layer).project(vectors) for layer, vectors in zip(layers, pooled)])
        if not self.shared:
            raise ValueError("`frozen_layers` needs the shared classifier; per-layer heads each train on their own.")
        head = self.heads[0]
        scores = []
        for layer, hidden in zip(layers, layer_hidden_states):
            if layer in frozen_layers:
                pooled = _InputGradientOnly.apply(hidden, lambda states: head.features(states, attention_mask))
                scores.append(
                    F.linear(head.dropout(pooled), head.out_proj.weight.detach(), _detach(head.out_proj.bias))
                )
            else:
                scores.append(head(hidden, attention_mask))
        return torch.stack(scores)


def resolve_use_pooler(config, pooler: nn.Module | None, model_type: str) -> bool:
    """Whether the classifier uses the base model's pooler: `config.use_pooler`, by default when the base model has
    one and `pooling` is `"cls"`.

    Raises:
        ValueError: for `use_pooler=True` on a base model without a pooler.
    """
    if config.use_pooler is None:
        return pooler is not None and config.pooling == "cls"
    if config.use_pooler and pooler is None:
        raise ValueError(
            f"`use_pooler=True` but model type {model_type!r} has no pooler; leave `use_pooler` unset or set it to "
            "False."
        )
    return config.use_pooler


def build_classifier(config, hidden_size: int, norm: nn.Module | None, pooler: nn.Module | None) -> AlignedClassifier:
    """The classifier an [`AlignedConfig`] describes: one head shared by every layer, or one per layer; each made of
    the base model's final norm and pooler (copied for all but the last head) and a new classification layer."""
    num_heads = 1 if config.classifier_sharing == "shared" else config.num_layers
    heads = []
    for index in range(num_heads):
        last = index == num_heads - 1
        heads.append(
            ClassificationHead(
                hidden_size=hidden_size,
                num_labels=config.num_labels,
                dropout=config.classifier_dropout,
                pooling=config.pooling,
                norm=norm if last else copy.deepcopy(norm),
                pooler=(pooler if last else copy.deepcopy(pooler)) if config.use_pooler else None,
                projection_head=config.projection_head,
            )
        )
    return AlignedClassifier(heads, shared=config.classifier_sharing == "shared")


class _InputGradientOnly(torch.autograd.Function):
    """Applies `function` (a module's forward) so that gradient reaches its input but not the module's parameters.

    The forward runs without recording a graph; the backward recomputes `function` on the saved input and takes the
    gradient with respect to the input alone, so the parameters' `.grad` never receives this use. No copy of the
    parameters is made and no module state changes, so concurrent calls are safe. `function` must be deterministic
    (no dropout): the norm, pooling, pooler and projection head of a head are.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, function) -> torch.Tensor:
        ctx.function = function
        device_type = hidden.device.type
        # The backward recomputes under the same autocast as the forward (as activation checkpointing does).
        ctx.autocast = (device_type, torch.get_autocast_dtype(device_type), torch.is_autocast_enabled(device_type))
        ctx.save_for_backward(hidden)
        return function(hidden)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        (hidden,) = ctx.saved_tensors
        device_type, dtype, enabled = ctx.autocast
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            hidden = hidden.detach().requires_grad_()
            output = ctx.function(hidden)
        (grad_hidden,) = torch.autograd.grad(output, hidden, grad_output)
        return grad_hidden, None


def _detach(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach()


@dataclass(frozen=True)
class CausalLMHead:
    """How a family's causal-LM class turns its final normed hidden states into logits: its `lm_head`, then the
    factors below, each read from the model config by name (`None`: the family has none).

    Attributes:
        divide_by: the logits are divided by this config value (Granite's `logits_scaling`).
        multiply_by: the logits are multiplied by this config value (Cohere's `logit_scale`).
        softcap: the logits are soft-capped, cap · tanh(logits / cap), by this config value where it is set (Gemma 2
            and 3's `final_logit_softcapping`).
    """

    divide_by: str | None = None
    multiply_by: str | None = None
    softcap: str | None = None

    def __call__(self, logits: torch.Tensor, config: PreTrainedConfig) -> torch.Tensor:
        if self.divide_by is not None:
            logits = logits / getattr(config, self.divide_by)
        if self.multiply_by is not None:
            logits = logits * getattr(config, self.multiply_by)
        cap = None if self.softcap is None else getattr(config, self.softcap, None)
        return torch.tanh(logits / cap) * cap if cap else logits


# The families whose causal-LM head AlignedForCausalLM reproduces, checked against each family's own loss by the
# tests. Add an entry for another family (after checking its causal-LM forward) to use it.
CAUSAL_LM_HEADS: dict[str, CausalLMHead] = {
    **dict.fromkeys(("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo"), CausalLMHead()),
    "gemma2": CausalLMHead(softcap="final_logit_softcapping"),
    "gemma3_text": CausalLMHead(softcap="final_logit_softcapping"),
    "granite": CausalLMHead(divide_by="logits_scaling"),
    "cohere": CausalLMHead(multiply_by="logit_scale"),
}


def causal_lm_head(config: PreTrainedConfig) -> CausalLMHead:
    """The [`CausalLMHead`] of a config's model type.

    Raises:
        ValueError: for a model type not in `CAUSAL_LM_HEADS`, naming how to add it.
    """
    head = CAUSAL_LM_HEADS.get(config.model_type)
    if head is None:
        raise ValueError(
            f"AlignedForCausalLM has not verified how model type {config.model_type!r} computes its logits (some "
            "families scale or soft-cap them after the LM head), so its per-layer losses could differ from the "
            f"model's own. Verified: {sorted(CAUSAL_LM_HEADS)}. If its causal-LM forward is `lm_head(norm(hidden))` "
            "followed only by config-read factors, register it first: "
            f"`hf_aligned.CAUSAL_LM_HEADS[{config.model_type!r}] = hf_aligned.CausalLMHead(...)`."
        )
    return head
