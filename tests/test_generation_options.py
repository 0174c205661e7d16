"""`generate` on transformers' machinery: the options that work as for any causal LM (stop strings, max_time,
min_new_tokens, eos_token_id=None, use_cache=False, pipeline("text-generation")), the ones that cannot work without a
likelihood (each rejected with its reason), and `CalmGenerationConfig` itself.

Tiny models (CPU, offline) from `factories`, with a head scaled so that samples depend on the context and the noise,
and a word-level tokenizer `w0 .. w15` over the 16-token vocabulary."""

import copy
import time

import pytest
import torch
from factories import random_ids, scale_head, tiny_calm
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedTokenizerFast,
    TopKLogitsWarper,
    WatermarkingConfig,
    pipeline,
)

from transformers_calm import CalmForCausalLM, CalmGenerationConfig
from transformers_calm.generation_configuration_calm import UNSUPPORTED_OPTIONS

K = 3
VOCAB = 16
AUTOENCODER = {
    "vocab_size": VOCAB,
    "patch_size": K,
    "latent_size": 4,
    "hidden_size": 16,
    "intermediate_size": 24,
    "pad_token_id": 0,
}


@pytest.fixture(scope="module")
def model() -> CalmForCausalLM:
    return scale_head(tiny_calm(0, autoencoder=AUTOENCODER, random_head=False), 2.0).eval()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    # "abcdef" (an id outside the model's vocabulary, never generated): StopStringCriteria tokenises it to find how
    # each token's text reads after a prefix.
    backend = Tokenizer(WordLevel({**{f"w{i}": i for i in range(VOCAB)}, "abcdef": VOCAB}, unk_token="w1"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="w0")


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def prompt(length: int, seed: int = 0) -> torch.LongTensor:
    return random_ids(1, length, vocab_size=VOCAB, seed=seed)


# -------------------------------------------------------------------------------------------- stopping


def first_mid_chunk_occurrence(new: torch.LongTensor, tokens) -> tuple[int, int] | None:
    """(token, position) of the first of `tokens` that `new` generates inside a chunk (not at its end)."""
    for position, token in enumerate(new.tolist()):
        if token in tokens and position % K < K - 1:
            return token, position
    return None


def test_stop_strings_stop_inside_a_chunk(model, tokenizer):
    """A stop string ends the sequence right after the token that completes it, even in the middle of a chunk (as for
    a token-level model). Tokens w6..w9 are the only ones whose text holds their digit, so the first match is the
    first occurrence of the token."""
    ids = prompt(4, seed=1)
    for seed in range(40):
        reference = model.generate(ids, max_new_tokens=6 * K, generator=seeded(seed))
        found = first_mid_chunk_occurrence(reference[0, 4:], {6, 7, 8, 9})
        if found:
            break
    else:
        raise AssertionError("no mid-chunk occurrence of w6..w9 in 40 seeds")
    token, position = found
    out = model.generate(
        ids, max_new_tokens=6 * K, generator=seeded(seed), stop_strings=[f"w{token}"], tokenizer=tokenizer
    )
    assert torch.equal(out, reference[:, : 4 + position + 1])
    assert tokenizer.decode(out[0]).endswith(f"w{token}")


def test_stop_strings_need_the_tokenizer(model):
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(prompt(3), max_new_tokens=4, stop_strings=["w5"])


def test_eos_token_id_none_disables_the_models_eos(model):
    ids = prompt(5, seed=2)
    reference = model.generate(ids, max_new_tokens=5 * K, generator=seeded(0), eos_token_id=None)
    eos = int(reference[0, 5:].mode().values)  # a token the model does generate
    model.generation_config.eos_token_id = eos
    try:
        stopped = model.generate(ids, max_new_tokens=5 * K, generator=seeded(0))
        running = model.generate(ids, max_new_tokens=5 * K, generator=seeded(0), eos_token_id=None)
    finally:
        model.generation_config.eos_token_id = None
    assert stopped.shape[1] < reference.shape[1] and stopped[0, -1] == eos
    assert torch.equal(running, reference)


def test_min_new_tokens_redraws_chunks_that_would_end_too_early(model):
    ids = prompt(5, seed=2)
    reference = model.generate(ids, max_new_tokens=4 * K, generator=seeded(0), eos_token_id=None)
    eos = int(reference[0, 5:].mode().values)
    minimum = 2 * K + 1
    for seed in range(10):
        out = model.generate(
            ids, max_new_tokens=4 * K, min_new_tokens=minimum, eos_token_id=eos, generator=seeded(seed)
        )
        new = out[0, 5:]
        assert len(new) >= minimum
        assert eos not in new[:minimum].tolist()


def test_max_time_stops_after_the_first_token(model):
    start = time.monotonic()
    out = model.generate(prompt(4), max_new_tokens=60 * K, max_time=0.0, eos_token_id=None)
    assert out.shape == (1, 5)  # as for any causal LM: the step in flight finishes its first token
    assert time.monotonic() - start < 5


def test_use_cache_false_gives_the_same_sequences(model):
    ids = torch.cat([prompt(5, seed=3), prompt(5, seed=4)])
    kwargs = {"max_new_tokens": 4 * K + 1, "eos_token_id": None}
    assert torch.equal(
        model.generate(ids, generator=seeded(1), **kwargs),
        model.generate(ids, generator=seeded(1), use_cache=False, **kwargs),
    )


# -------------------------------------------------------------------------------------------- pipeline


def test_text_generation_pipeline(model, tokenizer):
    tokenizer.padding_side = "left"
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    outputs = generator(["w3 w4 w5", "w6 w7"], max_new_tokens=2 * K, eos_token_id=None)
    for text, output in zip(["w3 w4 w5", "w6 w7"], outputs, strict=True):
        generated = output[0]["generated_text"]
        assert generated.startswith(text) and len(generated[len(text) :].split()) == 2 * K
    new_only = generator("w3 w4 w5", max_new_tokens=K, return_full_text=False, eos_token_id=None)
    assert len(new_only[0]["generated_text"].split()) == K


# -------------------------------------------------------------------------------------------- rejected options

# One active value for every option CALM rejects.
ACTIVE = {
    "num_beams": 2,
    "num_beam_groups": 2,
    "penalty_alpha": 0.6,
    "top_k": 5,
    "top_p": 0.9,
    "min_p": 0.1,
    "typical_p": 0.9,
    "epsilon_cutoff": 3e-4,
    "eta_cutoff": 3e-4,
    "top_h": 0.5,
    "repetition_penalty": 1.3,
    "encoder_repetition_penalty": 1.2,
    "no_repeat_ngram_size": 2,
    "encoder_no_repeat_ngram_size": 2,
    "bad_words_ids": [[3]],
    "force_words_ids": [[3]],
    "sequence_bias": {(3,): -1.0},
    "suppress_tokens": [3],
    "begin_suppress_tokens": [3],
    "forced_bos_token_id": 3,
    "forced_eos_token_id": 3,
    "exponential_decay_length_penalty": (2, 1.5),
    "guidance_scale": 1.5,
    "renormalize_logits": True,
    "output_scores": True,
    "output_logits": True,
    "dola_layers": "low",
    "prompt_lookup_num_tokens": 3,
    "assistant_early_exit": 1,
    "watermarking_config": WatermarkingConfig(),
    "cache_implementation": "offloaded",
    "token_healing": True,
}


def test_every_rejected_option_has_an_active_value_here():
    assert set(ACTIVE) == set(UNSUPPORTED_OPTIONS)


@pytest.mark.parametrize("name", sorted(UNSUPPORTED_OPTIONS))
def test_rejected_option_says_why_and_what_instead(model, name):
    with pytest.raises(ValueError) as error:
        model.generate(prompt(3), max_new_tokens=K, **{name: ACTIVE[name]})
    message = str(error.value)
    assert f"{name}=" in message and UNSUPPORTED_OPTIONS[name] in message
    assert "CALM cannot use these generation options" in message


def test_rejected_option_in_a_generation_config(model):
    with pytest.raises(ValueError, match=r"top_k=5: top-k truncates next-token logits.*use temperature"):
        model.generate(prompt(3), generation_config=GenerationConfig(max_new_tokens=K, top_k=5))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"logits_processor": LogitsProcessorList([TopKLogitsWarper(5)])},
        {"prefix_allowed_tokens_fn": lambda batch, ids: [1, 2]},
        {"assistant_model": object()},
        {"negative_prompt_ids": torch.ones(1, 2, dtype=torch.long)},
    ],
    ids=lambda kwargs: next(iter(kwargs)),
)
def test_logit_arguments_are_rejected(model, kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=rf"{name}, which acts on next-token logits.*temperature"):
        model.generate(prompt(3), max_new_tokens=K, **kwargs)


