#!/usr/bin/env python
"""Train the discrete baseline of the paper: a `LlamaForCausalLM` with cross-entropy, on the same data as a CALM run.

The comparison CALM vs Transformer is only meaningful at equal data, packing, block size, batch and steps, so this
script reads the data exactly as `examples/train_calm.py` does (`transformers_calm.data`, same `--packing`) and
takes the tokenizer of the CALM autoencoder. The backbone dimensions are arguments, as in train_calm.py: pass the
same ones for a same-size baseline (the Llama then also has a token embedding and an LM head over the vocabulary
where CALM has its chunk compression, energy head and frozen autoencoder). Evaluate both with
`examples/evaluate_brierlm.py`, at the same block size.

    python examples/train_llama_baseline.py --tokenizer outputs/demo/calm \
        --train_file outputs/demo/data/train.jsonl --block_size 256 --hidden_size 128 --intermediate_size 352 \
        --num_hidden_layers 4 --num_attention_heads 4 --num_key_value_heads 4 --max_steps 300 \
        --per_device_train_batch_size 16 --learning_rate 1e-3 --use_cpu --output_dir outputs/llama-baseline

Labels are the input ids, pads of the aligned packing included, as in the CALM loss (and the official `train_ar.py`).
Also callable in-process: `trainer, metrics = main([...])`.
"""

import logging
from dataclasses import dataclass, field

from scripts import (  # examples/scripts.py: the script's directory is on sys.path
    ScriptDataArguments,
    close_distributed,
    load_tokenizer,
    parse_script_args,
    setup_logging,
    train_and_evaluate,
)
from transformers import (
    HfArgumentParser,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    default_data_collator,
    set_seed,
)

from transformers_calm.data import PACKINGS
from transformers_calm.trainer_calm import OfficialTrainingArguments
from transformers_calm.trainer_streaming import StreamedTrainingDataMixin

logger = logging.getLogger(__name__)


class LlamaTrainer(StreamedTrainingDataMixin, Trainer):
    """transformers' `Trainer`, which with `--streaming` reads and resumes the stream as the CALM trainers do."""


@dataclass
class ModelArguments:
    """The tokenizer and the Llama's dimensions (defaults: the backbone of CALM-M)."""

    tokenizer: str = field(metadata={"help": "Tokenizer directory, e.g. the CALM autoencoder's output directory."})
    hidden_size: int = field(default=1024)
    intermediate_size: int = field(default=2752)
    num_hidden_layers: int = field(default=16)
    num_attention_heads: int = field(default=16)
    num_key_value_heads: int = field(default=16)
    tie_word_embeddings: bool = field(default=False, metadata={"help": "The official baseline has an untied head."})


@dataclass
class DataArguments(ScriptDataArguments):
    block_size: int = field(default=2048, metadata={"help": "Tokens per training sequence."})
    patch_size: int = field(
        default=4, metadata={"help": "K of the CALM run being matched: the aligned packing pads documents to it."}
    )
    packing: str = field(default="aligned", metadata={"help": f"One of {PACKINGS}; use the CALM run's packing."})


@dataclass
class BaselineTrainingArguments(OfficialTrainingArguments):
    """The official optimiser settings (AdamW (0.9, 0.95), wd 0.1, constant lr 3e-4, clip 1.0), as train_calm.py."""


def main(argv=None):
    """Train (and evaluate the cross-entropy of) the baseline; returns `(trainer, metrics)`."""
    parser = HfArgumentParser((ModelArguments, DataArguments, BaselineTrainingArguments))
    model_args, data_args, training_args = parse_script_args(parser, argv)
    setup_logging(training_args, __name__)
    set_seed(training_args.seed)

    tokenizer = load_tokenizer(model_args.tokenizer)
    train_dataset, eval_dataset = data_args.load_blocks(
        tokenizer, data_args.patch_size, training_args, packing=data_args.packing
    )

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=model_args.hidden_size,
        intermediate_size=model_args.intermediate_size,
        num_hidden_layers=model_args.num_hidden_layers,
        num_attention_heads=model_args.num_attention_heads,
        num_key_value_heads=model_args.num_key_value_heads,
        max_position_embeddings=data_args.block_size,
        tie_word_embeddings=model_args.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    logger.info(f"LlamaForCausalLM with {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    trainer = LlamaTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    metrics = train_and_evaluate(trainer)
    close_distributed(trainer)
    return trainer, metrics


if __name__ == "__main__":
    main()
