"""BrierLM samples of CALM: the official chunk-aligned evaluation, its K < max_n roll-out, and every-token roll-outs.

CALM has no likelihood: its energy head turns a backbone state and uniform noise into a latent vector, which the
frozen autoencoder decodes (argmax) into the next chunk of K tokens. A BrierLM sample is one such draw.

This module drives the model through the public sampling API of [`CalmForCausalLM`] only, so that it keeps working
when the model's internals change (and for the same class loaded as remote code):

- `model(input_ids=..., use_cache=...)`: `.last_hidden_state` `(batch, num_chunks, hidden)` and `.cache`;
- `model(input_ids=chunks, chunk_attention_mask=..., position_ids=..., cache=..., use_cache=True)` to continue rows;
- `model.sample_head_noise(shape, generator=g)` and `model.sample_chunks(hidden_states, noise=noise)`;
- the config, read in [`chunk_size`] and [`calm_max_tokens`] only.
"""

from __future__ import annotations

import math

import torch

from .cache_rows import CacheRows, full_cache_layers, row_slices
from .estimator import prefix_match
from .terms import BrierTerms

__all__ = ["calm_max_tokens", "calm_terms", "chunk_size", "is_calm_model"]


def is_calm_model(model) -> bool:
    """True for CALM language models: this package's `CalmForCausalLM`, the same class loaded as remote code, or a
    wrapper that forwards `config` (PEFT). Decided by the config's `model_type`, not by the model's attributes."""
    return getattr(getattr(model, "config", None), "model_type", None) == "calm"


def chunk_size(model) -> int:
    """K, the tokens per chunk of a CALM model."""
    return model.config.patch_size


def calm_max_tokens(model) -> int | None:
    """The longest context of a CALM model in tokens, or None when the config sets none.

    The one place that knows where the limit lives: `CalmConfig.max_tokens`, the backbone's `max_position_embeddings`
    (it counts chunks) times K.
    """
    return getattr(model.config, "max_tokens", None)


def _cached_forward(model):
    """The [`CacheRows`] forward of CALM: backbone states of new chunks given a cache and a per-chunk mask."""

    def forward(ids, mask, position_ids, cache):
        # The mask has one entry per chunk (past + new): `chunk_attention_mask`, since `attention_mask` is per token.
        return model(
            input_ids=ids, chunk_attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True
        ).last_hidden_state

    return forward


def calm_terms(model, input_ids: torch.LongTensor, generators, max_n: int, positions: str, rows_per_pass: int):
    """The [`BrierTerms`] of CALM on blocks `input_ids (batch, T)` (on the model's device), T a multiple of K.

    Args:
        generators: one `torch.Generator` per block. All head noise of a block is drawn from it up front, in a fixed
            order (teacher-forced samples, then roll-out steps), so the draws do not depend on the batching.
        positions: "chunk" (official) or "token" (every token); see [`model_brier_terms`] for what each measures.
        rows_per_pass: roll-out rows per forward pass.
    """
    K = chunk_size(model)
    batch, length = input_ids.shape
    if length % K:
        raise ValueError(f"CALM blocks must be a multiple of K = {K} tokens, got {length}.")
    num_chunks = length // K
    if positions == "chunk":
        span = math.ceil(max_n / K)  # chunks an n-gram covers
        num_positions = num_chunks - span  # hidden position p predicts chunks p+1..p+span
    else:
        span = math.ceil((K - 1 + max_n) / K)  # an n-gram may start at the last token of a chunk
        num_positions = length - K - max_n + 1  # start tokens K..length-max_n
    if num_positions < 1:
        raise ValueError(f"Blocks of {length} tokens are too short for {max_n}-grams with K = {K}.")
    steps = span - 1  # roll-out steps beyond the teacher-forced chunk
    predicted = num_chunks - 1  # hidden states 0..N-2 predict chunks 1..N-1

    # Per block, first the teacher-forced head noise (sample, chunk position), then the roll-out noise.
    noise = torch.stack([model.sample_head_noise((2, predicted), generator=g) for g in generators])
    rollout_noise = None
    if steps:
        rollout_noise = torch.stack([model.sample_head_noise((steps, 2, predicted), generator=g) for g in generators])
    forward = _cached_forward(model)

    outputs = model(input_ids=input_ids, use_cache=steps > 0)
    hidden = outputs.last_hidden_state[:, :predicted]
    # Both samples from the same states, as an expanded view (one head call for the two).
    teacher = model.sample_chunks(hidden.unsqueeze(1).expand(batch, 2, *hidden.shape[1:]), noise=noise)  # (B,2,N-1,K)
    layers = full_cache_layers(outputs.cache, num_chunks) if steps else None
    outputs = None  # the cache layers are all that is needed from here on

    if positions == "chunk" and steps == 0:
        # K >= max_n: the n-gram is the first max_n tokens of the next chunk; one pass, no roll-out.
        x1, x2 = teacher[:, 0, :, :max_n], teacher[:, 1, :, :max_n]
        references = input_ids[:, K:].unflatten(1, (predicted, K))[..., :max_n]
        return BrierTerms.from_samples(x1, x2, references, max_n, positions)
    if positions == "chunk":
        return _official_rollout_terms(model, forward, layers, input_ids, teacher, rollout_noise, max_n, rows_per_pass)
    return _every_token_terms(model, forward, layers, input_ids, teacher, rollout_noise, max_n, rows_per_pass)


