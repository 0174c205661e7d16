"""Tests of `CalmForCausalLM.generate`: K tokens per backbone step through the KV cache, prompts of any length with
left padding, EOS / pad / stopping criteria / streamers / num_return_sequences / return_dict_in_generate, the
temperature samplers behind it, and rows that do not depend on the other rows of their batch.

Tiny models built here (CPU, offline). The head's last layer starts at zero (every sample would be the same
latent), and its other layers at std 0.02, which makes its output all but independent of the backbone state; the
head is re-initialised with weights of std gain / sqrt(fan_in) so that generation is random AND depends on the
context (the batch-independence and KV-cache tests would be vacuous otherwise). The vocabulary is small so that
outcomes repeat."""

import math
import threading

import pytest
import torch
from factories import scale_head, tiny_calm
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import (
    GenerationConfig,
    MaxLengthCriteria,
    PreTrainedTokenizerFast,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
    TextStreamer,
)
from transformers.generation.streamers import BaseStreamer

from transformers_calm import CalmForCausalLM, candidate_decoding, sampling
from transformers_calm.compat import CACHE_NAME

K = 3  # tokens per chunk; deliberately not a power of two
VOCAB = 16
PAD = 0


def tiny_lm(seed: int = 0, vocab_size: int = VOCAB, patch_size: int = K, head_gain: float = 2.0) -> CalmForCausalLM:
    autoencoder = {
        "vocab_size": vocab_size,
        "patch_size": patch_size,
        "latent_size": 4,
        "hidden_size": 16,
        "intermediate_size": 24,
        "pad_token_id": PAD,
    }
    return scale_head(tiny_calm(seed, autoencoder=autoencoder, random_head=False), head_gain)


@pytest.fixture(scope="module")
def model() -> CalmForCausalLM:
    return tiny_lm()


def test_tiny_model_is_random_and_context_dependent(model):
    """Precondition of the tests below: with fixed noise, different contexts give different chunks; with fixed
    context, different noise does."""
    contexts = torch.randint(1, VOCAB, (40, 2 * K), generator=seeded(0))
    hidden = model.model(input_ids=contexts).last_hidden_state[:, -1]
    noise = torch.rand(model.config.noise_size, generator=seeded(1)) - 0.5
    by_context = model.decode_latents(model.generative_head(hidden, noise=noise.expand(40, -1)))
    assert len(by_context.unique(dim=0)) >= 5
    by_noise = model.decode_latents(model.generative_head(hidden[:1].expand(40, -1), generator=seeded(2)))
    assert len(by_noise.unique(dim=0)) >= 5


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def prompt(length: int, seed: int = 0, batch: int = 1) -> torch.LongTensor:
    return torch.randint(1, VOCAB, (batch, length), generator=seeded(seed))


def left_pad(prompts: list[torch.LongTensor], pad_value: int = PAD) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Left-pad 1-D prompts to a batch, with its attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_value, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    return ids, mask


def constant_noise(monkeypatch, model):
    """Make the head deterministic: the same noise vector for every sample, so that a row's continuation is a
    function of its own prompt only."""
    vector = torch.rand(model.config.noise_size, generator=seeded(99)) - 0.5

    def sample_noise(hidden_states, generator=None):
        return vector.to(hidden_states.dtype).expand(*hidden_states.shape[:-1], -1)

    monkeypatch.setattr(model.generative_head, "sample_noise", sample_noise)


