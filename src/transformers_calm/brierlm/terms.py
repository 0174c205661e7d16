"""[`BrierTerms`]: what a roll-out returns for one batch of blocks.

It has a module of its own because both roll-outs (`causal_lm.py`, `calm.py`) build it and `protocol.py`, which
dispatches to them, returns it: defined in either place it would make an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .estimator import brier_terms

__all__ = ["BrierTerms"]


@dataclass
class BrierTerms:
    """Per-position Brier terms of one batch of blocks (output of [`model_brier_terms`]).

    Attributes:
        terms (`torch.FloatTensor` `(batch, positions, max_n)`): the sampled estimates (average them for Brier-n).
        exact_terms (`torch.FloatTensor` `(batch, positions, max_n)`, *optional*): models with logits only:
            `2 P(y[:n]) - sum_x P(x)^2` with P(y[:n]) exact (teacher-forced chain rule) and the collision term exact
            for n = 1 and, for n > 1, exact by enumeration (small vocabularies) or a Monte Carlo estimate.
        exact_collision (`str`, *optional*): "enumeration", "monte_carlo", or "exact" (max_n = 1).
        samples_1, samples_2, references (`torch.LongTensor` `(batch, positions, max_n)`, *optional*): the samples
            behind `terms` when `terms == brier_terms(samples_1, samples_2, references)` (not for CALM chunk
            positions with K < max_n, whose accuracy and collision terms come from different samples).
        positions (`str`): "chunk" (CALM chunk starts) or "token" (every token).
    """

    terms: torch.Tensor
    exact_terms: torch.Tensor | None = None
    exact_collision: str | None = None
    samples_1: torch.Tensor | None = None
    samples_2: torch.Tensor | None = None
    references: torch.Tensor | None = None
    positions: str = "token"

    @classmethod
    def from_samples(cls, samples_1, samples_2, references, max_n: int, positions: str = "token") -> BrierTerms:
        """The terms of two samples against the references (`brier_terms`), keeping the samples behind them."""
        return cls(
            terms=brier_terms(samples_1, samples_2, references, max_n),
            samples_1=samples_1,
            samples_2=samples_2,
            references=references,
            positions=positions,
        )
