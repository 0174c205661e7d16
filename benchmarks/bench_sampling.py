"""Benchmark: the vectorised batch approximation of temperature sampling against the official per-row loop.

`transformers_calm.sampling.batch_temperature_sample` (the paper's Algorithm 2, vectorised over rows) is compared
with the same rule written as the official CALM code writes it: for every row, a `Counter` of the candidate tuples,
then for m = n, n - 1, ..., 1 the tuples with count >= m weighted by C(count, m), and `random.choices`.

Candidates are realistic-ish: each row draws its N chunks from a Zipf distribution over a few thousand chunk ids
(a different random ranking per row), each chunk id mapped to a fixed random K-tuple of token ids, so that a few
chunks repeat often and most appear once.

    python benchmarks/bench_sampling.py            # batch 64, N = 200, K = 4, T = 1/2 and 1/3
    python benchmarks/bench_sampling.py --quick    # a few iterations (used by the tests)

Prints milliseconds per call (median over the iterations) of both and the speed-up ratio (loop / vectorised), and
checks that the two pick with the same probabilities (a chi-square test on one candidate set repeated over many
rows).
"""

import argparse
import math
import random
import statistics
import time
from collections import Counter

import torch

from transformers_calm.sampling import batch_temperature_sample


def zipf_candidates(
    batch_size: int,
    num_candidates: int,
    patch_size: int,
    num_chunk_ids: int = 5000,
    vocab_size: int = 32000,
    exponent: float = 1.1,
    seed: int = 0,
    device: str = "cpu",
) -> torch.LongTensor:
    """`(N, batch, K)` candidate chunks: Zipf(exponent) over `num_chunk_ids` chunk ids, ranked differently per row."""
    generator = torch.Generator().manual_seed(seed)
    table = torch.randint(0, vocab_size, (num_chunk_ids, patch_size), generator=generator)
    zipf = 1.0 / torch.arange(1, num_chunk_ids + 1, dtype=torch.float64) ** exponent
    ranks = torch.multinomial(zipf.expand(batch_size, -1), num_candidates, replacement=True, generator=generator)
    rankings = torch.stack([torch.randperm(num_chunk_ids, generator=generator) for _ in range(batch_size)])
    chunk_ids = torch.gather(rankings, 1, ranks)  # (batch, N)
    return table[chunk_ids].transpose(0, 1).contiguous().to(device)


def loop_probabilities(row_candidates: list[tuple], n: int) -> dict[tuple, float]:
    """The official rule for one row, as probabilities over its distinct candidates."""
    counts = Counter(row_candidates)
    for m in range(n, 0, -1):
        eligible = [(x, math.comb(c, m)) for x, c in counts.items() if c >= m]
        if eligible:
            total = sum(w for _, w in eligible)
            return {x: w / total for x, w in eligible}
    raise AssertionError("unreachable")


def loop_temperature_sample(candidates: torch.LongTensor, temperature: float, rng: random.Random) -> torch.LongTensor:
    """The official per-row loop (integer 1/T only, as in the official code)."""
    n = round(1 / temperature)
    rows = candidates.transpose(0, 1).tolist()  # (batch, N, K) as Python lists
    picks = []
    for row in rows:
        counts = Counter(tuple(c) for c in row)
        for m in range(n, 0, -1):
            eligible = [(x, c) for x, c in counts.items() if c >= m]
            if eligible:
                choices, chosen_counts = zip(*eligible, strict=True)
                picks.append(rng.choices(choices, weights=[math.comb(c, m) for c in chosen_counts])[0])
                break
    return torch.tensor(picks, device=candidates.device)


def time_call(function, iterations: int, synchronize) -> float:
    """Median milliseconds per call, after one warm-up call."""
    function()
    synchronize()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        function()
        synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def agreement_pvalue(temperature: float, copies: int, seed: int = 1) -> float:
    """One row's candidates repeated `copies` times: chi-square p-value of the vectorised picks against the loop
    rule's exact probabilities (pooled over outcomes with an expected count below 5)."""
    candidates = zipf_candidates(1, 60, 4, num_chunk_ids=30, seed=seed)
    row = [tuple(c) for c in candidates[:, 0].tolist()]
    probabilities = loop_probabilities(row, round(1 / temperature))
    picks = batch_temperature_sample(
        candidates.expand(-1, copies, -1), temperature, generator=torch.Generator().manual_seed(seed)
    )
    observed = Counter(tuple(p) for p in picks.tolist())
    assert set(observed) <= set(probabilities), "the vectorised sampler picked an outcome the rule excludes"
    keys = sorted(probabilities, key=probabilities.get)
    expected = [probabilities[x] * copies for x in keys]
    counts = [observed.get(x, 0) for x in keys]
    bins_e, bins_o, pool_e, pool_o = [], [], 0.0, 0
    for e, o in zip(expected, counts, strict=True):
        if pool_e + e < 5 and e < 5:
            pool_e, pool_o = pool_e + e, pool_o + o
        else:
            bins_e.append(e + pool_e)
            bins_o.append(o + pool_o)
            pool_e, pool_o = 0.0, 0
    if pool_e > 0:
        bins_e[-1] += pool_e
        bins_o[-1] += pool_o
    if len(bins_e) < 2:
        return 1.0
    stat = sum((o - e) ** 2 / e for o, e in zip(bins_o, bins_e, strict=True))
    df = len(bins_e) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-candidates", type=int, default=200)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1 / 2, 1 / 3])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="2 iterations and a smaller agreement check")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the loop is single-threaded)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    iterations = 2 if args.quick else args.iterations
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    candidates = zipf_candidates(args.batch_size, args.num_candidates, args.patch_size, device=args.device)
    distinct = statistics.mean(len(set(map(tuple, row))) for row in candidates.transpose(0, 1).tolist())
    print(
        f"batch {args.batch_size}, N = {args.num_candidates}, K = {args.patch_size}, device {device.type}, "
        f"{torch.get_num_threads()} thread(s), {iterations} iterations; mean distinct chunks per row {distinct:.1f}"
    )
    print(f"{'T':>6} {'vectorised ms':>14} {'loop ms':>10} {'speed-up':>9} {'agreement p':>12}")
    generator = torch.Generator(device=device).manual_seed(0)
    rng = random.Random(0)
    rows = []
    for temperature in args.temperatures:
        vectorised_ms = time_call(
            lambda t=temperature: batch_temperature_sample(candidates, t, generator=generator), iterations, synchronize
        )
        loop_ms = time_call(lambda t=temperature: loop_temperature_sample(candidates, t, rng), iterations, synchronize)
        pvalue = agreement_pvalue(temperature, copies=2000 if args.quick else 20000)
        rows.append((temperature, loop_ms / vectorised_ms, pvalue))
        print(
            f"{temperature:6.3f} {vectorised_ms:14.3f} {loop_ms:10.3f} {loop_ms / vectorised_ms:8.2f}x {pvalue:12.3g}"
        )
    for temperature, ratio, pvalue in rows:
        print(f"ratio T={temperature:.4f}: {ratio:.2f}")
        print(f"agreement T={temperature:.4f}: p={pvalue:.3g}")


if __name__ == "__main__":
    main()