def count_backbone_calls(monkeypatch, model) -> list[dict]:
    calls = []
    original = model.model.forward

    def forward(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(model.model, "forward", forward)
    return calls


def two_sample_chi_square_pvalue(a: torch.Tensor, b: torch.Tensor, min_count: int = 10) -> float:
    """Homogeneity of two samples of category ids (contingency table 2 x C); categories whose pooled count is below
    `min_count` are merged into one."""
    categories = torch.cat([a, b]).unique()
    table = torch.stack([(a.unsqueeze(1) == categories).sum(0), (b.unsqueeze(1) == categories).sum(0)]).double()
    rare = table.sum(0) < min_count
    if rare.any():
        table = torch.cat([table[:, ~rare], table[:, rare].sum(1, keepdim=True)], dim=1)
    table = table[:, table.sum(0) > 0]
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    stat = ((table - expected) ** 2 / expected).sum()
    df = table.shape[1] - 1
    assert df >= 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def chunk_ids(chunks: torch.LongTensor, vocab_size: int) -> torch.LongTensor:
    """One category id per K-token chunk `(B, K)`."""
    weights = vocab_size ** torch.arange(chunks.shape[-1] - 1, -1, -1)
    return (chunks * weights).sum(-1)


# ----------------------------------------------------------------------------------------------- lengths


@pytest.mark.parametrize("prompt_length", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 4, 7, 9])
def test_output_is_prompt_plus_max_new_tokens(model, prompt_length, max_new_tokens):
    ids = prompt(prompt_length, seed=prompt_length, batch=2)
    out = model.generate(ids, max_new_tokens=max_new_tokens)
    assert out.shape == (2, prompt_length + max_new_tokens)
    assert out.dtype == torch.long
    assert torch.equal(out[:, :prompt_length], ids)
    assert ((out >= 0) & (out < VOCAB)).all()


def test_max_length_form_and_precedence(model):
    ids = prompt(5)
    assert model.generate(ids, max_length=12).shape == (1, 12)  # 7 new tokens, not a multiple of K
    assert model.generate(ids, max_length=12, max_new_tokens=4).shape == (1, 9)  # max_new_tokens wins
    assert model.generate(ids, generation_config=GenerationConfig(max_new_tokens=2)).shape == (1, 7)
    with pytest.warns(UserWarning, match="model-agnostic default"):  # as for any causal LM
        default = model.generate(ids)  # transformers' default: 20 new tokens
    assert default.shape == (1, 5 + GenerationConfig._get_default_generation_params()["max_length"])


def test_model_generation_config_is_the_default(model):
    ids = prompt(4)
    saved = model.generation_config.max_new_tokens
    model.generation_config.max_new_tokens = 5
    try:
        assert model.generate(ids).shape == (1, 9)
    finally:
        model.generation_config.max_new_tokens = saved


def test_explicit_generation_config_inherits_model_defaults(monkeypatch):
    """As in transformers 5 (`GenerationMixin._prepare_generation_config`), fields that a passed GenerationConfig
    leaves unset come from `model.generation_config` (e.g. read from generation_config.json), CALM's own
    num_candidates included; fields it sets win."""
    model = tiny_lm()
    model.generation_config.temperature = 0.5
    model.generation_config.num_candidates = 17
    seen = []
    original = sampling._temperature_pick

    def spy(counts, temperature, generator=None):
        seen.append((counts.shape[1], temperature))
        return original(counts, temperature, generator)

    monkeypatch.setattr(sampling, "_temperature_pick", spy)
    model.generate(prompt(3), generation_config=GenerationConfig(max_new_tokens=K))
    assert seen == [(17, 0.5)]
    seen.clear()
    model.generate(prompt(3), generation_config=GenerationConfig(max_new_tokens=K, temperature=1 / 3))
    assert seen == [(17, 1 / 3)]


@pytest.mark.parametrize("kwargs", [{"max_length": 5}, {"max_length": 3}, {"max_new_tokens": 0}])
def test_nothing_to_generate_raises(model, kwargs):
    with pytest.raises(ValueError, match="Nothing to generate|max_new_tokens"):
        model.generate(prompt(5), **kwargs)


def test_unknown_generate_argument_raises(model):
    with pytest.raises(ValueError, match="unknown"):
        model.generate(prompt(3), max_new_tokens=3, not_a_generation_flag=1)


