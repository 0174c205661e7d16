"""An auxiliary token loss on the backbone's states (not in the paper): multi-token prediction of the next chunk.

At small scale CALM's backbone learns only from the generative head's loss in latent space, and its states end up
knowing less about the next tokens than a same-size Llama's (a linear probe of the final states says so:
docs/small-scale.md). This loss gives the backbone the Llama's own signal: a softmax over the vocabulary
for each of the K tokens of the next chunk, read from the state that conditions the head, as multi-token prediction
does (Gloeckle et al., 2024, arXiv 2404.19737) and as praxis trains its CALM encoder beside the energy head (an
auxiliary next-code cross-entropy). It is used in training only: generation stays likelihood-free (the head samples
the latent, the decoder gives the tokens), and the layer is not used outside the loss.
"""

import torch
from torch import nn


class CalmTokenLossHead(nn.Module):
    """Logits of the K tokens of the next chunk from a backbone state: one unembedding shared by the K positions, each
    position adding its own learnt offset to the state first (zero at the start)."""

    def __init__(self, hidden_size: int, vocab_size: int, patch_size: int):
        super().__init__()
        self.position_offsets = nn.Parameter(torch.zeros(patch_size, hidden_size))
        self.unembedding = nn.Linear(hidden_size, vocab_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`(..., hidden_size)` -> logits `(..., K, vocab_size)`."""
        return self.unembedding(hidden_states.unsqueeze(-2) + self.position_offsets)

    def loss(self, hidden_states: torch.Tensor, target_ids: torch.LongTensor) -> torch.Tensor:
        """Cross-entropy per state, in nats per token (the mean over the chunk's K tokens): states `(..., hidden)`,
        the next chunks' tokens `(..., K)` -> `(...)` float32."""
        logits = self(hidden_states).float()
        return (
            nn.functional.cross_entropy(logits.flatten(0, -2), target_ids.flatten(), reduction="none")
            .view(target_ids.shape)
            .mean(-1)
        )


__all__ = ["CalmTokenLossHead"]
