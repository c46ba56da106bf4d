"""`AlignedForSequenceClassification`: one classifier, made of the base model's own final parts, after every block."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.utils import logging

from .alignment import AlignmentSettings
from .backbones import detach_module, find_layout
from .block_hooks import BlockOutputs, install_block_hooks, observe_blocks
from .checkpoints import truncated_copy, wrap_base_checkpoint
from .compat import mark_initialized, set_no_split_modules
from .configuration_aligned import AlignedConfig
from .early_exit import EarlyExitMixin
from .exits import ExitConfig
from .heads import build_classifier, pool_hidden_states, resolve_use_pooler
from .inputs import BaseModelInputs, non_padding_mask
from .losses import aligned_loss, infer_problem_type
from .outputs import AlignedSequenceClassifierOutput
from .sharing import push_options, push_saved, push_to_hub
from .utils import hub_kwargs

logger = logging.get_logger(__name__)

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
    push_saved = push_saved


class AlignedForSequenceClassification(EarlyExitMixin, AlignedPreTrainedModel):
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
    >>> out = model(input_ids=torch.tensor([[2, 5, 7]]), labels=torch.tensor([1]), output_layer_logits=True)
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
        config.use_pooler = resolve_use_pooler(config, pooler, backbone.config.model_type)
        config.layout = layout.to_dict()
        config.base_config = backbone.config
        self.backbone = backbone
        self.blocks_path = layout.blocks
        install_block_hooks(self.blocks)
        self.base_inputs = BaseModelInputs(backbone, extra_names=ExitConfig.__dataclass_fields__)
        self.classifier = build_classifier(config, backbone.config.get_text_config().hidden_size, norm, pooler)
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
        # accelerate's transformer-based FSDP wrap shards the modules named here: the blocks the classifier reads, and
        # not the embeddings some backbones list (FSDP2 then shards the embedding module twice and fails).
        set_no_split_modules(self, {type(block).__name__ for block in self.blocks})

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
        model's `from_pretrained` (`dtype`, `attn_implementation`, `revision`, ...); attributes of the base config
        among them (`hidden_dropout_prob=0.0`, `use_cache=False`) override it, as `AutoModel*` applies them, and
        unknown keywords are an error. With `pooling="auto"` a sentence-transformers checkpoint's own pooling config
        decides the pooling. `output_loading_info=True` returns `(model, loading_info)` as transformers does (the
        saved `exit_config.json` is read either way).
        """
        locating = hub_kwargs(kwargs)
        found = config if config is not None else AutoConfig.from_pretrained(pretrained_model_name_or_path, **locating)
        if not isinstance(found, AlignedConfig):
            # Without a `config` argument the base model loads its config itself, applying the config overrides in
            # `kwargs` (`hidden_dropout_prob=0.0`, ...) as `AutoModel` does.
            return wrap_base_checkpoint(cls, pretrained_model_name_or_path, base_config=config, **kwargs)
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

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *args,
        is_main_process: bool = True,
        push_to_hub: bool = False,
        **kwargs,
    ):
        """Saves the model like transformers does, plus its [`ExitConfig`] as `exit_config.json`. With
        `push_to_hub=True` (and `repo_id`, `commit_message`, ...), the saved directory is then uploaded with
        hf_aligned's card, the same push as `push_to_hub`."""
        options = push_options(kwargs)
        super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            self.exit_config.save_pretrained(save_directory)
        if push_to_hub and self.should_save_on_this_rank(is_main_process):
            self.push_saved(save_directory, options, token=kwargs.get("token"))

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
        # Unset output flags follow this model's config (as transformers' models do), not the base model's own.
        outputs = {name: getattr(self.config, name) if value is None else value for name, value in outputs.items()}
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

    def aligned_loss(self, layer_logits: torch.Tensor, labels: torch.Tensor):
        """[`losses.aligned_loss`] with this model's settings and problem type (inferred from the labels and recorded
        when unset): the loss, the per-layer losses and the per-layer distillation losses (or `None`)."""
        config = self.config
        if config.problem_type is None:
            config.problem_type = infer_problem_type(layer_logits.shape[-1], labels)
        distillation = (config.distillation_weight, config.distillation_temperature)
        return aligned_loss(layer_logits, labels, config.problem_type, config.resolved_layer_weights, *distillation)

    def truncate(self, num_layers: int) -> AlignedForSequenceClassification:
        """A standalone copy with only the first `num_layers` blocks and the same classifier.

        The copy's logits are this model's `layer_logits[num_layers - 1]` (to float rounding); it saves and loads as
        a normal checkpoint (its config says `num_layers` blocks), with a default `ExitConfig`: the "minimal depth"
        deployment, with no early-exit machinery at run time.

        The training settings are cut to the kept blocks (`layer_weights`, `aligned_layers`) and checked as
        `from_pretrained` checks them, so the copy always reloads; when no kept block had a loss weight (a
        `layer_weights="last"` model), the copy records `layer_weights="last"` of its own depth, with a warning.

        Raises:
            ValueError: if `num_layers` is not between 1 and the model's depth, or if the cut settings do not hold
                (e.g. `classifier_update="last"` with a zero weight on the new last layer).
        """
        return truncated_copy(self, num_layers)

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
