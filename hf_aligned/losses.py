"""The aligned losses, as pure functions of logits, labels and settings.

The classifier's per-layer losses (cross-entropy, MSE or binary cross-entropy by problem type), self-distillation,
their weighting with λ_l, and the language model's next-token losses computed chunk by chunk. The models, the
layer-wise metrics and the causal LM all call these functions, so a change to the loss goes here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
_INTEGER_DTYPES = (torch.long, torch.int, torch.int16, torch.int8, torch.uint8)


def infer_problem_type(num_labels: int, labels: torch.Tensor) -> str:
    """The problem type transformers infers from the number of labels and the labels' dtype."""
    if num_labels == 1:
        return "regression"
    if labels.dtype in _INTEGER_DTYPES:
        return "single_label_classification"
    return "multi_label_classification"


def layer_losses(layer_logits: torch.Tensor, labels: torch.Tensor, problem_type: str) -> torch.Tensor:
    """The loss of each layer's scores `(num_layers, batch, num_labels)`: one value per layer, `(num_layers,)`.

    Single-label classification ignores samples labelled -100; regression is the MSE, multi-label classification the
    binary cross-entropy, each averaged over samples and outputs.

    Raises:
        ValueError: naming the offending labels, when a class index lies outside `[0, num_labels)`.
    """
    num_layers, batch_size, num_labels = layer_logits.shape
    labels = labels.to(layer_logits.device)
    if problem_type == "single_label_classification":
        labels = labels.view(-1)
        invalid = ((labels < 0) & (labels != -100)) | (labels >= num_labels)
        if invalid.any():
            raise ValueError(
                f"`labels` holds class indices {sorted(set(labels[invalid].tolist()))} outside [0, {num_labels}) "
                f"for a model with num_labels={num_labels}; fix the labels or set `num_labels` (use -100 to "
                "ignore a sample)."
            )
        losses = F.cross_entropy(
            layer_logits.reshape(-1, num_labels), labels.repeat(num_layers), reduction="none"
        ).view(num_layers, batch_size)
        counted = (labels != -100).to(losses.dtype)
        return (losses * counted).sum(dim=1) / counted.sum().clamp(min=1.0)
    targets = labels.to(layer_logits.dtype).reshape(batch_size, -1).expand(num_layers, -1, -1)
    if problem_type == "regression":
        scores = layer_logits.reshape(num_layers, batch_size, -1)
        return F.mse_loss(scores, targets, reduction="none").flatten(1).mean(dim=1)
    return F.binary_cross_entropy_with_logits(layer_logits, targets, reduction="none").flatten(1).mean(dim=1)


