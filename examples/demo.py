#!/usr/bin/env python
"""End-to-end CALM demo on CPU, in about ten minutes: `make demo`, or from the repository root

    HF_HUB_OFFLINE=1 .venv/bin/python examples/demo.py [--output_dir outputs/demo] [--train_files my.txt ...]

The demo is `calm train` (the package's command line) on the bundled documents, plus what a first look at a CALM
wants around it. Stages (each timed):
  1. data            read the documents (the bundled WikiText-103 test set, 62 documents, or --train_files) and hold
                     the last --num_heldout_documents out;
  2. calm train      `calm train data/train.jsonl --validation_file data/validation.jsonl --preset cpu`: a byte-level
                     BPE tokenizer, the autoencoder (K=4 tokens -> one latent vector) with CalmAutoencoderTrainer, then
                     a small CALM on the frozen autoencoder with CalmTrainer and the small-scale recipe (the flow head,
                     latent size 32, the head at 5x the learning rate, a constant schedule; `--recipe paper` for the
                     energy head); its evaluation gives BrierLM on the held-out documents;
  3. reconstruction  how well the autoencoder reconstructs the held-out documents (token and chunk accuracy);
  4. Llama           the baseline: a LlamaForCausalLM with the same backbone, trained with transformers' Trainer on
                     the same blocks with the same steps, learning rate and schedule (`--no_llama` skips it);
  5. generation      continue a held-out prompt with both: CALM with likelihood-free temperature sampling, the Llama
                     with ordinary temperature sampling, printed side by side;
  6. report          a PNG of the training curves and a model card (README.md of the CALM checkpoint).

Every size and step of `calm train` is an option here too (`--hidden_size`, `--lm_steps`, ...; `calm train --help`).
Nothing is downloaded: the data ship with the repository and the tokenizer is trained here. Outputs go to
--output_dir: data/, calm/ (calm train's folder: the CALM with its card, calm/tokenizer, calm/autoencoder), llama/,
training_curves.png and summary.json. A model this small, trained for minutes on 200K tokens, writes text that is
locally plausible at best: the demo shows the pipeline, the paper's quality needs the paper's scale; at this budget
the same-size Llama predicts the held-out text better (docs/small-scale.md).
"""

import argparse
import json
import os
import time
from contextlib import contextmanager

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, default_data_collator, set_seed

from transformers_calm import create_model_card
from transformers_calm.cli import PRESETS, RECIPES, add_size_arguments, train_command, training_arguments
from transformers_calm.tokenization import train_tokenizer as calm_tokenizer
from transformers_calm.trainer_calm_autoencoder import evaluate_reconstruction

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED_DATA = os.path.join(REPO_ROOT, "data", "wikitext_document_level-test.json")
TIMINGS = {}