def _official_rollout_terms(model, forward, layers, input_ids, teacher, rollout_noise, max_n, rows_per_pass):
    """Chunk positions with K < max_n: the official roll-out (paper code `eval_brier`), span = ceil(max_n / K).

    Accuracy terms: the teacher-forced samples of the span's chunks, each drawn from the true prefix (unbiased, because
    the product of indicators vanishes unless the earlier tokens already match the reference). Collision term: joint
    samples; both continue along sample 1's chunks (the indicator vanishes unless the two agree so far), and rows
    whose samples already differ are not rolled out further.
    """
    K = chunk_size(model)
    batch, device = input_ids.shape[0], input_ids.device
    span = math.ceil(max_n / K)
    num_positions = input_ids.shape[1] // K - span
    accuracy = [
        torch.cat([teacher[:, s, j : j + num_positions] for j in range(span)], dim=-1)[..., :max_n] for s in range(2)
    ]
    references = input_ids[:, K:].unfold(1, max_n, K)[:, :num_positions]
    # Different fill values (-1, -2) for the two samples: unsampled tokens never count as a collision.
    joint = [torch.full((batch, num_positions, span * K), -1 - s, dtype=torch.long, device=device) for s in range(2)]
    for s in range(2):
        joint[s][..., :K] = teacher[:, s, :num_positions]
    active = (joint[0][..., :K] == joint[1][..., :K]).all(-1).nonzero()
    rb_all, rp_all = active[:, 0], active[:, 1]
    order = rp_all.argsort(stable=True)  # by position: a pass needs the shortest cache prefix
    rb_all, rp_all = rb_all[order], rp_all[order]
    for part in row_slices(len(rb_all), rows_per_pass):
        rb, rp = rb_all[part], rp_all[part]
        rows = CacheRows(forward, layers, rb, rp + 1)
        agree = torch.ones(len(rb), dtype=torch.bool, device=device)
        for step in range(1, span):
            if not agree.any():
                break
            state = rows.feed(joint[0][rb, rp, (step - 1) * K : step * K], 1)[:, -1]
            chunks = model.sample_chunks(state.unsqueeze(1).expand(-1, 2, -1), noise=rollout_noise[rb, step - 1, :, rp])
            for s in range(2):
                joint[s][rb, rp, step * K : (step + 1) * K] = chunks[:, s]
            agree = agree & (chunks[:, 0] == chunks[:, 1]).all(-1)
    terms = (
        prefix_match(accuracy[0], references)
        + prefix_match(accuracy[1], references)
        - prefix_match(joint[0][..., :max_n], joint[1][..., :max_n])
    )
    return BrierTerms(terms=terms, positions="chunk")


def _every_token_terms(model, forward, layers, input_ids, teacher, rollout_noise, max_n, rows_per_pass):
    """Every token t >= K starts an n-gram: two independent roll-outs of the chunks covering it, from every chunk
    position, each chunk fed back through the KV cache (only as many steps as the position's n-grams need)."""
    K = chunk_size(model)
    batch, length = input_ids.shape
    device = input_ids.device
    predicted = length // K - 1
    span = math.ceil((K - 1 + max_n) / K)
    rollouts = torch.full((batch, 2, predicted, span * K), -1, dtype=torch.long, device=device)
    rollouts[..., :K] = teacher
    starts = torch.arange(K, length - max_n + 1, device=device)  # start token t = (p + 1) K + j
    chunk_pos, offset = starts // K - 1, starts % K
    if rollout_noise is not None:
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
        order = rp_all.argsort(stable=True)  # by position: a pass needs the shortest cache prefix
        rb_all, rs_all, rp_all = rb_all[order], rs_all[order], rp_all[order]
        for part in row_slices(len(rb_all), rows_per_pass):
            rb, rs, rp = rb_all[part], rs_all[part], rp_all[part]
            rows = CacheRows(forward, layers, rb, rp + 1)
            for step in range(1, int(needed[rp].max()) + 1):
                state = rows.feed(rollouts[rb, rs, rp, (step - 1) * K : step * K], 1)[:, -1]
                rollouts[rb, rs, rp, step * K : (step + 1) * K] = model.sample_chunks(
                    state, noise=rollout_noise[rb, step - 1, rs, rp]
                )
    window = offset[:, None] + torch.arange(max_n, device=device)  # (Q, max_n) within the roll-out
    x1 = rollouts[:, 0][:, chunk_pos].gather(-1, window.expand(batch, -1, -1))
    x2 = rollouts[:, 1][:, chunk_pos].gather(-1, window.expand(batch, -1, -1))
    references = input_ids.unfold(1, max_n, 1)[:, starts]
    return BrierTerms.from_samples(x1, x2, references, max_n, "token")
