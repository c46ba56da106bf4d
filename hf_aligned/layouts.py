"""Where each model family keeps its blocks, final norm and pooler: a table keyed by `model_type`, and the refusals.

Like peft's per-model-type target-module tables, this is data: adding a family means adding one line here. Families
not listed are searched generically (see `backbones.find_layout`), and `AlignedConfig(layout=...)` overrides both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

# What a family is, for the defaults that depend on it: "encoder" and "vision" models pool their first token,
# "decoder" (decoder-only language models) their last real token.
LAYOUT_KINDS = ("encoder", "vision", "decoder")


@dataclass(frozen=True)
class BackboneLayout:
    """Where the parts of one base model live, as dotted attribute paths from the base model.

    Attributes:
        blocks: path of the `nn.ModuleList` whose modules output each layer's hidden states, one per layer.
        final_norm: path of the norm applied after the last block, or `None` (post-norm encoders).
        pooler: path of the pooler, or `None`.
    """

    blocks: str
    final_norm: str | None = None
    pooler: str | None = None

    @classmethod
    def from_dict(cls, layout: Mapping[str, Any]) -> BackboneLayout:
        """Reads a layout given as `{"blocks": ..., "final_norm": ..., "pooler": ...}` (the last two optional).

        Raises:
            TypeError: if `layout` is not a mapping.
            ValueError: for an unknown key, a missing `blocks` path, or a path that is not a non-empty string.
        """
        if isinstance(layout, BackboneLayout):
            return layout
        if not isinstance(layout, Mapping):
            raise TypeError(
                f"`layout` must be a dict such as {{'blocks': 'encoder.layer', 'final_norm': None, 'pooler': "
                f"'pooler'}}, got {type(layout).__name__}."
            )
        names = ("blocks", "final_norm", "pooler")
        unknown = sorted(set(layout) - set(names))
        if unknown:
            raise ValueError(f"`layout` has unknown keys {unknown}; its keys are {list(names)}.")
        for name in names:
            path = layout.get(name)
            if path is None and name != "blocks":
                continue
            if not isinstance(path, str) or not path.strip("."):
                wanted = "a dotted module path" if name == "blocks" else "a dotted module path or None"
                raise ValueError(f"`layout[{name!r}]` must be {wanted} from the base model, got {path!r}.")
        return cls(**layout)

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)


# model_type -> (blocks, final norm, pooler, kind). Verified against each family's `output_hidden_states` by
# tests/test_layouts.py. BEiT's "pooler" is its mean-pooling norm (its `layernorm` is an Identity by default); XLM
# keeps attention, feed-forward and norms in parallel lists, and the layer's output is that of `layer_norm2`.
LAYOUTS: dict[str, tuple[str, str | None, str | None, str]] = {
    "bert": ("encoder.layer", None, "pooler", "encoder"),
    "roberta": ("encoder.layer", None, "pooler", "encoder"),
    "xlm-roberta": ("encoder.layer", None, "pooler", "encoder"),
    "distilbert": ("transformer.layer", None, None, "encoder"),
    "deberta-v2": ("encoder.layer", None, None, "encoder"),
    "electra": ("encoder.layer", None, None, "encoder"),
    "mpnet": ("encoder.layer", None, "pooler", "encoder"),
    "modernbert": ("layers", "final_norm", None, "encoder"),
    "xlm": ("layer_norm2", None, None, "encoder"),
    "vit": ("layers", "layernorm", "pooler", "vision"),
    "deit": ("layers", "layernorm", "pooler", "vision"),
    "beit": ("layers", "layernorm", "pooler", "vision"),
    "dinov2": ("encoder.layer", "layernorm", None, "vision"),
    "gpt2": ("h", "ln_f", None, "decoder"),
    "llama": ("layers", "norm", None, "decoder"),
    "mistral": ("layers", "norm", None, "decoder"),
    "qwen2": ("layers", "norm", None, "decoder"),
    "qwen3": ("layers", "norm", None, "decoder"),
    "gemma": ("layers", "norm", None, "decoder"),
    "gemma2": ("layers", "norm", None, "decoder"),
    "gemma3_text": ("layers", "norm", None, "decoder"),
    "phi3": ("layers", "norm", None, "decoder"),
    "olmo": ("layers", "norm", None, "decoder"),
}

# Families hf_aligned refuses, by why. Encoder-decoder models are also recognized by `config.is_encoder_decoder`.
DUAL_ENCODERS = (
    "align",
    "altclip",
    "blip",
    "chinese_clip",
    "clap",
    "clip",
    "clipseg",
    "flava",
    "groupvit",
    "metaclip_2",
    "owlv2",
    "owlvit",
    "siglip",
    "siglip2",
)
HIERARCHICAL_VISION = (
    "bit",
    "convnext",
    "convnextv2",
    "cvt",
    "dinat",
    "dinov3_convnext",
    "donut-swin",
    "focalnet",
    "glpn",
    "hgnet_v2",
    "hiera",
    "levit",
    "maskformer-swin",
    "mobilevit",
    "mobilevitv2",
    "poolformer",
    "pvt",
    "pvt_v2",
    "regnet",
    "resnet",
    "segformer",
    "swiftformer",
    "swin",
    "swinv2",
)


def table_layout(model_type: str) -> BackboneLayout | None:
    """The listed layout of a model type, or `None` for a type the table does not list."""
    entry = LAYOUTS.get(model_type)
    return None if entry is None else BackboneLayout(*entry[:3])


def table_kind(model_type: str) -> str | None:
    """The listed kind (`"encoder"`, `"vision"`, `"decoder"`) of a model type, or `None` if it is not listed."""
    entry = LAYOUTS.get(model_type)
    return None if entry is None else entry[3]


def refusal_reason(model_type: str, is_encoder_decoder: bool) -> str | None:
    """Why hf_aligned cannot wrap a model type, in words that fit it, or `None` when it can try."""
    if is_encoder_decoder:
        return (
            f"Model type {model_type!r} is an encoder-decoder model: its decoder reads the encoder's output through "
            "cross-attention, so there is no single stack of blocks whose outputs one classifier can read. Use an "
            "encoder-only model (BERT, RoBERTa, ModernBERT, ...) or a decoder-only language model (Llama, Qwen, ...)."
        )
    if model_type in DUAL_ENCODERS:
        return (
            f"Model type {model_type!r} is a dual encoder: a text tower and an image tower with separate blocks, "
            "joined only through their projections, so there is no single stack of blocks for one classifier. "
            "Wrap a single-tower model of the modality you classify (a BERT-like text encoder or a ViT-like image "
            "encoder)."
        )
    if model_type in HIERARCHICAL_VISION:
        return (
            f"Model type {model_type!r} is a hierarchical vision model: its stages change width and resolution "
            "(downsampling between stages), so one classifier cannot read every layer. Use an image encoder whose "
            "blocks all keep the hidden size (ViT, DeiT, BEiT, Dinov2)."
        )
    return None


# model_type -> the output projections of each block's attention and MLP branches, relative to the block: the linear
# layers whose outputs are added to the residual stream (`asr.add_asr` scales them, `asr.fold_asr` folds the scale into
# their weights). Verified on every family by tests/test_asr.py. `add_asr(model, branch_outputs=...)` overrides it.
BRANCH_OUTPUTS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        ("bert", "roberta", "xlm-roberta", "deberta-v2", "electra"), ("attention.output.dense", "output.dense")
    ),
    "distilbert": ("attention.out_lin", "ffn.lin2"),
    "mpnet": ("attention.attn.o", "output.dense"),
    "modernbert": ("attn.Wo", "mlp.Wo"),
    **dict.fromkeys(("vit", "deit", "beit", "dinov2"), ("attention.o_proj", "mlp.fc2")),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    **dict.fromkeys(
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo"),
        ("self_attn.o_proj", "mlp.down_proj"),
    ),
}
