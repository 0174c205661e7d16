"""Configuration of the CALM language model (Shao et al., 2025, arXiv 2510.27688, section 3)."""

import copy

from transformers import AutoConfig, LlamaConfig, PreTrainedConfig

from .configuration_calm_autoencoder import CalmAutoencoderConfig

# The flat backbone fields of configs written before `backbone_config` existed (transformers-calm 0.1 and the
# converter's first version): they were the fields of a LlamaConfig.
_LEGACY_BACKBONE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rope_parameters",
    "rope_theta",
    "rms_norm_eps",
    "attention_bias",
    "attention_dropout",
    "mlp_bias",
    "initializer_range",
    "pretraining_tp",
)
HEAD_TYPES = ("energy", "flow", "diffusion")
DECODER_LOSS_TYPES = ("mixture", "per_sample", "point")
# What the autoencoder defines for the whole model: one source of truth.
_FROM_AUTOENCODER = ("vocab_size", "patch_size", "latent_size", "pad_token_id", "bos_token_id", "eos_token_id")


class _BackboneField:
    """A backbone field read and set through `CalmConfig` (`config.num_hidden_layers = 1`, as transformers' test
    utilities and many scripts do): it lives in `backbone_config` alone, so that a saved config holds it once and
    loads. A field the backbone does not have raises AttributeError, as on the backbone's own config."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, config, owner=None):
        if config is None:
            return self
        return getattr(config.backbone_config, self.name)

    def __set__(self, config, value):
        setattr(config.backbone_config, self.name, value)


class CalmConfig(PreTrainedConfig):
    r"""
    Configuration of a [`CalmForCausalLM`], composed the way transformers composes multimodal models:

    - `autoencoder_config`: the frozen chunk autoencoder ([`CalmAutoencoderConfig`]). It is the one source of truth for
      K (`patch_size`), l (`latent_size`), the vocabulary and the special token ids; `config.patch_size`,
      `config.latent_size`, `config.vocab_size` and `config.pad_token_id` / `bos_token_id` / `eos_token_id` read them
      from it.
    - `backbone_config`: any decoder-only transformers config (a [`~transformers.LlamaConfig`] by default; also e.g.
      `Qwen3Config` or `MistralConfig`). The backbone is built from it with `AutoModel.from_config`: transformers' own
      attention, RoPE, KV cache and attention implementations. Its positions count chunks, not tokens
      (`max_position_embeddings` chunks = `max_position_embeddings * K` tokens). Its vocabulary size and pad token are
      set from the autoencoder: its token embedding is CALM's input embedding.
    - CALM's own fields: the generative head (`head_type`) and its loss.

    Args:
        backbone_config (`PreTrainedConfig` or `dict`, *optional*):
            Config of the backbone, or its dict (with a `model_type`; `"llama"` when missing). Defaults to a
            `LlamaConfig` of CALM-M's width (hidden 768, intermediate 2048, 12 layers, 12 heads, RMS norm epsilon
            1e-6, 2048 positions).
        autoencoder_config (`CalmAutoencoderConfig` or `dict`, *optional*):
            Config of the frozen autoencoder; defaults to `CalmAutoencoderConfig()`.
        head_type (`str`, *optional*, defaults to `"energy"`):
            The generative head: `"energy"` (the paper's: one step, trained with the energy score), or the official
            ablations `"flow"` (flow matching, 10 midpoint steps) and `"diffusion"` (DDPM, 100 steps), both on the
            MLP-AdaLN network (`modeling_flow_head.py`, `modeling_diffusion_head.py`).
        num_mlp_layers (`int`, *optional*, defaults to 4):
            Residual blocks of the head.
        noise_size (`int`, *optional*, defaults to 64):
            Size of the uniform noise vector the energy head turns into a latent sample (energy head only).
        num_samples (`int`, *optional*, defaults to 8):
            N, head samples per position in the energy loss (at least 2: the diversity term compares samples); for
            the flow and diffusion heads, the posterior samples per position their loss is trained on.
        num_targets (`int`, *optional*, defaults to 100):
            M, target samples per position drawn from the autoencoder posterior in the energy loss (hard-coded to
            100 in the official code; energy head only).
        energy_alpha (`float`, *optional*, defaults to 1.0):
            alpha, the exponent of the distance in the energy score, in (0, 2) (`beta` in the official config).
        target_noise_scale (`float`, *optional*, defaults to 1.0):
            Not in the paper (1.0 is the official method): the head's training targets are drawn from the
            autoencoder posterior with its standard deviation times this, `mean + target_noise_scale * std * eps`
            (0: the posterior mean itself). Below 1 the head learns a sharper distribution, closer to the decodable
            posterior means; see docs/small-scale.md for what it changes.
        decoder_loss_weight (`float`, *optional*, defaults to 0.0):
            Not in the paper (0.0 is the official method): the weight of an auxiliary token loss through the frozen
            autoencoder's decoder, after SONAR-LLM (arXiv 2508.05305), added to the head's loss. It scores the head's
            own latents against the target chunk's tokens (`decoder_loss.py`): the energy head's samples, the flow
            head's clean-latent estimate at its training time, the diffusion head's predicted x_0. The autoencoder gets
            no update and generation is unchanged (likelihood-free).
        decoder_loss_type (`str`, *optional*, defaults to `"mixture"`):
            Energy head only: `"mixture"`, the log loss of the decoder's token distribution averaged over the head's
            samples (a proper score of the head's distribution), or `"per_sample"`, the mean cross-entropy of each
            sample (not proper: it pulls every sample to the mode). The flow and diffusion heads score each estimate.
            Any head: `"point"`, SONAR-LLM's own loss on an auxiliary branch, a linear map of the backbone state to
            one latent (`decoder_loss_proj`, used in training only), whose decoded tokens are scored; the head's
            samples are not.
        decoder_loss_samples (`int`, *optional*):
            How many of the head's samples (energy) or training targets (flow, diffusion) per position the decoder
            loss reads; `None`: all `num_samples`. Fewer cost fewer decoder FLOPs.
        input_noise_std (`float`, *optional*, defaults to 0.0):
            Not in the paper (0.0 is the official method): in training, Gaussian noise of this standard deviation is
            added to the backbone's input vectors (the compressed chunks, unit scale after their LayerNorm), as
            Kyutai's continuous audio language model does (arXiv 2509.06926), so that the backbone learns from
            inputs as imperfect as its own samples make them. Never applied in eval mode or generation.
        token_loss_weight (`float`, *optional*, defaults to 0.0):
            Not in the paper (0.0 is the official method): the weight of an auxiliary token loss on the backbone's
            states, a softmax over the vocabulary for each of the K tokens of the next chunk (`token_loss.py`;
            multi-token prediction, arXiv 2404.19737), added to the head's loss. Its layer (`token_loss_head`) is
            used in training only; generation is unchanged (likelihood-free).
        guidance_dropout (`float`, *optional*, defaults to 0.0):
            Flow and diffusion heads; not in the paper (0.0 is the official method): in training, the head's
            condition (the backbone state) is replaced by a learnt null state with this probability, so that the head
            also models the unconditional latent distribution, which latent classifier-free guidance needs (as in
            Kyutai's continuous audio language model, arXiv 2509.06926).
        guidance_scale (`float`, *optional*, defaults to 1.0):
            Flow and diffusion heads: the classifier-free guidance weight w of sampling, `v_uncond + w (v_cond -
            v_uncond)` (the noise prediction for the diffusion head); 1.0 samples the conditional head alone (the
            official sampler, no extra cost). Other values need a head trained with `guidance_dropout` > 0.
        use_cache (`bool`, *optional*, defaults to `True`):
            Whether the model returns the backbone's key/value cache by default (in eval mode).
        kwargs:
            `PreTrainedConfig` fields. Configs written before `backbone_config` existed (flat Llama fields such as
            `hidden_size`, with `vocab_size`, `patch_size` and `latent_size`) are read too: the Llama fields become
            the `backbone_config`, the others must agree with the autoencoder.

    Example:

    ```python
    >>> from transformers import Qwen3Config
    >>> from transformers_calm import CalmAutoencoderConfig, CalmConfig, CalmForCausalLM
    >>> autoencoder_config = CalmAutoencoderConfig(vocab_size=4096, patch_size=4, latent_size=128)
    >>> backbone_config = Qwen3Config(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
    ...                               num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    >>> model = CalmForCausalLM(CalmConfig(backbone_config=backbone_config, autoencoder_config=autoencoder_config))
    ```
    """

    model_type = "calm"
    sub_configs = {"backbone_config": AutoConfig, "autoencoder_config": CalmAutoencoderConfig}
    keys_to_ignore_at_inference = ["cache"]  # the field of CalmCausalLMOutputWithPast that is not a prediction

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """As transformers' `get_config_dict`; the config of an official CALM checkpoint as published (no
        `model_type`, the official class in `architectures`) is converted to this one: see `official_checkpoints`."""
        from .official_checkpoints import config_dict_from_official, hub_kwargs

        download_kwargs = hub_kwargs(kwargs)
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        return config_dict_from_official(config_dict, pretrained_model_name_or_path, download_kwargs, "calm"), kwargs

    def __init__(
        self,
        backbone_config=None,
        autoencoder_config=None,
        head_type="energy",
        num_mlp_layers=4,
        noise_size=64,
        num_samples=8,
        num_targets=100,
        energy_alpha=1.0,
        target_noise_scale=1.0,
        decoder_loss_weight=0.0,
        decoder_loss_type="mixture",
        decoder_loss_samples=None,
        input_noise_std=0.0,
        token_loss_weight=0.0,
        guidance_dropout=0.0,
        guidance_scale=1.0,
        use_cache=True,
        **kwargs,
    ):
        if head_type not in HEAD_TYPES:
            raise ValueError(f"head_type must be one of {HEAD_TYPES}, got {head_type!r}.")
        if head_type == "energy" and num_samples < 2:
            raise ValueError(f"num_samples (N) must be >= 2 for the energy score's diversity term, got {num_samples}.")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        if num_targets < 1:
            raise ValueError(f"num_targets (M) must be >= 1, got {num_targets}.")
        if not 0 < energy_alpha < 2:
            raise ValueError(
                f"energy_alpha must be in (0, 2) for the energy score to be strictly proper, got {energy_alpha}."
            )
        if not target_noise_scale >= 0:
            raise ValueError(
                f"target_noise_scale must be >= 0 (1.0: the official posterior), got {target_noise_scale}."
            )
        if not decoder_loss_weight >= 0:
            raise ValueError(f"decoder_loss_weight must be >= 0 (0.0: the official loss), got {decoder_loss_weight}.")
        if decoder_loss_type not in DECODER_LOSS_TYPES:
            raise ValueError(f"decoder_loss_type must be one of {DECODER_LOSS_TYPES}, got {decoder_loss_type!r}.")
        if decoder_loss_samples is not None and not 1 <= decoder_loss_samples <= num_samples:
            raise ValueError(
                f"decoder_loss_samples must be in [1, num_samples = {num_samples}] (or None: all), got "
                f"{decoder_loss_samples}."
            )
        if not input_noise_std >= 0:
            raise ValueError(f"input_noise_std must be >= 0 (0.0: the official inputs), got {input_noise_std}.")
        if not token_loss_weight >= 0:
            raise ValueError(f"token_loss_weight must be >= 0 (0.0: the official loss), got {token_loss_weight}.")
        if not 0 <= guidance_dropout < 1:
            raise ValueError(
                f"guidance_dropout must be in [0, 1) (0.0: the official training), got {guidance_dropout}."
            )
        if not guidance_scale >= 0:
            raise ValueError(f"guidance_scale must be >= 0 (1.0: no guidance), got {guidance_scale}.")
        if head_type == "energy" and (guidance_dropout > 0 or guidance_scale != 1.0):
            raise ValueError(
                "Classifier-free guidance (guidance_dropout, guidance_scale) needs a flow or diffusion head; the energy "
                "head samples in one step, with no velocity or noise prediction to guide."
            )
        legacy = {name: kwargs.pop(name) for name in _FROM_AUTOENCODER if name in kwargs}
        legacy_backbone = {name: kwargs.pop(name) for name in _LEGACY_BACKBONE_FIELDS if name in kwargs}

        if autoencoder_config is None:
            autoencoder_config = CalmAutoencoderConfig(**legacy)
        elif isinstance(autoencoder_config, dict):
            autoencoder_config = CalmAutoencoderConfig(**autoencoder_config)
        for name, value in legacy.items():
            if value is None:
                continue
            if name.endswith("_token_id") and getattr(autoencoder_config, name) is None:
                # Configs of transformers-calm 0.1 could hold the special tokens in the language model's config only.
                setattr(autoencoder_config, name, value)
            elif value != getattr(autoencoder_config, name):
                raise ValueError(
                    f"{name} ({value}) differs from the autoencoder's ({getattr(autoencoder_config, name)}). CALM "
                    f"predicts the autoencoder's latent vectors, so the autoencoder defines {name} for the whole model: "
                    f"leave it out of CalmConfig, or use an autoencoder trained with {name}={value}."
                )
        self.autoencoder_config = autoencoder_config

        if backbone_config is None:
            backbone_config = _legacy_llama_config(legacy_backbone)
        elif legacy_backbone:
            raise ValueError(
                f"Backbone fields {sorted(legacy_backbone)} were given next to backbone_config: set them in "
                "backbone_config."
            )
        elif isinstance(backbone_config, dict):
            backbone_config = dict(backbone_config)
            model_type = backbone_config.pop("model_type", "llama")
            backbone_config = AutoConfig.for_model(model_type, **backbone_config)
        else:
            backbone_config = copy.deepcopy(backbone_config)  # its vocabulary and pad are set below: not the caller's
        if getattr(backbone_config, "is_encoder_decoder", False):
            raise ValueError(f"backbone_config must be a decoder-only config, got a {type(backbone_config).__name__}.")
        # The backbone's token embedding is CALM's input embedding: its rows are the autoencoder's token ids.
        backbone_config.vocab_size = autoencoder_config.vocab_size
        backbone_config.pad_token_id = autoencoder_config.pad_token_id
        self.backbone_config = backbone_config

        self.head_type = head_type
        self.num_mlp_layers = num_mlp_layers
        self.noise_size = noise_size
        self.num_samples = num_samples
        self.num_targets = num_targets
        self.energy_alpha = energy_alpha
        self.target_noise_scale = target_noise_scale
        self.decoder_loss_weight = decoder_loss_weight
        self.decoder_loss_type = decoder_loss_type
        self.decoder_loss_samples = decoder_loss_samples
        self.input_noise_std = input_noise_std
        self.token_loss_weight = token_loss_weight
        self.guidance_dropout = guidance_dropout
        self.guidance_scale = guidance_scale
        self.use_cache = use_cache
        kwargs.setdefault("tie_word_embeddings", False)  # CALM has no output embedding to tie
        super().__init__(**kwargs)

    # The backbone's fields, read and set through the backbone config (`hidden_size` is also the generative head's
    # width). Not `max_position_embeddings`: CALM's positions count chunks, and transformers' generic code would read
    # it as tokens (`max_chunks`, `max_tokens` say which).
    hidden_size = _BackboneField()
    intermediate_size = _BackboneField()
    num_hidden_layers = _BackboneField()
    num_attention_heads = _BackboneField()
    num_key_value_heads = _BackboneField()
    head_dim = _BackboneField()
    hidden_act = _BackboneField()
    rope_parameters = _BackboneField()
    rms_norm_eps = _BackboneField()
    attention_bias = _BackboneField()
    attention_dropout = _BackboneField()
    mlp_bias = _BackboneField()
    initializer_range = _BackboneField()

    # Compare what is saved, as CalmAutoencoderConfig does (see there why transformers' `==` is not enough).
    __eq__ = CalmAutoencoderConfig.__eq__
    __hash__ = None

    # One source of truth: the autoencoder. K and l are read-only, so that they cannot drift apart.
    @property
    def patch_size(self) -> int:
        """K, tokens per chunk (the autoencoder's)."""
        return self.autoencoder_config.patch_size

    @property
    def latent_size(self) -> int:
        """l, size of a chunk's latent vector (the autoencoder's)."""
        return self.autoencoder_config.latent_size

    @property
    def vocab_size(self) -> int:
        """Number of token ids (the autoencoder's)."""
        return self.autoencoder_config.vocab_size

    @vocab_size.setter
    def vocab_size(self, value):
        # As `resize_token_embeddings` sets it: the vocabulary of the autoencoder and of the backbone's embedding.
        self.autoencoder_config.vocab_size = value
        self.backbone_config.vocab_size = value

    # The special tokens can be set (tokenizers and pipelines do `config.pad_token_id = ...`): on the autoencoder,
    # and the pad also on the backbone, whose embedding keeps the pad row at zero.
    @property
    def pad_token_id(self) -> int | None:
        return self.autoencoder_config.pad_token_id

    @pad_token_id.setter
    def pad_token_id(self, value):
        self.autoencoder_config.pad_token_id = value
        self.backbone_config.pad_token_id = value

    @property
    def bos_token_id(self) -> int | None:
        return self.autoencoder_config.bos_token_id

    @bos_token_id.setter
    def bos_token_id(self, value):
        self.autoencoder_config.bos_token_id = value

    @property
    def eos_token_id(self) -> int | list[int] | None:
        return self.autoencoder_config.eos_token_id

    @eos_token_id.setter
    def eos_token_id(self, value):
        self.autoencoder_config.eos_token_id = value

    @property
    def max_chunks(self) -> int:
        """Longest context in chunks: the backbone's `max_position_embeddings`."""
        return self.backbone_config.max_position_embeddings

    @property
    def max_tokens(self) -> int:
        """Longest context in tokens, `max_chunks * K`."""
        return self.max_chunks * self.patch_size


def _legacy_llama_config(fields: dict) -> LlamaConfig:
    """The backbone of a config without `backbone_config`: a Llama with the defaults CalmConfig had as flat fields."""
    fields = dict(fields)
    fields.pop("pretraining_tp", None)
    rope_theta = fields.pop("rope_theta", 10000.0)
    rope_parameters = dict(fields.pop("rope_parameters", None) or {})
    rope_parameters.setdefault("rope_type", "default")
    rope_parameters.setdefault("rope_theta", rope_theta)
    defaults = {
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
    }
    return LlamaConfig(**{**defaults, **fields, "rope_parameters": rope_parameters})


__all__ = ["CalmConfig"]
