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

import copy
import inspect
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging
from transformers.utils.hub import create_and_tag_model_card, hf_api

from .backbones import find_layout
from .block_hooks import BlockOutputs, install_block_hooks, observe_blocks
from .compat import causal_lm_class
from .configuration_aligned import is_decoder_only, num_hidden_layers, resolve_layer_weights

logger = logging.get_logger(__name__)

# The key of the base config under which a checkpoint records how it was trained (ignored by other libraries).
ALIGNED_TRAINING_KEY = "aligned_training"
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "trust_remote_code")


@dataclass(frozen=True)
class CausalLMHead:
    """How a family's causal-LM class turns its final normed hidden states into logits: its `lm_head`, then the
    factors below, each read from the model config by name (`None`: the family has none).

    Attributes:
        divide_by: the logits are divided by this config value (Granite's `logits_scaling`).
        multiply_by: the logits are multiplied by this config value (Cohere's `logit_scale`).
        softcap: the logits are soft-capped, cap · tanh(logits / cap), by this config value where it is set (Gemma 2
            and 3's `final_logit_softcapping`).
    """

    divide_by: str | None = None
    multiply_by: str | None = None
    softcap: str | None = None

    def __call__(self, logits: torch.Tensor, config: PreTrainedConfig) -> torch.Tensor:
        if self.divide_by is not None:
            logits = logits / getattr(config, self.divide_by)
        if self.multiply_by is not None:
            logits = logits * getattr(config, self.multiply_by)
        cap = None if self.softcap is None else getattr(config, self.softcap, None)
        return torch.tanh(logits / cap) * cap if cap else logits


# The families whose causal-LM head AlignedForCausalLM reproduces, checked against each family's own loss by the
# tests. Add an entry for another family (after checking its causal-LM forward) to use it.
CAUSAL_LM_HEADS: dict[str, CausalLMHead] = {
    **dict.fromkeys(("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo"), CausalLMHead()),
    "gemma2": CausalLMHead(softcap="final_logit_softcapping"),
    "gemma3_text": CausalLMHead(softcap="final_logit_softcapping"),
    "granite": CausalLMHead(divide_by="logits_scaling"),
    "cohere": CausalLMHead(multiply_by="logit_scale"),
}


def causal_lm_head(config: PreTrainedConfig) -> CausalLMHead:
    """The [`CausalLMHead`] of a config's model type.

    Raises:
        ValueError: for a model type not in `CAUSAL_LM_HEADS`, naming how to add it.
    """
    head = CAUSAL_LM_HEADS.get(config.model_type)
    if head is None:
        raise ValueError(
            f"AlignedForCausalLM has not verified how model type {config.model_type!r} computes its logits (some "
            "families scale or soft-cap them after the LM head), so its per-layer losses could differ from the "
            f"model's own. Verified: {sorted(CAUSAL_LM_HEADS)}. If its causal-LM forward is `lm_head(norm(hidden))` "
            "followed only by config-read factors, register it first: "
            f"`hf_aligned.CAUSAL_LM_HEADS[{config.model_type!r}] = hf_aligned.CausalLMHead(...)`."
        )
    return head


