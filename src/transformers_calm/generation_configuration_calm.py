"""Generation settings of CALM: transformers' `GenerationConfig` plus the likelihood-free sampler's own fields."""

from transformers import GenerationConfig

# Options whose only meaning is to reshape, search or penalise next-token logits (or to return them): CALM's head is a
# sampler without a likelihood, so none of them can be applied. Each maps to why, and what to use instead.
_NO_LIKELIHOOD = "CALM's energy head samples chunks without computing a likelihood"
_USE_TEMPERATURE = "use temperature (in (0, 1]) to sharpen the distribution, or do_sample=False for its mode"
UNSUPPORTED_OPTIONS = {
    "num_beams": f"beam search ranks continuations by likelihood, and {_NO_LIKELIHOOD}; {_USE_TEMPERATURE}",
    "num_beam_groups": f"diverse beam search needs likelihoods ({_NO_LIKELIHOOD}); {_USE_TEMPERATURE}",
    "penalty_alpha": f"contrastive search needs next-token probabilities ({_NO_LIKELIHOOD}); {_USE_TEMPERATURE}",
    "top_k": f"top-k truncates next-token logits, and {_NO_LIKELIHOOD}; {_USE_TEMPERATURE}",
    "top_p": f"top-p (nucleus) truncates next-token probabilities, and {_NO_LIKELIHOOD}; {_USE_TEMPERATURE}",
    "min_p": f"min-p truncates next-token probabilities, and {_NO_LIKELIHOOD}; {_USE_TEMPERATURE}",
    "typical_p": f"typical sampling needs next-token probabilities ({_NO_LIKELIHOOD}); {_USE_TEMPERATURE}",
    "epsilon_cutoff": f"epsilon sampling truncates next-token probabilities ({_NO_LIKELIHOOD}); {_USE_TEMPERATURE}",
    "eta_cutoff": f"eta sampling truncates next-token probabilities ({_NO_LIKELIHOOD}); {_USE_TEMPERATURE}",
    "top_h": f"top-h truncates next-token probabilities ({_NO_LIKELIHOOD}); {_USE_TEMPERATURE}",
    "repetition_penalty": f"the repetition penalty rescales logits, and {_NO_LIKELIHOOD}; filter or resample instead",
    "encoder_repetition_penalty": f"the penalty rescales logits ({_NO_LIKELIHOOD})",
    "no_repeat_ngram_size": f"n-gram blocking masks logits ({_NO_LIKELIHOOD})",
    "encoder_no_repeat_ngram_size": f"n-gram blocking masks logits ({_NO_LIKELIHOOD})",
    "bad_words_ids": f"banning words masks logits ({_NO_LIKELIHOOD}); filter the output instead",
    "force_words_ids": f"constrained beam search needs likelihoods ({_NO_LIKELIHOOD})",
    "sequence_bias": f"sequence biases shift logits ({_NO_LIKELIHOOD})",
    "suppress_tokens": f"suppressing tokens masks logits ({_NO_LIKELIHOOD})",
    "begin_suppress_tokens": f"suppressing tokens masks logits ({_NO_LIKELIHOOD})",
    "forced_bos_token_id": "forcing a first token acts on logits; put the token at the end of the prompt instead",
    "forced_eos_token_id": "forcing a last token acts on logits; append it to the output instead",
    "exponential_decay_length_penalty": f"the length penalty boosts the EOS logit ({_NO_LIKELIHOOD})",
    "guidance_scale": f"classifier-free guidance mixes two sets of logits ({_NO_LIKELIHOOD})",
    "renormalize_logits": "CALM has no logits to renormalise",
    "output_scores": "CALM has no next-token scores to return; the sampled chunks are the output",
    "output_logits": "CALM has no logits to return; the sampled chunks are the output",
    "watermarking_config": f"watermarking biases logits ({_NO_LIKELIHOOD})",
    "dola_layers": f"DoLa contrasts the logits of layers ({_NO_LIKELIHOOD})",
    "prompt_lookup_num_tokens": "assisted decoding verifies draft tokens with likelihoods, which CALM does not have",
    "assistant_early_exit": "assisted decoding verifies draft tokens with likelihoods, which CALM does not have",
    "cache_implementation": (
        "generate() runs the backbone on a 'dynamic' (the default) or a 'static' cache (for torch.compile); offloaded "
        "and quantized caches are not supported yet"
    ),
    "token_healing": "token healing re-scores the prompt's last token with next-token probabilities, which CALM lacks",
}
# What each option is when it asks for nothing (transformers' own defaults, or `None`).
_INACTIVE = {
    "num_beams": (None, 1),
    "top_k": (None, 0),  # 0 disables top-k in transformers
    "token_healing": (None, False),
    "cache_implementation": (None, "dynamic", "static"),
    "num_beam_groups": (None, 1),
    "top_p": (None, 1.0),
    "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "guidance_scale": (None, 1.0),
    "renormalize_logits": (None, False),
    "output_scores": (None, False),
    "output_logits": (None, False),
}


# CALM's own fields when nothing sets them.
CALM_DEFAULTS = {"num_candidates": 200, "exact_temperature": False, "max_draws": 10_000}
# Every field whose unset value CALM decides: its own, and do_sample (its head is a sampler).
UNSET_DEFAULTS = {"do_sample": True, **CALM_DEFAULTS}


