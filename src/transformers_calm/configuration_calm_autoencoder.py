"""Configuration of the CALM chunk autoencoder (Shao et al., 2025, arXiv 2510.27688, section 2)."""

from transformers import PreTrainedConfig


class CalmAutoencoderConfig(PreTrainedConfig):
    r"""
    Configuration of a [`CalmAutoencoder`]: a variational autoencoder that maps each chunk of `patch_size` (the
    paper's K) tokens to one continuous vector of `latent_size` (the paper's l) and back.

    The architecture is the one of the official implementation (`shaochenze/calm`), so official checkpoints convert
    exactly. The encoder applies `num_encoder_layers // 2` residual SwiGLU blocks to every token, concatenates the K
    token vectors, squeezes them to one vector, applies the other half of the blocks and projects to `2 * latent_size`
    (mean and log standard deviation). The decoder mirrors it and projects to the vocabulary with the (tied) token
    embedding matrix.

    Args:
        vocab_size (`int`, *optional*, defaults to 32000):
            Number of token ids. Official checkpoints use `len(tokenizer)` = 128257 (Llama-3 plus `[PAD]`).
        patch_size (`int`, *optional*, defaults to 4):
            K, the number of tokens compressed into one latent vector.
        latent_size (`int`, *optional*, defaults to 128):
            l, the size of the latent vector of a chunk.
        hidden_size (`int`, *optional*, defaults to 512):
            Width of the residual stream of the encoder and decoder.
        intermediate_size (`int`, *optional*, defaults to 1280):
            Width of the SwiGLU feed-forward blocks.
        num_encoder_layers (`int`, *optional*, defaults to 2):
            Residual blocks of the encoder; half run per token, half per chunk, so the count must be even.
        num_decoder_layers (`int`, *optional*, defaults to 2):
            Residual blocks of the decoder; half run per chunk, half per token, so the count must be even. (The
            official code silently ignores the last block of an odd count; we reject odd counts instead.)
        kl_weight (`float`, *optional*, defaults to 0.001):
            beta, the weight of the KL term in the training loss `K * cross_entropy + beta * KL`.
        kl_clamp (`float`, *optional*, defaults to 0.5):
            Per-dimension floor of the KL term ("KL clipping"): dimensions whose KL is below it get no gradient.
        token_dropout (`float`, *optional*, defaults to 0.15):
            DropToken: probability that an input token of the encoder is replaced (training only).
        latent_dropout (`float`, *optional*, defaults to 0.15):
            DropLatent: inverted-dropout probability on the sampled latent vector (training only).
        token_dropout_replacement_id (`int`, *optional*, defaults to 0):
            Token id that DropToken writes in place of a dropped token. The official code multiplies the id by 0,
            so it writes id 0 (a real token, `!` in the Llama-3 vocabulary); keep 0 to reproduce it, or set a
            dedicated id (e.g. the pad id) to train an autoencoder whose dropped tokens are unambiguous.
        cast_embeddings_to_bf16_in_training (`bool`, *optional*, defaults to `True`):
            The official encoder rounds its token embeddings to bfloat16 in training mode (it was trained under bf16
            autocast). Keep `True` to reproduce official training numerics; set `False` for plain float32 training.
        hidden_act (`str`, *optional*, defaults to `"silu"`):
            Activation of the SwiGLU blocks.
        mlp_bias (`bool`, *optional*, defaults to `False`):
            Whether the SwiGLU projections have biases.
        rms_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of the RMS norms.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of linear and embedding weights.
        tie_word_embeddings (`bool`, *optional*, defaults to `True`):
            Whether the decoder's output projection is the encoder's token embedding matrix (the official model
            ties them).
        pad_token_id, bos_token_id, eos_token_id (`int`, *optional*):
            Special token ids of the tokenizer the autoencoder was trained with.

    Example:

    ```python
    >>> from transformers_calm import CalmAutoencoderConfig, CalmAutoencoder
    >>> config = CalmAutoencoderConfig(vocab_size=4096, hidden_size=256, intermediate_size=640)
    >>> model = CalmAutoencoder(config)
    ```
    """

    model_type = "calm_autoencoder"

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """As transformers' `get_config_dict`; the config of an official CALM checkpoint as published (no
        `model_type`, the official class in `architectures`) is converted to this one: see `official_checkpoints`."""
        from .official_checkpoints import config_dict_from_official, hub_kwargs

        download_kwargs = hub_kwargs(kwargs)
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        return config_dict_from_official(
            config_dict, pretrained_model_name_or_path, download_kwargs, "autoencoder"
        ), kwargs

    def __init__(
        self,
        vocab_size=32000,
        patch_size=4,
        latent_size=128,
        hidden_size=512,
        intermediate_size=1280,
        num_encoder_layers=2,
        num_decoder_layers=2,
        kl_weight=1e-3,
        kl_clamp=0.5,
        token_dropout=0.15,
        latent_dropout=0.15,
        token_dropout_replacement_id=0,
        cast_embeddings_to_bf16_in_training=True,
        hidden_act="silu",
        mlp_bias=False,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        tie_word_embeddings=True,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        **kwargs,
    ):
        for name, value in (
            ("vocab_size", vocab_size),
            ("patch_size", patch_size),
            ("latent_size", latent_size),
            ("hidden_size", hidden_size),
            ("intermediate_size", intermediate_size),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        for name, value in (("num_encoder_layers", num_encoder_layers), ("num_decoder_layers", num_decoder_layers)):
            if not isinstance(value, int) or value < 0 or value % 2:
                raise ValueError(
                    f"{name} must be a non-negative even integer (half the blocks run per token, half per chunk), "
                    f"got {value!r}."
                )
        for name, value in (("token_dropout", token_dropout), ("latent_dropout", latent_dropout)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}.")
        if kl_weight < 0 or kl_clamp < 0:
            raise ValueError(f"kl_weight and kl_clamp must be >= 0, got {kl_weight!r} and {kl_clamp!r}.")
        if not 0 <= token_dropout_replacement_id < vocab_size:
            raise ValueError(
                f"token_dropout_replacement_id must be a token id in [0, vocab_size={vocab_size}), "
                f"got {token_dropout_replacement_id!r}."
            )

        self.vocab_size = vocab_size
        self.patch_size = patch_size
        self.latent_size = latent_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_encoder_layers = num_encoder_layers
        self.num_decoder_layers = num_decoder_layers
        self.kl_weight = kl_weight
        self.kl_clamp = kl_clamp
        self.token_dropout = token_dropout
        self.latent_dropout = latent_dropout
        self.token_dropout_replacement_id = token_dropout_replacement_id
        self.cast_embeddings_to_bf16_in_training = cast_embeddings_to_bf16_in_training
        self.hidden_act = hidden_act
        self.mlp_bias = mlp_bias
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.tie_word_embeddings = tie_word_embeddings
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        super().__init__(**kwargs)

    def __eq__(self, other):
        # transformers >= 5.20 makes every config subclass a dataclass whose `==` compares the declared fields only,
        # and this class declares none: compare what is saved.
        return isinstance(other, PreTrainedConfig) and type(self) is type(other) and self.to_dict() == other.to_dict()

    __hash__ = None


__all__ = ["CalmAutoencoderConfig"]
