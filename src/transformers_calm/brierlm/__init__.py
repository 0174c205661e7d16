"""BrierLM: a likelihood-free language-model metric (Shao et al., 2025, arXiv 2510.27688, section 4), for CALM and for
any transformers causal LM.

At every evaluated position the model draws two independent samples x1, x2 of the next n tokens; with the reference y,
`1{x1 = y} + 1{x2 = y} - 1{x1 = x2}` estimates the Brier score `2 P(y) - sum_x P(x)^2` without bias, from samples
only. Brier-n is its mean over positions and BrierLM = 100 x the geometric mean of Brier-1..4 (0, with a warning,
when a Brier-n is <= 0).

Modules, one concept each:

- `estimator`: the estimator on given samples ([`brier_terms`], [`brier_scores`], [`brierlm_from_briers`],
  [`scores_from_terms`]); plain torch, importing nothing else of the package.
- `brierlm`: the `evaluate` metric over the estimator. This folder is the metric's folder, laid out as an `evaluate`
  community metric (`brierlm.py`, card `README.md`, Space `app.py`, `requirements.txt`): `evaluate.load(BRIERLM_PATH)`
  / [`load_brierlm`] work offline; the files of `SPACE_FILES`, pushed to a Hub Space, make
  `evaluate.load("<namespace>/brierlm")` work without this package.
- `cache_rows`: roll-outs of many positions at once through a batch's KV cache.
- `causal_lm`: the samples (and exact terms) of a token-level causal LM.
- `calm`: the samples of CALM, through `CalmForCausalLM`'s public sampling API only ([`is_calm_model`]).
- `terms`: [`BrierTerms`], the per-position terms a roll-out returns.
- `protocol`: blocks ([`make_blocks`]), per-block seeding, the dispatch ([`model_brier_terms`]) and the protocol over a
  data set ([`score_model`]); [`chunk_aligned`] keeps a token-level LM's chunk-start positions.

This package does not import `evaluate` (only [`load_brierlm`] does, when called), so it stays optional.
"""

from .calm import is_calm_model
from .estimator import MAX_N, brier_scores, brier_terms, brierlm_from_briers, scores_from_terms
from .protocol import (
    BRIERLM_PATH,
    DEFAULT_CONTEXT_LENGTH,
    SPACE_FILES,
    chunk_aligned,
    load_brierlm,
    make_blocks,
    model_brier_terms,
    score_model,
)
from .terms import BrierTerms

__all__ = [
    "BRIERLM_PATH",
    "DEFAULT_CONTEXT_LENGTH",
    "MAX_N",
    "SPACE_FILES",
    "BrierTerms",
    "brier_scores",
    "brier_terms",
    "brierlm_from_briers",
    "chunk_aligned",
    "is_calm_model",
    "load_brierlm",
    "make_blocks",
    "model_brier_terms",
    "score_model",
    "scores_from_terms",
]
