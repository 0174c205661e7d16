"""Benchmark: `calm serve` (transformers' OpenAI-compatible server hosting a CALM), tokens/s of streamed requests.

Starts `calm serve` as a child process on a free localhost port, with a random CALM of bench_generate.py's sizes
(`--preset small` by default; EOS disabled, so every request gets `--new-tokens` tokens) and a word-level tokenizer of
its vocabulary, or with `--model`, a saved CALM folder. Then sends streamed `/v1/completions` requests with the
`openai` client: one at a time, then `--streams` at once (threads), each `--repeats` times, and reports for each the
generated tokens per second of the server (all streams' tokens over the wall time from the first request to the last
token), each stream's own rate, and the time to its first token. The server runs `generate` for one request at a
time (CALM cannot use transformers' continuous batching, see docs/serving.md), so concurrent streams queue: the
server's rate stays that of one stream, and each stream's share of it falls. Before the server starts, the same
model's `generate` is timed in this process on the same prompt and length (`generate_tokens_per_second`): the
server's own cost is the difference. The baseline in the same run (random models only): the Llama of the same
backbone (bench_generate.py's), served by transformers' own `transformers serve` and measured the same way.

    python benchmarks/bench_serve.py                           # small preset, prompt 32, 128 new tokens, 1 and 4 streams
    python benchmarks/bench_serve.py --model outputs/first     # a trained CALM
    python benchmarks/bench_serve.py --quick --json /tmp/s.json   # tiny model, few tokens (used by the tests)

Writes the settings and figures as JSON (`--json`, default benchmarks/results/serve_cpu.json; not in --quick mode).
"""

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import QUICK_SIZES, add_model_arguments, apply_preset, build_models, timed_runs  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "serve_cpu.json")


