"""Streamed training data in both CALM trainers: a `datasets.IterableDataset` as the training set (e.g. from
[`~data.load_blocks`] with `streaming=True`), read by each process in its own part, and resumed exactly.

`Trainer` alone would, on resuming, fast-forward by iterating (hence reading and tokenising) every batch trained on
before the checkpoint, and would let `accelerate` dispatch one process's reads to all of them. Here each process
iterates its own part of the stream in the main process, and every checkpoint records, per process, the stream's
`state_dict()` after the last batch trained on (`stream_state_rank{rank}.json`); resuming loads it with
`load_state_dict()`, so the stream continues at the next unseen block. What resuming then re-reads is bounded by the
stream's own positions, not by the steps done: `datasets` reopens the current shard, skips the rows before the
position (parsing them, without tokenising), and re-runs the current `map` batch (1,000 documents) of each map.
"""

import itertools
import json
import os

import torch
from datasets import IterableDataset
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

__all__ = ["STREAM_STATE_NAME", "StreamedTrainingDataMixin"]

# One file per process in every checkpoint: the state of that process's stream.
STREAM_STATE_NAME = "stream_state_rank{rank}.json"


def _process_split(dataset):
    """`(process_index, num_processes)` of a stream that is one process's part already: marked so by
    [`~data.load_blocks`], or split by `datasets.distributed.split_dataset_by_node` (which records it in a private
    attribute, datasets 2.8 to 5.x). None: the whole stream."""
    split = getattr(dataset, "process_split", None)
    if split is not None:
        return tuple(split)
    distributed = getattr(dataset, "_distributed", None)
    return None if distributed is None else (distributed.rank, distributed.world_size)


class _EndlessStream(torch.utils.data.IterableDataset):
    """A stream read pass after pass, with no end: every process runs its `max_steps` full steps whatever the length
    of its own part (parts of different lengths would end at different steps and leave the other processes waiting
    in a collective). A pass is a `datasets` epoch (`set_epoch`), so the stream's state names the pass it is in, and
    a loaded state applies to that pass only."""

    def __init__(self, stream, first_pass=0, resumed=False):
        self.stream, self.first_pass, self.resumed = stream, first_pass, resumed

    def __iter__(self):
        for pass_index in itertools.count(self.first_pass):
            self.stream.set_epoch(pass_index)
            empty = True
            for example in self.stream:
                empty = False
                yield example
            # A pass resumed at its very end is empty and the next one starts afresh; a whole pass that is empty means
            # an empty stream: end, rather than loop forever.
            if empty and not (self.resumed and pass_index == self.first_pass):
                return


class _StreamEpochCallback(TrainerCallback):
    """`state.epoch` of a streamed run is the fraction of `max_steps` done, as `Trainer` counts it for a training set
    without a length; a resumed run, which does not let `Trainer` fast-forward, would count it from the checkpoint's
    step again. Set before every log and save."""

    def on_step_end(self, args, state, control, **kwargs):
        state.epoch = state.global_step / state.max_steps


