"""Benchmark: quality per training FLOP, CALM (each generative head) against a Llama with the same backbone.

Every model trains on the same token blocks, in the same order, with the same batch, optimiser (AdamW (0.9, 0.95),
weight decay 0.1, gradient clipping 1.0) and learning-rate schedule; at regular steps its held-out BrierLM is
measured. The x-axis is training FLOPs (forward + backward, counted with torch's FlopCounterMode as bench_train.py
does; CALM's include the autoencoder's training, which comes first) and wall time (training only).

- CALM (`CalmForCausalLM`, `--heads energy flow diffusion`) is scored chunk-aligned (the official estimator).
- The Llama (`LlamaForCausalLM`, same backbone config) is scored at every token and at the chunk-aligned positions
  only (`positions="chunk"`: the n-grams that start a chunk of K tokens, with the context CALM has there), so that
  the comparison with CALM is like for like. Its exact Brier-1 (from the logits) is recorded beside the sampled one.

Corpora:
  synthetic  a chunk-level Markov language generated here: `--num_chunks` distinct chunks of K random tokens, each
             followed by one of `--successors` chunks (Dirichlet probabilities). Its optimal BrierLM is computed
             exactly, chunk-aligned and at every token, so a curve reads as a fraction of the best possible score.
  wikitext   the bundled WikiText-103 test documents with the demo's split (the last 6 held out) and tokenizer (a
             4096-token byte-level BPE trained on the training documents), EOS-terminated documents padded to a
             multiple of K (the demo's "aligned" recipe), cut into blocks.

    python benchmarks/bench_quality.py                       # synthetic, 600 steps: ~15 min on 2 CPU cores
    python benchmarks/bench_quality.py --corpus wikitext     # the demo's sizes, budget (250 steps) and recipe
    python benchmarks/bench_quality.py --quick               # tiny, a few steps (used by the tests)

Sizes, budget and recipe default by corpus (`CORPUS_DEFAULTS`; any of them can be given): synthetic, the small-scale
recipe of benchmarks/sweep_recipe.py (latent 32, the head at 10x the learning rate, constant schedule); wikitext,
exactly the demo's settings (latent 128, one learning rate, cosine).

Writes `quality_<corpus>.json` (settings, FLOPs per step, every evaluation point) and `quality_<corpus>.png`
(BrierLM against training FLOPs, log x, one line per model and scoring) into `--output_dir`, and prints a table:
the final scores and, on the synthetic corpus, the training FLOPs each model needs to reach `--target_fraction` of the
optimal chunk-aligned BrierLM, with the ratio to the Llama's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, get_scheduler

from transformers_calm import CalmAutoencoder, CalmAutoencoderConfig, CalmForCausalLM
from transformers_calm.brierlm import chunk_aligned, model_brier_terms
from transformers_calm.brierlm.estimator import brier_terms, brierlm_from_briers
from transformers_calm.pretrained_decoder import init_compression_from_last_token

BENCHMARKS = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))
from bench_generate import count_flops  # noqa: E402

MAX_N = 4
# Defaults by corpus (every one can be given on the command line). Synthetic: the small-scale recipe the sweep found
# (benchmarks/sweep_recipe.py; the official values are latent 128, one learning rate, cosine or constant 3e-4).
# WikiText: the demo's sizes, budget and recipe (examples/demo.py), so that the comparison is the demo's: the
# small-scale recipe's latent size, head learning rate and schedule (RECIPE; the paper's: --latent_size 128
# --head_lr_scale 1 --lr_scheduler_type cosine, and the energy head).
CORPUS_DEFAULTS = {
    "synthetic": {
        "vocab_size": 512,
        "eval_blocks": 32,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_layers": 2,
        "num_heads": 4,
        "latent_size": 32,
        "ae_steps": 100,
        "ae_learning_rate": 3e-3,
        "token_dropout": 0.15,
        "latent_dropout": 0.15,
        "max_steps": 600,
        "learning_rate": 1e-3,
        "head_lr_scale": 10.0,
        "lr_scheduler_type": "constant_with_warmup",
        "eval_every": 100,
    },
    "wikitext": {
        "vocab_size": 4096,
        "eval_blocks": 64,
        "hidden_size": 256,
        "intermediate_size": 704,
        "num_layers": 4,
        "num_heads": 4,
        "latent_size": 32,
        "ae_steps": 400,
        "ae_learning_rate": 6e-3,
        "ae_lr_scheduler_type": "cosine",
        "token_dropout": 0.05,
        "latent_dropout": 0.05,
        "max_steps": 250,
        "learning_rate": 2e-3,
        "head_lr_scale": 5.0,
        "lr_scheduler_type": "constant_with_warmup",
        "eval_every": 50,
    },
}
# What an autoencoder's training depends on besides the corpus (--ae_cache_dir keys on them).
AE_SETTINGS = (
    "corpus",
    "seed",
    "vocab_size",
    "patch_size",
    "block_size",
    "batch_size",
    "epochs",
    "latent_size",
    "ae_hidden_size",
    "ae_intermediate_size",
    "ae_steps",
    "ae_batch_size",
    "ae_learning_rate",
    "kl_weight",
    "kl_clamp",
    "token_dropout",
    "latent_dropout",
    "warmup_ratio",
)
PAD, BOS, EOS = 0, 1, 2  # the synthetic corpus's special tokens (real chunks use ids 3..vocab_size-1)
AUXILIARY_TERMS = ("decoder_loss", "token_loss")  # CALM's auxiliary losses, logged beside the loss when on
FROM_LLAMA = "-from-llama"
# `calm-recipe`: the best small-scale CALM found on WikiText (docs/small-scale.md); its settings
# replace the command line's. The configs' defaults stay official: every entry here is a bench_quality.py option.
RECIPE = {
    "head_type": "flow",
    "latent_size": 32,
    "head_lr_scale": 5.0,
    "lr_scheduler_type": "constant_with_warmup",
    "ae_lr_scheduler_type": "cosine",
}


# --------------------------------------------------------------------------------------- the synthetic language


class SyntheticChunkLanguage:
    """A first-order Markov chain over `num_chunks` distinct chunks of K tokens.

    Each chunk is K tokens drawn uniformly from ids 3..vocab_size-1; chunk c is followed by one of `successors`
    chunks (drawn at random) with Dirichlet(`concentration`) probabilities. Blocks start at a chunk drawn from the
    stationary distribution, so every position of every block is stationary, and the optimal Brier scores are exact
    expectations under it ([`optimal_brier`]).
    """

    def __init__(self, num_chunks=256, vocab_size=512, patch_size=4, successors=3, concentration=0.5, seed=0):
        if vocab_size - 3 < 2 or (vocab_size - 3) ** patch_size < num_chunks:
            raise ValueError(f"{vocab_size - 3} ids cannot make {num_chunks} distinct chunks of {patch_size} tokens.")
        if patch_size < MAX_N:
            raise ValueError(f"The exact optimum here assumes K >= {MAX_N} (an n-gram spans at most two chunks).")
        generator = torch.Generator().manual_seed(seed)
        chunks = set()
        while len(chunks) < num_chunks:
            chunks.add(tuple(torch.randint(3, vocab_size, (patch_size,), generator=generator).tolist()))
        self.chunks = torch.tensor(sorted(chunks))
        self.vocab_size, self.patch_size, self.num_chunks = vocab_size, patch_size, num_chunks
        transition = torch.zeros(num_chunks, num_chunks, dtype=torch.float64)
        gamma = torch.distributions.Gamma(torch.tensor(float(concentration)), torch.tensor(1.0))
        torch.manual_seed(seed)  # torch.distributions draws from the global generator
        for c in range(num_chunks):
            nexts = torch.randperm(num_chunks, generator=generator)[:successors]
            weights = gamma.sample((successors,)).double().clamp(min=1e-12)
            transition[c, nexts] = weights / weights.sum()
        self.transition = transition
        # Stationary distribution: the leading left eigenvector, by power iteration from uniform.
        pi = torch.full((num_chunks,), 1.0 / num_chunks, dtype=torch.float64)
        for _ in range(10_000):
            new = pi @ transition
            if (new - pi).abs().max() < 1e-15:
                break
            pi = new
        self.stationary = new / new.sum()

    def sample_blocks(self, num_blocks: int, block_size: int, seed: int) -> torch.LongTensor:
        """`(num_blocks, block_size)` token blocks of `block_size // K` chunks each (block_size a multiple of K)."""
        if block_size % self.patch_size:
            raise ValueError(f"block_size {block_size} must be a multiple of K = {self.patch_size}.")
        generator = torch.Generator().manual_seed(seed)
        state = torch.multinomial(self.stationary.float(), num_blocks, replacement=True, generator=generator)
        path = [state]
        for _ in range(block_size // self.patch_size - 1):
            state = torch.multinomial(self.transition[state].float(), 1, generator=generator).squeeze(1)
            path.append(state)
        return self.chunks[torch.stack(path, 1)].reshape(num_blocks, block_size)

    def _collisions(self, prior: torch.Tensor, offset: int) -> list[float]:
        """E over (chunk ~ prior) of sum_x P(x | the chunk's first `offset` tokens)^2, for n-grams x of n = 1..MAX_N
        starting at that offset (they run into the next chunk, drawn from the transition, when offset + n > K)."""
        K = self.patch_size
        totals = [0.0] * MAX_N
        support = prior.nonzero().squeeze(1).tolist()
        groups = {}  # the chunk's first `offset` tokens (what the context shows) -> chunks
        for c in support:
            groups.setdefault(tuple(self.chunks[c, :offset].tolist()), []).append(c)
        for members in groups.values():
            weight = float(prior[members].sum())
            for n in range(1, MAX_N + 1):
                ngram = {}
                for c in members:
                    p = float(prior[c]) / weight
                    head = tuple(self.chunks[c, offset : offset + n].tolist())
                    rest = offset + n - K
                    if rest <= 0:
                        ngram[head] = ngram.get(head, 0.0) + p
                        continue
                    for nxt in self.transition[c].nonzero().squeeze(1).tolist():
                        key = head + tuple(self.chunks[nxt, :rest].tolist())
                        ngram[key] = ngram.get(key, 0.0) + p * float(self.transition[c, nxt])
                totals[n - 1] += weight * sum(q * q for q in ngram.values())
        return totals

    def optimal_brier(self, block_size: int) -> dict:
        """The exact Brier-1..4 and BrierLM of the true distribution on blocks of `block_size` tokens.

        The expected Brier score of the true distribution P at a position is sum_x P(x)^2 (the collision
        probability), so the optimum is its average over the scored positions: "chunk" are CALM's (n-grams starting
        chunks 1..N-1, the previous chunk known), "token" every position i = 0..T-1-MAX_N of a token-level LM
        (offset j = (i + 1) mod K of its n-gram's chunk known, and the previous chunk unless it is chunk 0).
        """
        K = self.patch_size
        # Per offset j: the collision of a position with a known previous chunk (averaged over it) and without.
        with_previous, first_chunk = [], []
        for j in range(K):
            rows = [self._collisions(self.transition[c], j) for c in range(self.num_chunks)]
            with_previous.append((self.stationary[:, None] * torch.tensor(rows, dtype=torch.float64)).sum(0).tolist())
            first_chunk.append(self._collisions(self.stationary, j))
        chunk = with_previous[0]
        positions = range(block_size - MAX_N)
        token = [0.0] * MAX_N
        for i in positions:
            c, j = divmod(i + 1, K)
            row = first_chunk[j] if c == 0 else with_previous[j]
            token = [t + r / len(positions) for t, r in zip(token, row, strict=True)]
        result = {}
        for name, briers in (("chunk", chunk), ("token", token)):
            result[name] = {f"brier{n}": briers[n - 1] for n in range(1, MAX_N + 1)}
            result[name]["brierlm"] = brierlm_from_briers(briers)
        return result


def synthetic_corpus(args) -> dict:
    language = SyntheticChunkLanguage(
        num_chunks=args.num_chunks,
        vocab_size=args.vocab_size,
        patch_size=args.patch_size,
        successors=args.successors,
        concentration=args.concentration,
        seed=args.seed,
    )
    train_blocks = math.ceil(args.max_steps * args.batch_size / args.epochs)
    return {
        "name": "synthetic",
        "vocab_size": args.vocab_size,
        "special_tokens": {"pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS},
        "train": language.sample_blocks(train_blocks, args.block_size, seed=args.seed + 1),
        "heldout": language.sample_blocks(args.eval_blocks, args.block_size, seed=args.seed + 2),
        "optimal": language.optimal_brier(args.block_size),
        "description": (
            f"{args.num_chunks} chunks of {args.patch_size} tokens over {args.vocab_size} ids, {args.successors} "
            f"successors each, Dirichlet({args.concentration})"
        ),
    }


def wikitext_corpus(args) -> dict:
    """The demo's data: its split, its tokenizer (trained here on the training documents) and its block recipe."""
    sys.path.insert(0, str(REPO_ROOT / "examples"))
    import demo  # examples/demo.py

    from transformers_calm.data import documents_to_ids

    documents = demo.read_documents([demo.BUNDLED_DATA])
    train_docs, heldout_docs = documents[: -args.num_heldout_documents], documents[-args.num_heldout_documents :]
    tokenizer = demo.train_tokenizer(train_docs, args.vocab_size, os.path.join(args.output_dir, "wikitext-tokenizer"))

    def blocks(docs):
        stream = [token for ids in documents_to_ids(docs, tokenizer, args.patch_size) for token in ids]
        num_blocks = len(stream) // args.block_size
        return torch.tensor(stream[: num_blocks * args.block_size]).reshape(num_blocks, args.block_size)

    heldout = blocks(heldout_docs)
    return {
        "name": "wikitext",
        "vocab_size": len(tokenizer),
        "special_tokens": {
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        "train": blocks(train_docs),
        "heldout": heldout[: args.eval_blocks],
        "optimal": None,
        "description": f"WikiText-103 test documents, demo split, {len(tokenizer)}-token BPE",
    }


# ---------------------------------------------------------------------------------------------------- models


def backbone_config(args, corpus, max_positions: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=corpus["vocab_size"],
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        **corpus["special_tokens"],
    )


def build_autoencoder(args, corpus) -> CalmAutoencoder:
    config = CalmAutoencoderConfig(
        vocab_size=corpus["vocab_size"],
        patch_size=args.patch_size,
        latent_size=args.latent_size,
        hidden_size=args.ae_hidden_size,
        intermediate_size=args.ae_intermediate_size,
        kl_weight=args.kl_weight,
        kl_clamp=args.kl_clamp,
        token_dropout=args.token_dropout,
        latent_dropout=args.latent_dropout,
        cast_embeddings_to_bf16_in_training=False,
        **corpus["special_tokens"],
    )
    torch.manual_seed(args.seed)
    return CalmAutoencoder(config)


def build_calm(args, corpus, autoencoder, head_type: str, pretrained_decoder=None) -> CalmForCausalLM:
    torch.manual_seed(args.seed)
    head = {
        "head_type": head_type,
        "num_mlp_layers": args.num_mlp_layers,
        "num_samples": args.num_samples,  # energy: N head samples; flow / diffusion: posterior targets per position
        "target_noise_scale": args.target_noise_scale,
        # The small-scale remedies (CalmConfig fields, off by default): see docs/small-scale.md.
        "decoder_loss_weight": args.decoder_loss_weight,
        "decoder_loss_type": args.decoder_loss_type,
        "decoder_loss_samples": args.decoder_loss_samples,
        "input_noise_std": args.input_noise_std,
        "token_loss_weight": args.token_loss_weight,
    }
    if head_type != "energy":
        head.update(guidance_dropout=args.guidance_dropout, guidance_scale=args.guidance_scale)
    if head_type == "energy":
        head.update(noise_size=args.noise_size, energy_alpha=args.energy_alpha)
    if pretrained_decoder is not None:
        model = CalmForCausalLM.from_pretrained_decoder(
            pretrained_decoder, autoencoder, init_input_compression=args.last_token_compression, **head
        )
    else:
        model = CalmForCausalLM.from_autoencoder(
            autoencoder, backbone_config=backbone_config(args, corpus, args.block_size // args.patch_size), **head
        )
        if args.last_token_compression:
            embeddings = model.get_input_embeddings().weight.detach()
            init_compression_from_last_token(model.model.embed_proj, embeddings, model.config.patch_size)
    if head_type == "energy" and args.random_output_layer:
        torch.nn.init.normal_(model.generative_head.final_layer.linears[-1].weight, std=0.02)
    return model


def args_of_model(name: str, args) -> argparse.Namespace:
    """The settings of model `name`: `llama`, `calm-{energy,flow,diffusion}` (the command line's settings),
    `calm-recipe` (the small-scale recipe, `RECIPE`, over them), each CALM optionally suffixed `-from-llama` (its
    backbone starts from a Llama trained for `--from_llama_steps` steps, `CalmForCausalLM.from_pretrained_decoder`)."""
    model_args = argparse.Namespace(**vars(args))
    if name == "llama":
        return model_args
    base = name[: -len(FROM_LLAMA)] if name.endswith(FROM_LLAMA) else name
    if base == "calm-recipe":
        for key, value in RECIPE.items():
            setattr(model_args, key, value)
        return model_args
    head_type = base[len("calm-") :] if base.startswith("calm-") else None
    if head_type not in ("energy", "flow", "diffusion"):
        raise ValueError(
            f"Unknown model {name!r}: llama, calm-recipe or calm-{{energy,flow,diffusion}}, a CALM optionally with "
            f"{FROM_LLAMA!r}."
        )
    model_args.head_type = head_type
    return model_args


def pretrained_llama(args, corpus) -> tuple[LlamaForCausalLM, dict]:
    """A Llama of the benchmark's backbone trained for `--from_llama_steps` steps (with the Llama's learning rate and
    schedule, evaluated at its last step): the decoder a `-from-llama` CALM starts from."""
    if not args.from_llama_steps:
        raise ValueError("A -from-llama model needs --from_llama_steps (the Llama's training steps before CALM's).")
    llama = build_llama(args, corpus)
    print(f"\nllama-pretrained: {args.from_llama_steps} steps")
    run = train(
        llama,
        corpus["train"],
        args,
        args.from_llama_steps,
        args.llama_learning_rate or args.learning_rate,
        args.llama_lr_scheduler_type or args.lr_scheduler_type,
        evaluate=lambda m: evaluate_brier(m, corpus["heldout"], args, False),
        eval_steps={args.from_llama_steps},
    )
    return llama, run


def build_llama(args, corpus) -> LlamaForCausalLM:
    torch.manual_seed(args.seed)
    return LlamaForCausalLM._from_config(backbone_config(args, corpus, args.block_size), attn_implementation="sdpa")


# ------------------------------------------------------------------------------------------------- training


def train(
    model,
    blocks,
    args,
    max_steps: int,
    learning_rate: float,
    lr_scheduler_type: str,
    evaluate=None,
    eval_steps=(),
    batch_size: int | None = None,
) -> dict:
    """AdamW on `blocks`, `batch_size` blocks per step in a fixed order (the same for every model), `labels =
    input_ids`; `evaluate(model)` at `eval_steps`. Returns FLOPs per step, the curve and the training seconds."""
    params = [p for p in model.parameters() if p.requires_grad]
    head = getattr(model, "generative_head", None)
    head_params = {id(p) for p in head.parameters()} if head is not None else set()
    head_lr_scale = args.head_lr_scale
    if head is not None and model.config.head_type == "diffusion":
        head_lr_scale = args.diffusion_head_lr_scale
    groups = [
        {"params": [p for p in params if id(p) not in head_params], "lr": learning_rate},
        {"params": [p for p in params if id(p) in head_params], "lr": learning_rate * head_lr_scale},
    ]
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.1)
    scheduler = get_scheduler(
        lr_scheduler_type,
        optimizer,
        num_warmup_steps=int(args.warmup_ratio * max_steps),
        num_training_steps=max_steps,
    )
    order = torch.cat(
        [
            torch.randperm(len(blocks), generator=torch.Generator().manual_seed(args.seed + e))
            for e in range(args.epochs)
        ]
    )

    size = batch_size or args.batch_size

    def batch(step):
        return blocks[order[(step * size + torch.arange(size)) % len(order)]]

    def loss_of(input_ids):
        return model(input_ids=input_ids, labels=input_ids)

    config = getattr(model, "config", None)
    full_weight = getattr(config, "decoder_loss_weight", 0.0)

    def decoder_weight(step):
        """The decoder loss's weight at `step` (1-based): 0 before --decoder_loss_start, then a linear warm-up."""
        start = int(args.decoder_loss_start * max_steps)
        if step <= start:
            return 0.0
        ramp = args.decoder_loss_warmup * max_steps
        return full_weight * (min(1.0, (step - start) / ramp) if ramp > 0 else 1.0)

    model.train()
    # The arithmetic of one step: forward + backward of a batch, counted (AdamW is element-wise and not counted); with
    # the decoder loss off (steps before its start) it costs less, counted on its own.
    flops_per_step = count_flops(lambda: loss_of(batch(0)).loss.backward())
    flops_without_decoder_loss = flops_per_step
    if full_weight > 0:
        # On a forked random state: a run with the decoder loss then draws the same numbers as the run without it
        # until the loss starts (--decoder_loss_start), so that the two differ by the loss alone.
        config.decoder_loss_weight = 0.0
        with torch.random.fork_rng():
            flops_without_decoder_loss = count_flops(lambda: loss_of(batch(0)).loss.backward())
        config.decoder_loss_weight = full_weight
    model.zero_grad(set_to_none=True)
    curve, seconds, losses, flops = [], 0.0, [], 0
    term_values = {name: [] for name in AUXILIARY_TERMS}
    for step in range(1, max_steps + 1):
        start = time.perf_counter()
        if full_weight > 0:
            config.decoder_loss_weight = decoder_weight(step)
        flops += flops_per_step if getattr(config, "decoder_loss_weight", 0.0) > 0 else flops_without_decoder_loss
        outputs = loss_of(batch(step - 1))
        loss = outputs.loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - start
        losses.append(loss.item())
        for name, values in term_values.items():
            if getattr(outputs, name, None) is not None:
                values.append(getattr(outputs, name).item())
        if evaluate is not None and step in eval_steps:
            point = {"step": step, "train_flops": flops, "train_seconds": seconds}
            point["train_loss"] = sum(losses[-10:]) / len(losses[-10:])
            for name, values in term_values.items():
                if values:
                    point[f"train_{name}"] = sum(values[-10:]) / len(values[-10:])
            point.update(evaluate(model))
            model.train()
            curve.append(point)
            extra = "".join(f"  {n} {point[f'train_{n}']:.3f}" for n in AUXILIARY_TERMS if f"train_{n}" in point)
            print(f"  step {step:5d}  loss {point['train_loss']:.4f}{extra}  " + summarize(point), flush=True)
    if full_weight > 0:
        config.decoder_loss_weight = full_weight
    model.eval()
    return {"flops_per_step": flops_per_step, "curve": curve, "train_seconds": seconds, "final_loss": losses[-1]}


def brierlm_from_briers_quietly(briers) -> float:
    """BrierLM, 0 when a Brier-n is <= 0 (early in training), without the estimator's warning at every point."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return brierlm_from_briers(briers)


def summarize(point: dict) -> str:
    parts = []
    for scoring in ("chunk", "token"):
        if f"{scoring}_brierlm" in point:
            parts.append(
                f"{scoring}: BrierLM {point[f'{scoring}_brierlm']:.2f} Brier-1 {point[f'{scoring}_brier1']:.4f}"
            )
    return "  ".join(parts)


def evaluate_with_guidance(model, heldout, args, is_calm: bool) -> dict:
    """`evaluate_brier`, and for a CALM trained with --guidance_dropout also at every --eval_guidance_scales w
    (keys prefixed `cfg{w}_`); the plain keys are at --guidance_scale."""
    point = evaluate_brier(model, heldout, args, is_calm)
    if not is_calm or not getattr(model.config, "guidance_dropout", 0):
        return point
    scale = model.config.guidance_scale
    for w in args.eval_guidance_scales or ():
        model.config.guidance_scale = w
        point.update({f"cfg{w:g}_{k}": v for k, v in evaluate_brier(model, heldout, args, True).items()})
    model.config.guidance_scale = scale
    return point


@torch.no_grad()
def evaluate_brier(model, heldout, args, is_calm: bool) -> dict:
    """Held-out Brier-1..4 and BrierLM: CALM chunk-aligned; the Llama at every token and chunk-aligned (the same
    draws: the chunk-aligned positions are a subset of the token ones)."""
    model.eval()
    sums = {"chunk": torch.zeros(MAX_N, dtype=torch.float64), "token": torch.zeros(MAX_N, dtype=torch.float64)}
    exact = {"chunk": torch.zeros((), dtype=torch.float64), "token": torch.zeros((), dtype=torch.float64)}
    counts = {"chunk": 0, "token": 0}
    # Brier-1's two parts: how often a sample is the reference's first token, and how often the two samples agree.
    parts = {"chunk": torch.zeros(2, dtype=torch.float64), "token": torch.zeros(2, dtype=torch.float64)}
    for start in range(0, len(heldout), args.eval_batch_size):
        batch = heldout[start : start + args.eval_batch_size]
        indices = range(start, start + len(batch))
        if is_calm:
            scored = {"chunk": model_brier_terms(model, batch, seed=args.seed, block_indices=indices)}
        else:
            result = model_brier_terms(model, batch, seed=args.seed, block_indices=indices, exact_collision=False)
            scored = {"token": result, "chunk": chunk_aligned(result, args.patch_size)}
        for scoring, terms in scored.items():
            sums[scoring] += terms.terms.reshape(-1, MAX_N).double().sum(0).cpu()
            counts[scoring] += terms.terms.shape[0] * terms.terms.shape[1]
            if terms.exact_terms is not None:
                exact[scoring] += terms.exact_terms[..., 0].double().sum().cpu()
            if terms.samples_1 is not None:
                first = (terms.samples_1[..., 0], terms.samples_2[..., 0], terms.references[..., 0])
                hits = ((first[0] == first[2]).double() + (first[1] == first[2]).double()).sum() / 2
                parts[scoring] += torch.stack([hits, (first[0] == first[1]).double().sum()]).cpu()
    point = {}
    for scoring in sums:
        if counts[scoring] == 0:
            continue
        briers = (sums[scoring] / counts[scoring]).tolist()
        point.update({f"{scoring}_brier{n}": b for n, b in enumerate(briers, start=1)})
        point[f"{scoring}_brierlm"] = brierlm_from_briers_quietly(briers)
        if not is_calm:
            point[f"{scoring}_exact_brier1"] = float(exact[scoring]) / counts[scoring]
        if parts[scoring].any():  # Brier-1 = 2 accuracy - collision
            accuracy, collision = (parts[scoring] / counts[scoring]).tolist()
            point[f"{scoring}_accuracy1"], point[f"{scoring}_collision1"] = accuracy, collision
    return point


@torch.no_grad()
def chunk_states(model, blocks, args, is_calm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states where the next chunk's first token is predicted, and that token: CALM's backbone at chunk
    positions 0..L-2, the Llama's at the last token of each of those chunks. `(rows, hidden)`, `(rows,)`."""
    model.eval()
    states, targets = [], []
    K = args.patch_size
    for start in range(0, len(blocks), args.eval_batch_size):
        batch = blocks[start : start + args.eval_batch_size]
        if is_calm:
            hidden = model.model(input_ids=batch, use_cache=False).last_hidden_state[:, :-1]
        else:
            hidden = model.model(input_ids=batch, use_cache=False).last_hidden_state[:, K - 1 : -1 : K]
        states.append(hidden.reshape(-1, hidden.shape[-1]))
        targets.append(batch[:, K::K].reshape(-1))
    return torch.cat(states), torch.cat(targets)


def probe_brier1(model, corpus, args, is_calm: bool) -> dict:
    """What the backbone knows of the next token, whatever the head makes of it: a linear softmax probe fitted on the
    frozen final states of the training blocks to the next chunk's first token (AdamW, `--probe_steps` batches of
    1,024), and its exact held-out Brier-1 (2 p(y) - sum p^2, chunk-aligned). A CALM whose probe is near the Llama's
    has the context in its states and loses it in the head."""
    generator = torch.Generator().manual_seed(args.seed)
    train_x, train_y = chunk_states(model, corpus["train"], args, is_calm)
    test_x, test_y = chunk_states(model, corpus["heldout"], args, is_calm)
    probe = torch.nn.Linear(train_x.shape[1], corpus["vocab_size"])
    optimizer = torch.optim.AdamW(probe.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(args.probe_steps):
        rows = torch.randint(len(train_x), (1024,), generator=generator)
        loss = torch.nn.functional.cross_entropy(probe(train_x[rows]), train_y[rows])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        probs = probe(test_x).softmax(-1)
        brier1 = (2 * probs.gather(1, test_y[:, None]).squeeze(1) - probs.pow(2).sum(-1)).mean().item()
        nll = torch.nn.functional.cross_entropy(probe(test_x), test_y).item()
    print(f"  linear probe of the final states: held-out exact chunk Brier-1 {brier1:.4f}, next-token loss {nll:.3f}")
    return {"probe_chunk_brier1": brier1, "probe_loss": nll}


@torch.no_grad()
def reconstruction_accuracy(autoencoder, heldout) -> float:
    autoencoder.eval()
    correct = 0
    for start in range(0, len(heldout), 64):
        batch = heldout[start : start + 64]
        correct += (autoencoder(input_ids=batch).logits.argmax(-1) == batch).sum().item()
    return correct / heldout.numel()


def unconditional_reference(train: torch.LongTensor, heldout: torch.LongTensor, patch_size: int, seed: int) -> dict:
    """Chunk-aligned Brier-1..4 of a perfect model of chunks that ignores the context: its two samples at every
    held-out position (chunks 1..N-1 of each block) are training chunks drawn uniformly from all of them, i.e. the
    empirical chunk distribution. What a CALM head that has not yet learnt to use the context can reach at best."""
    chunks = train.reshape(-1, patch_size)
    references = heldout.reshape(len(heldout), -1, patch_size)[:, 1:].reshape(-1, patch_size)
    generator = torch.Generator().manual_seed(seed)

    def draw():
        return chunks[torch.randint(len(chunks), (len(references),), generator=generator)]

    briers = brier_terms(draw(), draw(), references, min(MAX_N, patch_size)).mean(0).tolist()
    point = {f"chunk_brier{n}": b for n, b in enumerate(briers, start=1)}
    point["chunk_brierlm"] = brierlm_from_briers_quietly(briers)
    # How many modes the head faces: distinct training chunks, and how many held-out chunks occur in training.
    seen = set(map(tuple, chunks.tolist()))
    point["distinct_training_chunks"], point["training_chunks"] = len(seen), len(chunks)
    point["heldout_chunks_seen_in_training"] = sum(tuple(c) in seen for c in references.tolist()) / len(references)
    return point


def autoencoder_settings(args) -> dict:
    """What the autoencoder's training depends on besides the blocks: the key of a trained one, within a run (two
    CALMs with the same settings share it) and in --ae_cache_dir. (An unset --ae_batch_size is --batch_size, already
    in it.)"""
    settings = {name: getattr(args, name) for name in AE_SETTINGS if getattr(args, name) is not None}
    settings["ae_lr_scheduler_type"] = args.ae_lr_scheduler_type or args.lr_scheduler_type
    return settings


def trained_autoencoder(args, corpus) -> tuple[CalmAutoencoder, dict]:
    """The autoencoder trained on the corpus's blocks, and `{"flops", "seconds", "heldout_token_accuracy"}`. With
    `--ae_cache_dir`, an autoencoder trained before with the same settings on the same blocks is loaded instead (its
    FLOPs and seconds are those of its training: they still count)."""
    ae_settings = autoencoder_settings(args)
    key = hashlib.sha256(
        json.dumps(ae_settings, sort_keys=True).encode() + corpus["train"].numpy().tobytes()
    ).hexdigest()[:16]
    path = os.path.join(args.ae_cache_dir, f"autoencoder-{key}") if args.ae_cache_dir else None
    if path and os.path.exists(os.path.join(path, "run.json")):
        with open(os.path.join(path, "run.json"), encoding="utf-8") as f:
            run = {key: value for key, value in json.load(f).items() if key != "settings"}
        print(
            f"\nautoencoder (l = {args.latent_size}): from {path}; held-out token accuracy "
            f"{run['heldout_token_accuracy']:.4%}"
        )
        return CalmAutoencoder.from_pretrained(path), run
    autoencoder = build_autoencoder(args, corpus)
    print(f"\nautoencoder (l = {args.latent_size}): {args.ae_steps} steps, lr {args.ae_learning_rate}")
    ae_run = train(
        autoencoder,
        corpus["train"],
        args,
        args.ae_steps,
        args.ae_learning_rate,
        ae_settings["ae_lr_scheduler_type"],
        batch_size=args.ae_batch_size,
    )
    accuracy = reconstruction_accuracy(autoencoder, corpus["heldout"])
    print(f"  held-out token accuracy {accuracy:.4%}, {ae_run['train_seconds']:.1f} s")
    run = {
        "flops": ae_run["flops_per_step"] * args.ae_steps,
        "seconds": ae_run["train_seconds"],
        "heldout_token_accuracy": accuracy,
    }
    if path:
        autoencoder.save_pretrained(path)
        with open(os.path.join(path, "run.json"), "w", encoding="utf-8") as f:
            json.dump({**run, "settings": ae_settings}, f, indent=2)
    return autoencoder, run


# ---------------------------------------------------------------------------------------------------- report


def earlier_flops(run: dict) -> float:
    """FLOPs a model's curve starts from: its autoencoder's training and, for a CALM started from a pretrained Llama,
    that Llama's training."""
    return run.get("autoencoder_flops", 0) + run.get("pretrained_decoder_flops", 0)


def steps_to_reach(curve: list[dict], key: str, target: float):
    """The first evaluation point of `curve` whose `key` is >= `target`, or None."""
    for point in curve:
        if point.get(key, -math.inf) >= target:
            return point
    return None


def value_at_flops(curve: list[dict], key: str, flops: float):
    """`key` of a curve at `flops` training FLOPs, linearly interpolated between its evaluation points; None outside
    the curve (before its first point or after its last)."""
    for before, after in zip(curve[:-1], curve[1:], strict=True):
        if before["train_flops"] <= flops <= after["train_flops"]:
            w = (flops - before["train_flops"]) / (after["train_flops"] - before["train_flops"])
            return (1 - w) * before[key] + w * after[key]
    return curve[0][key] if curve and curve[0]["train_flops"] == flops else None


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # BrierLM, and Brier-1 beside it: at small budgets on real text BrierLM is 0 (Brier-4 <= 0) while Brier-1 moves.
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, metric in zip(axes, ("brierlm", "brier1"), strict=True):
        for name, run in results["models"].items():
            offset = earlier_flops(run)
            for scoring, style in (("chunk", "-"), ("token", ":")):
                key = f"{scoring}_{metric}"
                points = [(p["train_flops"] + offset, p[key]) for p in run["curve"] if key in p]
                if points:
                    label = f"{name} ({'chunk-aligned' if scoring == 'chunk' else 'every token'})"
                    ax.plot(*zip(*points, strict=True), style, marker=".", label=label)
        optimal = results["corpus"].get("optimal")
        if optimal:
            ax.axhline(optimal["chunk"][metric], color="gray", ls="--", lw=1, label="optimal (chunk-aligned)")
            ax.axhline(optimal["token"][metric], color="gray", ls=":", lw=1, label="optimal (every token)")
        reference = results["corpus"].get("unconditional_reference")
        if reference:
            ax.axhline(reference[f"chunk_{metric}"], color="black", ls="-.", lw=1, label="unconditional chunk model")
        ax.set(xscale="log", xlabel="training FLOPs (CALM: autoencoder included)")
        ax.set_ylabel("held-out BrierLM" if metric == "brierlm" else "held-out Brier-1")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(
        f"Quality per training FLOP ({results['corpus']['name']}): {results['corpus']['description']}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: dict, args) -> None:
    optimal = results["corpus"].get("optimal")
    print(
        f"\n{'model':<16} {'train GFLOPs':>12} {'seconds':>8} {'chunk BrierLM':>13} {'chunk Brier-1':>13} "
        f"{'token BrierLM':>13} {'token Brier-1':>13}"
    )
    for name, run in results["models"].items():
        last = run["curve"][-1]
        flops = last["train_flops"] + earlier_flops(run)
        cells = [
            f"{last.get(f'{s}_{m}', float('nan')):13.4f}" for s in ("chunk", "token") for m in ("brierlm", "brier1")
        ]
        print(f"{name:<16} {flops / 1e9:12.1f} {last['train_seconds']:8.1f} " + " ".join(cells))
    llama = results["models"].get("llama")
    if llama:
        print(
            "\nat equal training FLOPs (the Llama's curve interpolated at each CALM's final FLOPs, its autoencoder's included):"
        )
        for name, run in results["models"].items():
            if name.startswith("llama"):
                continue
            last = run["curve"][-1]
            flops = last["train_flops"] + earlier_flops(run)
            reference = {key: value_at_flops(llama["curve"], key, flops) for key in ("chunk_brier1", "chunk_brierlm")}
            run["llama_at_equal_flops"] = reference
            if reference["chunk_brier1"] is None:
                print(f"  {name:<16} {flops / 1e12:.2f} TFLOPs: outside the Llama's curve")
                continue
            print(
                f"  {name:<16} {flops / 1e12:.2f} TFLOPs: chunk Brier-1 {last['chunk_brier1']:.4f} against the "
                f"Llama's {reference['chunk_brier1']:.4f} ({last['chunk_brier1'] / reference['chunk_brier1']:.2f}x), "
                f"BrierLM {last['chunk_brierlm']:.2f} against {reference['chunk_brierlm']:.2f}"
            )
    if optimal:
        target = args.target_fraction * optimal["chunk"]["brierlm"]
        print(
            f"\noptimal BrierLM: chunk-aligned {optimal['chunk']['brierlm']:.2f}, every token "
            f"{optimal['token']['brierlm']:.2f}; target {args.target_fraction:.0%} of chunk-aligned = {target:.2f}"
        )
        llama_point = steps_to_reach(llama["curve"], "chunk_brierlm", target) if llama else None
        for name, run in results["models"].items():
            point = steps_to_reach(run["curve"], "chunk_brierlm", target)
            if point is None:
                print(f"  {name:<16} does not reach it (best {max(p['chunk_brierlm'] for p in run['curve']):.2f})")
                continue
            flops = point["train_flops"] + earlier_flops(run)
            ratio = f", {flops / (llama_point['train_flops']):.2f}x the Llama's" if llama_point else ""
            print(f"  {name:<16} reaches it at step {point['step']}: {flops / 1e9:.1f} GFLOPs{ratio}")
            run["flops_to_target"] = flops


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", choices=["synthetic", "wikitext"], default="synthetic")
    parser.add_argument("--models", nargs="+", default=["llama", "calm-energy", "calm-flow", "calm-diffusion"])
    parser.add_argument("--output_dir", default="outputs/bench_quality")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny models, a few steps (used by the tests)")
    parser.add_argument("--threads", type=int, default=None)
    data = parser.add_argument_group("data")
    data.add_argument("--patch_size", type=int, default=4, help="K")
    data.add_argument("--block_size", type=int, default=256)
    data.add_argument("--batch_size", type=int, default=16)
    data.add_argument(
        "--calm_batch_size", type=int, default=None, help="blocks per CALM step (default: --batch_size, the Llama's)"
    )
    data.add_argument(
        "--epochs",
        type=int,
        default=1,
        help="synthetic: how often each generated block is seen (1: every batch is fresh data); the order is a "
        "fixed permutation of the blocks, repeated as often as the steps need",
    )
    data.add_argument("--vocab_size", type=int, default=None, help="synthetic: 512 ids; wikitext: a 4096-token BPE")
    data.add_argument("--num_chunks", type=int, default=256)
    data.add_argument("--successors", type=int, default=3)
    data.add_argument("--concentration", type=float, default=0.5)
    data.add_argument("--num_heldout_documents", type=int, default=6)
    data.add_argument("--eval_blocks", type=int, default=None)
    data.add_argument("--eval_batch_size", type=int, default=8)
    backbone = parser.add_argument_group("backbone (identical for CALM and the Llama)")
    backbone.add_argument("--hidden_size", type=int, default=None)
    backbone.add_argument("--intermediate_size", type=int, default=None)
    backbone.add_argument("--num_layers", type=int, default=None)
    backbone.add_argument("--num_heads", type=int, default=None)
    ae = parser.add_argument_group("autoencoder")
    ae.add_argument("--latent_size", type=int, default=None, help="official: 128")
    ae.add_argument(
        "--ae_cache_dir",
        default=None,
        help="keep trained autoencoders here and reuse one trained with the same settings on the same blocks",
    )
    ae.add_argument("--ae_hidden_size", type=int, default=128)
    ae.add_argument("--ae_intermediate_size", type=int, default=256)
    ae.add_argument("--ae_steps", type=int, default=None)
    ae.add_argument(
        "--ae_batch_size", type=int, default=None, help="blocks per autoencoder step; default: --batch_size"
    )
    ae.add_argument("--ae_learning_rate", type=float, default=None)
    ae.add_argument("--kl_weight", type=float, default=1e-3)
    ae.add_argument("--kl_clamp", type=float, default=0.5)
    ae.add_argument("--token_dropout", type=float, default=None)
    ae.add_argument("--latent_dropout", type=float, default=None)
    head = parser.add_argument_group("generative head")
    head.add_argument("--num_mlp_layers", type=int, default=2)
    head.add_argument(
        "--num_samples", type=int, default=8, help="N of the energy score; flow / diffusion: targets per position"
    )
    head.add_argument("--noise_size", type=int, default=64, help="energy head input noise")
    head.add_argument("--energy_alpha", type=float, default=1.0, help="distance exponent of the energy score")
    head.add_argument("--target_noise_scale", type=float, default=1.0, help="CalmConfig flag; 1.0 is official")
    head.add_argument(
        "--random_output_layer",
        action="store_true",
        help="the energy head's last layer starts random (std 0.02) instead of zero",
    )
    remedies = parser.add_argument_group("small-scale remedies (CalmConfig fields, off by default)")
    remedies.add_argument(
        "--decoder_loss_weight", type=float, default=0.0, help="token loss through the frozen decoder (SONAR-LLM)"
    )
    remedies.add_argument("--decoder_loss_type", choices=["mixture", "per_sample", "point"], default="mixture")
    remedies.add_argument("--decoder_loss_samples", type=int, default=None, help="default: all num_samples")
    remedies.add_argument(
        "--decoder_loss_start", type=float, default=0.0, help="fraction of the steps before the decoder loss starts"
    )
    remedies.add_argument(
        "--decoder_loss_warmup", type=float, default=0.0, help="fraction of the steps its weight ramps up over"
    )
    remedies.add_argument(
        "--token_loss_weight", type=float, default=0.0, help="multi-token softmax loss on the backbone's states"
    )
    remedies.add_argument(
        "--guidance_dropout", type=float, default=0.0, help="flow/diffusion: condition dropout in training (CFG)"
    )
    remedies.add_argument(
        "--guidance_scale", type=float, default=1.0, help="flow/diffusion: classifier-free guidance when sampling"
    )
    remedies.add_argument(
        "--eval_guidance_scales", type=float, nargs="*", default=None, help="also evaluate at these guidance weights"
    )
    remedies.add_argument(
        "--last_token_compression",
        action="store_true",
        help="the input compression starts as the chunk's last token embedding (from_pretrained_decoder's "
        "init_input_compression); otherwise random",
    )
    remedies.add_argument(
        "--input_noise_std", type=float, default=0.0, help="Gaussian noise on the backbone's inputs (Kyutai)"
    )
    opt = parser.add_argument_group("optimisation (the same for every model)")
    opt.add_argument("--max_steps", type=int, default=None)
    opt.add_argument("--learning_rate", type=float, default=None, help="CALM's")
    opt.add_argument(
        "--head_lr_scale", type=float, default=None, help="CALM's head learns at learning_rate x this (official: 1)"
    )
    opt.add_argument(
        "--diffusion_head_lr_scale",
        type=float,
        default=1.0,
        help="the same for the diffusion head, which collapses at 10x (BrierLM 0 after 600 steps on the synthetic "
        "language, 27 after 100 at 1x)",
    )
    opt.add_argument("--llama_learning_rate", type=float, default=None, help="default: --learning_rate")
    opt.add_argument("--lr_scheduler_type", default=None, help="every model's, unless one of the next two is given")
    opt.add_argument("--llama_lr_scheduler_type", default=None, help="default: --lr_scheduler_type")
    opt.add_argument("--ae_lr_scheduler_type", default=None, help="the autoencoder's; default: --lr_scheduler_type")
    opt.add_argument("--warmup_ratio", type=float, default=0.05)
    opt.add_argument("--eval_every", type=int, default=None)
    parser.add_argument(
        "--probe_steps", type=int, default=0, help="fit a linear probe of the final states for this many steps"
    )
    parser.add_argument(
        "--from_llama_steps", type=int, default=0, help="-from-llama models: the Llama's steps before CALM's"
    )
    parser.add_argument("--target_fraction", type=float, default=0.9, help="of the optimal BrierLM (synthetic)")
    args = parser.parse_args(argv)
    for name, value in CORPUS_DEFAULTS[args.corpus].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.quick:
        args.hidden_size, args.intermediate_size, args.num_heads = 32, 64, 2
        args.ae_hidden_size, args.ae_intermediate_size, args.latent_size = 32, 64, 16
        args.block_size, args.batch_size, args.eval_blocks = 32, 4, 4
        args.num_chunks, args.vocab_size = 16, (32 if args.corpus == "synthetic" else 300)
        args.ae_steps, args.max_steps, args.eval_every = 4, 4, 2
        args.num_mlp_layers = 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.output_dir, exist_ok=True)
    corpus = synthetic_corpus(args) if args.corpus == "synthetic" else wikitext_corpus(args)
    print(
        f"corpus {corpus['name']}: {corpus['description']}; {len(corpus['train'])} training blocks, "
        f"{len(corpus['heldout'])} held out, of {args.block_size} tokens; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    if corpus["optimal"]:
        opt = corpus["optimal"]
        print(
            f"optimal BrierLM: chunk-aligned {opt['chunk']['brierlm']:.2f}, every token {opt['token']['brierlm']:.2f}"
        )
    reference = unconditional_reference(corpus["train"], corpus["heldout"], args.patch_size, args.seed)
    print(
        f"unconditional chunk model (training chunks drawn at random): chunk-aligned BrierLM "
        f"{reference['chunk_brierlm']:.2f}, Brier-1 {reference['chunk_brier1']:.4f}; "
        f"{reference['distinct_training_chunks']:,} distinct chunks among the {reference['training_chunks']:,} of the "
        f"training blocks, {reference['heldout_chunks_seen_in_training']:.1%} of the held-out chunks seen in training"
    )
    eval_steps = set(range(args.eval_every, args.max_steps + 1, args.eval_every)) | {args.max_steps}
    results = {"settings": vars(args), "corpus": {k: v for k, v in corpus.items() if k not in ("train", "heldout")}}
    results["corpus"]["unconditional_reference"] = reference
    results["models"] = {}

    autoencoders = {}  # trained once per set of autoencoder settings
    for name in args.models:
        model_args = args_of_model(name, args)
        if name == "llama":
            model, lr, is_calm = build_llama(args, corpus), args.llama_learning_rate or args.learning_rate, False
            schedule = args.llama_lr_scheduler_type or args.lr_scheduler_type
            earlier = {}
        else:
            ae_key = json.dumps(autoencoder_settings(model_args), sort_keys=True)
            if ae_key not in autoencoders:
                autoencoders[ae_key] = trained_autoencoder(model_args, corpus)
            autoencoder, ae_run = autoencoders[ae_key]
            results.setdefault("autoencoder", ae_run)  # the first CALM's (the others' are in their runs)
            earlier = {"autoencoder_flops": ae_run["flops"], "autoencoder": ae_run}
            head_type = model_args.head_type
            if name.endswith(FROM_LLAMA):
                llama, llama_run = pretrained_llama(model_args, corpus)
                results["models"].setdefault("llama-pretrained", llama_run)
                earlier["pretrained_decoder_flops"] = llama_run["curve"][-1]["train_flops"]
                model = build_calm(model_args, corpus, autoencoder, head_type, pretrained_decoder=llama)
            else:
                model = build_calm(model_args, corpus, autoencoder, head_type)
            lr, is_calm, schedule = model_args.learning_rate, True, model_args.lr_scheduler_type
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"\n{name}: {trainable / 1e6:.2f}M trainable parameters, lr {lr}")
        run = train(
            model,
            corpus["train"],
            model_args,
            model_args.max_steps,
            lr,
            schedule,
            evaluate=lambda m, c=is_calm, a=model_args: evaluate_with_guidance(m, corpus["heldout"], a, c),
            eval_steps=eval_steps,
            batch_size=model_args.calm_batch_size if is_calm else None,
        )
        run.update(earlier)
        if args.probe_steps:
            run["probe"] = probe_brier1(model, corpus, args, is_calm)
        run["trainable_parameters"] = trainable
        if is_calm:
            run["settings"] = {key: value for key, value in vars(model_args).items() if key not in ("models",)}
        results["models"][name] = run

    report(results, args)
    path = os.path.join(args.output_dir, f"quality_{corpus['name']}")
    with open(path + ".json", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    plot(results, path + ".png")
    print(f"\n-> {path}.json, {path}.png")
    return results


if __name__ == "__main__":
    main()
