#!/usr/bin/env python
"""End-to-end CALM demo on CPU, in about ten minutes: `make demo`, or from the repository root

    HF_HUB_OFFLINE=1 .venv/bin/python examples/demo.py [--output_dir outputs/demo] [--train_files my.txt ...]

Stages (each one a function, timed):
  1. data            read the documents (the bundled WikiText-103 test set, 62 documents, or --train_files) and hold
                     the last --num_heldout_documents out;
  2. tokenizer       train a small byte-level BPE tokenizer on the training documents only;
  3. autoencoder     train a small CalmAutoencoder (K=4 tokens -> one latent vector) with CalmAutoencoderTrainer, on
                     the blocks examples/train_autoencoder.py makes;
  4. reconstruction  how well it reconstructs the held-out documents (token and chunk accuracy);
  5. CALM            train a small CalmForCausalLM on top of the frozen autoencoder with CalmTrainer, as
                     examples/train_calm.py does, with the small-scale recipe (benchmarks/bench_quality.py's
                     `calm-recipe`: the flow head, latent size 32, the head at 5x the learning rate, a constant schedule;
                     the configs' defaults stay the paper's); its evaluation gives BrierLM on the held-out documents;
  6. Llama           the baseline: a LlamaForCausalLM with the same backbone, trained on the same blocks with the
                     same steps, learning rate and schedule (`--no_llama` skips it);
  7. generation      continue a held-out prompt with both: CALM with likelihood-free temperature sampling, the Llama
                     with ordinary temperature sampling, printed side by side;
  8. report          a PNG of the training curves and a model card (README.md of the CALM checkpoint).

Nothing is downloaded: the data ship with the repository and the tokenizer is trained here. Outputs go to
--output_dir: data/, tokenizer/, autoencoder/, calm/ (a complete Hub-style checkpoint with its card),
llama/, training_curves.png and summary.json. A model this small, trained for minutes on 200K tokens, writes text
that is locally plausible at best: the demo shows the pipeline, the paper's quality needs the paper's scale; at this
budget the same-size Llama predicts the held-out text better (docs/small-scale.md).
"""

import argparse
import json
import os
import time
from contextlib import contextmanager

import torch
from scripts import (  # examples/scripts.py: the script's directory is on sys.path
    ScriptDataArguments,
    setup_logging,
    train_and_evaluate,
)
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    default_data_collator,
    set_seed,
)