class CalmGenerationConfig(GenerationConfig):
    r"""
    [`~transformers.GenerationConfig`] of [`CalmForCausalLM`], saved as `generation_config.json`.

    Every length, stopping, special-token and output option of transformers works as for any causal LM
    (`max_new_tokens`, `max_length`, `min_new_tokens`, `max_time`, `stop_strings`, `eos_token_id`, `pad_token_id`,
    `num_return_sequences`, `return_dict_in_generate`, `use_cache`), and so does `temperature`, in (0, 1]: CALM applies it
    without likelihoods (paper, section 5). Options that only reshape or return logits (beams, top-k/top-p,
    repetition penalties, logits processors, `output_scores`) are rejected by `generate()` with the reason: CALM's head
    is a sampler without a likelihood ([`unsupported_options`]).

    Args:
        num_candidates (`int`, *optional*, 200 when unset):
            N of the batch approximation (the paper's Algorithm 2): head samples per row and chunk from which a
            temperature < 1 sample, or the mode (`do_sample=False`), is chosen.
        exact_temperature (`bool`, *optional*, `False` when unset):
            Use the paper's exact rejection sampler (Algorithm 1) for temperature < 1 instead of the approximation.
            Its cost is random: head samples until n = floor(1/T) identical ones (and the Bernoulli factory's
            repeats), on average (n + sum_x P(x)^(1/T - 1)) / sum_x P(x)^(1/T) per chunk: a few for a peaked
            distribution, thousands for a flat one (an untrained model) or a small T. Draws come in growing batches
            (8, 16, 32, ...), about log2(draws) head calls per chunk; a call of the flow or diffusion head is 10 or 100
            network passes. The approximation costs one head call of `num_candidates` samples.
        max_draws (`int`, *optional*, 10000 when unset):
            Draws per row and chunk after which the exact sampler takes the approximation over them, with a warning
            that says how many rows did.
        do_sample (`bool`, *optional*, `True` when unset):
            CALM's head is a sampler: `True` samples (at `temperature`), `False` returns the most frequent of
            `num_candidates` samples.
        kwargs:
            Any other `GenerationConfig` field.
    """

    def __init__(self, num_candidates=None, exact_temperature=None, max_draws=None, **kwargs):
        # Unset (None) unless asked for, like every GenerationConfig field: generate() fills them from the model's
        # generation config, then from CALM_DEFAULTS, so a config passed to generate() does not override the model's
        # settings with class defaults. Set before the base init, which calls validate() (reading them).
        self.num_candidates = num_candidates
        self.exact_temperature = exact_temperature
        self.max_draws = max_draws
        super().__init__(**kwargs)

    @staticmethod
    def _get_default_generation_params() -> dict:
        # generate() fills unset fields with these. transformers' defaults include top_k=50, a logits processor CALM
        # cannot apply: leave it unset, so that only an explicit top_k is rejected. CALM's head is a sampler:
        # do_sample defaults to True.
        return {**GenerationConfig._get_default_generation_params(), "top_k": None, **UNSET_DEFAULTS}

    def with_calm_defaults(self) -> "CalmGenerationConfig":
        """This config with CALM's unset fields (`do_sample` included) at their defaults (in place). `generate` calls
        it after transformers' merge, which fills only the fields a config already has: a plain `GenerationConfig`
        read from an old `generation_config.json` may lack CALM's."""
        for name, value in UNSET_DEFAULTS.items():
            if getattr(self, name, None) is None:
                setattr(self, name, value)
        return self

    @classmethod
    def from_model_config(cls, model_config) -> "CalmGenerationConfig":
        """The defaults of a model: sampling with CALM's sampler defaults, and the model's special tokens (read from
        `CalmConfig`, which takes them from the autoencoder; transformers' own version reads only the config's
        serialised fields). Written out, so that generation_config.json says how the model samples."""
        tokens = {name: getattr(model_config, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
        return cls(**tokens, **UNSET_DEFAULTS)

    @classmethod
    def from_generation_config(cls, config: GenerationConfig) -> "CalmGenerationConfig":
        """The same settings as a `CalmGenerationConfig` (transformers loads `generation_config.json` as a plain
        `GenerationConfig`, with CALM's fields as extra attributes)."""
        if isinstance(config, cls):
            return config
        values = config.to_dict()
        values.pop("transformers_version", None)
        return cls(**values)

    def unsupported_options(self) -> dict[str, str]:
        """The options set to something CALM cannot do, each with why and what to use instead."""
        found = {}
        for name, reason in UNSUPPORTED_OPTIONS.items():
            value = getattr(self, name, None)
            if value is None or value in _INACTIVE.get(name, (None,)) or value in ([], {}):
                continue
            found[name] = f"{name}={value!r}: {reason}"
        return found

    def validate(self, strict: bool = False, **kwargs):
        """transformers' checks, then CALM's: `num_candidates` and `max_draws` integers >= 1 when set; with
        `strict=True` (as when saving) also `temperature` in (0, 1]. `generate()` checks the temperature it uses and
        rejects the options CALM cannot apply ([`unsupported_options`]), so that a generation config shared with
        token-level models still loads."""
        for name in ("num_candidates", "max_draws"):
            value = getattr(self, name, None)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        temperature = getattr(self, "temperature", None)
        if strict and temperature is not None and not (isinstance(temperature, (int, float)) and 0 < temperature <= 1):
            raise ValueError(
                f"temperature must be in (0, 1], got {temperature!r}: likelihood-free temperature sampling can only "
                "sharpen the model's distribution (P^(1/T) through repeated samples). For its mode use do_sample=False."
            )
        # An unset do_sample means sampling for CALM (its head is a sampler): validate the sampling options as such.
        unset = getattr(self, "do_sample", None) is None
        if unset:
            self.do_sample = True
        try:
            return super().validate(strict=strict, **kwargs)
        finally:
            if unset:
                self.do_sample = None


__all__ = ["CALM_DEFAULTS", "UNSUPPORTED_OPTIONS", "CalmGenerationConfig"]
