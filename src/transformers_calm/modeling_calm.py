"""CALM: Continuous Autoregressive Language Model (Shao et al., 2025, arXiv 2510.27688, section 3).

The backbone is transformers' own `LlamaModel`. Its input at chunk i is the official "input compression" of chunk i's
K token embeddings; its final hidden state at chunk i conditions an energy head that samples the latent vector of
chunk i + 1 in one step. The frozen autoencoder maps target chunks to latent posteriors (training) and sampled latent
vectors back to tokens (generation).
"""

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, LlamaModel, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerateDecoderOnlyOutput, StoppingCriteriaList
from transformers.utils import ModelOutput
from transformers.utils.deprecation import deprecate_kwarg

from .compat import CACHE_NAME
from .configuration_calm import CalmConfig
from .modeling_calm_autoencoder import CalmAutoencoder
from .sampling import batch_temperature_sample, check_temperature, exact_temperature_sample, mode_sample

# CALM's generation settings beyond transformers' GenerationConfig fields. They live in the model's default
# GenerationConfig (GenerationConfig.update only sets keys that already exist) and round-trip through
# generation_config.json.
CALM_GENERATION_DEFAULTS = {
    "num_candidates": 200,  # N of the batch approximation (the paper's pool), also the pool for do_sample=False
    "exact_temperature": False,  # True: the paper's exact rejection sampler (Algorithm 1) instead
    "max_draws": 10_000,  # draws per row before the exact sampler falls back to the approximation
}
DEFAULT_MAX_NEW_TOKENS = 20


