"""Constants and small helpers shared by the test modules (importable as `common`: pytest puts tests/ on sys.path).
The tiny models themselves come from `factories`."""

import json
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl
from huggingface_hub.errors import EntryNotFoundError
from safetensors.torch import save_file
from transformers import TrainerCallback

# What CalmTrainer.evaluate() reports.
EVAL_KEYS = {
    "eval_loss",
    "eval_energy_fidelity",
    "eval_energy_diversity",
    "eval_brier1",
    "eval_brier2",
    "eval_brier3",
    "eval_brier4",
    "eval_brierlm",
    "eval_reconstruction_accuracy",
}

# What CalmAutoencoderTrainer.evaluate() reports.
AUTOENCODER_EVAL_KEYS = {
    "eval_loss",
    "eval_reconstruction_loss",
    "eval_kl_loss",
    "eval_perplexity",
    "eval_reconstruction_accuracy",
    "eval_chunk_accuracy",
}


class StopAt(TrainerCallback):
    """Interrupts training after `step` (the schedule and `max_steps` stay those of the full run)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


@contextmanager
def mocked_hub(remote_card: ModelCard | None = None, card_error: Exception | None = None):
    """Mock the public Hub API that `push_to_hub` uses (`HfApi.create_repo`, `HfApi.create_branch`,
    `HfApi.create_commit`, `ModelCard.load`); yield a namespace with `commits` (each `{"repo_id", "commit_message",
    "files": {path_in_repo: bytes}, **other create_commit arguments}`) and the mocks `create_repo`, `create_branch`,
    `card_load`. The repository has no README (`card_error`, default `EntryNotFoundError`) unless `remote_card` is
    given."""
    commits = []

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, commit_message=None, **kwargs):
        # Read the files now: push_to_hub deletes its temporary folder as soon as this returns.
        files = {}
        for op in operations:
            source = op.path_or_fileobj
            files[op.path_in_repo] = Path(source).read_bytes() if isinstance(source, (str, Path)) else bytes(source)
        commits.append({"repo_id": repo_id, "commit_message": commit_message, "files": files, **kwargs})
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{'a' * 40}",
            commit_message=commit_message,
            commit_description="",
            oid="a" * 40,
        )

    if remote_card is None:
        load = {"side_effect": card_error or EntryNotFoundError("no README")}
    else:
        load = {"return_value": remote_card}
    with (
        mock.patch.object(HfApi, "create_repo", autospec=True, side_effect=create_repo) as create_repo_mock,
        mock.patch.object(HfApi, "create_branch", autospec=True, return_value=None) as create_branch_mock,
        mock.patch.object(HfApi, "create_commit", autospec=True, side_effect=create_commit),
        mock.patch.object(ModelCard, "load", **load) as card_load,
    ):
        yield SimpleNamespace(
            commits=commits, create_repo=create_repo_mock, create_branch=create_branch_mock, card_load=card_load
        )


def write_sharded(state_dict, directory, extension):
    """Split an official state dict over two files plus an index, as transformers 4.43 writes large checkpoints."""
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(state_dict)
    halves = (names[: len(names) // 2], names[len(names) // 2 :])
    prefix = "model" if extension == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, part in enumerate(halves, start=1):
        filename = f"{prefix}-{i:05d}-of-00002.{extension}"
        tensors = {name: state_dict[name] for name in part}
        if extension == "safetensors":
            save_file({name: t.contiguous() for name, t in tensors.items()}, directory / filename)
        else:
            torch.save(tensors, directory / filename)
        weight_map.update(dict.fromkeys(part, filename))
    total_size = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (directory / f"{prefix}.{extension}.index.json").write_text(json.dumps(index))
