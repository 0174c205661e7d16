#!/usr/bin/env python
"""Streamed against pre-tokenised training data in `examples/train_calm.py`, on P processes (torchrun, CPU gloo or
GPUs): training tokens/s, the time from launch to the end of the first step, and the time a streamed run takes to
resume from checkpoints taken after more and more steps.

The corpus is the bundled WikiText-103 test set cut into paragraphs (one document each), copied `--scale` times into
`--shards` JSON-lines shards; the model is a small CALM on a random autoencoder (tokens/s of the data path and a training step, not of a
trained model). Every figure comes from its own launch of the script, as a user would start it:

- tokens/s: `train_samples_per_second x block_size` over `--steps` steps (Trainer's own `train_runtime`, which
  for the streamed run includes reading and tokenising, and for the pre-tokenised run does not);
- launch to first step: the wall time of a run of one step, launch to exit (saving nothing, evaluating nothing);
  the pre-tokenised run tokenises the whole corpus first (a fresh `datasets` cache each time);
- resume: the wall time of a streamed run that resumes from the checkpoint at step N and trains one more step.

    python benchmarks/bench_streaming.py --tokenizer meta-llama/Meta-Llama-3-8B            # 2 processes, CPU
    python benchmarks/bench_streaming.py --tokenizer TOKENIZER --scale 10 --json results.json
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "examples" / "train_calm.py"
WIKITEXT = REPO_ROOT / "data" / "wikitext_document_level-test.json"
sys.path.insert(0, str(REPO_ROOT / "examples"))

from transformers_calm import CalmAutoencoder, CalmAutoencoderConfig  # noqa: E402
from transformers_calm.data import prepare_tokenizer  # noqa: E402

MODEL_ARGS = [
    "--hidden_size", "128", "--intermediate_size", "256", "--num_hidden_layers", "4", "--num_attention_heads", "4",
    "--num_key_value_heads", "4", "--num_mlp_layers", "2", "--noise_size", "32",
]  # fmt: skip


def write_corpus(directory: Path, scale: int, shards: int) -> list[str]:
    """The synthetic corpus: the paragraphs of the bundled documents as documents of their own (1,322 of them, so
    that a `map` batch of 1,000 documents is a small part of the corpus, as it is of a real one), `scale` times,
    dealt round-robin into `shards` JSON-lines files."""
    with open(WIKITEXT, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    texts = [paragraph.strip() for text in texts for paragraph in text.split("\n \n") if paragraph.strip()]
    files = [directory / f"shard{i:02d}.jsonl" for i in range(shards)]
    handles = [open(path, "w", encoding="utf-8") for path in files]
    for index, text in enumerate(text for _ in range(scale) for text in texts):
        handles[index % shards].write(json.dumps({"text": text}) + "\n")
    for handle in handles:
        handle.close()
    return [str(path) for path in files]


def make_autoencoder(directory: Path, tokenizer_name: str) -> None:
    tokenizer = prepare_tokenizer(tokenizer_name)
    config = CalmAutoencoderConfig(
        vocab_size=len(tokenizer),
        patch_size=4,
        latent_size=32,
        hidden_size=128,
        intermediate_size=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    CalmAutoencoder(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def launch(args, work: Path, name: str, files: list[str], streaming: bool, *extra: str) -> float:
    """Run train_calm.py on `args.processes` processes; returns the wall time in seconds, launch to exit."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": str(args.threads),
        "HF_DATASETS_CACHE": str(work / f"cache-{name}"),  # fresh: the pre-tokenised run tokenises everything
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.processes),
        str(SCRIPT), "--autoencoder", str(work / "autoencoder"), "--train_file", *files,
        "--block_size", str(args.block_size), *MODEL_ARGS, "--per_device_train_batch_size", str(args.batch_size),
        "--logging_steps", "10", "--report_to", "none", "--seed", "0", "--disable_tqdm", "true",
        "--dataloader_num_workers", "0", "--output_dir", str(work / name),
        *(["--use_cpu"] if args.device == "cpu" else []), *(["--streaming"] if streaming else []), *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return elapsed


def tokens_per_second(work: Path, name: str, block_size: int) -> float:
    metrics = json.loads((work / name / "train_results.json").read_text())
    return metrics["train_samples_per_second"] * block_size


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="The tokenizer (e.g. meta-llama/Meta-Llama-3-8B).")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="Threads per process.")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--scale", type=int, default=1, help="Copies of the bundled corpus (10: the 10x corpus).")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--block_size", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=2, help="Blocks per process and step.")
    parser.add_argument("--steps", type=int, default=40, help="Steps of the tokens/s runs.")
    parser.add_argument("--resume_steps", type=int, nargs="+", default=[10, 40], help="Checkpoints to resume from.")
    parser.add_argument("--quick", action="store_true", help="A few steps on a tiny corpus (tests).")
    parser.add_argument("--json", help="Also write the figures to this JSON file.")
    args = parser.parse_args(argv)
    if args.quick:  # one step: the launch to the first step is also the tokens/s run (2 launches fewer)
        args.scale, args.block_size, args.batch_size, args.steps, args.resume_steps = 1, 128, 1, 1, [2]

    work = Path(tempfile.mkdtemp(prefix="bench-streaming-"))
    try:
        files = write_corpus(work, args.scale, args.shards)
        make_autoencoder(work / "autoencoder", args.tokenizer)
        figures = {"processes": args.processes, "scale": args.scale, "shards": args.shards}
        for mode, streaming in (("pretokenised", False), ("streamed", True)):
            figures[f"{mode}_launch_to_first_step_s"] = launch(
                args, work, f"{mode}-first", files, streaming, "--max_steps", "1", "--save_strategy", "no"
            )
            run = f"{mode}-first"
            if args.steps > 1:
                run = f"{mode}-run"
                launch(args, work, run, files, streaming, "--max_steps", str(args.steps), "--save_strategy", "no")
            figures[f"{mode}_tokens_per_s"] = tokens_per_second(work, run, args.block_size)
        last = max(args.resume_steps)
        launch(args, work, "saved", files, True, "--max_steps", str(last), "--save_strategy", "steps",
               "--save_steps", "1" if args.quick else str(min(args.resume_steps)))  # fmt: skip
        figures["resume_s"] = {}
        for step in args.resume_steps:
            checkpoint = work / "saved" / f"checkpoint-{step}"
            shutil.rmtree(work / "resumed", ignore_errors=True)
            shutil.copytree(checkpoint, work / "resumed" / checkpoint.name)
            figures["resume_s"][str(step)] = launch(
                args, work, "resumed", files, True, "--max_steps", str(step + 1), "--save_strategy", "no",
                "--resume_from_checkpoint", str(work / "resumed" / checkpoint.name),
            )  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ratio = figures["streamed_tokens_per_s"] / figures["pretokenised_tokens_per_s"]
    print(f"processes {args.processes}, corpus x{args.scale} in {args.shards} shards, block {args.block_size}")
    print(
        f"tokens/s: pre-tokenised {figures['pretokenised_tokens_per_s']:.0f}, streamed "
        f"{figures['streamed_tokens_per_s']:.0f} (streamed / pre-tokenised {ratio:.2f}x)"
    )
    print(
        f"launch to first step: pre-tokenised {figures['pretokenised_launch_to_first_step_s']:.1f} s, streamed "
        f"{figures['streamed_launch_to_first_step_s']:.1f} s"
    )
    print(
        "resume (launch to exit, one more step): "
        + ", ".join(f"from step {s}: {t:.1f} s" for s, t in figures["resume_s"].items())
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
