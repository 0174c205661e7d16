"""The benchmarks run (quick mode) and report; no timing is asserted."""

import argparse
import importlib.util
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_SAMPLING = REPO_ROOT / "benchmarks" / "bench_sampling.py"
BENCH_GENERATE = REPO_ROOT / "benchmarks" / "bench_generate.py"
BENCH_TRAIN = REPO_ROOT / "benchmarks" / "bench_train.py"


def run_quick(script: Path) -> str:
    result = subprocess.run(
        [sys.executable, str(script), "--quick"],
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


@pytest.mark.slow  # the benchmark as a child process
def test_bench_train_quick_runs_and_reports_ratio_and_head_share():
    stdout = run_quick(BENCH_TRAIN)
    assert re.search(r"^speedup calm: [0-9.]+$", stdout, flags=re.MULTILINE), stdout
    share = re.search(r"^head\+loss share: ([0-9.]+)$", stdout, flags=re.MULTILINE)
    assert share and float(share.group(1)) > 0, stdout
    flop_share = re.search(r"^head\+loss flop share: ([0-9.]+)$", stdout, flags=re.MULTILINE)
    assert flop_share and 0 < float(flop_share.group(1)) < 1, stdout
    assert re.search(r"^flop ratio calm: [0-9.]+$", stdout, flags=re.MULTILINE), stdout
