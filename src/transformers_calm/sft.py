"""Supervised fine-tuning (SFT) data for CALM: conversations (`messages`) and prompt/completion examples as
chunk-aligned training sequences with a completion-only loss, packing, a collator, and the same prompt for generation.

CALM predicts whole chunks of K tokens: the hidden state of chunk i predicts chunk i + 1 of the labels, and a target
chunk counts only when none of its K labels is -100 ([`CalmForCausalLM.forward`]). A completion that began inside
the prompt's last chunk would share that chunk with the prompt: masked, the answer's first tokens would never be
trained; unmasked, the model would be trained to write the end of the prompt. So the prompt (everything before the
answer: for conversations, the chat template's rendering up to the assistant's turn, `add_generation_prompt=True`) is
right-padded with the pad token to a multiple of K, and the answer starts a chunk. Generation must read the prompt the
same way: [`sft_generation_inputs`] pads it identically. (CALM's `generate` fills a prompt at its start instead, with
masked tokens: the answer still starts a chunk, but the prompt's tokens fall into other chunks than in training, and
its end has none of the pads training read; `calm serve --pad_prompts_at_end` pads as training does.)

An example becomes `prompt + pads | completion + EOS + pads`: labels -100 on the prompt's chunks, the token ids on
the completion's (its EOS and trailing pads included, as in the `aligned` pre-training recipe of `data.py`, so that the
model learns to stop). The pads are read as tokens (attention mask 1): the backbone's pad embedding is the zero
vector, which is also what a masked token contributes, and generation reads them the same way.
"""

from dataclasses import dataclass

import torch

from .data import pad_to_chunks

IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "CalmSFTDataCollator",
    "align_example",
    "encode_example",
    "encode_prompt",
    "example_prompt",
    "generate_completions",
    "pack_sft_dataset",
    "sft_generation_inputs",
    "tokenize_sft_dataset",
]

COLUMNS_HELP = (
    "SFT examples need a `messages` column (a conversation: a list of {'role', 'content'} ending with an assistant "
    "turn) or `prompt` and `completion` columns (strings, or lists of messages); rename yours, e.g. "
    "dataset.rename_columns({'query': 'prompt', 'response': 'completion'})"
)


def _check_chat_template(tokenizer) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"The tokenizer ({type(tokenizer).__name__}) has no chat template, so conversations (`messages`) cannot be "
            "rendered: set `tokenizer.chat_template` to a Jinja template (e.g. the chat model's you mimic), or pass "
            "prompt/completion data with string prompts."
        )


def _render(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    _check_chat_template(tokenizer)
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


def encode_prompt(tokenizer, prompt) -> list[int]:
    """Token ids of a prompt as training and generation read it (before the padding to a chunk boundary).

    Args:
        tokenizer: the model's tokenizer.
        prompt (`str` or `list[dict]`): a string, tokenized with the tokenizer's special tokens (e.g. BOS); or a
            conversation so far, rendered by the chat template with `add_generation_prompt=True`.
    """
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    if isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt):
        return _render(tokenizer, list(prompt), add_generation_prompt=True)
    raise ValueError(f"A prompt is a string or a list of messages, got {type(prompt).__name__}.")


def _last_assistant_turn(messages) -> int:
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get("role") == "assistant":
            return index
    raise ValueError(
        "The conversation has no assistant turn to train on (roles: "
        f"{[m.get('role') for m in messages]}): SFT trains on the last assistant message."
    )


def example_prompt(example):
    """The prompt of an SFT example (a dict with `messages` or `prompt`), as [`encode_prompt`] takes it: the
    conversation before the last assistant turn (all of it when it has none), or the `prompt` field."""
    if "messages" in example:
        messages = list(example["messages"])
        has_answer = any(m.get("role") == "assistant" for m in messages)
        return messages[: _last_assistant_turn(messages)] if has_answer else messages
    if "prompt" in example:
        return example["prompt"]
    raise ValueError(f"{COLUMNS_HELP}; got columns {sorted(example)}.")