@contextmanager
def stage(name):
    """Print a stage banner and record its wall time in TIMINGS."""
    print(f"\n=== {name} ===", flush=True)
    start = time.perf_counter()
    yield
    TIMINGS[name] = time.perf_counter() - start
    print(f"--- {name}: {TIMINGS[name]:.1f} s", flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument(
        "--train_files",
        "--text",
        nargs="+",
        default=[BUNDLED_DATA],
        help="Your own documents instead of the bundled WikiText: JSON lines with a `text` field (.json/.jsonl), or "
        "plain text where blank lines separate documents.",
    )
    parser.add_argument("--num_heldout_documents", type=int, default=6, help="The last N documents are held out.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="calm train's sizes and steps")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="small-scale", help="paper: the energy head")
    add_size_arguments(parser)  # calm train's --vocab_size, --hidden_size, --lm_steps, ...
    parser.add_argument(
        "--no_llama", action="store_true", help="Skip the Llama baseline (same backbone, blocks, steps, schedule)."
    )
    gen = parser.add_argument_group("generation")
    gen.add_argument("--prompt", default=None, help="Default: the first words of the first held-out document.")
    gen.add_argument("--max_new_tokens", type=int, default=48)
    gen.add_argument(
        "--temperature", type=float, default=0.5, help="In (0, 1]; likelihood-free (see docs/generation.md)."
    )
    gen.add_argument("--num_candidates", type=int, default=200, help="N of the batch temperature approximation.")
    return parser.parse_args(argv)


def read_documents(paths):
    """Documents of JSON-lines files (`text` field) or plain-text files (blank lines separate documents)."""
    documents = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            if path.endswith((".json", ".jsonl")):
                documents.extend(json.loads(line)["text"] for line in f if line.strip())
            else:
                documents.extend(f.read().split("\n\n"))
    return [doc for doc in documents if doc.strip()]


def load_data(args):
    """Stage 1: split the documents into training and held-out ones, and write both as JSON lines."""
    documents = read_documents(args.train_files)
    if not 0 < args.num_heldout_documents < len(documents):
        raise ValueError(
            f"--num_heldout_documents must be between 1 and {len(documents) - 1} (there are {len(documents)} "
            "documents)."
        )
    train_docs, heldout_docs = documents[: -args.num_heldout_documents], documents[-args.num_heldout_documents :]
    data_dir = os.path.join(args.output_dir, "data")
    os.makedirs(data_dir, exist_ok=True)
    paths = {}
    for split, docs in (("train", train_docs), ("validation", heldout_docs)):
        paths[split] = os.path.join(data_dir, f"{split}.jsonl")
        with open(paths[split], "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": doc}) + "\n" for doc in docs)
    print(
        f"{len(train_docs)} training documents ({sum(map(len, train_docs)):,} characters), {len(heldout_docs)} "
        f"held out ({sum(map(len, heldout_docs)):,} characters) -> {data_dir}"
    )
    return train_docs, heldout_docs, paths


def train_tokenizer(texts, vocab_size, save_dir):
    """The package's tokenizer recipe (`transformers_calm.tokenization.train_tokenizer`, as `calm train` uses), saved
    to `save_dir`: byte-level BPE that prepends BOS, `<pad>` at id 0 (the id DropToken writes). benchmarks/
    bench_quality.py trains the demo's tokenizer with it."""
    tokenizer = calm_tokenizer(texts, vocab_size)
    tokenizer.save_pretrained(save_dir)
    print(f"vocabulary {len(tokenizer)}; 'Hello world' -> {tokenizer('Hello world')['input_ids']} -> {save_dir}")
    return tokenizer


def calm_train_stage(args, data_paths):
    """Stage 2: `calm train` on the training documents, the held-out ones as its validation file; returns its
    `TrainRun` (the trained models, the blocks both stages read, the metrics and logs)."""
    argv = [data_paths["train"], "--validation_file", data_paths["validation"], "--restart"]
    argv += ["--output_dir", os.path.join(args.output_dir, "calm"), "--preset", args.preset, "--recipe", args.recipe]
    argv += ["--seed", str(args.seed)]
    for name in PRESETS[args.preset]:  # the sizes and steps given to the demo go to calm train
        if getattr(args, name) is not None:
            argv += [f"--{name}", str(getattr(args, name))]
    print("calm train " + " ".join(argv))
    return train_command(argv)


def evaluate_stage(model, tokenizer, heldout_docs, run):
    """Stage 3: held-out reconstruction accuracy of every document token (eval mode, posterior mean)."""
    block_size, batch_size = run.settings["block_size"], run.settings["batch_size"]
    result = evaluate_reconstruction(model, tokenizer, heldout_docs, block_size=block_size, batch_size=4 * batch_size)
    print(
        f"held-out: {result['num_documents']} documents, {result['num_tokens']:,} tokens, {result['num_chunks']:,} "
        f"chunks of {run.settings['patch_size']}\n"
        f"  token accuracy {result['token_accuracy']:.4%}   chunk accuracy {result['chunk_accuracy']:.4%}"
    )
    return result


