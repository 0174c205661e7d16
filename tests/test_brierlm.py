"""Tests of BrierLM: the estimator, its unbiasedness, the `evaluate` metric folder (a publishable Hub Space),
`score_model` for CALM and for a Llama, parity with the official code's golden Brier values, and the example script.

Tiny models, CPU, offline (conftest sets HF_HUB_OFFLINE and a temporary HF_MODULES_CACHE): CALM from `factories`, the
token-level LMs and the reference computations here. Statistical checks compare a sampled mean with an exact (or
large-sample) value within five standard errors estimated from the samples themselves; seeds are fixed, so the tests
are deterministic.
"""

import ast
import collections
import fnmatch
import json
import math
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from factories import randomize_head, tiny_calm
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from transformers_calm import CalmForCausalLM
from transformers_calm.brierlm import (
    BRIERLM_PATH,
    SPACE_FILES,
    brier_scores,
    brier_terms,
    brierlm_from_briers,
    is_calm_model,
    load_brierlm,
    model_brier_terms,
    score_model,
)
from transformers_calm.brierlm.cache_rows import CacheRows, full_cache_layers
from transformers_calm.compat import CACHE_NAME

REPO_ROOT = Path(__file__).resolve().parent.parent
MAX_N = 4
LLAMA_KWARGS = {
    "vocab_size": 5,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
    "initializer_range": 0.3,  # peaked next-token distributions, so that Brier-3/4 are not tiny
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}


