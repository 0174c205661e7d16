"""BrierLM samples of a token-level causal LM: any transformers model with `logits` and a full-attention cache.

Every position i = 0..T-1-max_n of a block (context x_0..x_i) gets two independent sampled continuations of max_n
tokens: the first token from the teacher-forced logits, the others by [`CacheRows`] roll-outs through the block's KV
cache. Because the model has logits, the exact Brier-n are computed beside the sampled ones as a cross-check: the
accuracy term `2 P(y[:n])` by the teacher-forced chain rule, the collision term `sum_x P(x)^2` exactly for n = 1 and,
for n > 1, by enumerating every (n-1)-token prefix (toy vocabularies) or by the official Monte Carlo estimate.
"""

from __future__ import annotations

import torch

from ..compat import CACHE_NAME
from .cache_rows import CacheRows, full_cache_layers, row_slices
from .estimator import prefix_match
from .terms import BrierTerms

__all__ = ["ENUMERATION_LIMIT", "causal_lm_max_tokens", "causal_lm_terms", "enumerated_collision", "sample_tokens"]

# Exact collision terms of a model with logits are enumerated when vocab_size ** (max_n - 1) is at most this (toy
# vocabularies); otherwise they are Monte Carlo estimates (exact for n = 1 either way).
ENUMERATION_LIMIT = 1024
# Softmax over at most this many logits at a time (`batch x positions x vocab`), so that a real vocabulary over a long
# block never materialises float32 probabilities for the whole block at once.
_PROBS_PER_SLICE = 2**24


def causal_lm_max_tokens(model) -> int | None:
    """The longest context of a token-level LM in tokens (`max_position_embeddings`), or None when it has none."""
    return getattr(model.config, "max_position_embeddings", None)


