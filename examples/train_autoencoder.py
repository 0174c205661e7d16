#!/usr/bin/env python
"""Train a CALM chunk autoencoder (`CalmAutoencoder`) with the Hugging Face `Trainer`.

The data recipe is the one of the official `train_autoencoder.py` (shaochenze/calm), `transformers_calm.data` with
packing "aligned": every document is tokenised (with the BOS its tokenizer adds, if any), gets an EOS appended and is
right-padded with the pad token to a multiple of K = patch_size; documents are then concatenated and cut into blocks
of `block_size` tokens. Every document thus starts on a chunk boundary and no chunk spans two documents. Labels are a
copy of the input ids, pads included.

Paper-scale run (the official recipe: Llama-3 tokenizer, K=4, l=128, AdamW (0.9, 0.95), wd 0.1, constant lr 3e-4,
grad clip 1.0, bf16; the official global batch is 256 blocks of 2048 tokens):

    python examples/train_autoencoder.py --tokenizer meta-llama/Meta-Llama-3-8B \
        --train_file pile_00.jsonl --validation_file data/wikitext_document_level-test.json \
        --block_size 2048 --per_device_train_batch_size 8 --gradient_accumulation_steps 4 \
        --max_steps 30000 --bf16 --eval_strategy steps --eval_steps 1000 --output_dir outputs/autoencoder

Tiny CPU run (see examples/demo.py, which also trains the small tokenizer used here):

    python examples/train_autoencoder.py --tokenizer outputs/demo/tokenizer --train_file outputs/demo/data/train.jsonl \
        --validation_file outputs/demo/data/validation.jsonl --hidden_size 128 --intermediate_size 256 \
        --block_size 256 --max_steps 300 --learning_rate 3e-3 --use_cpu --output_dir outputs/ae-tiny

Also callable in-process: `trainer, metrics = main([...same arguments...])`.
"""

import logging
import math
from dataclasses import dataclass, field
from itertools import chain

import torch
from tqdm.auto import tqdm
from transformers import (
    HfArgumentParser,
    Trainer,
    default_data_collator,
    set_seed,
)

from transformers_calm import CalmAutoencoder, CalmAutoencoderConfig
from transformers_calm.data import documents_to_ids, prepare_tokenizer
from transformers_calm.scripts import (
    OfficialTrainingArguments,
    ScriptDataArguments,
    parse_script_args,
    setup_logging,
    train_and_evaluate,
)

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


class CalmAutoencoderTrainer(Trainer):
    """`Trainer` that also logs the terms of the autoencoder loss and its reconstruction accuracy.

    Train logs gain `reconstruction_loss`, `kl_loss`, `reconstruction_accuracy` (tokens) and `chunk_accuracy` (chunks
    whose K tokens are all right), averaged over the steps since the previous log; eval logs (and the dict returned
    by `evaluate`) gain the same keys with the `eval_` prefix, over the whole evaluation set. In eval mode the model
    decodes the posterior mean, with no dropout.
    """

    # `CalmAutoencoder.forward` returns a per-batch mean and takes no `num_items_in_batch`, so the Trainer must divide
    # the loss by the gradient-accumulation steps. It does so when `model_accepts_loss_kwargs` is False, which it
    # infers from the absence of `**kwargs` in `forward`; we also say it outright (attribute read by transformers
    # >= 5.23, ignored by older versions) and check the inference in `__init__`.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.model_accepts_loss_kwargs:
            raise ValueError(
                "The Trainer would pass num_items_in_batch to CalmAutoencoder and skip the gradient-accumulation "
                "scaling of its per-batch mean loss; set `accepts_loss_kwargs = False` on the model."
            )
        # Sums since the last log: reconstruction loss * tokens, right tokens, tokens, KL * chunks, right chunks,
        # chunks.
        self._loss_terms = {"train": torch.zeros(6, dtype=torch.float64), "eval": torch.zeros(6, dtype=torch.float64)}
        self._metric_key_prefix = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        with torch.no_grad():
            labels = inputs.get("labels", inputs["input_ids"])
            if inputs.get("attention_mask") is not None:
                labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
            labelled = labels != -100
            correct = (outputs.logits.argmax(-1) == labels) | ~labelled
            patch_size = self.accelerator.unwrap_model(model).config.patch_size
            chunk_labelled = labelled.unflatten(1, (-1, patch_size)).any(-1)
            chunk_correct = correct.unflatten(1, (-1, patch_size)).all(-1) & chunk_labelled
            tokens, chunks = labelled.sum(), chunk_labelled.sum()
            terms = [
                outputs.reconstruction_loss.detach() * tokens,
                (correct & labelled).sum(),
                tokens,
                outputs.kl_loss.detach() * chunks,
                chunk_correct.sum(),
                chunks,
            ]
            terms = torch.stack([term.double() for term in terms])
            # Every rank runs compute_loss in lockstep, so gathering here is safe. (In distributed eval, the samples
            # that the sampler repeats to even out the last batch are counted twice.)
            terms = self.accelerator.gather(terms[None]).sum(0).cpu()
            self._loss_terms["train" if model.training else "eval"] += terms
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        self._metric_key_prefix = metric_key_prefix
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._metric_key_prefix = None

    def log(self, logs, start_time=None):
        if self._metric_key_prefix is not None:  # the metrics of an evaluate() call
            mode, prefix = "eval", f"{self._metric_key_prefix}_"
        elif "loss" in logs:  # a periodic train log (not the end-of-training summary)
            mode, prefix = "train", ""
        else:
            mode = None
        if mode is not None and self._loss_terms[mode][2] > 0:
            rec, right, tokens, kl, right_chunks, chunks = self._loss_terms[mode].tolist()
            # Updating `logs` in place also puts the eval keys into the dict that evaluate() returns.
            logs[f"{prefix}reconstruction_loss"] = round(rec / tokens, 4)
            logs[f"{prefix}kl_loss"] = round(kl / max(chunks, 1), 4)
            logs[f"{prefix}reconstruction_accuracy"] = round(right / tokens, 6)
            logs[f"{prefix}chunk_accuracy"] = round(right_chunks / max(chunks, 1), 6)
            if mode == "eval":  # as the official script, which logs exp of the eval cross-entropy
                logs[f"{prefix}perplexity"] = round(math.exp(min(rec / tokens, 50.0)), 4)
            self._loss_terms[mode].zero_()
        super().log(logs, start_time)


