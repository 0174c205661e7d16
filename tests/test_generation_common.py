"""What transformers' `GenerationTesterMixin` (not in the transformers sdist, so not run from it) checks of a model's
`generate`, wherever it needs no next-token logits, on CALM: no prompt (BOS), `inputs_embeds`, `position_ids`,
continuing from the cache of an earlier call or forward, hidden states and attentions in the dict output (and no
scores), left padding, `num_return_sequences`, the static cache and compiling the step with `fullgraph=True`.

Sampling is random; with one `torch.Generator` the draws are the same between two ways of generating, so the ways are
compared token for token."""

import math

import pytest
import torch
from test_generate import PAD, VOCAB, K, left_pad, prompt, seeded, tiny_lm
from transformers import CompileConfig, DynamicCache, StaticCache

from transformers_calm.compat import CACHE_NAME
from transformers_calm.generation_calm import CACHE_FILL_ATTRIBUTE

BOS = 1


@pytest.fixture(scope="module")
def model():
    model = tiny_lm(seed=4)
    model.config.bos_token_id = BOS
    model.generation_config.bos_token_id = BOS
    return model


def test_without_a_prompt_generation_starts_from_bos(model):
    out = model.generate(max_new_tokens=2 * K, generator=seeded(0))
    assert out.shape == (1, 1 + 2 * K) and out[0, 0] == BOS
    assert torch.equal(out, model.generate(torch.tensor([[BOS]]), max_new_tokens=2 * K, generator=seeded(0)))
    no_bos = tiny_lm(seed=4)
    with pytest.raises(ValueError, match="bos_token_id"):
        no_bos.generate(max_new_tokens=K)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_from_inputs_embeds_reads_them_as_the_ids(model, use_cache):
    ids, mask = left_pad([prompt(4, seed=1)[0], prompt(7, seed=2)[0]])
    embeds = model.get_input_embeddings()(ids)
    kwargs = {"attention_mask": mask, "max_new_tokens": 3 * K, "use_cache": use_cache}
    from_ids = model.generate(ids, generator=seeded(1), **kwargs)
    # As in transformers: with embeddings alone the sequences hold the new tokens; with both, the ids come first.
    from_embeds = model.generate(inputs_embeds=embeds, generator=seeded(1), **kwargs)
    assert torch.equal(from_embeds, from_ids[:, ids.shape[1] :])
    both = model.generate(ids, inputs_embeds=embeds, generator=seeded(1), **kwargs)
    assert torch.equal(both, from_ids)


def test_max_length_with_inputs_embeds_counts_the_prompt_as_transformers_does(model):
    ids = prompt(5, seed=3, batch=2)
    from_ids = model.generate(ids, max_length=5 + 2 * K, generator=seeded(4))
    from_embeds = model.generate(
        inputs_embeds=model.get_input_embeddings()(ids), max_length=5 + 2 * K, generator=seeded(4)
    )
    assert torch.equal(from_embeds, from_ids[:, 5:])


def test_inputs_embeds_are_what_the_backbone_reads(model):
    """Other embeddings than the ids' change the continuation (they are read, not ignored)."""
    ids = prompt(6, seed=3, batch=4)
    embeds = model.get_input_embeddings()(ids)
    first = model.generate(inputs_embeds=embeds, max_new_tokens=K, generator=seeded(2))
    other = model.generate(inputs_embeds=embeds.flip(1), max_new_tokens=K, generator=seeded(2))
    assert not torch.equal(first, other)
    with pytest.raises(ValueError, match="token embeddings"):
        model.generate(inputs_embeds=embeds[..., :5], max_new_tokens=K)


def test_position_ids_reach_the_backbone_and_continue_by_one(model, monkeypatch):
    seen = []
    original = model.model.backbone.forward

    def forward(*args, **kwargs):
        seen.append(kwargs.get("position_ids"))
        return original(*args, **kwargs)

    monkeypatch.setattr(model.model.backbone, "forward", forward)
    ids = prompt(5, seed=4, batch=2)  # 5 tokens: 2 chunks after the left fill
    positions = torch.tensor([[10, 11], [3, 4]])
    model.generate(ids, position_ids=positions, max_new_tokens=3 * K, generator=seeded(3))
    assert torch.equal(seen[0], positions)
    assert [p.tolist() for p in seen[1:]] == [[[12], [5]], [[13], [6]]]
    seen.clear()
    model.generate(ids, position_ids=positions, max_new_tokens=2 * K, use_cache=False, generator=seeded(3))
    assert torch.equal(seen[1], torch.tensor([[10, 11, 12], [3, 4, 5]]))  # without a cache, every position again
    with pytest.raises(ValueError, match="chunk positions"):
        model.generate(ids, position_ids=torch.arange(5).expand(2, -1), max_new_tokens=K)


