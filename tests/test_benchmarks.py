"""The benchmarks run (quick mode) and report; no timing is asserted."""

import argparse
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import factories
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_SAMPLING = REPO_ROOT / "benchmarks" / "bench_sampling.py"
BENCH_GENERATE = REPO_ROOT / "benchmarks" / "bench_generate.py"
BENCH_TRAIN = REPO_ROOT / "benchmarks" / "bench_train.py"
BENCH_STREAMING = REPO_ROOT / "benchmarks" / "bench_streaming.py"


def run_quick(script: Path, *arguments: str) -> str:
    result = subprocess.run(
        [sys.executable, str(script), "--quick", *arguments],
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def load_bench(script: Path):
    """A benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(script.stem, script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.slow  # the benchmark as a child process
def test_bench_sampling_quick_runs_and_reports_a_ratio():
    stdout = run_quick(BENCH_SAMPLING)
    ratios = re.findall(r"^ratio T=([0-9.]+): ([0-9.]+)$", stdout, flags=re.MULTILINE)
    assert [float(t) for t, _ in ratios] == [0.5, 0.3333], stdout
    assert all(float(r) > 0 for _, r in ratios)
    # The vectorised sampler agrees in distribution with the per-row loop.
    pvalues = re.findall(r"^agreement T=[0-9.]+: p=([0-9.eE+-]+)$", stdout, flags=re.MULTILINE)
    assert len(pvalues) == 2 and all(float(p) > 1e-3 for p in pvalues), stdout


def test_bench_loop_reference_is_the_official_rule():
    """The benchmark's per-row loop picks with the rule's probabilities (counts a: 3, b: 2, c: 1 at T = 1/2 give
    C(3,2) : C(2,2) = 3 : 1 between a and b, and never c)."""
    bench = load_bench(BENCH_SAMPLING)
    a, b, c = (1, 1, 1, 1), (2, 2, 2, 2), (3, 3, 3, 3)
    row = [a, b, a, c, b, a]
    assert bench.loop_probabilities(row, 2) == {a: 0.75, b: 0.25}
    candidates = torch.tensor(row).unsqueeze(1).expand(-1, 4000, -1)
    picks = bench.loop_temperature_sample(candidates, 0.5, random.Random(0))
    counts = Counter(tuple(p) for p in picks.tolist())
    assert set(counts) == {a, b}
    assert abs(counts[a] / 4000 - 0.75) < 0.03


def test_calm_m_preset_is_the_papers_calm_m_and_transformer_m():
    """The preset reproduces the parameter counts of the official configs (reference: CALM-M 371.7M without the
    autoencoder, whose ~75.9M come on top; the same backbone as an AR model is Transformer-M, 465.1M); built on the
    meta device, so no memory is allocated. Sizes given on the command line win over the preset."""
    bench = load_bench(BENCH_GENERATE)
    parser = argparse.ArgumentParser()
    bench.add_model_arguments(parser)
    args = parser.parse_args(["--preset", "calm-m"])
    bench.apply_preset(args)
    with torch.device("meta"):
        calm, llama = bench.build_models(args, torch.device("meta"), torch.float32, 2048)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert round((count(calm) - count(calm.autoencoder)) / 1e6, 1) == 371.7
    assert abs(count(calm.autoencoder) / 1e6 - 75.9) < 0.1  # the reference gives "about 75.9M"
    assert round(count(llama) / 1e6, 1) == 465.1
    overridden = parser.parse_args(["--preset", "calm-m", "--num-layers", "2"])
    bench.apply_preset(overridden)
    assert (overridden.num_layers, overridden.hidden_size) == (2, 1024)


@pytest.mark.slow  # the benchmark as a child process
def test_bench_generate_quick_runs_and_reports_ratios():
    """Both models, both batch sizes, the N-candidate row, and CALM's time split (the script itself checks that
    every row generated exactly the requested number of tokens)."""
    stdout = run_quick(BENCH_GENERATE)
    speedups = re.findall(r"^speedup batch=(\d+) ([a-z-]+): ([0-9.]+)$", stdout, flags=re.MULTILINE)
    assert [(b, name) for b, name, _ in speedups] == [
        ("1", "calm"),
        ("1", "calm-approx"),
        ("2", "calm"),
        ("2", "calm-approx"),
    ], stdout
    assert all(float(r) > 0 for _, _, r in speedups)
    assert len(re.findall(r"^tokens/s batch=\d+ llama: [0-9.]+$", stdout, flags=re.MULTILINE)) == 2, stdout
    assert "backbone" in stdout and "decoder" in stdout and "sampler" in stdout
    flop_ratios = re.findall(r"^flop ratio ([a-z-]+): ([0-9.]+)$", stdout, flags=re.MULTILINE)
    assert [name for name, _ in flop_ratios] == ["calm", "calm-approx"], stdout
    # N candidates per step cost more arithmetic than one sample.
    assert float(flop_ratios[0][1]) > float(flop_ratios[1][1]) > 0
    collision = re.search(r"^chunk collision: (\d+) distinct chunks in 200 head samples; ", stdout, flags=re.MULTILINE)
    assert collision and 1 <= int(collision.group(1)) <= 200, stdout


def test_chunk_collision_counts_equal_chunks(monkeypatch):
    """The collision estimate is the fraction of equal pairs: 4 draws decoding to chunks a, a, a, b give 3 equal
    pairs of 6."""
    bench = load_bench(BENCH_GENERATE)
    calm = factories.tiny_calm(0)
    decoded = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8], [1, 2, 3, 4]])
    monkeypatch.setattr(calm.autoencoder, "decode_token_ids", lambda latents: decoded)
    report = bench.chunk_collision(calm, factories.random_ids(1, 8), draws=4)
    assert report == {"draws": 4, "distinct_chunks": 2, "collision_probability": 0.5}


@pytest.mark.slow  # four benchmarks as child processes, two of them compiling
def test_gpu_suite_writes_every_figure(tmp_path):
    """benchmarks/gpu_suite.sh end to end, on CPU with tiny models (`--quick --device cpu` go to every benchmark)."""
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "benchmarks" / "gpu_suite.sh"), str(tmp_path), "--quick", "--device", "cpu"],
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    names = ["generate_eager", "generate_compiled", "train_eager", "train_compiled"]
    reports = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in names}
    compiled = reports["generate_compiled"]
    assert compiled["settings"]["compile"] and not reports["generate_eager"]["settings"]["compile"]
    assert compiled["settings"]["cache"] == "static" and compiled["time_split"] == []  # no split of compiled graphs
    rows = {(row["batch_size"], row["model"]) for row in compiled["rows"]}
    assert rows == {(b, m) for b in (1, 2) for m in ("llama", "calm", "calm-approx")}
    assert all(row["tokens_per_second"] > 0 for row in compiled["rows"])
    assert reports["train_compiled"]["settings"]["compile"] and reports["train_eager"]["speedup"] > 0
    assert json.loads((tmp_path / "environment.json").read_text())["torch"] == torch.__version__


@pytest.mark.slow  # the benchmark as a child process
def test_bench_train_quick_runs_and_reports_ratio_and_head_share():
    stdout = run_quick(BENCH_TRAIN)
    assert re.search(r"^speedup calm: [0-9.]+$", stdout, flags=re.MULTILINE), stdout
    share = re.search(r"^head\+loss share: ([0-9.]+)$", stdout, flags=re.MULTILINE)
    assert share and float(share.group(1)) > 0, stdout
    flop_share = re.search(r"^head\+loss flop share: ([0-9.]+)$", stdout, flags=re.MULTILINE)
    assert flop_share and 0 < float(flop_share.group(1)) < 1, stdout
    assert re.search(r"^flop ratio calm: [0-9.]+$", stdout, flags=re.MULTILINE), stdout


@pytest.mark.slow  # the benchmark launches train_calm.py on 2 processes, 6 times
def test_bench_streaming_quick_runs_and_writes_every_figure(tmp_path):
    """Streamed against pre-tokenised train_calm.py on 2 processes (a word tokenizer of the bundled text)."""
    from factories import documents, word_tokenizer

    word_tokenizer(documents(62)).save_pretrained(tmp_path / "tokenizer")
    stdout = run_quick(BENCH_STREAMING, "--tokenizer", str(tmp_path / "tokenizer"), "--json", str(tmp_path / "s.json"))
    assert re.search(
        r"^tokens/s: pre-tokenised [0-9]+, streamed [0-9]+ \(streamed / pre-tokenised [0-9.]+x\)$",
        stdout,
        flags=re.MULTILINE,
    ), stdout
    figures = json.loads((tmp_path / "s.json").read_text())
    assert figures["processes"] == 2 and set(figures["resume_s"]) == {"2"}
    for key in ("pretokenised_tokens_per_s", "streamed_tokens_per_s", "streamed_launch_to_first_step_s"):
        assert figures[key] > 0, key


# ------------------------------------------------------------------------------------------------ bench_quality

BENCH_QUALITY = REPO_ROOT / "benchmarks" / "bench_quality.py"
SWEEP_RECIPE = REPO_ROOT / "benchmarks" / "sweep_recipe.py"


@pytest.fixture(scope="module")
def bench_quality():
    return load_bench(BENCH_QUALITY)


def small_language(bench_quality, seed=0):
    # 5 token ids (3..7) for 12 chunks: many chunks share their first tokens, so n-gram prefixes collide.
    return bench_quality.SyntheticChunkLanguage(num_chunks=12, vocab_size=8, patch_size=4, successors=3, seed=seed)


def test_synthetic_language_blocks_follow_its_chain(bench_quality):
    language = small_language(bench_quality)
    assert torch.allclose(language.stationary @ language.transition, language.stationary, atol=1e-12)
    assert ((language.transition > 0).sum(1) == 3).all() and torch.allclose(
        language.transition.sum(1), torch.ones(12, dtype=torch.float64)
    )
    blocks = language.sample_blocks(300, 16, seed=1)
    assert blocks.shape == (300, 16) and blocks.min() >= 3 and blocks.max() < 8
    index = {tuple(c): i for i, c in enumerate(language.chunks.tolist())}
    chunks = [[index[tuple(b[k : k + 4])] for k in range(0, 16, 4)] for b in blocks.tolist()]
    for row in chunks:
        for prev, nxt in zip(row, row[1:], strict=False):
            assert language.transition[prev, nxt] > 0
    with pytest.raises(ValueError, match="multiple of K"):
        language.sample_blocks(1, 10, seed=0)
    with pytest.raises(ValueError, match="distinct chunks"):
        bench_quality.SyntheticChunkLanguage(num_chunks=100, vocab_size=6, patch_size=4)


def test_synthetic_optimal_brier_matches_monte_carlo(bench_quality):
    """The exact optimum (expected collision probability of the true distribution, by enumeration) against a
    Monte Carlo estimate from two independent draws of the true conditional at random positions, drawn by a separate
    route (posterior vectors over the current chunk given the visible prefix); tolerance 5 standard errors."""
    language = small_language(bench_quality)
    block_size, K, S = 16, 4, 40_000
    optimal = language.optimal_brier(block_size)
    generator = torch.Generator().manual_seed(0)
    chunks, transition, pi = language.chunks, language.transition, language.stationary

    def draw(probs):  # one index per row of probs
        return torch.multinomial(probs.float(), 1, generator=generator).squeeze(1)

    def agreement(positions):
        c, j = (positions + 1) // K, (positions + 1) % K
        prev = draw(pi.expand(S, -1))
        prior = torch.where((c == 0)[:, None], pi.expand(S, -1), transition[prev])
        current = draw(prior)  # the true chunk the n-gram starts in; its first j tokens are visible
        visible = torch.arange(K)[None] < j[:, None]
        matches = ((chunks[None] == chunks[current][:, None]) | ~visible[:, None]).all(-1)
        posterior = prior * matches
        posterior = posterior / posterior.sum(1, keepdim=True)
        grams = []
        for _ in range(2):  # two independent continuations of the same context
            cur = draw(posterior)
            nxt = draw(transition[cur])
            tokens = torch.cat([chunks[cur], chunks[nxt]], 1)
            grams.append(torch.stack([tokens[r, j[r] : j[r] + 4] for r in range(S)]))
        same = (grams[0] == grams[1]).long().cumprod(1).double()
        return same.mean(0), same.std(0) / S**0.5

    chunk_mean, chunk_se = agreement(torch.randint(1, block_size // K, (S,), generator=generator) * K - 1)
    token_mean, token_se = agreement(torch.randint(0, block_size - 4, (S,), generator=generator))
    for n in range(4):
        assert abs(chunk_mean[n] - optimal["chunk"][f"brier{n + 1}"]) < 5 * chunk_se[n] + 1e-9
        assert abs(token_mean[n] - optimal["token"][f"brier{n + 1}"]) < 5 * token_se[n] + 1e-9
    # Inside a chunk its first tokens are known: the every-token optimum is higher.
    assert optimal["token"]["brierlm"] > optimal["chunk"]["brierlm"] > 0


@pytest.mark.slow  # the benchmark as a child process
def test_bench_quality_quick_runs_and_writes_curves(tmp_path):
    stdout = run_quick(BENCH_QUALITY, "--output_dir", str(tmp_path))
    report = json.loads((tmp_path / "quality_synthetic.json").read_text())
    assert (tmp_path / "quality_synthetic.png").stat().st_size > 0
    assert list(report["models"]) == ["llama", "calm-energy", "calm-flow", "calm-diffusion"]
    for name, run in report["models"].items():
        steps = [p["step"] for p in run["curve"]]
        assert steps == [2, 4] and run["flops_per_step"] > 0
        assert all(p["train_flops"] == p["step"] * run["flops_per_step"] for p in run["curve"])
        scorings = {"chunk", "token"} if name == "llama" else {"chunk"}
        for scoring in scorings:
            assert all(-1 <= p[f"{scoring}_brier1"] <= 1 and p[f"{scoring}_brierlm"] >= 0 for p in run["curve"])
        if name != "llama":
            assert run["autoencoder_flops"] == report["autoencoder"]["flops"] > 0
    assert report["corpus"]["optimal"]["chunk"]["brierlm"] > 0
    assert "optimal BrierLM" in stdout and "unconditional chunk model" in stdout
    assert "at equal training FLOPs" in stdout
    for name, run in report["models"].items():  # the Llama's curve at each CALM's FLOPs, or None beyond it
        if name != "llama":
            assert set(run["llama_at_equal_flops"]) == {"chunk_brier1", "chunk_brierlm"}


@pytest.mark.slow  # the benchmark as a child process
def test_bench_quality_remedies_recipe_and_pretrained_decoder(tmp_path, bench_quality):
    """Every remedy as a flag, `calm-recipe`, a CALM started from the benchmark's own Llama, the linear probe, and the
    autoencoder cache (a second run loads the autoencoder the first one trained)."""
    cache = tmp_path / "autoencoders"
    # fmt: off
    arguments = [
        "--corpus", "wikitext", "--models", "llama", "calm-recipe", "calm-energy-from-llama", "--from_llama_steps", "3",
        "--probe_steps", "5", "--decoder_loss_weight", "0.5", "--decoder_loss_start", "0.5", "--token_loss_weight",
        "0.5", "--input_noise_std", "0.1", "--ae_cache_dir", str(cache),
    ]
    # fmt: on
    stdout = run_quick(BENCH_QUALITY, *arguments, "--output_dir", str(tmp_path / "first"))
    report = json.loads((tmp_path / "first" / "quality_wikitext.json").read_text())
    assert list(report["models"]) == ["llama", "calm-recipe", "llama-pretrained", "calm-energy-from-llama"]
    recipe, pretrained = report["models"]["calm-recipe"], report["models"]["calm-energy-from-llama"]
    assert recipe["settings"]["head_type"] == "flow" and recipe["settings"]["latent_size"] == 32
    assert pretrained["settings"]["head_type"] == "energy"
    llama_flops = report["models"]["llama-pretrained"]["curve"][-1]["train_flops"]
    assert pretrained["pretrained_decoder_flops"] == llama_flops > 0
    for run in (recipe, pretrained):
        assert {"probe_chunk_brier1", "probe_loss"} <= set(run["probe"])
        last = run["curve"][-1]
        assert "train_decoder_loss" in last and "train_token_loss" in last
        # The decoder loss starts after half the steps: the first half's steps cost less.
        assert run["curve"][0]["train_flops"] < run["flops_per_step"] * run["curve"][0]["step"]
    assert "linear probe of the final states" in stdout
    # The cache, on the recipe alone: its autoencoder is loaded, not trained again (in this process: the child
    # process above ran the script as a command).
    second_arguments = ["--quick", "--corpus", "wikitext", "--models", "calm-recipe", "--ae_cache_dir", str(cache)]
    bench_quality.main([*second_arguments, "--output_dir", str(tmp_path / "second")])
    second = json.loads((tmp_path / "second" / "quality_wikitext.json").read_text())
    assert len(list(cache.iterdir())) == 2  # one autoencoder per setting (the recipe's l = 32, the quick l = 16)
    assert second["models"]["calm-recipe"]["autoencoder"] == recipe["autoencoder"]


def test_bench_quality_model_names(bench_quality):
    args = bench_quality.parse_args(["--corpus", "wikitext", "--latent_size", "64"])
    assert bench_quality.args_of_model("calm-energy", args).head_type == "energy"
    assert bench_quality.args_of_model("calm-flow-from-llama", args).head_type == "flow"
    recipe = bench_quality.args_of_model("calm-recipe", args)
    assert {key: getattr(recipe, key) for key in bench_quality.RECIPE} == bench_quality.RECIPE
    assert args.latent_size == 64  # the recipe's settings replace a copy, not the command line's
    with pytest.raises(ValueError, match="Unknown model 'calm-vae'"):
        bench_quality.args_of_model("calm-vae", args)


def test_value_at_flops_interpolates_inside_the_curve_only(bench_quality):
    curve = [{"train_flops": 10, "x": 1.0}, {"train_flops": 20, "x": 3.0}, {"train_flops": 40, "x": 2.0}]
    assert bench_quality.value_at_flops(curve, "x", 15) == pytest.approx(2.0)
    assert bench_quality.value_at_flops(curve, "x", 30) == pytest.approx(2.5)
    assert bench_quality.value_at_flops(curve, "x", 10) == 1.0 and bench_quality.value_at_flops(curve, "x", 40) == 2.0
    assert bench_quality.value_at_flops(curve, "x", 5) is None and bench_quality.value_at_flops(curve, "x", 41) is None
    assert bench_quality.value_at_flops(curve[:1], "x", 10) == 1.0


@pytest.mark.slow  # the sweep as child processes
def test_sweep_recipe_runs_rows_and_writes_a_table(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(SWEEP_RECIPE),
            "--rows",
            "recipe",
            "l=32",
            "--output_dir",
            str(tmp_path),
            "--",
            "--quick",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    table = (tmp_path / "sweep_synthetic.md").read_text()
    assert "| recipe |" in table and "| l=32 |" in table


@pytest.mark.filterwarnings("ignore:BrierLM is reported as 0")  # a random Llama
def test_llama_chunk_scoring_of_the_benchmark_is_the_protocols(bench_quality):
    """bench_quality scores the Llama's chunk-aligned positions from its every-token draws: the same numbers as
    score_model(..., positions="chunk", patch_size=K)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from transformers_calm.brierlm import score_model

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=11,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
        bos_token_id=None,
        eos_token_id=None,
    )
    llama = LlamaForCausalLM(config).eval()
    blocks = torch.randint(0, 11, (5, 16), generator=torch.Generator().manual_seed(1))
    args = argparse.Namespace(eval_batch_size=2, seed=3, patch_size=4)
    point = bench_quality.evaluate_brier(llama, blocks, args, is_calm=False)
    reference = score_model(
        llama,
        input_ids=blocks,
        seed=3,
        positions="chunk",
        patch_size=4,
        batch_size=2,
        exact_collision=False,
        progress=False,
    )
    for n in range(1, 5):
        assert point[f"chunk_brier{n}"] == pytest.approx(reference[f"brier{n}"], abs=1e-12)
    assert point["chunk_exact_brier1"] == pytest.approx(reference["exact_brier1"], abs=1e-9)