def tiny_llama(seed=0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(**{**LLAMA_KWARGS, **overrides})
    return LlamaForCausalLM._from_config(config, attn_implementation="eager").eval()


def tiny_brier_calm(K, seed=0, vocab_size=7) -> CalmForCausalLM:
    """A tiny CALM over a toy vocabulary, with chunks of K tokens and a small autoencoder (l = 4), whose head samples
    spread widely (output layer weights of std 1), so that Brier-n are neither 0 nor 1."""
    autoencoder = {
        "vocab_size": vocab_size,
        "patch_size": K,
        "latent_size": 4,
        "hidden_size": 16,
        "intermediate_size": 24,
        "pad_token_id": 0,
    }
    model = tiny_calm(seed, autoencoder=autoencoder, backbone={"max_position_embeddings": 32}, random_head=False)
    return randomize_head(model, weight_std=1.0, bias_std=0.5)


@torch.no_grad()
def llama_self_sample(model, length, seed) -> torch.LongTensor:
    """A block `(1, length)` sampled from the model itself (so that the accuracy terms are often non-zero)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, 1), generator=generator)
    while ids.shape[1] < length:
        probs = model(ids).logits[:, -1].softmax(-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return ids


@torch.no_grad()
def calm_likely_block(model, length, seed) -> torch.LongTensor:
    """A block `(1, length)` of the model's most frequent chunks (mode of 200 head samples per step)."""
    K = model.config.patch_size
    prompt = torch.ones((1, K), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    return model.generate(
        prompt, max_new_tokens=length - K, generator=generator, eos_token_id=None, pad_token_id=0, do_sample=False
    )


def lexicographic_index(tokens, vocab_size) -> int:
    index = 0
    for token in tokens:
        index = index * vocab_size + int(token)
    return index


@torch.no_grad()
def enumerated_llama_brier(model, block, max_n=MAX_N) -> torch.Tensor:
    """Exact Brier-n `(positions, max_n)` of every position i = 0..T-1-max_n by brute force: the probability of every
    max_n-gram after x_0..x_i from full forward passes (no cache), marginals for shorter n-grams."""
    V = model.config.vocab_size
    grams = torch.cartesian_prod(*[torch.arange(V)] * max_n)  # lexicographic
    length = block.shape[1]
    exact = torch.empty((length - max_n, max_n), dtype=torch.float64)
    for i in range(length - max_n):
        ids = torch.cat([block[:, : i + 1].expand(len(grams), -1), grams], dim=1)
        logp = model(ids).logits.double().log_softmax(-1)[:, i : i + max_n]
        probs = logp.gather(-1, grams.unsqueeze(-1)).squeeze(-1).sum(-1).exp()
        for n in range(1, max_n + 1):
            marginal = probs.reshape(V**n, -1).sum(-1)
            y = lexicographic_index(block[0, i + 1 : i + 1 + n], V)
            exact[i, n - 1] = 2 * marginal[y] - marginal.pow(2).sum()
    return exact


def assert_unbiased(per_block, exact, extra_se=None, label=""):
    """per_block: `(R, max_n)` means of independent blocks; exact: `(max_n,)` expected values."""
    R = per_block.shape[0]
    mean = per_block.mean(0)
    se = per_block.std(0) / math.sqrt(R)
    if extra_se is not None:
        se = torch.sqrt(se**2 + extra_se**2)
    tolerance = 5 * se + 6 / R
    assert ((mean - exact).abs() <= tolerance).all(), (
        f"{label}: sampled {mean.tolist()} vs exact {exact.tolist()} (tolerance {tolerance.tolist()})"
    )


# ------------------------------------------------------------------------------------------------------ estimator


def test_brier_terms_by_hand():
    samples_1 = [[5, 6, 7, 8], [1, 2, 3, 4], [3, 3, 3, 3]]
    samples_2 = [[5, 6, 7, 9], [1, 2, 9, 9], [3, 3, 3, 3]]
    references = [[5, 6, 7, 8], [1, 2, 3, 4], [3, 3, 4, 4]]
    terms = brier_terms(samples_1, samples_2, references)
    expected = [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, -1, -1]]  # hits count once per sample, the collision once
    assert terms.tolist() == expected
    scores = brier_scores(samples_1, samples_2, references)
    assert scores["brier3"] == pytest.approx(1 / 3)
    assert scores["brierlm"] == pytest.approx(100 * (1 / 9) ** 0.25)
    # A mismatch at token k rules out every n > k (cumulative product), also when later tokens agree again.
    assert brier_terms([[1, 9, 3, 4]], [[7, 7, 7, 7]], [[1, 2, 3, 4]]).tolist() == [[1, 0, 0, 0]]


def test_brier_terms_lengths_and_max_n():
    with pytest.raises(ValueError, match="at least max_n"):
        brier_terms([[1, 2, 3]], [[1, 2, 3]], [[1, 2, 3]])
    short = brier_scores([[1, 2]], [[1, 3]], [[1, 2]], max_n=2)
    assert set(short) == {"brier1", "brier2", "brierlm"} and short["brier2"] == 1.0
    longer = brier_terms([[1, 2, 3, 4, 5, 6]], [[1, 2, 3, 4, 0, 0]], [[1, 2, 3, 4, 9]])  # only 4 tokens are used
    assert longer.tolist() == [[1, 1, 1, 1]]
    with pytest.raises(ValueError, match="same positions"):
        brier_terms([[1, 2, 3, 4]] * 2, [[1, 2, 3, 4]], [[1, 2, 3, 4]] * 2)


def test_brierlm_is_zero_with_a_reason_when_a_brier_is_not_positive():
    assert brierlm_from_briers([0.5, 0.5, 0.5, 0.5]) == pytest.approx(50.0)
    with pytest.warns(UserWarning, match=r"Brier-3 = -0.1 <= 0"):
        assert brierlm_from_briers([0.5, 0.4, -0.1, 0.2]) == 0.0
    # Two negative Brier-n: the official max(product, 0) ** (1/4) would be positive; we report 0.
    with pytest.warns(UserWarning, match="Brier-1 = -0.5, Brier-2 = -0.5"):
        assert brierlm_from_briers([-0.5, -0.5, 0.5, 0.5]) == 0.0


def test_estimator_is_unbiased_on_a_toy_distribution():
    """x1, x2 ~ P and y ~ Q over 3^4 four-grams: the mean estimate equals E_y[2 P_n(y) - sum P_n^2] (enumerated)."""
    V, num = 3, 40_000
    generator = torch.Generator().manual_seed(0)
    P = torch.rand(V**MAX_N, generator=generator, dtype=torch.float64).pow(4)
    P /= P.sum()
    Q = torch.rand(V**MAX_N, generator=generator, dtype=torch.float64)
    Q = 0.5 * Q / Q.sum() + 0.5 * P
    grams = torch.cartesian_prod(*[torch.arange(V)] * MAX_N)
    x1 = grams[torch.multinomial(P, num, replacement=True, generator=generator)]
    x2 = grams[torch.multinomial(P, num, replacement=True, generator=generator)]
    y = grams[torch.multinomial(Q, num, replacement=True, generator=generator)]
    exact = torch.empty(MAX_N, dtype=torch.float64)
    for n in range(1, MAX_N + 1):
        P_n, Q_n = P.reshape(V**n, -1).sum(-1), Q.reshape(V**n, -1).sum(-1)
        exact[n - 1] = 2 * (P_n * Q_n).sum() - P_n.pow(2).sum()
    terms = brier_terms(x1, x2, y)
    assert_unbiased(terms, exact, label="toy")
    # The indicators of one sample only (without the collision term) are biased: the check has power.
    biased = 2 * (x1 == y).long().cumprod(-1).double()
    assert ((biased.mean(0) - exact).abs() > 5 * biased.std(0) / math.sqrt(num)).all()


# ------------------------------------------------------------------------------------------- the evaluate module


# The headings of evaluate's module card template, in order (`evaluate-cli create`, templates/README.md).
CARD_SECTIONS = [
    "# Metric Card for BrierLM",
    "## Metric Description",
    "## How to Use",
    "### Inputs",
    "### Output Values",
    "### Examples",
    "## Limitations and Bias",
    "## Citation",
    "## Further References",
]
SPACE_COLORS = {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}  # the Hub's Space colours
README_EXAMPLE = {
    "samples_1": [[5, 6, 7, 8], [1, 2, 3, 4], [3, 3, 3, 3]],
    "samples_2": [[5, 6, 7, 9], [1, 2, 9, 9], [3, 3, 3, 3]],
    "references": [[5, 6, 7, 8], [1, 2, 3, 4], [3, 3, 4, 4]],
}


def test_metric_files_are_in_place():
    assert (Path(BRIERLM_PATH) / "brierlm.py").is_file()
    assert (Path(BRIERLM_PATH) / "README.md").is_file()
    assert (REPO_ROOT / "brierlm" / "brierlm.py").is_file()
    assert all((Path(BRIERLM_PATH) / name).is_file() for name in SPACE_FILES)


def test_metric_folder_is_laid_out_as_an_evaluate_community_metric():
    """The card's metadata is what a Hub Space and `evaluate` read; the card has the template's sections; the Space
    installs what the module imports; the wheel ships the folder's non-Python files."""
    from huggingface_hub import metadata_load
    from packaging.requirements import Requirement

    folder = Path(BRIERLM_PATH)
    meta = metadata_load(folder / "README.md")
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and meta["pinned"] is False
    assert {"evaluate", "metric"} <= set(meta["tags"])
    assert meta["title"] == "BrierLM" and meta["emoji"] and len(meta["description"]) > 50
    assert {meta["colorFrom"], meta["colorTo"]} <= SPACE_COLORS
    assert isinstance(meta["sdk_version"], str) and len(meta["sdk_version"].split(".")) == 3
    card = (folder / "README.md").read_text(encoding="utf-8")
    offsets = [card.find(f"\n{heading}\n") for heading in CARD_SECTIONS]
    assert -1 not in offsets and offsets == sorted(offsets), dict(zip(CARD_SECTIONS, offsets, strict=True))

    requirements = (folder / "requirements.txt").read_text().splitlines()
    assert {Requirement(line).name for line in requirements if line.strip()} >= {"evaluate", "datasets", "torch"}

    # The README's publishing recipe (`upload_folder(..., allow_patterns=list(SPACE_FILES))`) selects exactly them.
    from huggingface_hub.utils import filter_repo_objects

    files = [path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()]
    assert set(filter_repo_objects(files, allow_patterns=list(SPACE_FILES))) == set(SPACE_FILES)

    tomllib = pytest.importorskip("tomllib")
    package_data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for name in SPACE_FILES:
        if not name.endswith(".py"):  # modules ship with the package anyway
            assert any(fnmatch.fnmatch(f"brierlm/{name}", p) for p in package_data["transformers_calm"]), name


def _imported_roots(path: Path) -> tuple[set[str], set[str]]:
    """(absolute top-level modules, relative modules) that a file imports, anywhere in it."""
    absolute, relative = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            absolute |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            (relative if node.level else absolute).add(node.module.partition(".")[0])
    return absolute, relative


def test_metric_module_imports_only_evaluate_datasets_torch_and_its_folder():
    """What `evaluate` fetches from a Space: the module, and the files it imports relatively (one level: evaluate does
    not follow the imports of those), so the estimator may import only the standard library and torch."""
    from evaluate.loading import get_imports

    folder = Path(BRIERLM_PATH)
    imports = get_imports(str(folder / "brierlm.py"))  # evaluate's own parser
    assert {name for kind, name, *_ in imports if kind == "library"} <= {"datasets", "evaluate"}
    assert {name for kind, name, *_ in imports if kind == "internal"} == {"estimator"}
    assert {kind for kind, *_ in imports} <= {"library", "internal"}
    absolute, relative = _imported_roots(folder / "brierlm.py")
    assert absolute <= {"datasets", "evaluate"} and relative == {"estimator"}
    assert all(f"{name}.py" in SPACE_FILES for name in relative)
    absolute, relative = _imported_roots(folder / "estimator.py")
    assert not relative and absolute - set(sys.stdlib_module_names) == {"torch"}


def test_space_app_launches_the_widget_of_the_module(monkeypatch, tmp_path):
    """app.py, as a Space runs it: it loads the metric of its folder and hands it to evaluate's Gradio widget."""
    import runpy

    import evaluate
    import evaluate.utils

    launched = []
    monkeypatch.setattr(evaluate.utils, "launch_gradio_widget", launched.append)
    monkeypatch.setattr(evaluate.config, "HF_METRICS_CACHE", str(tmp_path))
    runpy.run_path(str(Path(BRIERLM_PATH) / "app.py"), run_name="__main__")
    [module] = launched
    assert isinstance(module, evaluate.Metric) and type(module).__name__ == "BrierLM"
    assert list(module.features) == ["samples_1", "samples_2", "references"]
    assert module.compute(**README_EXAMPLE) == pytest.approx(brier_scores(**README_EXAMPLE), abs=1e-12)


SPACE_CHILD = """
import json, os, runpy, sys, types

import pandas as pd

space_root, space_id, full_copy, expected = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
example = json.loads(sys.argv[5])
space_dir = os.path.join(space_root, space_id)

# A stand-in for gradio (the Space SDK installs the real one): records what evaluate's widget builds.
widget = {}
class Component:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
class Interface:
    def __init__(self, fn, inputs, outputs, **kwargs):
        widget.update(fn=fn, inputs=inputs, outputs=outputs, **kwargs)
    def launch(self):
        widget["launched"] = True
gradio = types.ModuleType("gradio")
gradio.Interface = Interface
gradio.inputs = types.SimpleNamespace(Dataframe=Component)
gradio.outputs = types.SimpleNamespace(Textbox=Component)
sys.modules["gradio"] = gradio

import evaluate

def check(scores, label):
    assert scores.keys() == expected.keys(), (label, scores)
    assert all(abs(scores[key] - expected[key]) < 1e-12 for key in expected), (label, scores)

# 1. evaluate.load("<namespace>/brierlm") from the Hub: evaluate fetches <name>.py from the Space, then the files it
# imports relatively, by name. Here the Space's "resolve" URL points at a local copy of the SPACE_FILES.
evaluate.config.HUB_EVALUATE_URL = space_root + "/{path}/{name}"
metric = evaluate.load(space_id)
assert type(metric).__module__.startswith("evaluate_modules."), type(metric).__module__
check(metric.compute(**example), "hub")

# 2. evaluate.load(folder) on a copy of the whole package folder.
check(evaluate.load(full_copy).compute(**example), "copied folder")

# 3. The Space's app.py (python app.py puts its folder first on sys.path; the widget reads README.md from there).
sys.path.insert(0, space_dir)
runpy.run_path(os.path.join(space_dir, "app.py"), run_name="__main__")
assert widget["launched"] and "# Metric Card for BrierLM" in widget["article"], widget.get("article")
assert tuple(widget["inputs"].kwargs["headers"]) == ("samples_1", "samples_2", "references")
table = pd.DataFrame({name: [json.dumps(row) for row in rows] for name, rows in example.items()})
check(widget["fn"](table), "widget")
assert not any(name.partition(".")[0] == "transformers_calm" for name in sys.modules)
"""


@pytest.mark.slow
def test_metric_loads_from_the_space_files_without_the_package(tmp_path, run_without_package):
    """The SPACE_FILES, copied out of the package as a Hub Space holds them, load with `evaluate.load("<ns>/brierlm")`
    (through evaluate's Hub loader), as a folder, and through the Space's app.py, where transformers_calm cannot be
    imported."""
    space_dir = tmp_path / "spaces" / "calm-test" / "brierlm"
    space_dir.mkdir(parents=True)
    for name in SPACE_FILES:
        shutil.copy(Path(BRIERLM_PATH) / name, space_dir / name)
    full_copy = tmp_path / "copy" / "brierlm"
    shutil.copytree(BRIERLM_PATH, full_copy, ignore=shutil.ignore_patterns("__pycache__"))
    workdir = tmp_path / "elsewhere"  # no ./calm-test/brierlm/brierlm.py relative to the working directory
    workdir.mkdir()
    expected = brier_scores(**README_EXAMPLE)
    args = [tmp_path / "spaces", "calm-test/brierlm", full_copy, json.dumps(expected), json.dumps(README_EXAMPLE)]
    run_without_package(
        SPACE_CHILD, args, cwd=workdir, HF_EVALUATE_OFFLINE="1", HF_METRICS_CACHE=str(tmp_path / "metrics")
    )


def _random_samples(num=50, length=5, vocab_size=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (num, length), generator=generator).tolist() for _ in range(3)]


