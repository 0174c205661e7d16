"""Generation for CALM on transformers' own machinery (Shao et al., 2025, arXiv 2510.27688, sections 3 and 5).

`generate` runs in stages, as transformers' own `generate` delegates to its `_prepare_*` and decoding methods:
the generation config (`_prepare_calm_generation_config`), the prompt (`_prepare_calm_prompt`: ids or token
embeddings, or BOS when there is none; the attention mask; a cache to continue from), the lengths and stopping
criteria (`_prepare_calm_stopping`), the cache (`_prepare_calm_cache`) and the decoding loop (`_calm_decode`). So
`max_new_tokens`, `max_length`, `min_new_tokens`, `max_time`, `stop_strings`, `eos_token_id` (or `None`),
`pad_token_id`, `num_return_sequences`, streamers, `use_cache`, `inputs_embeds`, a cache to continue from and
`pipeline("text-generation")` behave as for a Llama. Only the step is CALM's own: one backbone pass per chunk of K
tokens, the generative head samples the next chunk's latent vector (with likelihood-free temperature,
`sampling.py`), the autoencoder decodes it to K tokens. The stopping criteria see the new tokens one at a time, so
that a row stops exactly where a token-level model would, and the rest of its chunk becomes padding.
"""

import copy
from dataclasses import dataclass, replace

import torch
from transformers import GenerationMixin
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.generation import GenerateDecoderOnlyOutput, MaxLengthCriteria, StoppingCriteriaList

from .compat import CACHE_NAME, cache_max_length
from .generation_configuration_calm import CalmGenerationConfig
from .generation_steps import CalmDecodingSteps, check_prompt_mask, has_right_padding
from .modeling_calm_autoencoder import check_autoencoder_matches
from .sampling import check_temperature

# generate()'s returned cache records the left fill in front of its first chunk, so that a later generate() that
# continues from it lines the sequence up with the cached chunks (a cache from the model's forward has no fill).
CACHE_FILL_ATTRIBUTE = "calm_left_fill"


@dataclass
class CalmPrompt:
    """The prompt as the backbone reads it. Token positions are counted after a left fill of `fill` masked tokens
    that makes the prompt whole chunks (a prompt of T tokens: `fill = -T mod K`), so the chunk right before the
    continuation is always complete.

    Args:
        input_ids: `(batch, P)`, the prompt at the head of the returned sequences (P = 0 for `inputs_embeds` alone).
        token_mask: `(batch, fill + T)`, 1 for the real tokens of the whole prompt, cached ones included.
        fill: tokens of left fill.
        read_ids / read_embeds: `(batch, n * K)` ids, or `(batch, n * K, hidden)` token embeddings, of the n prompt
            chunks the prefill reads (those after the cache).
        position_ids: `(batch, n)` chunk positions of those chunks, or `None` for the backbone's default.
        cache: a cache of the prompt's first chunks to continue from, or `None`.
    """

    input_ids: torch.LongTensor
    token_mask: torch.LongTensor
    fill: int
    read_ids: torch.LongTensor | None
    read_embeds: torch.Tensor | None
    position_ids: torch.LongTensor | None
    cache: Cache | None

    @property
    def hidden_tokens(self) -> int:
        """Tokens the backbone reads besides the returned sequences: the left fill, and a prompt given as
        embeddings alone."""
        return self.token_mask.shape[1] - self.input_ids.shape[1]

    @property
    def padded(self) -> bool:
        """Whether any token is masked (without padding the backbone needs no mask, which saves building one)."""
        return bool(self.fill) or not bool(self.token_mask.all())

    def repeat(self, times: int) -> "CalmPrompt":
        """Every row `times` times in a row (`num_return_sequences`), as transformers expands its inputs."""
        if times == 1:
            return self

        def rows(tensor):
            return None if tensor is None else tensor.repeat_interleave(times, dim=0)

        return replace(
            self,
            input_ids=rows(self.input_ids),
            token_mask=rows(self.token_mask),
            read_ids=rows(self.read_ids),
            read_embeds=rows(self.read_embeds),
            position_ids=rows(self.position_ids),
        )


