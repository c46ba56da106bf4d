"""Configuration of an aligned model: a base model's config plus the settings of aligned training."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

from transformers import AutoConfig, PreTrainedConfig
from transformers.activations import ACT2FN

from .compat import SubConfigSpec, attn_implementation, is_causal_lm_only_type
from .layouts import BackboneLayout, refusal_reason, table_kind

POOLING_CHOICES = ("auto", "cls", "last", "mean")
LAYER_WEIGHT_SCHEMES = ("linear", "uniform", "last")
CLASSIFIER_SHARING_CHOICES = ("shared", "per_layer")
CLASSIFIER_UPDATE_CHOICES = ("all", "last")
PROJECTION_HEAD_KEYS = ("hidden_size", "num_layers", "activation")


def num_hidden_layers(config: PreTrainedConfig) -> int:
    """Returns the number of transformer blocks of a base model's config.

    Raises:
        ValueError: if the config does not say how many blocks the model has.
    """
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_layers = getattr(text_config, "num_hidden_layers", None)
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(
            f"Model type {config.model_type!r} does not expose `num_hidden_layers` in its config, so hf_aligned "
            "cannot tell how many layers to align. Use a transformer whose blocks form one list of layers."
        )
    return num_layers


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
    layers = _validate_aligned_layers(aligned_layers, num_layers)
    if isinstance(layer_weights, str):
        if layer_weights == "linear":
            raw = [float(layer) for layer in range(1, num_layers + 1)]
        elif layer_weights == "uniform":
            raw = [1.0] * num_layers
        elif layer_weights == "last":
            raw = [1.0 if layer == max(layers) else 0.0 for layer in range(1, num_layers + 1)]
        else:
            raise ValueError(
                f"`layer_weights={layer_weights!r}` is not a known scheme; use one of {LAYER_WEIGHT_SCHEMES} "
                f"or a list of {num_layers} non-negative floats."
            )
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


def validate_training_options(
    classifier_update: str,
    distillation_weight: float,
    distillation_temperature: float,
    classifier_sharing: str,
    last_layer_weight: float | None = None,
) -> None:
    """Checks the options that change how the aligned loss trains the model (shared by config and arguments).

    Args:
        last_layer_weight: the last layer's resolved loss weight, when known: `classifier_update="last"` and
            self-distillation both need the last layer to carry a loss.

    Raises:
        ValueError: naming the option that is out of range or does not fit the classifier sharing or the weights.
    """
    if classifier_update not in CLASSIFIER_UPDATE_CHOICES:
        raise ValueError(
            f"`classifier_update={classifier_update!r}` is not supported; use one of {CLASSIFIER_UPDATE_CHOICES}."
        )
    if classifier_update == "last" and classifier_sharing != "shared":
        raise ValueError(
            "`classifier_update='last'` trains the one shared classifier from the last layer only; with "
            "`classifier_sharing='per_layer'` every layer has its own classifier, so use `classifier_update='all'`."
        )
    if not _is_number(distillation_weight) or not 0.0 <= distillation_weight <= 1.0:
        raise ValueError(
            f"`distillation_weight={distillation_weight!r}` must lie in [0, 1]: each earlier layer's loss is "
            "(1 - weight) * cross-entropy + weight * distillation (0 turns distillation off)."
        )
    if not _is_number(distillation_temperature) or not 0.0 < distillation_temperature < float("inf"):
        raise ValueError(f"`distillation_temperature={distillation_temperature!r}` must be a positive number.")
    if last_layer_weight == 0.0 and (classifier_update == "last" or distillation_weight > 0):
        raise ValueError(
            "`classifier_update='last'` and `distillation_weight > 0` train from the last layer's loss, but the last "
            "layer has weight 0 (`layer_weights` / `aligned_layers`); give it a weight or use "
            "`classifier_update='all'` and `distillation_weight=0`."
        )


def resolve_projection_head(projection_head: dict | None, input_size: int) -> dict | None:
    """Validates a projection-head setting and fills in its defaults.

    Args:
        projection_head: `None` (no head) or a dict with any of `hidden_size` (width of every layer, default
            `input_size`), `num_layers` (how many linear + activation layers, default 1) and `activation` (a name
            in transformers' `ACT2FN`, default `"relu"`).
        input_size: the width of the pooled vector the head reads (the base model's hidden size).

    Returns:
        `None`, or the dict with all three keys.

    Raises:
        TypeError: when `projection_head` is neither `None` nor a dict.
        ValueError: naming an unknown key, a size or depth that is not a positive integer, or an unknown activation.
    """
    if projection_head is None:
        return None
    if not isinstance(projection_head, dict):
        raise TypeError(
            f"`projection_head` must be None or a dict with keys {PROJECTION_HEAD_KEYS}, got "
            f"{type(projection_head).__name__}; e.g. `projection_head={{'hidden_size': 256, 'num_layers': 2}}`."
        )
    unknown = sorted(set(projection_head) - set(PROJECTION_HEAD_KEYS))
    if unknown:
        raise ValueError(f"`projection_head` has unknown keys {unknown}; its keys are {PROJECTION_HEAD_KEYS}.")
    resolved = {"hidden_size": input_size, "num_layers": 1, "activation": "relu", **projection_head}
    for key in ("hidden_size", "num_layers"):
        value = resolved[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`projection_head['{key}']` must be a positive integer, got {value!r}.")
    if resolved["activation"] not in ACT2FN:
        raise ValueError(
            f"`projection_head['activation']={resolved['activation']!r}` is not a known activation; use one of "
            f"{sorted(ACT2FN)}."
        )
    return resolved


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _validate_aligned_layers(aligned_layers: Sequence[int] | None, num_layers: int) -> set[int]:
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


class AlignedConfig(PreTrainedConfig):
    r"""Configuration of [`AlignedForSequenceClassification`]: a base model's config and the aligned-training settings.

    The base model (any `AutoModel`: BERT-like encoders, ViT-like image encoders, decoder-only LMs) keeps its own
    config in `base_config`. One classifier made of the base model's own final parts (final norm, pooler) and a new
    classification layer is applied after every block.

    Args:
        base_config (`PreTrainedConfig` or `dict`, *optional*):
            Config of the wrapped base model. Defaults to a `BertConfig`.
        pooling (`str`, *optional*, defaults to `"auto"`):
            Which token represents a sequence: `"cls"` (the first token), `"last"` (the last non-padding token,
            left or right padding), `"mean"` (mean over non-padding tokens) or `"auto"`, resolved to `"last"` for
            decoder-only language models and `"cls"` otherwise. `from_pretrained` on a sentence-transformers
            checkpoint follows its pooling config instead.
        use_pooler (`bool`, *optional*):
            Whether the base model's pooler (BERT-style dense + tanh) is part of the classifier. Defaults to using
            it when the base model has one and `pooling` is `"cls"`. The pooler reads the first token, so `True`
            with another `pooling` is an error.
        layer_weights (`str` or `list[float]`, *optional*, defaults to `"linear"`):
            How the per-layer losses are combined: `"linear"` (λ_l = 2l / (L(L+1)), the paper's default),
            `"uniform"`, `"last"` (standard fine-tuning) or one non-negative float per layer (normalized to sum 1).
        aligned_layers (`list[int]`, *optional*):
            1-based blocks that receive a loss. Defaults to every block.
        classifier_sharing (`str`, *optional*, defaults to `"shared"`):
            `"shared"`: one classifier for every layer (the method). `"per_layer"`: the standard multi-exit
            baseline with one classifier per layer (DeeBERT / Shallow-Deep-Network style), trained with the same
            weights.
        classifier_dropout (`float`, *optional*):
            Dropout before the classification layer. Defaults to the base config's `classifier_dropout`, then its
            `hidden_dropout_prob`, then 0.
        classifier_update (`str`, *optional*, defaults to `"all"`):
            Which losses train the shared classifier (final norm, pooler, classification layer): `"all"` (the paper:
            every layer's loss) or `"last"` (only the last layer's loss; the earlier layers' losses train the
            backbone to fit the classifier). Needs `classifier_sharing="shared"`.
        distillation_weight (`float`, *optional*, defaults to 0.0):
            Self-distillation: every layer but the last is trained on `(1 - w) * cross-entropy + w * KL`, where KL is
            the divergence of its softened prediction from the last layer's (detached), times T². 0 turns it off (the
            paper's loss). Single-label classification only.
        distillation_temperature (`float`, *optional*, defaults to 2.0):
            The softmax temperature T of self-distillation.
        projection_head (`dict`, *optional*):
            An MLP between the pooled vector and the classification layer, part of the classifier (shared by every
            layer, or one per layer with `classifier_sharing="per_layer"`): `num_layers` times linear → activation,
            each `hidden_size` wide. Keys (all optional): `hidden_size` (defaults to the base model's hidden size),
            `num_layers` (1) and `activation` (`"relu"`, any name of transformers' `ACT2FN`); `{}` gives the
            defaults. `None` (the default): the classification layer reads the pooled vector directly.
        layout (`dict`, *optional*):
            Where the base model keeps its parts, as dotted paths from the base model: `{"blocks": ...,
            "final_norm": ..., "pooler": ...}` (the last two may be `None`). Overrides the per-family table and the
            generic search; the model fills it in when it is built, so a checkpoint records the layout it used.
        kwargs:
            `num_labels`, `id2label`, `label2id`, `problem_type` and the other [`PreTrainedConfig`] arguments.

    Example:

    ```python
    >>> from transformers import BertConfig
    >>> from hf_aligned import AlignedConfig

    >>> config = AlignedConfig(base_config=BertConfig(num_hidden_layers=4), num_labels=3, layer_weights="uniform")
    >>> config.resolved_layer_weights
    [0.25, 0.25, 0.25, 0.25]
    ```
    """

    model_type = "aligned"
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        "base_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
    }

    base_config: dict | PreTrainedConfig | None = None
    pooling: Literal["auto", "cls", "last", "mean"] = "auto"
    use_pooler: bool | None = None
    layer_weights: str | list[float] = "linear"
    aligned_layers: list[int] | None = None
    classifier_sharing: Literal["shared", "per_layer"] = "shared"
    classifier_dropout: float | None = None
    classifier_update: Literal["all", "last"] = "all"
    distillation_weight: float = 0.0
    distillation_temperature: float = 2.0
    projection_head: dict | None = None
    layout: dict | None = None

    def __post_init__(self, **kwargs):
        if isinstance(self.base_config, PreTrainedConfig) and "attn_implementation" not in kwargs:
            # transformers sets the parent's attention implementation on every sub-config: inherit the base
            # model's own choice instead of resetting it.
            kwargs["attn_implementation"] = attn_implementation(self.base_config)
        super().__post_init__(**kwargs)
        base = self.base_config
        reason = refusal_reason(base.model_type, bool(getattr(base, "is_encoder_decoder", False)))
        if reason is not None:
            raise ValueError(reason)
        if self.pooling not in POOLING_CHOICES:
            raise ValueError(f"`pooling={self.pooling!r}` is not supported; use one of {POOLING_CHOICES}.")
        if self.pooling == "auto":
            self.pooling = "last" if is_decoder_only(self.base_config) else "cls"
        if self.use_pooler and self.pooling != "cls":
            raise ValueError(
                f"`use_pooler=True` reads the first token (a BERT-style pooler selects it itself), so it cannot "
                f"follow pooling={self.pooling!r}; use pooling='cls' with the pooler, or leave `use_pooler` unset."
            )
        if self.classifier_sharing not in CLASSIFIER_SHARING_CHOICES:
            raise ValueError(
                f"`classifier_sharing={self.classifier_sharing!r}` is not supported; use one of "
                f"{CLASSIFIER_SHARING_CHOICES}."
            )
        if self.layout is not None:
            self.layout = BackboneLayout.from_dict(self.layout).to_dict()
        if self.aligned_layers is not None:
            self.aligned_layers = sorted(_validate_aligned_layers(self.aligned_layers, self.num_layers))
        if not isinstance(self.layer_weights, str):
            self.layer_weights = [float(weight) for weight in self.layer_weights]
        weights = resolve_layer_weights(self.layer_weights, self.num_layers, self.aligned_layers)
        validate_training_options(
            self.classifier_update,
            self.distillation_weight,
            self.distillation_temperature,
            self.classifier_sharing,
            last_layer_weight=weights[-1],
        )
        self.distillation_weight = float(self.distillation_weight)
        self.distillation_temperature = float(self.distillation_temperature)
        if self.projection_head is not None:
            self.projection_head = resolve_projection_head(
                self.projection_head, self.base_config.get_text_config().hidden_size
            )
        if self.classifier_dropout is None:
            base = self.base_config
            dropout = getattr(base, "classifier_dropout", None)
            self.classifier_dropout = float(
                dropout if dropout is not None else getattr(base, "hidden_dropout_prob", 0.0)
            )

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """transformers' `from_dict`; keyword arguments that are not aligned settings but are attributes of the base
        config (`hidden_dropout_prob=0.0`, `use_cache=False`, ...) override the base config, as `AutoConfig` applies
        them to a plain checkpoint's config. Others are returned unused (or dropped) as transformers does."""
        return_unused_kwargs = kwargs.pop("return_unused_kwargs", False)
        config, unused = super().from_dict(config_dict, return_unused_kwargs=True, **kwargs)
        for key in [key for key in unused if hasattr(config.base_config, key)]:
            setattr(config.base_config, key, unused.pop(key))
        return (config, unused) if return_unused_kwargs else config

    @property
    def num_layers(self) -> int:
        """The number of blocks of the base model (the L of the method)."""
        return num_hidden_layers(self.base_config)

    @property
    def resolved_layer_weights(self) -> list[float]:
        """One loss weight per block, zero outside `aligned_layers`, summing to 1."""
        return resolve_layer_weights(self.layer_weights, self.num_layers, self.aligned_layers)

    def get_text_config(self, *args, **kwargs) -> PreTrainedConfig:
        """The base model's text config (so generic code finds `hidden_size`, `vocab_size`, ...)."""
        return self.base_config.get_text_config(*args, **kwargs)


def is_decoder_only(config: PreTrainedConfig) -> bool:
    """Whether a base config belongs to a decoder-only language model (GPT-2, Llama, Qwen, Mistral, ...).

    Families in the layout table have their kind listed there; for others, families that also have a masked-LM head
    (BERT, RoBERTa, ...) count as encoders even though transformers offers a causal-LM variant of them.
    """
    if getattr(config, "is_encoder_decoder", False):
        return False
    kind = table_kind(config.model_type)
    return kind == "decoder" if kind is not None else is_causal_lm_only_type(config.model_type)
