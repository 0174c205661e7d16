"""Statistical tests of the likelihood-free temperature samplers (`transformers_calm.sampling`).

Toy categorical "models" with a known distribution P over a few K-tuples stand in for the energy head: `ToyDraw`
returns fresh samples of every row (`(num, batch, K)`), each row with its own P. The exact sampler (the paper's
Algorithm 1) must produce P^(1/T) normalised, for every T in (0, 1]; the batch approximation (Algorithm 2) must
follow the paper's counting rule and approach P^(1/T) as N grows. Goodness of fit is a chi-square test whose p-value
comes from `torch.special.gammaincc` (no scipy). Seeds are fixed, so every statistical test is deterministic; each
also has a power check showing that the same test rejects a wrong target.
"""

import math
from collections import Counter

import pytest
import torch

from transformers_calm.sampling import (
    _split_inverse_temperature,
    batch_temperature_sample,
    candidate_counts,
    check_temperature,
    exact_temperature_sample,
    mode_sample,
)

K = 2
# Three rows with different distributions over five different K-tuples each (symbols 0..3).
PROBS = torch.tensor(
    [
        [0.40, 0.30, 0.15, 0.10, 0.05],
        [0.05, 0.10, 0.20, 0.30, 0.35],
        [0.60, 0.25, 0.10, 0.04, 0.01],
    ],
    dtype=torch.float64,
)
OUTCOMES = torch.tensor(
    [
        [[0, 0], [0, 1], [1, 0], [2, 3], [3, 3]],
        [[1, 1], [3, 2], [0, 0], [2, 2], [1, 3]],
        [[3, 0], [0, 3], [2, 1], [1, 2], [0, 0]],
    ]
)
TEMPERATURES = [1.0, 1 / 2, 1 / 3, 0.7, 0.45]
P_THRESHOLD = 1e-3  # a fit is rejected below this p-value
POWER_THRESHOLD = 1e-6  # a wrong target must be rejected at least this strongly


# ------------------------------------------------------------------------------------------------------- helpers


