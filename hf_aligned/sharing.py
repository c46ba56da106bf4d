"""`push_to_hub` for both aligned models, through the one uploader that `hf_aligned.hub` registers.

The models never import the Hub code (it imports the models, to save them and render their cards): `hf_aligned.hub`
calls [`register_hub_pusher`] when the package is imported, and both model classes take [`push_to_hub`] and
[`push_saved`] from here (as methods), which hand every push to what it registered; so `model.push_to_hub(...)` and
`save_pretrained(..., push_to_hub=True)` of either model take the same path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

# The arguments `save_pretrained(..., push_to_hub=True)` takes for the push, as transformers' does.
PUSH_OPTIONS = ("repo_id", "commit_message", "commit_description", "private", "revision", "create_pr")


# `pushers["model"](model, repo_id, **options)` saves and uploads a model; `pushers["directory"](folder, repo_id,
# **options)` uploads a saved folder. Both set by `hf_aligned.hub` through `register_hub_pusher`.
_PUSHERS: dict[str, Callable[..., Any]] = {}


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
    return _registered("model")(
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


def push_saved(self, save_directory: str | os.PathLike, options: dict[str, Any], token: bool | str | None):
    """Uploads what `save_pretrained` just wrote into `save_directory`, with hf_aligned's card (the push of
    `save_pretrained(..., push_to_hub=True)`); `options` are the `PUSH_OPTIONS` of that call."""
    options = dict(options)
    repo_id = options.pop("repo_id", None) or os.fspath(save_directory).rstrip(os.path.sep).split(os.path.sep)[-1]
    return _registered("directory")(save_directory, repo_id, token=token, **options)


def push_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Takes the `PUSH_OPTIONS` out of `save_pretrained`'s keyword arguments."""
    return {name: kwargs.pop(name) for name in PUSH_OPTIONS if name in kwargs}


def register_hub_pusher(pusher: Callable[..., Any], directory_pusher: Callable[..., Any] | None = None) -> None:
    """Sets how aligned models upload: `pusher(model, repo_id, **push_kwargs)` saves and pushes a model,
    `directory_pusher(folder, repo_id, **push_kwargs)` pushes a saved folder; both return a CommitInfo."""
    _PUSHERS["model"] = pusher
    if directory_pusher is not None:
        _PUSHERS["directory"] = directory_pusher


def _registered(name: str) -> Callable[..., Any]:
    pusher = _PUSHERS.get(name)
    if pusher is None:
        raise RuntimeError("No Hub uploader is registered: import `hf_aligned` (the package), not the module alone.")
    return pusher
