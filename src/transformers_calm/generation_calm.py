"""Generation for CALM on transformers' own machinery (Shao et al., 2025, arXiv 2510.27688, sections 3 and 5).

`generate` prepares the generation config, the special tokens, the lengths and the stopping criteria with
transformers' `GenerationMixin` methods, so `max_new_tokens`, `max_length`, `min_new_tokens`, `max_time`,
`stop_strings`, `eos_token_id` (or `None`), `pad_token_id`, `num_return_sequences`, streamers, `use_cache` and
`pipeline("text-generation")` behave as for a Llama. Only the step is CALM's own: one backbone pass per chunk of K
tokens, the energy head samples the next chunk's latent vector (with likelihood-free temperature, `sampling.py`), the
autoencoder decodes it to K tokens. The stopping criteria then see the new tokens one at a time, so that a row stops
exactly where a token-level model would (an EOS or a stop string in the middle of a chunk), and the rest of its chunk
becomes padding.
"""

import copy

import torch
from transformers import GenerationMixin
from transformers.cache_utils import DynamicCache, StaticCache
from transformers.generation import (
    EosTokenCriteria,
    GenerateDecoderOnlyOutput,
    MaxLengthCriteria,
    StoppingCriteriaList,
)

from .compat import CACHE_NAME
from .generation_configuration_calm import CalmGenerationConfig
from .sampling import check_temperature

# Rounds of redrawing a chunk that would end the row before `min_new_tokens` (the likelihood-free counterpart of
# masking the EOS logit); a row that still draws EOS after them stops there.
MIN_LENGTH_REDRAWS = 64


