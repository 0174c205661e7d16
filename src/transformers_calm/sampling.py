"""Sampling from CALM, and likelihood-free temperature sampling (Shao et al., 2025, arXiv 2510.27688, section 5).

[`CalmSamplingMixin`] is `CalmForCausalLM`'s public sampling API: head samples of latent vectors, their tokens, and
the next chunk at a temperature. The algorithms below it work for any sampler of discrete outcomes.

CALM's head is a sampler without a likelihood, so temperature cannot be applied to logits. Both samplers here only
need fresh samples of the outcome (a chunk of K token ids) and target P^(1/T) (normalised) for T in (0, 1]:

- `exact_temperature_sample`: the paper's Algorithm 1, an exact rejection sampler. Write 1/T = n + alpha with n an
  integer and alpha in [0, 1): n identical draws give an outcome x with probability P(x)^n, and a Bernoulli factory
  accepts it with probability P(x)^alpha. Exact, but the expected number of draws grows quickly as T falls.
- `batch_temperature_sample`: the paper's Algorithm 2, a batch approximation from N candidates that converges to
  P^(1/T) as N grows.

Both are vectorised over rows (the batch) and take a `torch.Generator` for reproducibility.
"""

import inspect
import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch

from .candidate_decoding import candidate_counts, decode_chosen_candidates, in_slices, prefix_candidate_counts
from .compat import generator_kwargs


def check_temperature(temperature: float) -> float:
    """Validate a likelihood-free sampling temperature, which must lie in (0, 1]."""
    # `t != t` is the NaN test that torch.compile traces (math.isnan breaks the compiled decoding step's graph).
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature != temperature:
        raise ValueError(f"temperature must be a number in (0, 1], got {temperature!r}.")
    if temperature <= 0:
        raise ValueError(
            f"temperature must be in (0, 1], got {temperature}. For the most likely chunk use do_sample=False (the "
            "mode among the candidates), or a small temperature such as 0.1."
        )
    if temperature > 1:
        raise ValueError(
            f"temperature must be in (0, 1], got {temperature}: likelihood-free temperature sampling can only "
            "sharpen the model's distribution (P^(1/T) is reached through repeated samples), not flatten it."
        )
    return float(temperature)


def _split_inverse_temperature(temperature: float) -> tuple[int, float]:
    """1/T = n + alpha, n integer, alpha in [0, 1); values within 1e-9 of an integer count as that integer."""
    inverse = 1.0 / temperature
    n = round(inverse)
    if abs(inverse - n) <= 1e-9:
        return n, 0.0
    n = math.floor(inverse)
    return n, inverse - n


# The exact sampler's batches of draws double from max(n, 8) up to this many samples per row and call.
MAX_DRAWS_PER_CALL = 1024


class ExactSampleOutput(NamedTuple):
    """Result of [`exact_temperature_sample`].

    Attributes:
        samples (`torch.LongTensor` of shape `(batch, K)`): one outcome per row.
        num_draws (`torch.LongTensor` of shape `(batch,)`): draws each row consumed until it accepted (or until
            `max_draws`).
        exact (`torch.BoolTensor` of shape `(batch,)`): False for rows that hit `max_draws` and fell back to the
            batch approximation over the draws they had seen.
    """

    samples: torch.LongTensor
    num_draws: torch.LongTensor
    exact: torch.BoolTensor


