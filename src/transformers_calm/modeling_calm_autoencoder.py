"""The CALM chunk autoencoder (Shao et al., 2025, arXiv 2510.27688, section 2).

A context-free variational autoencoder: every chunk of K tokens is encoded to a Gaussian posterior over one vector of
size l and decoded back, independently of every other chunk. There is no attention; the only block is a pre-norm
residual SwiGLU feed-forward layer, reused from transformers' Llama.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
from transformers.utils import ModelOutput

from .configuration_calm_autoencoder import CalmAutoencoderConfig
from .official_checkpoints import AUTOENCODER_KEY_MAPPING, load_pretrained
from .screened_argmax import ScreenedArgmax


def id_outside_vocabulary(ids: torch.Tensor, vocab_size: int, ignore_index: int | None = None) -> int | None:
    """An id of `ids` outside `[0, vocab_size)` (the smallest if one is negative, else the largest), or `None`;
    entries equal to `ignore_index` (e.g. -100 in labels) are not ids.

    Reading the ids is a host-device sync, which a compiled graph (the static-cache decoding step, whose ids come from
    the decoder's argmax; a compiled training forward) must not have: under torch.compile the check is skipped (`None`).
    """
    if torch.compiler.is_compiling():
        return None
    if ignore_index is not None:
        ids = ids[ids != ignore_index]
    if ids.numel() == 0:
        return None
    low, high = int(ids.min()), int(ids.max())
    if low < 0:
        return low
    return high if high >= vocab_size else None


def check_input_ids(input_ids: torch.LongTensor, config) -> None:
    """Token ids `(batch, L)` with L a positive multiple of K (`config.patch_size`) and every id inside the vocabulary
    (`config.vocab_size`), or an error that says how to fix them. Shared by the autoencoder and the language model."""
    K, vocab_size = config.patch_size, config.vocab_size
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch_size, sequence_length), got {tuple(input_ids.shape)}.")
    if input_ids.shape[1] == 0 or input_ids.shape[1] % K:
        raise ValueError(
            f"sequence_length ({input_ids.shape[1]}) must be a positive multiple of patch_size (K = {K}): CALM encodes, "
            f"reads and predicts whole chunks of K tokens. Pad or truncate to a multiple of {K}, or group texts into "
            "blocks whose length is a multiple of K."
        )
    bad = id_outside_vocabulary(input_ids, vocab_size)  # under torch.compile only the shapes are checked
    if bad is not None:
        raise ValueError(
            f"input_ids contain the token id {bad}, outside the vocabulary [0, {vocab_size}) of "
            f"this model. Use the tokenizer the autoencoder was trained with (len(tokenizer) must be {vocab_size}); "
            "-100 may mark ignored labels, not input ids."
        )


def autoencoder_mismatch(expected, given) -> str | None:
    """`None` when two autoencoder configs agree on what a language model around them depends on (K, l, the
    vocabulary); else `"K = .., l = .., vocabulary .. instead of K = .., l = .., vocabulary .."` for an error."""

    def shape(config) -> tuple[int, int, int]:
        return config.patch_size, config.latent_size, config.vocab_size

    if shape(given) == shape(expected):  # checked on every forward: the text only for an error
        return None
    return "K = {}, l = {}, vocabulary {} instead of K = {}, l = {}, vocabulary {}".format(
        *shape(given), *shape(expected)
    )


def check_autoencoder_matches(built_config, autoencoder) -> None:
    """An error that says how to fix it when a language model's `autoencoder` is not the one it was built around
    (`built_config`, its `config.autoencoder_config`): K, l or the vocabulary differ, e.g. after `model.autoencoder =
    other`. Its backbone reads and its head predicts that autoencoder's chunks and latent vectors."""
    mismatch = autoencoder_mismatch(built_config, autoencoder.config)
    if mismatch:
        raise ValueError(
            f"model.autoencoder ({mismatch}) is not the autoencoder this model was built around: its backbone reads "
            "and its head predicts that one's chunks and latents. Build a new model around the new autoencoder "
            "(CalmForCausalLM.from_autoencoder) and train it."
        )


def check_no_adapters(autoencoder) -> None:
    """An error that says how to fix it when adapters (peft's layers, which have `adapter_layer_names`) were placed in
    a language model's frozen autoencoder, where they would never train: the usual LoRA `target_modules` ("gate_proj",
    "up_proj", ...) name its layers too."""
    adapted = [name for name, module in autoencoder.named_modules() if hasattr(module, "adapter_layer_names")]
    if adapted:
        raise ValueError(
            f"Adapters were placed in the frozen autoencoder (autoencoder.{adapted[0]} and {len(adapted) - 1} more), "
            "where they would never train. Keep them to the backbone: LoraConfig(..., exclude_modules=r'.*"
            "autoencoder.*'), or target_modules=r'model\\.backbone\\..*\\.(q_proj|v_proj)'."
        )


@dataclass
class CalmAutoencoderOutput(ModelOutput):
    """Output of [`CalmAutoencoder.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`):
            `patch_size * reconstruction_loss + kl_weight * kl_loss`, the official training objective (a per-chunk
            sum of token cross-entropies plus the weighted clipped KL). The same formula is used in eval mode so that
            train and eval losses compare; the official eval loss is our `reconstruction_loss`.
        reconstruction_loss (`torch.FloatTensor` of shape `()`):
            Mean token cross-entropy of the decoded logits against the labels (positions labelled -100 excluded).
        kl_loss (`torch.FloatTensor` of shape `()`):
            KL divergence of the posterior from N(0, I), floored at `kl_clamp` per dimension, summed over the latent
            dimensions and averaged over chunks.
        reconstruction_accuracy (`torch.FloatTensor` of shape `()`):
            Fraction of labelled tokens whose argmax prediction equals the label (a detached metric).
        logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`):
            Decoder logits, in float32.
        latent_mean (`torch.FloatTensor` of shape `(batch_size, sequence_length // patch_size, latent_size)`):
            Posterior mean of every chunk.
        latent_log_std (`torch.FloatTensor` of shape `(batch_size, sequence_length // patch_size, latent_size)`):
            Posterior log standard deviation of every chunk.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            In the order they run: the token embeddings, then the output of every encoder layer and of every decoder
            layer; per-token ones (the encoder's first half, the decoder's second half, the embeddings) of shape
            `(batch_size, sequence_length, hidden_size)`, per-chunk ones `(batch_size, num_chunks, hidden_size)`.
    """

    loss: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    kl_loss: torch.FloatTensor | None = None
    reconstruction_accuracy: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    latent_mean: torch.FloatTensor | None = None
    latent_log_std: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@contextmanager
def recording_layer_outputs(autoencoder, record: list | None):
    """Appends to `record`, in the order they run, the token embeddings and the output of every encoder and decoder
    layer (forward hooks, so that `encode`, `decode` and the sampler's partial decodes stay hook-free otherwise);
    None: nothing."""
    if record is None:
        yield
        return
    modules = [
        autoencoder.encoder.embed_tokens,
        *autoencoder.encoder.encoder_layers,
        *autoencoder.decoder.decoder_layers,
    ]
    hooks = [module.register_forward_hook(lambda module, args, output: record.append(output)) for module in modules]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


class CalmAutoencoderLayer(nn.Module):
    """Pre-norm residual feed-forward block: `x + SwiGLU(RMSNorm(x))`."""

    def __init__(self, config: CalmAutoencoderConfig):
        super().__init__()
        self.layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.mlp(self.layernorm(hidden_states))


class CalmEncoder(nn.Module):
    """Token ids `(batch, num_chunks * K)` -> posterior parameters `(batch, num_chunks, 2 * latent_size)`."""

    def __init__(self, config: CalmAutoencoderConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.encoder_layers = nn.ModuleList([CalmAutoencoderLayer(config) for _ in range(config.num_encoder_layers)])
        self.squeeze_layer = nn.Linear(config.patch_size * config.hidden_size, config.hidden_size)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hidden_to_latent = nn.Linear(config.hidden_size, 2 * config.latent_size)

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        if self.training and self.config.cast_embeddings_to_bf16_in_training:
            hidden_states = hidden_states.to(torch.bfloat16)
        half = self.config.num_encoder_layers // 2
        for layer in self.encoder_layers[:half]:  # per token
            hidden_states = layer(hidden_states)
        # Concatenate the K token vectors of a chunk, in token order, into one vector.
        hidden_states = hidden_states.unflatten(1, (-1, self.config.patch_size)).flatten(-2)
        hidden_states = self.squeeze_layer(hidden_states.to(self.squeeze_layer.weight.dtype))
        for layer in self.encoder_layers[half:]:  # per chunk
            hidden_states = layer(hidden_states)
        return self.hidden_to_latent(self.norm(hidden_states))


class CalmDecoder(nn.Module):
    """Latents `(batch, num_chunks, latent_size)` -> hidden states `(batch, num_chunks * K, hidden_size)`."""

    _FEW_ROWS = 128  # up to this many tokens, the float32 argmax computes the scores as W h^T (see `argmax_token_ids`)

    def __init__(self, config: CalmAutoencoderConfig):
        super().__init__()
        self.config = config
        self.latent_to_hidden = nn.Linear(config.latent_size, config.hidden_size)
        self.decoder_layers = nn.ModuleList([CalmAutoencoderLayer(config) for _ in range(config.num_decoder_layers)])
        self.expand_layer = nn.Linear(config.hidden_size, config.patch_size * config.hidden_size)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.num_chunk_layers = config.num_decoder_layers // 2  # the first half runs per chunk, the rest per token
        self.screened_argmax = ScreenedArgmax()

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.token_states(latents))

    def _apply(self, *args, **kwargs):
        # `to`, `cuda`, `half`, ...: the screen's bfloat16 copy of lm_head belongs to the old weight.
        self.screened_argmax.reset()
        return super()._apply(*args, **kwargs)

    def chunk_states(self, latents: torch.Tensor) -> torch.Tensor:
        """The per-chunk half of the decoder, shared by the chunk's K tokens: `(..., hidden_size)`."""
        hidden_states = self.latent_to_hidden(latents)
        for layer in self.decoder_layers[: self.num_chunk_layers]:
            hidden_states = layer(hidden_states)
        return hidden_states

    def token_states(self, latents: torch.Tensor) -> torch.Tensor:
        """The normalised hidden state of every token, `(batch, num_chunks * K, hidden_size)`: the input of `lm_head`."""
        # Slice k of the expanded vector becomes token k of the chunk.
        hidden_states = self.expand_layer(self.chunk_states(latents))
        hidden_states = hidden_states.unflatten(-1, (self.config.patch_size, self.config.hidden_size)).flatten(-3, -2)
        return self._per_token(hidden_states)

    def position_states(self, chunk_states: torch.Tensor, position: int) -> torch.Tensor:
        """`token_states` of token `position` (0 <= position < K) of each chunk alone, from [`chunk_states`]
        `(..., hidden_size)`: slice `position` of the expansion, then the per-token layers. The other K - 1 tokens
        are not computed (the temperature sampler reads a candidate's later tokens only while they can matter)."""
        size = self.config.hidden_size
        rows = slice(position * size, (position + 1) * size)
        bias = None if self.expand_layer.bias is None else self.expand_layer.bias[rows]
        return self._per_token(F.linear(chunk_states, self.expand_layer.weight[rows], bias))

    def _per_token(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The per-token half of the decoder and the final norm, on expanded token states."""
        for layer in self.decoder_layers[self.num_chunk_layers :]:
            hidden_states = layer(hidden_states)
        return self.norm(hidden_states)

    def argmax_token_ids(self, states: torch.Tensor) -> torch.LongTensor:
        """`lm_head(states).argmax(-1)` of normalised token states `(..., hidden_size)`, without the logits: on a CPU
        with bfloat16 instructions (float32 weights) through a bfloat16 screen that stays exact
        ([`~screened_argmax.ScreenedArgmax`]; 3x faster from a few dozen rows on, 2x from 8). Otherwise, for the
        few rows of a generation step (K per sequence), the scores are computed as `W h^T`, (vocab, hidden) x
        (hidden, rows): CPU GEMM kernels run that 3-4x faster than (rows, hidden) x (hidden, vocab) (batch 1, K = 4,
        32k x 512: 4.7 ms instead of 16 ms), but slower from a few hundred rows on (the two meet near 128 rows on a
        2-core CPU). On GPU the two are the same GEMM."""
        rows = states.flatten(0, -2)
        if type(self.lm_head) is not nn.Linear:  # wrapped (e.g. an adapter): only its own forward knows its scores
            return self.lm_head(rows).argmax(-1).view(states.shape[:-1])
        weight = self.lm_head.weight
        if self.screened_argmax.applies(rows, weight):
            token_ids = self.screened_argmax(rows, weight)
        elif len(rows) <= self._FEW_ROWS:
            token_ids = (weight @ rows.T).argmax(0)
        else:
            token_ids = self.lm_head(rows).argmax(-1)
        return token_ids.view(states.shape[:-1])

    def token_ids(self, latents: torch.Tensor) -> torch.LongTensor:
        """`forward(latents).argmax(-1)`, through [`argmax_token_ids`]."""
        return self.argmax_token_ids(self.token_states(latents))


class CalmAutoencoderPreTrainedModel(PreTrainedModel):
    config_class = CalmAutoencoderConfig
    base_model_prefix = "autoencoder"
    # The auto_map that the package's save_pretrained writes (hub.CalmHubMixin): every Auto class this model loads with.
    _auto_map_entries = {
        "AutoConfig": "configuration_calm_autoencoder.CalmAutoencoderConfig",
        "AutoModel": "modeling_calm_autoencoder.CalmAutoencoder",
    }
    main_input_name = "input_ids"
    _no_split_modules = ["CalmAutoencoderLayer"]
    # No attention at all, so every attention implementation is trivially supported (CalmForCausalLM passes the
    # requested one down to its autoencoder).
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # How an official checkpoint's tensors are named in this class, by official kind (official_checkpoints.py).
    _official_key_mapping: dict[str, dict[str, str]] = {}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' `from_pretrained`, which also loads the official CALM checkpoints as published (see
        `official_checkpoints.load_pretrained`)."""
        return load_pretrained(super().from_pretrained, cls, pretrained_model_name_or_path, args, kwargs)


class CalmAutoencoder(CalmAutoencoderPreTrainedModel):
    """The CALM chunk autoencoder: `encode` maps every K tokens to a Gaussian posterior over one latent vector,
    `decode` maps latent vectors back to token logits, and `forward` computes the training objective.

    Training mode follows the paper and the official code, in this order: DropToken on the encoder input, sampling
    from the posterior (reparameterisation), DropLatent (inverted dropout), per-dimension KL clipping. Eval mode is
    deterministic: no dropout, and the decoder reads the posterior mean (the official code also samples in eval).
    """

    _tied_weights_keys = {"decoder.lm_head.weight": "encoder.embed_tokens.weight"}
    _official_key_mapping = {"autoencoder": AUTOENCODER_KEY_MAPPING}

    def __init__(self, config: CalmAutoencoderConfig):
        super().__init__(config)
        self.encoder = CalmEncoder(config)
        self.decoder = CalmDecoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.encoder.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.decoder.lm_head

    def set_output_embeddings(self, value: nn.Linear):
        self.decoder.lm_head = value

    @property
    def patch_size(self) -> int:
        """K, the number of tokens per chunk."""
        return self.config.patch_size

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.dim() != 3 or latents.shape[-1] != self.config.latent_size:
            raise ValueError(
                f"latents must have shape (batch_size, num_latents, latent_size={self.config.latent_size}), "
                f"got {tuple(latents.shape)}."
            )

    def encode(self, input_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior of every chunk of K tokens.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Token ids; `sequence_length` must be a multiple of `patch_size`.

        Returns:
            `(mean, log_std)`, each of shape `(batch_size, sequence_length // patch_size, latent_size)`.
        """
        check_input_ids(input_ids, self.config)
        return self.encoder(input_ids).chunk(2, dim=-1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Token logits of latent vectors.

        Args:
            latents (`torch.FloatTensor` of shape `(batch_size, num_latents, latent_size)`):
                One vector per chunk.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, num_latents * patch_size, vocab_size)`.
        """
        self._check_latents(latents)
        return self.decoder(latents)

    def decode_token_ids(self, latents: torch.Tensor) -> torch.LongTensor:
        """Token ids of latent vectors, `decode(latents).argmax(-1)` without materialising the logits as
        `(rows, vocab)` (faster on CPU for the few rows of a generation step).

        Args:
            latents (`torch.FloatTensor` of shape `(batch_size, num_latents, latent_size)`):
                One vector per chunk.

        Returns:
            `torch.LongTensor` of shape `(batch_size, num_latents * patch_size)`.
        """
        self._check_latents(latents)
        return self.decoder.token_ids(latents)

    def forward(
        self,
        input_ids: torch.LongTensor,
        labels: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> CalmAutoencoderOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Token ids to reconstruct; `sequence_length` must be a multiple of `patch_size`.
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Reconstruction targets; -100 excludes a position from the loss and the accuracy. Defaults to
                `input_ids` (the official scripts use labels = input_ids, pads included).
            attention_mask (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Positions with 0 are excluded from the loss and the accuracy (their labels become -100).
            output_hidden_states (`bool`, *optional*):
                Whether to return the token embeddings and the output of every encoder and decoder layer (see
                [`CalmAutoencoderOutput`]); defaults to `config.output_hidden_states`.
            return_dict (`bool`, *optional*):
                Whether to return a [`CalmAutoencoderOutput`] instead of a tuple.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        record = [] if output_hidden_states else None
        config = self.config
        check_input_ids(input_ids, self.config)
        if labels is None:
            labels = input_ids
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}.")
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask == 0, -100)

        encoder_ids = input_ids
        if self.training and config.token_dropout > 0:
            # DropToken: the encoder sees a replacement id; the labels keep the original token.
            dropped = torch.rand_like(input_ids, dtype=torch.float) <= config.token_dropout
            encoder_ids = input_ids.masked_fill(dropped, config.token_dropout_replacement_id)

        with recording_layer_outputs(self, record):
            mean, log_std = self.encode(encoder_ids)
        std = log_std.exp()
        if self.training:
            latents = mean + torch.randn_like(mean) * std
            latents = F.dropout(latents, p=config.latent_dropout, training=True)
        else:
            latents = mean

        # KL(N(mean, std^2) || N(0, 1)) per dimension, floored at kl_clamp (dimensions under the floor get no
        # gradient), summed over the latent dimensions and averaged over chunks.
        kl = 0.5 * (mean.pow(2) + std.pow(2) - 1 - 2 * log_std)
        kl_loss = kl.clamp(min=config.kl_clamp).sum(-1).mean()

        with recording_layer_outputs(self, record):
            logits = self.decode(latents).float()
        reconstruction_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten().to(logits.device))
        loss = config.patch_size * reconstruction_loss + config.kl_weight * kl_loss
        with torch.no_grad():
            labelled = labels != -100
            correct = (logits.argmax(-1) == labels) & labelled
            reconstruction_accuracy = correct.sum() / labelled.sum().clamp(min=1)

        output = CalmAutoencoderOutput(
            loss=loss,
            reconstruction_loss=reconstruction_loss,
            kl_loss=kl_loss,
            reconstruction_accuracy=reconstruction_accuracy,
            logits=logits,
            latent_mean=mean,
            latent_log_std=log_std,
            hidden_states=tuple(record) if output_hidden_states else None,
        )
        return output if return_dict else output.to_tuple()


__all__ = [
    "CalmAutoencoder",
    "CalmAutoencoderOutput",
    "CalmAutoencoderPreTrainedModel",
    "autoencoder_mismatch",
    "check_autoencoder_matches",
    "check_input_ids",
    "check_no_adapters",
    "id_outside_vocabulary",
]
