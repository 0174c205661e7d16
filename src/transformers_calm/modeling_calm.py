"""CALM: Continuous Autoregressive Language Model (Shao et al., 2025, arXiv 2510.27688, section 3): the model and its
energy loss.

The backbone is any transformers decoder (`AutoModel.from_config(config.backbone_config)`, a `LlamaModel` by default).
Its input at chunk i is the official "input compression" of chunk i's K token embeddings; its final hidden state at
chunk i conditions the energy head (`modeling_energy_head.py`), which samples the latent vector of chunk i + 1 in one
step. The frozen autoencoder (`modeling_calm_autoencoder.py`) maps target chunks to latent posteriors (training) and
sampled latent vectors back to tokens. Generation lives in `generation_calm.py`.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput
from transformers.utils.deprecation import deprecate_kwarg

from .calm_loss import CalmHeadLoss, check_labels, head_loss
from .compat import CACHE_NAME
from .configuration_calm import CalmConfig
from .generation_calm import CalmGenerationMixin
from .generation_configuration_calm import CalmGenerationConfig
from .input_compression import chunk_masks, compress_chunks, input_compression
from .modeling_calm_autoencoder import CalmAutoencoder, check_autoencoder_matches, check_input_ids, check_no_adapters
from .modeling_diffusion_head import CalmDiffusionHead
from .modeling_energy_head import CalmEnergyHead, CalmEnergyHeadOutputLayer
from .modeling_flow_head import CalmAdaLNLinear, CalmFlowHead
from .official_checkpoints import CALM_KEY_MAPPING, load_pretrained
from .pretrained_decoder import calm_from_pretrained_decoder
from .sampling import CalmSamplingMixin
from .token_loss import CalmTokenLossHead

# The generative heads by `config.head_type`: the paper's energy head and the official ablations.
HEADS = {"energy": CalmEnergyHead, "flow": CalmFlowHead, "diffusion": CalmDiffusionHead}


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
        decoder_loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `config.decoder_loss_weight > 0`):
            The auxiliary token loss through the frozen decoder (`decoder_loss.py`), in nats per token, before its
            weight; `loss` includes `decoder_loss_weight * decoder_loss`.
        token_loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `config.token_loss_weight > 0`):
            The auxiliary multi-token loss on the backbone's states (`token_loss.py`), in nats per token, before its
            weight; `loss` includes `token_loss_weight * token_loss`.
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

    loss: torch.FloatTensor | None = None
    energy_fidelity: torch.FloatTensor | None = None
    energy_diversity: torch.FloatTensor | None = None
    decoder_loss: torch.FloatTensor | None = None
    token_loss: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class CalmPreTrainedModel(PreTrainedModel):
    config_class = CalmConfig
    base_model_prefix = "model"
    # Every Auto class of a saved checkpoint's `auto_map`, so that it also loads with trust_remote_code.
    _auto_map_entries = {
        "AutoConfig": "configuration_calm.CalmConfig",
        "AutoModel": "modeling_calm.CalmModel",
        "AutoModelForCausalLM": "modeling_calm.CalmForCausalLM",
    }
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    # The backbone's decoder layer comes from the backbone model's own `_no_split_modules`.
    _no_split_modules = ["CalmEnergyHeadBlock", "CalmAutoencoderLayer"]
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # The energy loss is a per-batch mean: Trainer must divide it by gradient_accumulation_steps itself.
    accepts_loss_kwargs = False
    # How an official checkpoint's tensors are named in this class, by official kind (official_checkpoints.py).
    _official_key_mapping: dict[str, dict[str, str]] = {}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' `from_pretrained`, which also loads the official CALM checkpoints as published (see
        `official_checkpoints.load_pretrained`)."""
        return load_pretrained(super().from_pretrained, cls, pretrained_model_name_or_path, args, kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, CalmEnergyHeadOutputLayer):
            init.zeros_(module.weight)  # the head starts by predicting the zero vector, as the official code does
            init.zeros_(module.bias)
        elif isinstance(module, CalmAdaLNLinear):
            module.official_init()  # the flow / diffusion network's official init (xavier, time MLP, zeros)
        else:
            super()._init_weights(module)


