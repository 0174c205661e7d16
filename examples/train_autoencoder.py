#!/usr/bin/env python
"""Train a CALM chunk autoencoder (`CalmAutoencoder`) with `CalmAutoencoderTrainer`, the package's `Trainer`: its
train logs add `reconstruction_loss`, `kl_loss` and `reconstruction_accuracy`, its evaluation
`eval_reconstruction_loss`, `eval_kl_loss`, `eval_perplexity`, `eval_reconstruction_accuracy` and
`eval_chunk_accuracy`.

The data recipe is the one of the official `train_autoencoder.py` (shaochenze/calm), `transformers_calm.data` with
packing "aligned": every document is tokenised (with the BOS its tokenizer adds, if any), gets an EOS appended and is
right-padded with the pad token to a multiple of K = patch_size; documents are then concatenated and cut into blocks
of `block_size` tokens. Every document thus starts on a chunk boundary and no chunk spans two documents. Labels are a
copy of the input ids, pads included.

Paper-scale run (the official recipe: Llama-3 tokenizer, K=4, l=128, AdamW (0.9, 0.95), wd 0.1, constant lr 3e-4,
grad clip 1.0, bf16; the official global batch is 256 blocks of 2048 tokens):

    torchrun --nproc_per_node 8 examples/train_autoencoder.py --tokenizer meta-llama/Meta-Llama-3-8B \
        --train_file pile/train/00.jsonl.zst pile/train/01.jsonl.zst --streaming --dataloader_num_workers 0 \
        --validation_file data/wikitext_document_level-test.json \
        --block_size 2048 --per_device_train_batch_size 8 --gradient_accumulation_steps 4 \
        --max_steps 30000 --bf16 --eval_strategy steps --eval_steps 1000 --output_dir outputs/autoencoder

Tiny CPU run (see examples/demo.py, which also trains the small tokenizer used here):

    python examples/train_autoencoder.py --tokenizer outputs/demo/calm/tokenizer --train_file outputs/demo/data/train.jsonl \
        --validation_file outputs/demo/data/validation.jsonl --hidden_size 128 --intermediate_size 256 \
        --block_size 256 --max_steps 300 --learning_rate 3e-3 --use_cpu --output_dir outputs/ae-tiny

Also callable in-process: `trainer, metrics = main([...same arguments...])`.
"""

import logging
from dataclasses import dataclass, field

from scripts import (  # examples/scripts.py: the script's directory is on sys.path
    ScriptDataArguments,
    check_path,
    close_distributed,
    count_blocks,
    parse_script_args,
    setup_logging,
    train_and_evaluate,
)
from transformers import HfArgumentParser, default_data_collator, set_seed

from transformers_calm import CalmAutoencoder, CalmAutoencoderConfig, CalmAutoencoderTrainer
from transformers_calm.data import prepare_tokenizer
from transformers_calm.trainer_calm import OfficialTrainingArguments

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """The tokenizer and the autoencoder's shape and regularisation (defaults: the released CALM autoencoder)."""

    tokenizer: str = field(metadata={"help": "Tokenizer path or name, loaded with AutoTokenizer."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Continue from a saved CalmAutoencoder instead of a random initialisation."}
    )
    patch_size: int = field(default=4, metadata={"help": "K, tokens per chunk (per latent vector)."})
    latent_size: int = field(default=128, metadata={"help": "l, size of the latent vector of a chunk."})
    hidden_size: int = field(default=512)
    intermediate_size: int = field(default=1280)
    num_encoder_layers: int = field(default=2, metadata={"help": "Even: half run per token, half per chunk."})
    num_decoder_layers: int = field(default=2, metadata={"help": "Even: half run per chunk, half per token."})
    kl_weight: float = field(default=1e-3, metadata={"help": "beta, the weight of the KL term."})
    kl_clamp: float = field(default=0.5, metadata={"help": "Per-dimension floor of the KL term (KL clipping)."})
    token_dropout: float = field(default=0.15, metadata={"help": "DropToken probability on the encoder input."})
    latent_dropout: float = field(default=0.15, metadata={"help": "DropLatent probability on the sampled latent."})
    token_dropout_replacement_id: int = field(
        default=0, metadata={"help": "Id written in place of a dropped token (the official code writes id 0)."}
    )
    cast_embeddings_to_bf16_in_training: bool = field(
        default=True,
        metadata={"help": "Round encoder embeddings to bf16 in training, as the official bf16 run did."},
    )


@dataclass
class DataArguments(ScriptDataArguments):
    block_size: int = field(
        default=2048, metadata={"help": "Tokens per training sequence; must be a multiple of patch_size."}
    )


@dataclass
class AutoencoderTrainingArguments(OfficialTrainingArguments):
    """`TrainingArguments` whose defaults are the official autoencoder run's optimiser settings."""


def main(argv=None):
    """Train (and evaluate) an autoencoder; returns `(trainer, metrics)` with the final train and eval metrics."""
    parser = HfArgumentParser((ModelArguments, DataArguments, AutoencoderTrainingArguments))
    model_args, data_args, training_args = parse_script_args(parser, argv)

    setup_logging(training_args, __name__)  # this script's lines (data, model size, added pad token)

    if data_args.block_size % model_args.patch_size:
        raise ValueError(
            f"block_size ({data_args.block_size}) must be a multiple of patch_size ({model_args.patch_size}): every "
            "block must hold whole chunks."
        )
    set_seed(training_args.seed)

    check_path(model_args.tokenizer, "--tokenizer")
    check_path(model_args.model_name_or_path, "--model_name_or_path")
    tokenizer = prepare_tokenizer(model_args.tokenizer)
    train_dataset, eval_dataset = data_args.load_blocks(tokenizer, model_args.patch_size, training_args)
    logger.info(
        f"{count_blocks(train_dataset)} training blocks of {data_args.block_size} tokens"
        + (f", {len(eval_dataset)} validation blocks" if eval_dataset is not None else "")
    )

    special_ids = dict(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    if model_args.model_name_or_path:
        model = CalmAutoencoder.from_pretrained(model_args.model_name_or_path)
        if model.config.vocab_size != len(tokenizer) or model.config.patch_size != model_args.patch_size:
            raise ValueError(
                f"{model_args.model_name_or_path} has vocab_size {model.config.vocab_size} and patch_size "
                f"{model.config.patch_size}; the tokenizer has {len(tokenizer)} tokens and --patch_size is "
                f"{model_args.patch_size}."
            )
    else:
        config = CalmAutoencoderConfig(
            vocab_size=len(tokenizer),
            patch_size=model_args.patch_size,
            latent_size=model_args.latent_size,
            hidden_size=model_args.hidden_size,
            intermediate_size=model_args.intermediate_size,
            num_encoder_layers=model_args.num_encoder_layers,
            num_decoder_layers=model_args.num_decoder_layers,
            kl_weight=model_args.kl_weight,
            kl_clamp=model_args.kl_clamp,
            token_dropout=model_args.token_dropout,
            latent_dropout=model_args.latent_dropout,
            token_dropout_replacement_id=model_args.token_dropout_replacement_id,
            cast_embeddings_to_bf16_in_training=model_args.cast_embeddings_to_bf16_in_training,
            **special_ids,
        )
        model = CalmAutoencoder(config)
    logger.info(f"CalmAutoencoder with {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    trainer = CalmAutoencoderTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,  # saved beside the model by save_model and in every checkpoint
        data_collator=default_data_collator,
    )
    metrics = train_and_evaluate(trainer)
    close_distributed(trainer)
    return trainer, metrics


if __name__ == "__main__":
    main()
