"""CALM's decoding loop (Shao et al., 2025, arXiv 2510.27688, section 3): what `generate` runs once its inputs are
prepared (`generation_calm.py`). One backbone pass per chunk: the prefill reads the prompt's chunks, then every step
reads the chunk sampled last and samples the next one with the generative head (`sampling.py`), which the
autoencoder decodes to K tokens. With a static cache the steps after the prefill may run compiled.
"""

import torch
from transformers.generation import EosTokenCriteria, MaxLengthCriteria

from .compat import CACHE_NAME, cache_max_length

# Rounds of redrawing a chunk that would end the row before `min_new_tokens` (the likelihood-free counterpart of
# masking the EOS logit); a row that still draws EOS after them stops there.
MIN_LENGTH_REDRAWS = 64


class CalmDecodingSteps:
    """The decoding loop of [`~generation_calm.CalmGenerationMixin.generate`] and its step, eager or compiled."""

    def _calm_decode(self, prompt, cache, criteria, max_length, generation_config, streamer, generator):
        """Sample chunks until every row has stopped. Returns the sequences (the prompt's ids, then the new tokens)
        and the backbone's `{"hidden_states": [...], "attentions": [...]}` of every pass, when the config asks."""
        sampler = {
            "temperature": 1.0 if generation_config.temperature is None else float(generation_config.temperature),
            "do_sample": generation_config.do_sample is not False,
            "num_candidates": generation_config.num_candidates,
            "exact_temperature": bool(generation_config.exact_temperature),
            "max_draws": generation_config.max_draws,
            "generator": generator,
        }
        returned = bool(generation_config.return_dict_in_generate)  # recorded only where they are returned
        record = {
            "output_hidden_states": returned and bool(generation_config.output_hidden_states),
            "output_attentions": returned and bool(generation_config.output_attentions),
        }
        steps = {"hidden_states": [], "attentions": []}
        static = cache is not None and cache.is_compileable
        decode_step, static_mask = self._prepare_decode_step(
            prompt, cache, generation_config, static, any(record.values())
        )
        eos = generation_config._eos_token_tensor
        pad = generation_config._pad_token_tensor if eos is not None else None  # as transformers: pads need an EOS
        stop_eos = eos_ids_of_plain_criteria(criteria, prompt.token_mask.device)
        min_length = generation_config.min_length or 0

        prompt_length = prompt.input_ids.shape[1]
        sequences = prompt.input_ids
        unfinished = torch.ones(sequences.shape[0], dtype=torch.bool, device=sequences.device)
        read_ids, read_embeds, positions = prompt.read_ids, prompt.read_embeds, prompt.position_ids
        read_mask = prompt.token_mask if prompt.padded else None
        first = True
        while True:
            if first or decode_step is None:
                outputs = self.model(
                    input_ids=read_ids,
                    inputs_embeds=read_embeds,
                    attention_mask=read_mask,
                    position_ids=positions,
                    cache=cache,
                    use_cache=cache is not None,
                    **record,
                )
                hidden, chunk = outputs.last_hidden_state[:, -1], None
                steps["hidden_states"].append(outputs.hidden_states)
                steps["attentions"].append(outputs.attentions)
            else:
                hidden, chunk = decode_step(read_ids, static_mask, cache, sampler, positions)
            first = False
            chunk = self._next_chunk(hidden, sequences.shape[1], min_length, eos, sampler, chunk)
            start = sequences.shape[1]
            if stop_eos is False:  # criteria other than EOS and length: they see one new token at a time
                sequences, unfinished, done = _append_token_wise(sequences, chunk, unfinished, criteria, pad)
            else:
                sequences, unfinished, done = _append_chunk(sequences, chunk, unfinished, stop_eos, pad, max_length)
            if streamer is not None:  # the new tokens, 1-D as transformers puts them (batch size 1)
                streamer.put(sequences[0, start:].cpu())
            if done:
                return sequences, steps
            # The next pass reads the chunk as it stands in the sequences (finished rows feed their pads, as a
            # token-level loop does); without a cache, the whole sequence again.
            new_tokens = sequences[:, prompt_length:]
            if positions is not None:
                positions = (
                    positions[:, -1:] + 1 if cache is not None else torch.cat([positions, positions[:, -1:] + 1], -1)
                )
            if read_mask is not None and decode_step is None:  # an unpadded batch runs without a mask
                read_mask = torch.cat([prompt.token_mask, torch.ones_like(new_tokens)], dim=-1)
            if cache is not None:
                # Contiguous: a view into the growing sequences has a new stride at every step, which a compiled
                # step would take as a new input (a recompile, and a new CUDA graph under mode="reduce-overhead").
                read_ids, read_embeds = sequences[:, start:].contiguous(), None
            elif prompt.read_embeds is None:
                read_ids = torch.cat([prompt.read_ids, new_tokens], dim=-1)
            else:
                new_embeds = self.get_input_embeddings()(new_tokens).to(prompt.read_embeds.dtype)
                read_embeds = torch.cat([prompt.read_embeds, new_embeds], dim=1)

    def _prepare_decode_step(self, prompt, cache, generation_config, static, recording):
        """`(decode_step, static_mask)` for the steps after the prefill. With a static cache: one chunk mask over the
        whole cache (the same shape at every step) and the step, compiled where transformers would compile a Llama's
        (`compile_config`, a CUDA device or `compile_config._compile_all_devices`); the prefill stays eager, as in
        transformers. Otherwise (or to record hidden states or attentions) no step: the loop calls the model."""
        if not static or recording:
            return None, None
        static_mask = None
        if prompt.padded:
            K = self.config.patch_size
            prompt_chunks = prompt.token_mask.unflatten(1, (-1, K)).any(-1).to(prompt.token_mask.dtype)
            static_mask = torch.nn.functional.pad(
                prompt_chunks, (0, cache_max_length(cache) - prompt_chunks.shape[1]), value=1
            )
        if self._valid_auto_compile_criteria({CACHE_NAME: cache}, generation_config):
            return self._compiled_decode_step(generation_config.compile_config), static_mask
        return self._decode_step, static_mask

    def _decode_step(
        self, input_ids, chunk_attention_mask, cache, sampler, position_ids=None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One decoding step on a static cache: the backbone reads the last chunk `(batch, K)` and the head samples
        the next one. Returns the last hidden state `(batch, hidden)` and the chunk `(batch, K)`, or `None` for the
        exact temperature sampler, whose data-dependent rejection loop stays outside (eager: `_next_chunk` samples)."""
        outputs = self.model(
            input_ids=input_ids,
            chunk_attention_mask=chunk_attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
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


def eos_ids_of_plain_criteria(criteria, device) -> torch.Tensor | None | bool:
    """When the criteria are only transformers' EOS and max-length ones (the usual case), the EOS ids they stop at
    (`None`: no EOS criterion), so that a whole chunk is appended at once (one host-device sync per step); `False`
    when any other criterion must see the new tokens one at a time."""
    if not all(type(c) in (MaxLengthCriteria, EosTokenCriteria) for c in criteria):
        return False
    eos = [c.eos_token_id.flatten() for c in criteria if type(c) is EosTokenCriteria]
    return torch.cat(eos).to(device) if eos else None


def _append_token_wise(sequences, chunk, unfinished, criteria, pad):
    """`sequences` with `chunk` appended one token at a time, each seen by the stopping criteria, as in a
    token-level loop. Returns `(sequences, unfinished, done)`."""
    for token in chunk.unbind(-1):
        if pad is not None:
            token = torch.where(unfinished, token, pad)
        sequences = torch.cat([sequences, token[:, None]], dim=-1)
        unfinished = unfinished & ~criteria(sequences, None).to(unfinished.device)
        if not unfinished.any():
            break
    return sequences, unfinished, not unfinished.any()


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


def has_right_padding(attention_mask: torch.Tensor) -> bool:
    """Whether a 0 follows a 1 in some row: padding that is not all on the left."""
    return bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any())


def check_prompt_mask(attention_mask, shape, device) -> torch.LongTensor:
    """The prompt's attention mask (all ones when `None`), checked: its shape, left padding only, a token per row."""
    if attention_mask is None:
        return torch.ones(shape, dtype=torch.long, device=device)
    if tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match the prompt {tuple(shape)}.")
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    if has_right_padding(attention_mask):
        raise ValueError(
            "Found right padding in attention_mask: pads would sit between a prompt and its continuation. Pad prompts "
            "on the left (tokenizer.padding_side = 'left')."
        )
    if not attention_mask[:, -1].all():
        raise ValueError("Every prompt needs at least one token (attention_mask row of zeros).")
    return attention_mask


__all__ = [
    "MIN_LENGTH_REDRAWS",
    "CalmDecodingSteps",
    "check_prompt_mask",
    "eos_ids_of_plain_criteria",
    "has_right_padding",
]
