"""The benchmarks run (quick mode) and report; no timing is asserted."""

import importlib.util
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

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


def test_bench_sampling_quick_runs_and_reports_a_ratio():
    result = subprocess.run(
        [sys.executable, str(BENCH_SAMPLING), "--quick"],
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    ratios = re.findall(r"^ratio T=([0-9.]+): ([0-9.]+)$", result.stdout, flags=re.MULTILINE)
    assert [float(t) for t, _ in ratios] == [0.5, 0.3333], result.stdout
    assert all(float(r) > 0 for _, r in ratios)
    # The vectorised sampler agrees in distribution with the per-row loop.
    pvalues = re.findall(r"^agreement T=[0-9.]+: p=([0-9.eE+-]+)$", result.stdout, flags=re.MULTILINE)
    assert len(pvalues) == 2 and all(float(p) > 1e-3 for p in pvalues), result.stdout


def test_bench_loop_reference_is_the_official_rule():
    """The benchmark's per-row loop picks with the rule's probabilities (counts a: 3, b: 2, c: 1 at T = 1/2 give
    C(3,2) : C(2,2) = 3 : 1 between a and b, and never c)."""
    spec = importlib.util.spec_from_file_location("bench_sampling", BENCH_SAMPLING)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    a, b, c = (1, 1, 1, 1), (2, 2, 2, 2), (3, 3, 3, 3)
    row = [a, b, a, c, b, a]
    assert bench.loop_probabilities(row, 2) == {a: 0.75, b: 0.25}
    candidates = torch.tensor(row).unsqueeze(1).expand(-1, 4000, -1)
    picks = bench.loop_temperature_sample(candidates, 0.5, random.Random(0))
    counts = Counter(tuple(p) for p in picks.tolist())
    assert set(counts) == {a, b}
    assert abs(counts[a] / 4000 - 0.75) < 0.03


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


def test_bench_train_quick_runs_and_reports_ratio_and_head_share():
    stdout = run_quick(BENCH_TRAIN)
    assert re.search(r"^speedup calm: [0-9.]+$", stdout, flags=re.MULTILINE), stdout
    share = re.search(r"^head\+loss share: ([0-9.]+)$", stdout, flags=re.MULTILINE)
    assert share and float(share.group(1)) > 0, stdout