# ----------------------------------------------------------------------------------------------- padding


def record_hidden_states(monkeypatch, model) -> list[torch.Tensor]:
    """Record the backbone state each `sample_next_chunk` call receives."""
    seen = []
    original = model.sample_next_chunk

    def sample_next_chunk(hidden_states, **kwargs):
        seen.append(hidden_states.clone())
        return original(hidden_states, **kwargs)

    monkeypatch.setattr(model, "sample_next_chunk", sample_next_chunk)
    return seen


def test_partial_first_chunk_is_left_padded_and_masked(model, monkeypatch):
    """A 5-token prompt (K = 3) is left-padded to 6: the prefill sees one masked position first, and the result is
    exactly that of the same prompt padded explicitly, whatever the id under the mask or the pad_token_id (the
    model's pad id 0 has a zero embedding row anyway, so id 9 under the mask is the informative case)."""
    ids = prompt(5, seed=1)
    calls = count_backbone_calls(monkeypatch, model)
    hidden = record_hidden_states(monkeypatch, model)
    out = model.generate(ids, max_new_tokens=6, generator=seeded(0))
    prefill = calls[0]
    assert prefill["input_ids"].shape == (1, 6)
    assert torch.equal(prefill["input_ids"][:, 1:], ids)
    assert prefill["attention_mask"][0].tolist() == [0, 1, 1, 1, 1, 1]
    reference_hidden = [h.clone() for h in hidden]

    hidden.clear()
    other_pad = model.generate(ids, max_new_tokens=6, generator=seeded(0), pad_token_id=7)
    assert calls[-2]["input_ids"][0, 0] == 0  # the fill is id 0, whatever pad_token_id is ...
    assert torch.equal(other_pad, out)
    assert all(torch.equal(a, b) for a, b in zip(hidden, reference_hidden, strict=True))  # ... and is invisible
    for filler in (PAD, 9):
        hidden.clear()
        explicit = torch.cat([torch.tensor([[filler]]), ids], dim=1)
        mask = torch.tensor([[0, 1, 1, 1, 1, 1]])
        got = model.generate(explicit, attention_mask=mask, max_new_tokens=6, generator=seeded(0))
        assert torch.equal(got[:, 1:], out), f"the masked id {filler} changed the continuation"
        assert got[0, 0] == filler
        assert all(torch.equal(a, b) for a, b in zip(hidden, reference_hidden, strict=True))


def test_masked_prompt_tokens_contribute_zero_embeddings(model, monkeypatch):
    """Masked positions of a partly real chunk have a zero input embedding (not just no attention), for the fill
    that generate adds and for explicit left padding alike, whatever their ids."""
    seen = []
    original = model.model.embed_proj.forward

    def embed_proj(x):
        seen.append(x.detach().clone())
        return original(x)

    monkeypatch.setattr(model.model.embed_proj, "forward", embed_proj)
    ids = prompt(4, seed=2)  # K = 3: two fill positions, then 4 real tokens
    model.generate(ids, max_new_tokens=1, pad_token_id=7)
    first_chunk = seen[0][0, 0].view(K, -1)  # the concatenated K token embeddings of the first chunk
    assert (first_chunk[:2] == 0).all()
    assert (first_chunk[2] != 0).any()
    seen.clear()
    explicit, mask = torch.cat([torch.tensor([[9, 8, 9, 5]]), ids], dim=1), torch.tensor([[0] * 4 + [1] * 4])
    model.generate(explicit, attention_mask=mask, max_new_tokens=1)  # 8 tokens: one fill, then 4 masked ids
    chunks = seen[0][0].view(-1, K, model.config.hidden_size)
    assert (chunks[0] == 0).all() and (chunks[1][:2] == 0).all()
    assert (chunks[1][2] != 0).any()


