"""Configuration of the CALM language model (Shao et al., 2025, arXiv 2510.27688, section 3)."""

from transformers import PreTrainedConfig

from .configuration_calm_autoencoder import CalmAutoencoderConfig


class CalmConfig(PreTrainedConfig):
    r"""
    Configuration of a [`CalmForCausalLM`]: a Llama backbone that reads the previous chunks of K tokens (one input
    vector per chunk) and an energy head that samples the next chunk's latent vector in one step. The frozen
    autoencoder that maps chunks to latent vectors and back is part of the model; its configuration is nested as
    `autoencoder_config`, so that one directory holds the whole model.

    The backbone fields are those of a [`~transformers.LlamaConfig`] and are passed to transformers' own
    `LlamaModel`; positions count chunks, not tokens.

    Args:
        vocab_size (`int`, *optional*, defaults to 32000):
            Number of token ids (CALM's own input embedding; it must equal the autoencoder's).
        hidden_size (`int`, *optional*, defaults to 768):
            Width of the backbone and of the energy head.
        intermediate_size (`int`, *optional*, defaults to 2048):
            Width of the backbone's SwiGLU feed-forward layers.
        num_hidden_layers (`int`, *optional*, defaults to 12):
            Number of backbone decoder layers.
        num_attention_heads (`int`, *optional*, defaults to 12):
            Number of attention heads.
        num_key_value_heads (`int`, *optional*):
            Number of key/value heads (grouped-query attention); defaults to `num_attention_heads`.
        head_dim (`int`, *optional*):
            Attention head size; defaults to `hidden_size // num_attention_heads`.
        hidden_act (`str`, *optional*, defaults to `"silu"`):
            Activation of the backbone's feed-forward layers.
        max_position_embeddings (`int`, *optional*, defaults to 2048):
            Longest context in chunks (K tokens each), as the official config counts it.
        rope_parameters (`dict`, *optional*):
            RoPE settings as in `LlamaConfig`; defaults to `{"rope_type": "default", "rope_theta": 10000.0}`.
        rms_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of the backbone's RMS norms.
        attention_bias (`bool`, *optional*, defaults to `False`), attention_dropout (`float`, *optional*, defaults
        to 0.0), mlp_bias (`bool`, *optional*, defaults to `False`):
            As in `LlamaConfig`.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of linear and embedding weights.
        use_cache (`bool`, *optional*, defaults to `True`):
            Whether the backbone returns its key/value cache by default.
        patch_size (`int`, *optional*, defaults to 4):
            K, tokens per chunk; must equal the autoencoder's.
        latent_size (`int`, *optional*, defaults to 128):
            l, size of a chunk's latent vector; must equal the autoencoder's.
        num_mlp_layers (`int`, *optional*, defaults to 4):
            Residual blocks of the energy head.
        noise_size (`int`, *optional*, defaults to 64):
            Size of the uniform noise vector the energy head turns into a latent sample.
        num_samples (`int`, *optional*, defaults to 8):
            N, head samples per position in the energy loss (at least 2: the diversity term compares samples).
        num_targets (`int`, *optional*, defaults to 100):
            M, target samples per position drawn from the autoencoder posterior in the energy loss (hard-coded to
            100 in the official code).
        energy_alpha (`float`, *optional*, defaults to 1.0):
            alpha, the exponent of the distance in the energy score, in (0, 2) (`beta` in the official config).
        autoencoder_config (`CalmAutoencoderConfig` or `dict`, *optional*):
            Configuration of the frozen autoencoder. Defaults to a `CalmAutoencoderConfig` with this config's
            `vocab_size`, `patch_size`, `latent_size` and special token ids.
        pad_token_id, bos_token_id, eos_token_id (`int`, *optional*):
            Special token ids.
    """

    model_type = "calm"
    sub_configs = {"autoencoder_config": CalmAutoencoderConfig}
    keys_to_ignore_at_inference = ["cache"]  # the field of CalmCausalLMOutputWithPast that is not a prediction

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=None,
        head_dim=None,
        hidden_act="silu",
        max_position_embeddings=2048,
        rope_parameters=None,
        rms_norm_eps=1e-6,
        attention_bias=False,
        attention_dropout=0.0,
        mlp_bias=False,
        initializer_range=0.02,
        use_cache=True,
        patch_size=4,
        latent_size=128,
        num_mlp_layers=4,
        noise_size=64,
        num_samples=8,
        num_targets=100,
        energy_alpha=1.0,
        autoencoder_config=None,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
        **kwargs,
    ):
        if hidden_size % num_attention_heads and head_dim is None:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be a multiple of num_attention_heads ({num_attention_heads}), "
                "or head_dim must be given."
            )
        if num_samples < 2:
            raise ValueError(f"num_samples (N) must be >= 2 for the energy score's diversity term, got {num_samples}.")
        if num_targets < 1:
            raise ValueError(f"num_targets (M) must be >= 1, got {num_targets}.")
        if not 0 < energy_alpha < 2:
            raise ValueError(f"energy_alpha must be in (0, 2) for the energy score to be strictly proper, got {energy_alpha}.")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads if head_dim is None else head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.mlp_bias = mlp_bias
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.pretraining_tp = 1
        self.patch_size = patch_size
        self.latent_size = latent_size
        self.num_mlp_layers = num_mlp_layers
        self.noise_size = noise_size
        self.num_samples = num_samples
        self.num_targets = num_targets
        self.energy_alpha = energy_alpha
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.tie_word_embeddings = tie_word_embeddings

        # The official config accepts rope_theta; keep it working and store the transformers 5.x rope_parameters.
        rope_theta = kwargs.pop("rope_theta", 10000.0)
        if rope_parameters is None:
            rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
        self.rope_parameters = dict(rope_parameters)
        self.rope_parameters.setdefault("rope_type", "default")
        self.rope_parameters.setdefault("rope_theta", rope_theta)

        if autoencoder_config is None:
            autoencoder_config = CalmAutoencoderConfig(
                vocab_size=vocab_size,
                patch_size=patch_size,
                latent_size=latent_size,
                pad_token_id=pad_token_id,
                bos_token_id=bos_token_id,
                eos_token_id=eos_token_id,
            )
        elif isinstance(autoencoder_config, dict):
            autoencoder_config = CalmAutoencoderConfig(**autoencoder_config)
        self.autoencoder_config = autoencoder_config
        for name in ("patch_size", "latent_size", "vocab_size"):
            lm_value, ae_value = getattr(self, name), getattr(autoencoder_config, name)
            if lm_value != ae_value:
                raise ValueError(
                    f"{name} differs between the language model ({lm_value}) and its autoencoder ({ae_value}). "
                    f"CALM predicts the autoencoder's latent vectors, so both must use the same {name}: set "
                    f"{name}={ae_value} in CalmConfig, or use an autoencoder trained with {name}={lm_value}."
                )
        super().__init__(**kwargs)


__all__ = ["CalmConfig"]
