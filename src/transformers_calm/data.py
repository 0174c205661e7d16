"""Data recipes of the two CALM training stages: documents -> token ids -> blocks of `block_size` tokens.

Two ways of packing tokenised documents into blocks (`packing`):

- `"aligned"` (the official autoencoder recipe, and our default for both stages): every document gets an EOS and is
  right-padded with the pad token to a multiple of K = patch_size before the documents are concatenated. Every
  document then starts on a chunk boundary and no chunk spans two documents. For the CALM stage this means that every
  target chunk is a chunk of the distribution the frozen autoencoder was trained on, and that the model learns to
  emit EOS, so `generate()` can stop.
- `"stream"` (the official CALM recipe): the documents, as the tokenizer encodes them (the Llama-3 tokenizer adds BOS
  to each; with a tokenizer that adds nothing, documents run into each other), are concatenated with no EOS and no
  padding. Chunk boundaries fall anywhere in a document, chunks can
  straddle two documents, and no EOS is ever seen. This is also the packing of the official BrierLM evaluation.

In both, the concatenated ids of a `datasets.map` batch are cut into blocks of `block_size` tokens and the remainder
that fills no block is dropped (the `run_clm` recipe). Labels are a copy of the input ids (pads included).
"""

import contextlib
import logging
from itertools import chain

from datasets import load_dataset
from transformers import AutoTokenizer

logger = logging.getLogger(__name__)

PACKINGS = ("aligned", "stream")

__all__ = ["PACKINGS", "build_blocks", "documents_to_ids", "load_blocks", "load_documents", "prepare_tokenizer"]


def _check_packing(packing: str) -> str:
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}.")
    return packing


def prepare_tokenizer(name_or_path):
    """Load a tokenizer and give it a pad token if it has none, as the official scripts do with Llama-3 (`[PAD]`,
    a new id at the end of the vocabulary).

    The aligned recipe needs an EOS token (one is appended to every document), so a tokenizer without one is refused.
    Use this for a new autoencoder only: a CALM model must use the tokenizer its autoencoder was trained with, which
    already has the pad token (adding one would change the vocabulary).
    """
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"Tokenizer {name_or_path!r} has no EOS token; the autoencoder recipe appends one per document."
        )
    if tokenizer.pad_token_id is None:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
        logger.info(
            f"Tokenizer has no pad token: added '[PAD]' as id {tokenizer.pad_token_id} (vocab {len(tokenizer)})."
        )
    return tokenizer


def documents_to_ids(texts, tokenizer, patch_size, return_lengths=False, packing="aligned"):
    """Token ids of each document, ready to be concatenated.

    Args:
        texts (`list[str]`): the documents.
        tokenizer: a tokenizer whose defaults add BOS where the model expects one (its ids are used as they are).
        patch_size (`int`): K, tokens per chunk.
        return_lengths (`bool`): also return each document's length before the padding.
        packing (`str`): `"aligned"`: tokenizer ids + EOS (unless the tokenizer already ends documents with EOS),
            right-padded with the pad token to a multiple of K. `"stream"`: the tokenizer ids only (no EOS, no pad).

    Returns:
        `list[list[int]]`, and with `return_lengths` also `list[int]`.
    """
    _check_packing(packing)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if packing == "aligned" and (eos is None or pad is None):
        raise ValueError(
            "The aligned packing appends EOS to every document and pads it with the pad token: the tokenizer needs "
            f"both (eos_token_id={eos}, pad_token_id={pad})."
        )
    all_ids, lengths = [], []
    for ids in tokenizer(texts)["input_ids"]:
        if packing == "aligned" and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        lengths.append(len(ids))
        if packing == "aligned":
            ids = ids + [pad] * (-len(ids) % patch_size)
        all_ids.append(ids)
    return (all_ids, lengths) if return_lengths else all_ids


def load_documents(path, sample_by="paragraph"):
    """A `datasets.Dataset` with one `text` column, one row per non-empty document.

    Args:
        path (`str`): JSON lines with a `text` field (`.json` / `.jsonl`), or a plain-text file.
        sample_by (`str`): how a plain-text file is cut into documents: `"line"`, `"paragraph"` (blank lines separate
            documents) or `"document"` (the whole file).
    """
    extension = path.rsplit(".", 1)[-1].lower()
    if extension in ("json", "jsonl"):
        dataset = load_dataset("json", data_files=path, split="train")
    else:
        dataset = load_dataset("text", data_files=path, split="train", sample_by=sample_by)
    if "text" not in dataset.column_names:
        raise ValueError(f"{path} has no `text` field (columns: {dataset.column_names}).")
    dataset = dataset.select_columns(["text"])
    # Empty documents would become a lone [BOS, EOS, PAD, PAD] chunk (blank lines of a text file): skip them.
    return dataset.filter(lambda example: bool(example["text"].strip()), desc="Dropping empty documents")