def test_batched_left_padding_equals_one_by_one(model, monkeypatch):
    """With deterministic head noise, every row of a left-padded batch continues exactly as it does alone, over
    several steps, and the output is the prompt as given followed by the continuation (no pad in between)."""
    constant_noise(monkeypatch, model)
    prompts = [prompt(2, seed=3)[0], prompt(8, seed=4)[0], prompt(5, seed=5)[0], prompt(1, seed=6)[0]]
    ids, mask = left_pad(prompts)
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=8)
    assert torch.equal(batched[:, : ids.shape[1]], ids)
    for row, p in enumerate(prompts):
        alone = model.generate(p.unsqueeze(0), max_new_tokens=8)
        assert torch.equal(alone[0, len(p) :], batched[row, ids.shape[1] :]), f"row {row} depends on its batch"
    # The head is deterministic here, so do_sample=False (mode of identical candidates) gives the same.
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False), batched)


@pytest.mark.parametrize(
    "mask",
    [
        [[1, 1, 1, 0]],  # right padding
        [[0, 1, 0, 1]],  # a hole: pads between prompt tokens
        [[0, 0, 0, 0]],  # no prompt token at all
    ],
)
def test_bad_attention_masks_raise(model, mask):
    with pytest.raises(ValueError, match="padding|at least one token"):
        model.generate(prompt(4), attention_mask=torch.tensor(mask), max_new_tokens=3)


def test_right_padding_message(model):
    with pytest.raises(ValueError, match="left"):
        model.generate(prompt(4), attention_mask=torch.tensor([[1, 1, 1, 0]]), max_new_tokens=3)


def test_attention_mask_shape_must_match(model):
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(prompt(4), attention_mask=torch.ones(1, 5, dtype=torch.long), max_new_tokens=3)


# ----------------------------------------------------------------------------------------------- EOS and pad


def find_eos_case(model, ids, mask, max_new_tokens):
    """A seed and a token that row 0 generates inside a chunk (not at its end, and before the last chunk) while
    the other rows never generate it."""
    width = ids.shape[1]
    for seed in range(50):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, generator=seeded(seed))
        new = out[:, width:]
        for token in range(1, VOCAB):
            positions = (new[0] == token).nonzero().flatten().tolist()
            if not positions or (new[1:] == token).any():
                continue
            first = positions[0]
            if first % K < K - 1 and first < max_new_tokens - K:
                return seed, token, first, out
    raise AssertionError("no suitable EOS token found")


def test_eos_inside_a_chunk_stops_only_its_row(model):
    ids, mask = left_pad([prompt(6, seed=7)[0], prompt(4, seed=8)[0]])
    width, max_new = ids.shape[1], 4 * K
    seed, eos, first, reference = find_eos_case(model, ids, mask, max_new)
    pad = VOCAB - 1  # a pad id of our own, to see it in place
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=max_new, generator=seeded(seed), eos_token_id=eos, pad_token_id=pad
    )
    assert out.shape == reference.shape  # row 1 runs to max_new_tokens
    expected_row0 = reference[0].clone()
    expected_row0[width + first + 1 :] = pad  # the rest of the EOS chunk and every later chunk
    assert torch.equal(out[0], expected_row0)
    assert out[0, width + first] == eos
    # Row 1 never met the EOS: it is exactly the run without EOS (the finished row does not disturb it).
    assert torch.equal(out[1], reference[1])
    # eos_token_id as a list (one id never generated) behaves the same.
    listed = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=max_new,
        generator=seeded(seed),
        eos_token_id=[VOCAB + 5, eos],
        pad_token_id=pad,
    )
    assert torch.equal(listed, out)


