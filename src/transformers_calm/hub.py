"""Publishing: atomic `save_pretrained`, a model card in every saved checkpoint, and `push_to_hub` through the public
`huggingface_hub` API.

The features come as a mixin, [`CalmHubMixin`], that the model classes opt into rather than inherit in their modeling
files: `import transformers_calm` calls [`enable_hub_features`] on `CalmAutoencoderPreTrainedModel` and
`CalmPreTrainedModel`, which puts the mixin first among their bases. The modeling files import only torch,
transformers and their own configs, so a checkpoint saved for `trust_remote_code=True` carries `configuration_*.py`,
`modeling_*.py` and the model-code modules they import relatively (`compat.py`, `sampling.py`, ...), never this module
nor `model_card.py`: loading it where the package is not installed needs nothing but transformers. Classes loaded that
way are plain `PreTrainedModel`s (transformers' own `save_pretrained` and `push_to_hub`); the package's classes save
atomically and write cards.

Only public API is used: `PreTrainedModel.save_pretrained` (called without `push_to_hub`) and, for the upload,
`HfApi.create_repo`, `ModelCard.load`, `HfApi.create_branch` and `HfApi.create_commit` with `CommitOperationAdd`. No
private transformers method is overridden; the signatures used exist in transformers 5.10.4 to 5.24.
"""

import os
import re
import shutil
import tempfile

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError
from transformers import PreTrainedModel

from .model_card import create_model_card, merge_model_card

__all__ = ["CalmHubMixin", "enable_hub_features"]

# Weight files a previous save may have left in the destination (single file, shards, shard indexes).
_WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?")
CARD_NAME = "README.md"