def sample_tokens(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.LongTensor:
    """Inverse-CDF sampling: one token per row of `probs (..., V)` from pre-drawn uniforms `(...)` in [0, 1).

    Drawing the uniforms up front (rather than calling `torch.multinomial` per step) fixes every draw of a block
    before any forward pass, so that the samples do not depend on how rows are batched into roll-out passes.
    """
    cdf = probs.to(torch.float64).cumsum(-1)
    # Scaled by the total, so that probabilities that do not quite sum to 1 in float32 cannot overshoot the CDF.
    target = (uniforms.to(torch.float64) * cdf[..., -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def _cached_forward(model):
    """The [`CacheRows`] forward of a transformers causal LM: logits of new tokens given a cache and a 2-D mask."""

    def forward(ids, mask, position_ids, cache):
        # The cache argument's name depends on the transformers release (`past_key_values` before 5.24).
        return model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True, **{CACHE_NAME: cache}
        ).logits

    return forward


def causal_lm_terms(
    model, input_ids: torch.LongTensor, generators, max_n: int, exact: bool, exact_collision, rows_per_pass: int
) -> BrierTerms:
    """The [`BrierTerms`] of a token-level causal LM on blocks `input_ids (batch, T)` (on the model's device).

    Args:
        generators: one `torch.Generator` per block; each block's uniforms are drawn from its own, up front.
        exact: also compute `exact_terms` from the logits.
        exact_collision: enumerate the collision term (True), estimate it along sample 1 (False), or decide by
            vocabulary size (None: enumerate when `vocab_size ** (max_n - 1) <= ENUMERATION_LIMIT`).
        rows_per_pass: roll-out rows (block x sample x position) per forward pass.
    """
    batch, length = input_ids.shape
    num_positions = length - max_n  # context x_0..x_i, i = 0..length-1-max_n
    if num_positions < 1:
        raise ValueError(f"Blocks of {length} tokens are too short for {max_n}-grams (need at least {max_n + 1}).")
    device = input_ids.device
    # All uniforms of a block, drawn first: (sample, position, step).
    uniforms = torch.stack(
        [torch.rand((2, num_positions, max_n), generator=g, device=device, dtype=torch.float64) for g in generators]
    )
    forward = _cached_forward(model)

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
    slice_size = max(1, _PROBS_PER_SLICE // max(vocab_size, 1))
    for part in row_slices(length - 1, slice_size):
        probs = logits[:, part].float().softmax(-1)
        gold[:, part] = probs.gather(-1, input_ids[:, part.start + 1 : part.stop + 1, None]).squeeze(-1).double()
        scored = slice(part.start, min(part.stop, num_positions))
        if scored.start >= scored.stop:
            continue
        probs = probs[:, : scored.stop - scored.start]
        for s in range(2):
            samples[:, s, scored, 0] = sample_tokens(probs, uniforms[:, s, scored, 0])
        sum_squares[:, scored, 0] = probs.double().pow(2).sum(-1)
        if first_probs is not None:
            first_probs[:, scored] = probs.double()
    del logits

    layers = full_cache_layers(getattr(outputs, CACHE_NAME), length) if max_n > 1 else None
    outputs = None  # the cache layers are all that is needed from here on
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
        for part in row_slices(len(order), rows_per_pass):
            rb, rs, rp = b_idx[part], s_idx[part], p_idx[part]
            rows = CacheRows(forward, layers, rb, rp + 1)
            tokens = samples[rb, rs, rp, 0]
            for step in range(1, max_n):
                probs = rows.feed(tokens[:, None], 1)[:, -1].float().softmax(-1)
                tokens = sample_tokens(probs, uniforms[rb, rs, rp, step])
                samples[rb, rs, rp, step] = tokens
                # The Monte Carlo collision term is taken along sample 1's continuation only.
                first = rs == 0
                sum_squares[rb[first], rp[first], step] = probs[first].double().pow(2).sum(-1)

    references = input_ids.unfold(1, max_n, 1)[:, 1 : num_positions + 1]
    x1, x2 = samples[:, 0], samples[:, 1]
    result = BrierTerms.from_samples(x1, x2, references, max_n)
    if exact:
        chain = gold.unfold(1, max_n, 1)[:, :num_positions].cumprod(-1)  # P(y[:n]), teacher-forced
        if exact_collision and max_n > 1:
            collision = enumerated_collision(forward, layers, input_ids, first_probs, max_n, rows_per_pass)
            result.exact_collision = "enumeration"
        else:
            # sum_x P(x[:n])^2 = E[1{x1[:n-1] = x2[:n-1]} * sum_x p(x | x1[:n-1])^2] over the two samples.
            agree = prefix_match(x1, x2)
            collision = sum_squares.clone()
            collision[..., 1:] = agree[..., :-1] * sum_squares[..., 1:]
            result.exact_collision = "exact" if max_n == 1 else "monte_carlo"
        result.exact_terms = 2 * chain - collision
    return result


def enumerated_collision(forward, layers, input_ids, first_probs, max_n, rows_per_pass) -> torch.Tensor:
    """sum over n-grams x of P(x)^2 at every position `(batch, positions, max_n)`, by enumerating every (n-1)-token
    prefix through the cache (tiny vocabularies only: `vocab_size ** (max_n - 1)` rows per position).

    Args:
        forward, layers: the [`CacheRows`] forward of the model and the batch's cache layers.
        first_probs: `(batch, positions, vocab)` next-token probabilities at every position (float64).
    """
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
        for part in row_slices(len(b_idx), rows_per_pass):
            rows = CacheRows(forward, layers, b_idx[part], p_idx[part] + 1)
            next_probs[part] = rows.feed(prefixes[x_idx[part]], depth)[:, -1].float().softmax(-1).double()
        next_probs = next_probs.reshape(batch, num_positions, num_prefixes, vocab_size)
        collision[..., depth] = (weights.pow(2) * next_probs.pow(2).sum(-1)).sum(-1)
        # Lexicographic order again: prefix (x_1..x_d, x) is at index x_index * V + x.
        weights = (weights.unsqueeze(-1) * next_probs).reshape(batch, num_positions, -1)
    return collision
