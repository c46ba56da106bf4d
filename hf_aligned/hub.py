"""Sharing aligned checkpoints on the Hugging Face Hub: one commit with the weights, configs, processor, plots and card.

`push_aligned_model` uploads a saved directory; `push_model` (behind `AlignedForSequenceClassification.push_to_hub`)
saves a model first. Both go through `huggingface_hub.HfApi` (`create_repo`, then one `create_commit`), so
`HF_ENDPOINT`, `HF_TOKEN` and `huggingface_hub.set_client_factory` (e.g. for a timeout) apply as usual. A failed
push raises [`HubPushError`] naming the repository and the cause; nothing local is changed by a push.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi
from huggingface_hub.errors import HFValidationError, HTTPError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel
from transformers.utils import CONFIG_NAME

from .alignment import ALIGNED_TRAINING_KEY
from .card_data import LIBRARY_NAME, MODEL_CARD_NAME, AlignedModelCardData
from .configuration_aligned import AlignedConfig
from .model_card import build_model_card
from .sharing import register_hub_pusher

# Files and folders never pushed from a training directory (as in `Trainer.push_to_hub`): intermediate checkpoints,
# private (`_*`) and hidden (`.*`) entries.
SKIPPED_PREFIXES = ("checkpoint-", "_", ".")


class HubPushError(RuntimeError):
    """A push to the Hub failed (HTTP error, connection error, timeout); the local files are untouched."""


def push_aligned_model(
    model_dir: str | os.PathLike,
    repo_id: str,
    *,
    card_data: AlignedModelCardData | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
) -> CommitInfo:
    """Uploads a saved aligned model directory to the Hub in one commit.

    Everything `save_pretrained` / `Trainer.save_model` wrote is uploaded (config, weights, `exit_config.json`,
    tokenizer or processor files, metrics, plots), except intermediate `checkpoint-*` folders and `_*` / `.*`
    entries. The model card: with `card_data`, a fresh card rendered from it (unset fields are read from the
    directory); otherwise the directory's `README.md` as it is, or, if there is none, a card generated from the
    directory's config, metrics, exit rule and plots. The card is uploaded, never written into `model_dir`.

    Args:
        model_dir: a directory written by `save_pretrained` (it must hold `config.json`).
        repo_id: the Hub repository, `"namespace/name"`; created if it does not exist.
        card_data: what the card shows (see [`AlignedModelCardData`]); `model_id` defaults to `repo_id`.
        private: whether a newly created repository is private (`None`: the namespace's default).
        token: the Hub token; defaults to `HF_TOKEN` or the token saved by `hf auth login`.
        revision: the branch to commit to (created from the default branch if missing).
        commit_message: defaults to `"Upload aligned model"`.
        commit_description: an optional longer description.
        create_pr: open a pull request instead of committing to the branch.

    Returns:
        The `huggingface_hub.CommitInfo` of the commit (`commit_url`, `oid`, `pr_url`).

    Raises:
        ValueError: if `model_dir` holds no saved model or `repo_id` is not a valid repository id.
        HubPushError: if the Hub cannot be reached, times out or answers with an error.
    """
    model_dir = Path(model_dir)
    if not (model_dir / CONFIG_NAME).is_file():
        raise ValueError(
            f"`model_dir={str(model_dir)!r}` holds no {CONFIG_NAME}; pass a directory written by `save_pretrained` "
            "or `Trainer.save_model`."
        )
    _check_repo_id(repo_id)
    return _commit_directory(
        model_dir,
        repo_id,
        card=_directory_card(model_dir, repo_id, card_data),
        private=private,
        token=token,
        revision=revision,
        commit_message=commit_message or "Upload aligned model",
        commit_description=commit_description,
        create_pr=create_pr,
    )


def push_model(
    model: PreTrainedModel,
    repo_id: str,
    *,
    processing_class=None,
    card_data: AlignedModelCardData | None = None,
    plots: Sequence[str | os.PathLike] | None = None,
    tags: Sequence[str] | None = None,
    max_shard_size: int | str | None = "50GB",
    **push_kwargs,
) -> CommitInfo:
    """Saves an aligned model (and its processor and plots) and pushes it with its model card in one commit.

    This is what `AlignedForSequenceClassification.push_to_hub` runs: unlike transformers' generic push, the card
    is hf_aligned's (per-layer results, exit trade-off, usage), not a placeholder.

    Args:
        model: the aligned model; its `exit_config`, when set, is saved and shown on the card.
        repo_id: the Hub repository, `"namespace/name"`; created if it does not exist.
        processing_class: a tokenizer, image processor or processor saved alongside the model.
        card_data: what the card shows (see [`AlignedModelCardData`]); `model_id` defaults to `repo_id`.
        plots: image files uploaded to `plots/` and shown on the card.
        tags: extra Hub tags (the model's `model_tags` are added too).
        max_shard_size: passed to `save_pretrained`.
        push_kwargs: `private`, `token`, `revision`, `commit_message`, `commit_description`, `create_pr`; see
            [`push_aligned_model`].

    Returns:
        The `huggingface_hub.CommitInfo` of the commit.

    Raises:
        ValueError: if `repo_id` is invalid or a plot file does not exist.
        HubPushError: if the Hub cannot be reached, times out or answers with an error.
    """
    _check_repo_id(repo_id)
    plots = [Path(plot) for plot in plots or ()]
    missing = [str(plot) for plot in plots if not plot.is_file()]
    if missing:
        raise ValueError(f"`plots` names files that do not exist: {missing}.")
    card_data = card_data or AlignedModelCardData()
    all_tags = [*(card_data.tags or []), *(tags or []), *(getattr(model, "model_tags", None) or [])]
    card_data = dataclasses.replace(card_data, model_id=card_data.model_id or repo_id, tags=all_tags or None)
    push_kwargs["commit_message"] = push_kwargs.get("commit_message") or f"Upload {type(model).__name__}"
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        if processing_class is not None:
            processing_class.save_pretrained(folder)
        if plots:
            os.makedirs(Path(folder) / "plots")
            for plot in plots:
                shutil.copyfile(plot, Path(folder) / "plots" / plot.name)
        build_model_card(model, card_data.fill_from_directory(folder)).save(Path(folder) / MODEL_CARD_NAME)
        return push_aligned_model(folder, repo_id, **push_kwargs)


def _directory_card(model_dir: Path, repo_id: str, card_data: AlignedModelCardData | None) -> str | None:
    """The card a directory push uploads: rendered from `card_data` (unset fields read from the directory) or, when
    the directory has no card, from its files alone; `None` keeps the directory's own `README.md`."""
    if card_data is None and (model_dir / MODEL_CARD_NAME).is_file():
        return None
    card_data = card_data or AlignedModelCardData()
    if card_data.model_id is None:
        card_data = dataclasses.replace(card_data, model_id=repo_id)
    return str(build_model_card(_aligned_config(model_dir), card_data.fill_from_directory(model_dir)))


def _check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"`repo_id={repo_id!r}` is not a valid Hub repository id (namespace/name): {error}") from None


def _aligned_config(model_dir: Path) -> PreTrainedConfig:
    """The config of a saved aligned model of either kind (an `AlignedConfig`, or a causal LM's plain config that
    records `aligned_training`).

    Raises:
        ValueError: for a directory of any other model.
    """
    config_dict, _ = AlignedConfig.get_config_dict(model_dir)
    if config_dict.get("model_type") == AlignedConfig.model_type:
        return AlignedConfig.from_dict(config_dict)
    if ALIGNED_TRAINING_KEY in config_dict:
        return AutoConfig.from_pretrained(model_dir)
    raise ValueError(
        f"`model_dir={str(model_dir)!r}` holds a {config_dict.get('model_type')!r} model, not an aligned one, so "
        f"hf_aligned cannot write its card; add a {MODEL_CARD_NAME} or push it with `huggingface_hub` directly."
    )


def _files_to_push(folder: Path) -> list[tuple[str, Path]]:
    """`(path in repo, local path)` of every file under `folder`, skipping checkpoints, private and hidden entries."""
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(SKIPPED_PREFIXES) for part in relative.parts):
            files.append((relative.as_posix(), path))
    return files


def _commit_directory(
    folder: Path,
    repo_id: str,
    *,
    card: str | None,
    private: bool | None,
    token: bool | str | None,
    revision: str | None,
    commit_message: str,
    commit_description: str | None,
    create_pr: bool,
) -> CommitInfo:
    """Creates the repository if needed and commits the files of `folder` (with `card` as README.md) at once."""
    operations = [
        CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=str(path))
        for path_in_repo, path in _files_to_push(folder)
        if card is None or path_in_repo != MODEL_CARD_NAME
    ]
    if card is not None:
        operations.append(CommitOperationAdd(path_in_repo=MODEL_CARD_NAME, path_or_fileobj=card.encode("utf-8")))
    from . import __version__

    api = HfApi(token=token, library_name=LIBRARY_NAME, library_version=__version__)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message,
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )
    except (HTTPError, OSError) as error:
        raise HubPushError(
            f"Pushing to the Hub repository {repo_id!r} at {api.endpoint} failed: "
            f"{type(error).__name__}: {error}. Nothing local was changed; fix the cause and push again."
        ) from error


register_hub_pusher(push_model, push_aligned_model)