class CalmHubMixin:
    """Mixin for a `PreTrainedModel` subclass (first among its bases, see [`enable_hub_features`]): a
    `save_pretrained` that never leaves a half-written checkpoint and writes a model card, and a `push_to_hub` that
    uploads that card.

    Everything is first written into a temporary directory beside the destination. A new destination is then renamed
    into place in one step; into an existing one (e.g. a Trainer `output_dir`) each file is moved with `os.replace`,
    so a crash never leaves a truncated file.

    When the class is registered for an Auto class (the package does it on import), the saved config gets an
    `auto_map` naming every Auto class of the class attribute `_auto_map_entries` (a dict Auto class -> `module.Class`),
    so that the directory also loads with `trust_remote_code=True` where this package is not installed (transformers
    alone writes only the saved class).

    The directory also gets a model card, `README.md` ([`~model_card.create_model_card`]), unless it already has one,
    so that it is a complete Hub repository; `push_to_hub` uploads that card too.
    """

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        state_dict: dict | None = None,
        push_to_hub: bool = False,
        *,
        model_card_kwargs: dict | None = None,
        repo_id: str | None = None,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        create_pr: bool = False,
        revision: str | None = None,
        **kwargs,
    ):
        """`PreTrainedModel.save_pretrained`, atomic, plus a `README.md` model card when the directory has none.

        Args:
            save_directory (`str` or `os.PathLike`):
                Directory to save into; created if needed. Files of an earlier save that this one replaces are
                replaced, stale weight files (e.g. shards, when this save writes one file) removed, other files kept.
            is_main_process (`bool`, *optional*, defaults to `True`):
                As in `PreTrainedModel.save_pretrained`; only the main process writes the card and uploads.
            state_dict (`dict`, *optional*):
                As in `PreTrainedModel.save_pretrained`: the weights to save instead of `self.state_dict()`.
            push_to_hub (`bool`, *optional*, defaults to `False`):
                Upload what this save writes (and the card) to the Hub repository `repo_id` after saving.
            model_card_kwargs (`dict`, *optional*):
                Arguments of [`~model_card.create_model_card`] for the card, e.g. `{"license": "apache-2.0",
                "datasets": ["monology/pile-uncopyrighted"], "results": {"brierlm": 5.72}}`.
            repo_id (`str`, *optional*):
                With `push_to_hub`: the Hub repository; defaults to the name of `save_directory`.
            commit_message (`str`, *optional*):
                With `push_to_hub`: the commit message; defaults to `"Upload <class name>"`.
            commit_description (`str`, *optional*):
                With `push_to_hub`: the description of the commit.
            private (`bool`, *optional*):
                With `push_to_hub`: whether a repository created by this call is private (the Hub's default if
                `None`); an existing repository keeps its visibility.
            token (`bool` or `str`, *optional*):
                With `push_to_hub`: the Hub token (default: the one of `hf auth login`).
            create_pr (`bool`, *optional*, defaults to `False`):
                With `push_to_hub`: open a pull request instead of committing to the branch.
            revision (`str`, *optional*):
                With `push_to_hub`: the branch to commit to (created if needed).
            kwargs:
                The other arguments of `PreTrainedModel.save_pretrained`, by keyword (`max_shard_size`, `variant`,
                ...).
        """
        hub = None
        if push_to_hub:
            hub = _upload_target(
                self,
                repo_id or os.path.basename(os.path.normpath(os.fspath(save_directory))),
                tags=None,
                commit_message=commit_message,
                commit_description=commit_description,
                private=private,
                token=token,
                create_pr=create_pr,
                revision=revision,
            )
        _save(
            self,
            super().save_pretrained,
            save_directory,
            is_main_process=is_main_process,
            model_card_kwargs=model_card_kwargs,
            hub=hub,
            state_dict=state_dict,
            **kwargs,
        )

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
        tags: list[str] | str | None = None,
        model_card_kwargs: dict | None = None,
    ):
        """Upload the model (weights, config, model code and its card, as `save_pretrained` writes them) to the Hub.

        The card is ours ([`~model_card.create_model_card`]) when the repository has none (or transformers' generic
        placeholder); a card the repository already has is kept, and only gets the metadata and tags it lacks
        ([`~model_card.merge_model_card`]).

        Args:
            repo_id (`str`):
                The Hub repository, e.g. `"my-org/my-calm"`; created if it does not exist.
            commit_message (`str`, *optional*):
                The commit message; defaults to `"Upload <class name>"`.
            commit_description (`str`, *optional*):
                The description of the commit.
            private (`bool`, *optional*):
                Whether a repository created by this call is private (the Hub's default if `None`); an existing
                repository keeps its visibility.
            token (`bool` or `str`, *optional*):
                The Hub token (default: the one of `hf auth login`).
            revision (`str`, *optional*):
                The branch to commit to (created if needed).
            create_pr (`bool`, *optional*, defaults to `False`):
                Open a pull request instead of committing to the branch.
            max_shard_size (`int` or `str`, *optional*, defaults to `"50GB"`):
                The largest weight file; bigger checkpoints are sharded (as in `save_pretrained`).
            tags (`list[str]` or `str`, *optional*):
                Tags for the card, added to the model's `model_tags` (as `PreTrainedModel.push_to_hub` does).
            model_card_kwargs (`dict`, *optional*):
                Arguments of [`~model_card.create_model_card`] for the card (`repo_id` defaults to this one).

        Returns:
            `huggingface_hub.CommitInfo`: the commit (or pull request) made.
        """
        hub = _upload_target(
            self,
            repo_id,
            tags=tags,
            commit_message=commit_message,
            commit_description=commit_description,
            private=private,
            token=token,
            create_pr=create_pr,
            revision=revision,
        )
        with tempfile.TemporaryDirectory() as tmp_dir:
            return _save(
                self,
                super().save_pretrained,
                tmp_dir,
                model_card_kwargs=model_card_kwargs,
                hub=hub,
                max_shard_size=max_shard_size,
            )


def _upload_target(model, repo_id: str, tags, **commit) -> dict:
    """What `_save` uploads to: the repository, the card's tags (the model's `model_tags`, then `tags` it lacks; a
    copy: `model_tags` is not changed) and the commit options (`commit_message`, `private`, `revision`, ...)."""
    merged_tags = list(getattr(model, "model_tags", None) or [])
    for tag in [tags] if isinstance(tags, str) else tags or []:
        if tag not in merged_tags:
            merged_tags.append(tag)
    return {"repo_id": repo_id, "tags": merged_tags, **commit}


def enable_hub_features(*model_classes: type) -> None:
    """Put [`CalmHubMixin`] first among the bases of each of `model_classes` (and so of their subclasses), unless it
    is there already.

    Args:
        model_classes (`type`):
            `PreTrainedModel` subclasses, e.g. the base classes of a model family.
    """
    for cls in model_classes:
        if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
            raise TypeError(f"{cls!r} is not a PreTrainedModel subclass.")
        if not issubclass(cls, CalmHubMixin):
            cls.__bases__ = (CalmHubMixin, *cls.__bases__)