@dataclass
class CausalAlignment:
    """How an [`AlignedForCausalLM`] is trained, stored in its config as `config.aligned_training`.

    Args:
        layer_weights: `"linear"` (the paper's λ_l ∝ l), `"uniform"`, `"last"` (standard language-model training) or
            one non-negative float per block.
        aligned_layers: 1-based blocks that receive a loss (the others get weight 0). Defaults to every block.
        layers_per_step: in training, compute the loss of only this many of the earlier aligned layers per step,
            drawn at random, each weighted by (candidates / drawn) so the expected loss is the full aligned loss; the
            last layer always counts. `None` computes every aligned layer.
        loss_chunk_size: the earlier layers' losses are computed over this many token positions at a time and their
            logits recomputed in the backward pass, so no `(layers, batch, seq, vocab)` tensor is ever held.
    """

    layer_weights: str | list[float] = "linear"
    aligned_layers: list[int] | None = None
    layers_per_step: int | None = None
    loss_chunk_size: int = 1024

    def __post_init__(self):
        """Checks the settings' types, so a wrong one fails here with the argument's name, not deep in a loop."""
        weights = self.layer_weights
        if not isinstance(weights, str) and not (
            isinstance(weights, (list, tuple))
            and all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in weights)
        ):
            raise TypeError(
                f"`layer_weights={weights!r}` must be a scheme name ('linear', 'uniform', 'last') or a list of one "
                "non-negative float per block."
            )
        layers = self.aligned_layers
        if layers is not None and not (
            isinstance(layers, (list, tuple))
            and all(isinstance(item, int) and not isinstance(item, bool) for item in layers)
        ):
            raise TypeError(
                f"`aligned_layers={layers!r}` must be a list of 1-based block numbers (e.g. [2, 4]) or None for every "
                "block."
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> CausalAlignment:
        """Reads the settings recorded in a config; unknown keys are an error naming them.

        Raises:
            TypeError: if `values` is not a dict.
            ValueError: for unknown keys.
        """
        if values is None:
            return cls()
        if not isinstance(values, dict):
            raise TypeError(f"`{ALIGNED_TRAINING_KEY}` must be a dict of CausalAlignment fields, got {values!r}.")
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"`{ALIGNED_TRAINING_KEY}` has unknown keys {unknown}; its keys are {sorted(known)}.")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resolved_weights(self, num_layers: int) -> list[float]:
        """Checks every setting against a model of `num_layers` blocks and returns one weight per block, summing to 1.

        Raises:
            ValueError: naming the setting that is out of range.
        """
        for name in ("layers_per_step", "loss_chunk_size"):
            value = getattr(self, name)
            if value is None and name == "layers_per_step":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}={value!r}` must be a positive integer.")
        return resolve_layer_weights(self.layer_weights, num_layers, self.aligned_layers)


@dataclass
class AlignedCausalLMOutput(CausalLMOutputWithPast):
    """Output of [`AlignedForCausalLM`] called with `labels`.

    Args:
        loss (`torch.Tensor` of shape `()`): Σ_l λ_l · (next-token cross-entropy after block l).
        logits (`torch.Tensor` of shape `(batch_size, sequence_length, vocab_size)`): the last block's logits.
        layer_losses (`torch.Tensor` of shape `(num_layers,)`): every block's mean next-token cross-entropy over the
            tokens whose label is not -100; `nan` for blocks whose loss this training step did not compute (weight 0,
            or not drawn with `layers_per_step`). In evaluation (gradients off) every block's loss is computed.
        layer_agreement (`torch.Tensor` of shape `(num_layers,)`, *optional*): with gradients off, the fraction of
            those tokens where block l's top-1 next token equals the last block's, which is what a draft exiting
            after block l gets accepted on.
        layer_computed (`torch.BoolTensor` of shape `(num_layers,)`): which blocks' losses this call computed (the
            others are the `nan` placeholders above), so a computed loss that is itself `nan` (a diverged run) is
            told apart from a skipped one.
        layer_sample_sums (`torch.Tensor` of shape `(batch_size, num_layers, 2)`, *optional*): with gradients off,
            each sample's summed next-token cross-entropy after every block and its number of tokens agreeing with
            the last block (the last block's entry: its number of counted tokens), from which evaluation forms exact
            token averages over any set of samples.
    """

    layer_losses: torch.Tensor | None = None
    layer_agreement: torch.Tensor | None = None
    layer_computed: torch.Tensor | None = None
    layer_sample_sums: torch.Tensor | None = None


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
    >>> model.generate(ids[:1], max_new_tokens=5, assistant_early_exit=1)
    ```
    """

    _aligned_classes: ClassVar[dict[type, type]] = {}
    # The aligned loss is a mean over each batch's tokens: Trainer scales it for gradient accumulation itself.
    accepts_loss_kwargs = False

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

        Keyword arguments named like [`CausalAlignment`] fields set the aligned training; the others go to the
        family's `_from_config` (`dtype`, `attn_implementation`, ...).
        """
        settings = {name: kwargs.pop(name) for name in list(kwargs) if name in _ALIGNMENT_FIELDS}
        model_class = cls.aligned_class(_causal_lm_class_for(config))
        model = model_class._from_config(config, **kwargs)
        model.configure_alignment(**settings)
        return model

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *model_args, **kwargs
    ) -> PreTrainedModel:
        """Loads any causal-LM checkpoint (plain or aligned) as an aligned causal LM.

        Keyword arguments named like [`CausalAlignment`] fields override the settings the checkpoint records (or the
        defaults); the others go to the family's `from_pretrained` (`dtype`, `revision`, `attn_implementation`, ...),
        config attributes among them (`use_cache=False`, `resid_pdrop=0.0`) overriding the checkpoint's config as
        `AutoModelForCausalLM` applies them.
        """
        settings = {name: kwargs.pop(name) for name in list(kwargs) if name in _ALIGNMENT_FIELDS}
        if cls is AlignedForCausalLM:
            config = kwargs.get("config")
            if not isinstance(config, PreTrainedConfig):
                hub_kwargs = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
                config = AutoConfig.from_pretrained(config or pretrained_model_name_or_path, **hub_kwargs)
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
        self.alignment.resolved_weights(self.num_layers)

    def configure_alignment(self, **settings) -> CausalAlignment:
        """Sets [`CausalAlignment`] fields (validated first, so a bad value changes nothing) and records them in
        `config.aligned_training`.

        Raises:
            TypeError: for a keyword that is not a `CausalAlignment` field.
            ValueError: for a value that does not fit the model.
        """
        unknown = sorted(set(settings) - _ALIGNMENT_FIELDS)
        if unknown:
            raise TypeError(f"configure_alignment() got unknown settings {unknown}; use {sorted(_ALIGNMENT_FIELDS)}.")
        alignment = CausalAlignment(**{**self.alignment.to_dict(), **settings})
        if alignment.aligned_layers is not None:
            alignment.aligned_layers = sorted(set(alignment.aligned_layers))
        if not isinstance(alignment.layer_weights, str):
            alignment.layer_weights = [float(weight) for weight in alignment.layer_weights]
        alignment.resolved_weights(self.num_layers)
        setattr(self.config, ALIGNED_TRAINING_KEY, alignment.to_dict())
        return alignment

    @property
    def alignment(self) -> CausalAlignment:
        """The aligned-training settings recorded in the config (defaults when the checkpoint records none)."""
        return CausalAlignment.from_dict(getattr(self.config, ALIGNED_TRAINING_KEY, None))

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

        With `push_to_hub=True` (and `repo_id`, `commit_message`, `create_pr` and `create_repo` options, as for
        transformers), the directory is uploaded after `config.json` names the plain class, never before.
        """
        saved_names = set(inspect.signature(PreTrainedModel.save_pretrained).parameters)
        push = push_to_hub and self.should_save_on_this_rank(is_main_process)
        if push:
            repo_id = kwargs.pop("repo_id", os.fspath(save_directory).split(os.path.sep)[-1])
            commit_message = kwargs.pop("commit_message", None)
            create_pr = kwargs.pop("create_pr", False)
            repo_options = {name: kwargs.pop(name) for name in list(kwargs) if name not in saved_names}
            repo_id = hf_api().create_repo(repo_id, exist_ok=True, token=kwargs.get("token"), **repo_options).repo_id
            os.makedirs(save_directory, exist_ok=True)
            files_timestamps = self._get_files_timestamps(save_directory)
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
        if push:
            card = create_and_tag_model_card(repo_id, self.model_tags, token=kwargs.get("token"))
            card.save(os.path.join(save_directory, "README.md"))
            self._upload_modified_files(
                save_directory,
                repo_id,
                files_timestamps,
                commit_message=commit_message,
                token=kwargs.get("token"),
                create_pr=create_pr,
            )

    # -- the aligned loss ---------------------------------------------------------------------------------------

    def forward(self, labels=None, **kwargs):
        """The family's forward; with `labels`, the aligned loss over every block (see the class docstring).

        Each aligned class gets a `forward` with its family's exact signature (same parameters, order and defaults)
        that binds its arguments by that signature and calls this one by name (see `_forward_of`): transformers and
        Trainer read `inspect.signature(model.forward)` to pass `position_ids` and `logits_to_keep` in generation and
        to keep dataset columns.
        """
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
        logits = self._head(outputs.last_hidden_state)
        targets = shifted_labels(labels.to(logits.device))
        counted = (targets != -100).sum().clamp(min=1)
        weights = self._step_weights()
        last_loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum") / counted
        layer_losses = [torch.full_like(last_loss, float("nan")) for _ in range(self.num_layers)]
        layer_losses[-1] = last_loss
        agreement = sample_sums = None
        computed = torch.ones(self.num_layers, dtype=torch.bool, device=last_loss.device)
        if torch.is_grad_enabled():
            computed[:-1] = False
            for layer in weights:
                if layer < self.num_layers:
                    layer_losses[layer - 1] = self._chunked_loss(captured.outputs[layer - 1], targets) / counted
                    computed[layer - 1] = True
        else:
            sample_sums = self._sample_statistics(logits, captured.outputs, targets)
            layer_losses[:-1] = list(sample_sums[:, :-1, 0].sum(dim=0) / counted)
            agreement = sample_sums[:, :, 1].sum(dim=0) / counted
        layer_losses = torch.stack(layer_losses)
        loss = sum(weight * layer_losses[layer - 1] for layer, weight in weights.items())
        output = AlignedCausalLMOutput(
            loss=loss,
            logits=logits,
            layer_losses=layer_losses,
            layer_agreement=agreement,
            layer_computed=computed,
            layer_sample_sums=sample_sums,
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )
        return output if return_dict else output.to_tuple()

    def _step_weights(self) -> dict[int, float]:
        """This step's weight of every layer with a loss: the configured λ_l, or, when `layers_per_step` draws a
        subset of the earlier layers in training, the drawn layers' λ_l times (candidates / drawn)."""
        alignment = self.alignment
        weights = alignment.resolved_weights(self.num_layers)
        chosen = {layer: weight for layer, weight in enumerate(weights, start=1) if weight > 0}
        earlier = [layer for layer in chosen if layer < self.num_layers]
        drawn = alignment.layers_per_step
        if drawn is None or drawn >= len(earlier) or not (self.training and torch.is_grad_enabled()):
            return chosen
        picked = [earlier[index] for index in torch.randperm(len(earlier))[:drawn].tolist()]
        scale = len(earlier) / drawn
        step = {layer: chosen[layer] * scale for layer in picked}
        if self.num_layers in chosen:
            step[self.num_layers] = chosen[self.num_layers]
        return step

    def _head(self, normed: torch.Tensor) -> torch.Tensor:
        """The LM head and the family's own scaling or soft-capping of the logits (its [`CausalLMHead`])."""
        return self.aligned_head(self.get_output_embeddings()(normed), self.config)

    def layer_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Next-token logits of a block's output hidden states: the model's own final norm, then its LM head."""
        norm = getattr(self, self.base_model_prefix).get_submodule(self.aligned_layout.final_norm)
        return self._head(norm(hidden_states))

    def _chunk_loss_sum(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.layer_logits(hidden)
        return F.cross_entropy(logits.float(), targets, reduction="sum")

    def _chunks(self, hidden: torch.Tensor, targets: torch.Tensor):
        size = self.alignment.loss_chunk_size
        hidden, targets = hidden.flatten(0, 1), targets.flatten()
        for start in range(0, targets.shape[0], size):
            yield start, hidden[start : start + size], targets[start : start + size]

    def _chunked_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of one block's output, chunk by chunk; each chunk's logits are recomputed in the
        backward pass instead of being kept."""
        total = hidden.new_zeros((), dtype=torch.float32)
        for _, chunk, chunk_targets in self._chunks(hidden, targets):
            total = total + checkpoint(self._chunk_loss_sum, chunk, chunk_targets, use_reentrant=False)
        return total

    def _sample_statistics(
        self, logits: torch.Tensor, block_outputs: list[torch.Tensor], targets: torch.Tensor
    ) -> torch.Tensor:
        """Per sample and block `(batch, num_layers, 2)`: summed next-token cross-entropy, and the number of counted
        tokens whose top-1 equals the last block's (the last block's count is its number of counted tokens)."""
        top_last = logits.argmax(dim=-1)
        last = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        rows = [
            self._chunked_statistics(block_outputs[layer], targets, top_last) for layer in range(self.num_layers - 1)
        ]
        rows.append(torch.stack([last.view_as(targets).sum(dim=1), (targets != -100).sum(dim=1).float()], dim=-1))
        return torch.stack(rows, dim=1)

    def _chunked_statistics(self, hidden: torch.Tensor, targets: torch.Tensor, top_last: torch.Tensor) -> torch.Tensor:
        """Per sample `(batch, 2)`: summed cross-entropy and number of counted tokens whose top-1 equals `top_last`,
        for one block (per-sample sums let a distributed evaluation drop the samples it repeated to even batches)."""
        per_token = hidden.new_zeros((targets.numel(), 2), dtype=torch.float32)
        top_last = top_last.flatten()
        for start, chunk, chunk_targets in self._chunks(hidden, targets):
            logits = self.layer_logits(chunk)
            end = start + len(chunk_targets)
            per_token[start:end, 0] = F.cross_entropy(logits.float(), chunk_targets, reduction="none")
            per_token[start:end, 1] = (logits.argmax(dim=-1) == top_last[start:end]) & (chunk_targets != -100)
        return per_token.view(*targets.shape, 2).sum(dim=1)

    # -- self-speculative decoding ------------------------------------------------------------------------------

    def early_exit_draft(self, num_layers: int) -> PreTrainedModel:
        """A view of this model with only its first `num_layers` blocks, sharing every weight: the draft model of
        self-speculative decoding. Nothing of this model changes, so calls in other threads are unaffected.

        Raises:
            ValueError: if `num_layers` is not between 1 and L - 1.
        """
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers < self.num_layers:
            raise ValueError(
                f"`assistant_early_exit={num_layers!r}` must be an integer between 1 and {self.num_layers - 1} (the "
                "draft runs that many of the model's blocks)."
            )
        config = copy.deepcopy(self.config)
        config.num_hidden_layers = num_layers
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:num_layers]
        draft = _shallow_copy(self)
        draft.config = config
        draft.generation_config = copy.deepcopy(self.generation_config)
        module = draft
        path = [self.base_model_prefix, *self.aligned_layout.blocks.split(".")]
        for name in path[:-1]:
            child = _shallow_copy(module._modules[name])
            if getattr(child, "config", None) is self.config:
                child.config = config
            module._modules[name] = child
            module = child
        module._modules[path[-1]] = nn.ModuleList(list(self.aligned_blocks)[:num_layers])
        return draft

    def generate(self, *args, assistant_early_exit: int | None = None, **kwargs):
        """transformers' `generate`; with `assistant_early_exit=k` (or a generation config that sets it), the first
        k blocks draft tokens and the full model verifies them (assisted generation with [`early_exit_draft`]), for
        every family, GPT-2 included. Greedy output equals plain greedy decoding (in eval mode: in train mode dropout
        changes every forward, and a warning says so).

        The draft's settings `num_assistant_tokens`, `num_assistant_tokens_schedule` and
        `assistant_confidence_threshold` come from this call (keywords or `generation_config`), else from the model's
        generation config, else transformers' defaults (20 tokens, constant, a draft stops below confidence 0.4).

        Raises:
            ValueError: for a `k` outside [1, L - 1], or together with an `assistant_model`.
        """
        if self.training:
            logger.warning_once(
                "generate runs in train mode: dropout is active, so outputs change from call to call and "
                "`assistant_early_exit` no longer reproduces plain greedy decoding. `from_config` leaves a model in "
                "train mode (as in transformers): call `model.eval()` before generating."
            )
        source = kwargs.get("generation_config") or self.generation_config
        if assistant_early_exit is None:
            assistant_early_exit = getattr(source, "assistant_early_exit", None)
        if assistant_early_exit is None:
            return super().generate(*args, **kwargs)
        if kwargs.get("assistant_model") is not None:
            raise ValueError("Pass either `assistant_early_exit` or `assistant_model`, not both.")
        if getattr(source, "assistant_early_exit", None) is not None:
            # transformers would draft with its own early exit too: the draft below replaces it.
            kwargs["generation_config"] = copy.deepcopy(source)
            kwargs["generation_config"].assistant_early_exit = None
        draft = self.early_exit_draft(assistant_early_exit)
        for name in DRAFT_SETTINGS:
            value = kwargs.pop(name, None)
            value = value if value is not None else getattr(source, name, None)
            if value is not None:
                setattr(draft.generation_config, name, value)
        return super().generate(*args, assistant_model=draft, **kwargs)


