#!/usr/bin/env python
"""BrierLM of a CALM model or of any transformers causal LM, with the paper's protocol. From the repository root:

    python examples/evaluate_brierlm.py --model DIR --data data/wikitext_document_level-test.json

The protocol (official CALM evaluation; the numbers depend on every item, so report them with the score):
- Data: the WikiText-103 document-level test set shipped in `data/` (62 documents, JSON lines with a `text` field).
- Tokenisation: every document with the model's tokenizer and its defaults (the Llama-3 tokenizer of the paper adds
  BOS to each document), then all documents concatenated, with no EOS and no padding (the `run_clm` recipe).
- Blocks: the stream is cut into blocks of `--block_size` tokens and the remainder is dropped. Every block is scored
  on its own from its first token (no sliding window): the first positions of a block have little context, so the
  block size changes the score (about 30% between 1024 and 8192 tokens, shaochenze/calm issue #20). Reference block
  sizes: 8192 tokens for CALM (35 blocks with the Llama-3 tokenizer), 2048 for the autoregressive baseline (141
  blocks); that is the default here, capped at the model's maximum length.
- Positions: CALM (`--positions chunk`, the official evaluation) scores the n-grams that start at chunk boundaries,
  chunks 1..N-1 of every block (2047 positions per 8192-token block, K = 4); `--positions token` scores every token
  position, but CALM then predicts an n-gram that starts inside a chunk from the whole chunks before it only.
  Other LMs are scored at every token position i = 0..T-5 of a block (context x_0..x_i), or, with `--positions chunk
  --patch_size K`, only where an n-gram starts a chunk of K tokens: CALM's positions and contexts, like for like.
- Samples: two per position; BrierLM = 100 x geometric mean of Brier-1..4. For LMs with logits the exact Brier-n
  (Monte Carlo collision term for n > 1 with a real vocabulary) is printed beside it as a cross-check.

The result is printed as JSON (and written to `--output`). With `--check_evaluate`, the same numbers are recomputed
from the drawn samples through `evaluate.load("brierlm")` (this repository's `brierlm/brierlm.py`, a thin module over
the package's metric folder `transformers_calm/brierlm/`, found relative to the working directory: run from the
repository root; elsewhere the script loads that folder, `BRIERLM_PATH`) to show that the metric gives the same values.
"""

import argparse
import json
import os
import sys
import time

import torch
from scripts import check_path, load_tokenizer  # examples/scripts.py: the script's directory is on sys.path
from transformers import AutoModelForCausalLM

import transformers_calm  # noqa: F401  (registers the CALM model types with the Auto classes)
from transformers_calm.brierlm import BRIERLM_PATH, DEFAULT_CONTEXT_LENGTH, is_calm_model, score_model

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED_DATA = os.path.join(REPO_ROOT, "data", "wikitext_document_level-test.json")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Model directory or Hub id (CALM or any causal LM).")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer directory or Hub id (default: --model).")
    parser.add_argument("--data", default=BUNDLED_DATA, help="JSON lines with a `text` field, or a plain-text file.")
    parser.add_argument(
        "--block_size",
        type=int,
        default=None,
        help=f"Tokens per block (default: {DEFAULT_CONTEXT_LENGTH['calm']} for CALM, "
        f"{DEFAULT_CONTEXT_LENGTH['causal_lm']} for other LMs, capped at the model's maximum length).",
    )
    parser.add_argument(
        "--positions",
        choices=["chunk", "token"],
        default=None,
        help="Default: chunk for CALM, token for other LMs; `chunk` for another LM needs --patch_size.",
    )
    parser.add_argument(
        "--patch_size",
        type=int,
        default=None,
        help="With --positions chunk for a token-level LM: K of the CALM to compare with (n-grams at chunk starts).",
    )
    parser.add_argument("--batch_size", type=int, default=1, help="Blocks per forward pass.")
    parser.add_argument("--rollout_batch_size", type=int, default=64, help="Roll-out rows per forward pass.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_n", type=int, default=4)
    parser.add_argument("--max_blocks", type=int, default=None, help="Score only the first blocks (quick runs).")
    parser.add_argument("--no_exact", action="store_true", help="Skip the logit-based cross-check (LMs with logits).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--attn_implementation", default=None, help="e.g. eager or sdpa.")
    parser.add_argument("--check_evaluate", action="store_true", help='Recompute with evaluate.load("brierlm").')
    parser.add_argument("--output", default=None, help="Write the result as JSON here.")
    return parser.parse_args(argv)


def read_documents(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        if path.endswith((".json", ".jsonl")):
            return [json.loads(line)["text"] for line in f if line.strip()]
        return [f.read()]


def main(argv=None) -> dict:
    args = parse_args(argv)
    kwargs = {"dtype": getattr(torch, args.dtype)}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    check_path(args.model, "--model")
    model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs).to(args.device).eval()
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    documents = read_documents(args.data)
    kind = f"CALM, K = {model.config.patch_size}" if is_calm_model(model) else "causal LM"
    print(f"model {type(model).__name__} ({kind}), {len(documents)} documents from {args.data}", file=sys.stderr)

    start = time.perf_counter()
    result = score_model(
        model,
        texts=documents,
        tokenizer=tokenizer,
        context_length=args.block_size,
        batch_size=args.batch_size,
        seed=args.seed,
        max_n=args.max_n,
        positions=args.positions,
        patch_size=args.patch_size,
        exact=not args.no_exact,
        max_blocks=args.max_blocks,
        rollout_batch_size=args.rollout_batch_size,
        return_samples=args.check_evaluate,
    )
    result["seconds"] = round(time.perf_counter() - start, 2)
    if args.check_evaluate:
        import evaluate

        if os.path.isfile(os.path.join("brierlm", "brierlm.py")):
            metric = evaluate.load("brierlm")  # ./brierlm/brierlm.py, relative to the working directory
        else:  # not at the repository root: the metric folder shipped inside the package
            print("No ./brierlm/brierlm.py here: using evaluate.load(transformers_calm.BRIERLM_PATH)", file=sys.stderr)
            metric = evaluate.load(BRIERLM_PATH)
        samples = {name: result.pop(name).tolist() for name in ("samples_1", "samples_2", "references")}
        via_evaluate = metric.compute(**samples, max_n=args.max_n)
        result["evaluate_brierlm"] = via_evaluate["brierlm"]
        result["evaluate_matches"] = all(
            abs(via_evaluate[f"brier{n}"] - result[f"brier{n}"]) < 1e-9 for n in range(1, args.max_n + 1)
        )
    result.update(model=args.model, data=os.path.basename(args.data), seed=args.seed)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
