"""The BrierLM protocol: blocks of text, per-block seeding, the model dispatch, and the aggregation over a data set.

- [`make_blocks`]: blocks `(num_blocks, T)` from texts, a token stream, documents or ready blocks.
- [`model_brier_terms`]: per-position terms of one batch of blocks, the samples drawn from a model (CALM or any
  transformers causal LM; see `calm.py` and `causal_lm.py`).
- [`score_model`]: the whole protocol (blocks, batches, progress bar, aggregation into Brier-n and BrierLM).
- [`load_brierlm`] / `BRIERLM_PATH`: the `evaluate` module of this folder.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import torch

from .calm import calm_max_tokens, calm_terms, chunk_size, is_calm_model
from .causal_lm import causal_lm_max_tokens, causal_lm_terms
from .estimator import MAX_N, brierlm_from_briers, check_max_n
from .terms import BrierTerms

__all__ = [
    "BRIERLM_PATH",
    "DEFAULT_CONTEXT_LENGTH",
    "SPACE_FILES",
    "chunk_aligned",
    "load_brierlm",
    "make_blocks",
    "model_brier_terms",
    "score_model",
]

# This folder is also the `evaluate` metric folder (`brierlm.py`, its card `README.md`, the Space's `app.py` and
# `requirements.txt`): `evaluate.load(BRIERLM_PATH)` works offline wherever the package is installed (a bare
# `evaluate.load("brierlm")` only finds `./brierlm/brierlm.py` relative to the working directory).
BRIERLM_PATH = os.path.dirname(os.path.abspath(__file__))
# The files of the folder that make the metric's Hub Space: the module, the one file it imports (relatively), the
# card and the Space app. The rest of the folder (the roll-outs) needs transformers_calm and stays out of the Space.
SPACE_FILES = ("brierlm.py", "estimator.py", "README.md", "app.py", "requirements.txt")
# Block sizes of the reference protocol (official scripts): 8192 tokens for CALM, 2048 for the autoregressive baseline.
DEFAULT_CONTEXT_LENGTH = {"calm": 8192, "causal_lm": 2048}


def load_brierlm(**kwargs):
    """`evaluate.load(BRIERLM_PATH, **kwargs)`: the BrierLM `evaluate` metric shipped with the package (offline).

    Its `compute(samples_1=..., samples_2=..., references=..., max_n=4)` returns the dict of [`brier_scores`].
    """
    import evaluate  # imported here: only this loader needs it

    return evaluate.load(BRIERLM_PATH, **kwargs)


# ------------------------------------------------------------------------------------------------------- seeding


def _block_seed(seed: int, block_index: int) -> int:
    """A 63-bit seed of (seed, block index), through a hash: neighbouring blocks get unrelated streams."""
    digest = hashlib.sha256(f"brierlm:{int(seed)}:{int(block_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _block_generators(seed: int, block_indices: Sequence[int], device: torch.device) -> list[torch.Generator]:
    """One generator per block, seeded from (seed, block index): a block's draws do not depend on the batching."""
    return [torch.Generator(device=device).manual_seed(_block_seed(seed, index)) for index in block_indices]


# -------------------------------------------------------------------------------------------------------- blocks


