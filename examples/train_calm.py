#!/usr/bin/env python
"""Train a CALM language model (`CalmForCausalLM`) on top of a trained autoencoder, with `CalmTrainer`.

The second stage of CALM: the autoencoder (from examples/train_autoencoder.py) is frozen inside the model, a Llama
backbone reads K-token chunks and an energy head predicts the next chunk's latent vector, trained with the energy
loss. Evaluation reports eval_loss, the energy terms, BrierLM (the official chunk-aligned protocol) and the
autoencoder's reconstruction accuracy on the eval blocks.

Data (`--packing`, see `transformers_calm.data`):
- "aligned" (default): the autoencoder's recipe. Every document gets an EOS and is padded to a multiple of K, so every
  target chunk is a chunk of the distribution the frozen autoencoder was trained on (documents start on chunk
  boundaries, chunks never straddle documents) and the model learns EOS, so generate() can stop.
- "stream": the official CALM recipe (BOS-prefixed documents concatenated, no EOS, no padding). Use it with
  `--eval_packing stream --block_size 8192` on WikiText to reproduce the official BrierLM protocol.

Paper-scale run (CALM-M: the official optimiser AdamW (0.9, 0.95), wd 0.1, constant lr 3e-4, clip 1.0, bf16; global
batch 256 blocks of 8192 tokens; the whole two-stage run with every option: examples/recipes/calm-m.sh). --streaming
tokenises the shards as training reads them, each process its own part, and checkpoints record where each stream
stands, so --resume_from_checkpoint continues at the next unseen block:

    torchrun --nproc_per_node 8 examples/train_calm.py --autoencoder outputs/autoencoder \
        --train_file pile/train/0[2-9].jsonl.zst pile/train/[12]?.jsonl.zst --streaming --dataloader_num_workers 0 \
        --validation_file data/wikitext_document_level-test.json \
        --block_size 8192 --per_device_train_batch_size 4 --gradient_accumulation_steps 8 --max_steps 250000 \
        --bf16 --eval_strategy steps --eval_steps 1000 --per_device_eval_batch_size 1 \
        --metric_for_best_model eval_brierlm --output_dir outputs/calm-m

Tiny CPU run, on the autoencoder of examples/demo.py (2 processes: `torchrun --nproc_per_node 2 ...` or `accelerate
launch --multi_gpu --num_processes 2 ...`; note that `accelerate launch --cpu --num_processes 2` runs ONE process):

    python examples/train_calm.py --autoencoder outputs/demo/calm/autoencoder --train_file outputs/demo/data/train.jsonl \
        --validation_file outputs/demo/data/validation.jsonl --block_size 256 --hidden_size 128 \
        --intermediate_size 256 --num_hidden_layers 4 --num_attention_heads 4 --num_key_value_heads 4 \
        --max_steps 300 --learning_rate 1e-3 --use_cpu --output_dir outputs/calm-tiny

The tokenizer is the one saved beside the autoencoder (train_autoencoder.py saves it there), or `--tokenizer`. The
model and tokenizer are saved to `--output_dir`. Also callable in-process: `trainer, metrics = main([...])`.
"""

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field

import torch
from scripts import (  # examples/scripts.py: the script's directory is on sys.path
    ScriptDataArguments,
    check_path,
    close_distributed,
    count_blocks,
    parse_script_args,
    setup_logging,
    train_and_evaluate,
)
from transformers import AutoConfig, AutoTokenizer, HfArgumentParser, default_data_collator, set_seed

from transformers_calm import CalmAutoencoder, CalmForCausalLM, CalmTrainer
from transformers_calm.data import PACKINGS
from transformers_calm.modeling_calm_autoencoder import autoencoder_mismatch
from transformers_calm.trainer_calm import OfficialTrainingArguments

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
# Test hook: when set, every process writes `weights_rank{rank}.json` (world size and a SHA-256 of its final weights)
# into this directory, so that a test can check that all processes end with the same model.
CHECKSUM_DIR_ENV = "TRANSFORMERS_CALM_WEIGHT_CHECKSUM_DIR"


