"""Tests of static-cache and compiled generation: `generate(cache_implementation="static")` gives the tokens of the
default dynamic cache for the same generator; with a `compile_config` the decoding step runs under torch.compile
(inductor on CPU) and gives the eager tokens; EOS and max-length, applied to a whole chunk at once, give what
transformers' criteria give token by token."""

import pytest
import torch
from factories import scale_head, tiny_calm
from test_generate import PAD, VOCAB, K, find_eos_case, left_pad, prompt, seeded, tiny_lm
from transformers import CompileConfig, EosTokenCriteria, MaxLengthCriteria, StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import StaticCache

from transformers_calm.compat import cache_max_length
from transformers_calm.generation_steps import _append_chunk


@pytest.fixture(scope="module")
def model():
    return tiny_lm()


def head_model(head_type: str):
    autoencoder = {"vocab_size": VOCAB, "patch_size": K, "latent_size": 4, "hidden_size": 16, "intermediate_size": 24}
    model = tiny_calm(0, autoencoder={**autoencoder, "pad_token_id": PAD}, random_head=False, head_type=head_type)
    return scale_head(model, 2.0)


def batches():
    """A batch of one prompt whose length is not a multiple of K, and a left-padded batch."""
    single = prompt(7, seed=3)
    return {"single": (single, torch.ones_like(single)), "left-padded": left_pad([prompt(7, seed=4)[0], prompt(2)[0]])}


SAMPLERS = {
    "T=1": {},
    "T=0.5 batch": {"temperature": 0.5, "num_candidates": 16},
    "T=0.5 exact": {"temperature": 0.5, "exact_temperature": True},
    "greedy": {"do_sample": False, "num_candidates": 8},
}


@pytest.mark.parametrize("batch", ["single", "left-padded"])
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_static_cache_gives_the_dynamic_tokens(model, sampler, batch):
    ids, mask = batches()[batch]
    outputs = [
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=5 * K + 1,
            generator=seeded(1),
            cache_implementation=cache,
            **SAMPLERS[sampler],
        )
        for cache in ("dynamic", "static")
    ]
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("head_type", ["flow", "diffusion"])
def test_static_cache_with_every_head(head_type):
    model = head_model(head_type).eval()
    ids, mask = batches()["left-padded"]
    outputs = [
        model.generate(ids, attention_mask=mask, max_new_tokens=3 * K, generator=seeded(2), cache_implementation=c)
        for c in ("dynamic", "static")
    ]
    assert torch.equal(outputs[0], outputs[1])


def test_static_cache_holds_the_prompt_and_continuation_chunks(model, monkeypatch):
    caches = []
    original = model.model.forward

    def recording(*args, cache=None, **kwargs):
        caches.append(cache)
        return original(*args, cache=cache, **kwargs)

    monkeypatch.setattr(model.model, "forward", recording)
    ids = prompt(7)  # padded to 3 chunks on the left; 2 more tokens than whole chunks in the continuation
    model.generate(ids, max_new_tokens=2 * K + 2, generator=seeded(0), cache_implementation="static")
    assert all(isinstance(c, StaticCache) and c is caches[0] for c in caches)
    assert cache_max_length(caches[0]) == 3 + 3
    assert len(caches) == 3  # the prefill and a step per further chunk


def test_static_cache_needs_use_cache(model):
    with pytest.raises(ValueError, match="static.*use_cache=True"):
        model.generate(prompt(4), max_new_tokens=K, cache_implementation="static", use_cache=False)