def test_generation_ends_when_every_row_has_finished(model, monkeypatch):
    ids = prompt(6, seed=7)
    mask = torch.ones_like(ids)
    width, max_new = ids.shape[1], 4 * K
    seed, eos, first, reference = find_eos_case(model, ids, mask, max_new)
    calls = count_backbone_calls(monkeypatch, model)
    out = model.generate(ids, max_new_tokens=max_new, generator=seeded(seed), eos_token_id=eos)
    chunks = first // K + 1
    # As a token-level model: the sequence ends at the EOS, even in the middle of a chunk.
    assert out.shape == (1, width + first + 1)
    assert torch.equal(out[0], reference[0, : width + first + 1])
    assert len(calls) == chunks  # prefill + one step per further chunk, none after the EOS chunk


def test_pad_defaults_to_eos_when_the_model_has_none():
    model = tiny_lm()
    model.config.pad_token_id = None  # the autoencoder's, which the config reads
    assert model.config.autoencoder_config.pad_token_id is None
    model.generation_config.pad_token_id = None
    ids, mask = left_pad([prompt(6, seed=7)[0], prompt(4, seed=8)[0]])
    seed, eos, first, _ = find_eos_case(model, ids, mask, 4 * K)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4 * K, generator=seeded(seed), eos_token_id=eos)
    assert (out[0, ids.shape[1] + first :] == eos).all()


def test_stopping_criteria_without_eos_do_not_pad():
    """As transformers' sampling loop: without an EOS, rows stopped by a criterion are not padded; they keep their
    samples until the last row stops."""
    model = tiny_lm()
    model.config.pad_token_id = None
    model.generation_config.pad_token_id = None
    ids, mask = left_pad([prompt(5, seed=11)[0], prompt(3, seed=12)[0]])
    width = ids.shape[1]
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=4 * K, generator=seeded(4))
    criteria = StoppingCriteriaList([StopAfterNewTokens(width, [1, K + 1])])
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=4 * K, generator=seeded(4), stopping_criteria=criteria
    )
    assert torch.equal(out, reference[:, : width + K + 1])


# ----------------------------------------------------------------------------------------------- outputs


def test_num_return_sequences(model):
    ids, mask = left_pad([prompt(4, seed=9)[0], prompt(6, seed=10)[0]])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_return_sequences=3, generator=seeded(2))
    assert out.shape == (6, ids.shape[1] + 6)
    assert torch.equal(out[:3, : ids.shape[1]], ids[:1].expand(3, -1))
    assert torch.equal(out[3:, : ids.shape[1]], ids[1:].expand(3, -1))
    assert len({tuple(row) for row in out[:3, ids.shape[1] :].tolist()}) > 1, "the returned sequences are copies"


def test_return_dict_in_generate(model):
    ids = prompt(4)
    plain = model.generate(ids, max_new_tokens=5, generator=seeded(3))
    out = model.generate(ids, max_new_tokens=5, generator=seeded(3), return_dict_in_generate=True)
    assert torch.equal(out.sequences, plain)
    cache = getattr(out, CACHE_NAME)  # transformers' GenerateDecoderOnlyOutput: `cache` from 5.24 on
    assert cache is not None
    assert cache.get_seq_length() == math.ceil(4 / K) + math.ceil(5 / K) - 1


class StopAfterNewTokens(StoppingCriteria):
    """Stops row b once it has `limits[b]` new tokens."""

    def __init__(self, prompt_length: int, limits: list[int]):
        self.prompt_length = prompt_length
        self.limits = torch.tensor(limits)
        self.seen_scores = []

    def __call__(self, input_ids, scores, **kwargs):
        self.seen_scores.append(scores)
        return (input_ids.shape[1] - self.prompt_length) >= self.limits


def test_stopping_criteria_stop_rows_separately(model):
    ids, mask = left_pad([prompt(5, seed=11)[0], prompt(3, seed=12)[0]])
    width = ids.shape[1]
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=6 * K, generator=seeded(4))
    criterion = StopAfterNewTokens(width, [K, 2 * K + 1])
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=6 * K,
        generator=seeded(4),
        stopping_criteria=StoppingCriteriaList([criterion]),
    )
    # Row 1 needs 2K + 1 new tokens: generation ends right there, inside the third chunk. Without an EOS the model
    # does not pad finished rows (as transformers' loop): row 0 keeps its samples.
    assert out.shape == (2, width + 2 * K + 1)
    assert torch.equal(out, reference[:, : width + 2 * K + 1])
    # The criteria see every new token, with no scores.
    assert len(criterion.seen_scores) == 2 * K + 1 and all(s is None for s in criterion.seen_scores)


