"""CALM's training loss (Shao et al., 2025, arXiv 2510.27688, section 3.2): the generative head's loss of the next
chunk against the frozen autoencoder's posterior of it, and the optional auxiliary terms of the small-scale remedies.

For every backbone state i (chunk i read) the target is chunk i + 1 of the labels, encoded by the frozen autoencoder
into its posterior N(mean, std^2). The heads' losses, as the official code computes them:

- energy head: N head samples against M posterior samples, `2 * fidelity - diversity` (`modeling_energy_head.py`);
- flow and diffusion heads: their regression losses on N posterior samples per state (`modeling_flow_head.py`,
  `modeling_diffusion_head.py`).

Not in the paper, each off unless its `CalmConfig` weight is > 0 (see docs/small-scale.md for what each
measured): the token loss through the frozen decoder (`decoder_loss.py`) and the multi-token loss on the backbone's
states (`token_loss.py`), added with their weights.
"""

import math
from typing import NamedTuple

import torch

from .decoder_loss import decoder_token_loss
from .modeling_calm_autoencoder import id_outside_vocabulary
from .modeling_energy_head import energy_score_terms


class CalmHeadLoss(NamedTuple):
    """What [`head_loss`] returns: the fields of [`CalmCausalLMOutputWithPast`] of the same names, each a mean over the
    valid target chunks. The energy terms are `None` for the flow and diffusion heads, the auxiliary terms `None`
    unless their weight in the config is > 0 (`loss` then includes them, weighted)."""

    loss: torch.Tensor
    energy_fidelity: torch.Tensor | None
    energy_diversity: torch.Tensor | None
    decoder_loss: torch.Tensor | None
    token_loss: torch.Tensor | None


def check_labels(labels: torch.LongTensor, chunk_shape: tuple[int, int], config) -> None:
    """Labels `(batch, num_chunks * K)` for inputs of `chunk_shape = (batch, num_chunks)`: ids in the vocabulary or
    -100, and at least two chunks (chunk i + 1 is predicted from chunks 0..i); otherwise an error that says how."""
    K = config.patch_size
    tokens = (chunk_shape[0], chunk_shape[1] * K)
    if tuple(labels.shape) != tokens:
        raise ValueError(f"labels {tuple(labels.shape)} must have one entry per input token: shape {tokens}.")
    bad = id_outside_vocabulary(labels, config.vocab_size, ignore_index=-100)
    if bad is not None:
        raise ValueError(
            f"labels contain the token id {bad}, outside the vocabulary [0, {config.vocab_size}); use -100 for "
            "positions to ignore, and the tokenizer the autoencoder was trained with."
        )
    if tokens[1] < 2 * K:
        raise ValueError(
            f"The energy loss needs at least two chunks (2 * K = {2 * K} tokens): chunk i + 1 is predicted from "
            f"chunks 0..i; got sequence_length {tokens[1]}."
        )


def head_loss(
    model, hidden_states: torch.Tensor, labels: torch.LongTensor, attention_mask: torch.Tensor | None = None
) -> CalmHeadLoss:
    """The loss of a [`CalmForCausalLM`] `model` predicting chunks 1..L-1 of `labels` `(batch, L * K)` from
    `hidden_states` `(batch, L - 1, hidden_size)`. A target chunk counts only if none of its K labels is -100 and, with
    `attention_mask` `(batch, L * K)`, none of its tokens is padding."""
    config = model.config
    K = config.patch_size
    target_ids = labels[:, K:]
    valid = target_ids != -100
    if attention_mask is not None:
        valid = valid & (attention_mask[:, K:] != 0)
    weights = valid.unflatten(1, (-1, K)).all(-1).float()  # (batch, L - 1): the valid target chunks
    count = weights.sum().clamp(min=1)

    def masked_mean(values):
        return (values.float() * weights).sum() / count

    target_ids = target_ids.masked_fill(target_ids == -100, 0)
    with torch.no_grad():
        mean, log_std = model.encode_chunks(target_ids)
        scale = config.target_noise_scale
        if scale != 1.0:  # not the official method (1.0); see CalmConfig
            log_std = log_std + math.log(scale) if scale > 0 else torch.full_like(log_std, -math.inf)
    decoder_weight = config.decoder_loss_weight
    point = config.decoder_loss_type == "point"

    if config.head_type != "energy":
        # N posterior samples per position as targets (drawn before the head's own draws, as officially).
        eps = torch.randn((config.num_samples, *mean.shape), device=mean.device, dtype=torch.float32)
        targets = (mean.float() + eps * log_std.float().exp()).to(hidden_states.dtype)
        terms = model.generative_head.loss_terms(
            hidden_states, targets, return_estimate=decoder_weight > 0 and not point
        )
        loss, fidelity, diversity = masked_mean(terms["loss"]), None, None
        scored, mixture = terms.get("estimate"), False
    else:
        # N head samples per position, each with its own noise; noise is drawn before the targets, as officially.
        samples = model.sample_latents(hidden_states, num_samples=config.num_samples)
        fidelity, diversity = energy_score_terms(
            samples, mean, log_std, num_targets=config.num_targets, alpha=config.energy_alpha
        )
        fidelity, diversity = masked_mean(fidelity), masked_mean(diversity)
        loss = 2 * fidelity - diversity
        scored, mixture = samples, config.decoder_loss_type == "mixture"

    chunks = target_ids.unflatten(1, (-1, K))
    token_loss = decoder_loss = None
    if config.token_loss_weight > 0:  # not the official method; see CalmConfig.token_loss_weight
        token_loss = masked_mean(model.token_loss_head.loss(hidden_states, chunks))
        loss = loss + config.token_loss_weight * token_loss
    if decoder_weight > 0:  # not the official method; see CalmConfig.decoder_loss_weight
        if point:  # SONAR-LLM's loss, on a deterministic latent of each state
            scored, mixture = model.decoder_loss_proj(hidden_states).unsqueeze(0), False
        scored = scored[: config.decoder_loss_samples or config.num_samples]
        decoder_loss = masked_mean(decoder_token_loss(model.autoencoder.decoder, scored, chunks, mixture))
        loss = loss + decoder_weight * decoder_loss
    return CalmHeadLoss(loss, fidelity, diversity, decoder_loss, token_loss)


__all__ = ["CalmHeadLoss", "check_labels", "head_loss"]