class CalmModel(CalmPreTrainedModel):
    """The CALM backbone: token embeddings compressed per chunk, then the transformers decoder of
    `config.backbone_config`. Returns one hidden state per chunk of K tokens."""

    def __init__(self, config: CalmConfig):
        super().__init__(config)
        # The backbone's own token embedding (padding_idx = the pad token) is CALM's input embedding.
        self.backbone = AutoModel.from_config(config.backbone_config)
        self.embed_proj = input_compression(config.hidden_size, config.patch_size)  # `input_compression.py`
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding):
        self.backbone.set_input_embeddings(value)

    def embed_chunks(self, input_ids: torch.LongTensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Input vectors `(batch, num_chunks, hidden_size)` of token ids `(batch, num_chunks * K)`."""
        check_input_ids(input_ids, self.config)
        return self.compress_chunks(self.get_input_embeddings()(input_ids), token_mask)

    def compress_chunks(self, inputs_embeds: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings `(batch, num_chunks * K, hidden_size)` to input vectors `(batch, num_chunks, hidden_size)`;
        tokens where `token_mask` is 0 contribute a zero embedding ([`~input_compression.compress_chunks`])."""
        return compress_chunks(self.embed_proj, inputs_embeds, self.config.patch_size, token_mask)

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
        chunk_embeds: torch.FloatTensor | None = None,
        **kwargs,
    ) -> CalmModelOutputWithPast | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Token ids in `[0, vocab_size)`; `sequence_length` must be a multiple of `patch_size` (K).
            attention_mask (`torch.Tensor` of shape `(batch_size, (past_chunks + num_chunks) * K)`, *optional*):
                One entry per token, past included (1 = real token, 0 = padding): a chunk is attended to when any of
                its tokens is, and padded tokens contribute a zero embedding to their chunk.
            position_ids (`torch.LongTensor` of shape `(batch_size, num_chunks)`, *optional*):
                Chunk positions; by default they continue from the cache length.
            cache (`Cache`, *optional*):
                Key/value cache of earlier chunks (e.g. a `DynamicCache`, or the `cache` of an earlier output).
                `past_key_values`, its name before transformers 5.24, is accepted with a deprecation warning.
            inputs_embeds (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
                Token embeddings instead of `input_ids` (as `get_input_embeddings()(input_ids)`), compressed per chunk
                as the ids' embeddings are. In transformers-calm 0.2 and earlier it took chunk vectors: pass those as
                `chunk_embeds`.
            use_cache (`bool`, *optional*):
                Whether to return the key/value cache.
            output_hidden_states (`bool`, *optional*):
                Whether to return the hidden states of all layers.
            return_dict (`bool`, *optional*):
                Whether to return a [`CalmModelOutputWithPast`] instead of a tuple.
            chunk_attention_mask (`torch.Tensor` of shape `(batch_size, past_chunks + num_chunks)`, *optional*):
                One entry per chunk instead of `attention_mask` (not both): 0 hides a whole chunk. With a static
                cache it may also span the cache's whole length (`(batch_size, max_cache_len)`), the same shape at
                every step.
            chunk_embeds (`torch.FloatTensor` of shape `(batch_size, num_chunks, hidden_size)`, *optional*):
                The backbone's input vectors themselves (already compressed chunks), instead of `input_ids`.
            kwargs:
                Passed on to the backbone (e.g. `output_attentions`).
        """
        if sum(x is not None for x in (input_ids, inputs_embeds, chunk_embeds)) != 1:
            raise ValueError(
                "Pass exactly one of input_ids (token ids), inputs_embeds (token embeddings) or chunk_embeds (one "
                "compressed vector per chunk)."
            )
        K = self.config.patch_size
        if chunk_embeds is not None:
            batch_size, num_chunks = chunk_embeds.shape[:2]
        else:
            inputs = input_ids if input_ids is not None else inputs_embeds
            batch_size, num_chunks = inputs.shape[0], inputs.shape[1] // K
        token_mask, chunk_attention_mask = chunk_masks(
            attention_mask, chunk_attention_mask, cache, batch_size, num_chunks, K
        )
        if input_ids is not None:
            chunk_embeds = self.embed_chunks(input_ids, token_mask)
        elif inputs_embeds is not None:
            chunk_embeds = self.compress_chunks(inputs_embeds, token_mask)
        if self.training and self.config.input_noise_std > 0:  # not the official method (0.0); see CalmConfig
            chunk_embeds = chunk_embeds + self.config.input_noise_std * torch.randn_like(chunk_embeds)
        # Unset, they follow this config (as in any transformers model), not the backbone's own.
        if kwargs.get("output_attentions") is None:
            kwargs["output_attentions"] = self.config.output_attentions
        outputs = self.backbone(
            inputs_embeds=chunk_embeds,
            attention_mask=chunk_attention_mask,
            position_ids=position_ids,
            use_cache=self.config.use_cache if use_cache is None else use_cache,
            output_hidden_states=self.config.output_hidden_states
            if output_hidden_states is None
            else output_hidden_states,
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


class CalmForCausalLM(CalmPreTrainedModel, CalmSamplingMixin, CalmGenerationMixin):
    """CALM with its energy head and its frozen autoencoder.

    The autoencoder is a submodule, saved and loaded in the same checkpoint, always in eval mode and without
    gradients. Start a new language model from a trained autoencoder with [`CalmForCausalLM.from_autoencoder`].
    `generate` ([`~generation_calm.CalmGenerationMixin.generate`]) produces K tokens per backbone step. The sampling
    methods (`sample_latents`, `decode_latents`, `sample_chunks`, `sample_head_noise`, `encode_chunks`) are the
    public way to draw from the model, used by `generate`, `CalmTrainer` and BrierLM alike.
    """

    # The static-cache decoding step, head and samplers included, compiles in one graph (test_generation_common.py).
    _can_compile_fullgraph = True
    _official_key_mapping = {"calm": CALM_KEY_MAPPING}

    def __init__(self, config: CalmConfig):
        super().__init__(config)
        self.model = CalmModel(config)
        self.generative_head = HEADS[config.head_type](config)
        if config.token_loss_weight > 0:  # not the official model: the auxiliary token loss's layer (see CalmConfig)
            self.token_loss_head = CalmTokenLossHead(config.hidden_size, config.vocab_size, config.patch_size)
        if config.decoder_loss_weight > 0 and config.decoder_loss_type == "point":
            # Not the official model: the auxiliary branch of the "point" decoder loss (see CalmConfig).
            self.decoder_loss_proj = nn.Linear(config.hidden_size, config.latent_size)
        self.autoencoder = CalmAutoencoder(config.autoencoder_config)
        self.post_init()
        self._freeze_autoencoder()
        # transformers < 5.12 builds a plain GenerationConfig from the serialised config fields, without CALM's
        # special tokens (properties of CalmConfig): build CALM's defaults on every release.
        self.generation_config = CalmGenerationConfig.from_model_config(config)

    def _freeze_autoencoder(self):
        """The one place that freezes the autoencoder: no gradients, always eval mode (no DropToken/DropLatent, no bf16
        embedding cast). Called wherever transformers or torch could undo it: after init, after loading (`from_pretrained`
        creates new parameters, then ties weights) and on every `train()`."""
        self.autoencoder.requires_grad_(False)
        self.autoencoder.eval()

    def tie_weights(self, *args, **kwargs):
        super().tie_weights(*args, **kwargs)
        self._freeze_autoencoder()

    def train(self, mode: bool = True):
        if mode:  # adapters in the frozen autoencoder would never train (loading or running them is fine)
            check_no_adapters(self.autoencoder)
        super().train(mode)
        self._freeze_autoencoder()
        return self

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding):
        self.model.set_input_embeddings(value)

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True) -> nn.Embedding:
        """transformers' `resize_token_embeddings`, for every table of CALM's vocabulary: the backbone's token
        embedding, the autoencoder's (its encoder's embedding, its decoder's output layer) and the auxiliary token
        loss's. The new tokens' rows start at the mean of the old ones; the autoencoder reads and writes them only
        once it is trained on text that has them."""
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        size = embeddings.num_embeddings
        self.autoencoder.resize_token_embeddings(size, mean_resizing=mean_resizing)
        if hasattr(self, "token_loss_head"):
            old = self.token_loss_head.unembedding
            self.token_loss_head.unembedding = self._get_resized_lm_head(old, size, mean_resizing=mean_resizing)
        self._freeze_autoencoder()
        return embeddings

    @classmethod
    def from_autoencoder(cls, autoencoder: CalmAutoencoder, config: CalmConfig | None = None, **config_kwargs):
        """A new, randomly initialised language model around a trained (frozen) autoencoder.

        Args:
            autoencoder ([`CalmAutoencoder`]):
                The trained autoencoder; its weights are copied into the model, and its config defines K, l, the
                vocabulary and the special tokens.
            config ([`CalmConfig`], *optional*):
                Backbone and head configuration; its `autoencoder_config` is replaced by the autoencoder's.
            config_kwargs:
                Without `config`: fields of `CalmConfig`, e.g. `backbone_config=Qwen3Config(...)`, `noise_size=32`,
                or flat Llama fields (`hidden_size=1024, num_hidden_layers=16, ...`) for a Llama backbone.
        """
        if config is None:
            config = CalmConfig(**config_kwargs, autoencoder_config=autoencoder.config.to_dict())
        else:
            values = config.to_dict()
            values["autoencoder_config"] = autoencoder.config.to_dict()
            config = CalmConfig(**values)
        model = cls(config)
        model.autoencoder.load_state_dict(autoencoder.state_dict())
        return model.to(autoencoder.dtype)

    # A new CALM on a pretrained token-level decoder (not in the paper): documented in `pretrained_decoder.py`.
    from_pretrained_decoder = classmethod(calm_from_pretrained_decoder)

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
        inputs_embeds: torch.FloatTensor | None = None,
        chunk_embeds: torch.FloatTensor | None = None,
        **kwargs,
    ) -> CalmCausalLMOutputWithPast | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Token ids in `[0, vocab_size)`; `sequence_length` must be a multiple of `patch_size` (K). Chunk i is
                read at backbone position i.
            attention_mask (`torch.Tensor` of shape `(batch_size, (past_chunks + num_chunks) * K)`, *optional*):
                1 for real tokens, 0 for padding, one entry per token (past included). Padded chunks are not attended
                to and not predicted.
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Usually `input_ids`. The hidden state of chunk i is trained to predict chunk i + 1 of `labels`; a
                target chunk counts only if none of its K labels is -100 (and none of its tokens is padding).
            cache (`Cache`, *optional*):
                Key/value cache of earlier chunks (the `cache` of an earlier output). `past_key_values`, its name
                before transformers 5.24, is accepted with a deprecation warning.
            use_cache (`bool`, *optional*):
                Whether to return the cache; defaults to `config.use_cache` in eval mode and `False` in
                training.
            output_hidden_states (`bool`, *optional*):
                Whether to return the hidden states of all backbone layers.
            return_dict (`bool`, *optional*):
                Whether to return a [`CalmCausalLMOutputWithPast`] instead of a tuple.
            position_ids (`torch.LongTensor` of shape `(batch_size, num_chunks)`, *optional*):
                Chunk positions.
            chunk_attention_mask (`torch.Tensor` of shape `(batch_size, past_chunks + num_chunks)`, *optional*):
                One entry per chunk instead of `attention_mask` (see [`CalmModel.forward`]).
            inputs_embeds (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
                Token embeddings instead of `input_ids`, compressed per chunk as the ids' are.
            chunk_embeds (`torch.FloatTensor` of shape `(batch_size, num_chunks, hidden_size)`, *optional*):
                The backbone's input vectors (compressed chunks) instead of `input_ids`.
        """
        check_autoencoder_matches(self.config.autoencoder_config, self.autoencoder)
        if kwargs.pop("shift_labels", None) is not None:  # transformers' token models take them; CALM would drop them
            raise ValueError(
                "CALM takes unshifted labels: pass labels=input_ids (the state of chunk i predicts chunk i + 1 of "
                "labels), not shift_labels."
            )
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
            inputs_embeds=inputs_embeds,
            chunk_embeds=chunk_embeds,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state

        terms = CalmHeadLoss(None, None, None, None, None)
        if labels is not None:
            check_labels(labels, hidden_states.shape[:2], self.config)
            token_mask = attention_mask if attention_mask is not None and cache is None else None
            terms = self.head_loss(hidden_states[:, :-1], labels, token_mask)

        output = CalmCausalLMOutputWithPast(
            loss=terms.loss,
            energy_fidelity=terms.energy_fidelity,
            energy_diversity=terms.energy_diversity,
            decoder_loss=terms.decoder_loss,
            token_loss=terms.token_loss,
            last_hidden_state=hidden_states,
            cache=outputs.cache if use_cache else None,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()

    def head_loss(
        self, hidden_states: torch.Tensor, labels: torch.LongTensor, attention_mask: torch.Tensor | None = None
    ) -> CalmHeadLoss:
        """The loss of predicting chunks 1..L-1 of `labels` from `hidden_states` `(batch, L - 1, hidden_size)`, with
        `attention_mask` `(batch, L * K)` marking padded tokens: see [`~calm_loss.head_loss`]."""
        return head_loss(self, hidden_states, labels, attention_mask)


__all__ = [
    "CalmCausalLMOutputWithPast",
    "CalmModelOutputWithPast",
    "CalmForCausalLM",
    "CalmModel",
    "CalmPreTrainedModel",
]
