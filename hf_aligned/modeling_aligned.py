"""`AlignedForSequenceClassification`: one classifier, made of the base model's own final parts, after every block."""

from __future__ import annotations

import copy
import difflib
import inspect
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import ModelOutput
from transformers.utils import logging

from .backbones import detach_module, find_layout, sentence_transformers_pooling
from .block_hooks import BlockOutputs, install_block_hooks, observe_blocks
from .compat import backbone_keyword_names, mark_initialized
from .configuration_aligned import AlignedConfig, is_decoder_only
from .exits import ExitConfig, run_early_exit

logger = logging.get_logger(__name__)

# Keyword arguments of `from_pretrained` that locate files (shared by the config, the weights and side files).
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "trust_remote_code")
# Keyword arguments that configure the aligned model rather than the base model it wraps.
ALIGNED_KWARGS = (
    "pooling",
    "classifier_update",
    "distillation_weight",
    "distillation_temperature",
    "projection_head",
    "use_pooler",
    "layer_weights",
    "aligned_layers",
    "classifier_sharing",
    "classifier_dropout",
    "layout",
    "num_labels",
    "id2label",
    "label2id",
    "problem_type",
)
# Where `pooled_layer_states` reads a layer's vector: before the classifier, or where its classification layer reads.
REPRESENTATION_STAGES = ("pre", "post")


