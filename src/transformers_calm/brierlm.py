"""BrierLM: a likelihood-free language-model metric (Shao et al., 2025, arXiv 2510.27688, section 4), for CALM and for
any transformers causal LM.

The Brier score of an outcome y under a distribution P is `2 P(y) - sum_x P(x)^2` (higher is better; 1 for a model
that puts all its mass on y). With two independent samples x1, x2 of the model,

    1{x1 = y} + 1{x2 = y} - 1{x1 = x2}

is an unbiased estimate of it, so it needs samples only, no likelihood. Brier-n treats the next n tokens as the
outcome (compared with cumulative products of per-token equalities, as the official code does). Brier-1..4 are
averaged over the evaluated positions and

    BrierLM = 100 * (Brier-1 * Brier-2 * Brier-3 * Brier-4) ** (1/4).

When a Brier-n is <= 0 the geometric mean is undefined: BrierLM is reported as 0 and a warning says which Brier-n
caused it (the official code clamps the product at 0, so it would report a positive number when two of them are
negative; we do not).

Pieces:
- [`brier_terms`] / [`brier_scores`]: the estimator on given samples; plain torch (the `evaluate` module
  `metrics/brierlm/brierlm.py`, loaded with [`load_brierlm`] or `evaluate.load(BRIERLM_PATH)`, and the Trainer use
  it, so `evaluate` stays optional).
- [`model_brier_terms`]: per-position terms for one batch of blocks, the samples drawn from a model.
- [`score_model`]: the whole protocol (blocks from texts or ids, batches, progress bar, aggregation).
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from .compat import CACHE_NAME

__all__ = [
    "BRIERLM_PATH",
    "DEFAULT_CONTEXT_LENGTH",
    "MAX_N",
    "BrierTerms",
    "brier_scores",
    "brier_terms",
    "brierlm_from_briers",
    "is_calm_model",
    "load_brierlm",
    "make_blocks",
    "model_brier_terms",
    "score_model",
    "scores_from_terms",
]

# The `evaluate` module shipped inside the package: `evaluate.load(BRIERLM_PATH)` works offline wherever the package is
# installed (a bare `evaluate.load("brierlm")` only finds `./brierlm/brierlm.py` relative to the working directory).
BRIERLM_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics", "brierlm")

MAX_N = 4
# Block sizes of the reference protocol (official scripts): 8192 tokens for CALM, 2048 for the autoregressive baseline.
DEFAULT_CONTEXT_LENGTH = {"calm": 8192, "causal_lm": 2048}
# Exact collision terms of a model with logits are enumerated when vocab_size ** (max_n - 1) is at most this (toy
# vocabularies); otherwise they are Monte Carlo estimates (exact for n = 1 either way).
ENUMERATION_LIMIT = 1024


def load_brierlm(**kwargs):
    """`evaluate.load(BRIERLM_PATH, **kwargs)`: the BrierLM `evaluate` metric shipped with the package (offline).

    Its `compute(samples_1=..., samples_2=..., references=..., max_n=4)` returns the dict of [`brier_scores`].
    """
    import evaluate  # optional dependency: only this loader needs it

    return evaluate.load(BRIERLM_PATH, **kwargs)


# ------------------------------------------------------------------------------------------------------ estimator


def _as_ngrams(sequences, max_n: int, name: str) -> torch.LongTensor:
    """`(num_positions, max_n)` token ids: the first `max_n` tokens of every sequence."""
    if isinstance(sequences, torch.Tensor):
        if sequences.dim() < 1 or sequences.shape[-1] < max_n:
            raise ValueError(
                f"{name} must have a last dimension of at least max_n = {max_n}, got {tuple(sequences.shape)}."
            )
        return sequences[..., :max_n].long()
    rows = []
    for index, sequence in enumerate(sequences):
        sequence = list(sequence.tolist() if isinstance(sequence, torch.Tensor) else sequence)
        if len(sequence) < max_n:
            raise ValueError(
                f"{name}[{index}] has {len(sequence)} tokens; every sequence needs at least max_n = {max_n} (pass a "
                "smaller max_n to score shorter n-grams)."
            )
        rows.append(sequence[:max_n])
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), max_n)


def _check_max_n(max_n) -> int:
    if isinstance(max_n, bool) or not isinstance(max_n, int) or max_n < 1:
        raise ValueError(f"max_n must be a positive integer, got {max_n!r}.")
    return max_n


def _prefix_match(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`1{a[:n] = b[:n]}` for n = 1..len, as a cumulative product of per-token equalities (float64)."""
    return (a == b).long().cumprod(-1).to(torch.float64)


