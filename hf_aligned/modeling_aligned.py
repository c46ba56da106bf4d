"""`AlignedForSequenceClassification`: one classifier, made of the base model's own final parts, after every block."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.utils import logging

from .alignment import CLASSIFICATION, KIND_FIELDS, AlignmentSettings
from .backbones import detach_module, find_layout, sentence_transformers_pooling
from .block_hooks import BlockOutputs, install_block_hooks, observe_blocks
from .compat import mark_initialized, set_name_or_path
from .configuration_aligned import AlignedConfig
from .early_exit import check_exit_rule, classify_with_early_exit
from .exits import ExitConfig
from .heads import AlignedClassifier, ClassificationHead, pool_hidden_states
from .inputs import BaseModelInputs, non_padding_mask
from .losses import aligned_loss, distillation_losses, infer_problem_type, layer_losses
from .outputs import AlignedSequenceClassifierOutput, EarlyExitOutput
from .sharing import push_to_hub
from .utils import hub_kwargs

logger = logging.get_logger(__name__)

# Keyword arguments that configure the aligned model rather than the base model it wraps: the alignment settings of a
# classifier and the classifier's own structure and labels.
ALIGNED_KWARGS = (
    *KIND_FIELDS[CLASSIFICATION],
    "pooling",
    "projection_head",
    "use_pooler",
    "classifier_dropout",
    "layout",
    "num_labels",
    "id2label",
    "label2id",
    "problem_type",
)
# Where `pooled_layer_states` reads a layer's vector: before the classifier, or where its classification layer reads.
REPRESENTATION_STAGES = ("pre", "post")


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
    # hf_aligned's push: the model, its exit rule and its own card in one commit (see `hf_aligned.sharing`).
    push_to_hub = push_to_hub


class AlignedForSequenceClassification(AlignedPreTrainedModel):
    """A base model with one classifier applied after every block, trained with the aligned loss.

    The classifier is the base model's own final norm and pooler (where the family has them) followed by a new
    classification layer. Applied after block l it gives `layer_logits[l - 1]`; the training loss combines every
    block's loss with `config.layer_weights`, so the same classifier works after any block.

    Args:
        config ([`AlignedConfig`]): the aligned settings and the base model's config.
        base_model ([`PreTrainedModel`], *optional*): an already built (usually pretrained) base model to wrap; by
            default one is built from `config.base_config`.

    Example:

    ```python
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
        self.base_inputs = BaseModelInputs(backbone, extra_names=ExitConfig.__dataclass_fields__)
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

    @property
    def num_layers(self) -> int:
        """The number of blocks, L."""
        return self.config.num_layers

    @property
    def blocks(self) -> nn.ModuleList:
        """The base model's list of transformer blocks."""
        return self.backbone.get_submodule(self.blocks_path)

    @property
    def alignment(self) -> AlignmentSettings:
        """The aligned-training settings of this model (carried by its config)."""
        return self.config.alignment

    def configure_alignment(self, **settings) -> AlignmentSettings:
        """Sets [`AlignmentSettings`] fields of a classifier, validated first (so a bad value changes nothing).

        Raises:
            TypeError: for a keyword that is no alignment setting.
            ValueError: for a value that does not fit the model, a language-model setting, or a different
                `classifier_sharing` (the number of heads is fixed when the model is built).
        """
        sharing = settings.get("classifier_sharing", self.config.classifier_sharing)
        if sharing != self.config.classifier_sharing:
            raise ValueError(
                f"`classifier_sharing={sharing!r}` cannot change on a built model (it has "
                f"{self.config.classifier_sharing!r} heads); build a new model with it instead."
            )
        return self.config.configure_alignment(**settings)

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
        model's `from_pretrained` (`dtype`, `attn_implementation`, `revision`, ...). With `pooling="auto"` a
        sentence-transformers checkpoint's own pooling config decides the pooling.
        """
        locating = hub_kwargs(kwargs)
        found = config or AutoConfig.from_pretrained(pretrained_model_name_or_path, **locating)
        if not isinstance(found, AlignedConfig):
            # Without a `config` argument the base model loads its config itself, applying the config overrides in
            # `kwargs` (`hidden_dropout_prob=0.0`, ...) as `AutoModel` does.
            return cls._from_base_pretrained(pretrained_model_name_or_path, base_config=config, **kwargs)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True gives (model, info)
        exit_config = ExitConfig.from_pretrained(pretrained_model_name_or_path, **locating)
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
        locating = hub_kwargs(kwargs)
        output_loading_info = kwargs.pop("output_loading_info", False)
        base_model, loading_info = AutoModel.from_pretrained(
            path, config=base_config, output_loading_info=True, **kwargs
        )
        if aligned_kwargs.get("pooling", "auto") == "auto":
            aligned_kwargs["pooling"] = sentence_transformers_pooling(path, locating) or "auto"
        if aligned_kwargs.get("use_pooler") is None and any(
            key.startswith("pooler.") for key in loading_info["missing_keys"]
        ):
            # The checkpoint has no trained pooler: a randomly initialized one would only get in the way.
            aligned_kwargs["use_pooler"] = False
        config = AlignedConfig(base_config=base_model.config, **aligned_kwargs)
        set_name_or_path(config, str(path))
        model = cls(config, base_model=base_model)
        # The new classifier follows the base model's dtype and the device its last block was loaded on.
        model.classifier.to(device=next(model.blocks[-1].parameters()).device, dtype=base_model.dtype)
        model.eval()
        if not output_loading_info:
            return model
        return model, _wrapped_loading_info(model, loading_info)

    def _inputs(self, caller: str = "forward", **inputs) -> dict[str, torch.Tensor]:
        """The base model's inputs of one call, checked and completed ([`BaseModelInputs.prepare`])."""
        return self.base_inputs.prepare(caller, **inputs)

    def pooling_mask(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The mask pooling reads: the attention mask, or for `"last"` pooling without one, non-pad tokens."""
        if attention_mask is not None or self.config.pooling != "last" or input_ids is None:
            return attention_mask
        return non_padding_mask(input_ids, self.config.base_config.get_text_config().pad_token_id)

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
        output_layer_logits: bool | None = None,
        early_exit: bool | None = None,
        **kwargs,
    ) -> AlignedSequenceClassifierOutput:
        r"""Classifies a batch: the base model once and the classifier after every block, or with early exit.

        What the call returns depends on its arguments and the model's configuration only (never on the grad mode):

        Args:
            labels (`torch.Tensor` of shape `(batch_size,)`, or `(batch_size, num_labels)` for multi-label and
                multi-output regression, *optional*): class indices in `[0, num_labels)` for single-label
                classification; floats for regression and multi-label classification. Adds the aligned `loss`.
            output_layer_logits (`bool`, *optional*): also return every block's scores, `layer_logits` of shape
                `(num_layers, batch_size, num_labels)` (what the trainer, the metrics and the analyses ask for).
            early_exit (`bool`, *optional*): `True` serves the call with [`early_exit_predict`] under
                `self.exit_config`; `False` runs every block. Unset, an inference call (eval mode, no labels, hidden
                states, attentions or layer logits asked for, not compiled) exits early when `self.exit_config` lets
                samples leave before the last layer; every other call runs every block.
            Other arguments are the base model's inputs (`input_ids`, `attention_mask`, `pixel_values`, ...).

        Returns:
            [`AlignedSequenceClassifierOutput`], batch first by default (what pipelines split into samples):
            `logits` after the last block, or with early exit at each sample's exit layer with `exit_layers`; given
            labels, `loss` and `layer_losses`; `layer_logits` when asked for.

        Raises:
            TypeError: naming keyword arguments the base model does not take.
            ValueError: for a call without inputs, an empty batch, or `early_exit=True` with labels, hidden states,
                attentions or layer logits.
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
        outputs = {"output_hidden_states": output_hidden_states, "output_attentions": output_attentions}
        output = self._forward(base_inputs, labels, outputs, bool(output_layer_logits), early_exit)
        return output if return_dict else output.to_tuple()

    def _forward(
        self,
        base_inputs: dict[str, Any],
        labels: torch.Tensor | None,
        outputs: dict[str, bool | None],
        output_layer_logits: bool,
        early_exit: bool | None,
    ) -> AlignedSequenceClassifierOutput:
        """`forward` with its output as a [`AlignedSequenceClassifierOutput`]."""
        exit_fields = sorted(set(base_inputs) & set(ExitConfig.__dataclass_fields__))
        if exit_fields:
            raise TypeError(
                f"forward() does not take the ExitConfig fields {exit_fields}: pass them to `early_exit_predict`, or "
                "set `model.exit_config`."
            )
        every_layer = labels is not None or output_layer_logits or any(outputs.values())
        if self._exits_early(early_exit, every_layer):
            result = self.early_exit_predict(**base_inputs)
            return AlignedSequenceClassifierOutput(logits=result.logits, exit_layers=result.exit_layers)
        model_inputs = self._inputs(**base_inputs, **outputs)
        mask = self.pooling_mask(base_inputs["input_ids"], base_inputs["attention_mask"])
        base_outputs, layer_logits = self._run_all_layers(model_inputs, mask)
        loss = layer_losses = distillation_losses = None
        if labels is not None:
            loss, layer_losses, distillation_losses = self.aligned_loss(layer_logits, labels)
        return AlignedSequenceClassifierOutput(
            loss=loss,
            logits=layer_logits[-1],
            layer_logits=layer_logits if output_layer_logits else None,
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
        # `classifier_update="last"`: the earlier layers' scores give the shared head no gradient. Only how gradients
        # are routed depends on the grad mode; the scores are the same.
        frozen = self.config.classifier_update == "last" and torch.is_grad_enabled()
        frozen_layers = frozenset(layers[:-1]) if frozen else frozenset()
        return base_outputs, self.classifier(block_outputs, pooling_mask, layers, frozen_layers=frozen_layers)

    def _exits_early(self, early_exit: bool | None, every_layer: bool) -> bool:
        """Whether `forward` serves the call with early exit: as asked, else an inference call whose exit config
        lets samples leave early (see `forward`).

        Raises:
            ValueError: for `early_exit=True` with labels, hidden states, attentions or layer logits (`every_layer`).
        """
        if early_exit is None:
            return not (self.training or every_layer or self.exit_config.never_exits or torch.compiler.is_compiling())
        if early_exit and every_layer:
            raise ValueError(
                "`early_exit=True` returns each sample's logits at its exit layer only: it computes no loss, hidden "
                "states, attentions or layer logits. Leave `early_exit` unset (or pass False) with `labels`, "
                "`output_hidden_states`, `output_attentions` or `output_layer_logits`."
            )
        return early_exit

    def aligned_loss(
        self, layer_logits: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The aligned loss of this model's settings ([`aligned_loss`]): Σ_l λ_l · loss_l, where each earlier layer's
        loss mixes in self-distillation when `config.distillation_weight > 0`.

        Returns:
            The loss, the per-layer task losses `(num_layers,)` and the per-layer distillation losses (or `None`).
        """
        config = self.config
        return aligned_loss(
            layer_logits,
            labels,
            self._problem_type(layer_logits, labels),
            config.resolved_layer_weights,
            config.distillation_weight,
            config.distillation_temperature,
        )

    def layer_losses(self, layer_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of each layer's scores, `(num_layers,)`, for the configured (or inferred) problem type.

        Raises:
            ValueError: naming the offending labels, when a class index lies outside `[0, num_labels)`.
        """
        return layer_losses(layer_logits, labels, self._problem_type(layer_logits, labels))

    def layer_distillation_losses(self, layer_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Self-distillation loss of each layer, `(num_layers,)` (see [`distillation_losses`]).

        Raises:
            ValueError: when the model is not a single-label classifier.
        """
        config = self.config
        return distillation_losses(layer_logits, labels, config.problem_type, config.distillation_temperature)

    def _problem_type(self, layer_logits: torch.Tensor, labels: torch.Tensor) -> str:
        """The configured problem type; when unset, inferred from the labels (as transformers does) and recorded."""
        if self.config.problem_type is None:
            self.config.problem_type = infer_problem_type(layer_logits.shape[-1], labels)
        return self.config.problem_type

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
        check_exit_rule(exit_config, self.config.problem_type, self.config.num_labels)
        return classify_with_early_exit(
            self.backbone,
            self.blocks,
            self.classifier,
            model_inputs,
            exit_config,
            self.pooling_mask(input_ids, attention_mask),
            self.config.problem_type,
        )

    def truncate(self, num_layers: int) -> AlignedForSequenceClassification:
        """A standalone copy with only the first `num_layers` blocks and the same classifier.

        The copy's logits are exactly this model's `layer_logits[num_layers - 1]`; it saves and loads as a normal
        checkpoint (its config says `num_layers` blocks), with a default `ExitConfig`: the "minimal depth"
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