class CalmGenerationMixin(GenerationMixin):
    """`GenerationMixin` for [`CalmForCausalLM`]: `generate` and the temperature sampler of one chunk."""

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
        energy head, decodes it to K tokens and feeds that chunk back through the KV cache.

        Prompts: any length, batched with left padding and an `attention_mask` (right padding is rejected: pads would
        sit between a prompt and its continuation). A prompt whose length is not a multiple of K is padded on the
        LEFT up to the next multiple, so its first chunk is partial (masked out of attention, zero embeddings) and the
        chunk right before the continuation is always complete. The returned sequences are the prompts as given
        followed by the continuations, as in transformers.

        Args:
            inputs (`torch.LongTensor` of shape `(batch_size, prompt_length)`, *optional*):
                Prompt token ids (or pass `input_ids=`).
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
                `input_ids`, `attention_mask`, `tokenizer` (needed by `stop_strings`), and generation config fields.

        Returns:
            `torch.LongTensor` `(batch_size * num_return_sequences, sequence_length)`, or with
            `return_dict_in_generate=True` a `GenerateDecoderOnlyOutput` with `sequences` and the backbone's cache
            (field `cache`, `past_key_values` before transformers 5.24).
        """
        tokenizer = kwargs.pop("tokenizer", None)
        kwargs.pop("assistant_tokenizer", None)
        for name, value in {
            "logits_processor": logits_processor,
            "prefix_allowed_tokens_fn": prefix_allowed_tokens_fn,
            "assistant_model": assistant_model,
            "negative_prompt_ids": negative_prompt_ids,
            "negative_prompt_attention_mask": negative_prompt_attention_mask,
        }.items():
            if value is not None and not (name == "logits_processor" and len(value) == 0):
                raise ValueError(
                    f"generate() got {name}, which acts on next-token logits: CALM's energy head samples whole chunks "
                    "without a likelihood, so there are none. Use temperature (in (0, 1]) or do_sample=False to shape "
                    "the distribution, and stopping_criteria or stop_strings to end rows."
                )
        if synced_gpus:
            raise ValueError("synced_gpus=True is not supported by CALM's generate(); generate on each process alone.")

        # As transformers decides it, before the defaults are merged: was a length asked for anywhere?
        has_default_max_length = (
            kwargs.get("max_length") is None
            and (generation_config is None or generation_config.max_length is None)
            and self.generation_config.max_length is None
        )
        has_default_min_length = (
            kwargs.get("min_length") is None
            and (generation_config is None or generation_config.min_length is None)
            and self.generation_config.min_length is None
        )
        if generation_config is not None and kwargs:
            # Keyword arguments override the fields of a given config (pipelines pass both). Merged here, so that
            # transformers (< 5.12) does not log its deprecation of passing both on the caller's behalf.
            generation_config = copy.deepcopy(CalmGenerationConfig.from_generation_config(generation_config))
            kwargs = generation_config.update(**kwargs)
        generation_config, model_kwargs = self._prepare_generation_config(generation_config, **kwargs)
        generation_config = CalmGenerationConfig.from_generation_config(generation_config).with_calm_defaults()
        unsupported = generation_config.unsupported_options()
        if unsupported:
            raise ValueError("CALM cannot use these generation options:\n- " + "\n- ".join(unsupported.values()))
        input_ids = inputs if inputs is not None else model_kwargs.pop("input_ids", None)
        attention_mask = model_kwargs.pop("attention_mask", None)
        use_cache = generation_config.use_cache is not False
        for name in ("past_key_values", "cache"):
            if model_kwargs.get(name) is not None:
                raise ValueError(
                    f"generate() got {name}: continuing from a given cache is not supported; pass the whole prompt "
                    "(the prefill is one backbone pass over its chunks)."
                )
            model_kwargs.pop(name, None)
        if model_kwargs:
            raise ValueError(f"generate() got unknown arguments {sorted(model_kwargs)}.")
        if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError("input_ids must be a non-empty prompt of shape (batch_size, prompt_length).")
        temperature = check_temperature(1.0 if generation_config.temperature is None else generation_config.temperature)

        device = input_ids.device
        self._prepare_special_tokens(generation_config, attention_mask is not None, device=device)
        if attention_mask is None:
            # As transformers: left pads are recognised by the pad id (unless it is also the EOS id).
            attention_mask = self._prepare_attention_mask_for_generation(input_ids, generation_config, {})
            if _has_right_padding(attention_mask) or not attention_mask[:, -1].all():
                attention_mask = None  # pad ids inside a prompt are tokens, not left padding
        input_ids, attention_mask = _check_prompt(input_ids, attention_mask)
        prompt_length = input_ids.shape[1]
        K = self.config.patch_size
        generation_config = self._prepare_generated_length(
            generation_config,
            has_default_max_length=has_default_max_length,
            has_default_min_length=has_default_min_length,
            model_input_name="input_ids",
            input_ids_length=prompt_length,
            inputs_tensor=input_ids,
        )
        if has_default_max_length and generation_config.max_new_tokens is None:
            # transformers clamps its default length to the context; CALM's context is in chunks of K tokens.
            room = self.config.max_tokens - (-prompt_length) % K
            generation_config.max_length = min(generation_config.max_length, max(room, prompt_length + 1))
        self._validate_generated_length(generation_config, prompt_length, has_default_max_length)
        criteria = self._get_stopping_criteria(
            generation_config, stopping_criteria=stopping_criteria or StoppingCriteriaList(), tokenizer=tokenizer
        )
        # The length generation stops at: the config's max_length, or that of a MaxLengthCriteria passed in its place
        # (transformers lets a passed criterion replace the default one).
        max_length = min(
            [c.max_length for c in criteria if isinstance(c, MaxLengthCriteria)], default=generation_config.max_length
        )
        if max_length + (-prompt_length) % K > self.config.max_tokens:
            raise ValueError(
                f"The prompt ({prompt_length} tokens, padded to whole chunks of K = {K}) and the continuation up to "
                f"max_length = {max_length} exceed the model's context of {self.config.max_tokens} tokens "
                f"(max_position_embeddings = {self.config.max_chunks} chunks of {K})."
            )
        eos = generation_config._eos_token_tensor
        pad = generation_config._pad_token_tensor
        # As transformers' sampling loop: finished rows get pad tokens only when EOS can finish them.
        pad_finished = eos is not None and pad is not None
        min_length = generation_config.min_length or 0

        num_return = generation_config.num_return_sequences or 1
        input_ids = input_ids.repeat_interleave(num_return, dim=0)
        attention_mask = attention_mask.repeat_interleave(num_return, dim=0)
        batch_size = input_ids.shape[0]
        if streamer is not None:
            if batch_size != 1:
                raise ValueError("A streamer needs batch size 1 (and num_return_sequences=1).")
            streamer.put(input_ids.cpu())

        # Left-pad to whole chunks: the partial chunk is the first one, far from the continuation.
        fill = (-prompt_length) % K
        chunk_ids = torch.nn.functional.pad(input_ids, (fill, 0), value=0)  # masked: any id in the vocabulary
        token_mask = torch.nn.functional.pad(attention_mask, (fill, 0), value=0)
        # Without any padding the backbone needs no mask (plain causal attention), which saves building one per step.
        padded = bool(fill) or not bool(attention_mask.all())
        static = generation_config.cache_implementation == "static"
        if static and not use_cache:
            raise ValueError("cache_implementation='static' needs use_cache=True (the static cache is the KV cache).")
        # The prompt's chunks and every chunk of the continuation: all the positions a static cache has to hold.
        total_chunks = (fill + max_length + K - 1) // K
        if not use_cache:
            cache = None
        elif static:
            cache = StaticCache(config=self.config.backbone_config, max_cache_len=total_chunks)
        else:
            cache = DynamicCache(config=self.config.backbone_config)
        sampler = {
            "temperature": temperature,
            "do_sample": generation_config.do_sample is not False,
            "num_candidates": generation_config.num_candidates,
            "exact_temperature": bool(generation_config.exact_temperature),
            "max_draws": generation_config.max_draws,
            "generator": generator,
        }
        # Decoding steps after the prefill: with a static cache, one chunk mask over the whole cache (the same shape at
        # every step) and, where transformers would compile a Llama's step (`compile_config`, a CUDA device or
        # `compile_config._compile_all_devices`), the step compiled; the prefill stays eager, as in transformers.
        decode_step = self._decode_step
        static_mask = None
        if static:
            if padded:
                prompt_chunks = token_mask.unflatten(1, (-1, K)).any(-1).to(token_mask.dtype)
                static_mask = torch.nn.functional.pad(
                    prompt_chunks, (0, total_chunks - prompt_chunks.shape[1]), value=1
                )
            if self._valid_auto_compile_criteria({CACHE_NAME: cache}, generation_config):
                decode_step = self._compiled_decode_step(generation_config.compile_config)
        # EOS and the length limit, the usual criteria, are applied to a whole chunk at once (one host-device sync per
        # step, for "has every row finished?"); any other criterion sees the new tokens one at a time.
        per_token = not all(type(c) in (MaxLengthCriteria, EosTokenCriteria) for c in criteria)
        if not per_token:  # the EOS ids those criteria (the generation config's, or passed ones) stop at
            stop_eos = [c.eos_token_id.flatten() for c in criteria if type(c) is EosTokenCriteria]
            stop_eos = torch.cat(stop_eos).to(device) if stop_eos else None

        sequences = input_ids
        unfinished = torch.ones(batch_size, dtype=torch.bool, device=device)
        fed_ids, fed_mask = chunk_ids, token_mask
        prefill = True
        while True:
            if prefill or not static:
                outputs = self.model(
                    input_ids=fed_ids, attention_mask=fed_mask if padded else None, cache=cache, use_cache=use_cache
                )
                hidden, chunk = outputs.last_hidden_state[:, -1], None
            else:
                hidden, chunk = decode_step(fed_ids, static_mask, cache, sampler)
            prefill = False
            chunk = self._next_chunk(hidden, sequences.shape[1], min_length, eos, sampler, chunk)
            start = sequences.shape[1]
            if per_token:
                for token in chunk.unbind(-1):  # the criteria see one new token at a time, as in a token-level loop
                    if pad_finished:
                        token = torch.where(unfinished, token, pad)
                    sequences = torch.cat([sequences, token[:, None]], dim=-1)
                    unfinished = unfinished & ~criteria(sequences, None).to(device)
                    if not unfinished.any():
                        break
                done = not unfinished.any()
            else:
                sequences, unfinished, done = _append_chunk(
                    sequences, chunk, unfinished, stop_eos, pad if pad_finished else None, max_length
                )
            if streamer is not None:
                streamer.put(sequences[:, start:].cpu())
            if done:
                break
            # The chunk as it stands in the sequences (finished rows feed their pads, as a token-level loop does).
            if padded and not static:  # an unpadded batch runs without a mask
                fed_mask = torch.cat([token_mask, torch.ones_like(sequences[:, prompt_length:])], dim=-1)
            # Contiguous: a view into the growing sequences has a new stride at every step, which a compiled step
            # would take as a new input (a recompile, and a new CUDA graph under mode="reduce-overhead").
            fed_ids = (
                sequences[:, start:].contiguous()
                if use_cache
                else torch.cat([chunk_ids, sequences[:, prompt_length:]], dim=-1)
            )
        if streamer is not None:
            streamer.end()
        if generation_config.return_dict_in_generate:
            return GenerateDecoderOnlyOutput(sequences=sequences, **{CACHE_NAME: cache})
        return sequences

    def _decode_step(self, input_ids, chunk_attention_mask, cache, sampler) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One decoding step on a static cache: the backbone reads the last chunk `(batch, K)` and the head samples
        the next one. Returns the last hidden state `(batch, hidden)` and the chunk `(batch, K)`, or `None` for the
        exact temperature sampler, whose data-dependent rejection loop stays outside (eager: `_next_chunk` samples)."""
        outputs = self.model(
            input_ids=input_ids, chunk_attention_mask=chunk_attention_mask, cache=cache, use_cache=True
        )
        hidden = outputs.last_hidden_state[:, -1]
        if sampler["exact_temperature"]:
            return hidden, None
        return hidden, self.sample_next_chunk(hidden, **sampler)

    def _compiled_decode_step(self, compile_config):
        """`_decode_step` under `torch.compile`, built once per compile config (as transformers' `get_compiled_call`
        builds a model's compiled forward). Draws from a `generator` stay eager (torch.compile breaks the graph at
        them), so a compiled step draws exactly what the eager one does; without a generator the draws are traced
        and come from the compiled graph's own random stream."""
        compile_config = compile_config or self._default_compile_config()
        # decode_chosen_candidates reads `_calm_compile_config.fullgraph`: such a step may not break its graph.
        if getattr(self, "_calm_compile_config", None) != compile_config:
            self._calm_compile_config = compile_config
            self._calm_compiled_step = torch.compile(self._decode_step, **compile_config.to_dict())
        return self._calm_compiled_step

    def _next_chunk(self, hidden, length, min_length, eos, sampler, chunk=None) -> torch.LongTensor:
        """The next chunk of every row (`chunk` when the step already sampled it); while the sequences are shorter
        than `min_length`, chunks with an EOS before it are redrawn (the likelihood-free counterpart of
        transformers' masking of the EOS logit)."""
        if chunk is None:
            chunk = self.sample_next_chunk(hidden, **sampler)
        early = min(max(min_length - length, 0), chunk.shape[1])
        if eos is None or early == 0:
            return chunk
        for _ in range(MIN_LENGTH_REDRAWS):
            redraw = torch.isin(chunk[:, :early], eos).any(-1)
            if not redraw.any():
                break
            rows = redraw.nonzero().squeeze(1)
            chunk[rows] = self.sample_next_chunk(hidden[rows], **sampler)
        return chunk


