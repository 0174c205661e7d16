"""CALM from a pretrained token-level decoder (not in the paper): what a user with existing weights does to get a CALM
quickly. Kyutai's continuous audio language model (arXiv 2509.06926) starts its backbone from a pretrained text LM;
Next Concept Prediction (arXiv 2602.08984) continues the pre-training of a token LM.

[`CalmForCausalLM.from_pretrained_decoder`] takes any transformers decoder-only causal LM whose base model
`AutoModel.from_config` rebuilds with the same weights (Llama, Qwen3, Mistral, ...):

- its decoder layers, final norm and rotary settings become CALM's backbone (its config is the `backbone_config`,
  so attention, RoPE and norms are exactly the pretrained ones; positions now count chunks);
- its token embedding becomes CALM's input embedding, which needs the autoencoder's vocabulary (the same tokenizer);
- the input compression reads those embeddings; it starts randomly, as in a new CALM, or with
  `init_input_compression=True` as "the chunk's last token's embedding": the pretrained model read token t to predict
  token t + 1, and the chunk's last token is the one before the chunk CALM predicts. The exact identity
  `SiLU(x) - SiLU(-x) = x` makes the two-layer compression pass that embedding through; the other K - 1 tokens start
  with zero weights and are learnt (their gradients are not zero). On WikiText at the demo's budget that start
  learnt slower than a random one, from a Llama and from scratch alike (docs/small-scale.md);
- the generative head is new (the pretrained output layer has no use in a likelihood-free model).
"""

import os

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from .configuration_calm import CalmConfig


def base_decoder(model_or_path, **load_kwargs) -> PreTrainedModel:
    """The base model (e.g. a `LlamaModel`) of a causal LM instance, a base model, or a path / Hub id of one."""
    model = model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        model = AutoModelForCausalLM.from_pretrained(model_or_path, **load_kwargs)
    elif load_kwargs:
        raise ValueError(f"{sorted(load_kwargs)} are loading options: pass a path or Hub id, not a model.")
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"Expected a transformers causal LM or a path to one, got {type(model).__name__}.")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"CALM's backbone is decoder-only; {type(model).__name__} is an encoder-decoder model.")
    return model.base_model


@torch.no_grad()
def init_compression_from_last_token(embed_proj: torch.nn.Sequential, embeddings: torch.Tensor, patch_size: int):
    """Set the input compression `[Linear(K H -> 2 H), SiLU, Linear(2 H -> H), LayerNorm(H)]` so that it returns the
    chunk's last token embedding, rescaled by the LayerNorm to the embeddings' typical size."""
    first, _, second, norm = embed_proj
    hidden = embeddings.shape[-1]
    eye = torch.eye(hidden, dtype=first.weight.dtype, device=first.weight.device)
    last = slice((patch_size - 1) * hidden, patch_size * hidden)
    first.weight.zero_()
    first.weight[:hidden, last] = eye  # [x, -x] ...
    first.weight[hidden:, last] = -eye
    first.bias.zero_()
    second.weight.copy_(torch.cat([eye, -eye], dim=1))  # ... SiLU(x) - SiLU(-x) = x
    second.bias.zero_()
    norm.weight.fill_(embeddings.float().std(dim=-1).median().item())
    norm.bias.zero_()


def calm_from_pretrained_decoder(cls, model_or_path, autoencoder, init_input_compression: bool = False, **kwargs):
    """`CalmForCausalLM.from_pretrained_decoder`: a new CALM (of class `cls`) whose backbone starts from a pretrained
    token-level decoder (not in the paper): its decoder layers, final norm, rotary settings and token embeddings; a
    new head.

    Args:
        model_or_path (`PreTrainedModel` or `str`):
            A decoder-only causal LM (e.g. `LlamaForCausalLM`, `Qwen3ForCausalLM`, `MistralForCausalLM`) or its base
            model, or a path / Hub id that `AutoModelForCausalLM.from_pretrained` loads. Its vocabulary must be the
            autoencoder's (the same tokenizer).
        autoencoder ([`CalmAutoencoder`]):
            The trained autoencoder; its config defines K, l, the vocabulary and the special tokens.
        init_input_compression (`bool`, *optional*, defaults to `False`):
            Start the input compression as the chunk's last token embedding (the token the pretrained model read
            before the next one) instead of randomly, as in a new CALM. Measured worse on WikiText at the demo's
            budget (docs/small-scale.md), hence off.
        kwargs:
            CALM's own `CalmConfig` fields (`head_type`, `num_mlp_layers`, ...), and `revision`, `dtype`,
            `trust_remote_code` when loading from a path.
    """
    load_kwargs = {name: kwargs.pop(name) for name in ("revision", "dtype", "trust_remote_code") if name in kwargs}
    decoder = base_decoder(model_or_path, **load_kwargs)
    vocab_size, ae_vocab_size = decoder.get_input_embeddings().weight.shape[0], autoencoder.config.vocab_size
    if vocab_size != ae_vocab_size:
        raise ValueError(
            f"The decoder's vocabulary ({vocab_size} token embeddings) differs from the autoencoder's "
            f"({ae_vocab_size}): CALM's input embedding is the decoder's, indexed by the autoencoder's token ids. "
            "Train the autoencoder with the decoder's tokenizer (train_autoencoder.py --tokenizer <the decoder's>)."
        )
    if "backbone_config" in kwargs or "config" in kwargs:
        raise ValueError("The backbone config is the pretrained decoder's: pass only CALM's own fields (head, loss).")
    config = CalmConfig(backbone_config=decoder.config, autoencoder_config=autoencoder.config.to_dict(), **kwargs)
    model = cls(config)
    model.autoencoder.load_state_dict(autoencoder.state_dict())
    backbone = model.model.backbone
    state = decoder.state_dict()
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{type(decoder).__name__}'s weights do not fit the backbone AutoModel builds from its config "
            f"({type(backbone).__name__}): missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}."
        )
    embeddings = backbone.get_input_embeddings().weight
    if config.pad_token_id is not None:
        with torch.no_grad():
            embeddings[config.pad_token_id].zero_()  # CALM reads a padded token as a zero embedding
    if init_input_compression:
        init_compression_from_last_token(model.model.embed_proj, embeddings, config.patch_size)
    model._freeze_autoencoder()
    return model.to(embeddings.dtype)


__all__ = ["base_decoder", "calm_from_pretrained_decoder", "init_compression_from_last_token"]