def test_inactive_values_are_accepted(model):
    """transformers' neutral values of these options (as a shared generation config holds them) ask for nothing."""
    out = model.generate(
        prompt(3),
        max_new_tokens=K,
        num_beams=1,
        top_p=1.0,
        repetition_penalty=1.0,
        top_k=None,
        logits_processor=LogitsProcessorList(),
        output_scores=False,
    )
    assert out.shape == (1, 3 + K)


def test_synced_gpus_is_rejected(model):
    with pytest.raises(ValueError, match="synced_gpus"):
        model.generate(prompt(3), max_new_tokens=K, synced_gpus=True)


# -------------------------------------------------------------------------------------------- the config


def test_generation_config_is_calms_and_round_trips(model, tmp_path):
    assert type(model.generation_config) is CalmGenerationConfig
    config = CalmGenerationConfig(num_candidates=17, exact_temperature=True, max_draws=99, temperature=0.4)
    assert config.do_sample is None and copy.deepcopy(config).with_calm_defaults().do_sample is True  # a sampler
    config.save_pretrained(tmp_path)
    loaded = CalmGenerationConfig.from_pretrained(tmp_path)
    assert (loaded.num_candidates, loaded.exact_temperature, loaded.max_draws, loaded.temperature) == (
        17,
        True,
        99,
        0.4,
    )
    # A model reads generation_config.json as transformers writes it and keeps CALM's fields.
    model.save_pretrained(tmp_path / "model")
    config.save_pretrained(tmp_path / "model")
    reloaded = CalmForCausalLM.from_pretrained(tmp_path / "model")
    assert type(reloaded.generation_config) is CalmGenerationConfig
    assert (reloaded.generation_config.num_candidates, reloaded.generation_config.exact_temperature) == (17, True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_candidates": 0}, "num_candidates must be an integer >= 1"),
        ({"max_draws": 0}, "max_draws must be an integer >= 1"),
        ({"num_candidates": 2.5}, "num_candidates"),
    ],
)
def test_generation_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CalmGenerationConfig(**kwargs)