def _append_chunk(sequences, chunk, unfinished, eos, pad, max_length):
    """`sequences` with a new `chunk` `(batch, K)` appended as transformers' EOS and max-length criteria would append
    it one token at a time: a row's tokens after its first EOS become `pad` (when given), the chunk is cut at
    `max_length`, and, when this chunk finishes every row, right after the token that finished the last one.
    Returns `(sequences, unfinished, done)`; one host-device sync (`done`) when EOS can end rows."""
    chunk = chunk[:, : max(max_length - sequences.shape[1], 1)]  # a token-level loop appends at least one
    if eos is not None:
        is_eos = torch.isin(chunk, eos) & unfinished[:, None]
        if pad is not None:  # a token after the row's first EOS, or of a row that had finished, is padding
            eos_before = is_eos.long().cumsum(-1) - is_eos.long()
            chunk = torch.where(unfinished[:, None] & (eos_before == 0), chunk, pad)
        unfinished = unfinished & ~is_eos.any(-1)
        if not bool(unfinished.any()):
            # Every row has finished: a token-level loop stops at the token that finished the last row (which may
            # come before the length limit inside this chunk).
            first_eos = torch.where(is_eos.any(-1), is_eos.long().argmax(-1), -1)
            return torch.cat([sequences, chunk[:, : int(first_eos.max()) + 1]], dim=-1), unfinished, True
    sequences = torch.cat([sequences, chunk], dim=-1)
    return sequences, unfinished, sequences.shape[1] >= max_length


def _has_right_padding(attention_mask: torch.Tensor) -> bool:
    """Whether a 0 follows a 1 in some row: padding that is not all on the left."""
    return bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any())


def _check_prompt(input_ids, attention_mask) -> tuple[torch.LongTensor, torch.Tensor]:
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}.")
    attention_mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
    if _has_right_padding(attention_mask):
        raise ValueError(
            "Found right padding in attention_mask: pads would sit between a prompt and its continuation. Pad prompts "
            "on the left (tokenizer.padding_side = 'left')."
        )
    if not attention_mask[:, -1].all():
        raise ValueError("Every prompt needs at least one token (attention_mask row of zeros).")
    return input_ids, attention_mask


__all__ = ["CalmGenerationMixin"]