def test_transformers_max_length_criteria(model):
    ids = prompt(4)
    criteria = StoppingCriteriaList([MaxLengthCriteria(max_length=4 + 2 * K)])
    out = model.generate(ids, max_new_tokens=6 * K, stopping_criteria=criteria)
    assert out.shape == (1, 4 + 2 * K)


# ----------------------------------------------------------------------------------------------- streamers


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(VOCAB)}
    backend = Tokenizer(WordLevel(vocab, unk_token="w1"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="w0")


class RecordingStreamer(BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended += 1


@pytest.mark.parametrize("max_new_tokens", [3 * K, 3 * K - 1, 1])
def test_streamer_receives_prompt_then_chunks(model, max_new_tokens):
    ids = prompt(5, seed=13)
    streamer = RecordingStreamer()
    out = model.generate(ids, max_new_tokens=max_new_tokens, streamer=streamer, generator=seeded(5))
    assert streamer.ended == 1
    assert torch.equal(streamer.puts[0].reshape(1, -1), ids)
    chunks = streamer.puts[1:]
    assert len(chunks) == math.ceil(max_new_tokens / K)
    assert all(c.numel() == K for c in chunks[:-1])
    assert chunks[-1].numel() == max_new_tokens - K * (len(chunks) - 1)
    assert torch.equal(torch.cat([c.reshape(-1) for c in chunks]), out[0, 5:])


def test_text_streamer_prints_the_generated_text(model, tokenizer, capsys):
    ids = prompt(4, seed=14)
    streamer = TextStreamer(tokenizer, skip_prompt=True)
    out = model.generate(ids, max_new_tokens=3 * K - 1, streamer=streamer, generator=seeded(6))
    printed = capsys.readouterr().out
    assert printed == tokenizer.decode(out[0, 4:]) + "\n"

    streamer = TextStreamer(tokenizer)  # with the prompt
    out = model.generate(ids, max_new_tokens=2 * K, streamer=streamer, generator=seeded(7))
    assert capsys.readouterr().out == tokenizer.decode(out[0]) + "\n"


def test_text_iterator_streamer_in_a_thread(model, tokenizer):
    ids = prompt(4, seed=15)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=60)
    result = {}

    def run():
        result["out"] = model.generate(ids, max_new_tokens=4 * K, streamer=streamer, generator=seeded(8))

    thread = threading.Thread(target=run)
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert "".join(pieces) == tokenizer.decode(result["out"][0, 4:])
    assert len([p for p in pieces if p]) >= 2  # text arrived in several pieces, not all at the end


def test_streamer_needs_batch_size_one(model):
    with pytest.raises(ValueError, match="batch size 1"):
        model.generate(prompt(3, batch=2), max_new_tokens=3, streamer=RecordingStreamer())
    with pytest.raises(ValueError, match="batch size 1"):
        model.generate(prompt(3), max_new_tokens=3, num_return_sequences=2, streamer=RecordingStreamer())


# ----------------------------------------------------------------------------------------------- sampling settings


@pytest.mark.parametrize("temperature", [0, 0.0, -0.5, 1.5, 2])
def test_bad_temperature_raises(model, temperature):
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt(3), max_new_tokens=3, temperature=temperature)