def _split_rendering(tokenizer, prompt_messages, full_messages) -> tuple[list[int], list[int]]:
    """`(prompt_ids, completion_ids)` of a conversation: the completion is what the full rendering adds after the
    rendering of the prompt with the generation prompt, which must be its prefix."""
    prompt_ids = _render(tokenizer, prompt_messages, add_generation_prompt=True)
    full_ids = _render(tokenizer, full_messages, add_generation_prompt=False)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        # The answer could not start a chunk where generation will start it: refuse rather than train elsewhere.
        raise ValueError(
            "The chat template renders the prompt with add_generation_prompt=True differently from the start of the "
            f"whole conversation ({tokenizer.decode(prompt_ids)!r} is not a prefix of "
            f"{tokenizer.decode(full_ids)!r}): use a template whose generation prompt opens the assistant turn "
            "exactly as the conversation renders it."
        )
    return prompt_ids, full_ids[len(prompt_ids) :]


def encode_example(example: dict, tokenizer) -> tuple[list[int], list[int]]:
    """`(prompt_ids, completion_ids)` of an SFT example, before alignment.

    Args:
        example (`dict`): `{"messages": [...]}` (the last assistant turn is the completion, everything before it the
            prompt, earlier assistant turns included), or `{"prompt": ..., "completion": ...}` with strings (the
            completion tokenized alone, without special tokens) or lists of messages (TRL's conversational
            prompt-completion format).
        tokenizer: the model's tokenizer; conversations need its `chat_template`.
    """
    if "messages" in example:
        messages = list(example["messages"])
        end = _last_assistant_turn(messages)
        return _split_rendering(tokenizer, messages[:end], messages[: end + 1])
    if "prompt" in example and "completion" in example:
        prompt, completion = example["prompt"], example["completion"]
        if isinstance(prompt, str) != isinstance(completion, str):
            raise ValueError("`prompt` and `completion` must both be strings or both be lists of messages.")
        if isinstance(prompt, str):
            return encode_prompt(tokenizer, prompt), list(tokenizer(completion, add_special_tokens=False)["input_ids"])
        return _split_rendering(tokenizer, list(prompt), list(prompt) + list(completion))
    raise ValueError(f"{COLUMNS_HELP}; got columns {sorted(example)}.")


def align_example(
    prompt_ids: list[int],
    completion_ids: list[int],
    patch_size: int,
    pad_token_id: int,
    eos_token_id: int | None,
    max_length: int | None = None,
    completion_only_loss: bool = True,
) -> dict[str, list[int]]:
    """The training sequence of one example: `prompt + pads | completion + EOS + pads`, every part whole chunks.

    Args:
        prompt_ids, completion_ids (`list[int]`): from [`encode_example`]; the prompt must not be empty (its last
            chunk's state predicts the completion's first chunk).
        patch_size (`int`): K.
        pad_token_id (`int`): the pad that fills the prompt's and the completion's last chunk.
        eos_token_id (`int`, *optional*): appended to the completion unless it already ends with it (`None`: no EOS).
        max_length (`int`, *optional*): keep the first `max_length` tokens (a multiple of K).
        completion_only_loss (`bool`): labels -100 on the prompt's chunks (default); `False` trains on the prompt too.

    Returns:
        `{"input_ids": [...], "labels": [...]}`, of a length that is a multiple of K.
    """
    if not prompt_ids:
        raise ValueError("The prompt is empty: it needs at least one token (e.g. the tokenizer's BOS).")
    if max_length is not None and (max_length <= 0 or max_length % patch_size):
        raise ValueError(f"max_length ({max_length}) must be a positive multiple of K = {patch_size}.")
    prompt = pad_to_chunks(prompt_ids, patch_size, pad_token_id)
    completion = list(completion_ids)
    if eos_token_id is not None and (not completion or completion[-1] != eos_token_id):
        completion.append(eos_token_id)
    completion = pad_to_chunks(completion, patch_size, pad_token_id)
    labels = ([IGNORE_INDEX] * len(prompt) if completion_only_loss else list(prompt)) + completion
    input_ids = prompt + completion
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def _check_columns(columns) -> None:
    if "messages" not in columns and not {"prompt", "completion"} <= set(columns):
        raise ValueError(f"{COLUMNS_HELP}; got columns {sorted(columns)}.")


def _check_special_tokens(tokenizer) -> None:
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "The tokenizer has no pad token, which CALM's SFT needs to pad the prompt to a chunk boundary: use the "
            "tokenizer the autoencoder was trained with (transformers_calm.data.prepare_tokenizer adds [PAD])."
        )