from transformers_calm import (
    CalmAutoencoder,
    CalmAutoencoderConfig,
    CalmAutoencoderTrainer,
    CalmForCausalLM,
    CalmTrainer,
    create_model_card,
)
from transformers_calm.data import prepare_tokenizer
from transformers_calm.tokenization import train_tokenizer as calm_tokenizer
from transformers_calm.trainer_calm import OfficialTrainingArguments
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
    parser.add_argument("--vocab_size", type=int, default=4096, help="BPE vocabulary, special tokens included.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patch_size", type=int, default=4, help="K, tokens per chunk (per latent vector).")
    parser.add_argument("--block_size", type=int, default=256, help="Tokens per training block (multiple of K).")
    parser.add_argument("--batch_size", type=int, default=16)

    ae = parser.add_argument_group("autoencoder (the released model's structure, narrower to train in minutes)")
    # The small-scale recipe's latent size (bench_quality.py's RECIPE; the paper's is 128).
    ae.add_argument("--latent_size", type=int, default=32)
    ae.add_argument("--ae_hidden_size", type=int, default=128)
    ae.add_argument("--ae_intermediate_size", type=int, default=256)
    ae.add_argument("--ae_max_steps", type=int, default=400)
    ae.add_argument("--ae_learning_rate", type=float, default=6e-3)
    # DropToken/DropLatent make the latent space robust for the CALM stage, but at the official 0.15 they slow the
    # reconstruction down a lot (held-out token accuracy 78-93% after 400 steps in our trials, depending on the
    # learning rate, against 98.5-99.7% at 0.05, depending on the seed): a few minutes of CPU training affords 0.05.
    ae.add_argument("--token_dropout", type=float, default=0.05)
    ae.add_argument("--latent_dropout", type=float, default=0.05)

    lm = parser.add_argument_group("CALM language model (a Llama backbone of a few million parameters)")
    lm.add_argument("--hidden_size", type=int, default=256)
    lm.add_argument("--intermediate_size", type=int, default=704)
    lm.add_argument("--num_hidden_layers", type=int, default=4)
    lm.add_argument("--num_attention_heads", type=int, default=4)
    # The small-scale recipe (bench_quality.py's RECIPE, measured there against the same-size Llama): the flow head,
    # its learning rate at 5x the backbone's, a constant schedule after warm-up. The paper's: the energy head, one
    # learning rate (--calm_head_type energy --calm_head_learning_rate 2e-3 --calm_lr_scheduler_type cosine here).
    lm.add_argument("--calm_head_type", default="flow", choices=["energy", "flow", "diffusion"])
    lm.add_argument("--num_mlp_layers", type=int, default=2, help="Residual blocks of the generative head.")
    lm.add_argument("--calm_max_steps", type=int, default=250)
    lm.add_argument("--calm_learning_rate", type=float, default=2e-3)
    lm.add_argument(
        "--calm_head_learning_rate",
        type=float,
        default=1e-2,
        help="Peak learning rate of the generative head (CalmTrainingArguments.head_learning_rate). See "
        "docs/small-scale.md.",
    )
    lm.add_argument("--calm_lr_scheduler_type", default="constant_with_warmup", help="e.g. cosine")
    lm.add_argument(
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
    """Stage 2: the package's tokenizer recipe (`transformers_calm.tokenization.train_tokenizer`, as `calm train`
    uses): byte-level BPE that prepends BOS, `<pad>` at id 0 (the id DropToken writes)."""
    tokenizer = calm_tokenizer(texts, vocab_size)
    tokenizer.save_pretrained(save_dir)
    print(f"vocabulary {len(tokenizer)}; 'Hello world' -> {tokenizer('Hello world')['input_ids']} -> {save_dir}")
    return tokenizer


def training_args(args, output_dir, max_steps, learning_rate, lr_scheduler_type="cosine", head_learning_rate=None):
    """TrainingArguments shared by both stages: the official optimiser (AdamW (0.9, 0.95), wd 0.1, clip 1.0, the
    scripts' defaults), but a short warmup to a much larger learning rate than the official constant 3e-4 of a
    30k/250k-step run: a run of a few hundred steps needs a fast start. `head_learning_rate`: CALM's head only."""
    return OfficialTrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        max_steps=max_steps,
        learning_rate=learning_rate,
        head_learning_rate=head_learning_rate,
        warmup_steps=max(max_steps // 13, 1),
        lr_scheduler_type=lr_scheduler_type,
        logging_steps=max(max_steps // 10, 1),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=args.seed,
        dataloader_num_workers=0,
    )


def load_stage_blocks(args, data_paths, tokenizer, training_args):
    """`(train_dataset, eval_dataset)`: blocks of `--block_size` tokens, with the autoencoder's data recipe (packing
    "aligned": EOS appended, every document padded to a multiple of K), for both stages, as the training scripts."""
    data_args = ScriptDataArguments(
        train_file=data_paths["train"], validation_file=data_paths["validation"], block_size=args.block_size
    )
    return data_args.load_blocks(tokenizer, args.patch_size, training_args)


def train_and_report(trainer_class, model, training_args, tokenizer, datasets):
    """Train `model` with `trainer_class` (the package's trainers) and evaluate it on the held-out blocks, as the
    training scripts do (`scripts.train_and_evaluate`: the model and tokenizer are saved into `output_dir`)."""
    train_dataset, eval_dataset = datasets
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,  # saved beside the model
        data_collator=default_data_collator,
    )
    return trainer, train_and_evaluate(trainer)


def train_autoencoder_stage(args, data_paths, tokenizer_dir):
    """Stage 3: train the autoencoder with `CalmAutoencoderTrainer`; returns (trainer, metrics)."""
    # On this demo, learning rates of 3e-3 and 1e-2 both end lower than 6e-3.
    arguments = training_args(
        args, os.path.join(args.output_dir, "autoencoder"), args.ae_max_steps, args.ae_learning_rate
    )
    setup_logging(arguments)
    set_seed(args.seed)
    tokenizer = prepare_tokenizer(tokenizer_dir)
    datasets = load_stage_blocks(args, data_paths, tokenizer, arguments)
    config = CalmAutoencoderConfig(
        vocab_size=len(tokenizer),
        patch_size=args.patch_size,
        latent_size=args.latent_size,
        hidden_size=args.ae_hidden_size,
        intermediate_size=args.ae_intermediate_size,
        token_dropout=args.token_dropout,
        latent_dropout=args.latent_dropout,
        # Plain float32 on CPU: the official bf16 rounding of the embeddings buys nothing here.
        cast_embeddings_to_bf16_in_training=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = CalmAutoencoder(config)
    print(f"CalmAutoencoder: {model.num_parameters() / 1e6:.2f}M parameters, {len(datasets[0])} training blocks")
    trainer, metrics = train_and_report(CalmAutoencoderTrainer, model, arguments, tokenizer, datasets)
    print(
        f"eval (Trainer, posterior mean, alignment pads included): reconstruction accuracy "
        f"{metrics['eval_reconstruction_accuracy']:.4%}, chunk accuracy {metrics['eval_chunk_accuracy']:.4%}"
    )
    return trainer, metrics


def evaluate_stage(model, tokenizer, heldout_docs, args):
    """Stage 4: held-out reconstruction accuracy of every document token (eval mode, posterior mean)."""
    result = evaluate_reconstruction(
        model, tokenizer, heldout_docs, block_size=args.block_size, batch_size=4 * args.batch_size
    )
    print(
        f"held-out: {result['num_documents']} documents, {result['num_tokens']:,} tokens, {result['num_chunks']:,} "
        f"chunks of {args.patch_size}\n"
        f"  token accuracy {result['token_accuracy']:.4%}   chunk accuracy {result['chunk_accuracy']:.4%}"
    )
    return result


def demo_backbone_config(args, max_positions: int, **fields) -> LlamaConfig:
    """The backbone both models share: CALM's (positions count chunks) and the Llama baseline's (tokens)."""
    return LlamaConfig(
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-6,
        **fields,
    )


def train_calm_stage(args, data_paths):
    """Stage 5: train CALM on the frozen autoencoder saved by stage 3 with `CalmTrainer`; returns (trainer, metrics)."""
    ae_dir = os.path.join(args.output_dir, "autoencoder")  # holds the tokenizer too
    arguments = training_args(
        args,
        os.path.join(args.output_dir, "calm"),
        args.calm_max_steps,
        args.calm_learning_rate,
        lr_scheduler_type=args.calm_lr_scheduler_type,
        head_learning_rate=args.calm_head_learning_rate,
    )
    setup_logging(arguments)
    autoencoder = CalmAutoencoder.from_pretrained(ae_dir)
    tokenizer = AutoTokenizer.from_pretrained(ae_dir)
    set_seed(args.seed)
    backbone_config = demo_backbone_config(args, max_positions=args.block_size // args.patch_size)  # chunks
    model = CalmForCausalLM.from_autoencoder(
        autoencoder, backbone_config=backbone_config, head_type=args.calm_head_type, num_mlp_layers=args.num_mlp_layers
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"CalmForCausalLM: {trainable / 1e6:.2f}M trainable parameters (the autoencoder is frozen)")
    trainer, metrics = train_and_report(
        CalmTrainer, model, arguments, tokenizer, load_stage_blocks(args, data_paths, tokenizer, arguments)
    )
    print(
        f"held-out ({len(trainer.eval_dataset)} blocks of {args.block_size} tokens, chunk-aligned official "
        f"estimator): BrierLM {metrics['eval_brierlm']:.2f}  (Brier-1..4 "
        + ", ".join(f"{metrics[f'eval_brier{n}']:.4f}" for n in range(1, 5))
        + f"); {args.calm_head_type} head loss {metrics['eval_loss']:.4f}"
    )
    if metrics["eval_brierlm"] == 0:
        print(
            "(BrierLM 0: at this size and budget CALM's samples rarely match the reference on four tokens; the same-size "
            "Llama below does better. benchmarks/bench_quality.py measures both, and docs/small-scale.md says what was "
            "tried.)"
        )
    return trainer, metrics


def train_llama_stage(args, data_paths, tokenizer):
    """Stage 6: the baseline, a `LlamaForCausalLM` with CALM's backbone config, trained with transformers' `Trainer` on
    the same blocks with the same steps, learning rate and schedule (cross-entropy on every token)."""
    arguments = training_args(
        args,
        os.path.join(args.output_dir, "llama"),
        args.calm_max_steps,
        args.calm_learning_rate,
        lr_scheduler_type=args.calm_lr_scheduler_type,
    )
    set_seed(args.seed)
    config = demo_backbone_config(
        args,
        max_positions=args.block_size,
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    print(f"LlamaForCausalLM: {model.num_parameters() / 1e6:.2f}M parameters, the same backbone config")
    trainer, metrics = train_and_report(
        Trainer, model, arguments, tokenizer, load_stage_blocks(args, data_paths, tokenizer, arguments)
    )
    print(f"held-out cross-entropy {metrics['eval_loss']:.4f} nats per token")
    return trainer, metrics


def generation_stage(model, tokenizer, heldout_docs, args, llama=None):
    """Stage 7: continue a prompt with CALM (the batch approximation of temperature sampling, one chunk per step) and,
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
    """A PNG with the autoencoder's loss and accuracy and CALM's loss (and the energy head's terms) against steps."""
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
    for key in ("loss", "energy_fidelity", "energy_diversity"):
        axes[2].plot(*series(calm_history, key), marker=".", label=key)
    axes[2].set(title="CALM loss (energy head: 2 fidelity - diversity)", xlabel="step")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"training curves -> {path}")


def report_stage(args, ae_history, calm_trainer, results):
    """Stage 7: the PNG of the training curves and the CALM checkpoint's model card with the demo's results."""
    plot_curves(ae_history, calm_trainer.state.log_history, os.path.join(args.output_dir, "training_curves.png"))
    calm_dir = os.path.join(args.output_dir, "calm")
    card = create_model_card(
        calm_trainer.model,
        model_name="calm-demo",
        repo_id=calm_dir,
        language="en",
        tags=["demo"],
        results=results,
    )
    card.save(os.path.join(calm_dir, "README.md"))  # replaces the card save_pretrained wrote, now with results
    print(f"model card -> {os.path.join(calm_dir, 'README.md')}")


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    with stage("1. data"):
        train_docs, heldout_docs, data_paths = load_data(args)
    with stage("2. tokenizer"):
        tokenizer_dir = os.path.join(args.output_dir, "tokenizer")
        train_tokenizer(train_docs, args.vocab_size, tokenizer_dir)
    with stage("3. autoencoder training"):
        ae_trainer, _ = train_autoencoder_stage(args, data_paths, tokenizer_dir)
        autoencoder, tokenizer = ae_trainer.model, ae_trainer.processing_class
    with stage("4. held-out reconstruction"):
        reconstruction = evaluate_stage(autoencoder, tokenizer, heldout_docs, args)
    with stage("5. CALM training"):
        calm_trainer, calm_metrics = train_calm_stage(args, data_paths)
    llama_metrics = llama = None
    if not args.no_llama:
        with stage("6. Llama baseline training"):
            llama_trainer, llama_metrics = train_llama_stage(args, data_paths, tokenizer)
            llama = llama_trainer.model
    with stage("7. generation"):
        sample = generation_stage(calm_trainer.model, tokenizer, heldout_docs, args, llama)
    results = {
        "heldout_token_accuracy": reconstruction["token_accuracy"],
        "heldout_chunk_accuracy": reconstruction["chunk_accuracy"],
        **{
            key[len("eval_") :]: calm_metrics[key]
            for key in ("eval_brierlm", "eval_brier1", "eval_brier2", "eval_brier3", "eval_brier4")
        },
        "eval_head_loss": calm_metrics["eval_loss"],
    }
    if llama_metrics is not None:
        results["llama_eval_loss"] = llama_metrics["eval_loss"]
    with stage("8. report"):
        report_stage(args, ae_trainer.state.log_history, calm_trainer, results)
    total = time.perf_counter() - start

    print(f"\n=== summary (torch {torch.__version__}, {torch.get_num_threads()} threads) ===")
    for name, seconds in TIMINGS.items():
        print(f"  {name:<28} {seconds:7.1f} s")
    print(f"  {'total':<28} {total:7.1f} s")
    print(
        f"  held-out reconstruction: token accuracy {reconstruction['token_accuracy']:.4%}, chunk accuracy "
        f"{reconstruction['chunk_accuracy']:.4%}"
    )
    print(f"  held-out BrierLM of CALM: {results['brierlm']:.2f} (Brier-1 {results['brier1']:.4f})")
    print(f"  prompt: {sample['prompt']!r}")
    print(f"  CALM  (T={args.temperature}): {sample['continuation']!r}")
    if "llama_continuation" in sample:
        print(f"  Llama (T={args.temperature}): {sample['llama_continuation']!r}")
    summary = {"timings": dict(TIMINGS, total=total), "results": results, "sample": sample}
    with open(os.path.join(args.output_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    print(
        f"  outputs in {args.output_dir}/ (tokenizer/, autoencoder/, calm/, llama/, training_curves.png, summary.json)"
    )
    return summary


if __name__ == "__main__":
    main()