@torch.no_grad()
def evaluate_reconstruction(model, tokenizer, texts, block_size=2048, batch_size=8, show_progress=True):
    """Reconstruction accuracy of an autoencoder on held-out documents (eval mode: the posterior mean is decoded).

    Documents are prepared as in training (tokenizer ids + EOS, right-padded to a multiple of K), but nothing is
    dropped: the autoencoder is context-free, so the chunks can be packed in any order and the last block is filled
    with pad chunks that are not scored.

    Returns a dict with `token_accuracy` (over document tokens, BOS/EOS included, alignment pads excluded),
    `chunk_accuracy` (chunks whose K decoded tokens, alignment pads included, all equal the input), and the counts
    `num_documents`, `num_tokens`, `num_chunks`.
    """
    patch_size = model.config.patch_size
    if block_size % patch_size:
        raise ValueError(f"block_size ({block_size}) must be a multiple of patch_size ({patch_size}).")
    documents, lengths = documents_to_ids(list(texts), tokenizer, patch_size, return_lengths=True)
    ids = list(chain.from_iterable(documents))
    is_token = list(
        chain.from_iterable([True] * n + [False] * (len(d) - n) for d, n in zip(documents, lengths, strict=True))
    )
    num_chunks = len(ids) // patch_size
    fill = -len(ids) % block_size
    ids = torch.tensor(ids + [tokenizer.pad_token_id] * fill).view(-1, block_size)
    is_token = torch.tensor(is_token + [False] * fill).view(-1, block_size)

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = torch.empty_like(ids, dtype=torch.bool)
    for start in tqdm(range(0, len(ids), batch_size), desc="Reconstructing", disable=not show_progress):
        batch = ids[start : start + batch_size].to(device)
        mean, _ = model.encode(batch)
        correct[start : start + batch_size] = (model.decode_token_ids(mean) == batch).cpu()
    model.train(was_training)
    # The chunks of the fill come after every document chunk; they are not scored.
    chunk_correct = correct.view(-1, patch_size).all(-1)[:num_chunks]
    num_tokens = int(is_token.sum())
    return {
        "token_accuracy": int((correct & is_token).sum()) / max(num_tokens, 1),
        "chunk_accuracy": int(chunk_correct.sum()) / max(num_chunks, 1),
        "num_documents": len(documents),
        "num_tokens": num_tokens,
        "num_chunks": num_chunks,
    }


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

    tokenizer = prepare_tokenizer(model_args.tokenizer)
    train_dataset, eval_dataset = data_args.load_blocks(tokenizer, model_args.patch_size, training_args)
    logger.info(
        f"{len(train_dataset)} training blocks of {data_args.block_size} tokens"
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
    return trainer, metrics


if __name__ == "__main__":
    main()