@dataclass
class AlignedSequenceClassifierOutput(ModelOutput):
    """Output of [`AlignedForSequenceClassification`].

    Args:
        loss (`torch.Tensor` of shape `()`, *optional*, returned when `labels` is provided):
            The aligned loss: per-layer losses combined with the configured layer weights.
        logits (`torch.Tensor` of shape `(batch_size, num_labels)`):
            The classifier's scores after the last block (the same as `layer_logits[-1]`).
        layer_logits (`torch.Tensor` of shape `(num_layers, batch_size, num_labels)`):
            The classifier's scores after every block, block 1 first.
        layer_losses (`torch.Tensor` of shape `(num_layers,)`, *optional*, returned when `labels` is provided):
            The loss of every block's scores, before weighting.
        layer_distillation_losses (`torch.Tensor` of shape `(num_layers,)`, *optional*):
            With `config.distillation_weight > 0` and labels: every block's self-distillation loss (KL divergence
            of its softened prediction from the last block's, times T²; 0 for the last block), before weighting.
        hidden_states (`tuple(torch.Tensor)`, *optional*):
            The base model's hidden states, when `output_hidden_states=True`.
        attentions (`tuple(torch.Tensor)`, *optional*):
            The base model's attention weights, when `output_attentions=True`.
        exit_layers (`torch.Tensor` of shape `(batch_size,)`, *optional*):
            When the forward exited early: the 1-based layer each sample left at (then `logits` are the scores at
            that layer and `layer_logits` is `None`).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    layer_logits: torch.Tensor | None = None
    layer_losses: torch.Tensor | None = None
    layer_distillation_losses: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
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


class AlignedPreTrainedModel(PreTrainedModel):
    config_class = AlignedConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # The aligned loss is a mean over the batch: Trainer must scale it for gradient accumulation itself.
    accepts_loss_kwargs = False
    # Uploads a model with hf_aligned's card. `hf_aligned.hub` registers it when the package is imported (through
    # `register_hub_pusher`), so the model never imports the Hub code.
    hub_pusher: ClassVar[Callable[..., Any] | None] = None

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
        processing_class=None,
        card_data=None,
        plots=None,
    ):
        """Uploads the model, its exit rule, processor, plots and hf_aligned model card to the Hub in one commit.

        Takes the arguments of transformers' `push_to_hub`, whose generic card would replace ours, plus:

        Args:
            processing_class: a tokenizer, image processor or processor to upload alongside the model.
            card_data ([`AlignedModelCardData`], *optional*): per-layer results, exit curve, dataset, license...
            plots (`list[str]`, *optional*): image files uploaded to `plots/` and shown on the card.

        Returns:
            `huggingface_hub.CommitInfo` of the commit. A failed push raises [`HubPushError`].
        """
        if AlignedPreTrainedModel.hub_pusher is None:
            raise RuntimeError(
                "No Hub uploader is registered: import `hf_aligned` (the package), not the module alone."
            )
        return AlignedPreTrainedModel.hub_pusher(
            self,
            repo_id,
            processing_class=processing_class,
            card_data=card_data,
            plots=plots,
            tags=tags,
            max_shard_size=max_shard_size,
            private=private,
            token=token,
            revision=revision,
            commit_message=commit_message,
            commit_description=commit_description,
            create_pr=create_pr,
        )


class AlignedForSequenceClassification(AlignedPreTrainedModel):
    """A base model with one classifier applied after every block, trained with the aligned loss.

    The classifier is the base model's own final norm and pooler (where the family has them) followed by a new
    classification layer. Applied after block l it gives `layer_logits[l - 1]`; the training loss combines every
    block's loss with `config.layer_weights`, so the same classifier works after any block.

    Args:
        config ([`AlignedConfig`]): the aligned settings and the base model's config.
        base_model ([`PreTrainedModel`], *optional*): an already built (usually pretrained) base model to wrap; by
            default one is built from `config.base_config`. The model takes ownership of it (as peft's
            `get_peft_model` does): it becomes `model.backbone`, and its final norm and pooler are moved into the
            shared classifier, leaving an identity / `None` in their place. Pass `copy.deepcopy(base_model)` to keep
            the original intact.

    Example:

    ```python
    >>> import torch
    >>> from transformers import BertConfig
    >>> from hf_aligned import AlignedConfig, AlignedForSequenceClassification

    >>> base = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37)
    >>> model = AlignedForSequenceClassification(AlignedConfig(base_config=base, num_labels=3))
    >>> out = model(input_ids=torch.tensor([[2, 5, 7]]), labels=torch.tensor([1]))
    >>> out.layer_logits.shape
    torch.Size([4, 1, 3])
    ```
    """

    def __init__(self, config: AlignedConfig, base_model: PreTrainedModel | None = None):
        super().__init__(config)
        backbone = base_model if base_model is not None else AutoModel.from_config(config.base_config)
        layout = find_layout(backbone, config.layout)
        norm = detach_module(backbone, layout.final_norm, nn.Identity()) if layout.final_norm else None
        pooler = detach_module(backbone, layout.pooler, None) if layout.pooler else None
        use_pooler = config.use_pooler
        if use_pooler is None:
            use_pooler = pooler is not None and config.pooling == "cls"
        elif use_pooler and pooler is None:
            raise ValueError(
                f"`use_pooler=True` but model type {backbone.config.model_type!r} has no pooler; leave `use_pooler` "
                "unset or set it to False."
            )
        config.use_pooler = use_pooler
        config.layout = layout.to_dict()
        config.base_config = backbone.config
        self.backbone = backbone
        self.blocks_path = layout.blocks
        install_block_hooks(self.blocks)
        base_parameters = inspect.signature(backbone.forward).parameters
        self._backbone_accepts_use_cache = "use_cache" in base_parameters
        self._base_input_names = (
            frozenset(
                name
                for name, parameter in base_parameters.items()
                if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
            )
            | backbone_keyword_names()
        )
        self._positions_from_mask = is_decoder_only(backbone.config) and "position_ids" in base_parameters
        num_heads = 1 if config.classifier_sharing == "shared" else config.num_layers
        hidden_size = backbone.config.get_text_config().hidden_size
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
                    pooler=(pooler if last else copy.deepcopy(pooler)) if use_pooler else None,
                    projection_head=config.projection_head,
                )
            )
        self.classifier = AlignedClassifier(heads, shared=config.classifier_sharing == "shared")
        self.exit_config = ExitConfig()
        # Whether a pretrained backbone got a new, untrained classification layer (and projection head) here (the
        # trainer gives such layers their own learning rate by default); a reloaded aligned checkpoint's classifier is
        # trained already.
        self.has_new_classifier = base_model is not None
        if base_model is not None:
            # The wrapped model is already trained: only the new classification layers may be initialized.
            for head in self.classifier.heads:
                mark_initialized(head.norm)
                if head.pooler is not None:
                    mark_initialized(head.pooler)
            mark_initialized(backbone)
        self.post_init()
        # accelerate's transformer-based FSDP wrap reads `_no_split_modules`: the blocks the classifier reads, and not
        # the embeddings some backbones list (FSDP2 then shards the embedding module twice and fails).
        self._no_split_modules = {type(block).__name__ for block in self.blocks}

    @property
    def num_layers(self) -> int:
        """The number of blocks, L."""
        return self.config.num_layers

    @property
    def blocks(self) -> nn.ModuleList:
        """The base model's list of transformer blocks."""
        return self.backbone.get_submodule(self.blocks_path)

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_input_embeddings(value)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args,
        config: PreTrainedConfig | None = None,
        **kwargs,
    ) -> AlignedForSequenceClassification:
        """Loads an aligned checkpoint, or wraps a plain base checkpoint (BERT, ViT, GPT-2, Llama, ...).

        From a plain base checkpoint the base model keeps all its pretrained weights (its final norm and, when
        `pooling` is `"cls"` and the checkpoint has trained pooler weights, its pooler become part of the shared
        classifier); only the classification layer is new. Keyword arguments named like [`AlignedConfig`] fields
        (`num_labels`, `layer_weights`, `pooling`, ...) configure the aligned model, the others go to the base
        model's `from_pretrained` (`dtype`, `attn_implementation`, `revision`, ...); attributes of the base config
        among them (`hidden_dropout_prob=0.0`, `use_cache=False`) override it, as `AutoModel*` applies them, and
        unknown keywords are an error. With `pooling="auto"` a sentence-transformers checkpoint's own pooling config
        decides the pooling. `output_loading_info=True` returns `(model, loading_info)` as transformers does (the
        saved `exit_config.json` is read either way).
        """
        hub_kwargs = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
        found = (
            config if config is not None else AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        )
        if not isinstance(found, AlignedConfig):
            # Without a `config` argument the base model loads its config itself, applying the config overrides in
            # `kwargs` (`hidden_dropout_prob=0.0`, ...) as `AutoModel` does.
            return cls._from_base_pretrained(pretrained_model_name_or_path, base_config=config, **kwargs)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True gives (model, info)
        exit_config = ExitConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        if exit_config is not None:
            try:
                exit_config.validate(model.num_layers)
            except ValueError as error:
                raise ValueError(f"exit_config.json of {pretrained_model_name_or_path}: {error}") from error
            model.exit_config = exit_config
        return loaded

    def save_pretrained(self, save_directory: str | os.PathLike, *args, is_main_process: bool = True, **kwargs):
        """Saves the model like transformers does, plus its [`ExitConfig`] as `exit_config.json`."""
        super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            self.exit_config.save_pretrained(save_directory)

    @classmethod
    def _from_base_pretrained(
        cls, path: str | os.PathLike, base_config: PreTrainedConfig | None, **kwargs
    ) -> AlignedForSequenceClassification:
        aligned_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in ALIGNED_KWARGS}
        hub_kwargs = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
        output_loading_info = kwargs.pop("output_loading_info", False)
        base_model, loading_info = AutoModel.from_pretrained(
            path, config=base_config, output_loading_info=True, **kwargs
        )
        if aligned_kwargs.get("pooling", "auto") == "auto":
            aligned_kwargs["pooling"] = sentence_transformers_pooling(path, hub_kwargs) or "auto"
        if aligned_kwargs.get("use_pooler") is None and any(
            key.startswith("pooler.") for key in loading_info["missing_keys"]
        ):
            # The checkpoint has no trained pooler: a randomly initialized one would only get in the way.
            aligned_kwargs["use_pooler"] = False
        config = AlignedConfig(base_config=base_model.config, **aligned_kwargs)
        config._name_or_path = str(path)
        model = cls(config, base_model=base_model)
        # The new classifier follows the base model's dtype and the device its last block was loaded on.
        model.classifier.to(device=next(model.blocks[-1].parameters()).device, dtype=base_model.dtype)
        model.eval()
        if not output_loading_info:
            return model
        return model, _wrapped_loading_info(model, loading_info)

    def _inputs(self, caller: str = "forward", **inputs) -> dict[str, torch.Tensor]:
        """The base model's inputs: the non-`None` ones, `use_cache=False` where the base model would build a cache,
        and, for decoder-only models given a padding mask, positions that count real tokens only (as `generate`
        does), so a left-padded sequence is encoded exactly like the same sequence alone.

        Raises:
            TypeError: naming the arguments the base model does not take (`caller` names the method in the message).
            ValueError: when no input (`input_ids`, `inputs_embeds`, `pixel_values`) is given, or the batch is empty.
        """
        model_inputs = {name: value for name, value in inputs.items() if value is not None}
        self._check_inputs(model_inputs, caller)
        if self._backbone_accepts_use_cache:
            model_inputs["use_cache"] = False
        attention_mask = model_inputs.get("attention_mask")
        if self._positions_from_mask and attention_mask is not None and "position_ids" not in model_inputs:
            model_inputs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return model_inputs

    def _check_inputs(self, model_inputs: dict, caller: str) -> None:
        unknown = sorted(set(model_inputs) - self._base_input_names)
        if unknown:
            known = sorted(self._base_input_names)
            if caller == "early_exit_predict":
                known += sorted(ExitConfig.__dataclass_fields__)
            hints = {name: difflib.get_close_matches(name, known, n=1) for name in unknown}
            hint = "; ".join(
                f"did you mean {match[0]!r} instead of {name!r}?" for name, match in hints.items() if match
            )
            raise TypeError(
                f"{caller}() got unexpected keyword arguments {unknown}: the "
                f"{self.backbone.config.model_type!r} base model does not take them"
                + (" and they are not ExitConfig fields" if caller == "early_exit_predict" else "")
                + (f" ({hint})." if hint else ".")
            )
        main_inputs = [name for name in ("input_ids", "inputs_embeds", "pixel_values") if name in model_inputs]
        if not main_inputs:
            raise ValueError(
                f"{caller}() got no inputs: pass `{self.backbone.main_input_name}` (or `inputs_embeds`), e.g. the "
                "output of the model's tokenizer or image processor."
            )
        batch = model_inputs[main_inputs[0]]
        if not isinstance(batch, torch.Tensor):
            raise TypeError(
                f"{caller}() got `{main_inputs[0]}` as a {type(batch).__name__}; pass a tensor, e.g. "
                "`tokenizer(texts, padding=True, return_tensors='pt')` or `torch.tensor(ids)`."
            )
        if batch.dim() == 0 or batch.shape[0] == 0:
            raise ValueError(
                f"{caller}() got an empty batch (`{main_inputs[0]}` of shape {tuple(batch.shape)}); pass at least "
                "one sample."
            )

    def pooling_mask(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The mask pooling reads: the attention mask, or for `"last"` pooling without one, non-pad tokens."""
        if attention_mask is not None or self.config.pooling != "last" or input_ids is None:
            return attention_mask
        pad_token_id = self.config.base_config.get_text_config().pad_token_id
        if pad_token_id is None:
            return None
        return (input_ids != pad_token_id).long()

    @contextmanager
    def capture_block_outputs(self, include_embeddings: bool = False) -> Iterator[list[torch.Tensor]]:
        """Collects the hidden states that leave each block (and, optionally, that enter the first) during a forward.

        Reading block outputs through hooks, rather than `output_hidden_states`, gives every layer's output before
        the final norm in every family (some families return the last entry already normed, others not). The hooks
        are installed once; this call's collector is active in this thread's context only.
        """
        with observe_blocks(BlockOutputs(self.blocks, include_embeddings)) as collector:
            yield collector.outputs

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        early_exit: bool | None = None,
        **kwargs,
    ) -> AlignedSequenceClassifierOutput:
        r"""Runs the base model once and the classifier after every block.

        Args:
            labels (`torch.Tensor` of shape `(batch_size,)`, or `(batch_size, num_labels)` for multi-label and
                multi-output regression, *optional*):
                Targets. Class indices in `[0, num_labels)` for single-label classification; floats for
                regression (`num_labels == 1` or `problem_type="regression"`) and multi-label classification.
            early_exit (`bool`, *optional*):
                `False`: the full forward, with every layer's `layer_logits`. `True`: serve the call with
                [`early_exit_predict`] under `self.exit_config` (per-sample `logits` and `exit_layers`, no
                `layer_logits`). By default a serving call — eval mode, gradients off, no labels, no hidden states or
                attentions asked for, not being compiled or exported; how pipelines call a model — is served with
                early exit (with the default `ExitConfig` every sample leaves at the last layer), and every other
                call runs the full forward. Analyses that need `layer_logits` under `torch.no_grad()` pass `False`.
            Other arguments are the base model's inputs (`input_ids`, `attention_mask`, `pixel_values`, ...).

        Returns:
            [`AlignedSequenceClassifierOutput`] with `layer_logits` for every block and, given labels, the aligned
            `loss` and the per-layer `layer_losses`; when served with early exit, only batch-first per-sample
            outputs (what pipelines split into samples): `logits` at each sample's exit layer and `exit_layers`.

        Raises:
            TypeError: naming keyword arguments the base model does not take.
            ValueError: for a call without inputs, an empty batch, or `early_exit=True` with labels, hidden states
                or attentions.
        """
        return_dict = kwargs.pop("return_dict", None)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        base_inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "position_ids": position_ids,
            "inputs_embeds": inputs_embeds,
            "pixel_values": pixel_values,
            **kwargs,
        }
        output = self._forward(base_inputs, labels, output_hidden_states, output_attentions, early_exit)
        return output if return_dict else output.to_tuple()

    def _forward(
        self,
        base_inputs: dict[str, Any],
        labels: torch.Tensor | None,
        output_hidden_states: bool | None,
        output_attentions: bool | None,
        early_exit: bool | None,
    ) -> AlignedSequenceClassifierOutput:
        """`forward` with its output as a [`AlignedSequenceClassifierOutput`]."""
        input_ids, attention_mask = base_inputs["input_ids"], base_inputs["attention_mask"]
        exit_fields = sorted(set(base_inputs) & set(ExitConfig.__dataclass_fields__))
        if exit_fields:
            raise TypeError(
                f"forward() does not take the ExitConfig fields {exit_fields}: pass them to `early_exit_predict`, or "
                "set `model.exit_config`."
            )
        if self._serves_with_early_exit(
            early_exit, bool(labels is not None or output_hidden_states or output_attentions)
        ):
            result = self.early_exit_predict(**base_inputs)
            return AlignedSequenceClassifierOutput(logits=result.logits, exit_layers=result.exit_layers)
        model_inputs = self._inputs(
            **base_inputs, output_hidden_states=output_hidden_states, output_attentions=output_attentions
        )
        base_outputs, layer_logits = self._run_all_layers(model_inputs, self.pooling_mask(input_ids, attention_mask))
        loss = layer_losses = distillation_losses = None
        if labels is not None:
            loss, layer_losses, distillation_losses = self.aligned_loss(layer_logits, labels)
        return AlignedSequenceClassifierOutput(
            loss=loss,
            logits=layer_logits[-1],
            layer_logits=layer_logits,
            layer_losses=layer_losses,
            layer_distillation_losses=distillation_losses,
            hidden_states=getattr(base_outputs, "hidden_states", None),
            attentions=getattr(base_outputs, "attentions", None),
        )

    def _run_all_layers(self, model_inputs: dict, pooling_mask: torch.Tensor | None) -> tuple[Any, torch.Tensor]:
        """Runs the base model once and the classifier after every block: its outputs and the layer logits."""
        with self.capture_block_outputs() as block_outputs:
            base_outputs = self.backbone(**model_inputs)
        layers = range(1, self.num_layers + 1)
        frozen_layers = frozenset()
        if self.config.classifier_update == "last" and torch.is_grad_enabled():
            frozen_layers = frozenset(layers[:-1])
        return base_outputs, self.classifier(block_outputs, pooling_mask, layers, frozen_layers=frozen_layers)

    def _serves_with_early_exit(self, early_exit: bool | None, needs_full_forward: bool) -> bool:
        """Whether `forward` serves the call with early exit: as asked, else for a serving call (see `forward`).

        Raises:
            ValueError: for `early_exit=True` with labels, hidden states or attentions (`needs_full_forward`).
        """
        if early_exit is None:
            return not (
                self.training or needs_full_forward or torch.is_grad_enabled() or torch.compiler.is_compiling()
            )
        if early_exit and needs_full_forward:
            raise ValueError(
                "`early_exit=True` returns each sample's logits at its exit layer only: it computes no loss, hidden "
                "states or attentions. Leave `early_exit` unset (or pass False) with `labels`, "
                "`output_hidden_states` or `output_attentions`."
            )
        return early_exit

    def aligned_loss(
        self, layer_logits: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The aligned loss: Σ_l λ_l · loss_l, where each earlier layer's loss mixes in self-distillation when
        `config.distillation_weight > 0`.

        Returns:
            The loss, the per-layer task losses `(num_layers,)` and the per-layer distillation losses (or `None`).
        """
        layer_losses = self.layer_losses(layer_logits, labels)
        weighted, distillation_losses = layer_losses, None
        if self.config.distillation_weight > 0:
            distillation_losses = self.layer_distillation_losses(layer_logits, labels)
            alpha = self.config.distillation_weight
            mixed = (1.0 - alpha) * layer_losses + alpha * distillation_losses
            weighted = torch.cat([mixed[:-1], layer_losses[-1:]])
        weights = torch.tensor(self.config.resolved_layer_weights, device=layer_losses.device)
        return (weights.to(weighted.dtype) * weighted).sum(), layer_losses, distillation_losses

    def layer_losses(self, layer_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of each layer's scores, `(num_layers,)`, for the configured (or inferred) problem type.

        Raises:
            ValueError: naming the offending labels, when a class index lies outside `[0, num_labels)`.
        """
        num_layers, batch_size, num_labels = layer_logits.shape
        labels = labels.to(layer_logits.device)
        if self.config.problem_type is None:
            if num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        if self.config.problem_type == "single_label_classification":
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
        if self.config.problem_type == "regression":
            scores = layer_logits.reshape(num_layers, batch_size, -1)
            return F.mse_loss(scores, targets, reduction="none").flatten(1).mean(dim=1)
        return F.binary_cross_entropy_with_logits(layer_logits, targets, reduction="none").flatten(1).mean(dim=1)

    def layer_distillation_losses(self, layer_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Self-distillation loss of each layer, `(num_layers,)`: T² · KL(softmax(z_L / T) ‖ softmax(z_l / T)).

        The last layer's scores z_L are the (detached) teacher, so its own entry is 0; samples labelled -100 are left
        out, as in the cross-entropy.

        Raises:
            ValueError: when the model is not a single-label classifier.
        """
        if self.config.problem_type != "single_label_classification":
            raise ValueError(
                f"`distillation_weight` needs single-label classification, but this model's problem_type is "
                f"{self.config.problem_type!r}; set `distillation_weight=0`."
            )
        temperature = self.config.distillation_temperature
        student = F.log_softmax(layer_logits.float() / temperature, dim=-1)
        teacher = F.log_softmax(layer_logits[-1].detach().float() / temperature, dim=-1).expand_as(student)
        divergence = F.kl_div(student, teacher, reduction="none", log_target=True).sum(dim=-1)
        counted = (labels.to(layer_logits.device).view(-1) != -100).to(divergence.dtype)
        losses = (divergence * counted).sum(dim=1) / counted.sum().clamp(min=1.0)
        return (losses * temperature**2).to(layer_logits.dtype)

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
        if self.training:
            logger.warning_once(
                "early_exit_predict runs in train mode: dropout is active, so predictions and exits change from call "
                "to call. Call `model.eval()` before serving."
            )
        self._check_exit_rule(exit_config)
        batch_source = next(
            model_inputs[name] for name in ("input_ids", "inputs_embeds", "pixel_values") if name in model_inputs
        )
        result = run_early_exit(
            blocks=self.blocks,
            run_base_model=lambda: self.backbone(**model_inputs),
            classify=lambda layer, hidden, mask: self.classifier.head(layer)(hidden, mask),
            exit_config=exit_config,
            batch_size=batch_source.shape[0],
            pooling_mask=self.pooling_mask(input_ids, attention_mask),
            model_type=self.backbone.config.model_type,
        )
        single_output = result.logits.shape[-1] == 1 or self.config.problem_type == "regression"
        predictions = result.logits.squeeze(-1) if single_output else result.logits.argmax(dim=-1)
        return EarlyExitOutput(
            predictions=predictions,
            logits=result.logits,
            exit_layers=result.exit_layers,
            layers_computed=result.layers_computed,
            num_layers=self.num_layers,
        )

    def _check_exit_rule(self, exit_config: ExitConfig) -> None:
        """Refuses a rule that reads class probabilities for a regression or multi-label model; the default exit
        config (no sample leaves early) reads none, so it serves every problem type.

        Raises:
            ValueError: naming the rule and the model's problem type.
        """
        problem_type = self.config.problem_type
        if problem_type is None and self.config.num_labels == 1:
            problem_type = "regression"  # what the loss infers for one output
        if exit_config.rule == "fixed" or exit_config.never_exits:
            return
        if problem_type not in (None, "single_label_classification"):
            raise ValueError(
                f"rule {exit_config.rule!r} reads class probabilities, but this model's problem_type is "
                f"{problem_type!r}; use rule='fixed' for it."
            )

    def truncate(self, num_layers: int) -> AlignedForSequenceClassification:
        """A standalone copy with only the first `num_layers` blocks and the same classifier.

        The copy's logits are this model's `layer_logits[num_layers - 1]` (to float rounding); it saves and loads as
        a normal checkpoint (its config says `num_layers` blocks), with a default `ExitConfig`: the "minimal depth"
        deployment, with no early-exit machinery at run time.

        The training settings are cut to the kept blocks (`layer_weights`, `aligned_layers`) and checked as
        `from_pretrained` checks them, so the copy always reloads.

        Raises:
            ValueError: if `num_layers` is not between 1 and the model's depth, if no kept block is an aligned layer
                (the classifier was never trained after them), or if the cut settings do not hold (e.g.
                `classifier_update="last"` with a zero weight on the new last layer).
        """
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= self.num_layers:
            raise ValueError(f"`num_layers={num_layers!r}` must be an integer between 1 and {self.num_layers}.")
        trained = [layer for layer, weight in enumerate(self.config.resolved_layer_weights, start=1) if weight > 0]
        if min(trained) > num_layers:
            raise ValueError(
                f"truncate({num_layers}) keeps none of the aligned layers {trained}: the classifier was never trained "
                f"after blocks 1-{num_layers}. Truncate to at least {min(trained)} blocks."
            )
        truncated = copy.deepcopy(self)
        del truncated.blocks[num_layers:]
        base_config = truncated.backbone.config
        base_config.get_text_config().num_hidden_layers = num_layers
        layer_types = getattr(base_config, "layer_types", None)
        if isinstance(layer_types, list):
            base_config.layer_types = layer_types[:num_layers]
        config = truncated.config
        config.base_config = base_config
        if not isinstance(config.layer_weights, str):
            config.layer_weights = config.layer_weights[:num_layers]
        if config.aligned_layers is not None:
            config.aligned_layers = [layer for layer in config.aligned_layers if layer <= num_layers]
        try:
            AlignedConfig.from_dict(config.to_dict())
        except ValueError as error:
            raise ValueError(f"truncate({num_layers}) would save settings that do not load: {error}") from error
        if config.classifier_sharing == "per_layer":
            del truncated.classifier.heads[num_layers:]
        truncated.exit_config = ExitConfig()
        return truncated

    @torch.no_grad()
    def pooled_layer_states(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pooling: str | None = None,
        stage: str = "pre",
        **inputs,
    ) -> torch.Tensor:
        """Pooled representations of the embedding output and of every block, `(num_layers + 1, batch, dim)`.

        These are the vectors f_l(x) that similarity analyses compare, read at one of two stages:

        - `"pre"` (default): each layer's hidden states reduced with the model's pooling (or `pooling`), *before*
          any part of the classifier (its final norm, pooler and projection head); `dim` is the hidden size.
        - `"post"`: the vector the classification layer reads, after the classifier's final norm, pooler and
          projection head (`config.projection_head`); `dim` is the head's width. Layer l goes through the head that
          classifies after block l (the shared one, or head l with per-layer heads); the embedding output (l = 0),
          which has no head of its own, goes through block 1's. Without a projection head, final norm or pooler the
          two stages are equal.

        Raises:
            ValueError: for an unknown `stage`, or a `pooling` other than the model's with `stage="post"` (the
                classifier pools as it was trained).
        """
        if stage not in REPRESENTATION_STAGES:
            raise ValueError(f"`stage={stage!r}` is not supported; use one of {REPRESENTATION_STAGES}.")
        if stage == "post" and pooling not in (None, self.config.pooling):
            raise ValueError(
                f"`pooling={pooling!r}` cannot be combined with `stage='post'`: the classifier reads "
                f"{self.config.pooling!r} pooling, as trained. Leave `pooling` unset or use `stage='pre'`."
            )
        pooling = pooling or self.config.pooling
        model_inputs = self._inputs(
            "pooled_layer_states", input_ids=input_ids, attention_mask=attention_mask, **inputs
        )
        with self.capture_block_outputs(include_embeddings=True) as captured:
            self.backbone(**model_inputs)
        mask = self.pooling_mask(input_ids, attention_mask)
        if stage == "pre":
            return torch.stack([pool_hidden_states(hidden, mask, pooling) for hidden in captured])
        heads = [self.classifier.head(max(layer, 1)) for layer in range(len(captured))]
        return torch.stack([head.features(hidden, mask) for head, hidden in zip(heads, captured)])


def _wrapped_loading_info(model: AlignedForSequenceClassification, base_info: dict) -> dict:
    """The loading info of a wrapped base checkpoint, named as in the aligned model: the base model's keys under
    `backbone.`, plus the new classification layer (and projection head) as missing keys."""
    moved = {"norm", "pooler"}  # the base model's own parts, loaded with it
    new_keys = [
        f"classifier.{name}" for name, _ in model.classifier.named_parameters() if name.split(".")[2] not in moved
    ]
    info = {
        key: [f"backbone.{name}" for name in base_info.get(key, [])] for key in ("missing_keys", "unexpected_keys")
    }
    info["missing_keys"] += new_keys
    info["mismatched_keys"] = list(base_info.get("mismatched_keys", []))
    info["error_msgs"] = list(base_info.get("error_msgs", []))
    return info


def register_hub_pusher(pusher: Callable[..., Any]) -> None:
    """Sets how `push_to_hub` uploads aligned models: `pusher(model, repo_id, **push_kwargs)` returns a CommitInfo."""
    AlignedPreTrainedModel.hub_pusher = staticmethod(pusher)
