"""The decoder's argmax through a bfloat16 screen (`screened_argmax`), and the lazy reading of candidates' tokens
(`sampling.prefix_candidate_counts`, `CalmForCausalLM.decode_chosen_candidates`): both must give exactly what the
plain float32 decoding gives."""

import copy
import pickle

import pytest
import torch
from test_generate import seeded, tiny_lm
from transformers import CompileConfig

from transformers_calm import sampling, screened_argmax
from transformers_calm.screened_argmax import BF16_UNIT_ROUNDOFF, FP32_UNIT_ROUNDOFF, ScreenedArgmax


@pytest.fixture(autouse=True)
def bf16_everywhere(monkeypatch):
    """The screen runs on any CPU (only its speed needs bfloat16 instructions): use it in every test here."""
    monkeypatch.setattr(screened_argmax, "bf16_matmul_is_fast", lambda: True)


def dense_argmax(states, weight):
    return (states @ weight.T).argmax(-1)


def assert_float32_argmax(token_ids, states, weight):
    """Each row's token is the float32 product's argmax; where another token's exact score lies within float32
    rounding of the best (which the float32 product may order either way), any of those."""
    exact = states.double() @ weight.double().T
    d = states.shape[-1]
    rounding = 2 * d * FP32_UNIT_ROUNDOFF * states.double().norm(dim=-1, keepdim=True) * weight.double().norm(dim=-1)
    possible = exact >= (exact - rounding).max(-1, keepdim=True).values
    assert possible.gather(1, token_ids[:, None]).all()
    clear = possible.sum(-1) == 1
    assert torch.equal(token_ids[clear], dense_argmax(states, weight)[clear])


def random_case(rows, vocab, width, seed, norm_spread=0.0):
    g = torch.Generator().manual_seed(seed)
    states = torch.nn.functional.rms_norm(torch.randn(rows, width, generator=g), (width,))
    weight = torch.randn(vocab, width, generator=g) * 0.02
    if norm_spread:  # token vectors of very different lengths, as in trained output layers
        weight = weight * torch.exp(norm_spread * torch.randn(vocab, 1, generator=g))
    return states, weight


@pytest.mark.parametrize(
    ("rows", "vocab", "width", "norm_spread"),
    [(1, 5000, 64, 0), (7, 300, 16, 0), (300, 5000, 64, 0), (200, 2000, 32, 1.0)],
)
def test_screen_equals_the_float32_argmax(rows, vocab, width, norm_spread):
    for seed in range(3):
        states, weight = random_case(rows, vocab, width, seed, norm_spread)
        assert_float32_argmax(ScreenedArgmax()(states, weight), states, weight)


def test_error_bound_holds():
    """Every bfloat16 score lies within the bound of its exact (float64) value: the bound the screen rests on."""
    screen = ScreenedArgmax()
    for seed in range(4):
        states, weight = random_case(64, 3000, 128, seed, norm_spread=0.5)
        weight_bf16, max_norm, max_rounding = screen._prepared(weight)
        states_bf16 = states.to(torch.bfloat16)
        scores = (states_bf16 @ weight_bf16.T).float()
        exact = states.double() @ weight.double().T
        # The bound on the unrounded bf16 score; the rounding to bf16 adds u |s|.
        bound = screen._errors(states, states_bf16, max_norm, max_rounding)[0][:, None]
        assert ((scores.double() - exact).abs() <= bound + BF16_UNIT_ROUNDOFF * scores.abs().double()).all()
        # ... and it is not vacuous: far smaller than the spread of the scores.
        assert (bound < 0.2 * exact.std(-1, keepdim=True)).all()


