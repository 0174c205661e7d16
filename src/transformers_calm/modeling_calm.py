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

from .calm_loss import CalmHeadLoss, head_loss
from .compat import CACHE_NAME, cache_max_length
from .configuration_calm import CalmConfig
from .generation_calm import CalmGenerationMixin
from .generation_configuration_calm import CalmGenerationConfig
from .modeling_calm_autoencoder import CalmAutoencoder, check_input_ids, id_outside_vocabulary
from .modeling_diffusion_head import CalmDiffusionHead
from .modeling_energy_head import CalmEnergyHead, CalmEnergyHeadOutputLayer
from .modeling_flow_head import CalmAdaLNLinear, CalmFlowHead
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

    def resize_token_embeddings(self, *args, **kwargs):
        raise NotImplementedError(
            "CALM's vocabulary is its frozen autoencoder's (vocab_size, the decoder's output layer, K and l come from "
            "it), so the token embeddings cannot be resized. Train an autoencoder with the new tokenizer, then a "
            "language model around it (CalmForCausalLM.from_autoencoder)."
        )

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
        # Input compression: the K token embeddings of a chunk, concatenated in token order, to one vector.
        hidden_size = config.hidden_size
        self.embed_proj = nn.Sequential(
            nn.Linear(config.patch_size * hidden_size, 2 * hidden_size),
            nn.SiLU(),
            nn.Linear(2 * hidden_size, hidden_size),
            nn.LayerNorm(hidden_size, eps=1e-6),
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding):
        self.backbone.set_input_embeddings(value)

    def embed_chunks(self, input_ids: torch.LongTensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Input vectors `(batch, num_chunks, hidden_size)` of token ids `(batch, num_chunks * K)`.

        Tokens where `token_mask` is 0 contribute a zero embedding, whatever their id (the official model reads its
        `[PAD]` id, whose embedding row is zero), so a partly padded chunk is read the same way for any pad id.
        """
        check_input_ids(input_ids, self.config)
        embeddings = self.get_input_embeddings()(input_ids)
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
                Token ids in `[0, vocab_size)`; `sequence_length` must be a multiple of `patch_size` (K).
            attention_mask (`torch.Tensor` of shape `(batch_size, (past_chunks + num_chunks) * K)`, *optional*):
                One entry per token, past included (1 = real token, 0 = padding): a chunk is attended to when any of
                its tokens is, and padded tokens contribute a zero embedding to their chunk.
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
            chunk_attention_mask (`torch.Tensor` of shape `(batch_size, past_chunks + num_chunks)`, *optional*):
                One entry per chunk instead of `attention_mask` (not both): 0 hides a whole chunk. With a static
                cache it may also span the cache's whole length (`(batch_size, max_cache_len)`), the same shape at
                every step.
            kwargs:
                Passed on to the backbone (e.g. `output_attentions`).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if attention_mask is not None and chunk_attention_mask is not None:
            raise ValueError("Pass attention_mask (one entry per token) or chunk_attention_mask (per chunk), not both.")
        K = self.config.patch_size
        inputs = input_ids if inputs_embeds is None else inputs_embeds
        batch_size, num_chunks = inputs.shape[0], inputs.shape[1] // K if inputs_embeds is None else inputs.shape[1]
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
            token_mask = attention_mask[:, past * K :]
            chunk_attention_mask = attention_mask.unflatten(1, (-1, K)).any(-1).to(attention_mask.dtype)
        else:
            token_mask = None
            if (
                chunk_attention_mask is not None
                and not full_static_mask
                and chunk_attention_mask.shape != (batch_size, past + num_chunks)
            ):
                raise ValueError(
                    f"chunk_attention_mask must have one entry per chunk, past included: shape ({batch_size}, "
                    f"{past + num_chunks}), got {tuple(chunk_attention_mask.shape)}."
                )
        if inputs_embeds is None:
            inputs_embeds = self.embed_chunks(input_ids, token_mask)
        if self.training and self.config.input_noise_std > 0:  # not the official method (0.0); see CalmConfig
            inputs_embeds = inputs_embeds + self.config.input_noise_std * torch.randn_like(inputs_embeds)
        # Unset, they follow this config (as in any transformers model), not the backbone's own.
        if kwargs.get("output_attentions") is None:
            kwargs["output_attentions"] = self.config.output_attentions
        outputs = self.backbone(
            inputs_embeds=inputs_embeds,
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
        super().train(mode)
        self._freeze_autoencoder()
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

    @classmethod
    def from_pretrained_decoder(
        cls, model_or_path, autoencoder: CalmAutoencoder, init_input_compression: bool = False, **kwargs
    ) -> "CalmForCausalLM":
        """A new CALM whose backbone starts from a pretrained token-level decoder (not in the paper; see
        `pretrained_decoder.py`): its decoder layers, final norm, rotary settings and token embeddings; a new head.

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
        return calm_from_pretrained_decoder(cls, model_or_path, autoencoder, init_input_compression, **kwargs)

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
        """
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
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state

        terms = CalmHeadLoss(None, None, None, None, None)
        if labels is not None:
            if input_ids is None or labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels {tuple(labels.shape)} must have the shape of input_ids "
                    f"{None if input_ids is None else tuple(input_ids.shape)}."
                )
            bad = id_outside_vocabulary(labels, self.config.vocab_size, ignore_index=-100)
            if bad is not None:
                raise ValueError(
                    f"labels contain the token id {bad}, outside the vocabulary [0, {self.config.vocab_size}); use "
                    "-100 for positions to ignore, and the tokenizer the autoencoder was trained with."
                )
            if input_ids.shape[1] < 2 * self.config.patch_size:
                raise ValueError(
                    f"The energy loss needs at least two chunks (2 * K = {2 * self.config.patch_size} tokens): "
                    f"chunk i + 1 is predicted from chunks 0..i; got sequence_length {input_ids.shape[1]}."
                )
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
