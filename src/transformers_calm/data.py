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

Streaming (`streaming=True`): the same recipe on a `datasets.IterableDataset`, tokenised and packed on the fly as
training reads it, so that a run over a corpus of any size starts at once and writes no cache. The map batches are
the same (1,000 documents), so the blocks are the same as without streaming, in the same order. The stream is not
shuffled: a shuffle buffer is not part of the state a checkpoint can record (corpora such as The Pile come with their
documents already shuffled across shards). In a run on several processes each one tokenises its own part of the
documents ([`split_documents`]: whole shards when their number divides by the number of processes, otherwise every
n-th document).
"""

import contextlib
import glob
import importlib.util
import logging
import os
from itertools import chain

from datasets import IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node
from transformers import AutoTokenizer

logger = logging.getLogger(__name__)

PACKINGS = ("aligned", "stream")
# Compressed files are read through fsspec, which infers the codec from the extension (`.zst` needs `zstandard`).
COMPRESSION_EXTENSIONS = ("zst", "zstd", "gz", "bz2", "xz", "lz4")

__all__ = [
    "PACKINGS",
    "build_blocks",
    "documents_to_ids",
    "load_blocks",
    "load_documents",
    "pad_to_chunks",
    "prepare_tokenizer",
    "split_documents",
]


def pad_to_chunks(ids: list[int], patch_size: int, pad_token_id: int) -> list[int]:
    """`ids` followed by pad ids up to a multiple of K (`patch_size`): what comes next then starts a chunk."""
    return list(ids) + [pad_token_id] * (-len(ids) % patch_size)


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
            ids = pad_to_chunks(ids, patch_size, pad)
        all_ids.append(ids)
    return (all_ids, lengths) if return_lengths else all_ids


def _file_format(path: str) -> str:
    """`"json"` for JSON lines (`.json` / `.jsonl`), else `"text"`; a compression extension is looked through."""
    parts = path.lower().rsplit("/", 1)[-1].split(".")
    if len(parts) > 2 and parts[-1] in COMPRESSION_EXTENSIONS:
        parts = parts[:-1]
    return "json" if parts[-1] in ("json", "jsonl") else "text"


def load_documents(path, sample_by="paragraph", streaming=False):
    """A `datasets.Dataset` (or, streaming, a `datasets.IterableDataset`) with one `text` column, one row per
    non-empty document.

    Args:
        path (`str` or `list[str]`): one or more files or glob patterns (`shards/*.jsonl.zst`), local or remote (any
            URL `datasets` reads, e.g. `hf://datasets/...`): JSON lines with a `text` field (`.json` / `.jsonl`), or
            plain text; either may be compressed (`.zst`, `.gz`, `.bz2`, `.xz`). All must have the same format.
        sample_by (`str`): how a plain-text file is cut into documents: `"line"`, `"paragraph"` (blank lines separate
            documents) or `"document"` (the whole file).
        streaming (`bool`): read the files lazily, as the dataset is iterated (nothing is downloaded or cached first).
    """
    paths = [path] if isinstance(path, str) else list(path)
    if not paths:
        raise ValueError("No data file given.")
    formats = {_file_format(p) for p in paths}
    if len(formats) > 1:
        raise ValueError(f"The data files mix JSON lines and plain text ({paths}): pass files of one format.")
    if any(p.lower().endswith((".zst", ".zstd")) for p in paths) and importlib.util.find_spec("zstandard") is None:
        raise ImportError(
            "Reading .zst files needs the `zstandard` package: `pip install zstandard` (or transformers-calm[zst])."
        )
    _check_local_files(paths)
    file_format = formats.pop()
    options = {} if file_format == "json" else {"sample_by": sample_by}
    try:
        dataset = load_dataset(file_format, data_files=paths, split="train", streaming=streaming, **options)
    except ValueError as error:  # datasets: 'Instruction "train" corresponds to no data!' (files without a row)
        if "corresponds to no data" not in str(error):
            raise
        raise ValueError(f"{path} holds no document with text: pass files with at least one document.") from error
    # A streamed JSON dataset knows its columns from its first file; when it does not, a missing `text` field fails
    # at the first read instead.
    if dataset.column_names is not None and "text" not in dataset.column_names:
        raise ValueError(f"{path} has no `text` field (columns: {dataset.column_names}).")
    dataset = dataset.select_columns(["text"])

    # Empty documents would become a lone [BOS, EOS, PAD, PAD] chunk (blank lines of a text file): skip them.
    def non_empty(example):
        return bool(example["text"].strip())

    if streaming:
        return dataset.filter(non_empty)
    dataset = dataset.filter(non_empty, desc="Dropping empty documents")
    if len(dataset) == 0:
        raise ValueError(f"{path} holds no document with text: pass files with at least one non-empty document.")
    return dataset


def _check_local_files(paths):
    """Local files and patterns that match nothing, or empty files, as an error that names them (datasets would raise
    a `DatasetGenerationError` or a bare `StopIteration` deep inside its builders). Remote paths are left to it."""
    for path in paths:
        if "://" in path:
            continue
        matches = glob.glob(path, recursive=True) if glob.has_magic(path) else [path]
        if not matches or not all(os.path.exists(match) for match in matches):
            raise FileNotFoundError(f"No data file at {path!r} (looked in {os.getcwd()}): check the path or pattern.")
        if all(os.path.isfile(match) and os.path.getsize(match) == 0 for match in matches):
            raise ValueError(f"The data file {matches[0]} is empty: pass files with at least one document.")


def split_documents(documents, process_index, num_processes):
    """This process's part of a stream of documents (a `datasets.IterableDataset`), no document in two parts: whole
    shards (files) when their number divides by `num_processes` (`datasets.distributed.split_dataset_by_node`, each
    process then reads its own files only), otherwise every `num_processes`-th document from `process_index` on (each
    process then reads every file but tokenises its own documents only). Splitting the documents, not the blocks, is
    what spares the tokenisation: `split_dataset_by_node` applied to documents that do not split by shard would still
    let every process tokenise them all, and keep every n-th block.

    The blocks built from the part carry `process_split = (process_index, num_processes)` when [`load_blocks`] made
    them, which tells the trainers that the stream is this process's already."""
    if documents.n_shards % num_processes == 0:
        return split_dataset_by_node(documents, rank=process_index, world_size=num_processes)
    return documents.filter(lambda _, index: index % num_processes == process_index, with_indices=True)