def test_temperature_one_draws_one_sample_per_row(model, monkeypatch):
    """T = 1 (the default) decodes a single head sample per row: no sampler is involved."""
    used = []
    for module, name in (
        (sampling, "_temperature_pick"),
        (sampling, "exact_temperature_sample"),
        (candidate_decoding, "candidate_counts"),
        (candidate_decoding, "prefix_candidate_counts"),
    ):
        monkeypatch.setattr(module, name, lambda *a, _name=name, **k: used.append(_name))
    sizes = []
    original = model.generative_head.forward

    def head(hidden_states, *args, **kwargs):
        latents = original(hidden_states, *args, **kwargs)
        sizes.append(latents.shape[0])  # (samples per row, batch, latent)
        return latents

    monkeypatch.setattr(model.generative_head, "forward", head)
    out = model.generate(prompt(3, batch=2), max_new_tokens=2 * K)
    assert out.shape == (2, 3 + 2 * K)
    assert used == [] and sizes == [1, 1]


def test_batch_approximation_uses_num_candidates(model, monkeypatch):
    seen = []
    original = sampling._temperature_pick

    def spy(counts, temperature, generator=None):
        seen.append((counts.shape, temperature))
        return original(counts, temperature, generator)

    monkeypatch.setattr(sampling, "_temperature_pick", spy)
    out = model.generate(prompt(4, batch=3), max_new_tokens=2 * K, temperature=0.5, num_candidates=17)
    assert out.shape == (3, 4 + 2 * K)
    assert seen == [(torch.Size([3, 17]), 0.5)] * 2


def test_exact_temperature_switch(model, monkeypatch):
    seen = []
    original = sampling.exact_temperature_sample

    def spy(draw, temperature, generator=None, max_draws=10_000):
        result = original(draw, temperature, generator=generator, max_draws=max_draws)
        seen.append((temperature, max_draws, result))
        return result

    monkeypatch.setattr(sampling, "exact_temperature_sample", spy)
    ids = prompt(4, batch=2)
    out = model.generate(
        ids, max_new_tokens=2 * K, temperature=0.45, exact_temperature=True, max_draws=500, generator=seeded(9)
    )
    assert out.shape == (2, 4 + 2 * K)
    assert [(t, m) for t, m, _ in seen] == [(0.45, 500)] * 2
    for _, _, result in seen:
        assert result.samples.shape == (2, K) and (result.num_draws >= 3).all()  # 1/T = 2.22: n = 2, plus the factory
    assert torch.equal(out[:, 4 : 4 + K], seen[0][2].samples)
    again = model.generate(
        ids, max_new_tokens=2 * K, temperature=0.45, exact_temperature=True, max_draws=500, generator=seeded(9)
    )
    assert torch.equal(again, out)


def test_do_sample_false_is_deterministic_given_the_global_seed(model, monkeypatch):
    ids, mask = left_pad([prompt(4, seed=16)[0], prompt(2, seed=17)[0]])
    used = []
    original = model.decode_chosen_candidates
    monkeypatch.setattr(model, "decode_chosen_candidates", lambda z, f: used.append(z.shape[:2]) or original(z, f))
    torch.manual_seed(123)
    first = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, num_candidates=50)
    torch.manual_seed(123)
    second = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, num_candidates=50)
    assert torch.equal(first, second)
    assert used == [torch.Size([50, 2])] * 4  # two runs of two steps each


def test_generator_makes_sampling_reproducible(model):
    ids = prompt(4, batch=2)
    for kwargs in ({}, {"temperature": 0.5, "num_candidates": 20}):
        a = model.generate(ids, max_new_tokens=6, generator=seeded(10), **kwargs)
        b = model.generate(ids, max_new_tokens=6, generator=seeded(10), **kwargs)
        c = model.generate(ids, max_new_tokens=6, generator=seeded(11), **kwargs)
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


# ----------------------------------------------------------------------------------------------- KV cache


