#!/usr/bin/env python
"""End-to-end CALM demo on CPU, in a few minutes: `make demo`, or from the repository root

    HF_HUB_OFFLINE=1 .venv/bin/python examples/demo.py [--output_dir outputs/demo] [--max_steps 400] ...

Stages (each one a function, timed):
  1. data       read the documents (the bundled WikiText-103 test set, 62 documents, or --train_files) and hold the
                last --num_heldout_documents out;
  2. tokenizer  train a small byte-level BPE tokenizer on the training documents only;
  3. autoencoder  train a small CalmAutoencoder (K=4 tokens -> one latent vector) with examples/train_autoencoder.py;
  4. reconstruction  measure how well it reconstructs the held-out documents (token and chunk accuracy).

Nothing is downloaded: the data ship with the repository and the tokenizer is trained here.
"""

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_autoencoder  # noqa: E402  (examples/ is not a package)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED_DATA = os.path.join(REPO_ROOT, "data", "wikitext_document_level-test.json")
TIMINGS = {}


@contextmanager
def stage(name):
    """Print a stage banner and record its wall time in TIMINGS."""
    print(f"\n=== {name} ===", flush=True)
    start = time.perf_counter()
    yield
    TIMINGS[name] = time.perf_counter() - start
    print(f"--- {name}: {TIMINGS[name]:.1f} s", flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument(
        "--train_files",
        "--text",
        nargs="+",
        default=[BUNDLED_DATA],
        help="Your own documents instead of the bundled WikiText: JSON lines with a `text` field (.json/.jsonl), or "
        "plain text where blank lines separate documents.",
    )
    parser.add_argument("--num_heldout_documents", type=int, default=6, help="The last N documents are held out.")
    parser.add_argument("--vocab_size", type=int, default=4096, help="BPE vocabulary, special tokens included.")
    parser.add_argument("--seed", type=int, default=0)
    # Autoencoder: the released model's structure (K=4, l=128, 2+2 layers), narrower to train in minutes on a CPU.
    parser.add_argument("--patch_size", type=int, default=4)
    parser.add_argument("--latent_size", type=int, default=128)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--intermediate_size", type=int, default=256)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_steps", type=int, default=400)
    parser.add_argument("--learning_rate", type=float, default=6e-3)
    parser.add_argument("--warmup_steps", type=int, default=30)
    # DropToken/DropLatent make the latent space robust for the CALM stage, but at the official 0.15 they slow the
    # reconstruction down a lot (held-out token accuracy ~93% after 400 steps at lr 3e-3): a few minutes of CPU
    # training affords 0.05.
    parser.add_argument("--token_dropout", type=float, default=0.05)
    parser.add_argument("--latent_dropout", type=float, default=0.05)
    return parser.parse_args(argv)


def read_documents(paths):
    """Documents of JSON-lines files (`text` field) or plain-text files (blank lines separate documents)."""
    documents = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            if path.endswith((".json", ".jsonl")):
                documents.extend(json.loads(line)["text"] for line in f if line.strip())
            else:
                documents.extend(f.read().split("\n\n"))
    return [doc for doc in documents if doc.strip()]


def load_data(args):
    """Stage 1: split the documents into training and held-out ones, and write both as JSON lines."""
    documents = read_documents(args.train_files)
    if not 0 < args.num_heldout_documents < len(documents):
        raise ValueError(
            f"--num_heldout_documents must be between 1 and {len(documents) - 1} (there are {len(documents)} "
            "documents)."
        )
    train_docs, heldout_docs = documents[: -args.num_heldout_documents], documents[-args.num_heldout_documents :]
    data_dir = os.path.join(args.output_dir, "data")
    os.makedirs(data_dir, exist_ok=True)
    paths = {}
    for split, docs in (("train", train_docs), ("validation", heldout_docs)):
        paths[split] = os.path.join(data_dir, f"{split}.jsonl")
        with open(paths[split], "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": doc}) + "\n" for doc in docs)
    print(
        f"{len(train_docs)} training documents ({sum(map(len, train_docs)):,} characters), {len(heldout_docs)} "
        f"held out ({sum(map(len, heldout_docs)):,} characters) -> {data_dir}"
    )
    return train_docs, heldout_docs, paths


