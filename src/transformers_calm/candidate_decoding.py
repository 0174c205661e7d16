"""Counting identical candidates, and decoding only the tokens the count needs (Shao et al., 2025, arXiv 2510.27688,
section 5: the batch approximation and `do_sample=False` choose among N head samples by how many decode to the same
chunk).

A candidate whose first k tokens equal no other candidate's of its row is unique whatever its later tokens, so on CPU
token k is decoded only for candidates still tied after k tokens, and the chosen candidate's remaining tokens after the
choice: with spread candidates, about one token per candidate instead of K. The counts and the choice are exactly those
of decoding every candidate.
"""

from collections.abc import Callable

import torch


def candidate_counts(candidates: torch.LongTensor) -> torch.LongTensor:
    """For candidates `(N, batch, K)`, how many of the row's N candidates equal each one: `(batch, N)`.

    Sorts each row's chunks lexicographically (stable sorts from the last token to the first) and measures the runs
    of equal chunks: O(K N log N) per row, where comparing all pairs would cost O(K N^2).
    """
    by_row = candidates.transpose(0, 1)  # (batch, N, K)
    batch_size, num, patch_size = by_row.shape
    order = torch.arange(num, device=candidates.device).expand(batch_size, num)
    for k in reversed(range(patch_size)):
        keys = torch.gather(by_row[..., k], 1, order)
        order = torch.gather(order, 1, torch.sort(keys, dim=1, stable=True).indices)
    ordered = torch.gather(by_row, 1, order.unsqueeze(-1).expand(-1, -1, patch_size))
    starts = torch.ones(batch_size, num, dtype=torch.bool, device=candidates.device)
    starts[:, 1:] = (ordered[:, 1:] != ordered[:, :-1]).any(-1)
    group = starts.long().cumsum(1) - 1
    sizes = torch.zeros_like(group).scatter_add_(1, group, torch.ones_like(group))
    return torch.empty_like(order).scatter_(1, order, torch.gather(sizes, 1, group))


def prefix_candidate_counts(
    token_at: Callable[[int, torch.LongTensor], torch.LongTensor],
    num: int,
    batch_size: int,
    patch_size: int,
    device: torch.device | str = "cpu",
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """[`candidate_counts`] of N candidates per row whose tokens are read lazily.

    A chunk whose first k tokens equal no other candidate's of its row has count 1 whatever its later tokens, so
    token k is read only for candidates whose first k tokens tie with another's. When the candidates differ early
    (a spread distribution: most of them by their first token) this reads about N tokens per row instead of N K.

    Args:
        token_at (`Callable`):
            `token_at(k, index)` returns token k (0 <= k < K) of the candidates `index`, a `LongTensor` of flat
            indices `n * batch_size + b` (candidate n of row b), as a `LongTensor` of the same length.
        num (`int`): N, candidates per row.
        batch_size (`int`): rows.
        patch_size (`int`): K, tokens per chunk.
        device (`torch.device` or `str`, *optional*, defaults to `"cpu"`): where the indices and counts live.

    Returns:
        `(counts, tokens)`: the counts `(batch, N)`, and the tokens read `(N, batch, K)`, -1 where not read.
    """
    counts = torch.ones(num * batch_size, dtype=torch.long, device=device)
    tokens = torch.full((num * batch_size, patch_size), -1, dtype=torch.long, device=device)
    tied = torch.arange(num * batch_size, device=device)  # candidates whose prefix so far equals another's
    group = tied % batch_size  # class of equal prefixes; at first, the row
    for k in range(patch_size):
        tokens[tied, k] = token_at(k, tied).to(device)
        # Candidates fall into the same class when their class so far and token k agree.
        _, group, sizes = torch.unique(
            torch.stack([group, tokens[tied, k]], dim=-1), dim=0, return_inverse=True, return_counts=True
        )
        size = sizes[group]
        counts[tied] = size
        still = size > 1
        tied, group = tied[still], group[still]
        if len(tied) == 0:
            break
    return counts.view(num, batch_size).T, tokens.view(num, batch_size, patch_size)


def in_slices(function: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, step: int) -> torch.Tensor:
    """`function(rows)`, run on at most `step` rows at a time (the decoder's logits must not all materialise at once)
    and concatenated; one call, without a copy, when they fit."""
    if len(rows) <= step:
        return function(rows)
    return torch.cat([function(rows[i : i + step]) for i in range(0, len(rows), step)])


def decode_chosen_candidates(
    model,
    latents: torch.Tensor,
    choose: Callable[[torch.LongTensor], torch.LongTensor],
    max_logits: int = 2**26,
) -> torch.LongTensor:
    """The chunk `(batch, K)` of one of N candidate latents per row `(N, batch, latent_size)` of a `CalmForCausalLM`
    `model`, chosen by how many of the row's candidates decode to the same chunk: `choose(counts)` gets the counts
    `(batch, N)` (as [`candidate_counts`] of the decoded candidates) and returns an index per row `(batch,)`.

    On CPU through [`prefix_candidate_counts`]: the per-chunk half of the decoder runs for every
    candidate, and a token only while the candidate's tokens so far tie with another's; the chosen candidate's
    remaining tokens are decoded after the choice. This runs eagerly also inside a compiled decoding step (a
    graph break; a CPU step is bound by its products, not by launches). On accelerators every candidate is decoded
    in one batched product, inside the compiled graph (no data-dependent shapes, no host sync: CUDA graphs).
    """
    if latents.dim() != 3 or latents.shape[0] < 1:
        raise ValueError(f"latents must have shape (N, batch, latent_size) with N >= 1, got {tuple(latents.shape)}.")
    # A step compiled with fullgraph=True cannot leave its graph: there, every candidate is decoded.
    compile_config = getattr(model, "_calm_compile_config", None)  # the compiled step's (generation_calm)
    whole_graph = torch.compiler.is_compiling() and compile_config is not None and compile_config.fullgraph
    if latents.device.type == "cpu" and not whole_graph:
        return _decode_lazily(model, latents, choose, max_logits)
    chunks = model.decode_latents(latents, max_logits)
    return chunks[choose(candidate_counts(chunks)), torch.arange(latents.shape[1], device=latents.device)]


@torch.compiler.disable  # data-dependent shapes; see decode_chosen_candidates
def _decode_lazily(model, latents, choose, max_logits) -> torch.LongTensor:
    num, batch_size = latents.shape[:2]
    rows = torch.arange(batch_size, device=latents.device)
    decoder = model.autoencoder.decoder
    chunk_states = decoder.chunk_states(latents.reshape(num * batch_size, latents.shape[-1]))
    step = max(1, max_logits // model.config.vocab_size)

    def token_at(position: int, index: torch.LongTensor) -> torch.LongTensor:
        return in_slices(
            lambda states: decoder.argmax_token_ids(decoder.position_states(states, position)),
            chunk_states[index],
            step,
        )

    counts, tokens = prefix_candidate_counts(token_at, num, batch_size, model.config.patch_size, latents.device)
    pick = choose(counts)
    chunk = tokens[pick, rows]
    # The chosen candidates' unread tokens, in one argmax over the vocabulary.
    row, position = (chunk < 0).nonzero(as_tuple=True)
    if len(row):
        states = chunk_states[pick[row] * batch_size + row]
        for k in position.unique().tolist():
            at_k = position == k
            states[at_k] = decoder.position_states(states[at_k], k)
        chunk[row, position] = in_slices(decoder.argmax_token_ids, states, step)
    return chunk


__all__ = ["candidate_counts", "decode_chosen_candidates", "in_slices", "prefix_candidate_counts"]
