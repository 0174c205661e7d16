"""What CALM's backbone reads (Shao et al., 2025, arXiv 2510.27688, section 3; the official `embed_proj`): one input
vector per chunk, compressed from the chunk's K token embeddings, and which chunks it attends to.

A token mask is per token (as transformers' `attention_mask`), the backbone's attention mask per chunk: a chunk is
attended to when any of its tokens is, and padded tokens contribute a zero embedding to their chunk.
"""

import torch
from torch import nn

from .compat import cache_max_length


def input_compression(hidden_size: int, patch_size: int) -> nn.Sequential:
    """The official input compression: the K token embeddings of a chunk, concatenated in token order, to one
    vector (`Linear(K * hidden, 2 * hidden)`, SiLU, `Linear(2 * hidden, hidden)`, LayerNorm with eps 1e-6)."""
    return nn.Sequential(
        nn.Linear(patch_size * hidden_size, 2 * hidden_size),
        nn.SiLU(),
        nn.Linear(2 * hidden_size, hidden_size),
        nn.LayerNorm(hidden_size, eps=1e-6),
    )


def compress_chunks(
    compression: nn.Module, inputs_embeds: torch.Tensor, patch_size: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Token embeddings `(batch, num_chunks * K, hidden)` to chunk vectors `(batch, num_chunks, hidden)`.

    Tokens where `token_mask` is 0 contribute a zero embedding, whatever their id (the official model reads its
    `[PAD]` id, whose embedding row is zero), so a partly padded chunk is read the same way for any pad id.
    """
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[1] == 0 or inputs_embeds.shape[1] % patch_size:
        raise ValueError(
            "inputs_embeds are token embeddings of shape (batch_size, sequence_length, hidden_size) with "
            f"sequence_length a positive multiple of K = {patch_size}, got {tuple(inputs_embeds.shape)}. Already "
            "compressed chunk vectors (batch_size, num_chunks, hidden_size) go in chunk_embeds."
        )
    if token_mask is not None:
        inputs_embeds = inputs_embeds * token_mask.unsqueeze(-1).to(inputs_embeds.dtype)
    return compression(inputs_embeds.unflatten(1, (-1, patch_size)).flatten(-2))


def chunk_masks(
    attention_mask: torch.Tensor | None,
    chunk_attention_mask: torch.Tensor | None,
    cache,
    batch_size: int,
    num_chunks: int,
    patch_size: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`(token_mask, chunk_attention_mask)` of new chunks: the token mask of the new tokens (for the compression)
    and the backbone's mask over past and new chunks, from a per-token `attention_mask` or a per-chunk one (not
    both), each checked against the cache's length."""
    if attention_mask is not None and chunk_attention_mask is not None:
        raise ValueError("Pass attention_mask (one entry per token) or chunk_attention_mask (per chunk), not both.")
    K = patch_size
    # A static cache (transformers' `StaticCache`) has a fixed length; a chunk mask over all of it keeps the shapes
    # of every decoding step the same, which a compiled step needs (slots after the current chunk are hidden by
    # causality). Its length so far is a tensor: it is read only where a mask has to be checked against it.
    full_static_mask = (
        chunk_attention_mask is not None
        and cache is not None
        and cache.is_compileable
        and chunk_attention_mask.shape == (batch_size, cache_max_length(cache))
    )
    past = cache.get_seq_length() if cache is not None and not full_static_mask else 0
    if attention_mask is not None:
        if attention_mask.shape != (batch_size, (past + num_chunks) * K):
            raise ValueError(
                f"attention_mask must have one entry per token, past included: shape ({batch_size}, "
                f"{(past + num_chunks) * K}) for {past} cached and {num_chunks} new chunks of K = {K}, got "
                f"{tuple(attention_mask.shape)}. For one entry per chunk pass chunk_attention_mask instead."
            )
        return attention_mask[:, past * K :], attention_mask.unflatten(1, (-1, K)).any(-1).to(attention_mask.dtype)
    if (
        chunk_attention_mask is not None
        and not full_static_mask
        and chunk_attention_mask.shape != (batch_size, past + num_chunks)
    ):
        raise ValueError(
            f"chunk_attention_mask must have one entry per chunk, past included: shape ({batch_size}, "
            f"{past + num_chunks}), got {tuple(chunk_attention_mask.shape)}."
        )
    return None, chunk_attention_mask


__all__ = ["chunk_masks", "compress_chunks", "input_compression"]