class NeverStop(StoppingCriteria):
    """A criterion that never stops: its presence makes generate apply every criterion token by token."""

    def __call__(self, input_ids, scores, **kwargs):
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_chunk_wise_eos_and_length_equal_the_token_wise_criteria(model, cache):
    ids, mask = left_pad([prompt(6, seed=7)[0], prompt(4, seed=8)[0]])
    seed, eos, _, _ = find_eos_case(model, ids, mask, 4 * K)
    for max_new_tokens in (4 * K, 4 * K - 1):  # the limit at a chunk's end and inside one
        kwargs = {"max_new_tokens": max_new_tokens, "eos_token_id": eos, "pad_token_id": VOCAB - 1}
        by_chunk = model.generate(
            ids, attention_mask=mask, generator=seeded(seed), cache_implementation=cache, **kwargs
        )
        by_token = model.generate(
            ids,
            attention_mask=mask,
            generator=seeded(seed),
            cache_implementation=cache,
            stopping_criteria=StoppingCriteriaList([NeverStop()]),
            **kwargs,
        )
        assert torch.equal(by_chunk, by_token)
        assert by_chunk.shape[1] == ids.shape[1] + max_new_tokens  # row 1 never meets the EOS
    # Every row finishing: the sequences end at the token that finished the last row, as token by token.
    single = prompt(6, seed=7)
    seed, eos, first, _ = find_eos_case(model, single, torch.ones_like(single), 4 * K)
    by_chunk = model.generate(
        single, max_new_tokens=4 * K, generator=seeded(seed), eos_token_id=eos, cache_implementation=cache
    )
    assert by_chunk.shape == (1, single.shape[1] + first + 1) and by_chunk[0, -1] == eos


def cpu_compile_config() -> CompileConfig:
    config = CompileConfig(mode="default")  # reduce-overhead (CUDA graphs) is for CUDA
    config._compile_all_devices = True  # as for a Llama: transformers compiles on CPU only when told to
    return config


@pytest.mark.slow  # compiles (inductor, about 20 s per graph on one core)
def test_compiled_step_gives_the_eager_tokens():
    model = tiny_lm(seed=1)
    for batch, sampler in (("single", "T=1"), ("left-padded", "T=0.5 batch")):
        ids, mask = batches()[batch]
        kwargs = {"attention_mask": mask, "max_new_tokens": 4 * K, **SAMPLERS[sampler]}
        eager = model.generate(ids, generator=seeded(5), **kwargs)
        compiled = model.generate(
            ids, generator=seeded(5), cache_implementation="static", compile_config=cpu_compile_config(), **kwargs
        )
        assert torch.equal(eager, compiled), (batch, sampler)
    assert model._calm_compiled_step is not None  # the step was compiled, not run eagerly


@pytest.mark.slow  # compiles the flow sampler's 10 midpoint steps (~40 s cold); the diffusion head's 100 steps
# take minutes to compile and were checked by hand
def test_compiled_step_with_the_flow_head():
    model = head_model("flow").eval()
    ids, mask = batches()["left-padded"]
    kwargs = {"attention_mask": mask, "max_new_tokens": 3 * K}
    eager = model.generate(ids, generator=seeded(1), **kwargs)
    compiled = model.generate(
        ids, generator=seeded(1), cache_implementation="static", compile_config=cpu_compile_config(), **kwargs
    )
    assert torch.equal(eager, compiled)


@pytest.mark.slow  # compiles
def test_compiled_step_matches_eager_within_float_tolerance():
    """The compiled graph (no generator: the draws are traced too) against the eager step on the same cache contents:
    the backbone's state agrees to float precision."""
    model = tiny_lm(seed=2)
    ids, mask = batches()["left-padded"]
    step = model._compiled_decode_step(cpu_compile_config())
    chunk_mask = torch.nn.functional.pad(mask, (K - mask.shape[1] % K, 0)).unflatten(1, (-1, K)).any(-1).long()
    hidden = {}
    for name, function in (("eager", model._decode_step), ("compiled", step)):
        cache = StaticCache(config=model.config.backbone_config, max_cache_len=chunk_mask.shape[1] + 2)
        padded_ids = torch.nn.functional.pad(ids, (K - ids.shape[1] % K, 0))
        model.model(input_ids=padded_ids, chunk_attention_mask=chunk_mask, cache=cache)
        full_mask = torch.nn.functional.pad(chunk_mask, (0, 2), value=1)
        sampler = {"temperature": 1.0, "do_sample": True, "num_candidates": 1, "exact_temperature": False}
        sampler.update(max_draws=10, generator=None)
        states = []
        for _ in range(2):
            state, chunk = function(prompt(K, seed=len(states), batch=2), full_mask, cache, sampler)
            assert chunk.shape == (2, K)
            states.append(state)
        hidden[name] = torch.stack(states)
    torch.testing.assert_close(hidden["compiled"], hidden["eager"], rtol=1e-5, atol=1e-5)


