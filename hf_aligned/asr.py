"""ASR, attention-alike structural re-parameterization (Zhong et al., arXiv 2304.06345), for transformer blocks.

ASR is channel attention whose input is a learned constant vector instead of the features: a small MLP maps the
vector to one scale per channel, so at inference the scale is a constant and folds exactly into the linear layer
that precedes it. Here it scales the output of every block's attention and MLP branches (their output projections)
before the residual add. Training sees the extra parameters; after [`fold_asr`] the model is the plain architecture
again, with the scale multiplied into the projections' weight rows and biases, and costs nothing at inference.

The scale is `2 * sigmoid(MLP(v))` with the MLP's last layer initialized to zero, so a freshly added ASR multiplies
by exactly 1: a pretrained model starts from its own function (the paper's scale is `sigmoid(...)`, in (0, 1); the
factor 2 centres the same sigmoid on the identity).

Each scaled projection holds its [`ASRScale`] as a child module named `asr` and one forward hook, a module-level
function that keeps no per-call state, so one model may serve several threads and survives `copy.deepcopy`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from .backbones import find_layout
from .compat import Conv1D
from .layouts import BRANCH_OUTPUTS

__all__ = ["ASRScale", "add_asr", "asr_folded_state_dict", "asr_scales", "fold_asr", "has_asr", "reset_asr"]

ASR_NAME = "asr"


class ASRScale(nn.Module):
    """One constant per-channel scale, `2 * sigmoid(fc2(relu(fc1(v))))`, from a learned input vector `v`.

    Args:
        channels: the number of output channels scaled (the projection's output size).
        reduction: the MLP's hidden size is `max(1, channels // reduction)`, as in squeeze-and-excitation.
    """

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.input = nn.Parameter(torch.randn(channels))
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self) -> torch.Tensor:
        return 2.0 * torch.sigmoid(self.fc2(torch.relu(self.fc1(self.input))))


def _scale_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    """The forward hook of a scaled projection: its output times its ASR scale (nothing once folded)."""
    scale = getattr(module, ASR_NAME, None)
    return None if scale is None else output * scale().to(output.dtype)


def add_asr(
    model: nn.Module, branch_outputs: Sequence[str] | None = None, reduction: int = 4, seed: int | None = None
) -> nn.Module:
    """Puts an ASR scale on the output of every block's attention and MLP branches, in place.

    Works on any model holding a backbone of a family in `layouts.BRANCH_OUTPUTS`: a plain `AutoModel`, a causal LM
    (`GPT2LMHeadModel`, `LlamaForCausalLM`, ...) or an aligned model. Call it before the trainer builds its optimizer,
    so the ASR parameters train; call [`fold_asr`] (or train with `fold_asr_on_save=True`) to get the plain model back.

    Args:
        model: the model to change.
        branch_outputs: paths, relative to each block, of the linear layers whose outputs are scaled; `None` takes
            them from the table for the backbone's model type (attention output projection, MLP output projection).
        reduction: the ASR MLP's hidden size is the channel count divided by this.
        seed: seeds the ASR input vectors and first layers (default: the global random state).

    Returns:
        `model`, changed in place.

    Raises:
        ValueError: when the model has ASR already, its model type has no table entry and no `branch_outputs` is
            given, a path is missing from a block, or `reduction` is not a positive integer.
        TypeError: when a path leads to a module that is not a linear layer (`nn.Linear` or GPT-2's `Conv1D`).
    """
    if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
        raise ValueError(f"`reduction={reduction!r}` must be a positive integer (default 4).")
    if has_asr(model):
        raise ValueError("This model has ASR scales already; `fold_asr(model)` first to add new ones.")
    projections = list(_branch_projections(model, branch_outputs))
    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for projection in projections:
            weight = projection.weight
            scale = ASRScale(_out_features(projection), reduction).to(device=weight.device, dtype=weight.dtype)
            projection.add_module(ASR_NAME, scale)
            projection.register_forward_hook(_scale_output)
    return model


def has_asr(model: nn.Module) -> bool:
    """Whether any module of `model` carries an ASR scale that [`fold_asr`] has not folded yet."""
    return any(isinstance(module, ASRScale) for module in model.modules())


@torch.no_grad()
def asr_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """The current per-channel scale of every ASR-scaled projection, by the projection's name in `model`."""
    return {name: getattr(projection, ASR_NAME)().detach() for name, projection in _scaled_projections(model)}


def _scaled_projections(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(getattr(module, ASR_NAME, None), ASRScale):
            yield name, module


@torch.no_grad()
def _folded(projection: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None):
    """A projection's weight and bias with its ASR scale multiplied in (GPT-2's `Conv1D` stores `(in, out)`)."""
    scale = getattr(projection, ASR_NAME)().to(device=weight.device, dtype=torch.float32)
    rows = scale[None, :] if isinstance(projection, Conv1D) else scale[:, None]
    folded_weight = (weight.float() * rows).to(weight.dtype)
    folded_bias = None if bias is None else (bias.float() * scale.to(bias.device)).to(bias.dtype)
    return folded_weight, folded_bias


def fold_asr(model: nn.Module) -> nn.Module:
    """Multiplies every ASR scale into its projection's weight rows and bias and removes the ASR modules, in place.

    The folded model computes what the model with ASR computed (up to float rounding) with the plain architecture:
    its `save_pretrained` checkpoint loads with plain transformers.

    Returns:
        `model`, changed in place.

    Raises:
        ValueError: when the model has no ASR scale to fold.
    """
    projections = list(_scaled_projections(model))
    if not projections:
        raise ValueError("This model has no ASR scales to fold; `add_asr(model)` adds them.")
    for _, projection in projections:
        weight, bias = _folded(projection, projection.weight, projection.bias)
        with torch.no_grad():
            projection.weight.copy_(weight)
            if bias is not None:
                projection.bias.copy_(bias)
        delattr(projection, ASR_NAME)
        for key, hook in list(projection._forward_hooks.items()):
            if hook is _scale_output:
                del projection._forward_hooks[key]
    return model


@torch.no_grad()
def reset_asr(model: nn.Module) -> nn.Module:
    """Sets every ASR scale of `model` to the identity, as a fresh ASR is (its MLP's last layer zero: the scale is
    2 · sigmoid(0) = 1), in place; the input vectors and first layers keep their values.

    Returns:
        `model`, changed in place.
    """
    for module in model.modules():
        if isinstance(module, ASRScale):
            nn.init.zeros_(module.fc2.weight)
            nn.init.zeros_(module.fc2.bias)
    return model


def asr_folded_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The state dict [`fold_asr`] would leave, without changing `model`: what a plain checkpoint of it holds.

    Args:
        model: a model with ASR scales (without any, the state dict is returned as it is).
        state_dict: the state dict to fold, keyed like `model.state_dict()` (default: the model's own).
    """
    folded = dict(model.state_dict() if state_dict is None else state_dict)
    for name, projection in _scaled_projections(model):
        prefix = f"{name}." if name else ""
        bias_key = f"{prefix}bias"
        weight, bias = _folded(projection, folded[f"{prefix}weight"], folded.get(bias_key))
        folded[f"{prefix}weight"] = weight
        if bias is not None:
            folded[bias_key] = bias
        for key in [key for key in folded if key.startswith(f"{prefix}{ASR_NAME}.")]:
            del folded[key]
    return folded


def _branch_projections(model: nn.Module, branch_outputs: Sequence[str] | None) -> Iterator[nn.Module]:
    """Every block's branch output projections, checked."""
    blocks, model_type = _blocks(model)
    if branch_outputs is None:
        if model_type not in BRANCH_OUTPUTS:
            raise ValueError(
                f"ASR does not know the branch output projections of model type {model_type!r}. Name each block's "
                "attention and MLP output projections (paths relative to a block) with "
                "`add_asr(model, branch_outputs=['attention.output.dense', 'output.dense'])`."
            )
        branch_outputs = BRANCH_OUTPUTS[model_type]
    elif isinstance(branch_outputs, str) or not branch_outputs:
        raise ValueError(
            f"`branch_outputs={branch_outputs!r}` must be a non-empty list of paths relative to a block, such as "
            "['attention.output.dense', 'output.dense']."
        )
    for layer, block in enumerate(blocks, start=1):
        for path in branch_outputs:
            try:
                projection = block.get_submodule(path)
            except AttributeError:
                raise ValueError(
                    f"`branch_outputs` names {path!r}, but block {layer} of this {model_type!r} model has no such "
                    f"module. Pass the paths of this model's output projections relative to a block."
                ) from None
            if not isinstance(projection, (nn.Linear, Conv1D)):
                raise TypeError(
                    f"`branch_outputs` names {path!r}, a {type(projection).__name__} in block {layer}; ASR folds "
                    "only into linear layers (`nn.Linear`, GPT-2's `Conv1D`)."
                )
            yield projection


def _blocks(model: nn.Module) -> tuple[nn.ModuleList, str]:
    """The model's blocks (an aligned model's own, else the layout's of its base model) and the backbone's type."""
    blocks = getattr(model, "blocks", None)
    base = getattr(model, "base_model", model)
    if isinstance(blocks, nn.ModuleList):
        return blocks, base.config.model_type
    return base.get_submodule(find_layout(base).blocks), base.config.model_type


def _out_features(projection: nn.Module) -> int:
    return projection.nf if isinstance(projection, Conv1D) else projection.out_features
