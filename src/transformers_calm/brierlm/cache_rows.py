"""Roll-outs from many positions of a batch at once, through the batch's KV cache (shared by both roll-outs).

BrierLM draws continuations from every scored position of a block: for a token-level LM the max_n - 1 tokens after
each position, for CALM the chunks after each chunk position. Running one forward pass per position would repeat the
whole prefix every time. Instead the block is read once with `use_cache=True`, and a "row" continues block `b` after
its first `n` positions from a copy of that block's cache cut to `n` positions: many rows (positions x samples) are
continued per forward pass, and each pass costs only the new positions.

Rows of one pass have different prefix lengths; the cache is cut to the longest one, and the cache positions past a
row's own prefix are masked out of its attention (a 2-D padding mask with a hole between the prefix and the fed
positions). Sorting rows by prefix length before splitting them into passes keeps that waste small.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

__all__ = ["CacheRows", "full_cache_layers", "row_slices"]

# forward(input_ids, attention_mask, position_ids, cache) -> per-position output (logits or hidden states); the mask
# covers the cache positions and the fed ones.
Forward = Callable[[torch.LongTensor, torch.Tensor, torch.LongTensor, DynamicCache], torch.Tensor]


def full_cache_layers(cache, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (keys, values) of every layer of a batch's cache; they must hold all `length` positions.

    Only full-attention `DynamicLayer`s can be cut at any prefix and copied per row: a sliding-window or quantized
    layer does not hold every position, so it is refused rather than silently giving wrong continuations.
    """
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


class CacheRows:
    """Continuations of many rows at once through the KV cache of a batch of blocks.

    Row r continues block `blocks[r]` after its first `lengths[r]` positions: the cache is cut to the longest prefix
    of the rows, copied per row, and the positions past a row's prefix are masked out of its attention (a 2-D
    padding mask with a hole), while its own fed positions stay visible. Position ids continue from the prefix length.

    Args:
        forward: runs the model on new positions of the rows with their mask, position ids and cache (see `Forward`).
        layers: [`full_cache_layers`] of the batch.
        blocks: `(rows,)` index of each row's block in the batch.
        lengths: `(rows,)` prefix length of each row (positions of the cache it keeps), at least 1.
    """

    def __init__(self, forward: Forward, layers, blocks: torch.LongTensor, lengths: torch.LongTensor):
        context = int(lengths.max())
        self.forward = forward
        self.cache = DynamicCache()
        for index, (keys, values) in enumerate(layers):
            # Advanced indexing copies: rows of the same block get their own cache, which the passes then extend.
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


def row_slices(count: int, size: int) -> Iterator[slice]:
    """`slice`s of at most `size` rows covering `0..count-1`: the forward passes of a roll-out (a memory bound)."""
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))