@pytest.mark.parametrize("prompt_length", [3, 5])
def test_continuing_from_a_generate_cache_equals_generating_at_once(model, prompt_length):
    ids, mask = left_pad([prompt(prompt_length, seed=5)[0], prompt(prompt_length - 2, seed=6)[0]])
    at_once = model.generate(ids, attention_mask=mask, max_new_tokens=4 * K, generator=seeded(4))
    generator = seeded(4)
    first = model.generate(
        ids, attention_mask=mask, max_new_tokens=2 * K, generator=generator, return_dict_in_generate=True
    )
    cache = getattr(first, CACHE_NAME)
    assert getattr(cache, CACHE_FILL_ATTRIBUTE) == (-prompt_length) % K
    full_mask = torch.cat([mask, torch.ones_like(first.sequences[:, ids.shape[1] :])], dim=1)
    then = model.generate(
        first.sequences, attention_mask=full_mask, max_new_tokens=2 * K, generator=generator, past_key_values=cache
    )
    assert torch.equal(then, at_once)


def test_continuing_from_a_forward_cache(model):
    ids = prompt(4 * K, seed=7, batch=2)
    cache = model(input_ids=ids[:, : 2 * K], use_cache=True).cache
    continued = model.generate(ids, past_key_values=cache, max_new_tokens=2 * K, generator=seeded(5))
    at_once = model.generate(ids, max_new_tokens=2 * K, generator=seeded(5))
    assert torch.equal(continued, at_once)
    assert cache.get_seq_length() == 5  # 4 prompt chunks and the first new one


def test_continuing_from_a_cache_passed_to_a_plain_generate(model):
    """A cache passed in (not returned in a dict) also records its left fill, so a later call lines up with it."""
    ids = prompt(5, seed=17, batch=2)
    at_once = model.generate(ids, max_new_tokens=4 * K, generator=seeded(10))
    generator, cache = seeded(10), DynamicCache(config=model.config.backbone_config)
    first = model.generate(ids, max_new_tokens=2 * K, past_key_values=cache, generator=generator)
    assert torch.equal(model.generate(first, past_key_values=cache, max_new_tokens=2 * K, generator=generator), at_once)


def test_continuing_checks_rows_and_refuses_more_return_sequences(model):
    first = model.generate(prompt(K, batch=2), max_new_tokens=K, return_dict_in_generate=True)
    cache = getattr(first, CACHE_NAME)
    with pytest.raises(ValueError, match="holds 2 rows, the prompt 1"):
        model.generate(first.sequences[:1], past_key_values=cache, max_new_tokens=K)
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.generate(first.sequences, past_key_values=cache, max_new_tokens=K, num_return_sequences=2)
    assert cache.get_seq_length() == 1 and cache.layers[0].keys.shape[0] == 2  # left as it was


def test_continuing_needs_whole_chunks_after_the_cache(model):
    first = model.generate(prompt(K), max_new_tokens=K + 1, return_dict_in_generate=True, generator=seeded(6))
    with pytest.raises(ValueError, match="whole chunks"):
        model.generate(first.sequences, past_key_values=getattr(first, CACHE_NAME), max_new_tokens=K)
    full = model.generate(prompt(K), max_new_tokens=K, cache_implementation="static", return_dict_in_generate=True)
    with pytest.raises(ValueError, match="pass a larger one"):
        model.generate(full.sequences, past_key_values=getattr(full, CACHE_NAME), max_new_tokens=4 * K)


def test_dict_output_has_hidden_states_and_attentions_of_every_pass_and_no_scores():
    model = tiny_lm(seed=5)
    model.set_attn_implementation("eager")  # attention weights need the eager implementation
    ids = prompt(5, seed=8, batch=2)
    plain = model.generate(ids, max_new_tokens=3 * K, generator=seeded(7))
    out = model.generate(
        ids,
        max_new_tokens=3 * K,
        generator=seeded(7),
        return_dict_in_generate=True,
        output_hidden_states=True,
        output_attentions=True,
    )
    assert torch.equal(out.sequences, plain)  # recording changes nothing
    assert out.scores is None and out.logits is None
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    assert len(out.hidden_states) == len(out.attentions) == 3  # the prompt's pass, then one per new chunk but the last
    prompt_chunks = math.ceil(5 / K)
    assert len(out.hidden_states[0]) == layers + 1
    assert out.hidden_states[0][-1].shape == (2, prompt_chunks, model.config.hidden_size)
    assert out.hidden_states[1][-1].shape == (2, 1, model.config.hidden_size)
    assert out.attentions[0][0].shape == (2, heads, prompt_chunks, prompt_chunks)
    assert out.attentions[2][0].shape == (2, heads, 1, prompt_chunks + 2)
    default = model.generate(ids, max_new_tokens=K, return_dict_in_generate=True)
    assert default.hidden_states is None and default.attentions is None