@dataclass
class CalmModelOutputWithPast(ModelOutput):
    """Output of [`CalmModel.forward`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_chunks, hidden_size)`):
            Backbone output after the final norm, one position per chunk; position i conditions chunk i + 1.
        cache (`Cache`, *optional*, returned when `use_cache=True`):
            The backbone's key/value cache (one entry per chunk), to pass back as `cache` with the next chunks.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            The backbone's hidden states as transformers returns them: the input vectors, then the output of each
            layer; the last one after the final norm. One position per chunk.
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
            The backbone's attention weights, one tensor per layer, over chunk positions.
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class CalmCausalLMOutputWithPast(ModelOutput):
    """Output of [`CalmForCausalLM.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` are given):
            Energy loss, the negative energy score averaged over predicted chunks:
            `2 * energy_fidelity - energy_diversity`.
        energy_fidelity (`torch.FloatTensor` of shape `()`, *optional*):
            Mean distance `||x - y||^alpha` between head samples x and targets y drawn from the autoencoder
            posterior (lower is better).
        energy_diversity (`torch.FloatTensor` of shape `()`, *optional*):
            Mean distance `||x - x'||^alpha` between two different head samples of the same position (it rewards
            spread, so that the head models a distribution rather than a point).
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_chunks, hidden_size)`):
            Backbone output after the final norm, one position per chunk; position i conditions chunk i + 1.
        cache (`Cache`, *optional*, returned when `use_cache=True`):
            The backbone's key/value cache (one entry per chunk), to pass back as `cache` with the next chunks.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            The backbone's hidden states as transformers returns them: the input vectors, then the output of each
            layer; the last one after the final norm. One position per chunk.
    """

    loss: torch.FloatTensor | None = None
    energy_fidelity: torch.FloatTensor | None = None
    energy_diversity: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class CalmEnergyHeadBlock(nn.Module):
    """Residual gated block: `x + down(SiLU(g) * v)` with `[g, v] = MLP([LayerNorm(x), c])`. The condition c (the
    projected backbone state) enters only through the concatenation, as in the official code."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(hidden_size, eps=1e-6)
        self.linears = nn.Sequential(
            nn.Linear(2 * hidden_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, 2 * hidden_size),
        )
        self.down_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """`x` `(..., hidden)`; `condition` of the same shape, or without the leading sample dimensions of `x` (it
        broadcasts)."""
        first, act1, middle, act2, last = self.linears
        hidden = x.shape[-1]
        # linear([LN(x), c]) = LN(x) W_x^T + (c W_c^T + b): the condition's half runs once per hidden state, not once
        # per sample of it (with N = 8 samples, about a sixth of the head's multiply-adds).
        h = nn.functional.linear(self.in_ln(x), first.weight[:, :hidden]) + nn.functional.linear(
            condition, first.weight[:, hidden:], first.bias
        )
        gate, up = last(act2(middle(act1(h)))).chunk(2, dim=-1)
        return x + self.down_proj(nn.functional.silu(gate) * up)


class CalmEnergyHeadFinalLayer(nn.Module):
    def __init__(self, hidden_size: int, latent_size: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(hidden_size, eps=1e-6)
        self.linears = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, latent_size))
        # The head starts by predicting the zero vector, as in the official code (see `_init_weights`).
        self.linears[-1]._zero_init = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linears(self.in_ln(x))


class CalmEnergyHead(nn.Module):
    """The energy generative head (the official `MLPGenerator`): turns a backbone hidden state and uniform noise into
    one sample of the next chunk's latent vector, in a single forward pass."""

    def __init__(self, config: CalmConfig):
        super().__init__()
        self.noise_size = config.noise_size
        self.noise_embd = nn.Linear(config.noise_size, config.hidden_size)
        self.hidden_embd = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm_hidden = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.norm_noise = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.mlp_blocks = nn.ModuleList([CalmEnergyHeadBlock(config.hidden_size) for _ in range(config.num_mlp_layers)])
        self.final_layer = CalmEnergyHeadFinalLayer(config.hidden_size, config.latent_size)

    def sample_noise(self, hidden_states: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform noise in [-0.5, 0.5), one vector of `noise_size` per hidden state."""
        shape = (*hidden_states.shape[:-1], self.noise_size)
        uniform = torch.rand(shape, dtype=hidden_states.dtype, device=hidden_states.device, generator=generator)
        return uniform.sub_(0.5)

    def forward(
        self,
        hidden_states: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        num_samples: int | None = None,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states (`torch.FloatTensor` of shape `(..., hidden_size)`):
                Backbone states; any leading shape.
            noise (`torch.FloatTensor` of shape `(..., noise_size)`, *optional*):
                The noise to transform, with the leading shape of `hidden_states` (with `num_samples`:
                `(num_samples, ...)`); drawn uniformly from [-0.5, 0.5) when `None`.
            generator (`torch.Generator`, *optional*):
                Random generator for the noise when it is drawn.
            num_samples (`int`, *optional*):
                Draw this many samples per state, along a new leading dimension. The same as repeating
                `hidden_states` along it (the same noise draws too), but the part that does not depend on the noise
                runs once per state.

        Returns:
            `torch.FloatTensor` of shape `(..., latent_size)` (with `num_samples`: `(num_samples, ..., latent_size)`):
            one latent sample per hidden state and noise vector.
        """
        sample_shape = hidden_states.shape[:-1] if num_samples is None else (num_samples, *hidden_states.shape[:-1])
        if noise is None:
            # An expanded view: sample_noise sees one state per sample, as when callers repeat the states.
            noise = self.sample_noise(hidden_states.expand(*sample_shape, -1), generator)
        elif noise.shape[:-1] != sample_shape or noise.shape[-1] != self.noise_size:
            raise ValueError(
                f"noise must have shape {(*sample_shape, self.noise_size)} (the leading shape of hidden_states, "
                f"after num_samples if given, then noise_size), got {tuple(noise.shape)}."
            )
        # Once per state (not per sample), shared by every block.
        condition = self.norm_hidden(self.hidden_embd(hidden_states))
        x = self.norm_noise(self.noise_embd(noise.to(hidden_states.dtype)))
        for block in self.mlp_blocks:
            x = block(x, condition)
        return self.final_layer(x)


def _distance_power(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """`||a_i - b_j||^alpha` for all pairs, batched: a `(P, I, l)`, b `(P, J, l)` -> `(P, I, J)`.

    Uses `|a|^2 + |b|^2 - 2 a.b` so that memory is `P * I * J` rather than `P * I * J * l` (the official code
    materialises all differences: gigabytes for M = 100 targets). Squared distances are floored at a tiny value, so
    the gradient is finite and zero where two points coincide (the plain norm's gradient is NaN at 0).
    """
    squared = a.pow(2).sum(-1, keepdim=True) + b.pow(2).sum(-1).unsqueeze(-2) - 2 * a @ b.transpose(-1, -2)
    return squared.clamp(min=1e-20).pow(alpha / 2)


def energy_score_terms(
    samples: torch.Tensor, target_mean: torch.Tensor, target_log_std: torch.Tensor, num_targets: int, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of the energy score, per position.

    Args:
        samples: `(N, ..., l)` head samples per position.
        target_mean, target_log_std: `(..., l)` autoencoder posterior of the true next chunk per position.
        num_targets: M, target samples drawn per position from the posterior.
        alpha: distance exponent.

    Returns:
        `(fidelity, diversity)`, each `(...)`: mean of `||x_n - y_m||^alpha` over the N x M pairs, and mean of
        `||x_i - x_j||^alpha` over the N(N-1) ordered pairs with i != j. The energy loss is `2 * fidelity -
        diversity`. Computed in float32 whatever the autocast state: the distance expansion cancels badly in bf16.
    """
    num_samples = samples.shape[0]
    batch_shape = samples.shape[1:-1]
    with torch.autocast(device_type=samples.device.type, enabled=False):
        samples = samples.float()
        std = target_log_std.float().exp()
        eps = torch.randn((num_targets, *target_mean.shape), device=target_mean.device, dtype=torch.float32)
        targets = target_mean.float() + eps * std  # (M, ..., l)
        x = samples.flatten(1, -2).transpose(0, 1)  # (P, N, l)
        y = targets.flatten(1, -2).transpose(0, 1)  # (P, M, l)
        fidelity = _distance_power(x, y, alpha).mean(dim=(-2, -1))
        off_diagonal = ~torch.eye(num_samples, dtype=torch.bool, device=x.device)
        diversity = (_distance_power(x, x, alpha) * off_diagonal).sum(dim=(-2, -1)) / (num_samples * (num_samples - 1))
    return fidelity.reshape(batch_shape), diversity.reshape(batch_shape)


class CalmPreTrainedModel(PreTrainedModel):
    config_class = CalmConfig
    base_model_prefix = "model"
    _auto_map_entries = {
        "AutoConfig": "configuration_calm.CalmConfig",
        "AutoModel": "modeling_calm.CalmModel",
        "AutoModelForCausalLM": "modeling_calm.CalmForCausalLM",
    }
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "CalmEnergyHeadBlock", "CalmAutoencoderLayer"]
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # The energy loss is a per-batch mean: Trainer must divide it by gradient_accumulation_steps itself.
    accepts_loss_kwargs = False

    @torch.no_grad()
    def _init_weights(self, module):
        if getattr(module, "_zero_init", False):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        else:
            super()._init_weights(module)


class CalmModel(CalmPreTrainedModel):
    """The CALM backbone: token embeddings compressed per chunk, then transformers' `LlamaModel`. Returns one hidden
    state per chunk of K tokens."""

    def __init__(self, config: CalmConfig):
        super().__init__(config)
        # The Llama's own token embedding (padding_idx = pad_token_id) is CALM's input embedding.
        self.backbone = LlamaModel(config)
        # Input compression: the K token embeddings of a chunk, concatenated in token order, to one vector.
        self.embed_proj = nn.Sequential(
            nn.Linear(config.patch_size * config.hidden_size, 2 * config.hidden_size),
            nn.SiLU(),
            nn.Linear(2 * config.hidden_size, config.hidden_size),
            nn.LayerNorm(config.hidden_size, eps=1e-6),
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backbone.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.backbone.embed_tokens = value

    def embed_chunks(self, input_ids: torch.LongTensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Input vectors `(batch, num_chunks, hidden_size)` of token ids `(batch, num_chunks * K)`.

        Tokens where `token_mask` is 0 contribute a zero embedding, whatever their id (the official model reads its
        `[PAD]` id, whose embedding row is zero), so a partly padded chunk is read the same way for any pad id.
        """
        check_sequence_length(input_ids, self.config.patch_size)
        embeddings = self.backbone.embed_tokens(input_ids)
        if token_mask is not None:
            embeddings = embeddings * token_mask.unsqueeze(-1).to(embeddings.dtype)
        return self.embed_proj(embeddings.unflatten(1, (-1, self.config.patch_size)).flatten(-2))

    @deprecate_kwarg("past_key_values", version="5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        chunk_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> CalmModelOutputWithPast | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Token ids; `sequence_length` must be a multiple of `patch_size` (K).
            attention_mask (`torch.Tensor`, *optional*):
                Token-level mask `(batch_size, (past_chunks + num_chunks) * K)` (1 = real token, 0 = padding): a
                chunk is attended to when any of its tokens is, and padded tokens contribute a zero embedding to
                their chunk. A chunk-level mask `(batch_size, past_chunks + num_chunks)` is also accepted.
            position_ids (`torch.LongTensor` of shape `(batch_size, num_chunks)`, *optional*):
                Chunk positions; by default they continue from the cache length.
            cache (`Cache`, *optional*):
                Key/value cache of earlier chunks (e.g. a `DynamicCache`, or the `cache` of an earlier output).
                `past_key_values`, its name before transformers 5.24, is accepted with a deprecation warning.
            inputs_embeds (`torch.FloatTensor` of shape `(batch_size, num_chunks, hidden_size)`, *optional*):
                Already compressed chunk vectors, instead of `input_ids`.
            use_cache (`bool`, *optional*):
                Whether to return the key/value cache.
            output_hidden_states (`bool`, *optional*):
                Whether to return the hidden states of all layers.
            return_dict (`bool`, *optional*):
                Whether to return a [`CalmModelOutputWithPast`] instead of a tuple.
            kwargs:
                Passed on to the backbone (e.g. `output_attentions`).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if chunk_attention_mask is not None:
            if attention_mask is not None:
                raise ValueError("Pass attention_mask (one entry per token) or chunk_attention_mask, not both.")
            attention_mask = chunk_attention_mask
        if inputs_embeds is None:
            token_mask = None
            if attention_mask is not None and attention_mask.shape[1] >= input_ids.shape[1] > 0:
                past = cache.get_seq_length() if cache is not None else 0
                if attention_mask.shape[1] == (past + input_ids.shape[1] // self.config.patch_size) * self.config.patch_size:
                    token_mask = attention_mask[:, -input_ids.shape[1] :]
            inputs_embeds = self.embed_chunks(input_ids, token_mask)
        if attention_mask is not None:
            attention_mask = to_chunk_mask(attention_mask, inputs_embeds.shape[1], cache, self.config)
        outputs = self.backbone(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **{CACHE_NAME: cache},
            **kwargs,
        )
        output = CalmModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=getattr(outputs, CACHE_NAME),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()


def check_sequence_length(input_ids: torch.LongTensor, patch_size: int) -> None:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch_size, sequence_length), got {tuple(input_ids.shape)}.")
    if input_ids.shape[1] == 0 or input_ids.shape[1] % patch_size:
        raise ValueError(
            f"sequence_length ({input_ids.shape[1]}) must be a positive multiple of patch_size (K = {patch_size}): "
            f"CALM reads and predicts whole chunks of K tokens. Pad or truncate to a multiple of {patch_size}, or "
            "group texts into blocks whose length is a multiple of K."
        )


def to_chunk_mask(
    attention_mask: torch.Tensor, num_chunks: int, cache: Cache | None, config: CalmConfig
) -> torch.Tensor:
    """A chunk-level mask `(batch, past + num_chunks)` from a token-level or chunk-level one."""
    past = cache.get_seq_length() if cache is not None else 0
    if attention_mask.shape[1] == past + num_chunks:
        return attention_mask
    if attention_mask.shape[1] == (past + num_chunks) * config.patch_size:
        return attention_mask.unflatten(1, (-1, config.patch_size)).any(-1).to(attention_mask.dtype)
    raise ValueError(
        f"attention_mask has length {attention_mask.shape[1]}; expected one entry per token "
        f"({(past + num_chunks) * config.patch_size}) or per chunk ({past + num_chunks}), past included."
    )


class CalmForCausalLM(CalmPreTrainedModel, GenerationMixin):
    """CALM with its energy head and its frozen autoencoder.

    The autoencoder is a submodule, saved and loaded in the same checkpoint, always in eval mode and without
    gradients. Start a new language model from a trained autoencoder with [`CalmForCausalLM.from_autoencoder`].
    [`CalmForCausalLM.generate`] produces K tokens per backbone step.
    """

    def __init__(self, config: CalmConfig):
        super().__init__(config)
        self.model = CalmModel(config)
        self.generative_head = CalmEnergyHead(config)
        self.autoencoder = CalmAutoencoder(config.autoencoder_config)
        self.autoencoder.requires_grad_(False)
        self.post_init()
        self.autoencoder.eval()
        if self.generation_config is not None:
            self.generation_config.do_sample = True  # CALM's head is a sampler; see `generate`
            for name, value in CALM_GENERATION_DEFAULTS.items():
                setattr(self.generation_config, name, value)

    def tie_weights(self, *args, **kwargs):
        super().tie_weights(*args, **kwargs)
        # from_pretrained replaces loaded parameters with new ones that require grad (and ties weights last).
        self.autoencoder.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.autoencoder.eval()  # frozen: no DropToken/DropLatent, no bf16 embedding cast, in LM training either
        return self

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding):
        self.model.set_input_embeddings(value)

    @classmethod
    def from_autoencoder(cls, autoencoder: CalmAutoencoder, config: CalmConfig | None = None, **config_kwargs):
        """A new, randomly initialised language model around a trained (frozen) autoencoder.

        Args:
            autoencoder ([`CalmAutoencoder`]):
                The trained autoencoder; its weights are copied into the model.
            config ([`CalmConfig`], *optional*):
                Backbone and head configuration; its `autoencoder_config` is replaced by the autoencoder's. When
                `None`, a `CalmConfig` is built from `config_kwargs` and the autoencoder's vocab size, K, l and
                special tokens.
            config_kwargs:
                Fields of `CalmConfig` (e.g. `hidden_size=1024`), when `config` is `None`.
        """
        ae_config = autoencoder.config
        if config is None:
            defaults = {
                name: getattr(ae_config, name)
                for name in ("vocab_size", "patch_size", "latent_size", "pad_token_id", "bos_token_id", "eos_token_id")
            }
            config = CalmConfig(**{**defaults, **config_kwargs}, autoencoder_config=ae_config.to_dict())
        else:
            config = CalmConfig(**{**config.to_dict(), "autoencoder_config": ae_config.to_dict()})
        model = cls(config)
        model.autoencoder.load_state_dict(autoencoder.state_dict())
        return model.to(autoencoder.dtype)

    @deprecate_kwarg("past_key_values", version="5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        chunk_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> CalmCausalLMOutputWithPast | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Token ids; `sequence_length` must be a multiple of `patch_size` (K). Chunk i is read at backbone
                position i.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for real tokens, 0 for padding. Padded chunks are not attended to and not predicted.
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Usually `input_ids`. The hidden state of chunk i is trained to predict chunk i + 1 of `labels`; a
                target chunk counts only if none of its K labels is -100 (and none of its tokens is padding).
            cache (`Cache`, *optional*):
                Key/value cache of earlier chunks (the `cache` of an earlier output). `past_key_values`, its name
                before transformers 5.24, is accepted with a deprecation warning.
            use_cache (`bool`, *optional*):
                Whether to return the cache; defaults to `config.use_cache` in eval mode and `False` in training.
            output_hidden_states (`bool`, *optional*):
                Whether to return the hidden states of all backbone layers.
            return_dict (`bool`, *optional*):
                Whether to return a [`CalmCausalLMOutputWithPast`] instead of a tuple.
            position_ids (`torch.LongTensor` of shape `(batch_size, num_chunks)`, *optional*):
                Chunk positions.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            chunk_attention_mask=chunk_attention_mask,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state

        loss = fidelity = diversity = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}.")
            if input_ids.shape[1] < 2 * self.config.patch_size:
                raise ValueError(
                    f"The energy loss needs at least two chunks (2 * K = {2 * self.config.patch_size} tokens): "
                    f"chunk i + 1 is predicted from chunks 0..i; got sequence_length {input_ids.shape[1]}."
                )
            loss, fidelity, diversity = self.energy_loss(hidden_states[:, :-1], labels, attention_mask)

        output = CalmCausalLMOutputWithPast(
            loss=loss,
            energy_fidelity=fidelity,
            energy_diversity=diversity,
            last_hidden_state=hidden_states,
            cache=outputs.cache if use_cache else None,
            hidden_states=outputs.hidden_states,
        )
        return output if return_dict else output.to_tuple()

    def energy_loss(
        self, hidden_states: torch.Tensor, labels: torch.LongTensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Energy loss of predicting chunks 1..L-1 of `labels` from `hidden_states` `(batch, L - 1, hidden_size)`.

        Returns `(loss, fidelity, diversity)`, each a mean over the valid target chunks.
        """
        K = self.config.patch_size
        target_ids = labels[:, K:]
        valid = target_ids != -100
        if attention_mask is not None and attention_mask.shape == labels.shape:
            valid = valid & (attention_mask[:, K:] != 0)
        valid_chunks = valid.unflatten(1, (-1, K)).all(-1)  # (batch, L - 1)
        with torch.no_grad():
            mean, log_std = self.autoencoder.encode(target_ids.masked_fill(target_ids == -100, 0))
        # N head samples per position, each with its own noise; noise is drawn before the targets, as officially.
        samples = self.generative_head(hidden_states, num_samples=self.config.num_samples)
        fidelity, diversity = energy_score_terms(
            samples, mean, log_std, num_targets=self.config.num_targets, alpha=self.config.energy_alpha
        )
        weights = valid_chunks.to(fidelity.dtype)
        count = weights.sum().clamp(min=1)
        fidelity = (fidelity * weights).sum() / count
        diversity = (diversity * weights).sum() / count
        return 2 * fidelity - diversity, fidelity, diversity

    # ------------------------------------------------------------------------------------------ public sampling API

    def sample_head_noise(self, shape, generator: torch.Generator | None = None) -> torch.Tensor:
        """The generative head's randomness for `shape` hidden states: `(*shape, noise_size)` uniform in [-0.5, 0.5),
        on the model's device and in its dtype. Pass it to [`sample_latents`] as `noise` to control every draw."""
        head = self.generative_head
        weight = head.noise_embd.weight
        uniform = torch.rand((*shape, head.noise_size), generator=generator, device=weight.device, dtype=weight.dtype)
        return uniform - 0.5

    def sample_latents(
        self,
        hidden_states: torch.Tensor,
        num_samples: int | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Samples of the next chunk's latent vector for backbone states `(..., hidden_size)`: `(..., latent_size)`, or
        `(num_samples, ..., latent_size)`. `noise` (from [`sample_head_noise`]) fixes the draws; otherwise they come
        from `generator` (the global RNG when `None`)."""
        return self.generative_head(hidden_states, noise=noise, generator=generator, num_samples=num_samples)

    def decode_latents(self, latents: torch.Tensor) -> torch.LongTensor:
        """Token ids `(..., K)` of latent vectors `(..., latent_size)`: the autoencoder decoder's argmax."""
        return self.decode_chunk_tokens(latents)

    def sample_chunks(
        self,
        hidden_states: torch.Tensor,
        num_samples: int | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.LongTensor:
        """`decode_latents(sample_latents(...))`: sampled chunks `(..., K)` (with `num_samples`: `(num_samples, ..., K)`)."""
        return self.decode_latents(self.sample_latents(hidden_states, num_samples, noise=noise, generator=generator))

    def encode_chunks(self, input_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen autoencoder's posterior `(mean, log_std)`, each `(batch, num_chunks, latent_size)`, of token ids
        `(batch, num_chunks * K)`."""
        return self.autoencoder.encode(input_ids)

    # ----------------------------------------------------------------------------------------------- generation

    def decode_chunk_tokens(self, latents: torch.Tensor, max_logits: int = 2**26) -> torch.LongTensor:
        """Token ids `(..., K)` of latent vectors `(..., latent_size)`: the argmax of the autoencoder decoder.

        The decoder runs on at most `max_logits` logits at a time, so that many candidates over a large vocabulary
        (e.g. 200 x batch 32 x K 4 x 128k) never materialise at once.
        """
        flat = latents.reshape(-1, 1, latents.shape[-1])
        per_latent = self.config.patch_size * self.config.vocab_size
        step = max(1, max_logits // per_latent)
        if len(flat) <= step:  # the usual case: one decoder call, no copy
            tokens = self.autoencoder.decode_token_ids(flat)
        else:
            tokens = torch.cat(
                [self.autoencoder.decode_token_ids(flat[i : i + step]) for i in range(0, len(flat), step)]
            )
        return tokens.reshape(*latents.shape[:-1], self.config.patch_size)

    def sample_next_chunk(
        self,
        hidden_states: torch.Tensor,
        temperature: float = 1.0,
        do_sample: bool = True,
        num_candidates: int = 200,
        exact_temperature: bool = False,
        max_draws: int = 10_000,
        generator: torch.Generator | None = None,
    ) -> torch.LongTensor:
        """The K token ids of the next chunk of every row, from the backbone's last hidden state `(batch, hidden)`.

        - `do_sample=False`: the most frequent of `num_candidates` head samples (the T -> 0 limit of the batch
          approximation; deterministic for a given generator state).
        - `temperature=1`: one head sample per row, decoded by the autoencoder.
        - `temperature < 1`: the paper's batch approximation from `num_candidates` samples
          ([`~sampling.batch_temperature_sample`]), or with `exact_temperature=True` its exact rejection sampler
          ([`~sampling.exact_temperature_sample`]).
        """

        def draw(num: int, rows: torch.Tensor | None = None) -> torch.LongTensor:
            h = hidden_states if rows is None else hidden_states[rows]
            latents = self.generative_head(h, generator=generator, num_samples=num)
            return self.decode_chunk_tokens(latents)

        if not do_sample:
            return mode_sample(draw(num_candidates))
        if temperature == 1.0:
            return draw(1)[0]
        if exact_temperature:
            return exact_temperature_sample(draw, temperature, generator=generator, max_draws=max_draws).samples
        return batch_temperature_sample(draw(num_candidates), temperature, generator=generator)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        streamer=None,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> torch.LongTensor | GenerateDecoderOnlyOutput:
        r"""Generate continuations, one chunk of K tokens per backbone step.

        The prompt is read in one forward pass (prefill); then every step samples the next chunk's latent vector
        with the energy head, decodes it to K tokens with the autoencoder, and feeds that chunk back through the KV
        cache. Head, decoder and sampler run batched over rows.

        Prompts: any length, batched with left padding and an `attention_mask` (right padding is rejected: pads
        would sit between a prompt and its continuation). A prompt whose length is not a multiple of K is padded
        on the LEFT up to the next multiple, so its first chunk is partial: the padded positions are masked out of
        attention and contribute zero embeddings, and the chunk right before the continuation is always complete
        (the official code instead right-pads and feeds the pads as context). The returned sequences are the
        prompts as given followed by the continuations, as in transformers; no pad is ever inserted between them.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, prompt_length)`):
                Prompt token ids.
            attention_mask (`torch.Tensor` of shape `(batch_size, prompt_length)`, *optional*):
                1 for prompt tokens, 0 for left padding.
            generation_config (`GenerationConfig`, *optional*):
                Defaults to `model.generation_config`. Fields used: `max_new_tokens` / `max_length`,
                `eos_token_id` (a row stops at an EOS anywhere inside a chunk; the chunk's tokens after it, and all
                later tokens of that row, become `pad_token_id`), `pad_token_id`, `do_sample`, `temperature`,
                `num_return_sequences`, `return_dict_in_generate`, and CALM's own: `num_candidates` (N of the batch
                approximation, default 200), `exact_temperature` (default False) and `max_draws`.
            stopping_criteria (`StoppingCriteriaList`, *optional*):
                Extra criteria, called after every chunk with the sequences so far (scores are `None`).
            streamer (`BaseStreamer`, *optional*):
                Receives the prompt, then the K new tokens of every step (batch size 1).
            generator (`torch.Generator`, *optional*):
                Random generator for the head noise and the samplers; the global RNG when `None`.
            kwargs:
                Overrides of `generation_config` fields, e.g. `max_new_tokens=64, temperature=0.5`.

        Temperature: `temperature` in (0, 1] targets P^(1/T) over chunks without likelihoods (values above 1
        raise: repeated sampling can only sharpen). `do_sample=False` returns the most frequent of
        `num_candidates` head samples.

        Returns:
            `torch.LongTensor` `(batch_size * num_return_sequences, prompt_length + new_tokens)`, or a
            `GenerateDecoderOnlyOutput` with `sequences` and the backbone's cache (field `cache`, `past_key_values`
            before transformers 5.24) when `return_dict_in_generate`.
        """
        if generation_config is None:
            config = copy.deepcopy(self.generation_config) if self.generation_config is not None else GenerationConfig()
        else:
            # As in transformers: fields the caller's config leaves unset come from the model's defaults.
            config = copy.deepcopy(generation_config)
            if self.generation_config is not None:
                for name, value in self.generation_config.to_dict().items():
                    if getattr(config, name, None) is None:
                        setattr(config, name, value)
        for name, value in CALM_GENERATION_DEFAULTS.items():
            if not hasattr(config, name):
                setattr(config, name, value)
        unused = config.update(**kwargs)
        if unused:
            raise ValueError(f"generate() got unknown arguments {sorted(unused)}.")

        K = self.config.patch_size
        if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError("input_ids must be a non-empty prompt of shape (batch_size, prompt_length).")
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}.")
        attention_mask = attention_mask.to(device=device, dtype=torch.long)
        if (attention_mask[:, 1:] < attention_mask[:, :-1]).any():
            raise ValueError(
                "Found right padding in attention_mask: pads would sit between a prompt and its continuation. "
                "Pad prompts on the left (tokenizer.padding_side = 'left')."
            )
        if not attention_mask[:, -1].all():
            raise ValueError("Every prompt needs at least one token (attention_mask row of zeros).")

        temperature = 1.0 if config.temperature is None else check_temperature(config.temperature)
        do_sample = True if config.do_sample is None else config.do_sample
        num_candidates = int(config.num_candidates)
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}.")

        prompt_length = input_ids.shape[1]
        max_new_tokens = config.max_new_tokens
        if max_new_tokens is None:
            max_new_tokens = config.max_length - prompt_length if config.max_length is not None else DEFAULT_MAX_NEW_TOKENS
        if max_new_tokens <= 0:
            raise ValueError(
                f"Nothing to generate: max_new_tokens is {max_new_tokens} (max_length {config.max_length}, prompt "
                f"length {prompt_length}). Raise max_new_tokens or max_length."
            )
        if prompt_length + max_new_tokens > self.config.max_position_embeddings * K:
            raise ValueError(
                f"prompt_length + max_new_tokens = {prompt_length + max_new_tokens} tokens exceeds the model's "
                f"context of max_position_embeddings * K = {self.config.max_position_embeddings * K} tokens."
            )

        eos_ids = config.eos_token_id if config.eos_token_id is not None else self.config.eos_token_id
        eos_ids = torch.tensor([eos_ids] if isinstance(eos_ids, int) else list(eos_ids or []), device=device)
        pad_id = config.pad_token_id if config.pad_token_id is not None else self.config.pad_token_id
        if pad_id is None and len(eos_ids):
            pad_id = int(eos_ids[0])  # as transformers does when a model has no pad token
        if pad_id is None and stopping_criteria:
            raise ValueError(
                "Finished rows are filled with pad_token_id, but the model has none: pass pad_token_id=... (e.g. "
                "tokenizer.pad_token_id) or set model.generation_config.pad_token_id."
            )

        num_return = config.num_return_sequences or 1
        if num_return > 1:
            input_ids = input_ids.repeat_interleave(num_return, dim=0)
            attention_mask = attention_mask.repeat_interleave(num_return, dim=0)
        batch_size = input_ids.shape[0]
        if streamer is not None:
            if batch_size != 1:
                raise ValueError("A streamer needs batch size 1 (and num_return_sequences=1).")
            streamer.put(input_ids.cpu())

        # Left-pad to whole chunks: the partial chunk is the first one, far from the continuation.
        fill = (-prompt_length) % K
        padded_ids = torch.nn.functional.pad(input_ids, (fill, 0), value=0 if pad_id is None else pad_id)
        token_mask = torch.nn.functional.pad(attention_mask, (fill, 0), value=0)

        # Without any padding the mask is all ones: the backbone then needs none (plain causal attention), which
        # saves building and checking a mask at every step.
        padded = bool(fill) or not bool(attention_mask.all())

        cache = DynamicCache(config=self.config)
        outputs = self.model(
            input_ids=padded_ids, attention_mask=token_mask if padded else None, cache=cache, use_cache=True
        )
        criteria = stopping_criteria if stopping_criteria is not None else StoppingCriteriaList()
        sampler = {
            "temperature": temperature,
            "do_sample": do_sample,
            "num_candidates": num_candidates,
            "exact_temperature": bool(config.exact_temperature),
            "max_draws": int(config.max_draws),
            "generator": generator,
        }
        sequences = input_ids
        finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
        chunk_mask = torch.ones(batch_size, K, dtype=token_mask.dtype, device=device)
        num_steps = math.ceil(max_new_tokens / K)
        # Without EOS or criteria no row can finish early: skip the check, a host-device sync per step on GPU.
        can_finish = bool(len(eos_ids)) or bool(len(criteria))
        for step in range(num_steps):
            chunk = self.sample_next_chunk(outputs.last_hidden_state[:, -1], **sampler)
            if len(eos_ids):
                is_eos = torch.isin(chunk, eos_ids)
                after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
                chunk = chunk.masked_fill(after_eos | finished.unsqueeze(-1), pad_id)
                finished = finished | is_eos.any(-1)
            elif pad_id is not None and can_finish:
                chunk = chunk.masked_fill(finished.unsqueeze(-1), pad_id)
            kept = chunk[:, : min(K, max_new_tokens - step * K)]
            sequences = torch.cat([sequences, kept], dim=-1)
            if streamer is not None:
                streamer.put(kept.cpu())
            if len(criteria):
                finished = finished | criteria(sequences, None).to(device)
            if step == num_steps - 1 or (can_finish and finished.all()):
                break
            if padded:
                token_mask = torch.cat([token_mask, chunk_mask], dim=-1)
            outputs = self.model(
                input_ids=chunk, attention_mask=token_mask if padded else None, cache=cache, use_cache=True
            )

        if streamer is not None:
            streamer.end()
        if config.return_dict_in_generate:
            return GenerateDecoderOnlyOutput(sequences=sequences, **{CACHE_NAME: cache})
        return sequences

    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, **kwargs):
        # Not used by `generate` (which drives the backbone itself); kept for tools that call it (e.g. peft).
        return {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache}


__all__ = [
    "CalmCausalLMOutputWithPast",
    "CalmModelOutputWithPast",
    "CalmEnergyHead",
    "CalmForCausalLM",
    "CalmModel",
    "CalmPreTrainedModel",
    "energy_score_terms",
]