class CalmGenerationMixin(GenerationMixin, CalmDecodingSteps):
    """`GenerationMixin` for [`CalmForCausalLM`]: `generate` in stages, on the decoding steps of
    [`~generation_steps.CalmDecodingSteps`]."""

    generation_config_class = CalmGenerationConfig  # read by transformers >= 5.12 when it builds the default

    @property
    def generation_config(self) -> CalmGenerationConfig | None:
        """The default generation settings, always a [`CalmGenerationConfig`] (transformers reads
        `generation_config.json` as a plain `GenerationConfig`; CALM's fields come along and are kept)."""
        return self.__dict__.get("_calm_generation_config")

    @generation_config.setter
    def generation_config(self, value):
        if value is not None:
            value = CalmGenerationConfig.from_generation_config(value)
        self.__dict__["_calm_generation_config"] = value

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.LongTensor | None = None,
        generation_config: CalmGenerationConfig | None = None,
        logits_processor=None,
        stopping_criteria: StoppingCriteriaList | None = None,
        prefix_allowed_tokens_fn=None,
        synced_gpus: bool | None = None,
        assistant_model=None,
        streamer=None,
        negative_prompt_ids=None,
        negative_prompt_attention_mask=None,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> torch.LongTensor | GenerateDecoderOnlyOutput:
        r"""Generate continuations, one chunk of K tokens per backbone step.

        The prompt is read in one forward pass; then every step samples the next chunk's latent vector with the
        generative head, decodes it to K tokens and feeds that chunk back through the KV cache.

        Prompts: any length, batched with left padding and an `attention_mask` (right padding is rejected: pads would
        sit between a prompt and its continuation). A prompt whose length is not a multiple of K is padded on the
        LEFT up to the next multiple, so its first chunk is partial (masked out of attention, zero embeddings) and the
        chunk right before the continuation is always complete. The returned sequences are the prompts as given
        followed by the continuations, as in transformers.

        Args:
            inputs (`torch.LongTensor` of shape `(batch_size, prompt_length)`, *optional*):
                Prompt token ids (or pass `input_ids=`); without ids nor `inputs_embeds`, generation starts from the
                BOS token, as in transformers.
            generation_config ([`CalmGenerationConfig`], *optional*):
                Defaults to `model.generation_config`; unset fields come from it, and keyword arguments override both
                (e.g. `max_new_tokens=64, temperature=0.5, num_candidates=500`). Likelihood-free temperature in (0, 1]:
                the batch approximation from `num_candidates` samples, or `exact_temperature=True` for the exact
                sampler; `do_sample=False` returns the most frequent of `num_candidates` samples.
            logits_processor, prefix_allowed_tokens_fn, assistant_model, negative_prompt_ids,
            negative_prompt_attention_mask:
                Only accepted as `None`: they act on next-token logits, which CALM does not have.
            stopping_criteria (`StoppingCriteriaList`, *optional*):
                Extra criteria, called after every new token with the sequences so far (scores are `None`).
            synced_gpus (`bool`, *optional*):
                Not supported (`True` raises).
            streamer (`BaseStreamer`, *optional*):
                Receives the prompt, then the new tokens of every step (batch size 1).
            generator (`torch.Generator`, *optional*):
                Random generator for the head noise and the samplers; the global RNG when `None`.
            kwargs:
                `input_ids`; `attention_mask` (one entry per prompt token); `inputs_embeds` (token embeddings
                `(batch_size, prompt_length, hidden_size)`, as `get_input_embeddings()(input_ids)`: read instead of
                the ids; without ids the sequences hold the new tokens only, as in transformers); `position_ids`
                (chunk positions of the left-filled prompt, `(batch_size, ceil(prompt_length / K))`);
                `past_key_values` or `cache` (the cache of an earlier `generate(..., return_dict_in_generate=True)`
                or forward, to continue from: pass the whole sequence, whose tokens after the cache must fill whole
                chunks); `tokenizer` (needed by `stop_strings`); and generation config fields.

        Returns:
            `torch.LongTensor` `(batch_size * num_return_sequences, sequence_length)`, or with
            `return_dict_in_generate=True` a `GenerateDecoderOnlyOutput` with `sequences`, the backbone's cache
            (field `cache`, `past_key_values` before transformers 5.24) and, when asked (`output_hidden_states`,
            `output_attentions`), the backbone's hidden states and attentions of every step (the prompt's, then one
            chunk per step), as transformers returns them per generated token.
        """
        tokenizer = kwargs.pop("tokenizer", None)
        kwargs.pop("assistant_tokenizer", None)
        _refuse_logit_arguments(
            logits_processor=logits_processor,
            prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
            assistant_model=assistant_model,
            negative_prompt_ids=negative_prompt_ids,
            negative_prompt_attention_mask=negative_prompt_attention_mask,
        )
        if synced_gpus:
            raise ValueError("synced_gpus=True is not supported by CALM's generate(); generate on each process alone.")

        check_autoencoder_matches(self.config.autoencoder_config, self.autoencoder)
        generation_config, model_kwargs, defaults = self._prepare_calm_generation_config(generation_config, kwargs)
        prompt = self._prepare_calm_prompt(inputs, generation_config, model_kwargs)
        criteria, max_length = self._prepare_calm_stopping(
            generation_config, prompt, stopping_criteria, tokenizer, defaults
        )
        if prompt.cache is not None and (generation_config.num_return_sequences or 1) > 1:
            raise ValueError(
                "num_return_sequences > 1 with a cache to continue from is not supported: repeat the rows of the "
                "sequences and of the cache (cache.batch_repeat_interleave) before, or continue each row once."
            )
        prompt = prompt.repeat(generation_config.num_return_sequences or 1)
        cache = self._prepare_calm_cache(generation_config, prompt, max_length)
        if streamer is not None:
            if prompt.input_ids.shape[0] != 1:
                raise ValueError("A streamer needs batch size 1 (and num_return_sequences=1).")
            streamer.put(prompt.input_ids.cpu())
        sequences, steps = self._calm_decode(
            prompt, cache, criteria, max_length, generation_config, streamer, generator
        )
        if streamer is not None:
            streamer.end()
        if cache is not None:  # for a later generate() that continues from it
            setattr(cache, CACHE_FILL_ATTRIBUTE, prompt.fill)
        if not generation_config.return_dict_in_generate:
            return sequences
        return GenerateDecoderOnlyOutput(
            sequences=sequences,
            hidden_states=tuple(steps["hidden_states"]) if generation_config.output_hidden_states else None,
            attentions=tuple(steps["attentions"]) if generation_config.output_attentions else None,
            **{CACHE_NAME: cache},
        )

    def _prepare_calm_generation_config(self, generation_config, kwargs) -> tuple[CalmGenerationConfig, dict, dict]:
        """The generation config of this call (model defaults < a passed config < keyword arguments), checked for
        options CALM cannot apply; the remaining keyword arguments (model inputs); and whether a length was asked
        for anywhere (`{"max_length": bool, "min_length": bool}`, as transformers decides it before merging)."""
        defaults = {
            name: kwargs.get(name) is None
            and (generation_config is None or getattr(generation_config, name) is None)
            and getattr(self.generation_config, name) is None
            for name in ("max_length", "min_length")
        }
        if generation_config is not None and kwargs:
            # Keyword arguments override the fields of a given config (pipelines pass both). Merged here, so that
            # transformers (< 5.12) does not log its deprecation of passing both on the caller's behalf.
            generation_config = copy.deepcopy(CalmGenerationConfig.from_generation_config(generation_config))
            kwargs = generation_config.update(**kwargs)
        generation_config, model_kwargs = self._prepare_generation_config(generation_config, **kwargs)
        generation_config = CalmGenerationConfig.from_generation_config(generation_config).with_calm_defaults()
        for name in ("output_hidden_states", "output_attentions"):  # transformers >= 5.2x keeps them as model kwargs
            if model_kwargs.get(name) is not None:
                setattr(generation_config, name, model_kwargs[name])
            model_kwargs.pop(name, None)
        unsupported = generation_config.unsupported_options()
        if unsupported:
            raise ValueError("CALM cannot use these generation options:\n- " + "\n- ".join(unsupported.values()))
        check_temperature(1.0 if generation_config.temperature is None else generation_config.temperature)
        return generation_config, model_kwargs, defaults

    def _prepare_calm_prompt(self, inputs, generation_config, model_kwargs) -> CalmPrompt:
        """The prompt of `inputs` / `input_ids`, `inputs_embeds` (token embeddings) or BOS, its mask, the left fill
        that makes it whole chunks, and a cache to continue from (whose chunks the prefill does not read again)."""
        input_ids = inputs if inputs is not None else model_kwargs.pop("input_ids", None)
        inputs_embeds = model_kwargs.pop("inputs_embeds", None)
        attention_mask = model_kwargs.pop("attention_mask", None)
        position_ids = model_kwargs.pop("position_ids", None)
        caches = [model_kwargs.pop(name) for name in ("past_key_values", "cache") if model_kwargs.get(name) is not None]
        for name in ("past_key_values", "cache", "use_cache"):
            model_kwargs.pop(name, None)
        if model_kwargs:
            raise ValueError(f"generate() got unknown arguments {sorted(model_kwargs)}.")
        if len(caches) > 1:
            raise ValueError("Pass the cache to continue from once: as cache or as past_key_values, not both.")
        cache = caches[0] if caches else None
        if cache is not None and not isinstance(cache, Cache):
            raise ValueError(
                f"The cache to continue from must be a transformers Cache (the cache of an earlier generate() with "
                f"return_dict_in_generate=True, or of the model's forward), got {type(cache).__name__}."
            )
        given = [t for t in (input_ids, inputs_embeds, attention_mask) if t is not None]
        device = given[0].device if given else self.device
        self._prepare_special_tokens(generation_config, attention_mask is not None, device=device)
        with_embeds = {} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
        input_ids = self._maybe_initialize_input_ids_for_generation(
            input_ids, generation_config._bos_token_tensor, with_embeds or {"attention_mask": attention_mask}
        )
        length = _check_prompt_inputs(input_ids, inputs_embeds, self.config.hidden_size)
        if attention_mask is None and inputs_embeds is None:
            # As transformers: left pads are recognised by the pad id (unless it is also the EOS id).
            attention_mask = self._prepare_attention_mask_for_generation(input_ids, generation_config, {})
            if not bool(attention_mask[:, -1].all()) or has_right_padding(attention_mask):
                attention_mask = None  # pad ids inside a prompt are tokens, not left padding
        batch_size = (input_ids if inputs_embeds is None else inputs_embeds).shape[0]
        attention_mask = check_prompt_mask(attention_mask, (batch_size, length), device)

        K = self.config.patch_size
        if cache is not None and generation_config.use_cache is False:
            raise ValueError("generate() got a cache to continue from and use_cache=False; drop one of them.")
        cached_chunks = 0 if cache is None else int(cache.get_seq_length())
        cached_rows = _cache_rows(cache) if cached_chunks else None
        if cached_rows is not None and cached_rows != batch_size:
            raise ValueError(
                f"The cache holds {cached_rows} rows, the prompt {batch_size}: pass the cache of these rows."
            )
        fill = getattr(cache, CACHE_FILL_ATTRIBUTE, 0) if cached_chunks else (-length) % K
        unread = fill + length - cached_chunks * K
        if cached_chunks and (unread <= 0 or unread % K):
            raise ValueError(
                f"The cache holds {cached_chunks} chunks ({cached_chunks * K - fill} tokens of the sequence); the "
                f"tokens after them ({unread}) must fill whole chunks of K = {K}, at least one: pass the whole "
                "sequence so far (prompt and earlier output), generated in whole chunks (max_new_tokens a multiple "
                "of K, no early stop), or generate without the cache."
            )
        token_mask = torch.nn.functional.pad(attention_mask, (fill, 0), value=0)
        start = cached_chunks * K  # the first token the prefill reads, in left-filled positions
        read_ids = read_embeds = None
        if inputs_embeds is None:
            read_ids = torch.nn.functional.pad(input_ids, (fill, 0), value=0)[:, start:]  # masked: any id will do
        else:
            read_embeds = torch.nn.functional.pad(inputs_embeds, (0, 0, fill, 0))[:, start:]
        if position_ids is not None:
            chunks = (fill + length) // K
            if tuple(position_ids.shape) != (batch_size, chunks):
                raise ValueError(
                    f"position_ids are chunk positions of the left-filled prompt: shape ({batch_size}, {chunks}) for "
                    f"{length} tokens in chunks of K = {K}, got {tuple(position_ids.shape)}."
                )
            position_ids = position_ids[:, cached_chunks:].to(device)
        return CalmPrompt(input_ids, token_mask, fill, read_ids, read_embeds, position_ids, cache)

    def _prepare_calm_stopping(self, generation_config, prompt, stopping_criteria, tokenizer, defaults):
        """The lengths (transformers' `_prepare_generated_length`, clamped to CALM's context in chunks) and the
        stopping criteria; returns `(criteria, max_length)`, the length of the sequences generation stops at."""
        prompt_length = prompt.input_ids.shape[1]
        K = self.config.patch_size
        with_embeds = prompt.read_embeds is not None and prompt_length == 0
        generation_config = self._prepare_generated_length(
            generation_config,
            has_default_max_length=defaults["max_length"],
            has_default_min_length=defaults["min_length"],
            model_input_name="inputs_embeds" if with_embeds else "input_ids",
            input_ids_length=prompt_length,
            inputs_tensor=prompt.token_mask[:, prompt.fill :] if with_embeds else prompt.input_ids,  # (batch, T)
        )
        if defaults["max_length"] and generation_config.max_new_tokens is None:
            # transformers clamps its default length to the context; CALM's context is in chunks of K tokens.
            room = self.config.max_tokens - prompt.hidden_tokens
            generation_config.max_length = min(generation_config.max_length, max(room, prompt_length + 1))
        self._validate_generated_length(generation_config, prompt_length, defaults["max_length"])
        criteria = self._get_stopping_criteria(
            generation_config, stopping_criteria=stopping_criteria or StoppingCriteriaList(), tokenizer=tokenizer
        )
        # The config's max_length, or that of a MaxLengthCriteria passed in its place (transformers lets a passed
        # criterion replace the default one).
        lengths = [c.max_length for c in criteria if isinstance(c, MaxLengthCriteria)]
        max_length = min(lengths, default=generation_config.max_length)
        if max_length + prompt.hidden_tokens > self.config.max_tokens:
            raise ValueError(
                f"The prompt ({prompt.token_mask.shape[1] - prompt.fill} tokens, padded to whole chunks of K = {K}) "
                f"and the continuation up to max_length = {max_length} exceed the model's context of "
                f"{self.config.max_tokens} tokens (max_position_embeddings = {self.config.max_chunks} chunks of {K})."
            )
        return criteria, max_length

    def _prepare_calm_cache(self, generation_config, prompt, max_length) -> Cache | None:
        """The backbone's cache: the one to continue from, a `StaticCache` of every chunk of prompt and continuation
        (`cache_implementation="static"`), a `DynamicCache`, or none (`use_cache=False`)."""
        static = generation_config.cache_implementation == "static"
        chunks = (prompt.hidden_tokens + max_length + self.config.patch_size - 1) // self.config.patch_size
        if prompt.cache is not None:
            room = cache_max_length(prompt.cache)
            if room is not None and 0 <= room < chunks:
                raise ValueError(f"The cache holds {room} chunks; this generation needs {chunks}: pass a larger one.")
            return prompt.cache
        if generation_config.use_cache is False:
            if static:
                raise ValueError(
                    "cache_implementation='static' needs use_cache=True (the static cache is the KV cache)."
                )
            return None
        if static:
            return StaticCache(config=self.config.backbone_config, max_cache_len=chunks)
        return DynamicCache(config=self.config.backbone_config)