def test_dict_output_with_a_static_cache_records_hidden_states(model):
    ids = prompt(4, seed=9)
    dynamic = model.generate(
        ids, max_new_tokens=3 * K, generator=seeded(8), output_hidden_states=True, return_dict_in_generate=True
    )
    static = model.generate(
        ids,
        max_new_tokens=3 * K,
        generator=seeded(8),
        cache_implementation="static",
        output_hidden_states=True,
        return_dict_in_generate=True,
    )
    assert torch.equal(static.sequences, dynamic.sequences)
    for a, b in zip(static.hidden_states, dynamic.hidden_states, strict=True):
        torch.testing.assert_close(a[-1], b[-1])


@pytest.mark.parametrize("model_class_input", ["input_ids", "inputs_embeds"])
def test_left_padding_leaves_the_last_hidden_state_unchanged(model, model_class_input):
    """As GenerationTesterMixin's left-padding test, on the backbone's last state (CALM has no logits): the same
    prompt with and without a padded chunk in front, with positions from the mask or the defaults."""
    ids = prompt(3 * K, seed=10, batch=2)
    padded = torch.cat([torch.full((2, 2 * K), PAD), ids], dim=1)
    mask = torch.cat([torch.zeros(2, 2 * K, dtype=torch.long), torch.ones_like(ids)], dim=1)

    def last_state(token_ids, attention_mask=None, **kwargs):
        inputs = {
            model_class_input: token_ids
            if model_class_input == "input_ids"
            else model.get_input_embeddings()(token_ids)
        }
        with torch.no_grad():
            return model.model(**inputs, attention_mask=attention_mask, **kwargs).last_hidden_state[:, -1]

    reference = last_state(ids)
    chunk_mask = mask.unflatten(1, (-1, K)).any(-1).long()
    positions = (chunk_mask.cumsum(-1) - 1).clamp(min=0)
    torch.testing.assert_close(last_state(padded, mask, position_ids=positions), reference)
    torch.testing.assert_close(last_state(padded, mask), reference, rtol=1e-4, atol=1e-5)  # RoPE: relative positions


def test_num_return_sequences_in_the_dict_output(model):
    ids, mask = left_pad([prompt(4, seed=11)[0], prompt(2, seed=12)[0]])
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=2 * K, num_return_sequences=2, return_dict_in_generate=True
    )
    assert out.sequences.shape == (4, ids.shape[1] + 2 * K)
    assert getattr(out, CACHE_NAME).layers[0].keys.shape[0] == 4


def test_static_cache_generation_is_the_dynamic_one(model):
    ids, mask = left_pad([prompt(5, seed=13)[0], prompt(3, seed=14)[0]])
    kwargs = {"attention_mask": mask, "max_new_tokens": 3 * K}
    dynamic = model.generate(ids, generator=seeded(9), **kwargs)
    static = model.generate(ids, generator=seeded(9), cache_implementation="static", **kwargs)
    assert torch.equal(static, dynamic)
    prepared = StaticCache(config=model.config.backbone_config, max_cache_len=8)
    assert torch.equal(model.generate(ids, generator=seeded(9), past_key_values=prepared, **kwargs), dynamic)


def test_the_model_says_its_step_compiles_without_graph_breaks(model):
    assert type(model)._can_compile_fullgraph


@pytest.mark.slow  # compiles (inductor, ~10 s per sampler on one core)
@pytest.mark.parametrize(
    "sampler",
    [{"num_candidates": 1}, {"temperature": 0.5, "num_candidates": 8}, {"do_sample": False, "num_candidates": 8}],
)
def test_the_decoding_step_compiles_with_fullgraph(sampler):
    """`_can_compile_fullgraph`: the static-cache step, draws included (no generator), in one graph."""
    model = tiny_lm(seed=6)
    config = CompileConfig(fullgraph=True, mode="default")
    config._compile_all_devices = True  # transformers compiles on CPU only when told to
    step = model._compiled_decode_step(config)
    cache = StaticCache(config=model.config.backbone_config, max_cache_len=4)
    model.model(input_ids=prompt(2 * K, seed=15, batch=2), cache=cache)
    full = {"temperature": 1.0, "do_sample": True, "exact_temperature": False, "max_draws": 10, "generator": None}
    for _ in range(2):
        hidden, chunk = step(prompt(K, seed=16, batch=2), torch.ones(2, 4, dtype=torch.long), cache, full | sampler)
        assert chunk.shape == (2, K) and bool(((chunk >= 0) & (chunk < VOCAB)).all())