def tokenize_sft_dataset(
    dataset, tokenizer, patch_size: int, max_length: int | None = None, completion_only_loss: bool = True, **map_kwargs
):
    """An SFT dataset (`messages`, or `prompt` and `completion`) as aligned `input_ids` and `labels` (see
    [`align_example`]); examples with no target chunk left after truncation are dropped.

    Args:
        dataset (`datasets.Dataset` or `datasets.IterableDataset`): the examples.
        tokenizer: the model's tokenizer (with a pad token; a chat template for conversations).
        patch_size (`int`): K.
        max_length (`int`, *optional*): truncate every sequence to this many tokens (a multiple of K).
        completion_only_loss (`bool`): mask the prompt's chunks (default).
        map_kwargs: passed to `datasets.map` (e.g. `num_proc`, `desc`).
    """
    # A streamed dataset may not know its columns before its first example.
    columns = dataset.column_names or list(next(iter(dataset)).keys())
    _check_columns(columns)
    _check_special_tokens(tokenizer)
    eos = tokenizer.eos_token_id

    def tokenize(example):
        prompt_ids, completion_ids = encode_example(example, tokenizer)
        return align_example(
            prompt_ids, completion_ids, patch_size, tokenizer.pad_token_id, eos, max_length, completion_only_loss
        )

    tokenized = dataset.map(tokenize, remove_columns=columns, **map_kwargs)
    # The first chunk is never a target (nothing precedes it): an example needs a valid label after it.
    return tokenized.filter(lambda example: any(label != IGNORE_INDEX for label in example["labels"][patch_size:]))