def train_tokenizer(texts, vocab_size, save_dir):
    """Stage 2: a byte-level BPE tokenizer (GPT-2/Llama-3 style) that prepends BOS, as the Llama-3 tokenizer does.

    `<pad>` gets id 0, so the autoencoder's DropToken (which writes id 0 in place of a dropped token, as the official
    code does) writes the pad token rather than a real word.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable: no unknown tokens
        show_progress=True,
    )
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
            ),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.save_pretrained(save_dir)
    print(f"vocabulary {len(tokenizer)}; 'Hello world' -> {tokenizer('Hello world')['input_ids']} -> {save_dir}")
    return tokenizer


def train_autoencoder_stage(args, data_paths, tokenizer_dir):
    """Stage 3: train the autoencoder with the Trainer script, in-process; returns (model, tokenizer, metrics)."""
    output_dir = os.path.join(args.output_dir, "autoencoder")
    # fmt: off
    argv = [
        "--tokenizer", tokenizer_dir,
        "--train_file", data_paths["train"], "--validation_file", data_paths["validation"],
        "--output_dir", output_dir,
        "--patch_size", str(args.patch_size), "--latent_size", str(args.latent_size),
        "--hidden_size", str(args.hidden_size), "--intermediate_size", str(args.intermediate_size),
        "--token_dropout", str(args.token_dropout), "--latent_dropout", str(args.latent_dropout),
        "--block_size", str(args.block_size),
        "--per_device_train_batch_size", str(args.batch_size), "--per_device_eval_batch_size", str(args.batch_size),
        "--max_steps", str(args.max_steps),
        # The official optimiser (AdamW (0.9, 0.95), wd 0.1, clip 1.0), but with a short warmup to a much larger
        # learning rate and a cosine decay instead of the constant 3e-4 of a 30k-step run: a run of a few hundred
        # steps needs a fast start and a quiet end (on this demo, 3e-3 and 1e-2 both end lower than 6e-3).
        "--learning_rate", str(args.learning_rate), "--warmup_steps", str(args.warmup_steps),
        "--lr_scheduler_type", "cosine",
        # Plain float32 on CPU: the official bf16 rounding of the embeddings buys nothing here.
        "--no_cast_embeddings_to_bf16_in_training",
        "--logging_steps", str(max(args.max_steps // 10, 1)), "--save_strategy", "no", "--report_to", "none",
        "--use_cpu", "--seed", str(args.seed), "--dataloader_num_workers", "0",
    ]
    # fmt: on
    trainer, metrics = train_autoencoder.main(argv)
    print(
        f"eval (Trainer, posterior mean, alignment pads included): reconstruction accuracy "
        f"{metrics['eval_reconstruction_accuracy']:.4%}, chunk accuracy {metrics['eval_chunk_accuracy']:.4%}"
    )
    return trainer.model, trainer.processing_class, metrics


def evaluate_stage(model, tokenizer, heldout_docs, args):
    """Stage 4: held-out reconstruction accuracy of every document token (eval mode, posterior mean)."""
    result = train_autoencoder.evaluate_reconstruction(
        model, tokenizer, heldout_docs, block_size=args.block_size, batch_size=4 * args.batch_size
    )
    print(
        f"held-out: {result['num_documents']} documents, {result['num_tokens']:,} tokens, {result['num_chunks']:,} "
        f"chunks of {args.patch_size}\n"
        f"  token accuracy {result['token_accuracy']:.4%}   chunk accuracy {result['chunk_accuracy']:.4%}"
    )
    return result


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    with stage("1. data"):
        train_docs, heldout_docs, data_paths = load_data(args)
    with stage("2. tokenizer"):
        tokenizer_dir = os.path.join(args.output_dir, "tokenizer")
        train_tokenizer(train_docs, args.vocab_size, tokenizer_dir)
    with stage("3. autoencoder training"):
        model, tokenizer, _ = train_autoencoder_stage(args, data_paths, tokenizer_dir)
    with stage("4. held-out reconstruction"):
        result = evaluate_stage(model, tokenizer, heldout_docs, args)
    total = time.perf_counter() - start

    print(f"\n=== summary (torch {torch.__version__}, {torch.get_num_threads()} threads) ===")
    for name, seconds in TIMINGS.items():
        print(f"  {name:<28} {seconds:7.1f} s")
    print(f"  {'total':<28} {total:7.1f} s")
    print(
        f"  held-out reconstruction: token accuracy {result['token_accuracy']:.4%}, chunk accuracy "
        f"{result['chunk_accuracy']:.4%}"
    )
    print(f"  outputs in {args.output_dir}/ (tokenizer/, autoencoder/)")
    return {"timings": dict(TIMINGS, total=total), **result}


if __name__ == "__main__":
    main()