def test_near_ties_that_bfloat16_cannot_separate():
    """Tokens whose scores differ by ~1e-4 of their size (below bfloat16's resolution, above float32's): the
    float32 scores decide. With one candidate per row (`top_k=1`) almost no row is provable, so the second look and
    the float32 product are exercised too."""
    g = torch.Generator().manual_seed(0)
    width, vocab = 64, 400
    base = torch.randn(1, width, generator=g)
    weight = base + 1e-3 * torch.randn(vocab, width, generator=g)
    states = base + torch.randn(500, width, generator=g)
    assert len(dense_argmax(states, weight).unique()) > 10  # the winner really depends on the small differences
    for top_k in (1, 16):
        assert_float32_argmax(ScreenedArgmax(top_k=top_k)(states, weight), states, weight)


def test_exact_ties_give_the_smallest_token_id_as_torch_argmax():
    states, weight = random_case(50, 1000, 32, seed=3)
    best = dense_argmax(states, weight)
    # Copies of each row's winner at higher ids: more copies than top_k for some rows (then the second look decides).
    weight = torch.cat([weight, weight[best[:40]].repeat(20, 1)])
    screened = ScreenedArgmax(top_k=4)(states, weight)
    assert torch.equal(screened, dense_argmax(states, weight))
    assert torch.equal(screened, best)


def test_non_finite_rows_take_the_float32_product():
    states, weight = random_case(6, 500, 16, seed=4)
    states[2, 3] = float("nan")
    states[4, 0] = float("inf")
    assert torch.equal(ScreenedArgmax()(states, weight), dense_argmax(states, weight))


def test_bfloat16_copy_follows_the_weight():
    """The cached bfloat16 weight is rebuilt after an in-place update (an optimiser step, `load_state_dict`)."""
    states, weight = random_case(20, 800, 32, seed=5)
    screen = ScreenedArgmax()
    assert torch.equal(screen(states, weight), dense_argmax(states, weight))
    with torch.no_grad():
        weight.mul_(-1)  # every winner changes
    assert torch.equal(screen(states, weight), dense_argmax(states, weight))
    module = torch.nn.Linear(32, 800, bias=False)
    module.load_state_dict({"weight": weight * 0.5 + 0.01})
    assert torch.equal(screen(states, module.weight), dense_argmax(states, module.weight))
    screen(states, module.weight)
    with torch.no_grad():
        module.weight.copy_(weight)
    assert torch.equal(screen(states, module.weight), dense_argmax(states, weight))
    # Through .data the version counter stays: a wholesale change shows in the probed entries ...
    module.weight.data.mul_(-1)
    assert torch.equal(screen(states, module.weight), dense_argmax(states, module.weight))
    # ... a change of one row may not; reset() forgets the copy.
    row = int(dense_argmax(states, module.weight)[0])
    module.weight.data[row] *= -1
    screen.reset()
    assert torch.equal(screen(states, module.weight), dense_argmax(states, module.weight))


def test_probe_of_a_weight_past_float32_integers():
    """A 128k x 512 vocabulary has more than 2^24 entries, where float32 no longer counts every integer."""
    weight = torch.randn(8193, 2049)  # 16,787,457 > 2^24 = 16,777,216
    weight_bf16, _, _ = ScreenedArgmax()._prepared(weight)
    assert weight_bf16.shape == weight.shape


def test_weights_made_under_inference_mode():
    with torch.inference_mode():
        states, weight = random_case(20, 800, 32, seed=8)
        assert torch.equal(ScreenedArgmax()(states, weight), dense_argmax(states, weight))


def test_the_bfloat16_copy_is_not_pickled_or_moved():
    model = tiny_lm(vocab_size=300)
    decoder = model.autoencoder.decoder
    decoder.token_ids(torch.randn(2, 3, model.config.latent_size))
    assert decoder.screened_argmax._weight_bf16 is not None
    assert copy.deepcopy(decoder).screened_argmax._weight_bf16 is None
    assert pickle.loads(pickle.dumps(decoder.screened_argmax))._weight_bf16 is None
    decoder.to(torch.float64)
    assert decoder.screened_argmax._weight_bf16 is None


