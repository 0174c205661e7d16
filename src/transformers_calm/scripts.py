"""Steps shared by the training scripts in `examples/` (autoencoder, CALM, LoRA, Llama baseline): parsing their
arguments, setting up logging, and the `run_clm`-style train / save / evaluate sequence."""

import logging
import os
import sys

import datasets
import transformers


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