def test_evaluate_module_loads_offline_and_matches_function(tmp_path):
    import evaluate

    samples_1, samples_2, references = _random_samples()
    expected = brier_scores(samples_1, samples_2, references)
    cache = {"cache_dir": str(tmp_path)}  # evaluate's per-metric data folder (lock files)
    for metric in (evaluate.load(BRIERLM_PATH, **cache), load_brierlm(**cache)):
        got = metric.compute(samples_1=samples_1, samples_2=samples_2, references=references)
        assert got == pytest.approx(expected, abs=1e-12)
    # max_n is a compute argument; sequences only need max_n tokens then.
    short = [[row[:2] for row in part] for part in (samples_1, samples_2, references)]
    got = load_brierlm(**cache).compute(samples_1=short[0], samples_2=short[1], references=short[2], max_n=2)
    assert got == pytest.approx(brier_scores(*short, max_n=2), abs=1e-12)
    # add_batch then compute, as with any evaluate metric.
    metric = load_brierlm(**cache)
    metric.add_batch(samples_1=samples_1[:20], samples_2=samples_2[:20], references=references[:20])
    metric.add_batch(samples_1=samples_1[20:], samples_2=samples_2[20:], references=references[20:])
    assert metric.compute() == pytest.approx(expected, abs=1e-12)


