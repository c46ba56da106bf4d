"""Configuration of an aligned model: a base model's config plus the settings of aligned training."""

from __future__ import annotations

import copy
from typing import ClassVar, Literal

from transformers import AutoConfig, PreTrainedConfig
from transformers.activations import ACT2FN

from .alignment import (
    CLASSIFICATION,
    KIND_FIELDS,
    AlignmentSettings,
    resolve_layer_weights,
)
from .compat import SubConfigSpec, attn_implementation, is_causal_lm_only_type
from .layouts import BackboneLayout, refusal_reason, table_kind

POOLING_CHOICES = ("auto", "cls", "last", "mean")
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
        if self.layout is not None:
            self.layout = BackboneLayout.from_dict(self.layout).to_dict()
        self.configure_alignment()
        if self.projection_head is not None:
            self.projection_head = resolve_projection_head(
                self.projection_head, self.base_config.get_text_config().hidden_size
            )
        if self.classifier_dropout is None:
            self.classifier_dropout = derived_classifier_dropout(self.base_config)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """transformers' `from_dict`, with every override validated: keyword arguments that are aligned settings, and
        those that are attributes of the base config (`num_hidden_layers=2`, `hidden_dropout_prob=0.0`, ...), go into
        the config before it is built and checked, so the alignment settings are validated against the final base
        config. A `classifier_dropout` that was derived from the base config is derived again from the overridden one.
        Other keywords are returned unused (or dropped) as transformers does.

        Raises:
            TypeError: for a keyword naming a read-only property (`num_layers`: set `num_hidden_layers` or use
                `truncate`).
        """
        _refuse_properties(kwargs)
        saved = cls(**copy.deepcopy(config_dict))
        fields = {key: kwargs.pop(key) for key in list(kwargs) if key in ALIGNED_CONFIG_FIELDS}
        config_dict = {**config_dict, **fields}
        base_overrides = {
            key: kwargs.pop(key) for key in list(kwargs) if not hasattr(saved, key) and hasattr(saved.base_config, key)
        }
        if base_overrides:
            config_dict["base_config"] = {**saved.base_config.to_dict(), **base_overrides}
            if "classifier_dropout" not in fields and saved.classifier_dropout == derived_classifier_dropout(
                saved.base_config
            ):
                config_dict["classifier_dropout"] = None
        return super().from_dict(config_dict, **kwargs)

    @property
    def num_layers(self) -> int:
        """The number of blocks of the base model (the L of the method)."""
        return num_hidden_layers(self.base_config)

    @property
    def hidden_size(self) -> int:
        """The base model's hidden size (read by generic code, e.g. DeepSpeed's "auto" bucket sizes in Trainer)."""
        return self.base_config.get_text_config().hidden_size

    @property
    def resolved_layer_weights(self) -> list[float]:
        """One loss weight per block, zero outside `aligned_layers`, summing to 1."""
        return resolve_layer_weights(self.layer_weights, self.num_layers, self.aligned_layers)

    @property
    def alignment(self) -> AlignmentSettings:
        """The aligned-training settings this config carries (its fields named in `KIND_FIELDS["classification"]`)."""
        return AlignmentSettings(**{name: getattr(self, name) for name in KIND_FIELDS[CLASSIFICATION]})

    def configure_alignment(self, **settings) -> AlignmentSettings:
        """Sets [`AlignmentSettings`] fields, validated against the model first (so a bad value changes nothing), and
        writes them into this config.

        Raises:
            TypeError: for a keyword that is no alignment setting.
            ValueError: for a value that does not fit the model, or a language-model setting.
        """
        alignment = self.alignment.replace(CLASSIFICATION, **settings)
        alignment.validate(self.num_layers)
        for name, value in alignment.to_dict(CLASSIFICATION).items():
            setattr(self, name, value)
        self.distillation_weight = float(self.distillation_weight)
        self.distillation_temperature = float(self.distillation_temperature)
        return alignment

    def get_text_config(self, *args, **kwargs) -> PreTrainedConfig:
        """The base model's text config (so generic code finds `hidden_size`, `vocab_size`, ...)."""
        return self.base_config.get_text_config(*args, **kwargs)


# The fields of an AlignedConfig that a `from_pretrained` keyword may override (validated with the rest).
ALIGNED_CONFIG_FIELDS = ("pooling", "use_pooler", "classifier_dropout", "projection_head", "layout") + KIND_FIELDS[
    CLASSIFICATION
]


def derived_classifier_dropout(base_config: PreTrainedConfig) -> float:
    """The classifier dropout a base config implies: its `classifier_dropout`, else its `hidden_dropout_prob`, else 0."""
    dropout = getattr(base_config, "classifier_dropout", None)
    return float(dropout if dropout is not None else getattr(base_config, "hidden_dropout_prob", 0.0))


def _refuse_properties(kwargs: dict) -> None:
    """Refuses keywords naming a read-only property of [`AlignedConfig`], which transformers would try to set.

    Raises:
        TypeError: naming the keyword and what to use instead.
    """
    for key in kwargs:
        attribute = getattr(AlignedConfig, key, None)
        if isinstance(attribute, property) and attribute.fset is None:
            hint = (
                "set the base model's `num_hidden_layers` (e.g. `num_hidden_layers=2`) or shrink a trained model "
                "with `model.truncate(k)`"
                if key == "num_layers"
                else "it is computed from the other settings"
            )
            raise TypeError(f"`{key}` is a read-only property of AlignedConfig and cannot be passed; {hint}.")


def is_decoder_only(config: PreTrainedConfig) -> bool:
    """Whether a base config belongs to a decoder-only language model (GPT-2, Llama, Qwen, Mistral, ...).

    Families in the layout table have their kind listed there; for others, families that also have a masked-LM head
    (BERT, RoBERTa, ...) count as encoders even though transformers offers a causal-LM variant of them.
    """
    if getattr(config, "is_encoder_decoder", False):
        return False
    kind = table_kind(config.model_type)
    return kind == "decoder" if kind is not None else is_causal_lm_only_type(config.model_type)
