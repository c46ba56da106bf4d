"""`AlignedForCausalLM`: a decoder-only language model whose own final norm and LM head predict after every block.

Aligned training of a language model changes its loss, not its architecture: the model's final norm and LM head (the
"classifier" of the method) are applied after every block and each block's next-token cross-entropy is weighted with
λ_l. So an aligned causal LM *is* the base family's own class (an [`AlignedForCausalLM`] instance of a Llama model is a
`LlamaForCausalLM`) with the aligned loss in its `forward` when labels are given; `save_pretrained` writes a plain
checkpoint that `AutoModelForCausalLM` (and vLLM, TGI, `pipeline("text-generation")`) loads without hf_aligned, with
the training settings recorded under `aligned_training` in its `config.json`.

The payoff is self-speculative decoding: the first k blocks, read through the same norm and head, draft tokens the
full model verifies, so `generate(..., assistant_early_exit=k)` gives plain greedy output faster, with no second model.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel
from transformers.utils import logging

from .alignment import ALIGNED_TRAINING_KEY, ALIGNMENT_KEYWORDS, CAUSAL_LM, AlignmentSettings
from .backbones import find_layout
from .block_hooks import BlockOutputs, install_block_hooks, observe_blocks
from .compat import build_from_config, causal_lm_class
from .configuration_aligned import is_decoder_only, num_hidden_layers
from .heads import causal_lm_head
from .losses import (
    chunked_next_token_loss,
    layer_sample_sums,
    next_token_loss_sum,
    shifted_labels,
    step_weights,
)
from .outputs import AlignedCausalLMOutput
from .sharing import push_options, push_saved, push_to_hub
from .speculative import draft_generation_kwargs, early_exit_draft
from .utils import has_active_dropout, hub_kwargs

logger = logging.get_logger(__name__)


class AlignedForCausalLM:
    """A decoder-only causal LM of any family (GPT-2, Llama, Mistral, Qwen2/3, Gemma, Phi-3, ...) with the aligned loss.

    `AlignedForCausalLM.from_pretrained(...)` / `.from_config(...)` return an instance of the family's own causal-LM
    class extended by this one (e.g. `AlignedLlamaForCausalLM`, a subclass of `LlamaForCausalLM`), so the weights,
    their names and everything transformers does with the model are unchanged. Called with `labels`, the model
    returns [`AlignedCausalLMOutput`]: the loss Σ_l λ_l · CE_l of the model's own final norm and LM head applied after
    every block (`-100` labels ignored, labels shifted inside as usual). Without labels it is the base model.
    `generate(..., assistant_early_exit=k)` decodes self-speculatively for every family.

    Example:

    ```python
    >>> import torch
    >>> from transformers import LlamaConfig
    >>> from hf_aligned import AlignedForCausalLM

    >>> config = LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
    ...                      num_attention_heads=4, num_key_value_heads=2)
    >>> model = AlignedForCausalLM.from_config(config, layer_weights="linear")
    >>> ids = torch.randint(0, 99, (2, 8))
    >>> model(input_ids=ids, labels=ids).layer_losses.shape
    torch.Size([4])
    >>> _ = model.eval()  # from_config leaves the model in train mode, as in transformers
    >>> model.generate(ids[:1], max_new_tokens=5, assistant_early_exit=1)
    ```
    """

    _aligned_classes: ClassVar[dict[type, type]] = {}
    # The aligned loss is a mean over each batch's tokens: Trainer scales it for gradient accumulation itself.
    accepts_loss_kwargs = False
    # hf_aligned's push: the plain checkpoint and its own card in one commit (see `hf_aligned.sharing`).
    push_to_hub = push_to_hub
    push_saved = push_saved

    # -- construction -------------------------------------------------------------------------------------------

    @classmethod
    def aligned_class(cls, base_class: type[PreTrainedModel]) -> type[PreTrainedModel]:
        """The aligned version of a causal-LM class (`LlamaForCausalLM` -> `AlignedLlamaForCausalLM`), made once."""
        if issubclass(base_class, AlignedForCausalLM):
            return base_class
        if base_class not in cls._aligned_classes:
            name = f"Aligned{base_class.__name__}"
            attributes = {"__module__": __name__, "__qualname__": name, "__doc__": AlignedForCausalLM.__doc__}
            attributes["forward"] = _forward_of(base_class, name)
            cls._aligned_classes[base_class] = type(name, (AlignedForCausalLM, base_class), attributes)
        return cls._aligned_classes[base_class]

    @classmethod
    def from_config(cls, config: PreTrainedConfig, **kwargs) -> PreTrainedModel:
        """Builds a randomly initialized aligned causal LM from a base config (`GPT2Config`, `LlamaConfig`, ...).

        Keyword arguments named like [`AlignmentSettings`] fields set the aligned training; the others go to the
        family's `_from_config` (`dtype`, `attn_implementation`, ...).
        """
        settings = {name: kwargs.pop(name) for name in list(kwargs) if name in ALIGNMENT_KEYWORDS}
        model_class = cls.aligned_class(_causal_lm_class_for(config))
        model = build_from_config(model_class, config, **kwargs)
        model.configure_alignment(**settings)
        return model

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *model_args, **kwargs
    ) -> PreTrainedModel:
        """Loads any causal-LM checkpoint (plain or aligned) as an aligned causal LM.

        Keyword arguments named like [`AlignmentSettings`] fields override the settings the checkpoint records (or the
        defaults); the others go to the family's `from_pretrained` (`dtype`, `revision`, `attn_implementation`, ...),
        config attributes among them (`use_cache=False`, `resid_pdrop=0.0`) overriding the checkpoint's config as
        `AutoModelForCausalLM` applies them.
        """
        settings = {name: kwargs.pop(name) for name in list(kwargs) if name in ALIGNMENT_KEYWORDS}
        if cls is AlignedForCausalLM:
            config = kwargs.get("config")
            if not isinstance(config, PreTrainedConfig):
                config = AutoConfig.from_pretrained(config or pretrained_model_name_or_path, **hub_kwargs(kwargs))
            model_class = cls.aligned_class(_causal_lm_class_for(config))
            # The family's `from_pretrained` loads the config again unless one was given, applying the config
            # overrides in `kwargs` (`use_cache=False`, `resid_pdrop=0.0`, ...) as `AutoModelForCausalLM` does.
            loaded = model_class.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        else:
            loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        model.configure_alignment(**settings)
        return loaded

    def __init__(self, config: PreTrainedConfig, *args, **kwargs):
        if type(self) is AlignedForCausalLM:
            raise TypeError(
                "AlignedForCausalLM extends a family's causal-LM class: build it with "
                "`AlignedForCausalLM.from_pretrained(...)` or `AlignedForCausalLM.from_config(config)`."
            )
        self.aligned_head = causal_lm_head(config)
        super().__init__(config, *args, **kwargs)
        base = getattr(self, self.base_model_prefix)
        self.aligned_layout = find_layout(base)
        if self.aligned_layout.final_norm is None:
            raise ValueError(
                f"Model type {config.model_type!r} has no final norm hf_aligned can find; aligned causal LMs read "
                "every block through the model's own final norm and LM head."
            )
        install_block_hooks(self.aligned_blocks)
        self.alignment.validate(self.num_layers)

    def configure_alignment(self, **settings) -> AlignmentSettings:
        """Sets [`AlignmentSettings`] fields (validated first, so a bad value changes nothing) and records them in
        `config.aligned_training`.

        Raises:
            TypeError: for a keyword that is no alignment setting.
            ValueError: for a value that does not fit the model, or a classifier setting.
        """
        alignment = self.alignment.replace(CAUSAL_LM, **settings)
        alignment.validate(self.num_layers)
        setattr(self.config, ALIGNED_TRAINING_KEY, alignment.to_dict(CAUSAL_LM))
        return alignment

    @property
    def alignment(self) -> AlignmentSettings:
        """The aligned-training settings recorded in the config (defaults when the checkpoint records none)."""
        return AlignmentSettings.from_dict(getattr(self.config, ALIGNED_TRAINING_KEY, None), CAUSAL_LM)

    @property
    def num_layers(self) -> int:
        """The number of blocks, L."""
        return num_hidden_layers(self.config)

    @property
    def aligned_blocks(self) -> nn.ModuleList:
        """The base model's list of transformer blocks."""
        return getattr(self, self.base_model_prefix).get_submodule(self.aligned_layout.blocks)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *args,
        is_main_process: bool = True,
        push_to_hub: bool = False,
        **kwargs,
    ):
        """Saves a plain checkpoint of the base family (its `architectures` name the family's own class), with the
        aligned-training settings under `aligned_training` in `config.json`.

        With `push_to_hub=True` (and `repo_id`, `commit_message`, `commit_description`, `private`, `revision`,
        `create_pr`), the saved directory is uploaded with hf_aligned's card, after `config.json` names the plain
        class, never before (the same push as `push_to_hub`).
        """
        options = push_options(kwargs)
        super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        plain_name = _plain_class(type(self)).__name__
        self.config.architectures = [plain_name]
        config_file = os.path.join(save_directory, "config.json")
        if is_main_process and os.path.exists(config_file):
            with open(config_file, encoding="utf-8") as handle:
                saved = json.load(handle)
            saved["architectures"] = [plain_name]
            with open(config_file, "w", encoding="utf-8") as handle:
                handle.write(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        if push_to_hub and self.should_save_on_this_rank(is_main_process):
            self.push_saved(save_directory, options, token=kwargs.get("token"))

    # -- the aligned loss ---------------------------------------------------------------------------------------

    def forward(self, labels=None, **kwargs):
        """The family's forward; with `labels`, the aligned loss over every block (see the class docstring).

        With labels, the loss of every block with a weight is computed (in train mode, `layers_per_step` draws the
        earlier ones); `output_layer_agreement=True` computes every block's loss and its top-1 agreement with the last
        block (`layer_agreement`), which evaluation asks for. What a call returns depends on its arguments and the
        model's settings, never on the grad mode.

        Each aligned class gets a `forward` with its family's exact signature (same parameters, order and defaults)
        that binds its arguments by that signature and calls this one by name (see `_forward_of`): transformers and
        Trainer read `inspect.signature(model.forward)` to pass `position_ids` and `logits_to_keep` in generation and
        to keep dataset columns.
        """
        every_layer = bool(kwargs.pop("output_layer_agreement", False))
        if labels is None:
            return super().forward(**kwargs)
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = self.config.return_dict
        if kwargs.get("use_cache") or kwargs.get("logits_to_keep", 0) not in (0, None):
            raise ValueError(
                "The aligned loss reads every position of every block: call the model with `labels` without "
                "`use_cache=True` or `logits_to_keep`."
            )
        kwargs.pop("logits_to_keep", None)
        kwargs["use_cache"] = False
        base = getattr(self, self.base_model_prefix)
        with observe_blocks(BlockOutputs(self.aligned_blocks)) as captured:
            outputs = base(return_dict=True, **kwargs)
        output = self._aligned_output(outputs, captured.outputs, labels, every_layer)
        return output if return_dict else output.to_tuple()

    def _aligned_output(
        self, outputs: Any, block_outputs: list[torch.Tensor], labels: torch.Tensor, every_layer: bool
    ) -> AlignedCausalLMOutput:
        """The aligned loss and per-layer losses (and, for `every_layer`, every layer's agreement) of one call."""
        logits = self._head(outputs.last_hidden_state)
        targets = shifted_labels(labels.to(logits.device))
        counted = (targets != -100).sum()  # no counted token: 0 / 0, a nan loss as the plain family gives
        weights = self._step_weights()
        chunk_size = self.alignment.loss_chunk_size
        last_loss = next_token_loss_sum(logits, targets) / counted
        layer_losses = [torch.full_like(last_loss, float("nan")) for _ in range(self.num_layers)]
        layer_losses[-1] = last_loss
        computed = torch.ones(self.num_layers, dtype=torch.bool, device=last_loss.device)
        agreement = sample_sums = None
        if every_layer:
            sample_sums = layer_sample_sums(logits, block_outputs, targets, self.layer_logits, chunk_size)
            layer_losses[:-1] = list(sample_sums[:, :-1, 0].sum(dim=0) / counted)
            agreement = sample_sums[:, :, 1].sum(dim=0) / counted
        else:
            computed[:-1] = False
            for layer in sorted(set(weights) - {self.num_layers}):
                loss_sum = chunked_next_token_loss(self.layer_logits, block_outputs[layer - 1], targets, chunk_size)
                layer_losses[layer - 1] = loss_sum / counted
                computed[layer - 1] = True
        layer_losses = torch.stack(layer_losses)
        return AlignedCausalLMOutput(
            loss=sum(weight * layer_losses[layer - 1] for layer, weight in weights.items()),
            logits=logits,
            layer_losses=layer_losses,
            layer_agreement=agreement,
            layer_computed=computed,
            layer_sample_sums=sample_sums,
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )

    def _step_weights(self) -> dict[int, float]:
        """This step's weight of every layer with a loss (see [`step_weights`]): in train mode, `layers_per_step`
        draws a subset of the earlier layers."""
        alignment = self.alignment
        return step_weights(alignment.validate(self.num_layers), alignment.layers_per_step, draw=self.training)

    def _head(self, normed: torch.Tensor) -> torch.Tensor:
        """The LM head and the family's own scaling or soft-capping of the logits (its [`CausalLMHead`])."""
        return self.aligned_head(self.get_output_embeddings()(normed), self.config)

    def layer_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Next-token logits of a block's output hidden states: the model's own final norm, then its LM head."""
        norm = getattr(self, self.base_model_prefix).get_submodule(self.aligned_layout.final_norm)
        return self._head(norm(hidden_states))

    # -- self-speculative decoding ------------------------------------------------------------------------------

    def early_exit_draft(self, num_layers: int) -> PreTrainedModel:
        """A view of this model with only its first `num_layers` blocks, sharing every weight: the draft model of
        self-speculative decoding (see [`early_exit_draft`]).

        Raises:
            ValueError: if `num_layers` is not between 1 and L - 1.
        """
        return early_exit_draft(self, self.aligned_blocks, self.aligned_layout.blocks, num_layers)

    def generate(self, *args, assistant_early_exit: int | None = None, **kwargs):
        """transformers' `generate`; with `assistant_early_exit=k` (or a generation config that sets it), the first
        k blocks draft tokens and the full model verifies them (assisted generation with [`early_exit_draft`]), for
        every family, GPT-2 included. Greedy output equals plain greedy decoding (in eval mode: in train mode a model
        with dropout changes every forward, and a warning says so).

        The draft's settings `num_assistant_tokens`, `num_assistant_tokens_schedule` and
        `assistant_confidence_threshold` come from this call (keywords or `generation_config`), else from the model's
        generation config, else transformers' defaults (20 tokens, constant, a draft stops below confidence 0.4).

        Raises:
            ValueError: for a `k` outside [1, L - 1], or together with an `assistant_model`.
        """
        if self.training and has_active_dropout(self):
            logger.warning_once(
                "generate runs in train mode: dropout is active, so outputs change from call to call and "
                "`assistant_early_exit` no longer reproduces plain greedy decoding. `from_config` leaves a model in "
                "train mode (as in transformers): call `model.eval()` before generating."
            )
        return super().generate(*args, **draft_generation_kwargs(self, assistant_early_exit, kwargs))


def __getattr__(name: str) -> type:
    """`AlignedLlamaForCausalLM` and its kind, made on first use, so pickled aligned models load in a new process."""
    import transformers

    base_class = getattr(transformers, name.removeprefix("Aligned"), None) if name.startswith("Aligned") else None
    if isinstance(base_class, type) and issubclass(base_class, PreTrainedModel):
        return AlignedForCausalLM.aligned_class(base_class)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _forward_of(base_class: type[PreTrainedModel], class_name: str):
    """The `forward` of an aligned class: the family's own signature (what `inspect.signature` shows transformers),
    binding positional and keyword arguments exactly as the family's forward does, then
    [`AlignedForCausalLM.forward`] by name."""
    signature = inspect.signature(base_class.forward)
    extra = next((p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)

    def forward(self, *args, **kwargs):
        arguments = signature.bind(self, *args, **kwargs).arguments
        arguments.pop(next(iter(signature.parameters)))  # self
        named = arguments.pop(extra, {}) if extra is not None else {}
        return AlignedForCausalLM.forward(self, **arguments, **named)

    forward.__signature__ = signature
    forward.__doc__ = AlignedForCausalLM.forward.__doc__
    forward.__module__ = __name__
    forward.__qualname__ = f"{class_name}.forward"
    return forward


def _plain_class(model_class: type) -> type:
    return next(base for base in model_class.__mro__[1:] if not issubclass(base, AlignedForCausalLM))


def _causal_lm_class_for(config: PreTrainedConfig) -> type[PreTrainedModel]:
    if not is_decoder_only(config):
        raise ValueError(
            f"Model type {config.model_type!r} is not a decoder-only language model; AlignedForCausalLM wraps "
            "decoder-only families (GPT-2, Llama, Mistral, Qwen2/3, Gemma, Phi-3, ...). For classification use "
            "AlignedForSequenceClassification."
        )
    causal_lm_head(config)
    return causal_lm_class(config)