def build_blocks(dataset, tokenizer, patch_size, block_size, num_proc=None, overwrite_cache=False, packing="aligned"):
    """Tokenise the documents of `dataset` (a `text` column) and group them into blocks of `block_size` tokens.

    Args:
        dataset (`datasets.Dataset`): documents, e.g. from [`load_documents`].
        tokenizer: see [`documents_to_ids`].
        patch_size (`int`): K; `block_size` must be a multiple of it so that every block holds whole chunks.
        block_size (`int`): tokens per block.
        num_proc (`int`, *optional*): processes for `datasets.map`.
        overwrite_cache (`bool`): recompute instead of reusing the `datasets` cache.
        packing (`str`): `"aligned"` (default) or `"stream"`, see the module docstring.

    Returns:
        `datasets.Dataset` with `input_ids` and `labels` (a copy of `input_ids`), each `block_size` long.
    """
    _check_packing(packing)
    if block_size % patch_size:
        raise ValueError(
            f"block_size ({block_size}) must be a multiple of patch_size ({patch_size}): every block must hold whole "
            "chunks."
        )

    def tokenize(examples):
        return {"input_ids": documents_to_ids(examples["text"], tokenizer, patch_size, packing=packing)}

    def group_texts(examples):
        # As run_clm: concatenate the documents of a map batch and drop the remainder that fills no block.
        concatenated = list(chain.from_iterable(examples["input_ids"]))
        total = len(concatenated) // block_size * block_size
        blocks = [concatenated[i : i + block_size] for i in range(0, total, block_size)]
        return {"input_ids": blocks, "labels": [list(block) for block in blocks]}

    description = "+EOS, padded to a multiple of K" if packing == "aligned" else "no EOS, no padding"
    dataset = dataset.map(
        tokenize,
        batched=True,
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        load_from_cache_file=not overwrite_cache,
        desc=f"Tokenising documents ({description})",
    )
    return dataset.map(
        group_texts,
        batched=True,
        num_proc=num_proc,
        load_from_cache_file=not overwrite_cache,
        desc=f"Grouping into blocks of {block_size}",
    )


def load_blocks(
    train_file,
    validation_file,
    tokenizer,
    patch_size,
    block_size,
    *,
    packing="aligned",
    eval_packing=None,
    sample_by="paragraph",
    max_eval_samples=None,
    num_proc=None,
    overwrite_cache=False,
    main_process_first=None,
):
    """The training (and validation) blocks of the example scripts: [`load_documents`] then [`build_blocks`] per file.

    Args:
        train_file (`str`), validation_file (`str`, *optional*): see [`load_documents`].
        tokenizer, patch_size, block_size, num_proc, overwrite_cache: see [`build_blocks`].
        packing (`str`): packing of the training blocks; `eval_packing` that of the validation blocks (default:
            `packing`).
        sample_by (`str`): how plain-text files are cut into documents.
        max_eval_samples (`int`, *optional*): keep at most this many validation blocks.
        main_process_first (*optional*): `TrainingArguments.main_process_first`, so that in distributed runs the main
            process fills the `datasets` cache before the others read it. The checks run after it, on every process,
            so that bad input stops all of them instead of leaving some waiting at its barrier.

    Returns:
        `(train_dataset, eval_dataset)`, `eval_dataset` being `None` without `validation_file`.

    Raises:
        `ValueError` when a file holds fewer than `block_size` tokens, so that it gives no block at all.
    """
    files = {"train": (train_file, packing), "validation": (validation_file, eval_packing or packing)}
    context = main_process_first(desc="dataset preprocessing") if main_process_first else contextlib.nullcontext()
    with context:
        blocks = {
            split: build_blocks(
                load_documents(path, sample_by),
                tokenizer,
                patch_size,
                block_size,
                num_proc=num_proc,
                overwrite_cache=overwrite_cache,
                packing=split_packing,
            )
            for split, (path, split_packing) in files.items()
            if path
        }
    for split, dataset in blocks.items():
        if len(dataset) == 0:
            raise ValueError(
                f"The {split} data holds fewer than block_size={block_size} tokens: no block to train/evaluate on. "
                "Use more text or a smaller --block_size."
            )
    eval_dataset = blocks.get("validation")
    if eval_dataset is not None and max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(max_eval_samples, len(eval_dataset))))
    return blocks["train"], eval_dataset