def tempered(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    target = probs ** (1.0 / temperature)
    return target / target.sum(-1, keepdim=True)


class ToyDraw:
    """A seeded sampler of K-tuples: row b draws OUTCOMES[b, m] with probability probs[b, m].

    Supports the `draw(num, rows=...)` protocol and records every call as `(rows, draws (len(rows), num, K))`.
    """

    def __init__(self, probs: torch.Tensor, outcomes: torch.Tensor, seed: int = 0):
        self.probs, self.outcomes = probs, outcomes
        self.generator = torch.Generator().manual_seed(seed)
        self.calls = []

    @property
    def batch_size(self) -> int:
        return self.probs.shape[0]

    def __call__(self, num: int, rows: torch.Tensor | None = None) -> torch.LongTensor:
        rows = torch.arange(self.batch_size) if rows is None else rows
        index = torch.multinomial(self.probs[rows], num, replacement=True, generator=self.generator)
        draws = torch.gather(self.outcomes[rows], 1, index.unsqueeze(-1).expand(-1, -1, self.outcomes.shape[-1]))
        self.calls.append((rows.clone(), draws))
        return draws.transpose(0, 1)

    def row_draws(self, row: int) -> torch.Tensor:
        """Every draw handed to `row`, in order: `(total, K)`."""
        parts = [draws[(rows == row).nonzero().squeeze(1)].reshape(-1, draws.shape[-1]) for rows, draws in self.calls]
        return torch.cat(parts)

    def draws_given(self, row: int) -> list[int]:
        """Number of draws handed to `row` by each call (0 when it was not requested)."""
        return [int((rows == row).sum()) * draws.shape[1] for rows, draws in self.calls]


def replicated(num_copies: int, probs=PROBS, outcomes=OUTCOMES) -> tuple[torch.Tensor, torch.Tensor]:
    """Each base row repeated `num_copies` times (base row j -> rows j * num_copies ... (j + 1) * num_copies - 1)."""
    return probs.repeat_interleave(num_copies, 0), outcomes.repeat_interleave(num_copies, 0)


def outcome_index(samples: torch.Tensor, outcomes: torch.Tensor) -> torch.Tensor:
    """Index of each row's sample `(B, K)` among its outcomes `(B, M, K)`; fails on a sample outside the support."""
    match = (samples.unsqueeze(1) == outcomes).all(-1)
    assert (match.sum(-1) == 1).all(), "a sample is not one of its row's outcomes"
    return match.int().argmax(-1)


def chi_square_pvalue(observed: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Goodness of fit of counts `observed` to probabilities `probs`. Bins whose expected count is below
    `min_expected` are pooled (smallest first) so that the chi-square approximation holds."""
    observed = observed.double()
    expected = probs.double() / probs.double().sum() * observed.sum()
    order = torch.argsort(expected)
    expected, observed = expected[order], observed[order]
    pooled = int((expected.cumsum(0) < min_expected).sum()) + 1  # the smallest bins, pooled into one
    pooled = min(pooled, len(expected))
    if pooled > 1:
        expected = torch.cat([expected[:pooled].sum(0, keepdim=True), expected[pooled:]])
        observed = torch.cat([observed[:pooled].sum(0, keepdim=True), observed[pooled:]])
    df = len(expected) - 1
    assert df >= 1, "not enough bins for a chi-square test"
    stat = ((observed - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p.double() - q.double()).abs().sum())


def sampling_tolerance(probs: torch.Tensor, num_samples: int, sigmas: float = 4.0) -> float:
    """A bound on the total variation between an empirical distribution of `num_samples` draws and its source: the
    standard deviation of each frequency, summed, times `sigmas`, halved."""
    return 0.5 * sigmas * float((probs * (1 - probs) / num_samples).sqrt().sum())


def expected_exact_draws(probs: torch.Tensor, temperature: float) -> float:
    """Expected draws of the implemented exact sampler, which abandons an attempt at the first mismatching draw.

    With 1/T = n + alpha: an attempt whose first draw is x makes its draw j + 1 (j = 1..n-1) only if draws 2..j
    matched x, so phase 1 costs 1 + sum_{i=0..n-2} P(x)^i draws; it reaches the Bernoulli factory with probability
    P(x)^n, where it costs P(x)^(alpha - 1) draws on average (Mendo). An attempt succeeds with probability
    sum_x P(x)^(1/T); by Wald's identity the total is (cost per attempt) / (success rate):
    (1 + sum_{j=1..n-1} sum_x P(x)^j + [alpha > 0] sum_x P(x)^(1/T - 1)) / sum_x P(x)^(1/T). Without early abandoning
    the phase-1 cost would be n (the paper's Theorem 2), an upper bound; for n <= 2 the two agree.
    """
    n, alpha = _split_inverse_temperature(temperature)
    phase1 = 1 + sum(float((probs**j).sum()) for j in range(1, n))
    factory = float((probs ** (1 / temperature - 1)).sum()) if alpha > 0 else 0.0
    return (phase1 + factory) / float((probs ** (1 / temperature)).sum())


def paper_expected_draws(probs: torch.Tensor, temperature: float) -> float:
    n, alpha = _split_inverse_temperature(temperature)
    factory = float((probs ** (1 / temperature - 1)).sum()) if alpha > 0 else 0.0
    return (n + factory) / float((probs ** (1 / temperature)).sum())


def generalised_binomial(c: float, m: float) -> float:
    return math.exp(math.lgamma(c + 1) - math.lgamma(m + 1) - math.lgamma(c - m + 1))


def reference_rule(candidates: list[tuple], temperature: float) -> dict[tuple, float]:
    """The paper's batch rule, written out per row as the official code does (a Counter of tuples, then m = n,
    n - 1, ..., 1): the probability of choosing each distinct candidate. For integer 1/T the weights are the plain
    binomials C(c, m) (`math.comb`); for fractional 1/T = r the levels are r, r - 1, ... and the weights the
    generalised binomials Gamma(c + 1) / (Gamma(m + 1) Gamma(c - m + 1)), as `batch_temperature_sample` documents."""
    counts = Counter(candidates)
    r = 1 / temperature
    integer = abs(r - round(r)) < 1e-9
    levels = list(range(round(r), 0, -1)) if integer else [r - j for j in range(math.ceil(r))]
    for m in levels:
        eligible = {x: c for x, c in counts.items() if c >= m}
        if eligible:
            weight = {x: (math.comb(c, m) if integer else generalised_binomial(c, m)) for x, c in eligible.items()}
            total = sum(weight.values())
            return {x: w / total for x, w in weight.items()}
    raise AssertionError("unreachable: the last level admits every candidate")


def rule_on_counts(counts: torch.Tensor, temperature: float) -> torch.Tensor:
    """`reference_rule` vectorised over count vectors `(R, M)` (counts of M outcomes among N candidates): the
    probability of choosing each outcome `(R, M)`. Used to compute the rule's expected output for a given N."""
    counts = counts.double()
    r = 1 / temperature
    n = round(r) if abs(r - round(r)) < 1e-9 else None
    top = counts.max(-1, keepdim=True).values
    level = torch.minimum(top, torch.tensor(float(n))) if n is not None else r - torch.clamp(torch.ceil(r - top), min=0)
    eligible = (counts >= level) & (counts > 0)
    log_w = torch.lgamma(counts + 1) - torch.lgamma(level + 1) - torch.lgamma((counts - level).clamp(min=0) + 1)
    weights = torch.where(eligible, log_w.exp(), torch.zeros_like(log_w))
    return weights / weights.sum(-1, keepdim=True)


# ------------------------------------------------------------------------------------------ exact (Algorithm 1)

EXACT_COPIES = 4000  # samples per base row and temperature


@pytest.fixture(scope="module")
def exact_runs() -> dict:
    """One vectorised run of the exact sampler per temperature: 3 base rows x EXACT_COPIES rows."""
    runs = {}
    for i, temperature in enumerate(TEMPERATURES):
        probs, outcomes = replicated(EXACT_COPIES)
        draw = ToyDraw(probs, outcomes, seed=100 + i)
        out = exact_temperature_sample(draw, temperature, generator=torch.Generator().manual_seed(200 + i))
        runs[temperature] = (out, outcome_index(out.samples, outcomes))
    return runs


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_exact_sampler_matches_tempered_distribution(exact_runs, temperature):
    out, index = exact_runs[temperature]
    assert out.samples.shape == (3 * EXACT_COPIES, K)
    assert out.exact.all()  # the default max_draws is never reached on these distributions
    for row in range(3):
        counts = torch.bincount(index[row * EXACT_COPIES : (row + 1) * EXACT_COPIES], minlength=5)
        p = chi_square_pvalue(counts, tempered(PROBS[row], temperature))
        assert p > P_THRESHOLD, f"T={temperature}, row {row}: counts {counts.tolist()}, p={p:.2e}"


@pytest.mark.parametrize("temperature", [1 / 2, 1 / 3, 0.45])
def test_exact_sampler_chi_square_rejects_wrong_target(exact_runs, temperature):
    """Power: the same test, on the same samples, rejects the untempered P and the neighbouring temperature."""
    out, index = exact_runs[temperature]
    for row in range(3):
        counts = torch.bincount(index[row * EXACT_COPIES : (row + 1) * EXACT_COPIES], minlength=5)
        assert chi_square_pvalue(counts, PROBS[row]) < POWER_THRESHOLD
    # Rows have different P: pooling them under one row's P is rejected too (rows are not mixed up).
    counts = torch.bincount(index[EXACT_COPIES : 2 * EXACT_COPIES], minlength=5)
    assert chi_square_pvalue(counts, tempered(PROBS[0], temperature)) < POWER_THRESHOLD


def test_exact_sampler_distinguishes_close_temperatures(exact_runs):
    """0.45 and 1/2 give close targets; the test tells them apart (at least on the peaked rows)."""
    _, index = exact_runs[0.45]
    pvalues = [
        chi_square_pvalue(
            torch.bincount(index[row * EXACT_COPIES : (row + 1) * EXACT_COPIES], minlength=5),
            tempered(PROBS[row], 0.5),
        )
        for row in range(3)
    ]
    assert min(pvalues) < P_THRESHOLD, pvalues


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_exact_sampler_number_of_draws(exact_runs, temperature):
    out, _ = exact_runs[temperature]
    n, alpha = _split_inverse_temperature(temperature)
    # Every accepted attempt needs n identical draws, plus at least one factory draw when alpha > 0.
    assert int(out.num_draws.min()) >= n + (alpha > 0)
    for row in range(3):
        draws = out.num_draws[row * EXACT_COPIES : (row + 1) * EXACT_COPIES].double()
        expected = expected_exact_draws(PROBS[row], temperature)
        assert expected <= paper_expected_draws(PROBS[row], temperature) + 1e-12
        tolerance = 5 * float(draws.std()) / math.sqrt(len(draws)) + 1e-9
        assert abs(float(draws.mean()) - expected) < tolerance, (row, float(draws.mean()), expected)


def test_exact_sampler_expected_draws_formula_against_paper():
    """Sanity of the derived expectation: equal to the paper's for n <= 2 (nothing to abandon early), smaller for
    n >= 3."""
    p = PROBS[0]
    assert expected_exact_draws(p, 1.0) == pytest.approx(1.0)
    for temperature in (0.7, 1 / 2, 0.45):
        assert expected_exact_draws(p, temperature) == pytest.approx(paper_expected_draws(p, temperature))
    assert expected_exact_draws(p, 1 / 3) < paper_expected_draws(p, 1 / 3)
    # n = 3: 1 + 1 + sum P^2 draws per attempt instead of 3.
    assert expected_exact_draws(p, 1 / 3) == pytest.approx((2 + float((p**2).sum())) / float((p**3).sum()))


@pytest.mark.parametrize("temperature", [1 / 3, 0.45])
def test_exact_sampler_accepts_on_its_own_draws(temperature):
    """Structure of every accepted row's draws: the sample closes the sequence; before it (for alpha > 0, after the
    factory's non-matching draws) come n copies of it. And a row that accepted is never asked for draws again."""
    probs, outcomes = replicated(60)
    draw = ToyDraw(probs, outcomes, seed=7)
    out = exact_temperature_sample(draw, temperature, generator=torch.Generator().manual_seed(8), draws_per_call=5)
    n, alpha = _split_inverse_temperature(temperature)
    assert out.exact.all()
    for row in range(probs.shape[0]):
        used = int(out.num_draws[row])
        sequence = draw.row_draws(row)
        assert len(sequence) >= used
        consumed = sequence[:used]
        x = out.samples[row]
        is_x = (consumed == x).all(-1)
        assert is_x[-1]
        if alpha > 0:
            head = is_x[:-1]
            last_x = int(head.nonzero().max())  # the factory's draws after phase 1 all differ from x
            assert head[last_x + 1 :].sum() == 0
            assert head[: last_x + 1][-n:].all()
        else:
            assert is_x[-n:].all()
        # Protocol: every call that asked for this row came while it still needed draws, and the call in which it
        # accepted was its last.
        given = draw.draws_given(row)
        before = 0
        for amount in given:
            if amount:
                assert before < used, f"row {row} was asked for draws after accepting"
            before += amount
        assert before - used < max(given)


def test_exact_sampler_without_rows_protocol():
    """A plain `draw(num)` (no `rows` keyword) works too: draws of finished rows are simply ignored."""
    probs, outcomes = replicated(3000)
    toy = ToyDraw(probs, outcomes, seed=11)

    def draw(num):
        return toy(num)

    out = exact_temperature_sample(draw, 0.5, generator=torch.Generator().manual_seed(12))
    assert all(len(rows) == probs.shape[0] for rows, _ in toy.calls)
    index = outcome_index(out.samples, outcomes)
    for row in range(3):
        counts = torch.bincount(index[row * 3000 : (row + 1) * 3000], minlength=5)
        assert chi_square_pvalue(counts, tempered(PROBS[row], 0.5)) > P_THRESHOLD


class ScriptedDraw:
    """Deterministic draws: row b returns script[b][0], script[b][1], ... then repeats its last entry."""

    def __init__(self, script: list[list[tuple]]):
        self.script = script
        self.position = [0] * len(script)

    def __call__(self, num: int, rows: torch.Tensor | None = None) -> torch.LongTensor:
        rows = range(len(self.script)) if rows is None else rows.tolist()
        out = []
        for row in rows:
            seq = self.script[row]
            out.append([seq[min(self.position[row] + i, len(seq) - 1)] for i in range(num)])
            self.position[row] += num
        return torch.tensor(out).transpose(0, 1)


def test_exact_sampler_max_draws_fallback_is_deterministic_where_the_rule_is():
    """With max_draws = 4 and T = 1/3: row 0 accepts (three a's), rows 1 and 2 fall back to the batch rule over
    their four draws, which here has a single choice (the only repeated outcome)."""
    a, b, c, d = (0, 0), (1, 1), (2, 2), (3, 3)
    script = [[a, a, a, b], [a, b, a, c], [b, c, c, d]]
    out = exact_temperature_sample(ScriptedDraw(script), 1 / 3, max_draws=4, draws_per_call=2)
    assert out.exact.tolist() == [True, False, False]
    assert out.num_draws.tolist() == [3, 4, 4]
    assert out.samples.tolist() == [list(a), list(a), list(c)]


def test_exact_sampler_max_draws_fallback_statistics():
    """Rows that hit max_draws are marked, consumed exactly max_draws draws and return an outcome they saw."""
    probs = torch.full((400, 5), 0.2, dtype=torch.float64)
    outcomes = OUTCOMES[:1].expand(400, -1, -1)
    draw = ToyDraw(probs, outcomes, seed=3)
    out = exact_temperature_sample(draw, 1 / 3, generator=torch.Generator().manual_seed(4), max_draws=6)
    assert (out.num_draws <= 6).all()
    assert 0 < int(out.exact.sum()) < 400
    assert (out.num_draws[~out.exact] == 6).all()
    for row in range(400):
        seen = draw.row_draws(row)[: int(out.num_draws[row])]
        assert (seen == out.samples[row]).all(-1).any()
        if out.exact[row]:
            assert (seen[-3:] == out.samples[row]).all()


def test_exact_sampler_draws_in_growing_batches():
    """By default each call asks for twice the draws of the one before (few head calls per chunk: about log2 of the
    draws), capped by what max_draws leaves; a row that never accepts sees exactly max_draws draws."""
    a, b = (0, 0), (1, 1)
    script = [[a, b] * 200]  # alternating: never n = 2 identical draws in a row at T = 1/2
    draw = ScriptedDraw(script)
    asked = []

    def recording(num, rows=None):
        asked.append(num)
        return draw(num, rows)

    out = exact_temperature_sample(recording, 0.5, max_draws=100)
    assert asked == [1, 8, 16, 32, 43] and out.num_draws.tolist() == [100] and not out.exact.any()


def test_exact_sampler_rejects_bad_max_draws():
    with pytest.raises(ValueError, match="max_draws"):
        exact_temperature_sample(ToyDraw(PROBS, OUTCOMES), 0.5, max_draws=0)


def test_exact_sampler_rejects_draws_of_the_wrong_shape():
    """A `draw` that breaks the `(num, batch, K)` contract gets a ValueError naming the shape, on its first call as
    on later ones."""
    with pytest.raises(ValueError, match="shape"):
        exact_temperature_sample(lambda num: torch.zeros(num, 3, dtype=torch.long), 0.5)
    calls = []

    def wrong_later(num):
        calls.append(num)
        return torch.zeros(num, 3, K, dtype=torch.long) if len(calls) == 1 else torch.zeros(num, 3, dtype=torch.long)

    with pytest.raises(ValueError, match="shape"):
        exact_temperature_sample(wrong_later, 0.5)


def test_exact_sampler_reproducible_with_generators():
    def run(seed):
        probs, outcomes = replicated(50)
        draw = ToyDraw(probs, outcomes, seed=seed)
        return exact_temperature_sample(draw, 0.45, generator=torch.Generator().manual_seed(seed))

    first, second, other = run(5), run(5), run(6)
    assert torch.equal(first.samples, second.samples) and torch.equal(first.num_draws, second.num_draws)
    assert not torch.equal(first.num_draws, other.num_draws)


def test_integer_inverse_temperature_within_tolerance_uses_no_bernoulli_factory():
    """`_split_inverse_temperature` documents that 1/T within 1e-9 of an integer counts as that integer, so
    alpha must be exactly 0 there (1/(1/49) is 49.00000000000001 in floating point). With a tiny alpha the exact
    sampler would run the Bernoulli factory, which waits for one more copy of the candidate: here row 0 sees a, a,
    then only b, and must accept a after two draws at T = 1/2."""
    a, b = (0, 0), (1, 1)
    temperature = 1 / (2 + 1e-12)
    out = exact_temperature_sample(ScriptedDraw([[a, a, b]]), temperature, max_draws=50)
    assert out.num_draws.tolist() == [2]
    assert out.exact.tolist() == [True]
    assert _split_inverse_temperature(temperature) == (2, 0.0)
    assert _split_inverse_temperature(1 / 49) == (49, 0.0)


# ------------------------------------------------------------------------------------------ batch (Algorithm 2)


def implied_pick_probabilities(monkeypatch, candidates: torch.Tensor, temperature: float) -> list[dict]:
    """Run `batch_temperature_sample` once and read the probabilities it gives each distinct candidate of each row,
    from the weights it hands to `torch.multinomial`."""
    captured = []
    original = torch.multinomial

    def spy(weights, *args, **kwargs):
        captured.append(weights.detach().double().clone())
        return original(weights, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", spy)
    batch_temperature_sample(candidates, temperature)
    monkeypatch.setattr(torch, "multinomial", original)
    (weights,) = captured
    weights = weights / weights.sum(-1, keepdim=True)
    result = []
    for row in range(candidates.shape[1]):
        probs = Counter()
        for i, candidate in enumerate(candidates[:, row].tolist()):
            probs[tuple(candidate)] += float(weights[row, i])
        result.append(dict(probs))
    return result


@pytest.mark.parametrize("temperature", [1.0, 1 / 2, 1 / 3, 1 / 4, 0.7, 0.45])
@pytest.mark.parametrize("num_candidates", [1, 3, 10, 40, 200])
def test_batch_rule_matches_per_row_reference(monkeypatch, temperature, num_candidates):
    """The vectorised rule gives every distinct candidate exactly the probability of the paper's per-row rule
    (Counter, levels n..1, weights C(count, level)); for fractional 1/T, of its documented generalisation."""
    generator = torch.Generator().manual_seed(num_candidates)
    # Rows from very concentrated (many repeats) to spread out (no repeats), so every level of the rule is used.
    rows = []
    for alphabet in (1, 2, 3, 5, 9, 20, 60):
        rows.append(torch.randint(0, alphabet, (num_candidates, K), generator=generator))
    candidates = torch.stack(rows, dim=1)  # (N, rows, K)
    implied = implied_pick_probabilities(monkeypatch, candidates, temperature)
    for row in range(candidates.shape[1]):
        reference = reference_rule([tuple(c) for c in candidates[:, row].tolist()], temperature)
        got = {x: p for x, p in implied[row].items() if p > 0}
        assert got.keys() == reference.keys()
        for x, p in reference.items():
            assert got[x] == pytest.approx(p, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("temperature", [1 / 2, 1 / 3, 0.45])
def test_batch_rule_black_box_chi_square(temperature):
    """Without looking inside: one fixed candidate set repeated over 20000 rows; the picks follow the reference
    rule (chi-square), and the test has power (it rejects plain frequency sampling)."""
    a, b, c, d, e = (0, 0), (0, 1), (1, 0), (2, 2), (3, 1)
    fixed = [a] * 5 + [b] * 4 + [c] * 3 + [d] * 2 + [e]
    reference = reference_rule(fixed, temperature)
    copies = 20000
    candidates = torch.tensor(fixed).unsqueeze(1).expand(-1, copies, -1).contiguous()
    picks = batch_temperature_sample(candidates, temperature, generator=torch.Generator().manual_seed(1))
    keys = [a, b, c, d, e]
    counts = torch.tensor([int((picks == torch.tensor(x)).all(-1).sum()) for x in keys])
    assert int(counts.sum()) == copies
    assert chi_square_pvalue(counts, torch.tensor([reference.get(x, 0.0) for x in keys])) > P_THRESHOLD
    frequency = torch.tensor([5, 4, 3, 2, 1], dtype=torch.float64)
    assert chi_square_pvalue(counts, frequency) < POWER_THRESHOLD


def test_batch_rule_steps_down_when_nothing_repeats():
    """No candidate repeats: every level above 1 is empty, and the pick is uniform over the candidates."""
    candidates = torch.arange(8).view(8, 1, 1).expand(8, 4000, 2).contiguous()
    picks = batch_temperature_sample(candidates, 1 / 3, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(picks[:, 0], minlength=8)
    assert chi_square_pvalue(counts, torch.ones(8)) > P_THRESHOLD


def test_batch_rule_only_keeps_outcomes_at_the_highest_level():
    """T = 1/3, counts a: 3, b: 2, c: 1 -> only a qualifies at level 3 (b and c are never chosen)."""
    a, b, c = (0, 0), (1, 1), (2, 2)
    candidates = torch.tensor([b, a, c, a, b, a]).unsqueeze(1).expand(-1, 500, -1).contiguous()
    picks = batch_temperature_sample(candidates, 1 / 3, generator=torch.Generator().manual_seed(0))
    assert (picks == torch.tensor(a)).all()


def multinomial_counts(num: int, probs: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """`size` multinomial count vectors of `num` draws from `probs`, by conditional binomials (fast for large N)."""
    remaining = torch.full((size,), float(num), dtype=torch.float64)
    rest, counts = 1.0, []
    for p in probs[:-1].tolist():
        c = torch.binomial(remaining, torch.full_like(remaining, min(p / rest, 1.0)), generator=generator)
        counts.append(c)
        remaining, rest = remaining - c, rest - p
    return torch.stack([*counts, remaining], -1)


@pytest.mark.parametrize("temperature", [1 / 2, 0.45])
def test_batch_approximation_approaches_target_as_n_grows(monkeypatch, temperature):
    """Total variation to P^(1/T) falls as N grows (5, 50, 500).

    - q_N, the rule's output distribution for N candidates, is computed from 200000 multinomial count vectors (the
      rule depends only on the counts; `rule_on_counts` is checked against the per-row reference below, and the
      sampler against the per-row reference above). TV(q_N, target) must fall with N, to below 0.005 at N = 500.
    - The sampler itself, on `rows` rows of N fresh candidates each: its picks fit q_N (chi-square), and the mean of
      the pick probabilities it uses (read from its `torch.multinomial` weights: each row's exact choice
      distribution, so only the candidates are random) has a TV to the target within 3 standard errors per
      outcome of TV(q_N, target). Black-box, the picks show the fall from N = 5 to N = 50 beyond that tolerance.
    """
    probs, outcomes = PROBS[0], OUTCOMES[0]
    target = tempered(probs, temperature)
    generator = torch.Generator().manual_seed(0)
    original_multinomial = torch.multinomial
    reference_tv, sampler_tv, tolerances = [], [], []
    for num_candidates, rows in ((5, 4000), (50, 8000), (500, 200)):
        q = rule_on_counts(multinomial_counts(num_candidates, probs, 200000, generator), temperature).mean(0)
        reference_tv.append(total_variation(q, target))

        index = original_multinomial(probs.float(), num_candidates * rows, replacement=True, generator=generator)
        index = index.view(num_candidates, rows)
        candidates = outcomes[index]  # (N, rows, K)
        captured = []

        def spy(weights, *args, _captured=captured, **kwargs):
            _captured.append(weights.detach().double())
            return original_multinomial(weights, *args, **kwargs)

        monkeypatch.setattr(torch, "multinomial", spy)
        picks = torch.cat(
            [
                batch_temperature_sample(candidates[:, i : i + 50], temperature, generator=generator)
                for i in range(0, rows, 50)
            ]
        )
        monkeypatch.setattr(torch, "multinomial", original_multinomial)
        weights = torch.cat(captured)
        weights = weights / weights.sum(-1, keepdim=True)
        implied = torch.zeros(rows, len(probs), dtype=torch.float64).scatter_add_(1, index.T, weights)
        estimate = implied.mean(0)
        tolerance = 0.5 * float((3 * implied.std(0) / math.sqrt(rows)).sum())
        sampler_tv.append(total_variation(estimate, target))
        tolerances.append(tolerance)
        assert abs(sampler_tv[-1] - reference_tv[-1]) < tolerance, (num_candidates, sampler_tv, reference_tv, tolerance)

        got = torch.bincount(outcome_index(picks, outcomes.expand(rows, -1, -1)), minlength=len(probs))
        assert chi_square_pvalue(got, q) > P_THRESHOLD, (num_candidates, got.tolist(), q.tolist())
        if num_candidates == 5:
            # The bias at N = 5 is large enough to be seen directly: the picks reject the exact target.
            assert chi_square_pvalue(got, target) < POWER_THRESHOLD
    assert reference_tv[0] > reference_tv[1] > reference_tv[2], reference_tv
    assert reference_tv[0] > 0.04 and reference_tv[2] < 0.005, reference_tv
    assert sampler_tv[0] - tolerances[0] > sampler_tv[1] + tolerances[1], (sampler_tv, tolerances)
    assert sampler_tv[2] < 0.015, sampler_tv


def test_rule_on_counts_matches_reference_rule():
    """The vectorised count-vector rule used above agrees with the per-row reference."""
    counts = torch.tensor([[3, 2, 1, 0, 0], [1, 1, 1, 1, 1], [0, 5, 0, 2, 2], [2, 2, 0, 0, 1], [0, 0, 1, 0, 0]])
    for temperature in (1.0, 1 / 2, 1 / 3, 0.7, 0.45):
        got = rule_on_counts(counts, temperature)
        for row, row_counts in enumerate(counts.tolist()):
            candidates = [(m, 0) for m, c in enumerate(row_counts) for _ in range(c)]
            reference = reference_rule(candidates, temperature)
            expected = torch.tensor([reference.get((m, 0), 0.0) for m in range(5)], dtype=torch.float64)
            torch.testing.assert_close(got[row], expected)


def test_batch_sampler_reproducible_with_generator():
    generator = torch.Generator().manual_seed(0)
    candidates = torch.randint(0, 3, (30, 500, K), generator=generator)
    first = batch_temperature_sample(candidates, 0.45, generator=torch.Generator().manual_seed(9))
    second = batch_temperature_sample(candidates, 0.45, generator=torch.Generator().manual_seed(9))
    other = batch_temperature_sample(candidates, 0.45, generator=torch.Generator().manual_seed(10))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    assert first.shape == (500, K)


def test_batch_sampler_rejects_bad_candidates():
    with pytest.raises(ValueError, match="candidates"):
        batch_temperature_sample(torch.zeros(4, 2, dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match="candidates"):
        batch_temperature_sample(torch.zeros(0, 2, 2, dtype=torch.long), 0.5)


# ------------------------------------------------------------------------------------------ mode and counting


def test_mode_sample_returns_most_frequent_first_on_ties():
    a, b, c = [0, 1], [2, 3], [4, 5]
    rows = [[a, b, b, c, b, a], [c, a, a, c, b, b], [a, b, c, c, c, c]]  # b; tie a/c/b -> c (first seen)
    candidates = torch.tensor(rows).transpose(0, 1)
    assert mode_sample(candidates).tolist() == [b, c, c]


def test_candidate_counts_brute_force():
    candidates = torch.randint(0, 3, (12, 5, K), generator=torch.Generator().manual_seed(0))
    counts = candidate_counts(candidates)
    for row in range(5):
        tuples = [tuple(x) for x in candidates[:, row].tolist()]
        assert counts[row].tolist() == [tuples.count(x) for x in tuples]


# ------------------------------------------------------------------------------------------ temperatures

BAD_TEMPERATURES = [0, 0.0, -0.5, -1, 1.0001, 2, float("nan"), float("inf"), -float("inf"), True, None, "0.5"]


@pytest.mark.parametrize("temperature", BAD_TEMPERATURES)
def test_bad_temperatures_raise_value_error(temperature):
    with pytest.raises(ValueError, match="temperature"):
        check_temperature(temperature)
    with pytest.raises(ValueError, match="temperature"):
        exact_temperature_sample(ToyDraw(PROBS, OUTCOMES), temperature)
    with pytest.raises(ValueError, match="temperature"):
        batch_temperature_sample(OUTCOMES.transpose(0, 1), temperature)


@pytest.mark.parametrize("temperature", [0, -0.5, 1.5, float("nan"), True])
def test_bad_temperature_message_states_allowed_range(temperature):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        check_temperature(temperature)


def test_temperature_above_one_explains_why():
    with pytest.raises(ValueError, match="sharpen"):
        check_temperature(1.5)
    with pytest.raises(ValueError, match="do_sample=False"):
        check_temperature(0)


@pytest.mark.parametrize("temperature", [1, 1.0, 0.5, 1 / 3, 0.45, 1e-3])
def test_good_temperatures_pass(temperature):
    assert check_temperature(temperature) == float(temperature)
