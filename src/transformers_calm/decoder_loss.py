"""Token cross-entropy through the frozen decoder: an auxiliary loss for small CALMs (not in the paper).

SONAR-LLM (arXiv 2508.05305) predicts continuous sentence embeddings and trains the predictor with token
cross-entropy back-propagated through a frozen embedding decoder. CALM's head is trained in latent space only (energy
score, flow matching or diffusion); at small scale it learns the latent distribution as its own loss measures it, but
not the tokens in it. This loss scores the head's latents by the tokens they decode to: the frozen decoder turns a
latent into K token distributions, and their log loss against the target chunk's tokens is back-propagated into the
head and the backbone. The autoencoder gets no update; generation is unchanged and stays likelihood-free.

What is scored, per head (`CalmConfig.decoder_loss_weight` > 0 turns it on):

- energy head: its N samples of the position. `decoder_loss_type="mixture"` is the log loss of the decoder's token
  distribution averaged over the samples, `-log((1/N) sum_n p_n(y_k))` per target token k: a proper score of the
  head's distribution (a mixture rewards spread where the data is spread). `"per_sample"` is the mean of each sample's
  cross-entropy, `-(1/N) sum_n log p_n(y_k)`, which is minimised by putting every sample on the mode.
- flow head: the clean-latent estimate at the sampled time of each training target, `x1_hat = x_t + (1 - t) v_hat`
  (the velocity network's implied x1); diffusion head: its predicted x_0 from the predicted noise. Each estimate is a
  prediction of the target given the backbone state and the noisy latent, so its cross-entropy is a proper log loss.
"""

import math

import torch
from torch import nn


def token_log_probs(decoder: nn.Module, latents: torch.Tensor, target_ids: torch.LongTensor) -> torch.Tensor:
    """Log-probabilities the decoder gives the target tokens at each latent.

    Args:
        decoder: the autoencoder's decoder ([`~modeling_calm_autoencoder.CalmDecoder`]): latents `(batch, chunks, l)`
            to logits `(batch, chunks * K, vocab)`.
        latents: `(S, ..., l)`, S latents per target chunk.
        target_ids: `(..., K)` the target chunks' tokens (ids in the vocabulary).

    Returns:
        `(S, ..., K)` float32: `log p(target_ids[..., k] | latent)` for every latent and token.
    """
    K = target_ids.shape[-1]
    rows = latents.reshape(-1, 1, latents.shape[-1])  # one chunk per row
    logits = decoder(rows).float().view(*latents.shape[:-1], K, -1)  # (S, ..., K, vocab)
    targets = target_ids.expand(*latents.shape[:-1], K).unsqueeze(-1)
    # log_softmax at the targets only: logit - logsumexp, without a second (vocab)-sized tensor.
    return logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def decoder_token_loss(
    decoder: nn.Module, latents: torch.Tensor, target_ids: torch.LongTensor, mixture: bool
) -> torch.Tensor:
    """Per-position decoder loss, in nats per token (the mean over the chunk's K tokens).

    Args:
        decoder: the frozen decoder (see [`token_log_probs`]).
        latents: `(S, ..., l)`: the head's samples or estimates for each target chunk.
        target_ids: `(..., K)` the target chunks.
        mixture: `True`: the log loss of the average of the S token distributions (a proper score of the S latents
            as samples of one distribution); `False`: the mean of the S cross-entropies.

    Returns:
        `(...)` float32.
    """
    log_probs = token_log_probs(decoder, latents, target_ids)  # (S, ..., K)
    if mixture:
        per_token = math.log(log_probs.shape[0]) - torch.logsumexp(log_probs, dim=0)
    else:
        per_token = -log_probs.mean(0)
    return per_token.mean(-1)


__all__ = ["decoder_token_loss", "token_log_probs"]