def test_a_temperature_above_one_loads_but_does_not_generate_or_save(model, tmp_path):
    """A generation config shared with token-level models may hold T > 1: it loads (so the model loads), and
    generate() and saving (strict validation) say why it cannot be used."""
    config = CalmGenerationConfig(temperature=1.5)
    with pytest.raises(ValueError, match=r"temperature must be in \(0, 1\]"):
        config.validate(strict=True)
    with pytest.raises(ValueError, match=r"temperature must be in \(0, 1\]"):
        model.generate(prompt(3), max_new_tokens=K, generation_config=config)


def test_a_passed_calm_config_does_not_override_the_models_settings(model, monkeypatch):
    """Fields a passed CalmGenerationConfig leaves unset come from model.generation_config (CALM's own included)."""
    seen = []
    original = model.sample_next_chunk

    def spy(hidden_states, **kwargs):
        seen.append((kwargs["do_sample"], kwargs["num_candidates"]))
        return original(hidden_states, **kwargs)

    monkeypatch.setattr(model, "sample_next_chunk", spy)
    assert (model.generation_config.do_sample, model.generation_config.num_candidates) == (True, 200)  # the model's
    model.generation_config.do_sample, model.generation_config.num_candidates = False, 9
    try:
        model.generate(prompt(3), generation_config=CalmGenerationConfig(max_new_tokens=K))
        model.generate(prompt(3), generation_config=GenerationConfig(max_new_tokens=K), num_candidates=5)
    finally:
        model.generation_config.do_sample, model.generation_config.num_candidates = True, 200
    assert seen == [(False, 9), (False, 5)]


def test_max_length_of_a_generation_config_counts_the_prompt(model):
    """As for a Llama: a `max_length` set in a generation config (passed or the model's) includes the prompt; only
    transformers' own default (20) counts new tokens, with its warning, and is clamped to the context."""
    assert model.generate(prompt(5), generation_config=GenerationConfig(max_length=12)).shape == (1, 12)
    model.generation_config.max_length = 12
    try:
        assert model.generate(prompt(5)).shape == (1, 12)
    finally:
        model.generation_config.max_length = None
    with pytest.warns(UserWarning, match="model-agnostic default `max_length`"):
        assert model.generate(prompt(5)).shape == (1, 25)
    long_prompt = prompt(model.config.max_tokens - 3)
    with pytest.warns(UserWarning, match="model-agnostic default"):
        out = model.generate(long_prompt)
    assert out.shape[1] <= model.config.max_tokens


def test_left_padding_is_inferred_from_the_pad_id_without_a_mask(model):
    """As transformers does when no attention_mask is given: leading pad ids are padding."""
    ids = prompt(4, seed=5)
    ids[ids == 0] = 1
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids], dim=1)  # pad id 0
    kwargs = {"max_new_tokens": 2 * K, "eos_token_id": None}
    inferred = model.generate(padded, generator=seeded(3), **kwargs)
    masked = model.generate(padded, attention_mask=(padded != 0).long(), generator=seeded(3), **kwargs)
    assert torch.equal(inferred, masked)


def test_a_cache_that_is_not_a_cache_is_rejected(model):
    with pytest.raises(ValueError, match="must be a transformers Cache"):
        model.generate(prompt(3), max_new_tokens=K, past_key_values=object())


def test_generation_config_defaults_leave_top_k_unset():
    """transformers fills unset fields with its defaults, top_k=50 among them: CALM's defaults leave top_k unset, so
    that only a top_k someone asked for is rejected."""
    assert CalmGenerationConfig._get_default_generation_params()["top_k"] is None
    assert CalmGenerationConfig().unsupported_options() == {}


def test_exact_temperature_says_when_rows_fall_back(model):
    """A row that reaches max_draws without accepting takes the batch approximation: a warning says how many rows,
    after how many draws, and what to do."""
    with pytest.warns(UserWarning, match=r"rows drew max_draws = 2 head samples.*Raise max_draws"):
        model.generate(prompt(3).expand(4, -1), max_new_tokens=K, temperature=0.2, exact_temperature=True, max_draws=2)