def train_llama_stage(args, run):
    """Stage 4: the baseline, a `LlamaForCausalLM` with CALM's backbone config (positions count tokens instead of
    chunks), trained with transformers' `Trainer` on calm train's blocks with CALM's steps, learning rate and schedule
    (cross-entropy on every token)."""
    settings, tokenizer = run.settings, run.tokenizer
    arguments = training_arguments(  # calm train's, with CALM's steps, learning rate and schedule; on the CPU
        settings,
        os.path.join(args.output_dir, "llama"),
        settings["lm_steps"],
        settings["lm_learning_rate"],
        args.seed,
        lr_scheduler_type=settings["lr_scheduler_type"],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
    )
    set_seed(args.seed)
    backbone = run.model.config.backbone_config
    config = LlamaConfig(
        hidden_size=backbone.hidden_size,
        intermediate_size=backbone.intermediate_size,
        num_hidden_layers=backbone.num_hidden_layers,
        num_attention_heads=backbone.num_attention_heads,
        rms_norm_eps=backbone.rms_norm_eps,
        max_position_embeddings=settings["block_size"],
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    print(f"LlamaForCausalLM: {model.num_parameters() / 1e6:.2f}M parameters, the same backbone config")
    train_blocks, eval_blocks = run.blocks
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=train_blocks,
        eval_dataset=eval_blocks,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model()
    print(f"held-out cross-entropy {metrics['eval_loss']:.4f} nats per token")
    return trainer, metrics


def generation_stage(model, tokenizer, heldout_docs, args, llama=None):
    """Stage 5: continue a prompt with CALM (the batch approximation of temperature sampling, one chunk per step) and,
    when given, with the Llama baseline (ordinary temperature sampling), from the same prompt and seed."""
    prompt = args.prompt
    if prompt is None:  # the first ~24 words of the first held-out document
        prompt = " ".join(heldout_docs[0].split()[:24])
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    context = model.config.max_tokens
    if input_ids.shape[1] + args.max_new_tokens > context:  # keep the prompt's end: the model's context is full
        input_ids = input_ids[:, -(context - args.max_new_tokens) :]
        prompt = tokenizer.decode(input_ids[0], skip_special_tokens=True)
        print(f"(prompt cut to its last {input_ids.shape[1]} tokens to fit the context of {context} tokens)")
    model.eval()
    output = model.generate(
        input_ids,
        do_sample=True,
        temperature=args.temperature,
        num_candidates=args.num_candidates,
        max_new_tokens=args.max_new_tokens,
        generator=torch.Generator().manual_seed(args.seed),
    )
    continuation = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    print(f"prompt ({input_ids.shape[1]} tokens): {prompt!r}")
    print(f"CALM  (T={args.temperature}, N={args.num_candidates}, {args.max_new_tokens} tokens): {continuation!r}")
    sample = {"prompt": prompt, "continuation": continuation, "temperature": args.temperature}
    if llama is not None:
        llama.eval()
        set_seed(args.seed)
        output = llama.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=True,
            temperature=args.temperature,
            top_k=0,  # plain temperature sampling, as CALM's
            max_new_tokens=args.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
        sample["llama_continuation"] = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
        print(f"Llama (T={args.temperature}, {args.max_new_tokens} tokens): {sample['llama_continuation']!r}")
    return sample


def plot_curves(ae_history, calm_history, path):
    """A PNG with the autoencoder's loss and accuracy and CALM's loss terms against steps."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    def series(history, key):
        points = [(row["step"], row[key]) for row in history if key in row]
        return [p[0] for p in points], [p[1] for p in points]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key in ("loss", "reconstruction_loss"):
        axes[0].plot(*series(ae_history, key), marker=".", label=key)
    axes[0].set(title="autoencoder loss", xlabel="step", yscale="log")
    # The train logs' token accuracy is that of the training forward (DropToken, posterior sample, DropLatent).
    axes[1].plot(*series(ae_history, "reconstruction_accuracy"), marker=".", label="train reconstruction_accuracy")
    axes[1].set(title="autoencoder token accuracy (train)", xlabel="step", ylim=(0, 1))
    for key in ("loss", "energy_fidelity", "energy_diversity"):  # the energy head's terms; the flow head logs loss
        if any(key in row for row in calm_history):
            axes[2].plot(*series(calm_history, key), marker=".", label=key)
    axes[2].set(title="CALM head loss", xlabel="step")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"training curves -> {path}")


def report_stage(args, run, results):
    """Stage 6: the PNG of the training curves and the CALM checkpoint's model card with the demo's results."""
    plot_curves(run.autoencoder_log_history, run.log_history, os.path.join(args.output_dir, "training_curves.png"))
    calm_dir = os.path.join(args.output_dir, "calm")
    card = create_model_card(
        run.model, model_name="calm-demo", repo_id=calm_dir, language="en", tags=["demo"], results=results
    )
    card.save(os.path.join(calm_dir, "README.md"))  # replaces the card calm train saved, now with results
    print(f"model card -> {os.path.join(calm_dir, 'README.md')}")


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    with stage("1. data"):
        train_docs, heldout_docs, data_paths = load_data(args)
    with stage("2. calm train (tokenizer, autoencoder, CALM)"):
        run = calm_train_stage(args, data_paths)
        metrics = run.metrics
        print(
            f"held-out ({len(run.blocks[1])} blocks of {run.settings['block_size']} tokens, chunk-aligned official "
            f"estimator): BrierLM {metrics['eval_brierlm']:.2f}  (Brier-1..4 "
            + ", ".join(f"{metrics[f'eval_brier{n}']:.4f}" for n in range(1, 5))
            + f"); {run.settings['head_type']} head loss {metrics['eval_loss']:.4f}"
        )
    with stage("3. held-out reconstruction"):
        reconstruction = evaluate_stage(run.autoencoder, run.tokenizer, heldout_docs, run)
    llama_metrics = llama = None
    if not args.no_llama:
        with stage("4. Llama baseline training"):
            llama_trainer, llama_metrics = train_llama_stage(args, run)
            llama = llama_trainer.model
    with stage("5. generation"):
        sample = generation_stage(run.model, run.tokenizer, heldout_docs, args, llama)
    results = {
        "heldout_token_accuracy": reconstruction["token_accuracy"],
        "heldout_chunk_accuracy": reconstruction["chunk_accuracy"],
        **{key[len("eval_") :]: metrics[key] for key in ("eval_brierlm", *(f"eval_brier{n}" for n in range(1, 5)))},
        "eval_head_loss": metrics["eval_loss"],
    }
    if llama_metrics is not None:
        results["llama_eval_loss"] = llama_metrics["eval_loss"]
    with stage("6. report"):
        report_stage(args, run, results)
    total = time.perf_counter() - start

    print(f"\n=== summary (torch {torch.__version__}, {torch.get_num_threads()} threads) ===")
    for name, seconds in TIMINGS.items():
        print(f"  {name:<44} {seconds:7.1f} s")
    print(f"  {'total':<44} {total:7.1f} s")
    print(
        f"  held-out reconstruction: token accuracy {reconstruction['token_accuracy']:.4%}, chunk accuracy "
        f"{reconstruction['chunk_accuracy']:.4%}"
    )
    print(f"  held-out BrierLM of CALM: {results['brierlm']:.2f} (Brier-1 {results['brier1']:.4f})")
    if metrics["eval_brierlm"] == 0:
        print(
            "  (BrierLM 0: at this size and budget CALM's samples rarely match the reference on four tokens; the "
            "same-size Llama does better. benchmarks/bench_quality.py measures both, docs/small-scale.md says what was "
            "tried.)"
        )
    print(f"  prompt: {sample['prompt']!r}")
    print(f"  CALM  (T={args.temperature}): {sample['continuation']!r}")
    if "llama_continuation" in sample:
        print(f"  Llama (T={args.temperature}): {sample['llama_continuation']!r}")
    summary = {"timings": dict(TIMINGS, total=total), "results": results, "sample": sample}
    with open(os.path.join(args.output_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    print(f"  outputs in {args.output_dir}/ (data/, calm/, llama/, training_curves.png, summary.json)")
    return summary


if __name__ == "__main__":
    main()