def _refuse_logit_arguments(**given):
    """transformers' generate() arguments that act on next-token logits: only `None` (or no processors)."""
    for name, value in given.items():
        if value is not None and not (name == "logits_processor" and len(value) == 0):
            raise ValueError(
                f"generate() got {name}, which acts on next-token logits: CALM's generative head samples whole chunks "
                "without a likelihood, so there are none. Use temperature (in (0, 1]) or do_sample=False to shape "
                "the distribution, and stopping_criteria or stop_strings to end rows."
            )


def _cache_rows(cache) -> int | None:
    """The batch size of a filled cache, where its layers say (transformers' `DynamicCache`, `StaticCache`)."""
    keys = getattr(getattr(cache, "layers", [None])[0], "keys", None)
    return None if keys is None or keys.dim() == 0 else keys.shape[0]


def _check_prompt_inputs(input_ids, inputs_embeds, hidden_size) -> int:
    """The prompt's length in tokens, after checking the shapes of its ids and embeddings."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch_size, prompt_length), got {tuple(input_ids.shape)}.")
    if inputs_embeds is None:
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids must be a non-empty prompt of shape (batch_size, prompt_length).")
        return input_ids.shape[1]
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[1] == 0 or inputs_embeds.shape[2] != hidden_size:
        raise ValueError(
            "inputs_embeds must be the prompt's token embeddings, shape (batch_size, prompt_length, hidden_size = "
            f"{hidden_size}), as get_input_embeddings()(input_ids); got {tuple(inputs_embeds.shape)}."
        )
    if input_ids.shape[1] not in (0, inputs_embeds.shape[1]) or input_ids.shape[0] != inputs_embeds.shape[0]:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and inputs_embeds {tuple(inputs_embeds.shape)} must be the same "
            "prompt (the ids are returned, the embeddings read)."
        )
    return inputs_embeds.shape[1]


__all__ = ["CACHE_FILL_ATTRIBUTE", "CalmGenerationMixin", "CalmPrompt"]