def distillation_losses(
    layer_logits: torch.Tensor, labels: torch.Tensor, problem_type: str, temperature: float
) -> torch.Tensor:
    """Self-distillation loss of each layer, `(num_layers,)`: T² · KL(softmax(z_L / T) ‖ softmax(z_l / T)).

    The last layer's scores z_L are the (detached) teacher, so its own entry is 0; samples labelled -100 are left
    out, as in the cross-entropy.

    Raises:
        ValueError: when the model is not a single-label classifier.
    """
    if problem_type != "single_label_classification":
        raise ValueError(
            f"`distillation_weight` needs single-label classification, but this model's problem_type is "
            f"{problem_type!r}; set `distillation_weight=0`."
        )
    student = F.log_softmax(layer_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(layer_logits[-1].detach().float() / temperature, dim=-1).expand_as(student)
    divergence = F.kl_div(student, teacher, reduction="none", log_target=True).sum(dim=-1)
    counted = (labels.to(layer_logits.device).view(-1) != -100).to(divergence.dtype)
    losses = (divergence * counted).sum(dim=1) / counted.sum().clamp(min=1.0)
    return (losses * temperature**2).to(layer_logits.dtype)


def aligned_loss(
    layer_logits: torch.Tensor,
    labels: torch.Tensor,
    problem_type: str,
    layer_weights: Sequence[float],
    distillation_weight: float = 0.0,
    distillation_temperature: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The aligned loss of a classifier: Σ_l λ_l · loss_l, where each earlier layer's loss mixes in
    self-distillation when `distillation_weight > 0`.

    Args:
        layer_weights: the resolved λ_l, one per layer (summing to 1).

    Returns:
        The loss, the per-layer task losses `(num_layers,)` and the per-layer distillation losses (or `None`).
    """
    task_losses = layer_losses(layer_logits, labels, problem_type)
    weighted, distilled = task_losses, None
    if distillation_weight > 0:
        distilled = distillation_losses(layer_logits, labels, problem_type, distillation_temperature)
        mixed = (1.0 - distillation_weight) * task_losses + distillation_weight * distilled
        weighted = torch.cat([mixed[:-1], task_losses[-1:]])
    weights = torch.tensor(list(layer_weights), device=task_losses.device)
    return (weights.to(weighted.dtype) * weighted).sum(), task_losses, distilled


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets `(batch, seq)`: position t is scored on `labels[t + 1]`, the last position on nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def next_token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy (in float32) of logits `(batch, seq, vocab)` against shifted targets
    `(batch, seq)`; positions whose target is -100 add nothing."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")


def step_weights(weights: Sequence[float], layers_per_step: int | None, draw: bool) -> dict[int, float]:
    """This step's weight of every 1-based layer with a loss: the configured λ_l, or, when `layers_per_step` draws a
    subset of the earlier layers (`draw`: a training step), the drawn layers' λ_l times (candidates / drawn); the
    last layer always keeps its weight."""
    num_layers = len(weights)
    chosen = {layer: weight for layer, weight in enumerate(weights, start=1) if weight > 0}
    earlier = [layer for layer in chosen if layer < num_layers]
    if layers_per_step is None or layers_per_step >= len(earlier) or not draw:
        return chosen
    picked = [earlier[index] for index in torch.randperm(len(earlier))[:layers_per_step].tolist()]
    scale = len(earlier) / layers_per_step
    step = {layer: chosen[layer] * scale for layer in picked}
    if num_layers in chosen:
        step[num_layers] = chosen[num_layers]
    return step


def _chunks(
    hidden: torch.Tensor, targets: torch.Tensor, size: int
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    hidden, targets = hidden.flatten(0, 1), targets.flatten()
    for start in range(0, targets.shape[0], size):
        yield start, hidden[start : start + size], targets[start : start + size]


def _chunk_loss_sum(
    logits_of: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    return F.cross_entropy(logits_of(hidden).float(), targets, reduction="sum")


def chunked_next_token_loss(
    logits_of: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """Summed next-token cross-entropy of one block's output `(batch, seq, dim)`, `chunk_size` positions at a time;
    each chunk's logits (`logits_of(hidden)`) are recomputed in the backward pass instead of being kept."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for _, chunk, chunk_targets in _chunks(hidden, targets, chunk_size):
        total = total + checkpoint(_chunk_loss_sum, logits_of, chunk, chunk_targets, use_reentrant=False)
    return total


def chunked_next_token_statistics(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    top_last: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """Per sample `(batch, 2)`: the summed next-token cross-entropy of one block's output `(batch, seq, dim)` and the
    number of counted tokens whose top-1 prediction equals `top_last` (the last block's), chunk by chunk. Per-sample
    sums let a distributed evaluation drop exactly the samples it repeated to even out its batches."""
    per_token = hidden.new_zeros((targets.numel(), 2), dtype=torch.float32)
    top_last = top_last.flatten()
    for start, chunk, chunk_targets in _chunks(hidden, targets, chunk_size):
        logits = logits_of(chunk)
        end = start + len(chunk_targets)
        per_token[start:end, 0] = F.cross_entropy(logits.float(), chunk_targets, reduction="none")
        per_token[start:end, 1] = (logits.argmax(dim=-1) == top_last[start:end]) & (chunk_targets != -100)
    return per_token.view(*targets.shape, 2).sum(dim=1)


def layer_sample_sums(
    last_logits: torch.Tensor,
    block_outputs: Sequence[torch.Tensor],
    targets: torch.Tensor,
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int,
) -> torch.Tensor:
    """Per sample and block `(batch, num_layers, 2)`: summed next-token cross-entropy and the number of counted tokens
    whose top-1 equals the last block's (for the last block: its number of counted tokens), from which evaluation
    forms exact token averages over any set of samples.

    Args:
        last_logits: the last block's logits `(batch, seq, vocab)`.
        block_outputs: every block's output hidden states (the last one is read through `last_logits` instead).
        logits_of: the head that turns an earlier block's hidden states into logits.
    """
    top_last = last_logits.argmax(dim=-1)
    last = F.cross_entropy(last_logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    rows = [
        chunked_next_token_statistics(logits_of, hidden, targets, top_last, chunk_size)
        for hidden in block_outputs[:-1]
    ]
    rows.append(torch.stack([last.view_as(targets).sum(dim=1), (targets != -100).sum(dim=1).float()], dim=-1))
    return torch.stack(rows, dim=1)