def _pack_batch(examples, block_size: int, patch_size: int, pad_token_id: int) -> dict[str, list]:
    """Greedy packing of a map batch: examples in order, a new block when the next one does not fit."""
    blocks = {"input_ids": [], "labels": [], "position_ids": []}
    current = {"input_ids": [], "labels": [], "position_ids": []}

    def close():
        if not current["input_ids"]:
            return
        fill = block_size - len(current["input_ids"])
        # The filler is a segment of its own (positions restart at 0) of pads that are never targets.
        current["input_ids"] += [pad_token_id] * fill
        current["labels"] += [IGNORE_INDEX] * fill
        current["position_ids"] += list(range(fill // patch_size))
        for key in blocks:
            blocks[key].append(current[key])
            current[key] = []

    for input_ids, labels in zip(examples["input_ids"], examples["labels"], strict=True):
        if len(input_ids) > block_size:
            raise ValueError(
                f"An example of {len(input_ids)} tokens does not fit a block of {block_size}: tokenize with "
                "max_length <= block_size."
            )
        if len(current["input_ids"]) + len(input_ids) > block_size:
            close()
        # An example's first chunk is never a target: in a pack, the state before it belongs to another example.
        labels = [IGNORE_INDEX] * patch_size + list(labels[patch_size:])
        current["input_ids"] += list(input_ids)
        current["labels"] += labels
        current["position_ids"] += list(range(len(input_ids) // patch_size))
    close()
    return blocks


def pack_sft_dataset(dataset, block_size: int, patch_size: int, pad_token_id: int, **map_kwargs):
    """Aligned examples (from [`tokenize_sft_dataset`]) packed into blocks of `block_size` tokens.

    Whole examples, in order, go into a block until the next one does not fit; the rest of the block is pad (labels
    -100). Every example keeps its alignment (it starts a chunk, its prompt is masked) and gets chunk positions from 0
    (`position_ids`, one per chunk): with no attention mask, transformers' attention reads the restarting positions as
    packed sequences and lets every example attend to itself only, as it will at generation (TRL's padding-free packing
    does the same per token). That holds without a cache, as in training (`use_cache=False`, CALM's default there).

    Args:
        dataset: with `input_ids` and `labels`, each a multiple of K long and at most `block_size`.
        block_size (`int`): tokens per block (a multiple of K).
        patch_size (`int`): K.
        pad_token_id (`int`): the filler token.
        map_kwargs: passed to `datasets.map` (e.g. `batch_size`: the examples one block list is packed from).
    """
    if block_size % patch_size:
        raise ValueError(f"block_size ({block_size}) must be a multiple of K = {patch_size}.")
    return dataset.map(
        _pack_batch,
        batched=True,
        remove_columns=dataset.column_names,
        fn_kwargs={"block_size": block_size, "patch_size": patch_size, "pad_token_id": pad_token_id},
        **map_kwargs,
    )


@dataclass
class CalmSFTDataCollator:
    """Batches aligned SFT examples for [`CalmTrainer`].

    Unpacked examples are right-padded to the longest of the batch (pad ids, attention mask 0, labels -100); packed
    blocks (with `position_ids`) are stacked as they are, without an attention mask (see [`pack_sft_dataset`]).

    Args:
        pad_token_id (`int`): the tokenizer's pad token.
        patch_size (`int`): K; every example's length must be a multiple of it.
    """

    pad_token_id: int
    patch_size: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        if any(length % self.patch_size for length in lengths):
            raise ValueError(
                f"SFT examples must be whole chunks of K = {self.patch_size} tokens, got lengths {lengths}."
            )
        if "position_ids" in features[0]:
            if len(set(lengths)) > 1:
                raise ValueError(f"Packed blocks must have the same length, got {sorted(set(lengths))}.")
            batch = {key: torch.tensor([f[key] for f in features]) for key in ("input_ids", "labels", "position_ids")}
            # Packed examples stay apart only without a cache (transformers reads restarting positions as separate
            # sequences only then): in eval mode the model would otherwise build one, and examples would see each other.
            return {**batch, "use_cache": False}
        width = max(lengths)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for feature, length in zip(features, lengths, strict=True):
            fill = width - length
            batch["input_ids"].append(list(feature["input_ids"]) + [self.pad_token_id] * fill)
            batch["attention_mask"].append([1] * length + [0] * fill)
            batch["labels"].append(list(feature.get("labels", feature["input_ids"])) + [IGNORE_INDEX] * fill)
        return {key: torch.tensor(value) for key, value in batch.items()}


def sft_generation_inputs(prompts, tokenizer, patch_size: int, device=None) -> dict[str, torch.Tensor]:
    """The inputs of `model.generate` for SFT prompts, read as in training: each prompt right-padded with the pad
    token to a multiple of K (pads are tokens: attention mask 1), so the answer starts a chunk; rows left-padded to the
    longest with whole masked chunks, and chunk `position_ids` that start at 0 on every row's first real chunk.

    Args:
        prompts (`list`): strings, conversations (lists of messages) or SFT examples (dicts: their
            [`example_prompt`]).
        tokenizer: the model's tokenizer.
        patch_size (`int`): K.
        device (*optional*): where the tensors go.

    Returns:
        `{"input_ids", "attention_mask", "position_ids"}`: pass them all to `generate`.
    """
    _check_special_tokens(tokenizer)
    rows = []
    for prompt in prompts:
        ids = encode_prompt(tokenizer, example_prompt(prompt) if isinstance(prompt, dict) else prompt)
        if not ids:
            raise ValueError("An empty prompt: it needs at least one token (e.g. the tokenizer's BOS).")
        rows.append(pad_to_chunks(ids, patch_size, tokenizer.pad_token_id))
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    chunks = attention_mask.unflatten(1, (-1, patch_size)).any(-1).long()
    position_ids = (chunks.cumsum(-1) - 1).clamp(min=0)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    return {key: value.to(device) for key, value in inputs.items()} if device is not None else inputs


@torch.no_grad()
def generate_completions(model, tokenizer, prompts, batch_size: int = 64, **generate_kwargs) -> list[str]:
    """The decoded answers (new tokens only, special tokens skipped) of a CALM (or a peft model around one) to SFT
    prompts, generated with [`sft_generation_inputs`] in batches.

    Args:
        model: the model; its `config.patch_size` is K.
        tokenizer: its tokenizer.
        prompts (`list`): as [`sft_generation_inputs`] takes them.
        batch_size (`int`): prompts per `generate` call.
        generate_kwargs: passed to `generate` (e.g. `max_new_tokens=8, do_sample=False`).
    """
    patch_size = model.config.patch_size
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers = []
    try:
        for start in range(0, len(prompts), batch_size):
            inputs = sft_generation_inputs(prompts[start : start + batch_size], tokenizer, patch_size, device)
            sequences = model.generate(**inputs, **generate_kwargs)
            new = sequences[:, inputs["input_ids"].shape[1] :]
            answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return answers