def test_where_the_screen_applies():
    screen = ScreenedArgmax()
    states, weight = random_case(4, 100, 16, seed=6)
    assert screen.applies(states, weight)
    assert not screen.applies(states.bfloat16(), weight.bfloat16())  # a bf16 model needs no screen
    assert not screen.applies(states, weight[:16])  # a vocabulary no larger than top_k
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the float32 scores would not be float32
        assert not screen.applies(states, weight)
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert not screen.applies(states, weight)
    finally:
        torch.set_float32_matmul_precision(precision)


def test_decoder_argmax_equals_its_logits_argmax():
    """CalmDecoder.token_ids (through the screen where it applies) == forward(latents).argmax(-1)."""
    model = tiny_lm(vocab_size=300, head_gain=2.0)
    decoder = model.autoencoder.decoder
    latents = torch.randn(5, 70, model.config.latent_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(decoder.token_ids(latents), decoder(latents).argmax(-1))


def test_position_states_are_the_token_states_of_one_position():
    model = tiny_lm(vocab_size=300)
    decoder = model.autoencoder.decoder
    latents = torch.randn(40, model.config.latent_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        every = decoder.token_states(latents[:, None])  # (40, K, hidden)
        chunk_states = decoder.chunk_states(latents)
        for k in range(model.config.patch_size):
            torch.testing.assert_close(decoder.position_states(chunk_states, k), every[:, k], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ reading candidates lazily


@pytest.mark.parametrize("vocab", [1, 2, 3, 50])
def test_prefix_counts_equal_the_counts_of_whole_chunks(vocab):
    g = torch.Generator().manual_seed(vocab)
    for _ in range(30):
        num, batch, K = (int(torch.randint(1, high, (1,), generator=g)) for high in (40, 4, 5))
        candidates = torch.randint(0, vocab, (num, batch, K), generator=g)
        flat = candidates.reshape(num * batch, K)
        reads = []

        def token_at(k, index, flat=flat, reads=reads):
            reads.append(len(index))
            return flat[index, k]

        counts, tokens = sampling.prefix_candidate_counts(token_at, num, batch, K)
        assert torch.equal(counts, sampling.candidate_counts(candidates))
        read = tokens >= 0
        assert torch.equal(tokens[read], candidates[read]) and sum(reads) == int(read.sum())
        assert read[..., 0].all()


def test_prefix_counts_read_one_token_of_candidates_that_differ_at_once():
    candidates = torch.arange(60).view(20, 3, 1).expand(20, 3, 4)  # every first token distinct
    flat = candidates.reshape(60, 4)
    reads = []
    counts, _ = sampling.prefix_candidate_counts(lambda k, i: reads.append(len(i)) or flat[i, k], 20, 3, 4)
    assert reads == [60] and (counts == 1).all()


@pytest.mark.parametrize("choice", ["mode", "T=0.5", "T=1/3"])
def test_decode_chosen_candidates_equals_decoding_every_candidate(choice):
    """The lazy CPU path chooses and returns what decoding all N candidates and counting their chunks gives, with the
    same generator draws."""
    model = tiny_lm(vocab_size=40, head_gain=0.3)  # a small vocabulary and a narrow head: many equal chunks
    hidden = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    temperature = {"mode": None, "T=0.5": 0.5, "T=1/3": 1 / 3}[choice]

    def choose(generator):
        if temperature is None:
            return lambda counts: counts.argmax(-1)
        return lambda counts: sampling._temperature_pick(counts, temperature, generator)

    for seed in range(5):
        with torch.no_grad():
            latents = model.sample_latents(hidden, num_samples=64, generator=seeded(seed))
            chunks = model.decode_latents(latents)
            counts = sampling.candidate_counts(chunks)
            assert (counts > 1).any()  # ties to count
            expected = chunks[choose(seeded(100 + seed))(counts), torch.arange(3)]
            assert torch.equal(model.decode_chosen_candidates(latents, choose(seeded(100 + seed))), expected)


def test_a_row_is_provable_only_when_no_token_within_the_bound_was_left_out():
    """`_decide` on hand-made bf16 scores: the float32 winner's bf16 score pushed below the top k but kept inside the
    bound must make the row unprovable (the caller then looks further); far below, the top k decide."""
    states, weight = random_case(1, 200, 32, seed=7)
    exact = (states @ weight.T)[0]
    winner = int(exact.argmax())
    a, b = [int(i) for i in exact.topk(3).indices if int(i) != winner][:2]
    top = float(exact[winner])

    def decide(winner_score, floor):
        scores = torch.full_like(exact, top - 10)
        scores[a], scores[b], scores[winner] = top, top - 0.05, winner_score
        return ScreenedArgmax._decide(states, weight, scores.to(torch.bfloat16)[None], torch.tensor([floor]), 2)

    token, provable = decide(top - 0.2, floor=0.5)  # outside the top 2, inside the floor
    assert not provable.item()
    token, provable = decide(top - 0.2, floor=0.01)  # outside the floor: the row is decided among a and b
    assert provable.item() and token.item() in (a, b)
    token, provable = decide(top + 1, floor=0.5)  # the best, alone within the floor: the 2nd of the top 2 is below
    assert provable.item() and token.item() == winner
    token, provable = decide(top + 0.3, floor=0.5)  # the best, but a and b within the floor too: 3 tokens, k = 2
    assert not provable.item()


def test_the_chosen_candidates_unread_tokens_are_decoded():
    """A chosen candidate whose first token is unique has its later tokens decoded after the choice (the usual
    case: real chunks are nearly all distinct)."""
    model = tiny_lm(vocab_size=300, head_gain=3.0)
    hidden = torch.randn(4, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        latents = model.sample_latents(hidden, num_samples=30, generator=seeded(0))
        chunks = model.decode_latents(latents)
        counts = sampling.candidate_counts(chunks)
        pick = counts.argmin(-1)  # a candidate with count 1
        assert (counts.gather(1, pick[:, None]) == 1).all()
        assert torch.equal(
            model.decode_chosen_candidates(latents, lambda c: c.argmin(-1)), chunks[pick, torch.arange(4)]
        )


@pytest.mark.parametrize(("temperature", "do_sample"), [(0.5, True), (1 / 3, True), (0.7, True), (1.0, False)])
def test_sample_next_chunk_equals_the_algorithms_on_every_decoded_candidate(temperature, do_sample):
    """sample_next_chunk (lazy reading) == the paper's algorithms applied to all N decoded candidates, with the same
    generator: the same draws, the same choice."""
    model = tiny_lm(vocab_size=60, head_gain=0.5)
    hidden = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    for seed in range(4):
        with torch.no_grad():
            got = model.sample_next_chunk(
                hidden, temperature=temperature, do_sample=do_sample, num_candidates=50, generator=seeded(seed)
            )
            generator = seeded(seed)
            candidates = model.sample_chunks(hidden, num_samples=50, generator=generator)
            if do_sample:
                expected = sampling.batch_temperature_sample(candidates, temperature, generator=generator)
            else:
                expected = sampling.mode_sample(candidates)
        assert torch.equal(got, expected)


def test_no_candidates_raises():
    model = tiny_lm(vocab_size=60)
    with pytest.raises(ValueError, match="N >= 1"):
        model.decode_chosen_candidates(torch.zeros(0, 2, model.config.latent_size), lambda c: c.argmax(-1))


@pytest.mark.slow  # compiles (the eager backend: seconds)
def test_a_whole_graph_step_decodes_every_candidate_in_the_graph():
    """With fullgraph=True the compiled step may not leave its graph: on CPU the T < 1 sampler then decodes every
    candidate inside it instead of reading tokens lazily (which breaks the graph)."""
    model = tiny_lm(vocab_size=60)
    config = CompileConfig(fullgraph=True, backend="eager")
    config._compile_all_devices = True
    torch.manual_seed(0)
    ids = torch.randint(1, 60, (2, 6))
    out = model.generate(
        ids, max_new_tokens=12, temperature=0.5, num_candidates=8, cache_implementation="static", compile_config=config
    )
    assert out.shape == (2, 18)