def brier_terms(samples_1, samples_2, references, max_n: int = MAX_N) -> torch.Tensor:
    """Per-position Brier estimates `1{x1[:n]=y[:n]} + 1{x2[:n]=y[:n]} - 1{x1[:n]=x2[:n]}` for n = 1..max_n.

    Args:
        samples_1, samples_2: two independent model samples of the next tokens at every position: tensors `(..., L)`
            or lists of token-id sequences, with L >= max_n (only the first max_n tokens are used).
        references: the true next tokens, same layout.
        max_n: the longest n-gram.

    Returns:
        `torch.float64` tensor `(..., max_n)` with values in {-1, 0, 1, 2}; its mean over positions estimates Brier-n
        without bias.
    """
    max_n = _check_max_n(max_n)
    x1 = _as_ngrams(samples_1, max_n, "samples_1")
    x2 = _as_ngrams(samples_2, max_n, "samples_2")
    y = _as_ngrams(references, max_n, "references")
    if not (x1.shape == x2.shape == y.shape):
        raise ValueError(
            f"samples_1, samples_2 and references must describe the same positions, got {tuple(x1.shape[:-1])}, "
            f"{tuple(x2.shape[:-1])} and {tuple(y.shape[:-1])}."
        )
    return _prefix_match(x1, y) + _prefix_match(x2, y) - _prefix_match(x1, x2)


def brierlm_from_briers(briers: Sequence[float]) -> float:
    """100 x the geometric mean of Brier-1..N, or 0 (with a warning saying why) when one of them is <= 0."""
    briers = [float(b) for b in briers]
    if not briers:
        raise ValueError("briers is empty.")
    if any(math.isnan(b) for b in briers):
        return float("nan")
    bad = [f"Brier-{n} = {b:.4g}" for n, b in enumerate(briers, start=1) if b <= 0]
    if bad:
        warnings.warn(
            f"BrierLM is reported as 0 because {', '.join(bad)} <= 0: the geometric mean of Brier-1..{len(briers)} "
            "is only defined for positive values. A non-positive Brier-n means the model's two samples agree with "
            "each other at least twice as often as each matches the reference (typically an untrained or collapsed "
            "model), or too few positions were scored for a noisy estimate.",
            stacklevel=2,
        )
        return 0.0
    return 100.0 * math.exp(sum(math.log(b) for b in briers) / len(briers))


