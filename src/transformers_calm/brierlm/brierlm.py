"""BrierLM as an `evaluate` metric: the likelihood-free language-model score of CALM (arXiv 2510.27688).

This folder is an `evaluate` community-metric folder (this module, its card `README.md`, the Space's `app.py` and
`requirements.txt`). Load the metric

- from its Hub Space: `evaluate.load("<namespace>/brierlm")` (no transformers_calm needed);
- offline, wherever transformers_calm is installed: `evaluate.load(transformers_calm.BRIERLM_PATH)` or
  `transformers_calm.load_brierlm()`;
- from the root of the transformers-calm repository (which holds a thin `brierlm/brierlm.py` over this file):
  `evaluate.load("brierlm")`.

`evaluate` copies this file and the files it imports relatively (`estimator.py`, the estimator in plain torch) into
its module cache, or downloads them from the Space: this module may import only evaluate, datasets and siblings of
this folder, never transformers_calm.
"""

import datasets
import evaluate

from .estimator import MAX_N, brier_scores

_CITATION = """\
@article{shao2025calm,
  title   = {Continuous Autoregressive Language Models},
  author  = {Shao, Chenze and Li, Darren and Meng, Fandong and Zhou, Jie},
  journal = {arXiv preprint arXiv:2510.27688},
  year    = {2025}
}
"""

_DESCRIPTION = """\
BrierLM is a likelihood-free metric for language models. At every evaluated position the model draws two independent
samples x1, x2 of the next n tokens; with the reference y,
    1{x1[:n] = y[:n]} + 1{x2[:n] = y[:n]} - 1{x1[:n] = x2[:n]}
is an unbiased estimate of the Brier score 2 P(y[:n]) - sum_x P(x)^2 of the model's n-gram distribution. Brier-n is its
mean over positions, for n = 1..4, and BrierLM = 100 x the geometric mean of Brier-1..4 (reported as 0, with a
warning, when a Brier-n is <= 0). Higher is better. It needs only samples, so it scores models without likelihoods
(CALM) and ordinary language models alike.
"""

_KWARGS_DESCRIPTION = """
Args:
    samples_1 (`list` of `list` of `int`): the model's first sample of the next tokens at each evaluated position
        (at least `max_n` tokens each; only the first `max_n` are used).
    samples_2 (`list` of `list` of `int`): an independent second sample at the same positions.
    references (`list` of `list` of `int`): the true next tokens at the same positions.
    max_n (`int`, defaults to 4): longest n-gram; BrierLM is the geometric mean of Brier-1..max_n.
Returns:
    brier1, ..., brier{max_n} (`float`): the mean estimate of Brier-n over positions (between -1 and 1 in
        expectation; higher is better).
    brierlm (`float`): 100 x geometric mean of Brier-1..max_n, or 0 when one of them is <= 0.
Examples:
    >>> import evaluate
    >>> brierlm = evaluate.load("<namespace>/brierlm")  # or evaluate.load(transformers_calm.BRIERLM_PATH)
    >>> results = brierlm.compute(
    ...     samples_1=[[5, 6, 7, 8], [1, 2, 3, 4], [3, 3, 3, 3]],
    ...     samples_2=[[5, 6, 7, 9], [1, 2, 9, 9], [3, 3, 3, 3]],
    ...     references=[[5, 6, 7, 8], [1, 2, 3, 4], [3, 3, 4, 4]],
    ... )
    >>> [round(results[f"brier{n}"], 3) for n in range(1, 5)], round(results["brierlm"], 2)
    ([1.0, 1.0, 0.333, 0.333], 57.74)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class BrierLM(evaluate.Metric):
    """The BrierLM metric: Brier-1..max_n and BrierLM from two model samples and the reference at every position."""

    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # One row per evaluated position; each a token-id sequence of at least max_n tokens.
            features=datasets.Features(
                {
                    "samples_1": datasets.Sequence(datasets.Value("int64")),
                    "samples_2": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
            codebase_urls=["https://github.com/shaochenze/calm"],
            reference_urls=["https://arxiv.org/abs/2510.27688", "https://github.com/shaochenze/calm"],
        )

    def _compute(self, samples_1, samples_2, references, max_n=MAX_N):
        return brier_scores(samples_1, samples_2, references, max_n=max_n)