def test_one_backbone_step_per_chunk(model, monkeypatch):
    calls = count_backbone_calls(monkeypatch, model)
    ids, mask = left_pad([prompt(4, seed=18)[0], prompt(7, seed=19)[0]])
    max_new = 4 * K - 1
    model.generate(ids, attention_mask=mask, max_new_tokens=max_new)
    steps = math.ceil(max_new / K)
    assert len(calls) == 1 + (steps - 1)
    prefill, later = calls[0], calls[1:]
    assert prefill["input_ids"].shape == (2, 9)
    assert prefill["cache"].get_seq_length() == 9 // K + steps - 1  # every chunk but the last went in
    for i, call in enumerate(later):
        assert call["input_ids"].shape == (2, K)
        assert call["cache"] is prefill["cache"]  # one cache, grown a chunk per step
        assert call["attention_mask"].shape == (2, 9 + (i + 1) * K)


def reference_generate(model, input_ids, attention_mask, max_new_tokens, generator, **sampler):
    """generate without a cache: a full forward over the whole (padded) sequence at every step, then the same
    sampler on the last hidden state."""
    fill = (-input_ids.shape[1]) % K
    ids = torch.nn.functional.pad(input_ids, (fill, 0), value=PAD)
    mask = torch.nn.functional.pad(attention_mask, (fill, 0), value=0)
    new = []
    for _ in range(math.ceil(max_new_tokens / K)):
        hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        chunk = model.sample_next_chunk(hidden[:, -1], generator=generator, **sampler)
        new.append(chunk)
        ids = torch.cat([ids, chunk], dim=1)
        mask = torch.cat([mask, torch.ones_like(chunk)], dim=1)
    return torch.cat([input_ids, torch.cat(new, dim=1)[:, :max_new_tokens]], dim=1)


@pytest.mark.parametrize(
    "sampler",
    [
        {},
        {"temperature": 0.5, "num_candidates": 20},
        {"temperature": 0.45, "num_candidates": 20},
        {"do_sample": False, "num_candidates": 20},
        {"temperature": 0.5, "exact_temperature": True, "max_draws": 300},
    ],
    ids=["T=1", "batch-T=1/2", "batch-T=0.45", "mode", "exact-T=1/2"],
)
def test_incremental_generation_equals_full_forward_reference(model, sampler):
    ids, mask = left_pad([prompt(5, seed=20)[0], prompt(2, seed=21)[0], prompt(7, seed=22)[0]])
    max_new = 5 * K - 1
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, generator=seeded(12), **sampler)
    expected = reference_generate(model, ids, mask, max_new, seeded(12), **sampler)
    assert torch.equal(out, expected)


# ----------------------------------------------------------------------------------------------- batch independence


def test_row_distribution_does_not_depend_on_its_batch():
    """First new chunk of prompt A: 2000 samples with A alone vs 2000 with A left-padded in a batch with a longer
    prompt B. A two-sample chi-square test finds no difference, and the same test does tell A from B."""
    vocab = 6
    model = tiny_lm(seed=1, vocab_size=vocab, patch_size=2)
    a = torch.tensor([3, 1, 4])  # 3 tokens, K = 2: a partial first chunk
    b = torch.tensor([5, 2, 2, 1, 5, 4, 2])
    samples = 2000
    torch.manual_seed(0)
    alone = model.generate(a.unsqueeze(0), max_new_tokens=2, num_return_sequences=samples)[:, -2:]
    ids, mask = left_pad([a, b])
    both = model.generate(ids, attention_mask=mask, max_new_tokens=2, num_return_sequences=samples)
    batched_a, batched_b = both[:samples, -2:], both[samples:, -2:]

    alone_ids, batched_ids, b_ids = (chunk_ids(x, vocab) for x in (alone, batched_a, batched_b))
    assert len(alone_ids.unique()) > 5, "the model is too concentrated for a meaningful test"
    assert two_sample_chi_square_pvalue(alone_ids, batched_ids) > 1e-3
    assert two_sample_chi_square_pvalue(alone_ids, b_ids) < 1e-6  # power: A and B are told apart
