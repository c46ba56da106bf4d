"""`AlignedTrainingArguments`: `TrainingArguments` plus the settings of aligned training and layer-wise evaluation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .configuration_aligned import LAYER_WEIGHT_SCHEMES


@dataclass
class AlignedTrainingArguments(TrainingArguments):
    r"""Configuration of [`AlignedTrainer`].

    Every [`~transformers.TrainingArguments`] field works as usual; the fields below are specific to aligned training.
    Only the settings that concern training and evaluation live here: what the model *is* (the pooling, one shared
    classifier or one classifier per layer) is part of the model's [`AlignedConfig`].

    Parameters:
        > Aligned loss

        layer_weights (`str` or `list[float]`, *optional*):
            Loss weight of every layer, overriding the model config's `layer_weights` for this training run:
            `"linear"` (λ_l = 2l / (L(L+1)), the paper's default), `"uniform"`, `"last"` (standard fine-tuning: only
            the last layer's loss) or one non-negative weight per layer (normalized to sum to 1). On the command line
            a list is written as comma-separated numbers, e.g. `--layer_weights 0,0,1,1`. The trainer writes the value
            into `model.config`, so checkpoints record what they were trained with. `None` keeps the model's own.
        aligned_layers (`list[int]`, *optional*):
            1-based layers that receive a loss, overriding the model config's `aligned_layers`; the other layers get
            weight 0. `None` keeps the model's own (by default every layer).

        > Layer-wise evaluation

        minimal_depth_tolerance (`float`, *optional*, defaults to `0.01`):
            `evaluate()` reports as `eval_minimal_depth` the first layer whose accuracy is at most this far (absolute,
            as a fraction) below the last layer's accuracy.
    """

    layer_weights: list[float] | str | None = field(
        default=None,
        metadata={
            "help": "Loss weight of every layer, overriding the model config: 'linear' (the paper's default), "
            "'uniform', 'last' (standard fine-tuning) or comma-separated per-layer weights such as '0,0,1,1'. "
            "Leave unset to keep the model config's."
        },
    )
    aligned_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "1-based layers that receive a loss, overriding the model config (the others get weight 0). "
            "Leave unset to keep the model config's."
        },
    )
    minimal_depth_tolerance: float = field(
        default=0.01,
        metadata={
            "help": "The reported minimal depth is the first layer whose eval accuracy is within this absolute "
            "tolerance of the last layer's."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.layer_weights = parse_layer_weights(self.layer_weights)
        if self.aligned_layers is not None:
            self.aligned_layers = [int(layer) for layer in self.aligned_layers]
        if not 0.0 <= self.minimal_depth_tolerance < 1.0:
            raise ValueError(
                f"`minimal_depth_tolerance={self.minimal_depth_tolerance}` must lie in [0, 1): it is an absolute "
                "accuracy difference, e.g. 0.01 for one point."
            )

    @classmethod
    def from_training_arguments(cls, args: TrainingArguments) -> AlignedTrainingArguments:
        """Upgrades plain `TrainingArguments` to `AlignedTrainingArguments` with the aligned fields at their defaults."""
        values = {item.name: getattr(args, item.name) for item in dataclasses.fields(args) if item.init}
        return cls(**values)


def parse_layer_weights(layer_weights: str | list[float] | tuple[float, ...] | None) -> str | list[float] | None:
    """Normalizes a `layer_weights` value: a scheme name stays a string, numbers become a list of floats.

    Raises:
        ValueError: for a string that is neither a scheme nor comma-separated numbers.
    """
    if layer_weights is None or isinstance(layer_weights, (list, tuple)):
        return None if layer_weights is None else [float(weight) for weight in layer_weights]
    text = layer_weights.strip()
    if text in LAYER_WEIGHT_SCHEMES:
        return text
    try:
        return [float(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(
            f"`layer_weights={layer_weights!r}` is neither a scheme {LAYER_WEIGHT_SCHEMES} nor comma-separated "
            "numbers such as '0,0,1,1'."
        ) from None