def save_random_models(args, calm_folder: str, llama_folder: str) -> None:
    """A random CALM of the preset's sizes and the Llama of the same backbone (EOS disabled in both), each with a
    word-level tokenizer of the vocabulary (`w0` ...)."""
    calm, llama = build_models(args, torch.device("cpu"), torch.float32, args.prompt_tokens + args.new_tokens + 64)
    vocab = {f"w{i}": i for i in range(args.vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    for model, folder in ((calm, calm_folder), (llama, llama_folder)):
        model.save_pretrained(folder)
        PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="w0").save_pretrained(folder)


def generate_baseline(model: str, prompt: str, new_tokens: int, repeats: int, seed: int) -> float:
    """Tokens/s of `model.generate` in this process (the request's prompt and length, batch 1, temperature 1): what
    the server adds is the difference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import transformers_calm  # noqa: F401

    calm = AutoModelForCausalLM.from_pretrained(model).eval()
    ids = AutoTokenizer.from_pretrained(model)(prompt, return_tensors="pt")
    generator = torch.Generator().manual_seed(seed)

    def generate():
        return calm.generate(**ids, max_new_tokens=new_tokens, temperature=1.0, generator=generator)

    generate()  # warm-up
    seconds, out = timed_runs(generate, repeats, synchronize=lambda: None)
    return (out.shape[1] - ids["input_ids"].shape[1]) / seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_server(command: list[str], port: int, threads: int | None) -> subprocess.Popen:
    """The server `command` as a child process, once it answers /health on `port`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    # Its log goes to a file: a pipe nobody reads while the server runs could fill up and block it.
    log = tempfile.TemporaryFile(mode="w+")
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            raise SystemExit(f"{' '.join(command[:4])} exited with {server.returncode}:\n{log.read()}")
        try:
            with urllib.request.urlopen(f"http://localhost:{port}/health", timeout=5):
                return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit(f"{' '.join(command[:4])} did not answer within 300 s")


def serve_command(model: str, port: int, calm: bool) -> list[str]:
    """`calm serve MODEL` for a CALM; for the Llama baseline, transformers' own `transformers serve MODEL` (it runs
    `generate` one request at a time as calm serve does: no continuous batching, which CALM cannot use)."""
    if calm:
        return [sys.executable, "-m", "transformers_calm.cli", "serve", model, "--port", str(port), "--device", "cpu"]
    return [sys.executable, "-m", "transformers.cli.transformers", "serve", model, "--port", str(port)]


def measure(args, model: str, prompt: str, calm: bool) -> list[dict]:
    """The server of `model` started, warmed up, and measured: one row per stream count (the median of
    `--repeats` runs)."""
    import openai

    port = free_port()
    server = start_server(serve_command(model, port, calm), port, args.threads)
    name = "calm serve" if calm else "transformers serve (Llama)"
    try:
        client = openai.OpenAI(base_url=f"http://localhost:{port}/v1", api_key="none", timeout=600, max_retries=0)
        streamed_request(client, model, prompt, args.new_tokens, args.seed)  # warm-up
        rows = []
        for streams in (1, args.streams):
            runs = [
                run_streams(client, model, prompt, args.new_tokens, streams, args.seed + 10 * r)
                for r in range(args.repeats)
            ]
            best = sorted(runs, key=lambda run: run["tokens_per_second"])[len(runs) // 2]  # the median run
            rows.append({"streams": streams, **best, "runs_tokens_per_second": [r["tokens_per_second"] for r in runs]})
            ttft = statistics.median(best["time_to_first_token"])
            per_stream = statistics.mean(best["stream_tokens_per_second"])
            print(
                f"{name}, {streams} stream(s): {best['tokens_per_second']:.1f} tokens/s served ({best['tokens']} "
                f"tokens in {best['seconds']:.2f} s), {per_stream:.1f} tokens/s per stream, median time to first "
                f"token {ttft:.2f} s; runs: " + ", ".join(f"{r:.1f}" for r in rows[-1]["runs_tokens_per_second"]),
                flush=True,
            )
        return rows
    finally:
        server.terminate()
        server.wait(timeout=30)


def streamed_request(client, model: str, prompt: str, new_tokens: int, seed: int) -> dict:
    """One streamed completion: `{"tokens", "start", "first_token", "end"}` (time.perf_counter seconds)."""
    start = time.perf_counter()
    first = None
    tokens = 0
    for chunk in client.completions.create(
        model=model, prompt=prompt, max_tokens=new_tokens, seed=seed, temperature=1.0, stream=True
    ):
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"tokens": tokens, "start": start, "first_token": first or time.perf_counter(), "end": time.perf_counter()}


def run_streams(client, model: str, prompt: str, new_tokens: int, streams: int, seed: int) -> dict:
    """`streams` streamed requests at once (one thread each); the server's tokens/s and each stream's figures."""
    results = [None] * streams

    def run(index):
        results[index] = streamed_request(client, model, prompt, new_tokens, seed + index)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    tokens = sum(r["tokens"] for r in results)
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_second": tokens / wall,
        "stream_tokens_per_second": [r["tokens"] / (r["end"] - r["start"]) for r in results],
        "time_to_first_token": [r["first_token"] - r["start"] for r in results],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--model", help="a saved CALM folder (default: a random one of --preset's sizes)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--streams", type=int, default=4, help="concurrent streams of the second measurement")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement (the median is reported)")
    parser.add_argument("--json", default=None, help=f"where to write the results (default: {RESULTS})")
    parser.add_argument("--quick", action="store_true", help="tiny model, few tokens, one repeat (for the tests)")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK_SIZES.items():
            setattr(args, name, value)
        args.prompt_tokens, args.new_tokens, args.repeats = 8, 12, 1
    apply_preset(args)
    output = args.json or (None if args.quick else RESULTS)

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as folder:
        model, llama = args.model, None
        if model is None:
            model, llama = os.path.join(folder, "calm"), os.path.join(folder, "llama")
            save_random_models(args, model, llama)
        prompt = " ".join(f"w{5 + i % 50}" for i in range(args.prompt_tokens))
        baseline = generate_baseline(model, prompt, args.new_tokens, args.repeats, args.seed)
        print(f"model.generate in process: {baseline:.1f} tokens/s", flush=True)
        rows = measure(args, model, prompt, calm=True)
        llama_rows = measure(args, llama, prompt, calm=False) if llama and not args.quick else None
    if llama_rows:
        for row, llama_row in zip(rows, llama_rows, strict=True):
            row["llama_tokens_per_second"] = llama_row["tokens_per_second"]
            print(f"{row['streams']} stream(s): calm serve / transformers serve (Llama) "
                  f"{row['tokens_per_second'] / llama_row['tokens_per_second']:.2f}x")  # fmt: skip

    if output:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        settings.update(
            torch=torch.__version__,
            cpu_count=os.cpu_count(),
            machine=platform.machine(),
            date=time.strftime("%Y-%m-%d"),
            command=" ".join(["python", "benchmarks/bench_serve.py", *(argv if argv is not None else sys.argv[1:])]),
        )
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w", encoding="utf-8") as f:
            report = {"settings": settings, "generate_tokens_per_second": baseline, "results": rows}
            json.dump({**report, "llama_results": llama_rows}, f, indent=2)
        print(f"wrote {output}")


if __name__ == "__main__":
    main()