def _save(model, parent_save, save_directory, *, is_main_process=True, model_card_kwargs=None, hub=None, **kwargs):
    """Save `model` atomically into `save_directory` with `parent_save` (`PreTrainedModel.save_pretrained`), with its
    card, then upload when `hub` (the push arguments) is given. Returns the commit of the upload, or `None`."""
    if os.path.isfile(save_directory):
        raise ValueError(f"save_directory {os.fspath(save_directory)!r} is a file; pass a directory.")
    save_directory = os.path.abspath(save_directory)
    if getattr(model, "_auto_class", None) is not None and getattr(model, "_auto_map_entries", None):
        model.config.auto_map = {**(getattr(model.config, "auto_map", None) or {}), **model._auto_map_entries}
    card_kwargs = dict(model_card_kwargs or {})
    push = hub is not None and is_main_process
    card = None
    if push:
        # Create the repository first (as transformers does): a missing login or permission fails before the save.
        repo_id = HfApi().create_repo(hub["repo_id"], private=hub["private"], token=hub["token"], exist_ok=True).repo_id
        card_kwargs = {"repo_id": repo_id, **card_kwargs}
        card_kwargs["tags"] = list(card_kwargs.get("tags") or [])
        card_kwargs["tags"] += [tag for tag in hub["tags"] if tag not in card_kwargs["tags"]]
        card = merge_model_card(_hub_model_card(repo_id, hub["token"]), create_model_card(model, **card_kwargs))
    elif is_main_process:
        if "repo_id" not in card_kwargs:
            card_kwargs.setdefault("model_name", os.path.basename(save_directory))
        card = create_model_card(model, **card_kwargs)
    written = _save_atomically(parent_save, save_directory, card, is_main_process=is_main_process, **kwargs)
    if not push:
        return None
    return _upload(model, save_directory, written, card, repo_id, hub)


def _save_atomically(parent_save, save_directory, card, **kwargs) -> list[str]:
    """`parent_save` into a temporary directory beside `save_directory`, plus `card` as README.md, then moved into
    place (see [`CalmHubMixin`]). Returns the paths written, relative to `save_directory`, with "/" separators."""
    parent = os.path.dirname(save_directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(save_directory)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the checkpoint should not be
    try:
        parent_save(tmp, **kwargs)
        if card is not None:
            card.save(os.path.join(tmp, CARD_NAME))
        written = sorted(
            os.path.relpath(os.path.join(root, name), tmp).replace(os.sep, "/")
            for root, _, files in os.walk(tmp)
            for name in files
        )
        if not os.path.exists(save_directory):
            os.rename(tmp, save_directory)
            return written
        new_files = set(os.listdir(tmp))
        keep_card = os.path.exists(os.path.join(save_directory, CARD_NAME))  # never overwrite a user's card
        for root, _, files in os.walk(tmp):
            target_root = os.path.join(save_directory, os.path.relpath(root, tmp))
            os.makedirs(target_root, exist_ok=True)
            for name in files:
                if keep_card and root == tmp and name == CARD_NAME:
                    continue
                os.replace(os.path.join(root, name), os.path.join(target_root, name))
        # Stale weights of an earlier save (e.g. shards, when this save wrote one file) would load instead of or
        # beside the new ones.
        for name in os.listdir(save_directory):
            if name not in new_files and _WEIGHT_FILE.fullmatch(name):
                os.remove(os.path.join(save_directory, name))
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _hub_model_card(repo_id: str, token) -> ModelCard | None:
    """The card of the Hub repository `repo_id`, or `None` if it has none."""
    try:
        return ModelCard.load(repo_id, token=token, ignore_metadata_errors=True)
    except (EntryNotFoundError, RepositoryNotFoundError):
        return None


def _upload(model, folder: str, files: list[str], card: ModelCard, repo_id: str, hub: dict):
    """One commit to `repo_id` with `files` (paths relative to `folder`) and `card` as README.md (the directory may
    keep a README of its own, which is not uploaded in place of the card)."""
    api = HfApi()
    revision = hub["revision"]
    if revision is not None and not revision.startswith("refs/pr"):
        try:
            api.create_branch(repo_id, branch=revision, token=hub["token"], exist_ok=True)
        except HfHubHTTPError as error:
            # A pull request to a repository we cannot write to: the branch may exist; create_commit says if not.
            forbidden = error.response is not None and error.response.status_code == 403
            if not (forbidden and hub["create_pr"]):
                raise
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(folder, *name.split("/")))
        for name in files
        if name != CARD_NAME
    ]
    operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=str(card).encode("utf-8")))
    return api.create_commit(
        repo_id,
        operations,
        commit_message=hub["commit_message"] or f"Upload {type(model).__name__}",
        commit_description=hub["commit_description"],
        token=hub["token"],
        create_pr=hub["create_pr"],
        revision=revision,
    )