# Generation settings of the draft (transformers reads them from the assistant model's generation config).
DRAFT_SETTINGS = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")
_ALIGNMENT_FIELDS = frozenset(item.name for item in fields(CausalAlignment))


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


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets `(batch, seq)`: position t is scored on `labels[t + 1]`, the last position on nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object sharing `module`'s parameters, buffers and hooks, with its own table of submodules."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    return clone


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


@dataclass(frozen=True)
class SpeculationEstimate:
    """A draft depth for self-speculative decoding and what a simple cost model expects of it.

    Attributes:
        assistant_early_exit: the number of blocks k the draft runs.
        num_assistant_tokens: the draft length g the estimate assumes.
        expected_speedup: expected tokens per full-model-equivalent of compute, relative to plain decoding.
        acceptance: the agreement of block k with the last block that the estimate used.
    """

    assistant_early_exit: int
    num_assistant_tokens: int
    expected_speedup: float
    acceptance: float


def suggest_assistant_early_exit(
    layer_agreement: Sequence[float], max_assistant_tokens: int = 16, draft_overhead: float = 0.0
) -> SpeculationEstimate | None:
    """Picks the draft depth k that a speculative-decoding cost model expects to be fastest.

    With acceptance a_k (block k's top-1 agreement with the last block, e.g. `eval_layer_{k}_agreement`), a draft of
    g tokens yields (1 - a^(g+1)) / (1 - a) tokens per round and costs g · c_k + 1 full forwards, where
    c_k = k / L + `draft_overhead` is a draft step's cost relative to a full step (blocks dominate the compute).

    Args:
        layer_agreement: one agreement per block, block 1 first (the last is 1).
        max_assistant_tokens: the longest draft considered.
        draft_overhead: per-step draft cost not proportional to depth (embedding, head, framework), as a fraction of
            a full step.

    Returns:
        The fastest draft, or `None` when no draft is expected to beat plain decoding (best speed-up <= 1): decode
        without `assistant_early_exit` then.

    Raises:
        ValueError: for fewer than 2 layers, agreements outside [0, 1], a `max_assistant_tokens` that is not a
            positive integer or a negative `draft_overhead`.
    """
    agreement = [float(value) for value in layer_agreement]
    if len(agreement) < 2 or any(not 0.0 <= value <= 1.0 for value in agreement):
        raise ValueError(f"`layer_agreement` needs one value in [0, 1] per block (at least 2), got {agreement}.")
    if isinstance(max_assistant_tokens, bool) or not isinstance(max_assistant_tokens, int) or max_assistant_tokens < 1:
        raise ValueError(f"`max_assistant_tokens={max_assistant_tokens!r}` must be a positive integer (default 16).")
    if not 0.0 <= draft_overhead < float("inf"):
        raise ValueError(
            f"`draft_overhead={draft_overhead!r}` must be a finite non-negative fraction of a full step (default 0)."
        )
    num_layers = len(agreement)
    best = None
    for layer, alpha in enumerate(agreement[:-1], start=1):
        cost = layer / num_layers + draft_overhead
        for tokens in range(1, max_assistant_tokens + 1):
            produced = tokens + 1 if alpha >= 1.0 else (1 - alpha ** (tokens + 1)) / (1 - alpha)
            speedup = produced / (tokens * cost + 1)
            if best is None or speedup > best.expected_speedup:
                best = SpeculationEstimate(layer, tokens, speedup, alpha)
    return best if best.expected_speedup > 1.0 else None