def test_bare_evaluate_load_works_from_the_repository_root(monkeypatch, tmp_path):
    import evaluate

    monkeypatch.chdir(REPO_ROOT)
    samples_1, samples_2, references = _random_samples(seed=1)
    got = evaluate.load("brierlm", cache_dir=str(tmp_path)).compute(
        samples_1=samples_1, samples_2=samples_2, references=references
    )
    assert got == pytest.approx(brier_scores(samples_1, samples_2, references), abs=1e-12)


# ------------------------------------------------------------------------------------- official golden values


@pytest.fixture(scope="module")
def official_calm(official_dir):
    from transformers_calm.convert_official import convert_calm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convert_calm(str(official_dir / "calm"), str(official_dir / "autoencoder"))
    model.set_attn_implementation("eager")
    return model.eval()


@pytest.mark.parametrize(
    "ids, latents, prefix",
    [
        ("brier_input_ids", "brier_fwd_latent_predictions", "brier_fwd"),
        ("input_ids", "fwd_eval_latent_predictions", "fwd_eval"),
    ],
)
def test_official_brier_values(official_calm, official_tensors, monkeypatch, tmp_path, ids, latents, prefix):
    """The first 2 of the official forward's 8 head samples, decoded by argmax, against the true chunks 1..N-1."""
    K = official_calm.config.patch_size
    input_ids, latent = official_tensors[ids], official_tensors[latents]
    official = [official_tensors[f"{prefix}_brier{n}"].item() for n in range(1, MAX_N + 1)]
    with torch.no_grad():
        decoded = official_calm.decode_latents(latent[:2])  # (2, B * (N - 1), K)
    references = input_ids[:, K:].reshape(-1, K)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fwd_eval's Brier-n are negative
        scores = brier_scores(decoded[0], decoded[1], references)
        via_module = load_brierlm(cache_dir=str(tmp_path)).compute(
            samples_1=decoded[0].tolist(), samples_2=decoded[1].tolist(), references=references.tolist()
        )
    got = [scores[f"brier{n}"] for n in range(1, MAX_N + 1)]
    assert torch.tensor(got, dtype=torch.float32).tolist() == official  # exact: ratios of small counts
    assert via_module == pytest.approx(scores, abs=1e-12)

    # score_model's chunk-aligned path (K >= 4) on the same input, with the head returning the official samples.
    batch, num_chunks = input_ids.shape[0], input_ids.shape[1] // K

    def official_latents(hidden, num_samples=None, noise=None, generator=None):
        assert hidden.shape[:3] == (batch, 2, num_chunks - 1)
        return latent[:2].reshape(2, batch, num_chunks - 1, -1).transpose(0, 1)

    # The public sampling API: sample_chunks = decode_latents(sample_latents(...)).
    monkeypatch.setattr(official_calm, "sample_latents", official_latents)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = score_model(official_calm, input_ids=input_ids, batch_size=batch, progress=False)
    assert [result[f"brier{n}"] for n in range(1, MAX_N + 1)] == pytest.approx(got, abs=1e-12)
    assert result["num_positions"] == batch * (num_chunks - 1) and result["positions"] == "chunk"
    if min(got) <= 0:
        assert result["brierlm"] == 0.0
    else:
        assert result["brierlm"] == pytest.approx(100 * math.prod(got) ** 0.25)