def test_compile_config_alone_on_cpu_stays_eager():
    """As for a Llama: on CPU, a compile_config without `_compile_all_devices` does not compile (transformers warns)."""
    model = tiny_lm(seed=3)
    model.generate(prompt(4), max_new_tokens=2 * K, cache_implementation="static", compile_config=CompileConfig())
    assert getattr(model, "_calm_compiled_step", None) is None


def token_by_token(sequences, chunk, unfinished, eos, pad, max_length):
    """generate's loop for other criteria, with transformers' own EOS and max-length criteria."""
    criteria = StoppingCriteriaList([MaxLengthCriteria(max_length)])
    if eos is not None:
        criteria.append(EosTokenCriteria(eos))
    for token in chunk.unbind(-1):
        if pad is not None:
            token = torch.where(unfinished, token, pad)
        sequences = torch.cat([sequences, token[:, None]], dim=-1)
        unfinished = unfinished & ~criteria(sequences, None)
        if not unfinished.any():
            break
    return sequences, unfinished, not unfinished.any()


def test_append_chunk_is_the_token_wise_loop():
    """`_append_chunk` against the token-wise loop on random cases: EOS anywhere (also in the chunk that reaches the
    length limit), rows finished earlier, one or two EOS ids, pad None, equal to EOS or its own id."""
    generator = seeded(0)
    for case in range(600):
        batch, length = int(torch.randint(1, 4, (1,), generator=generator)), int(torch.randint(1, 6, (1,)))
        sequences = torch.randint(1, 6, (batch, length), generator=generator)
        chunk = torch.randint(1, 6, (batch, K), generator=generator)
        unfinished = torch.rand(batch, generator=generator) < 0.8
        unfinished[0] = True  # generate never appends to a batch that has finished
        eos = [None, torch.tensor([1]), torch.tensor([1, 2])][case % 3]
        pad = [None, torch.tensor(1), torch.tensor(0)][case // 3 % 3] if eos is not None else None
        max_length = length + int(torch.randint(1, 2 * K, (1,), generator=generator))
        expected = token_by_token(sequences, chunk, unfinished, eos, pad, max_length)
        got = _append_chunk(sequences, chunk, unfinished, eos, pad, max_length)
        assert torch.equal(got[0], expected[0]) and got[2] == expected[2], case
        if not expected[2]:  # the rows still running (when generation ends, the length criterion ends them all)
            assert torch.equal(got[1], expected[1]), case


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_a_passed_max_length_criterion_sets_the_length(model, cache):
    """A MaxLengthCriteria passed to generate replaces the config's (as in transformers): it decides the length, the
    static cache's size, and the context check."""
    ids = prompt(6)
    longer = StoppingCriteriaList([MaxLengthCriteria(6 + 4 * K)])
    out = model.generate(
        ids, max_new_tokens=K, stopping_criteria=longer, generator=seeded(0), cache_implementation=cache
    )
    assert out.shape == (1, 6 + 4 * K)
    beyond = StoppingCriteriaList([MaxLengthCriteria(model.config.max_tokens + 1)])
    with pytest.raises(ValueError, match="exceed the model's context"):
        model.generate(ids, max_new_tokens=K, stopping_criteria=beyond, cache_implementation=cache)