def scores_from_terms(terms: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """`{brier1..brierN, brierlm}` of per-position terms `(..., N)`: means over all positions, then BrierLM."""
    if terms.numel() == 0:
        raise ValueError("No position to score.")
    means = terms.reshape(-1, terms.shape[-1]).to(torch.float64).mean(0).tolist()
    scores = {f"{prefix}brier{n}": value for n, value in enumerate(means, start=1)}
    scores[f"{prefix}brierlm"] = brierlm_from_briers(means)
    return scores


def brier_scores(samples_1, samples_2, references, max_n: int = MAX_N) -> dict[str, float]:
    """Brier-1..max_n (means over positions) and BrierLM from two samples and the reference at every position.

    This is what the `evaluate` module's `compute` returns: `{"brier1": ..., ..., "brier4": ..., "brierlm": ...}`.
    """
    return scores_from_terms(brier_terms(samples_1, samples_2, references, max_n=max_n))


# -------------------------------------------------------------------------------------------- sampling from models


def _block_seed(seed: int, block_index: int) -> int:
    digest = hashlib.sha256(f"brierlm:{int(seed)}:{int(block_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _block_generators(seed: int, block_indices: Sequence[int], device: torch.device) -> list[torch.Generator]:
    """One generator per block, seeded from (seed, block index): a block's draws do not depend on the batching."""
    return [torch.Generator(device=device).manual_seed(_block_seed(seed, index)) for index in block_indices]


def _sample_tokens(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.LongTensor:
    """Inverse-CDF sampling: one token per row of `probs (..., V)` from pre-drawn uniforms `(...)` in [0, 1)."""
    cdf = probs.to(torch.float64).cumsum(-1)
    target = (uniforms.to(torch.float64) * cdf[..., -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def _full_cache_layers(cache, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (keys, values) of every layer of a batch's cache; they must hold all `length` positions."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"Expected a transformers Cache with layers, got {type(cache).__name__}.")
    out = []
    for layer in layers:
        if not isinstance(layer, DynamicLayer) or getattr(layer, "is_sliding", False):
            raise NotImplementedError(
                f"BrierLM roll-outs need a full-attention DynamicCache; got a {type(layer).__name__} layer "
                "(sliding-window and other cache layers are not supported)."
            )
        if layer.keys.shape[-2] != length:
            raise NotImplementedError(f"Cache layer holds {layer.keys.shape[-2]} positions, expected {length}.")
        out.append((layer.keys, layer.values))
    return out


class _Rows:
    """Continuations of many rows at once through the KV cache of a batch of blocks.

    Row r continues block `blocks[r]` after its first `lengths[r]` positions: the cache is cut to the longest prefix
    of the rows, copied per row, and the positions past a row's prefix are masked out of its attention (a 2-D
    padding mask with a hole), while its own fed tokens stay visible. Position ids continue from the prefix length.
    """

    def __init__(self, forward, layers, blocks: torch.LongTensor, lengths: torch.LongTensor):
        context = int(lengths.max())
        self.forward = forward
        self.cache = DynamicCache()
        for index, (keys, values) in enumerate(layers):
            self.cache.update(keys[blocks, :, :context], values[blocks, :, :context], index)
        self.mask = (torch.arange(context, device=lengths.device)[None] < lengths[:, None]).long()
        self.next_position = lengths.clone()

    def feed(self, input_ids: torch.LongTensor, width: int) -> torch.Tensor:
        """Feed `width` more positions per row (tokens for an LM, `width * K` tokens for CALM); returns the model's
        per-position output (logits or hidden states) `(rows, width, ...)`."""
        rows = input_ids.shape[0]
        self.mask = torch.cat([self.mask, self.mask.new_ones(rows, width)], dim=1)
        position_ids = self.next_position[:, None] + torch.arange(width, device=input_ids.device)
        output = self.forward(input_ids, self.mask, position_ids, self.cache)
        self.next_position = self.next_position + width
        return output


def _chunks(count: int, size: int):
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


def is_calm_model(model) -> bool:
    """True for CALM language models (this package's `CalmForCausalLM`, or the same class loaded as remote code)."""
    return hasattr(model, "generative_head") and hasattr(model, "decode_latents")


@dataclass
class BrierTerms:
    """Per-position Brier terms of one batch of blocks (output of [`model_brier_terms`]).

    Attributes:
        terms (`torch.FloatTensor` `(batch, positions, max_n)`): the sampled estimates (average them for Brier-n).
        exact_terms (`torch.FloatTensor` `(batch, positions, max_n)`, *optional*): models with logits only:
            `2 P(y[:n]) - sum_x P(x)^2` with P(y[:n]) exact (teacher-forced chain rule) and the collision term exact
            for n = 1 and, for n > 1, exact by enumeration (small vocabularies) or a Monte Carlo estimate.
        exact_collision (`str`, *optional*): "enumeration", "monte_carlo", or "exact" (max_n = 1).
        samples_1, samples_2, references (`torch.LongTensor` `(batch, positions, max_n)`, *optional*): the samples
            behind `terms` when `terms == brier_terms(samples_1, samples_2, references)` (not for CALM chunk
            positions with K < max_n, whose accuracy and collision terms come from different samples).
        positions (`str`): "chunk" (CALM chunk starts) or "token" (every token).
    """

    terms: torch.Tensor
    exact_terms: torch.Tensor | None = None
    exact_collision: str | None = None
    samples_1: torch.Tensor | None = None
    samples_2: torch.Tensor | None = None
    references: torch.Tensor | None = None
    positions: str = "token"

    @classmethod
    def from_samples(cls, samples_1, samples_2, references, max_n: int, positions: str = "token") -> BrierTerms:
        """The terms of two samples against the references (`brier_terms`), keeping the samples behind them."""
        return cls(
            terms=brier_terms(samples_1, samples_2, references, max_n),
            samples_1=samples_1,
            samples_2=samples_2,
            references=references,
            positions=positions,
        )


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
) -> BrierTerms:
    """Per-position BrierLM terms of a batch of blocks `input_ids (batch, T)`, with samples drawn from `model`.

    Every block is scored on its own from its first token (no padding, no context beyond the block). The random
    draws of a block come from a generator seeded with `(seed, block_indices[b])`, drawn up front in a fixed order, so
    results do not depend on how blocks are batched (`block_indices` defaults to `0..batch-1`; pass the blocks'
    global indices when scoring a data set in several calls).

    - CALM ([`CalmForCausalLM`]), `positions="chunk"` (default): the official evaluation. One forward pass over the
      block; two energy-head samples per chunk position, decoded by argmax. K >= max_n: the n-gram is the first n
      tokens of the next chunk (n-grams start only at chunk boundaries; positions = chunks 1..N-1). K < max_n: the
      official roll-out (s = ceil(max_n / K) chunks): accuracy terms from the teacher-forced samples of chunks
      p+1..p+s, collision term from joint samples, continuing sample 1's chunks through the KV cache and drawing two
      head samples per step (rows whose samples already differ are not rolled out).
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

    Args:
        rollout_batch_size: rows (position x sample) continued per forward pass; each row holds a copy of its
            block's KV cache up to its position, so this bounds memory.

    Returns:
        [`BrierTerms`].
    """
    max_n = _check_max_n(max_n)
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
        return _calm_terms(model, input_ids, generators, max_n, positions, rollout_batch_size)
    positions = positions or "token"
    if positions != "token":
        raise ValueError(
            f"A token-level causal LM is scored at every token position (positions='token'), got {positions!r}."
        )
    return _causal_lm_terms(model, input_ids, generators, max_n, exact, exact_collision, rollout_batch_size)


# -------------------------------------------------------------------------------------------------- causal LMs


def _causal_lm_terms(model, input_ids, generators, max_n, exact, exact_collision, rows_per_pass) -> BrierTerms:
    batch, length = input_ids.shape
    num_positions = length - max_n  # context x_0..x_i, i = 0..length-1-max_n
    if num_positions < 1:
        raise ValueError(f"Blocks of {length} tokens are too short for {max_n}-grams (need at least {max_n + 1}).")
    device = input_ids.device
    # All uniforms of a block, drawn first: (sample, position, step).
    uniforms = torch.stack(
        [torch.rand((2, num_positions, max_n), generator=g, device=device, dtype=torch.float64) for g in generators]
    )

    def forward(ids, mask, position_ids, cache):
        return model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True, **{CACHE_NAME: cache}
        ).logits

    outputs = model(input_ids=input_ids, use_cache=max_n > 1)
    logits = outputs.logits
    vocab_size = logits.shape[-1]
    if max_n == 1:
        exact_collision = False  # sum_x p(x)^2 of the next token is exact anyway
    elif exact_collision is None:
        exact_collision = exact and vocab_size ** (max_n - 1) <= ENUMERATION_LIMIT
    samples = torch.empty((batch, 2, num_positions, max_n), dtype=torch.long, device=device)
    gold = torch.empty((batch, length - 1), dtype=torch.float64, device=device)  # p(x_{i+1} | x_<=i)
    sum_squares = torch.zeros((batch, num_positions, max_n), dtype=torch.float64, device=device)  # along sample 1
    first_probs = None
    if exact and exact_collision:
        first_probs = torch.empty((batch, num_positions, vocab_size), dtype=torch.float64, device=device)
    slice_size = max(1, 2**24 // max(vocab_size, 1))
    for part in _chunks(length - 1, slice_size):
        probs = logits[:, part].float().softmax(-1)
        gold[:, part] = probs.gather(-1, input_ids[:, part.start + 1 : part.stop + 1, None]).squeeze(-1).double()
        scored = slice(part.start, min(part.stop, num_positions))
        if scored.start >= scored.stop:
            continue
        probs = probs[:, : scored.stop - scored.start]
        for s in range(2):
            samples[:, s, scored, 0] = _sample_tokens(probs, uniforms[:, s, scored, 0])
        sum_squares[:, scored, 0] = probs.double().pow(2).sum(-1)
        if first_probs is not None:
            first_probs[:, scored] = probs.double()
    del logits

    layers = _full_cache_layers(getattr(outputs, CACHE_NAME), length) if max_n > 1 else None
    outputs = None
    if max_n > 1:
        # Rows (block, sample, position), sorted by position so that a pass needs the shortest cache prefix.
        b_idx, s_idx, p_idx = torch.meshgrid(
            torch.arange(batch, device=device),
            torch.arange(2, device=device),
            torch.arange(num_positions, device=device),
            indexing="ij",
        )
        order = p_idx.flatten().argsort(stable=True)
        b_idx, s_idx, p_idx = b_idx.flatten()[order], s_idx.flatten()[order], p_idx.flatten()[order]
        for part in _chunks(len(order), rows_per_pass):
            rb, rs, rp = b_idx[part], s_idx[part], p_idx[part]
            rows = _Rows(forward, layers, rb, rp + 1)
            tokens = samples[rb, rs, rp, 0]
            for step in range(1, max_n):
                probs = rows.feed(tokens[:, None], 1)[:, -1].float().softmax(-1)
                tokens = _sample_tokens(probs, uniforms[rb, rs, rp, step])
                samples[rb, rs, rp, step] = tokens
                first = rs == 0
                sum_squares[rb[first], rp[first], step] = probs[first].double().pow(2).sum(-1)

    references = input_ids.unfold(1, max_n, 1)[:, 1 : num_positions + 1]
    x1, x2 = samples[:, 0], samples[:, 1]
    result = BrierTerms.from_samples(x1, x2, references, max_n)
    if exact:
        chain = gold.unfold(1, max_n, 1)[:, :num_positions].cumprod(-1)  # P(y[:n]), teacher-forced
        if exact_collision and max_n > 1:
            collision = _enumerated_collision(forward, layers, input_ids, first_probs, max_n, rows_per_pass)
            result.exact_collision = "enumeration"
        else:
            agree = _prefix_match(x1, x2)
            collision = sum_squares.clone()
            collision[..., 1:] = agree[..., :-1] * sum_squares[..., 1:]
            result.exact_collision = "exact" if max_n == 1 else "monte_carlo"
        result.exact_terms = 2 * chain - collision
    return result


def _enumerated_collision(forward, layers, input_ids, first_probs, max_n, rows_per_pass) -> torch.Tensor:
    """sum over n-grams x of P(x)^2 at every position, by enumerating every (n-1)-token prefix (tiny vocabularies)."""
    batch, num_positions, vocab_size = first_probs.shape
    device = input_ids.device
    collision = torch.empty((batch, num_positions, max_n), dtype=torch.float64, device=device)
    collision[..., 0] = first_probs.pow(2).sum(-1)
    weights = first_probs  # P(prefix), prefixes of length 1 in lexicographic order
    for depth in range(1, max_n):
        grids = torch.meshgrid(*[torch.arange(vocab_size, device=device)] * depth, indexing="ij")
        prefixes = torch.stack(grids, -1).reshape(-1, depth)  # (V^depth, depth), lexicographic
        num_prefixes = prefixes.shape[0]
        b_idx, p_idx, x_idx = torch.meshgrid(
            torch.arange(batch, device=device),
            torch.arange(num_positions, device=device),
            torch.arange(num_prefixes, device=device),
            indexing="ij",
        )
        b_idx, p_idx, x_idx = b_idx.flatten(), p_idx.flatten(), x_idx.flatten()
        next_probs = torch.empty((len(b_idx), vocab_size), dtype=torch.float64, device=device)
        for part in _chunks(len(b_idx), rows_per_pass):
            rows = _Rows(forward, layers, b_idx[part], p_idx[part] + 1)
            next_probs[part] = rows.feed(prefixes[x_idx[part]], depth)[:, -1].float().softmax(-1).double()
        next_probs = next_probs.reshape(batch, num_positions, num_prefixes, vocab_size)
        collision[..., depth] = (weights.pow(2) * next_probs.pow(2).sum(-1)).sum(-1)
        weights = (weights.unsqueeze(-1) * next_probs).reshape(batch, num_positions, -1)
    return collision


# --------------------------------------------------------------------------------------------------------- CALM


def _calm_terms(model, input_ids, generators, max_n, positions, rows_per_pass) -> BrierTerms:
    K = model.config.patch_size
    batch, length = input_ids.shape
    if length % K:
        raise ValueError(f"CALM blocks must be a multiple of K = {K} tokens, got {length}.")
    num_chunks = length // K
    if positions == "chunk":
        span = math.ceil(max_n / K)  # chunks an n-gram covers
        num_positions = num_chunks - span  # hidden position p predicts chunks p+1..p+span
    else:
        span = math.ceil((K - 1 + max_n) / K)
        num_positions = length - K - max_n + 1  # start tokens K..length-max_n
    if num_positions < 1:
        raise ValueError(f"Blocks of {length} tokens are too short for {max_n}-grams with K = {K}.")
    steps = span - 1
    device = input_ids.device
    head = model.generative_head
    noise_size = head.noise_size
    dtype = next(head.parameters()).dtype
    predicted = num_chunks - 1

    def draw(g, shape):
        return torch.rand((*shape, noise_size), generator=g, device=device, dtype=dtype) - 0.5

    # Per block, first the teacher-forced head noise (sample, chunk position), then the roll-out noise.
    noise = torch.stack([draw(g, (2, predicted)) for g in generators])
    rollout_noise = torch.stack([draw(g, (steps, 2, predicted)) for g in generators]) if steps else None

    def forward(ids, mask, position_ids, cache):
        return model.model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True
        ).last_hidden_state

    def sample_chunks(hidden, noise):
        return model.decode_latents(head(hidden, noise=noise))

    outputs = model.model(input_ids=input_ids, use_cache=steps > 0)
    hidden = outputs.last_hidden_state[:, :predicted]
    teacher = sample_chunks(hidden.unsqueeze(1).expand(batch, 2, *hidden.shape[1:]), noise)  # (B, 2, N-1, K)
    layers = _full_cache_layers(outputs.cache, num_chunks) if steps else None
    outputs = None

    if positions == "chunk" and steps == 0:
        x1, x2 = teacher[:, 0, :, :max_n], teacher[:, 1, :, :max_n]
        references = input_ids[:, K:].unflatten(1, (predicted, K))[..., :max_n]
        return BrierTerms.from_samples(x1, x2, references, max_n, positions)

    if positions == "chunk":
        # Official roll-out for K < max_n (paper code `eval_brier`). Accuracy: teacher-forced samples of the span's
        # chunks (each from the true prefix; unbiased because the product vanishes unless the earlier tokens match).
        accuracy = [
            torch.cat([teacher[:, s, j : j + num_positions] for j in range(span)], dim=-1)[..., :max_n]
            for s in range(2)
        ]
        references = input_ids[:, K:].unfold(1, max_n, K)[:, :num_positions]
        # Collision: joint samples; both continue along sample 1's chunks (the indicator vanishes otherwise).
        joint = [
            torch.full((batch, num_positions, span * K), -1 - s, dtype=torch.long, device=device) for s in range(2)
        ]
        for s in range(2):
            joint[s][..., :K] = teacher[:, s, :num_positions]
        active = (joint[0][..., :K] == joint[1][..., :K]).all(-1).nonzero()
        rb_all, rp_all = active[:, 0], active[:, 1]
        order = rp_all.argsort(stable=True)
        rb_all, rp_all = rb_all[order], rp_all[order]
        for part in _chunks(len(rb_all), rows_per_pass):
            rb, rp = rb_all[part], rp_all[part]
            rows = _Rows(forward, layers, rb, rp + 1)
            agree = torch.ones(len(rb), dtype=torch.bool, device=device)
            for step in range(1, span):
                if not agree.any():
                    break
                state = rows.feed(joint[0][rb, rp, (step - 1) * K : step * K], 1)[:, -1]
                chunks = sample_chunks(state.unsqueeze(1).expand(-1, 2, -1), rollout_noise[rb, step - 1, :, rp])
                for s in range(2):
                    joint[s][rb, rp, step * K : (step + 1) * K] = chunks[:, s]
                agree = agree & (chunks[:, 0] == chunks[:, 1]).all(-1)
        terms = (
            _prefix_match(accuracy[0], references)
            + _prefix_match(accuracy[1], references)
            - _prefix_match(joint[0][..., :max_n], joint[1][..., :max_n])
        )
        return BrierTerms(terms=terms, positions=positions)

    # positions == "token": two independent roll-outs of `span` chunks from every chunk position.
    rollouts = torch.full((batch, 2, predicted, span * K), -1, dtype=torch.long, device=device)
    rollouts[..., :K] = teacher
    starts = torch.arange(K, length - max_n + 1, device=device)  # start token t = (p + 1) K + j
    chunk_pos, offset = starts // K - 1, starts % K
    if steps:
        last_offset = torch.full((predicted,), -1, dtype=torch.long, device=device).scatter_reduce(
            0, chunk_pos, offset, reduce="amax"
        )
        needed = torch.div(last_offset + max_n + K - 1, K, rounding_mode="floor") - 1  # roll-out steps per position
        needed = needed.masked_fill(last_offset < 0, 0)  # chunk positions where no n-gram starts
        rb_all, rs_all, rp_all = torch.meshgrid(
            torch.arange(batch, device=device),
            torch.arange(2, device=device),
            torch.arange(predicted, device=device),
            indexing="ij",
        )
        keep = (needed[rp_all] > 0).flatten()
        rb_all, rs_all, rp_all = rb_all.flatten()[keep], rs_all.flatten()[keep], rp_all.flatten()[keep]
        order = rp_all.argsort(stable=True)
        rb_all, rs_all, rp_all = rb_all[order], rs_all[order], rp_all[order]
        for part in _chunks(len(rb_all), rows_per_pass):
            rb, rs, rp = rb_all[part], rs_all[part], rp_all[part]
            rows = _Rows(forward, layers, rb, rp + 1)
            for step in range(1, int(needed[rp].max()) + 1):
                state = rows.feed(rollouts[rb, rs, rp, (step - 1) * K : step * K], 1)[:, -1]
                rollouts[rb, rs, rp, step * K : (step + 1) * K] = sample_chunks(
                    state, rollout_noise[rb, step - 1, rs, rp]
                )
    window = offset[:, None] + torch.arange(max_n, device=device)  # (Q, max_n) within the roll-out
    x1 = rollouts[:, 0][:, chunk_pos].gather(-1, window.expand(batch, -1, -1))
    x2 = rollouts[:, 1][:, chunk_pos].gather(-1, window.expand(batch, -1, -1))
    references = input_ids.unfold(1, max_n, 1)[:, starts]
    return BrierTerms.from_samples(x1, x2, references, max_n, positions)


# ------------------------------------------------------------------------------------------------- the protocol


def _model_max_tokens(model) -> int | None:
    config = model.config
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return None
    return limit * config.patch_size if is_calm_model(model) else limit


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
        positions: CALM only: "chunk" (default, the official chunk-aligned evaluation) or "token" (every token
            position; see [`model_brier_terms`] for what it measures). Other LMs are scored at every token.
        exact: other LMs only: also return `exact_brier1..` and `exact_brierlm` from the logits as a cross-check
            (exact for n = 1; for n > 1 exact or Monte Carlo, see `exact_collision`).
        exact_collision: enumerate every (n-1)-token prefix for an exact collision term (True), use the Monte Carlo
            estimate (False), or decide by vocabulary size (None).
        max_blocks: score only the first blocks (quick runs).
        rollout_batch_size: rows per roll-out pass (memory bound).
        progress: show a progress bar.
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

    max_n = _check_max_n(max_n)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    calm = is_calm_model(model)
    stream_input = texts is not None or not (isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2)
    if context_length is None and stream_input:
        context_length = DEFAULT_CONTEXT_LENGTH["calm" if calm else "causal_lm"]
        limit = _model_max_tokens(model)
        if limit is not None and limit < context_length:
            context_length = limit - limit % model.config.patch_size if calm else limit
    blocks = make_blocks(input_ids=input_ids, texts=texts, tokenizer=tokenizer, context_length=context_length)
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    if calm and blocks.shape[1] % model.config.patch_size:
        raise ValueError(f"context_length ({blocks.shape[1]}) must be a multiple of K = {model.config.patch_size}.")

    was_training = model.training
    model.eval()
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
