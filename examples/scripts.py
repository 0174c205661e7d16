"""Steps shared by the training scripts in `examples/` (autoencoder, CALM, LoRA, Llama baseline, demo): their common
data and optimiser arguments, parsing them, loading the blocks, setting up logging, and the `run_clm`-style train /
save / evaluate sequence.

Example plumbing, not part of the package: the scripts import it as a sibling module (`python examples/x.py` puts
`examples/` on `sys.path`)."""

import gc
import logging
import os
import sys
from dataclasses import dataclass, field

import datasets
import torch
import transformers

from transformers_calm.cli import check_path
from transformers_calm.data import load_blocks


@dataclass
class ScriptDataArguments:
    """The data arguments of every training script; each script's `DataArguments` adds its packing options and may
    redefine `block_size` with its own default."""

    train_file: list[str] = field(
        metadata={
            "help": "One or more files or glob patterns, local or remote (hf://..., s3://...): JSON lines with a `text` "
            "field (.json/.jsonl) or plain text, plain or compressed (.zst, .gz, ...)."
        }
    )
    validation_file: str | None = field(default=None, metadata={"help": "Same formats as --train_file (one file)."})
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream the training data: tokenise and pack it on the fly as training reads it (training starts "
            "at once, no cache; each process reads its own part; checkpoints record where the stream stands, so "
            "--resume_from_checkpoint continues at the next unseen block). Needs --max_steps and "
            "--dataloader_num_workers 0. The validation file is still tokenised up front."
        },
    )
    block_size: int = field(
        default=2048, metadata={"help": "Tokens per training sequence; must be a multiple of K (patch_size)."}
    )
    text_sample_by: str = field(
        default="paragraph",
        metadata={"help": "How a plain-text file is cut into documents: line, paragraph or document (whole file)."},
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on at most this many blocks."})
    preprocessing_num_workers: int | None = field(default=None)
    overwrite_cache: bool = field(default=False, metadata={"help": "Recompute the tokenised datasets."})

    def load_blocks(self, tokenizer, patch_size: int, training_args: transformers.TrainingArguments, **packing):
        """`(train_dataset, eval_dataset)` of these files: [`transformers_calm.data.load_blocks`] with these arguments;
        `packing`: its `packing` / `eval_packing`."""
        return load_blocks(
            self.train_file,
            self.validation_file,
            tokenizer,
            patch_size,
            self.block_size,
            sample_by=self.text_sample_by,
            max_eval_samples=self.max_eval_samples,
            num_proc=self.preprocessing_num_workers,
            overwrite_cache=self.overwrite_cache,
            main_process_first=training_args.main_process_first,
            streaming=self.streaming,
            process_index=training_args.process_index,
            num_processes=training_args.world_size,
            **packing,
        )


def count_blocks(dataset) -> str:
    """`"1,234"`, or `"streamed"` for a dataset without a length, for the scripts' log lines."""
    return f"{len(dataset):,}" if hasattr(dataset, "__len__") else "streamed"


# The files a saved tokenizer consists of (one of them is enough for AutoTokenizer).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def load_tokenizer(path: str, what: str = "--tokenizer"):
    """`AutoTokenizer.from_pretrained(path)`, or a clear error when `path` is a local folder without a tokenizer (a
    model saved alone; transformers would ask to install sentencepiece or tiktoken)."""
    check_path(path, what)
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise ValueError(
            f"No tokenizer in {path}: pass --tokenizer, the tokenizer the autoencoder was trained with "
            "(train_autoencoder.py saves it in its output_dir, beside the autoencoder)."
        )
    return transformers.AutoTokenizer.from_pretrained(path)


def parse_script_args(parser: transformers.HfArgumentParser, argv=None) -> tuple:
    """The dataclasses of `parser`, from `argv` (a list of strings; default `sys.argv`), or from a single `.json`
    file given as the only command-line argument, as in the transformers examples."""
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(sys.argv[1]))
    return parser.parse_args_into_dataclasses(args=argv)


def setup_logging(training_args: transformers.TrainingArguments, *logger_names: str) -> None:
    """Log to stdout. The scripts' own loggers (`logger_names`, and the package's) show INFO on the main process;
    `datasets` and `transformers` keep the level asked for with `--log_level`."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    for name in (*logger_names, "transformers_calm"):
        logging.getLogger(name).setLevel(logging.INFO if training_args.should_log else log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)


def train_and_evaluate(trainer: transformers.Trainer) -> dict:
    """Train (resuming from `--resume_from_checkpoint` if given), save the model and its tokenizer into
    `output_dir`, log and save the train metrics and the trainer state, then evaluate when the trainer has an
    evaluation set. Returns the train metrics updated with the eval metrics."""
    train_result = trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    trainer.save_model()  # the model (a PeftModel: its adapter) + the processing class
    metrics = dict(train_result.metrics)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    if trainer.eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    return metrics


def close_distributed(trainer: transformers.Trainer) -> None:
    """End a distributed run cleanly (nothing without one): wait until every process (rank 0 saving last) is done,
    then close the process group, so that no process leaves first and aborts the others (SIGABRT, "terminate called
    without an active exception").

    The DDP wrapper is freed before: its gradient reducer holds the process group, and freed at interpreter exit it
    would destroy the group while holding the GIL, with gloo's worker thread still releasing the barrier's work
    (which needs the GIL): the process then never exits."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    trainer.accelerator.wait_for_everyone()
    trainer.model_wrapped = trainer.model
    trainer.accelerator.free_memory()
    gc.collect()
    torch.distributed.destroy_process_group()