@dataclass
class ModelArguments:
    """The autoencoder, the tokenizer and the language model's shape (defaults: CALM-M, `train_energy.sh`)."""

    autoencoder: str | None = field(
        default=None,
        metadata={"help": "Directory of the trained CalmAutoencoder (output_dir of train_autoencoder.py)."},
    )
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer path. Default: the tokenizer saved in --autoencoder (or --model_name_or_path). It must "
            "be the autoencoder's tokenizer, pad token included."
        },
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Continue from a saved CalmForCausalLM (its shape arguments below are then ignored)."},
    )
    backbone_type: str = field(
        default="llama",
        metadata={"help": "transformers model type of the decoder backbone (llama, qwen3, mistral, ...)."},
    )
    hidden_size: int = field(default=1024, metadata={"help": "Backbone width."})
    intermediate_size: int = field(default=2752, metadata={"help": "Backbone MLP width."})
    num_hidden_layers: int = field(default=16, metadata={"help": "Backbone layers."})
    num_attention_heads: int = field(default=16)
    num_key_value_heads: int = field(default=16, metadata={"help": "Fewer than the heads: grouped-query attention."})
    max_position_embeddings: int | None = field(
        default=None, metadata={"help": "Chunk positions of the backbone. Default: block_size / K."}
    )
    num_mlp_layers: int = field(default=4, metadata={"help": "Residual blocks of the energy head."})
    noise_size: int = field(default=64, metadata={"help": "Size of the energy head's uniform noise input."})
    num_samples: int = field(default=8, metadata={"help": "N, head samples per position in the energy loss (>= 2)."})
    num_targets: int = field(
        default=100, metadata={"help": "M, autoencoder posterior samples per position in the energy loss."}
    )


@dataclass
class DataArguments(ScriptDataArguments):
    block_size: int = field(
        default=8192,
        metadata={"help": "Tokens per sequence (the official 8192); must be a multiple of the autoencoder's K."},
    )
    packing: str = field(
        default="aligned",
        metadata={
            "help": "How documents are packed into blocks. aligned (default): EOS + padding to a multiple of K per "
            "document, as the autoencoder was trained, so every target chunk is one the frozen autoencoder knows "
            "(documents start on chunk boundaries, no chunk straddles two documents) and EOS is learned, so "
            "generate() can stop. stream: the official CALM recipe (BOS-prefixed documents concatenated, no EOS, "
            "no padding).",
            "choices": list(PACKINGS),
        },
    )
    eval_packing: str | None = field(
        default=None,
        metadata={
            "help": "Packing of the validation blocks (default: --packing). stream with --block_size 8192 on WikiText "
            "is the official BrierLM protocol.",
            "choices": list(PACKINGS),
        },
    )


@dataclass
class CalmTrainingArguments(OfficialTrainingArguments):
    """`TrainingArguments` whose defaults are the official CALM run's optimiser settings."""

    # Every trainable parameter is used by the loss (the autoencoder is frozen): DDP needs no unused-parameter search.
    ddp_find_unused_parameters: bool | None = field(default=False)


def check_same_autoencoder(model_ae_config, given_ae_config):
    """--model_name_or_path holds its autoencoder: a --autoencoder of another K, l or vocabulary is an error."""
    mismatch = autoencoder_mismatch(model_ae_config, given_ae_config)
    if mismatch:
        raise ValueError(
            f"--autoencoder ({mismatch}) is not the autoencoder inside --model_name_or_path, which the model keeps: "
            "drop --autoencoder to train the model further, or drop --model_name_or_path to train a new language "
            "model around this autoencoder."
        )