def test_bench_quality_wikitext_defaults_are_the_demos(bench_quality):
    """`--corpus wikitext` is the demo's comparison: its sizes, budget and recipe, read from the demo's own defaults
    (`calm train --preset cpu` with the small-scale recipe)."""
    sys.path.insert(0, str(REPO_ROOT / "examples"))
    import demo

    from transformers_calm.cli import PRESETS, RECIPES

    bench, args = bench_quality.parse_args(["--corpus", "wikitext"]), demo.parse_args([])
    ours = {**PRESETS[args.preset], **RECIPES[args.recipe], "num_heldout_documents": args.num_heldout_documents}
    pairs = {
        "hidden_size": "hidden_size",
        "intermediate_size": "intermediate_size",
        "num_layers": "num_hidden_layers",
        "num_heads": "num_attention_heads",
        "num_mlp_layers": "num_mlp_layers",
        "latent_size": "latent_size",
        "ae_hidden_size": "ae_hidden_size",
        "ae_intermediate_size": "ae_intermediate_size",
        "ae_steps": "ae_steps",
        "ae_learning_rate": "ae_learning_rate",
        "token_dropout": "token_dropout",
        "latent_dropout": "latent_dropout",
        "max_steps": "lm_steps",
        "learning_rate": "lm_learning_rate",
        "lr_scheduler_type": "lr_scheduler_type",
        "vocab_size": "vocab_size",
        "block_size": "block_size",
        "batch_size": "batch_size",
        "num_heldout_documents": "num_heldout_documents",
    }
    assert {b: getattr(bench, b) for b in pairs} == {b: ours[d] for b, d in pairs.items()}
    assert bench.head_lr_scale == ours["head_learning_rate_scale"]
    assert bench.ae_lr_scheduler_type == "cosine"  # calm train's autoencoder stage: a cosine schedule
    assert bench_quality.args_of_model("calm-recipe", bench).head_type == ours["head_type"] == "flow"
    # Given values win over the corpus defaults.
    assert bench_quality.parse_args(["--corpus", "wikitext", "--latent_size", "32"]).latent_size == 32
    assert bench_quality.parse_args([]).latent_size == 32 and bench_quality.parse_args([]).head_lr_scale == 10.0


def test_two_calms_share_an_autoencoder_only_with_the_same_autoencoder_settings(bench_quality):
    """The in-run reuse and --ae_cache_dir key on the same settings, the autoencoder's schedule included: on the
    synthetic corpus `calm-recipe` trains its autoencoder with a cosine schedule, `calm-energy` with the run's."""
    args = bench_quality.parse_args([])
    energy, flow, recipe = (bench_quality.args_of_model(n, args) for n in ("calm-energy", "calm-flow", "calm-recipe"))
    settings = bench_quality.autoencoder_settings
    assert settings(energy) == settings(flow)
    assert settings(recipe) != settings(energy)
    assert settings(recipe)["ae_lr_scheduler_type"] == "cosine"
    assert settings(energy)["ae_lr_scheduler_type"] == args.lr_scheduler_type
