"""`AlignedTrainingArguments`: `TrainingArguments` plus the settings of aligned training and layer-wise evaluation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .alignment import CLASSIFIER_UPDATE_CHOICES, LAYER_WEIGHT_SCHEMES

# The new classification layer's learning-rate multiple on a pretrained backbone when neither the arguments nor a
# recipe set one (measured in benchmarks/recipes.py; see docs/training.md). A model built from a config alone trains
# every part from scratch and uses one rate.
PRETRAINED_CLASSIFIER_LR_RATIO = 100.0
# Named recipes: values for the aligned-training options a run leaves unset. "paper" is the paper's exact loss.
TRAINING_RECIPES = {
    "paper": {
        "layer_weights": "linear",
        "classifier_update": "all",
        "distillation_weight": 0.0,
        "classifier_lr_ratio": 1.0,
    },
}


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
        classifier_update (`str`, *optional*):
            Overrides the model config's `classifier_update`: `"all"` (every layer's loss trains the shared
            classifier, the paper) or `"last"` (only the last layer's loss does). `None` keeps the model's own.
        distillation_weight (`float`, *optional*):
            Overrides the model config's `distillation_weight` (self-distillation of every earlier layer towards
            the last one; 0 turns it off). `None` keeps the model's own.
        distillation_temperature (`float`, *optional*):
            Overrides the model config's `distillation_temperature`. `None` keeps the model's own.
        classifier_lr_ratio (`float`, *optional*):
            The new classification layer(s) of the classifier (`out_proj`, and the projection head when the model
            has one: both start from random weights) train at `classifier_lr_ratio * learning_rate`, in their own
            optimizer parameter groups; the pretrained backbone, final norm and pooler keep `learning_rate`. The schedule applies to both rates alike. Defaults
            to the recipe's value, else to 100 when the classification layer is new on a pretrained backbone
            (`from_pretrained` on a base checkpoint) and 1 otherwise (a model built from a config trains every part
            from scratch; a reloaded aligned checkpoint's classifier is trained already). Note the default is not the
            paper's single learning rate: `recipe="paper"` or `classifier_lr_ratio=1` gives that.
        recipe (`str`, *optional*):
            A named set of values for the options above that are left unset: `"paper"` trains the paper's loss
            (linear weights, every layer's loss updates the classifier, no distillation, one learning rate) whatever
            the model config says about those; `aligned_layers` still comes from the arguments or the config. `None`
            keeps the model config's options and the library defaults.

        > Layer-wise evaluation

        minimal_depth_tolerance (`float`, *optional*, defaults to `0.01`):
            `evaluate()` reports as `eval_minimal_depth` the first layer whose accuracy is at most this far (absolute,
            as a fraction) below the last layer's accuracy; for an [`AlignedForCausalLM`], the first layer whose
            perplexity is at most (1 + tolerance) times the last layer's.

        > Saving

        fold_asr_on_save (`bool`, *optional*, defaults to `False`):
            For a model trained with ASR scales ([`add_asr`]): every checkpoint the trainer saves holds the folded
            weights ([`asr_folded_state_dict`]), the plain architecture that loads with plain transformers. The live
            model keeps its ASR scales and trains on. When the trainer loads such a checkpoint back into the live
            model (`load_best_model_at_end=True`, `train(resume_from_checkpoint=...)`), it resets every ASR scale to
            the identity ([`reset_asr`]: a new ASR multiplies by 1), so the model computes exactly the checkpoint's
            function and trains on from there with fresh scales.
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
    classifier_update: str | None = field(
        default=None,
        metadata={
            "help": "Which losses train the shared classifier: 'all' (every layer's, the paper) or 'last' (the last "
            "layer's only). Leave unset to keep the model config's.",
            "choices": list(CLASSIFIER_UPDATE_CHOICES),
        },
    )
    distillation_weight: float | None = field(
        default=None,
        metadata={
            "help": "Weight w of self-distillation: earlier layers train on (1 - w) * CE + w * T^2 * KL to the "
            "last layer's softened prediction (0: off). Leave unset to keep the model config's."
        },
    )
    distillation_temperature: float | None = field(
        default=None,
        metadata={"help": "Softmax temperature T of self-distillation. Leave unset to keep the model config's."},
    )
    classifier_lr_ratio: float | None = field(
        default=None,
        metadata={
            "help": "The new classification layer (and projection head) trains at this multiple of learning_rate "
            "(its own parameter group); the pretrained parts keep learning_rate. Defaults to the recipe's, else 100 for a pretrained "
            "backbone and 1 for a model built from a config."
        },
    )
    recipe: str | None = field(
        default=None,
        metadata={
            "help": "Fill the unset aligned-training options from a named recipe: 'paper' is the paper's exact loss.",
            "choices": list(TRAINING_RECIPES),
        },
    )
    minimal_depth_tolerance: float = field(
        default=0.01,
        metadata={
            "help": "The reported minimal depth is the first layer whose eval accuracy is within this absolute "
            "tolerance of the last layer's (for AlignedForCausalLM: whose perplexity is at most (1 + tolerance) "
            "times the last layer's)."
        },
    )

    fold_asr_on_save: bool = field(
        default=False,
        metadata={
            "help": "Save checkpoints of a model trained with ASR scales (add_asr) with the scales folded into the "
            "projections: plain checkpoints. The live model keeps training with its scales; loading such a "
            "checkpoint back (load_best_model_at_end, resume_from_checkpoint) resets the scales to the identity."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.layer_weights = parse_layer_weights(self.layer_weights)
        if self.aligned_layers is not None:
            self.aligned_layers = [int(layer) for layer in self.aligned_layers]
        if self.recipe is not None:
            if self.recipe not in TRAINING_RECIPES:
                raise ValueError(
                    f"`recipe={self.recipe!r}` is not a known recipe; use one of {list(TRAINING_RECIPES)}."
                )
            for name, value in TRAINING_RECIPES[self.recipe].items():
                if getattr(self, name) is None:
                    setattr(self, name, value)
        if self.classifier_lr_ratio is not None and not self.classifier_lr_ratio > 0.0:
            raise ValueError(
                f"`classifier_lr_ratio={self.classifier_lr_ratio}` must be positive (1.0: one learning rate)."
            )
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
