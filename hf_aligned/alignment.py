"""How a model is aligned: one description of the aligned-training settings for both model kinds.

[`AlignmentSettings`] holds the layer weights λ_l, the aligned layers, the classifier's training options and the
language model's loss options, validates them once ([`AlignmentSettings.validate`]) and reads and writes them the same
way for both models: an [`AlignedConfig`] carries a classifier's settings as its own fields, a causal LM's plain config
carries them as the dict `config.aligned_training`. Each model kind uses a subset of the fields (`KIND_FIELDS`); a
field of the other kind is refused by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

LAYER_WEIGHT_SCHEMES = ("linear", "uniform", "last")
CLASSIFIER_SHARING_CHOICES = ("shared", "per_layer")
CLASSIFIER_UPDATE_CHOICES = ("all", "last")
# The model kinds and the settings each one uses: both weigh layers; a classifier has classifier options, a language
# model its loss-computation options.
CLASSIFICATION = "classification"
CAUSAL_LM = "causal_lm"
COMMON_FIELDS = ("layer_weights", "aligned_layers")
CLASSIFIER_FIELDS = ("classifier_sharing", "classifier_update", "distillation_weight", "distillation_temperature")
LANGUAGE_MODEL_FIELDS = ("layers_per_step", "loss_chunk_size")
KIND_FIELDS = {
    CLASSIFICATION: COMMON_FIELDS + CLASSIFIER_FIELDS,
    CAUSAL_LM: COMMON_FIELDS + LANGUAGE_MODEL_FIELDS,
}
# Every accepted alignment keyword (of `from_pretrained`, `from_config`, `configure_alignment`).
ALIGNMENT_KEYWORDS = COMMON_FIELDS + CLASSIFIER_FIELDS + LANGUAGE_MODEL_FIELDS
# The key of a causal LM's plain config under which a checkpoint records how it was trained (ignored elsewhere).
ALIGNED_TRAINING_KEY = "aligned_training"


@dataclass
class AlignmentSettings:
    """The settings of aligned training, for both [`AlignedForSequenceClassification`] and [`AlignedForCausalLM`].

    Args:
        layer_weights: `"linear"` (the paper's λ_l ∝ l), `"uniform"`, `"last"` (standard training) or one
            non-negative float per block (normalized to sum 1).
        aligned_layers: 1-based blocks that receive a loss (the others get weight 0). Defaults to every block.
        classifier_sharing: classifier only: `"shared"` (one classifier for every layer, the method) or `"per_layer"`
            (the multi-exit baseline).
        classifier_update: classifier only: which losses train the shared classifier, `"all"` or `"last"`.
        distillation_weight: classifier only: self-distillation weight in [0, 1] of every earlier layer's loss.
        distillation_temperature: classifier only: the softmax temperature of self-distillation.
        layers_per_step: language model only: in training, compute the loss of only this many of the earlier aligned
            layers per step, drawn at random and weighted by (candidates / drawn), so the expected loss is the full
            aligned loss; the last layer always counts. `None` computes every aligned layer.
        loss_chunk_size: language model only: the earlier layers' losses are computed over this many token positions
            at a time, their logits recomputed in the backward pass.

    Raises:
        TypeError: for `layer_weights` or `aligned_layers` of the wrong type (when built).
    """

    layer_weights: str | list[float] = "linear"
    aligned_layers: list[int] | None = None
    classifier_sharing: str = "shared"
    classifier_update: str = "all"
    distillation_weight: float = 0.0
    distillation_temperature: float = 2.0
    layers_per_step: int | None = None
    loss_chunk_size: int = 1024

    def __post_init__(self):
        """Checks the types of the list settings (so a wrong one fails here with its name) and normalizes them."""
        weights = self.layer_weights
        if not isinstance(weights, str) and not (
            isinstance(weights, (list, tuple)) and all(_is_number(item) for item in weights)
        ):
            raise TypeError(
                f"`layer_weights={weights!r}` must be a scheme name ('linear', 'uniform', 'last') or a list of one "
                "non-negative float per block."
            )
        if not isinstance(weights, str):
            self.layer_weights = [float(weight) for weight in weights]
        layers = self.aligned_layers
        if layers is not None and not (
            isinstance(layers, (list, tuple))
            and all(isinstance(item, int) and not isinstance(item, bool) for item in layers)
        ):
            raise TypeError(
                f"`aligned_layers={layers!r}` must be a list of 1-based block numbers (e.g. [2, 4]) or None for every "
                "block."
            )
        if layers is not None:
            self.aligned_layers = sorted(set(layers))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None, kind: str) -> AlignmentSettings:
        """Reads the settings of a model `kind` recorded in a config; unknown keys are an error naming them.

        Raises:
            TypeError: if `values` is not a dict.
            ValueError: for keys that are not settings of `kind`.
        """
        if values is None:
            return cls()
        if not isinstance(values, Mapping):
            raise TypeError(f"`{ALIGNED_TRAINING_KEY}` must be a dict of alignment settings, got {values!r}.")
        unknown = sorted(set(values) - set(KIND_FIELDS[kind]))
        if unknown:
            raise ValueError(
                f"`{ALIGNED_TRAINING_KEY}` has unknown keys {unknown}; its keys are {sorted(KIND_FIELDS[kind])}."
            )
        return cls(**values)

    def to_dict(self, kind: str | None = None) -> dict[str, Any]:
        """The settings as a dict: those of `kind` (what a config of that kind records), or all of them."""
        values = dataclasses.asdict(self)
        return values if kind is None else {name: values[name] for name in KIND_FIELDS[kind]}

    def replace(self, kind: str, **changes: Any) -> AlignmentSettings:
        """A copy with `changes` applied, after checking that each is a setting of model `kind`.

        Raises:
            TypeError: for a keyword that is no alignment setting.
            ValueError: for a setting of the other model kind, naming it.
        """
        unknown = sorted(set(changes) - set(ALIGNMENT_KEYWORDS))
        if unknown:
            raise TypeError(f"configure_alignment() got unknown settings {unknown}; use {sorted(KIND_FIELDS[kind])}.")
        other = [name for name in changes if name not in KIND_FIELDS[kind]]
        if other:
            raise ValueError(foreign_settings_message(other, kind))
        return dataclasses.replace(self, **changes)

    def validate(self, num_layers: int) -> list[float]:
        """Checks every setting against a model of `num_layers` blocks and returns one weight per block, summing to 1.

        Raises:
            ValueError: naming the setting that is out of range or does not fit the others.
        """
        if self.classifier_sharing not in CLASSIFIER_SHARING_CHOICES:
            raise ValueError(
                f"`classifier_sharing={self.classifier_sharing!r}` is not supported; use one of "
                f"{CLASSIFIER_SHARING_CHOICES}."
            )
        for name in ("layers_per_step", "loss_chunk_size"):
            value = getattr(self, name)
            if not (value is None and name == "layers_per_step") and not _is_positive_int(value):
                raise ValueError(f"`{name}={value!r}` must be a positive integer.")
        weights = resolve_layer_weights(self.layer_weights, num_layers, self.aligned_layers)
        _validate_training_options(self, last_layer_weight=weights[-1])
        return weights


def foreign_settings_message(names: Sequence[str], kind: str) -> str:
    """The error for settings of the other model kind (classifier options on a language model, or the reverse)."""
    listed = ", ".join(f"`{name}`" for name in names)
    if kind == CAUSAL_LM:
        return (
            f"{listed} configure a classification head's training and do not apply to AlignedForCausalLM; leave them "
            "unset (None). A causal LM's loss is set by `layer_weights` and `aligned_layers` (and the model's "
            "`configure_alignment`)."
        )
    return f"{listed} configure a language model's loss and do not apply to AlignedForSequenceClassification."


def resolve_layer_weights(
    layer_weights: str | Sequence[float],
    num_layers: int,
    aligned_layers: Sequence[int] | None = None,
) -> list[float]:
    """Turns a layer-weight scheme into one weight per block, summing to 1.

    Args:
        layer_weights: `"linear"` (the paper's λ_l = 2l / (L(L+1)), proportional to depth), `"uniform"`,
            `"last"` (standard fine-tuning: only the deepest aligned layer) or one non-negative float per block.
        num_layers: the number of blocks L.
        aligned_layers: 1-based blocks that receive a loss; the other blocks get weight 0. Defaults to all.

    Returns:
        `num_layers` floats, zero outside `aligned_layers`, normalized to sum to 1.

    Raises:
        ValueError: for an unknown scheme, a list of the wrong length, negative or non-finite weights, or
            weights that are zero on every aligned layer.
    """
    layers = validate_aligned_layers(aligned_layers, num_layers)
    if isinstance(layer_weights, str):
        raw = _scheme_weights(layer_weights, num_layers, max(layers))
    else:
        raw = [float(weight) for weight in layer_weights]
        if len(raw) != num_layers:
            raise ValueError(
                f"`layer_weights` has {len(raw)} entries but the model has {num_layers} layers; give one "
                "non-negative weight per layer (or a scheme such as 'linear')."
            )
        if any(not weight >= 0.0 or weight == float("inf") for weight in raw):
            raise ValueError(f"`layer_weights` must be finite and non-negative, got {raw}.")
    kept = [weight if layer in layers else 0.0 for layer, weight in enumerate(raw, start=1)]
    total = sum(kept)
    if total <= 0.0:
        raise ValueError(
            f"`layer_weights` are zero on every aligned layer ({sorted(layers)}); at least one aligned layer needs "
            "a positive weight."
        )
    return [weight / total for weight in kept]


def _scheme_weights(scheme: str, num_layers: int, deepest: int) -> list[float]:
    if scheme == "linear":
        return [float(layer) for layer in range(1, num_layers + 1)]
    if scheme == "uniform":
        return [1.0] * num_layers
    if scheme == "last":
        return [1.0 if layer == deepest else 0.0 for layer in range(1, num_layers + 1)]
    raise ValueError(
        f"`layer_weights={scheme!r}` is not a known scheme; use one of {LAYER_WEIGHT_SCHEMES} "
        f"or a list of {num_layers} non-negative floats."
    )


def validate_aligned_layers(aligned_layers: Sequence[int] | None, num_layers: int) -> set[int]:
    """The set of aligned 1-based blocks (every block for `None`).

    Raises:
        ValueError: for an entry outside [1, num_layers] or an empty list.
    """
    if aligned_layers is None:
        return set(range(1, num_layers + 1))
    layers = set()
    for layer in aligned_layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= num_layers:
            raise ValueError(
                f"`aligned_layers` holds {layer!r}; entries are 1-based block indices between 1 and {num_layers}."
            )
        layers.add(layer)
    if not layers:
        raise ValueError("`aligned_layers` is empty; leave it unset to align every layer.")
    return layers


def _validate_training_options(settings: AlignmentSettings, last_layer_weight: float) -> None:
    """Checks the classifier's training options against each other, the sharing and the last layer's weight.

    Raises:
        ValueError: naming the option that is out of range or does not fit the classifier sharing or the weights.
    """
    update, weight = settings.classifier_update, settings.distillation_weight
    if update not in CLASSIFIER_UPDATE_CHOICES:
        raise ValueError(f"`classifier_update={update!r}` is not supported; use one of {CLASSIFIER_UPDATE_CHOICES}.")
    if update == "last" and settings.classifier_sharing != "shared":
        raise ValueError(
            "`classifier_update='last'` trains the one shared classifier from the last layer only; with "
            "`classifier_sharing='per_layer'` every layer has its own classifier, so use `classifier_update='all'`."
        )
    if not _is_number(weight) or not 0.0 <= weight <= 1.0:
        raise ValueError(
            f"`distillation_weight={weight!r}` must lie in [0, 1]: each earlier layer's loss is "
            "(1 - weight) * cross-entropy + weight * distillation (0 turns distillation off)."
        )
    temperature = settings.distillation_temperature
    if not _is_number(temperature) or not 0.0 < temperature < float("inf"):
        raise ValueError(f"`distillation_temperature={temperature!r}` must be a positive number.")
    if last_layer_weight == 0.0 and (update == "last" or weight > 0):
        raise ValueError(
            "`classifier_update='last'` and `distillation_weight > 0` train from the last layer's loss, but the last "
            "layer has weight 0 (`layer_weights` / `aligned_layers`); give it a weight or use "
            "`classifier_update='all'` and `distillation_weight=0`."
        )


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def model_kind(config: Any) -> str | None:
    """The kind of aligned model a config belongs to: `"classification"` for an [`AlignedConfig`], `"causal_lm"` for a
    plain config that records `aligned_training`, else `None` (not an aligned model's config)."""
    if getattr(config, "model_type", None) == "aligned":
        return CLASSIFICATION
    if getattr(config, ALIGNED_TRAINING_KEY, None) is not None:
        return CAUSAL_LM
    return None