# --------------------------------------------------------------------------------------------- roll-out machinery


@torch.no_grad()
def test_cache_rows_continue_exactly_like_a_full_forward():
    """A row continued from a prefix of a batch's KV cache (holes masked out) equals the full forward pass."""
    llama = tiny_llama()
    ids = torch.randint(0, 5, (2, 9), generator=torch.Generator().manual_seed(0))
    full = llama(ids, use_cache=True)

    def forward(tokens, mask, position_ids, cache):
        return llama(
            input_ids=tokens, attention_mask=mask, position_ids=position_ids, use_cache=True, **{CACHE_NAME: cache}
        ).logits

    blocks, lengths = torch.tensor([0, 1, 1, 0]), torch.tensor([1, 3, 6, 7])
    rows = CacheRows(forward, full_cache_layers(getattr(full, CACHE_NAME), 9), blocks, lengths)
    next_two = torch.stack([ids[b, n : n + 2] for b, n in zip(blocks.tolist(), lengths.tolist(), strict=True)])
    got = rows.feed(next_two[:, :1], 1)
    got = torch.cat([got, rows.feed(next_two[:, 1:], 1)], dim=1)
    expected = torch.stack([full.logits[b, n : n + 2] for b, n in zip(blocks.tolist(), lengths.tolist(), strict=True)])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    calm = tiny_brier_calm(K=2)
    ids = torch.randint(1, 7, (2, 12), generator=torch.Generator().manual_seed(1))
    full = calm(input_ids=ids, use_cache=True)

    def calm_forward(tokens, mask, position_ids, cache):
        return calm(
            input_ids=tokens, chunk_attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True
        ).last_hidden_state

    rows = CacheRows(calm_forward, full_cache_layers(full.cache, 6), blocks, torch.tensor([1, 2, 4, 5]))
    chunks = torch.stack([ids[b, 2 * n : 2 * n + 2] for b, n in zip(blocks.tolist(), [1, 2, 4, 5], strict=True)])
    expected = torch.stack([full.last_hidden_state[b, n] for b, n in zip(blocks.tolist(), [1, 2, 4, 5], strict=True)])
    torch.testing.assert_close(rows.feed(chunks, 1)[:, -1], expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- Llama: unbiasedness


@pytest.fixture(scope="module")
def llama_case():
    model = tiny_llama(seed=3)
    block = llama_self_sample(model, length=10, seed=0)
    return model, block, enumerated_llama_brier(model, block)


def test_llama_exact_brier_matches_enumeration(llama_case):
    model, block, exact = llama_case
    result = score_model(model, input_ids=block, seed=0, progress=False, exact_collision=True)
    assert result["exact_collision"] == "enumeration"
    expected = exact.mean(0).tolist()
    assert [result[f"exact_brier{n}"] for n in range(1, MAX_N + 1)] == pytest.approx(expected, abs=1e-6)
    assert result["num_positions"] == block.shape[1] - MAX_N and result["positions"] == "token"
    # None picks enumeration for this 5-token vocabulary (5 ** 3 prefixes per position).
    auto = score_model(model, input_ids=block, seed=0, progress=False)
    assert auto["exact_collision"] == "enumeration" and auto["exact_brier4"] == pytest.approx(expected[3], abs=1e-6)


def test_exact_brier_matches_enumeration_for_gpt2_with_sdpa():
    """Absolute position embeddings and SDPA: the cache roll-outs still continue each position exactly."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=5, n_embd=16, n_layer=2, n_head=2, n_positions=32, initializer_range=0.3)
    config.bos_token_id = config.eos_token_id = None
    model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa").eval()
    block = llama_self_sample(model, length=9, seed=1)
    expected = enumerated_llama_brier(model, block).mean(0).tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = score_model(model, input_ids=block, progress=False)
    assert [result[f"exact_brier{n}"] for n in range(1, MAX_N + 1)] == pytest.approx(expected, abs=1e-6)


@pytest.mark.filterwarnings("ignore:BrierLM is reported as 0")  # a random Llama
@pytest.mark.parametrize("K", [2, 4])
def test_llama_chunk_positions_are_the_token_positions_that_start_a_chunk(llama_case, K):
    """positions='chunk' keeps the positions i = cK - 1 (n-gram x_{cK..}, the n-grams CALM's chunk-aligned estimate
    scores, same context), with the draws of the every-token run."""
    model, block, exact = llama_case
    blocks = block.expand(3, -1)
    token = model_brier_terms(model, blocks, seed=2)
    chunk = model_brier_terms(model, blocks, seed=2, positions="chunk", patch_size=K)
    starts = list(range(K - 1, block.shape[1] - MAX_N, K))  # contexts x_0..x_{cK-1}
    assert chunk.positions == "chunk" and chunk.terms.shape == (3, len(starts), MAX_N)
    for name in ("terms", "exact_terms", "samples_1", "samples_2", "references"):
        torch.testing.assert_close(getattr(chunk, name), getattr(token, name)[:, starts])
    # The references are the n-grams that start at token cK.
    torch.testing.assert_close(chunk.references[0, :, 0], block[0, [i + 1 for i in starts]])
    result = score_model(model, input_ids=blocks, seed=2, positions="chunk", patch_size=K, progress=False)
    assert result["positions"] == "chunk" and result["num_positions"] == 3 * len(starts)
    assert result["exact_brier1"] == pytest.approx(exact[starts, 0].mean().item(), abs=1e-6)


def test_llama_sampled_and_monte_carlo_brier_are_unbiased(llama_case):
    model, block, exact = llama_case
    repeats = 400  # identical blocks, independent draws (each block has its own generator)
    result = model_brier_terms(
        model, block.expand(repeats, -1), seed=7, exact_collision=False, rollout_batch_size=10_000
    )
    assert result.exact_collision == "monte_carlo"
    expected = exact.mean(0)
    assert_unbiased(result.terms.mean(1), expected, label="sampled")
    assert_unbiased(result.exact_terms.mean(1), expected, label="monte carlo collision")
    # Brier-1 of the cross-check is exact whatever the collision method.
    torch.testing.assert_close(result.exact_terms[..., 0], exact[:, 0].expand(repeats, -1), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------- CALM: unbiasedness


@torch.no_grad()
def calm_joint_samples(model, block, chunk_position, span, num, seed) -> torch.LongTensor:
    """`(num, span * K)` joint samples of chunks p+1..p+span given the true chunks 0..p, by a plain roll-out (the
    prefix cache repeated `num` times), independent of the package's batched machinery."""
    K = model.config.patch_size
    generator = torch.Generator().manual_seed(seed)
    out = model(input_ids=block[:, : (chunk_position + 1) * K], use_cache=True)
    cache = out.cache
    cache.batch_repeat_interleave(num)
    hidden = out.last_hidden_state[:, -1].expand(num, -1)
    chunks = []
    for step in range(span):
        chunk = model.sample_chunks(hidden, generator=generator)
        chunks.append(chunk)
        if step < span - 1:
            hidden = model(input_ids=chunk, cache=cache, use_cache=True).last_hidden_state[:, -1]
    return torch.cat(chunks, dim=-1)


def large_sample_brier(samples, reference) -> tuple[float, float]:
    """Brier of `reference` under the empirical distribution of `samples (S, n)` with an unbiased collision term
    (U-statistic), and a conservative standard error."""
    S = samples.shape[0]
    counts = collections.Counter(map(tuple, samples.tolist()))
    hit = counts.get(tuple(reference.tolist()), 0) / S
    collision = sum(c * (c - 1) for c in counts.values()) / (S * (S - 1))
    cube = sum((c / S) ** 3 for c in counts.values())
    se = 2 * math.sqrt(hit * (1 - hit) / S) + 2 * math.sqrt(max(cube - collision**2, 0.0) / S)
    return 2 * hit - collision, se


@pytest.mark.parametrize(
    "K, positions, length", [(4, "chunk", 12), (2, "chunk", 12), (4, "token", 12), (2, "token", 10)]
)
def test_calm_sampled_brier_is_unbiased(K, positions, length):
    """CALM's estimate (official chunk-aligned one-pass for K >= 4, official roll-out for K < 4, every-token
    roll-outs) against the Brier score of the joint distribution of the next tokens given the preceding whole chunks,
    computed from 4,000 independent joint samples per position."""
    model = tiny_brier_calm(K, seed=1)
    block = calm_likely_block(model, length, seed=2)
    repeats = 500
    result = model_brier_terms(
        model, block.expand(repeats, -1), seed=11, positions=positions, rollout_batch_size=10_000
    )

    # The evaluated (chunk position, offset) pairs, in the order of the terms.
    if positions == "chunk":
        span = math.ceil(MAX_N / K)
        pairs = [(p, 0) for p in range(length // K - span)]
    else:
        pairs = [(t // K - 1, t % K) for t in range(K, length - MAX_N + 1)]
    assert result.terms.shape == (repeats, len(pairs), MAX_N)
    expected = torch.zeros(MAX_N, dtype=torch.float64)
    variance = torch.zeros(MAX_N, dtype=torch.float64)
    joint = {}
    for p, j in pairs:
        if p not in joint:
            joint[p] = calm_joint_samples(model, block, p, math.ceil((K - 1 + MAX_N) / K), 4000, seed=100 + p)
        for n in range(1, MAX_N + 1):
            start = (p + 1) * K + j
            value, se = large_sample_brier(joint[p][:, j : j + n], block[0, start : start + n])
            expected[n - 1] += value / len(pairs)
            variance[n - 1] += (se / len(pairs)) ** 2
    assert expected[-1] > 0.01  # the check has something to see at n = 4
    assert_unbiased(result.terms.mean(1), expected, extra_se=variance.sqrt(), label=f"K={K} {positions}")


def test_calm_every_token_includes_the_chunk_aligned_estimate():
    """positions='token' at offset 0 uses the same draws as the official chunk-aligned evaluation (K >= 4)."""
    model = tiny_brier_calm(4, seed=1)
    blocks = torch.randint(1, 7, (3, 16), generator=torch.Generator().manual_seed(5))
    chunk = model_brier_terms(model, blocks, seed=3, positions="chunk")
    token = model_brier_terms(model, blocks, seed=3, positions="token")
    assert token.terms.shape == (3, 16 - 4 - MAX_N + 1, MAX_N)
    offsets_zero = torch.arange(0, token.terms.shape[1], 4)
    torch.testing.assert_close(token.terms[:, offsets_zero], chunk.terms[:, : len(offsets_zero)])
    torch.testing.assert_close(token.samples_1[:, offsets_zero], chunk.samples_1[:, : len(offsets_zero)])


# ------------------------------------------------------------------------------- CALM through its public API


def test_calm_is_recognised_by_its_config_model_type():
    calm, llama = tiny_brier_calm(2), tiny_llama(seed=2)
    assert is_calm_model(calm) and not is_calm_model(llama)
    blocks = torch.randint(0, 5, (2, 10), generator=torch.Generator().manual_seed(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = score_model(llama, input_ids=blocks, seed=1, progress=False)
        # A model with a Llama config is a token-level LM, whatever attributes it has (CALM-like ones included).
        llama.generative_head = torch.nn.Identity()
        llama.decode_chunk_tokens = lambda latents: latents
        assert not is_calm_model(llama)
        lookalike = score_model(llama, input_ids=blocks, seed=1, progress=False)
        # CALM's default block: the reference 8192 tokens, capped at max_position_embeddings chunks of K tokens.
        stream = torch.randint(1, 7, (200,), generator=torch.Generator().manual_seed(5))
        capped = score_model(calm, input_ids=stream, progress=False)
    assert lookalike == plain and lookalike["positions"] == "token" and lookalike["exact_collision"] == "enumeration"
    assert capped["context_length"] == 32 * 2 and capped["num_blocks"] == 200 // 64 and capped["positions"] == "chunk"


class PublicCalm:
    """A CALM model seen through `CalmForCausalLM`'s public sampling API only (its forward, `sample_head_noise`,
    `sample_chunks`, its config) and the `nn.Module` methods every model has: any other attribute (`model`,
    `generative_head`, `autoencoder`, `decode_chunk_tokens`, ...) raises AttributeError."""

    PUBLIC = frozenset({"config", "sample_head_noise", "sample_chunks", "parameters", "training", "train", "eval"})

    def __init__(self, model):
        self._model = model

    def __call__(self, *args, **kwargs):
        return self._model(*args, **kwargs)

    def __getattr__(self, name):  # only called for names that are not set on the wrapper itself
        if name in self.PUBLIC:
            return getattr(self._model, name)
        raise AttributeError(f"{name!r} is not part of CalmForCausalLM's public sampling API")


@pytest.mark.parametrize("K, positions", [(4, "chunk"), (2, "chunk"), (2, "token")])
def test_calm_is_scored_through_its_public_sampling_api_only(K, positions):
    """Every CALM path (one pass, official roll-out, every-token roll-outs) gives the same result through a view that
    hides the model's internals."""
    model = tiny_brier_calm(K, seed=3)
    public = PublicCalm(model)
    assert not any(hasattr(public, name) for name in ("model", "generative_head", "autoencoder", "decode_chunk_tokens"))
    blocks = torch.randint(1, 7, (2, 16), generator=torch.Generator().manual_seed(K))
    kwargs = {"input_ids": blocks, "seed": 2, "positions": positions, "progress": False, "rollout_batch_size": 5}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert score_model(public, **kwargs) == score_model(model, **kwargs)


def test_calm_module_reads_no_private_model_attribute():
    """Statically, for the paths a test does not reach: `brierlm/calm.py` reads only the public sampling API of the
    model, and its config only in the two helpers the config's layout is confined to."""
    tree = ast.parse((Path(BRIERLM_PATH) / "calm.py").read_text(encoding="utf-8"))
    used, config_readers = set(), set()
    for function in [node for node in tree.body if isinstance(node, ast.FunctionDef)]:
        for node in ast.walk(function):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "model":
                used.add(node.attr)
                if node.attr == "config":
                    config_readers.add(function.name)
    assert used == {"config", "sample_head_noise", "sample_chunks"}
    assert config_readers == {"chunk_size", "calm_max_tokens"}


# ------------------------------------------------------------------------------------ determinism and plumbing


@pytest.mark.parametrize("kind", ["llama", "calm-k2-chunk", "calm-k2-token"])
def test_deterministic_for_a_seed_and_independent_of_batching(kind):
    if kind == "llama":
        model, blocks, positions = (
            tiny_llama(seed=2),
            torch.randint(0, 5, (3, 12), generator=torch.Generator().manual_seed(0)),
            None,
        )
    else:
        model = tiny_brier_calm(2, seed=2)
        blocks = torch.randint(1, 7, (3, 12), generator=torch.Generator().manual_seed(0))
        positions = kind.rsplit("-", 1)[1]
    kwargs = {"input_ids": blocks, "seed": 5, "positions": positions, "progress": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = score_model(model, batch_size=3, rollout_batch_size=64, **kwargs)
        again = score_model(model, batch_size=3, rollout_batch_size=64, **kwargs)
        rebatched = score_model(model, batch_size=1, rollout_batch_size=3, **kwargs)
    assert first == again
    assert first == pytest.approx(rebatched, abs=1e-6)  # exact_* sums differ in the last bits
    assert [first[f"brier{n}"] for n in range(1, 5)] == [rebatched[f"brier{n}"] for n in range(1, 5)]
    terms = [model_brier_terms(model, blocks, seed=s, positions=positions).terms for s in (5, 6)]
    assert not torch.equal(terms[0], terms[1])


@pytest.mark.parametrize("kind", ["llama", "calm-token", "calm-chunk-k4"])
def test_returned_samples_give_the_same_scores_through_evaluate(kind, tmp_path):
    if kind == "llama":
        model, positions, vocab = tiny_llama(seed=4), None, 5
    else:
        model, positions, vocab = tiny_brier_calm(4, seed=4), kind.split("-")[1], 7
    blocks = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = score_model(model, input_ids=blocks, seed=1, positions=positions, progress=False, return_samples=True)
        via_module = load_brierlm(cache_dir=str(tmp_path)).compute(
            samples_1=result["samples_1"].tolist(),
            samples_2=result["samples_2"].tolist(),
            references=result["references"].tolist(),
        )
    assert result["samples_1"].shape == (result["num_positions"], MAX_N)
    for key in ("brier1", "brier2", "brier3", "brier4", "brierlm"):
        assert via_module[key] == pytest.approx(result[key], abs=1e-12)


def test_calm_k_below_four_chunk_positions_have_no_single_sample_pair():
    model = tiny_brier_calm(2)
    blocks = torch.randint(1, 7, (1, 12), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="return_samples is not available"):
        score_model(model, input_ids=blocks, progress=False, return_samples=True)


def test_invalid_arguments():
    calm, llama = tiny_brier_calm(4), tiny_llama()
    with pytest.raises(ValueError, match="multiple of K"):
        score_model(calm, input_ids=torch.ones((1, 10), dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="too short"):
        score_model(calm, input_ids=torch.ones((1, 4), dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="positions"):
        score_model(calm, input_ids=torch.ones((1, 8), dtype=torch.long), positions="word", progress=False)
    with pytest.raises(ValueError, match="pass both or neither"):
        score_model(llama, input_ids=torch.ones((1, 8), dtype=torch.long), positions="chunk", progress=False)
    with pytest.raises(ValueError, match="pass both or neither"):
        score_model(llama, input_ids=torch.ones((1, 8), dtype=torch.long), patch_size=4, progress=False)
    with pytest.raises(ValueError, match="differs from this CALM's K = 4"):
        score_model(calm, input_ids=torch.ones((1, 8), dtype=torch.long), patch_size=2, progress=False)
    with pytest.raises(ValueError, match="one chunk-aligned position"):
        score_model(llama, input_ids=torch.ones((1, 6), dtype=torch.long), positions="chunk", patch_size=4)
    with pytest.raises(ValueError, match="too short"):
        score_model(llama, input_ids=torch.ones((1, 4), dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="exactly one"):
        score_model(llama, progress=False)
    with pytest.raises(ValueError, match="not one block"):
        score_model(llama, input_ids=[1, 2, 3], context_length=8, progress=False)


def word_tokenizer(words) -> PreTrainedTokenizerFast:
    vocab = {word: index for index, word in enumerate(["[UNK]", *words])}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def test_texts_are_concatenated_and_cut_into_blocks():
    tokenizer = word_tokenizer(["a", "b", "c"])
    texts = ["a b c a b c a b c a b", "c c b a a b c a b c a b c", "b a"]
    stream = [t for ids in tokenizer(texts)["input_ids"] for t in ids]
    llama = tiny_llama(vocab_size=4, max_position_embeddings=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = score_model(llama, texts=texts, tokenizer=tokenizer, progress=False)  # 2048 capped at the model's 8
        same = score_model(llama, input_ids=torch.tensor(stream[:24]).reshape(3, 8), progress=False)
        calm = score_model(
            tiny_brier_calm(2, vocab_size=4), texts=texts, tokenizer=tokenizer, context_length=12, progress=False
        )
    assert result["context_length"] == 8 and result["num_blocks"] == len(stream) // 8 == 3
    assert result == same
    assert calm["num_blocks"] == 2 and calm["num_positions"] == 2 * (6 - 2)


def test_example_script(tmp_path, monkeypatch, capsys):
    """examples/evaluate_brierlm.py on a saved tiny CALM, from the repository root (bare evaluate.load)."""
    import importlib.util

    import evaluate

    words = ["the", "cat", "sat", "on", "mat", "dog"]
    tokenizer = word_tokenizer(words)
    model = tiny_brier_calm(4, vocab_size=len(words) + 1)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = tmp_path / "docs.json"
    documents = [" ".join(words[(i * 7 + k) % len(words)] for k in range(40)) for i in range(3)]
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    spec = importlib.util.spec_from_file_location("evaluate_brierlm", REPO_ROOT / "examples" / "evaluate_brierlm.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr(evaluate.config, "HF_METRICS_CACHE", str(tmp_path / "metrics"))  # the script's evaluate.load
    args = ["--model", str(tmp_path / "model"), "--data", str(data), "--block_size", "32", "--device", "cpu"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = example.main([*args, "--max_blocks", "2", "--check_evaluate", "--output", str(tmp_path / "out.json")])
    assert result["num_blocks"] == 2 and result["context_length"] == 32 and result["positions"] == "chunk"
    assert result["num_positions"] == 2 * (32 // 4 - 1)
    assert result["evaluate_matches"] is True
    assert json.loads((tmp_path / "out.json").read_text())["brier1"] == result["brier1"]
    assert '"brierlm"' in capsys.readouterr().out
