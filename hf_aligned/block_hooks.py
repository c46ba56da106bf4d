"""Per-call observers of a base model's blocks, safe when one model serves several threads at once.

Reading every block's output (the full forward) and shrinking the batch between blocks (early exit) both need code
that runs around each block. Hooks registered per call would be shared state: two threads calling the same model
would each see the other's hooks. Instead [`install_block_hooks`] registers two hooks on every block once, when the
model is built, and each call activates its own [`BlockObserver`] in a `contextvars.ContextVar`. Every thread has its
own context, so a call only ever sees its own observer; with no observer active (a plain call of the base model, a
backward pass recomputing checkpointed blocks) the hooks do nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from torch import nn

_ACTIVE_OBSERVER: ContextVar[BlockObserver | None] = ContextVar("hf_aligned_block_observer", default=None)


class BlockObserver:
    """What one call does around the blocks of one model. Blocks of any other model are left alone.

    Args:
        blocks: the blocks this call watches, block 1 first.
    """

    def __init__(self, blocks: Sequence[nn.Module]):
        self._layers = {id(block): layer for layer, block in enumerate(blocks, start=1)}

    def before_block(self, layer: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Runs before 1-based block `layer`; may return replacement `(args, kwargs)`."""
        return None

    def after_block(self, layer: int, output: Any) -> Any:
        """Runs after 1-based block `layer`; may return a replacement output."""
        return None


def _before_block(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    observer = _ACTIVE_OBSERVER.get()
    if observer is None:
        return None
    layer = observer._layers.get(id(module))
    return None if layer is None else observer.before_block(layer, args, kwargs)


def _after_block(module: nn.Module, args: tuple, output: Any) -> Any:
    observer = _ACTIVE_OBSERVER.get()
    if observer is None:
        return None
    layer = observer._layers.get(id(module))
    return None if layer is None else observer.after_block(layer, output)


def install_block_hooks(blocks: Sequence[nn.Module]) -> None:
    """Registers the observer hooks on every block, once (blocks that already have them are skipped).

    The hooks are module-level functions, so copies of the model (`copy.deepcopy`, `truncate`) and pickles keep them.
    """
    for block in blocks:
        if _before_block not in block._forward_pre_hooks.values():
            block.register_forward_pre_hook(_before_block, with_kwargs=True)
        if _after_block not in block._forward_hooks.values():
            block.register_forward_hook(_after_block)


@contextmanager
def observe_blocks(observer: BlockObserver) -> Iterator[BlockObserver]:
    """Makes `observer` the current call's observer (in this thread's context) for the duration of the block."""
    token = _ACTIVE_OBSERVER.set(observer)
    try:
        yield observer
    finally:
        _ACTIVE_OBSERVER.reset(token)


class BlockOutputs(BlockObserver):
    """Collects the hidden states leaving every block (and, optionally, entering the first), block 1 first."""

    def __init__(self, blocks: Sequence[nn.Module], include_embeddings: bool = False):
        super().__init__(blocks)
        self.include_embeddings = include_embeddings
        self.outputs: list[Any] = [None] * (len(blocks) + include_embeddings)

    def before_block(self, layer: int, args: tuple, kwargs: dict) -> None:
        if self.include_embeddings and layer == 1:
            self.outputs[0] = args[0] if args else kwargs["hidden_states"]

    def after_block(self, layer: int, output: Any) -> None:
        self.outputs[layer - 1 + self.include_embeddings] = output[0] if isinstance(output, tuple) else output