def load_tokenizer(model_args):
    """The autoencoder's tokenizer: --tokenizer, else the one saved beside the autoencoder / model."""
    path = model_args.tokenizer
    if path is None:
        for candidate in (model_args.model_name_or_path, model_args.autoencoder):
            if candidate and any(os.path.isfile(os.path.join(candidate, name)) for name in TOKENIZER_FILES):
                path = candidate
                break
    if path is None:
        raise ValueError(
            f"No tokenizer found in {model_args.model_name_or_path or model_args.autoencoder!r}: pass --tokenizer, "
            "the tokenizer the autoencoder was trained with (train_autoencoder.py saves it in its output_dir)."
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        raise ValueError(
            f"Tokenizer {path!r} has no pad token. The autoencoder was trained with one (train_autoencoder.py adds "
            "'[PAD]' to a tokenizer without one and saves the result in its output_dir): pass that saved tokenizer, "
            "or add the same token (tokenizer.add_special_tokens({'pad_token': '[PAD]'})) and save it."
        )
    return tokenizer


def check_tokenizer(tokenizer, config):
    """The tokenizer must be the autoencoder's: no token beyond its vocabulary, the same special tokens."""
    mismatches = [
        f"{name} {getattr(tokenizer, name)} != {getattr(config, name)}"
        for name in ("pad_token_id", "eos_token_id", "bos_token_id")
        if getattr(config, name) is not None and getattr(tokenizer, name) != getattr(config, name)
    ]
    if len(tokenizer) > config.vocab_size:
        mismatches.insert(0, f"{len(tokenizer)} tokens > vocab_size {config.vocab_size}")
    if mismatches:
        raise ValueError(
            f"The tokenizer does not match the autoencoder ({'; '.join(mismatches)}): use the tokenizer the autoencoder "
            "was trained with (saved in its output_dir by train_autoencoder.py)."
        )


def weight_checksum(model) -> str:
    """SHA-256 of all weights (names, dtypes, values), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def main(argv=None):
    """Train (and evaluate) a CALM language model; returns `(trainer, metrics)` with the final train and eval metrics."""
    parser = HfArgumentParser((ModelArguments, DataArguments, CalmTrainingArguments))
    model_args, data_args, training_args = parse_script_args(parser, argv)

    setup_logging(training_args, __name__)
    logger.info(
        f"world size {training_args.world_size} ({training_args.distributed_state.distributed_type}), "
        f"device {training_args.device}"
    )

    if not (model_args.autoencoder or model_args.model_name_or_path):
        raise ValueError("Pass --autoencoder (a trained CalmAutoencoder) or --model_name_or_path (a CalmForCausalLM).")
    for name in ("autoencoder", "model_name_or_path", "tokenizer"):
        check_path(getattr(model_args, name), f"--{name}")
    if model_args.model_name_or_path:
        autoencoder, config = None, CalmForCausalLM.config_class.from_pretrained(model_args.model_name_or_path)
        ae_config = config.autoencoder_config
        if model_args.autoencoder:  # the model holds its own autoencoder: a different one would be ignored
            check_same_autoencoder(ae_config, CalmAutoencoder.config_class.from_pretrained(model_args.autoencoder))
    else:
        autoencoder = CalmAutoencoder.from_pretrained(model_args.autoencoder)
        ae_config = autoencoder.config
    K = ae_config.patch_size
    if data_args.block_size % K or data_args.block_size < 2 * K:
        raise ValueError(
            f"block_size ({data_args.block_size}) must be a multiple of the autoencoder's patch_size K = {K}, and at "
            f"least 2K: CALM reads whole chunks and predicts chunk i + 1 from chunks 0..i. Try --block_size "
            f"{max(2 * K, data_args.block_size - data_args.block_size % K)}."
        )
    num_chunks = data_args.block_size // K
    tokenizer = load_tokenizer(model_args)
    check_tokenizer(tokenizer, ae_config)

    set_seed(training_args.seed)
    if model_args.model_name_or_path:
        model = CalmForCausalLM.from_pretrained(model_args.model_name_or_path)
        if model.config.max_chunks < num_chunks:
            raise ValueError(
                f"block_size {data_args.block_size} is {num_chunks} chunks, more than the model's context of "
                f"{model.config.max_chunks} chunks (its backbone's max_position_embeddings)."
            )
    else:
        backbone_config = AutoConfig.for_model(
            model_args.backbone_type,
            hidden_size=model_args.hidden_size,
            intermediate_size=model_args.intermediate_size,
            num_hidden_layers=model_args.num_hidden_layers,
            num_attention_heads=model_args.num_attention_heads,
            num_key_value_heads=model_args.num_key_value_heads,
            head_dim=model_args.hidden_size // model_args.num_attention_heads,
            max_position_embeddings=model_args.max_position_embeddings or num_chunks,  # positions count chunks
            rms_norm_eps=1e-6,  # the official CALM backbone's
        )
        model = CalmForCausalLM.from_autoencoder(
            autoencoder,
            backbone_config=backbone_config,
            num_mlp_layers=model_args.num_mlp_layers,
            noise_size=model_args.noise_size,
            num_samples=model_args.num_samples,
            num_targets=model_args.num_targets,
        )
        del autoencoder
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f"CalmForCausalLM: {trainable / 1e6:.2f}M trainable parameters (the autoencoder is frozen)")

    eval_packing = data_args.eval_packing or data_args.packing
    train_dataset, eval_dataset = data_args.load_blocks(
        tokenizer, K, training_args, packing=data_args.packing, eval_packing=eval_packing
    )
    logger.info(
        f"{count_blocks(train_dataset)} training blocks of {data_args.block_size} tokens ({data_args.packing} packing)"
        + (f", {len(eval_dataset)} validation blocks ({eval_packing} packing)" if eval_dataset is not None else "")
    )

    trainer = CalmTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,  # saved beside the model by save_model and in every checkpoint
        data_collator=default_data_collator,
    )
    metrics = train_and_evaluate(trainer)

    checksum_dir = os.environ.get(CHECKSUM_DIR_ENV)
    if checksum_dir:
        os.makedirs(checksum_dir, exist_ok=True)
        record = {
            "rank": training_args.process_index,
            "world_size": training_args.world_size,
            "distributed_type": trainer.accelerator.distributed_type.value,
            "sha256": weight_checksum(trainer.model),
        }
        with open(os.path.join(checksum_dir, f"weights_rank{training_args.process_index}.json"), "w") as f:
            json.dump(record, f)

    close_distributed(trainer)
    return trainer, metrics


if __name__ == "__main__":
    main()