class StreamedTrainingDataMixin:
    """Mixin for a `transformers.Trainer` subclass (before `Trainer` among its bases). With a
    `datasets.IterableDataset` as `train_dataset`:

    - each process iterates its own part: the dataset as it is when [`~data.load_blocks`] split it by process, or
      else split here with `datasets.distributed.split_dataset_by_node` (whole shards when their number divides by
      the number of processes, otherwise every n-th block);
    - the stream is read pass after pass with no end, so that every process trains `max_steps` full steps (a batch
      may join the end of a pass to the start of the next);
    - batches are read in the main process (`dataloader_num_workers` must be 0: a worker's stream position never
      reaches the checkpoint) and not through `accelerate`'s dataloader, which would re-split and read ahead;
    - every checkpoint holds each process's stream state; `train(resume_from_checkpoint=...)` continues the stream
      at the next unseen block (unless `args.ignore_data_skip`, which starts it again). Resume on the same number of
      processes and with the same data arguments.

    Any other training set is left to `Trainer`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._stream_resume = None  # the state to load into the stream at the next get_train_dataloader
        self._train_stream = None  # the stream this process iterates
        if self._is_streamed():
            self.add_callback(_StreamEpochCallback)

    def _is_streamed(self) -> bool:
        return isinstance(self.train_dataset, IterableDataset)

    def get_train_dataloader(self):
        if not self._is_streamed():
            return super().get_train_dataloader()
        if self.args.dataloader_num_workers:
            raise ValueError(
                f"A streamed training set is read in the main process, so that each checkpoint records where the "
                f"stream stands: set dataloader_num_workers=0 (got {self.args.dataloader_num_workers})."
            )
        dataset, world_size, rank = self.train_dataset, self.args.world_size, self.args.process_index
        split = _process_split(dataset)
        if world_size > 1 and split is None:
            dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        elif split is not None and split != (rank, world_size):
            raise ValueError(
                f"The training stream is the part of process {split[0]} of {split[1]}, but this is process {rank} of "
                f"{world_size}: build it with this run's process_index and world_size."
            )
        first_pass = 0
        if self._stream_resume is not None:
            dataset.load_state_dict(self._stream_resume)
            first_pass = self._stream_resume["epoch"]
        self._train_stream = dataset
        return DataLoader(
            _EndlessStream(dataset, first_pass, resumed=self._stream_resume is not None),
            batch_size=self._train_batch_size,
            collate_fn=self._get_collator_with_removed_columns(self.data_collator, description="training"),
            pin_memory=self.args.dataloader_pin_memory,
            # Starting an iteration draws a seed from this generator; from the global RNG it would shift the RNG that a
            # resumed run restores before its first batch, and with it every random draw after the checkpoint.
            generator=torch.Generator().manual_seed(self.args.seed),
        )

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if not self._is_streamed() or resume_from_checkpoint in (None, False) or self.args.ignore_data_skip:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        self._stream_resume = self._read_stream_state(resume_from_checkpoint)
        # The stream is put where it stood instead: Trainer's fast-forward would re-read every batch before it. The
        # arguments saved in checkpoints keep the user's value (see _save_checkpoint).
        self.args.ignore_data_skip = True
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self.args.ignore_data_skip = False
            self._stream_resume = None

    def _read_stream_state(self, checkpoint):
        path = os.path.join(checkpoint, STREAM_STATE_NAME.format(rank=self.args.process_index))
        if not os.path.isfile(path):
            raise ValueError(
                f"{checkpoint} has no stream state for process {self.args.process_index} ({os.path.basename(path)}): "
                "it was not saved by a streamed run on this number of processes. Pass --ignore_data_skip to start "
                "the stream from its beginning instead."
            )
        with open(path) as f:
            record = json.load(f)
        if record["world_size"] != self.args.world_size:
            raise ValueError(
                f"{checkpoint} was saved by a streamed run on {record['world_size']} processes, this one has "
                f"{self.args.world_size}: each process's part of the stream would differ. Resume on "
                f"{record['world_size']} processes, or pass --ignore_data_skip to start the stream from its beginning."
            )
        return record["state"]

    def _save_checkpoint(self, model, trial):
        if self._train_stream is None:
            return super()._save_checkpoint(model, trial)
        # Written into the checkpoint folder before Trainer fills it (and rotates the older ones away), so that a
        # checkpoint that looks complete always holds its stream state. No batch is read ahead (no workers, no
        # accelerate prefetch): the stream's state is that after the last batch trained on.
        checkpoint = os.path.join(
            self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        record = {
            "rank": self.args.process_index,
            "world_size": self.args.world_size,
            "global_step": self.state.global_step,
            "state": self._train_stream.state_dict(),
        }
        path = os.path.join(checkpoint, STREAM_STATE_NAME.format(rank=self.args.process_index))
        os.makedirs(checkpoint, exist_ok=True)
        with open(path + ".tmp", "w") as f:  # written whole, then renamed: a checkpoint never holds half a state
            json.dump(record, f)
        os.replace(path + ".tmp", path)
        # A resumed streamed run turns Trainer's fast-forward off for itself (train()); the arguments its checkpoints
        # save keep the user's setting.
        toggled = self._stream_resume is not None
        if toggled:
            self.args.ignore_data_skip = False
        try:
            super()._save_checkpoint(model, trial)
        finally:
            if toggled:
                self.args.ignore_data_skip = True