def make_blocks(input_ids=None, texts=None, tokenizer=None, context_length: int | None = None) -> torch.LongTensor:
    """Blocks `(num_blocks, context_length)` to score.

    - `texts` (with `tokenizer`): every document is tokenised with the tokenizer's defaults (the Llama-3 tokenizer adds
      BOS to each, as the official `run_clm` recipe), the documents are concatenated (no EOS, no padding) and cut into
      blocks of `context_length` tokens; the remainder is dropped.
    - `input_ids` as a 2-D tensor: used as the blocks (`context_length` must be None or its width).
    - `input_ids` as a 1-D tensor / list of ints (a token stream) or a list of token lists (documents, concatenated):
      cut into blocks like texts.
    """
    if (input_ids is None) == (texts is None):
        raise ValueError("Pass exactly one of input_ids or texts.")
    if texts is not None:
        if tokenizer is None:
            raise ValueError("texts need a tokenizer.")
        if isinstance(texts, str):
            texts = [texts]
        stream = [token for ids in tokenizer(list(texts))["input_ids"] for token in ids]
    elif isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
        if context_length is not None and context_length != input_ids.shape[1]:
            raise ValueError(
                f"input_ids are already blocks of {input_ids.shape[1]} tokens; context_length={context_length} differs."
            )
        return input_ids.long()
    elif isinstance(input_ids, torch.Tensor):
        stream = input_ids.reshape(-1).tolist()
    else:
        items = list(input_ids)
        if items and not isinstance(items[0], int):
            stream = [int(token) for ids in items for token in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        else:
            stream = [int(token) for token in items]
    if context_length is None:
        raise ValueError("context_length is needed to cut a token stream into blocks.")
    num_blocks = len(stream) // context_length
    if num_blocks == 0:
        raise ValueError(f"Only {len(stream)} tokens: not one block of context_length = {context_length}.")
    return torch.tensor(stream[: num_blocks * context_length], dtype=torch.long).reshape(num_blocks, context_length)


def _default_context_length(model) -> int:
    """The reference block size of the model's kind, capped at its maximum context (a multiple of K for CALM)."""
    if is_calm_model(model):
        context_length, limit = DEFAULT_CONTEXT_LENGTH["calm"], calm_max_tokens(model)
        if limit is not None and limit < context_length:
            context_length = limit - limit % chunk_size(model)
        return context_length
    context_length, limit = DEFAULT_CONTEXT_LENGTH["causal_lm"], causal_lm_max_tokens(model)
    return limit if limit is not None and limit < context_length else context_length


# ------------------------------------------------------------------------------------------------------ dispatch


@torch.no_grad()
def model_brier_terms(
    model,
    input_ids: torch.LongTensor,
    *,
    seed: int = 0,
    block_indices: Sequence[int] | None = None,
    max_n: int = MAX_N,
    positions: str | None = None,
    exact: bool = True,
    exact_collision: bool | None = None,
    rollout_batch_size: int = 64,
    patch_size: int | None = None,
) -> BrierTerms:
    """Per-position BrierLM terms of a batch of blocks `input_ids (batch, T)`, with samples drawn from `model`.

    Every block is scored on its own from its first token (no padding, no context beyond the block). The random
    draws of a block come from a generator seeded with `(seed, block_indices[b])`, drawn up front in a fixed order, so
    results do not depend on how blocks are batched (`block_indices` defaults to `0..batch-1`; pass the blocks'
    global indices when scoring a data set in several calls).

    - CALM ([`CalmForCausalLM`], recognised by `config.model_type == "calm"`), `positions="chunk"` (default): the
      official evaluation. One forward pass over the block; two energy-head samples per chunk position, decoded by
      argmax. K >= max_n: the n-gram is the first n tokens of the next chunk (n-grams start only at chunk boundaries;
      positions = chunks 1..N-1). K < max_n: the official roll-out (s = ceil(max_n / K) chunks): accuracy terms from
      the teacher-forced samples of chunks p+1..p+s, collision term from joint samples, continuing sample 1's chunks
      through the KV cache and drawing two head samples per step (rows whose samples already differ are not rolled
      out).
    - CALM, `positions="token"`: every token t >= K is the start of an n-gram. CALM reads whole chunks, so the n-gram
      starting at offset j of chunk c is predicted from the true chunks before c only (the first j tokens of chunk c
      are not given to the model): the samples are two independent roll-outs of the chunks covering it, each chunk
      fed back through the KV cache. For j > 0 this is the Brier score of P(x_t..x_{t+n-1} | x_<cK), not of the
      autoregressive P(. | x_<t); at j = 0 it equals the chunk-aligned estimate (same draws).
    - Any other causal LM: every position i = 0..T-1-max_n (context x_0..x_i, n-gram x_{i+1..i+n}); two independent
      sampled continuations of max_n tokens, batched through the KV cache. With `exact=True` also `exact_terms`:
      2 P(y) exact from the logits (teacher-forced chain rule), and the collision term sum_x P(x)^2 exact for n = 1;
      for n > 1 exact by enumerating all (n-1)-token prefixes (`exact_collision=True`, or automatically when
      vocab_size ** (max_n - 1) <= ENUMERATION_LIMIT) or else the official Monte Carlo estimate along sample 1
      (`1{x1[:n-1] = x2[:n-1]} * sum_x p(x | context, x1[:n-1])^2`).
    - Any other causal LM, `positions="chunk"` with `patch_size=K`: only the positions whose n-gram starts a chunk
      of K tokens (context x_0..x_{cK-1}, n-gram x_{cK..}, c = 1, 2, ...): the positions CALM's chunk-aligned
      estimate scores, with the same context, so that a token-level LM and a CALM of chunk size K are compared like
      for like (a token-level model is otherwise also scored inside chunks, where the chunk's first tokens are known).

    Args:
        rollout_batch_size: rows (position x sample) continued per forward pass; each row holds a copy of its
            block's KV cache up to its position, so this bounds memory.
        patch_size: token-level LMs with `positions="chunk"` only: K, the chunk size of the CALM to compare with.

    Returns:
        [`BrierTerms`].
    """
    max_n = check_max_n(max_n)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a batch of blocks (batch, T), got {tuple(input_ids.shape)}.")
    if rollout_batch_size < 1:
        raise ValueError(f"rollout_batch_size must be >= 1, got {rollout_batch_size}.")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    if block_indices is None:
        block_indices = range(input_ids.shape[0])
    block_indices = list(block_indices)
    if len(block_indices) != input_ids.shape[0]:
        raise ValueError(f"block_indices has {len(block_indices)} entries for {input_ids.shape[0]} blocks.")
    generators = _block_generators(seed, block_indices, device)
    if is_calm_model(model):
        positions = positions or "chunk"
        if positions not in ("chunk", "token"):
            raise ValueError(f"positions must be 'chunk' or 'token' for CALM, got {positions!r}.")
        if patch_size is not None and patch_size != chunk_size(model):
            raise ValueError(
                f"patch_size={patch_size} differs from this CALM's K = {chunk_size(model)}; leave it unset."
            )
        return calm_terms(model, input_ids, generators, max_n, positions, rollout_batch_size)
    positions = positions or "token"
    if positions not in ("chunk", "token"):
        raise ValueError(f"positions must be 'token' or 'chunk' for a token-level LM, got {positions!r}.")
    if (positions == "chunk") != (patch_size is not None):
        raise ValueError(
            "A token-level LM is scored at chunk-aligned positions with positions='chunk' and patch_size=K (the "
            "chunk size of the CALM to compare with); pass both or neither."
        )
    result = causal_lm_terms(model, input_ids, generators, max_n, exact, exact_collision, rollout_batch_size)
    return result if positions == "token" else chunk_aligned(result, patch_size)


def chunk_aligned(result: BrierTerms, patch_size: int) -> BrierTerms:
    """The positions of a token-level [`BrierTerms`] whose n-gram starts a chunk of `patch_size` tokens.

    Position i has context x_0..x_i and n-gram x_{i+1..}: it starts chunk c when i + 1 = cK, c >= 1. The samples were
    drawn for every position (the draws of the kept ones do not change), so this equals scoring those alone.
    """
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer (K), got {patch_size!r}.")
    keep = slice(patch_size - 1, None, patch_size)
    fields = ("terms", "exact_terms", "samples_1", "samples_2", "references")
    values = {name: getattr(result, name) for name in fields}
    values = {name: None if value is None else value[:, keep] for name, value in values.items()}
    if values["terms"].shape[1] == 0:
        raise ValueError(f"Blocks too short for one chunk-aligned position with patch_size = {patch_size}.")
    return BrierTerms(exact_collision=result.exact_collision, positions="chunk", **values)


# ------------------------------------------------------------------------------------------------- the protocol


def score_model(
    model,
    input_ids=None,
    texts=None,
    tokenizer=None,
    context_length: int | None = None,
    batch_size: int = 1,
    seed: int = 0,
    max_n: int = MAX_N,
    positions: str | None = None,
    exact: bool = True,
    exact_collision: bool | None = None,
    max_blocks: int | None = None,
    rollout_batch_size: int = 64,
    progress: bool = True,
    return_samples: bool = False,
    patch_size: int | None = None,
) -> dict:
    """BrierLM of a model: draw its samples on blocks of text and average the per-position estimates.

    Args:
        model: a [`CalmForCausalLM`] or any transformers causal LM with logits and a `DynamicCache` (e.g.
            `LlamaForCausalLM`); put on its device beforehand. It is run in eval mode (restored afterwards).
        input_ids, texts, tokenizer: the data (see [`make_blocks`]): blocks `(num_blocks, T)`, a token stream, a list
            of token lists, or raw documents with their tokenizer.
        context_length: block size T. Default: the reference protocol, 8192 tokens for CALM and 2048 for other LMs
            (capped at the model's maximum length). Every block is scored on its own from its first token, so T
            changes the number (the first positions of a block have little context): compare models at equal T.
        batch_size: blocks per forward pass.
        seed: results are deterministic for a fixed seed (block b draws from a generator seeded with (seed, b)), and
            do not depend on `batch_size` or `rollout_batch_size` up to floating-point effects of batching.
        max_n: longest n-gram (4 in the paper); BrierLM is the geometric mean of Brier-1..max_n.
        positions: CALM: "chunk" (default, the official chunk-aligned evaluation) or "token" (every token position;
            see [`model_brier_terms`] for what it measures). Other LMs: "token" (default, every position) or "chunk"
            with `patch_size` (only where an n-gram starts a chunk of K tokens: CALM's positions, like for like).
        exact: other LMs only: also return `exact_brier1..` and `exact_brierlm` from the logits as a cross-check
            (exact for n = 1; for n > 1 exact or Monte Carlo, see `exact_collision`).
        exact_collision: enumerate every (n-1)-token prefix for an exact collision term (True), use the Monte Carlo
            estimate (False), or decide by vocabulary size (None).
        max_blocks: score only the first blocks (quick runs).
        rollout_batch_size: rows per roll-out pass (memory bound).
        progress: show a progress bar.
        patch_size: token-level LMs with `positions="chunk"`: K, the chunk size of the CALM to compare with.
        return_samples: also return `samples_1`, `samples_2`, `references` (`(positions, max_n)` tensors) such that
            `brier_scores(samples_1, samples_2, references)` gives the same Brier-n (not available for CALM chunk
            positions with K < max_n).

    Returns:
        `dict` with `brier1`..`brier{max_n}` and `brierlm` (100 x geometric mean; 0 with a warning when a Brier-n is
        <= 0), `num_blocks`, `num_positions`, `context_length`, `positions`; for LMs with logits and `exact=True`
        also `exact_brier1..`, `exact_brierlm` and `exact_collision` ("enumeration", "monte_carlo", or "exact" when
        max_n = 1).
    """
    from tqdm.auto import tqdm

    max_n = check_max_n(max_n)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    calm = is_calm_model(model)
    stream_input = texts is not None or not (isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2)
    if context_length is None and stream_input:
        context_length = _default_context_length(model)
    blocks = make_blocks(input_ids=input_ids, texts=texts, tokenizer=tokenizer, context_length=context_length)
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    if calm and blocks.shape[1] % chunk_size(model):
        raise ValueError(f"context_length ({blocks.shape[1]}) must be a multiple of K = {chunk_size(model)}.")

    was_training = model.training
    model.eval()
    # Running sums of the per-position terms (float64) over the blocks so far; divided by `count` at the end.
    totals = exact_totals = None
    count = 0
    collected = {"samples_1": [], "samples_2": [], "references": []}
    method = None
    used_positions = None
    try:
        bar = tqdm(total=len(blocks), desc="BrierLM", unit="block", disable=not progress)
        for start in range(0, len(blocks), batch_size):
            batch = blocks[start : start + batch_size]
            result = model_brier_terms(
                model,
                batch,
                seed=seed,
                block_indices=range(start, start + len(batch)),
                max_n=max_n,
                positions=positions,
                exact=exact,
                exact_collision=exact_collision,
                rollout_batch_size=rollout_batch_size,
                patch_size=patch_size,
            )
            used_positions = result.positions
            terms = result.terms.reshape(-1, max_n)
            totals = terms.sum(0) if totals is None else totals + terms.sum(0)
            count += terms.shape[0]
            if result.exact_terms is not None:
                part = result.exact_terms.reshape(-1, max_n).sum(0)
                exact_totals = part if exact_totals is None else exact_totals + part
                method = result.exact_collision
            if return_samples:
                if result.samples_1 is None:
                    raise ValueError(
                        "return_samples is not available for CALM chunk positions with K < max_n: its accuracy and "
                        "collision terms come from different samples (the official roll-out)."
                    )
                for name in collected:
                    collected[name].append(getattr(result, name).reshape(-1, max_n).cpu())
            bar.update(len(batch))
            means = (totals / count).tolist()
            bar.set_postfix({f"brier{n}": f"{v:.4f}" for n, v in enumerate(means, start=1)}, refresh=False)
        bar.close()
    finally:
        model.train(was_training)

    means = (totals / count).tolist()
    scores = {f"brier{n}": value for n, value in enumerate(means, start=1)}
    scores["brierlm"] = brierlm_from_briers(means)
    if exact_totals is not None:
        exact_means = (exact_totals / count).tolist()
        scores.update({f"exact_brier{n}": value for n, value in enumerate(exact_means, start=1)})
        scores["exact_brierlm"] = brierlm_from_briers(exact_means)
        scores["exact_collision"] = method
    scores.update(
        num_blocks=len(blocks), num_positions=count, context_length=int(blocks.shape[1]), positions=used_positions
    )
    if return_samples:
        scores.update({name: torch.cat(parts) for name, parts in collected.items()})
    return scores
