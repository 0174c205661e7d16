"""The BrierLM estimator on given samples (Shao et al., 2025, arXiv 2510.27688, section 4). Plain torch.

The Brier score of an outcome y under a distribution P is `2 P(y) - sum_x P(x)^2` (higher is better; 1 for a model
that puts all its mass on y). With two independent samples x1, x2 of the model,

    1{x1 = y} + 1{x2 = y} - 1{x1 = x2}

is an unbiased estimate of it, so it needs samples only, no likelihood. Brier-n treats the next n tokens as the
outcome (compared with cumulative products of per-token equalities, as the official code does). Brier-1..4 are
averaged over the evaluated positions and

    BrierLM = 100 * (Brier-1 * Brier-2 * Brier-3 * Brier-4) ** (1/4).

When a Brier-n is <= 0 the geometric mean is undefined: BrierLM is reported as 0 and a warning says which Brier-n
caused it (the official code clamps the product at 0, so it would report a positive number when two of them are
negative; we do not).

This file imports nothing but the standard library and torch, and nothing from the rest of `transformers_calm`: the
`evaluate` module next to it (`brierlm.py`) imports it relatively, and `evaluate` copies both files, alone, into its
module cache or from a Hub Space. Keep it that way.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

__all__ = [
    "MAX_N",
    "brier_scores",
    "brier_terms",
    "brierlm_from_briers",
    "check_max_n",
    "prefix_match",
    "scores_from_terms",
]

# The longest n-gram of the paper's BrierLM (the geometric mean of Brier-1..4).
MAX_N = 4


def check_max_n(max_n) -> int:
    """`max_n`, checked to be a positive integer (a bool is refused, though it is an int)."""
    if isinstance(max_n, bool) or not isinstance(max_n, int) or max_n < 1:
        raise ValueError(f"max_n must be a positive integer, got {max_n!r}.")
    return max_n


def _as_ngrams(sequences, max_n: int, name: str) -> torch.LongTensor:
    """`(..., max_n)` token ids: the first `max_n` tokens of every sequence (a tensor `(..., L)` or a list of lists)."""
    if isinstance(sequences, torch.Tensor):
        if sequences.dim() < 1 or sequences.shape[-1] < max_n:
            raise ValueError(
                f"{name} must have a last dimension of at least max_n = {max_n}, got {tuple(sequences.shape)}."
            )
        return sequences[..., :max_n].long()
    rows = []
    for index, sequence in enumerate(sequences):
        sequence = list(sequence.tolist() if isinstance(sequence, torch.Tensor) else sequence)
        if len(sequence) < max_n:
            raise ValueError(
                f"{name}[{index}] has {len(sequence)} tokens; every sequence needs at least max_n = {max_n} (pass a "
                "smaller max_n to score shorter n-grams)."
            )
        rows.append(sequence[:max_n])
    # reshape: an empty list still gives a (0, max_n) tensor, so that the shape check below can name the positions.
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), max_n)


def prefix_match(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`1{a[:n] = b[:n]}` for n = 1..len along the last dimension (float64).

    A cumulative product of per-token equalities, as the official code computes it: a mismatch at token k rules out
    every n > k, also when later tokens agree again.
    """
    return (a == b).long().cumprod(-1).to(torch.float64)


def brier_terms(samples_1, samples_2, references, max_n: int = MAX_N) -> torch.Tensor:
    """Per-position Brier estimates `1{x1[:n]=y[:n]} + 1{x2[:n]=y[:n]} - 1{x1[:n]=x2[:n]}` for n = 1..max_n.

    Args:
        samples_1, samples_2: two independent model samples of the next tokens at every position: tensors `(..., L)`
            or lists of token-id sequences, with L >= max_n (only the first max_n tokens are used).
        references: the true next tokens, same layout.
        max_n: the longest n-gram.

    Returns:
        `torch.float64` tensor `(..., max_n)` with values in {-1, 0, 1, 2}; its mean over positions estimates Brier-n
        without bias.
    """
    max_n = check_max_n(max_n)
    x1 = _as_ngrams(samples_1, max_n, "samples_1")
    x2 = _as_ngrams(samples_2, max_n, "samples_2")
    y = _as_ngrams(references, max_n, "references")
    if not (x1.shape == x2.shape == y.shape):
        raise ValueError(
            f"samples_1, samples_2 and references must describe the same positions, got {tuple(x1.shape[:-1])}, "
            f"{tuple(x2.shape[:-1])} and {tuple(y.shape[:-1])}."
        )
    return prefix_match(x1, y) + prefix_match(x2, y) - prefix_match(x1, x2)


def brierlm_from_briers(briers: Sequence[float]) -> float:
    """100 x the geometric mean of Brier-1..N, or 0 (with a warning saying why) when one of them is <= 0."""
    briers = [float(b) for b in briers]
    if not briers:
        raise ValueError("briers is empty.")
    if any(math.isnan(b) for b in briers):
        return float("nan")
    bad = [f"Brier-{n} = {b:.4g}" for n, b in enumerate(briers, start=1) if b <= 0]
    if bad:
        warnings.warn(
            f"BrierLM is reported as 0 because {', '.join(bad)} <= 0: the geometric mean of Brier-1..{len(briers)} "
            "is only defined for positive values. A non-positive Brier-n means the model's two samples agree with "
            "each other at least twice as often as each matches the reference (typically an untrained or collapsed "
            "model), or too few positions were scored for a noisy estimate.",
            stacklevel=2,
        )
        return 0.0
    # Through logs: the product of four small Brier-n would lose precision for weak models.
    return 100.0 * math.exp(sum(math.log(b) for b in briers) / len(briers))


def scores_from_terms(terms: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """`{brier1..brierN, brierlm}` of per-position terms `(..., N)`: means over all positions, then BrierLM."""
    if terms.numel() == 0:
        raise ValueError("No position to score.")
    means = terms.reshape(-1, terms.shape[-1]).to(torch.float64).mean(0).tolist()
    scores = {f"{prefix}brier{n}": value for n, value in enumerate(means, start=1)}
    scores[f"{prefix}brierlm"] = brierlm_from_briers(means)
    return scores


def brier_scores(samples_1, samples_2, references, max_n: int = MAX_N) -> dict[str, float]:
    """Brier-1..max_n (means over positions) and BrierLM from two samples and the reference at every position.

    This is what the `evaluate` module's `compute` returns: `{"brier1": ..., ..., "brier4": ..., "brierlm": ...}`.
    """
    return scores_from_terms(brier_terms(samples_1, samples_2, references, max_n=max_n))