def _call_draw(draw: Callable, num: int, rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Call `draw(num)`, or `draw(num, rows=...)` where it accepts only the active rows, and return draws for the
    active rows `(num, len(rows), K)`."""
    accepts_rows = "rows" in inspect.signature(draw).parameters
    draws = draw(num, rows=rows) if accepts_rows else draw(num)
    if draws.dim() != 3 or draws.shape[0] != num:
        raise ValueError(f"draw({num}) must return a LongTensor of shape ({num}, batch, K), got {tuple(draws.shape)}.")
    if accepts_rows:
        return draws
    if draws.shape[1] != batch_size:
        raise ValueError(f"draw({num}) returned {draws.shape[1]} rows, expected the batch size {batch_size}.")
    return draws[:, rows]


def exact_temperature_sample(
    draw: Callable[..., torch.LongTensor],
    temperature: float,
    generator: torch.Generator | None = None,
    max_draws: int = 10_000,
    draws_per_call: int | None = None,
) -> ExactSampleOutput:
    """Exact likelihood-free temperature sampling (the paper's Algorithm 1), for any T in (0, 1].

    With 1/T = n + alpha: draw n samples; if they are not all identical, start again; otherwise call the common
    value x. If alpha > 0, run the Bernoulli factory for P(x)^alpha: for i = 1, 2, ... draw a sample; if it equals
    x, accept x; otherwise start again from the beginning with probability alpha / i. The accepted x is distributed
    exactly as P(x)^(1/T) / sum_y P(y)^(1/T). Every row runs its own copy of the algorithm on its own draws; the
    expected number of draws is (n + [alpha > 0] sum_x P(x)^(1/T - 1)) / sum_x P(x)^(1/T).

    Args:
        draw (`Callable`):
            `draw(num)` returns a `LongTensor` of shape `(num, batch, K)`: `num` fresh, independent samples for every
            row. If it also accepts a keyword `rows` (a `LongTensor` of row indices), it is called as
            `draw(num, rows=rows)` and must return `(num, len(rows), K)`, so that rows that have accepted cost no
            more samples.
        temperature (`float`):
            T in (0, 1].
        generator (`torch.Generator`, *optional*):
            Generator for the Bernoulli factory's coins (on the device of the draws).
        max_draws (`int`, *optional*, defaults to 10000):
            Most draws per row. A row that has not accepted by then falls back to the batch approximation
            ([`batch_temperature_sample`]) over all the draws it has seen; `exact` marks such rows False.
        draws_per_call (`int`, *optional*):
            Samples requested per `draw` call. By default the calls grow: `max(n, 8)`, then twice as many at every
            call up to `MAX_DRAWS_PER_CALL` (1024) (one head call per batch of draws, so a chunk costs about log2 of its draws in calls; a head call of
            the flow or diffusion head is 10 or 100 network passes). The draws are independent, so the batch sizes
            do not change the distribution; draws left in a batch after a row accepts are discarded.

    Returns:
        [`ExactSampleOutput`] with `samples` `(batch, K)`, `num_draws` `(batch,)` and `exact` `(batch,)`.
    """
    temperature = check_temperature(temperature)
    if max_draws < 1:
        raise ValueError(f"max_draws must be >= 1, got {max_draws}.")
    n, alpha = _split_inverse_temperature(temperature)
    growing = draws_per_call is None
    draws_per_call = draws_per_call or max(n, 8)

    first = draw(1)
    if first.dim() != 3 or first.shape[0] != 1:
        raise ValueError(f"draw(1) must return a LongTensor of shape (1, batch, K), got {tuple(first.shape)}.")
    batch_size, K = first.shape[1], first.shape[2]
    device = first.device
    # Per-row state of the algorithm: the candidate, how many identical draws it has collected (phase 1), and the
    # Bernoulli factory's step i (phase 2; 0 while collecting).
    candidate = torch.zeros(batch_size, K, dtype=first.dtype, device=device)
    count = torch.zeros(batch_size, dtype=torch.long, device=device)
    factory_step = torch.zeros(batch_size, dtype=torch.long, device=device)
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)
    result = torch.zeros(batch_size, K, dtype=first.dtype, device=device)
    num_draws = torch.zeros(batch_size, dtype=torch.long, device=device)
    seen = []  # (draws, rows) per call: the fallback needs every draw a row saw
    pending = (first, torch.arange(batch_size, device=device))

    while True:
        draws, rows = pending
        seen.append(pending)
        for x in draws:  # sequential within a row, vectorised over rows
            active = ~done[rows]
            if not active.any():
                break
            r = rows[active]
            x = x[active]
            num_draws[r] += 1
            same = (x == candidate[r]).all(-1)
            collecting = factory_step[r] == 0
            # Phase 1: the first draw of an attempt becomes the candidate; a different draw restarts the attempt
            # (the mismatching draw is discarded: reusing it would bias the next attempt).
            start = collecting & (count[r] == 0)
            candidate[r[start]] = x[start]
            grow = collecting & (start | same)
            new_count = torch.where(grow, count[r] + 1, torch.zeros_like(count[r]))
            count[r] = torch.where(collecting, new_count, count[r])
            collected = collecting & (new_count == n)
            if alpha == 0:
                accept = collected
            else:
                # Phase 2, the Bernoulli factory for P(x)^alpha: success on a repeat of x, failure (restart) with
                # probability alpha / i otherwise.
                in_factory = ~collecting
                accept = in_factory & same
                coin = torch.rand(r.shape[0], device=device, generator=generator)
                fail = in_factory & ~same & (coin < alpha / factory_step[r].clamp(min=1))
                count[r] = torch.where(fail, torch.zeros_like(count[r]), count[r])
                factory_step[r] = torch.where(
                    fail | accept, torch.zeros_like(factory_step[r]), factory_step[r] + in_factory.long()
                )
                factory_step[r] = torch.where(collected, torch.ones_like(factory_step[r]), factory_step[r])
            result[r[accept]] = candidate[r[accept]]
            done[r[accept]] = True
        remaining = (~done) & (num_draws < max_draws)
        if not remaining.any():
            break
        active_rows = remaining.nonzero().squeeze(1)
        num = min(draws_per_call, int((max_draws - num_draws[active_rows]).max()))
        pending = (_call_draw(draw, num, active_rows, batch_size), active_rows)
        if growing:  # up to MAX_DRAWS_PER_CALL samples per row in one head call (memory)
            draws_per_call = min(2 * draws_per_call, max(MAX_DRAWS_PER_CALL, n))

    exact = done.clone()
    if not exact.all():
        # Fallback for rows that hit max_draws: the batch approximation over every draw the row has seen. A row
        # leaves only by accepting, so these rows took part in every call and consumed all its draws.
        failed = (~exact).nonzero().squeeze(1)
        row_draws = torch.cat([d[:, torch.searchsorted(rows, failed)] for d, rows in seen], dim=0)
        result[failed] = batch_temperature_sample(row_draws, temperature, generator=generator)
    return ExactSampleOutput(samples=result, num_draws=num_draws, exact=exact)


def _temperature_pick(counts: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.LongTensor:
    """The batch approximation's choice (see [`batch_temperature_sample`]) among N candidates with `counts`
    `(batch, N)`: the index of the chosen candidate of each row, `(batch,)`."""
    counts = counts.double().contiguous()  # torch.multinomial draws differently from a transposed view
    n, alpha = _split_inverse_temperature(temperature)
    r = n + alpha
    # Largest level r - j (j = 0, 1, ...) that some candidate's count reaches (it is > 0, and a level <= 1 admits
    # every candidate).
    top = counts.max(-1).values
    steps_down = torch.clamp(torch.ceil(r - top - 1e-9), min=0)
    level = (r - steps_down).unsqueeze(-1)  # (batch, 1)
    eligible = counts >= level - 1e-9
    # log C(c, level); each of an outcome's c copies carries 1/c of its weight, so outcomes need no deduplication.
    log_weight = torch.lgamma(counts + 1) - torch.lgamma(level + 1) - torch.lgamma((counts - level).clamp(min=0) + 1)
    log_weight = torch.where(eligible, log_weight - counts.log(), torch.full_like(log_weight, -math.inf))
    weights = (log_weight - log_weight.max(-1, keepdim=True).values).exp()
    return torch.multinomial(weights.float(), 1, **generator_kwargs(generator)).squeeze(-1)


def batch_temperature_sample(
    candidates: torch.LongTensor, temperature: float, generator: torch.Generator | None = None
) -> torch.LongTensor:
    """Batch approximation of temperature sampling from N candidates (the paper's Algorithm 2), vectorised over rows.

    Identical candidates are counted; with r = 1/T, each distinct outcome with count c >= r is chosen with
    probability proportional to C(c, r). When no outcome has r copies, r steps down by one (r - 1, r - 2, ...) until
    some outcome qualifies; at the last step (r <= 1) every candidate qualifies, which is plain frequency sampling
    (T = 1).

    For integer 1/T this is exactly the paper's rule: C(c, n) counts the n-subsets of identical candidates, and is
    an unbiased estimate of P(x)^n up to a constant. For any other T in (0, 1], C(c, r) is the generalised binomial
    coefficient Gamma(c + 1) / (Gamma(r + 1) Gamma(c - r + 1)), which equals the integer rule at integer r, varies
    smoothly in between and grows as c^r, so the choice still converges to P^(1/T) as N grows.

    Args:
        candidates (`torch.LongTensor` of shape `(N, batch, K)`):
            N independent samples per row.
        temperature (`float`):
            T in (0, 1].
        generator (`torch.Generator`, *optional*):
            Generator for the final pick (on the candidates' device).

    Returns:
        `torch.LongTensor` of shape `(batch, K)`.
    """
    temperature = check_temperature(temperature)
    if candidates.dim() != 3 or candidates.shape[0] < 1:
        raise ValueError(f"candidates must have shape (N, batch, K) with N >= 1, got {tuple(candidates.shape)}.")
    pick = _temperature_pick(candidate_counts(candidates), temperature, generator)
    return candidates.transpose(0, 1)[torch.arange(candidates.shape[1], device=candidates.device), pick]


def mode_sample(candidates: torch.LongTensor) -> torch.LongTensor:
    """The most frequent of N candidates `(N, batch, K)` per row (ties: the first seen), the T -> 0 limit of the batch
    approximation; used for `do_sample=False`."""
    counts = candidate_counts(candidates)
    pick = counts.argmax(-1)  # argmax returns the first maximal index
    return candidates.transpose(0, 1)[torch.arange(candidates.shape[1], device=candidates.device), pick]


class CalmSamplingMixin:
    """The public way to draw from a [`CalmForCausalLM`], used by `generate`, `CalmTrainer` and BrierLM alike: head
    samples of the next chunk's latent vector for backbone states, their tokens, and the temperature sampler of one
    chunk built on the algorithms above. Mixed into `CalmForCausalLM` (it reads `generative_head`, `autoencoder` and
    `config`)."""

    def sample_head_noise(self, shape, generator: torch.Generator | None = None) -> torch.Tensor:
        """The generative head's randomness for `shape` hidden states, `(*shape, *head.noise_shape)`, on the model's
        device and in its dtype: uniform in [-0.5, 0.5) of `noise_size` for the energy head, the N(0, I) starting
        point for the flow head, x_T and the 100 step noises for the diffusion head. Pass it to [`sample_latents`] as
        `noise` to control every draw."""
        weight = next(self.generative_head.parameters())
        return self.generative_head.draw_noise(shape, generator=generator, device=weight.device, dtype=weight.dtype)

    def sample_latents(
        self,
        hidden_states: torch.Tensor,
        num_samples: int | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Samples of the next chunk's latent vector.

        Args:
            hidden_states (`torch.FloatTensor` of shape `(..., hidden_size)`):
                Backbone states (`last_hidden_state` positions); any leading shape.
            num_samples (`int`, *optional*):
                Samples per state, along a new leading dimension (the part of the head that does not depend on the
                noise runs once per state).
            noise (`torch.FloatTensor`, *optional*):
                The head's randomness ([`sample_head_noise`] of the output's leading shape), to fix every draw.
            generator (`torch.Generator`, *optional*):
                Generator for the noise when `noise` is not given (the global RNG when `None`).

        Returns:
            `torch.FloatTensor` of shape `(..., latent_size)`, or `(num_samples, ..., latent_size)`.
        """
        return self.generative_head(hidden_states, noise=noise, generator=generator, num_samples=num_samples)

    def decode_latents(self, latents: torch.Tensor, max_logits: int = 2**26) -> torch.LongTensor:
        """Token ids `(..., K)` of latent vectors `(..., latent_size)`: the argmax of the autoencoder decoder.

        The decoder runs on at most `max_logits` logits at a time, so that many candidates over a large vocabulary
        (e.g. 200 x batch 32 x K 4 x 128k) never materialise at once.
        """
        flat = latents.reshape(-1, 1, latents.shape[-1])
        step = max(1, max_logits // (self.config.patch_size * self.config.vocab_size))
        tokens = in_slices(self.autoencoder.decode_token_ids, flat, step)
        return tokens.reshape(*latents.shape[:-1], self.config.patch_size)

    def decode_chosen_candidates(
        self,
        latents: torch.Tensor,
        choose: Callable[[torch.LongTensor], torch.LongTensor],
        max_logits: int = 2**26,
    ) -> torch.LongTensor:
        """The chunk `(batch, K)` of one of N candidate latents per row `(N, batch, latent_size)`, chosen by how many
        of the row's candidates decode to the same chunk: `choose(counts)` gets the counts `(batch, N)` and returns an
        index per row `(batch,)`. Decodes only the tokens the counts need ([`~candidate_decoding.decode_chosen_candidates`])."""
        return decode_chosen_candidates(self, latents, choose, max_logits)

    def sample_chunks(
        self,
        hidden_states: torch.Tensor,
        num_samples: int | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.LongTensor:
        """Sampled next chunks, `decode_latents(sample_latents(...))`: `(..., K)`, or `(num_samples, ..., K)`."""
        return self.decode_latents(self.sample_latents(hidden_states, num_samples, noise=noise, generator=generator))

    def encode_chunks(self, input_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen autoencoder's posterior `(mean, log_std)`, each `(batch, num_chunks, latent_size)`, of token ids
        `(batch, num_chunks * K)`."""
        return self.autoencoder.encode(input_ids)

    def sample_next_chunk(
        self,
        hidden_states: torch.Tensor,
        temperature: float = 1.0,
        do_sample: bool = True,
        num_candidates: int = 200,
        exact_temperature: bool = False,
        max_draws: int = 10_000,
        generator: torch.Generator | None = None,
    ) -> torch.LongTensor:
        """The K token ids of the next chunk of every row, from the backbone's last hidden state `(batch, hidden)`.

        - `do_sample=False`: the most frequent of `num_candidates` head samples (the T -> 0 limit of the batch
          approximation; deterministic for a given generator state).
        - `temperature=1`: one head sample per row, decoded by the autoencoder.
        - `temperature < 1`: the paper's batch approximation from `num_candidates` samples (the rule of
          [`~sampling.batch_temperature_sample`], through [`decode_chosen_candidates`]), or with
          `exact_temperature=True` its exact rejection sampler ([`~sampling.exact_temperature_sample`]).
        """

        def draw(num: int, rows: torch.Tensor | None = None) -> torch.LongTensor:
            states = hidden_states if rows is None else hidden_states[rows]
            return self.sample_chunks(states, num_samples=num, generator=generator)

        if do_sample and temperature == 1.0:
            return draw(1)[0]
        if do_sample and exact_temperature:
            exact = exact_temperature_sample(draw, temperature, generator=generator, max_draws=max_draws)
            if not bool(exact.exact.all()):
                warnings.warn(
                    f"exact_temperature: {int((~exact.exact).sum())} of {len(exact.exact)} rows drew max_draws = "
                    f"{max_draws} head samples without accepting one, and took the batch approximation over them "
                    "instead. Raise max_draws, or use the batch approximation (exact_temperature=False, "
                    "num_candidates=...), which costs one head call of num_candidates samples per chunk.",
                    stacklevel=2,
                )
            return exact.samples
        # The mode, or the batch approximation: both need only the candidates' counts, then the chosen one's tokens.
        if do_sample:
            temperature = check_temperature(temperature)

        def choose(counts: torch.LongTensor) -> torch.LongTensor:  # do_sample=False: the first of the most frequent
            return _temperature_pick(counts, temperature, generator) if do_sample else counts.argmax(-1)

        latents = self.sample_latents(hidden_states, num_samples=num_candidates, generator=generator)
        return self.decode_chosen_candidates(latents, choose)


__all__ = [
    "CalmSamplingMixin",
    "ExactSampleOutput",
    "batch_temperature_sample",
    "candidate_counts",
    "check_temperature",
    "exact_temperature_sample",
    "mode_sample",
    "prefix_candidate_counts",
]