def build_blocks(
    dataset,
    tokenizer,
    patch_size,
    block_size,
    num_proc=None,
    overwrite_cache=False,
    packing="aligned",
    map_batch_size=1000,
):
    """Tokenise the documents of `dataset` (a `text` column) and group them into blocks of `block_size` tokens.

    Args:
        dataset (`datasets.Dataset` or `datasets.IterableDataset`): documents, e.g. from [`load_documents`]. An
            iterable dataset is tokenised and packed lazily, as it is read, into the same blocks.
        tokenizer: see [`documents_to_ids`].
        patch_size (`int`): K; `block_size` must be a multiple of it so that every block holds whole chunks.
        block_size (`int`): tokens per block.
        num_proc (`int`, *optional*): processes for `datasets.map` (not for an iterable dataset).
        overwrite_cache (`bool`): recompute instead of reusing the `datasets` cache.
        packing (`str`): `"aligned"` (default) or `"stream"`, see the module docstring.
        map_batch_size (`int`): documents per `datasets.map` batch (the `run_clm` 1,000); the blocks of a batch are cut
            from its documents alone, and a resumed stream re-tokenises at most one batch.

    Returns:
        A dataset of the same kind with `input_ids` and `labels` (a copy of `input_ids`), each `block_size` long.
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

    if isinstance(dataset, IterableDataset):
        # Same functions, same map batches (1,000 rows), hence the same blocks; no cache, no worker processes.
        columns = dataset.column_names or ["text"]
        tokenized = dataset.map(tokenize, batched=True, batch_size=map_batch_size, remove_columns=columns)
        return tokenized.map(group_texts, batched=True, batch_size=map_batch_size)
    description = "+EOS, padded to a multiple of K" if packing == "aligned" else "no EOS, no padding"
    dataset = dataset.map(
        tokenize,
        batched=True,
        batch_size=map_batch_size,
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        load_from_cache_file=not overwrite_cache,
        desc=f"Tokenising documents ({description})",
    )
    return dataset.map(
        group_texts,
        batched=True,
        batch_size=map_batch_size,
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
    streaming=False,
    process_index=0,
    num_processes=1,
    map_batch_size=1000,
):
    """The training (and validation) blocks of the example scripts: [`load_documents`] then [`build_blocks`] per file.

    Args:
        train_file (`str` or `list[str]`), validation_file (`str`, *optional*): see [`load_documents`].
        tokenizer, patch_size, block_size, num_proc, overwrite_cache, map_batch_size: see [`build_blocks`].
        packing (`str`): packing of the training blocks; `eval_packing` that of the validation blocks (default:
            `packing`).
        sample_by (`str`): how plain-text files are cut into documents.
        max_eval_samples (`int`, *optional*): keep at most this many validation blocks.
        main_process_first (*optional*): `TrainingArguments.main_process_first`, so that in distributed runs the main
            process fills the `datasets` cache before the others read it. The checks run after it, on every process,
            so that bad input stops all of them instead of leaving some waiting at its barrier.
        streaming (`bool`): stream the training blocks (a `datasets.IterableDataset`, tokenised as training reads it;
            see the module docstring). The validation blocks are always built up front: an evaluation needs them all.
        process_index (`int`), num_processes (`int`): this process and the number of processes of the run
            (`TrainingArguments.process_index` / `world_size`). A streamed training set holds this process's part of
            the documents only.

    Returns:
        `(train_dataset, eval_dataset)`, `eval_dataset` being `None` without `validation_file`.

    Raises:
        `ValueError` when a file holds fewer than `block_size` tokens, so that it gives no block at all (streaming:
        when a process's part of the documents gives none; the check reads up to its first block).
    """
    files = {"train": (train_file, packing, streaming), "validation": (validation_file, eval_packing or packing, False)}
    context = main_process_first(desc="dataset preprocessing") if main_process_first else contextlib.nullcontext()
    with context:
        blocks = {}
        for split, (path, split_packing, split_streaming) in files.items():
            if not path:
                continue
            documents = load_documents(path, sample_by, streaming=split_streaming)
            if split_streaming and num_processes > 1:
                documents = split_documents(documents, process_index, num_processes)
            blocks[split] = build_blocks(
                documents,
                tokenizer,
                patch_size,
                block_size,
                num_proc=num_proc,
                overwrite_cache=overwrite_cache,
                packing=split_packing,
                map_batch_size=map_batch_size,
            )
    for split, dataset in blocks.items():
        if isinstance(dataset, IterableDataset):
            # Reads up to the first block (at least one map batch); a later iteration starts afresh. Not `take(1)`: a
            # dataset split by example applies the split after it, so that one process would get nothing. Only the
            # process without blocks raises: torchrun (and accelerate launch) then stops the others.
            empty = next(iter(dataset), None) is None
        else:
            empty = len(dataset) == 0
        if empty:
            raise ValueError(
                f"The {split} data holds fewer than block_size={block_size} tokens"
                + (
                    " on one of the processes (each streams its own part)"
                    if isinstance(dataset, IterableDataset)
                    else ""
                )
                + ": no block to train/evaluate on. Use more text or a smaller --block_size."
            )
    if streaming:
        blocks["train"].process_split = (process_index, num_processes)  # see `split_documents`
    eval_dataset = blocks.get("validation")
    if eval_dataset is not None and max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(max_eval_samples, len(eval_dataset))))
    return blocks["train"], eval_dataset
