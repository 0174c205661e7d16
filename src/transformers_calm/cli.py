"""The `calm` command line, in the style of `transformers`' and `accelerate`'s: `calm train`, `calm generate`,
`calm evaluate`, `calm convert` (`calm <command> --help` for each).

`calm train FILES --output_dir DIR` goes from text files to a CALM in one command: a tokenizer (trained on the files,
or `--tokenizer`), the autoencoder, then the language model around it, with transformers' `Trainer` (progress bars,
checkpoints: run the same command again to resume). DIR then holds the language model with its tokenizer and card,
which `from_pretrained`, `pipeline("text-generation")` and `calm generate` load; DIR/autoencoder the autoencoder.
`--preset` sets the sizes and steps (`tiny`: a first model in about two minutes on a laptop CPU; `cpu`: the demo's;
`gpu-m`: the paper's CALM-M sizes and steps), each with the small-scale recipe (docs/small-scale.md: the flow head,
l = 32, the head at 5x the learning rate, a constant schedule) unless `--recipe paper`.
"""

import argparse
import json
import os
import sys
from dataclasses import dataclass, field

import torch

# The sizes and steps of each preset; the small-scale recipe's head and schedule (RECIPES) go with every one.
PRESETS = {
    "tiny": {
        "vocab_size": 2048, "block_size": 128, "batch_size": 16, "patch_size": 4, "latent_size": 32,
        "ae_hidden_size": 128, "ae_intermediate_size": 256, "ae_steps": 500, "ae_learning_rate": 6e-3,
        "token_dropout": 0.05, "latent_dropout": 0.05, "hidden_size": 192, "intermediate_size": 512,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_mlp_layers": 2, "lm_steps": 200,
        "lm_learning_rate": 2e-3,
    },
    "cpu": {  # examples/demo.py's
        "vocab_size": 4096, "block_size": 256, "batch_size": 16, "patch_size": 4, "latent_size": 32,
        "ae_hidden_size": 128, "ae_intermediate_size": 256, "ae_steps": 400, "ae_learning_rate": 6e-3,
        "token_dropout": 0.05, "latent_dropout": 0.05, "hidden_size": 256, "intermediate_size": 704,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_mlp_layers": 2, "lm_steps": 250,
        "lm_learning_rate": 2e-3,
    },
    "gpu-m": {  # the paper's autoencoder and CALM-M backbone, the official scripts' steps and learning rate
        "vocab_size": 32768, "block_size": 2048, "batch_size": 32, "patch_size": 4, "latent_size": 128,
        "ae_hidden_size": 512, "ae_intermediate_size": 1280, "ae_steps": 30000, "ae_learning_rate": 3e-4,
        "token_dropout": 0.15, "latent_dropout": 0.15, "hidden_size": 768, "intermediate_size": 2048,
        "num_hidden_layers": 12, "num_attention_heads": 12, "num_mlp_layers": 4, "lm_steps": 250000,
        "lm_learning_rate": 3e-4,
    },
}  # fmt: skip
RECIPES = {
    "small-scale": {"head_type": "flow", "head_learning_rate_scale": 5.0, "lr_scheduler_type": "constant_with_warmup"},
    "paper": {"head_type": "energy", "head_learning_rate_scale": 1.0, "lr_scheduler_type": "constant_with_warmup"},
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="calm", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    _train_parser(commands.add_parser("train", help="text files -> tokenizer -> autoencoder -> CALM"))
    generate = commands.add_parser("generate", help="continue a prompt with a trained CALM")
    generate.add_argument("model", help="a CALM folder (calm train's --output_dir) or Hub id")
    generate.add_argument("prompt", nargs="+", help="one or more prompts")
    generate.add_argument("--max_new_tokens", type=int, default=32)
    generate.add_argument("--temperature", type=float, default=1.0, help="in (0, 1], likelihood-free")
    generate.add_argument("--num_candidates", type=int, default=None, help="N of the temperature approximation")
    generate.add_argument("--seed", type=int, default=0)
    evaluate = commands.add_parser("evaluate", help="BrierLM of a model (CALM or any causal LM) on text files")
    evaluate.add_argument("model")
    evaluate.add_argument("files", nargs="+", help="JSON lines with a `text` field, or plain text")
    evaluate.add_argument("--context_length", type=int, default=None, help="tokens per block")
    evaluate.add_argument("--max_blocks", type=int, default=None)
    evaluate.add_argument("--seed", type=int, default=0)
    commands.add_parser("convert", help="official checkpoints to this layout (calm convert --help)", add_help=False)
    serve = commands.add_parser("serve", help="an OpenAI-compatible server (transformers serve's) for a CALM")
    serve.add_argument("model", help="a CALM folder or Hub id; requests name it as given (`model=`)")
    serve.add_argument("--host", default="localhost")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--device", default="auto", help="auto: the GPU when there is one")
    serve.add_argument("--chat_template", help="a Jinja chat template (string or .jinja file) for chat requests")
    serve.add_argument("--continuous_batching", action="store_true", help="accepted; CALM falls back to generate")
    serve.add_argument("--compile", action="store_true", help="static cache (and compiled steps where supported)")
    serve.add_argument(
        "--pad_prompts_at_end",
        action="store_true",
        help="pad prompts to whole chunks at their end, as transformers_calm.sft trains (for models fine-tuned with it)",
    )
    serve.add_argument("--log_level", default="warning", choices=["debug", "info", "warning", "error", "critical"])
    args, rest = parser.parse_known_args(argv)
    if args.command == "convert":
        from .convert_official import main as convert

        return convert(rest) or 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    {"train": train, "generate": generate_text, "evaluate": evaluate_model, "serve": serve_model}[args.command](args)
    return 0


def train_command(argv: list[str]) -> "TrainRun | None":
    """`calm train ARGV` from Python (examples/demo.py uses it): the same arguments, the same run; returns what it
    trained (`TrainRun`), or None when `--output_dir` already holds this run's trained CALM."""
    parser = argparse.ArgumentParser(prog="calm train")
    _train_parser(parser)
    return train(parser.parse_args(argv))


@dataclass
class TrainRun:
    """What a `calm train` run trained, for callers in Python.

    Args:
        model (`CalmForCausalLM`): the language model (saved in `--output_dir`).
        autoencoder (`CalmAutoencoder`): its autoencoder (saved in `--output_dir/autoencoder`).
        tokenizer (`PreTrainedTokenizerFast`): the tokenizer (saved with the model).
        settings (`dict`): the preset, the recipe and the overrides the run used (also in `calm_train.json`).
        blocks (`list[datasets.Dataset]`): the training and held-out blocks (`input_ids`, `labels`) both stages read.
        metrics (`dict`): the language model's held-out evaluation (`eval_brierlm`, `eval_brier1`, ...).
        autoencoder_metrics (`dict`): the autoencoder's held-out evaluation; empty when it was trained before.
        log_history (`list[dict]`): the language model's `Trainer` logs.
        autoencoder_log_history (`list[dict]`): the autoencoder's; empty when it was trained before.
    """

    model: object
    autoencoder: object
    tokenizer: object
    settings: dict
    blocks: list
    metrics: dict
    autoencoder_metrics: dict = field(default_factory=dict)
    log_history: list = field(default_factory=list)
    autoencoder_log_history: list = field(default_factory=list)


def _train_parser(parser) -> None:
    parser.add_argument("files", nargs="+", help="training text: JSON lines with a `text` field, or plain text "
                        "(blank lines separate documents); files or glob patterns, compressed or not")  # fmt: skip
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="small-scale")
    parser.add_argument("--tokenizer", help="an existing tokenizer (default: train one on the files)")
    parser.add_argument("--validation_file", help="held-out text (default: the last 5%% of the training blocks)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--restart", action="store_true", help="start over instead of resuming from DIR")
    add_size_arguments(parser)


def add_size_arguments(parser) -> None:
    """`--preset`'s fields as options (`--hidden_size`, `--lm_steps`, ...), each defaulting to the preset's value."""
    sizes = parser.add_argument_group("sizes and steps (default: the preset's)")
    for name, value in PRESETS["tiny"].items():  # every preset field can be overridden
        presets = ", ".join(f"{preset} {PRESETS[preset][name]}" for preset in PRESETS)
        sizes.add_argument(f"--{name}", type=type(value), default=None, help=presets)


def train(args) -> TrainRun | None:
    """`calm train`: the three stages, each skipped when its result is in `--output_dir` (resumed from its last
    checkpoint when it stopped on the way). None when the whole run was done before."""
    from .data import build_blocks, load_documents, prepare_tokenizer
    from .tokenization import train_tokenizer

    settings = {**PRESETS[args.preset], **RECIPES[args.recipe]}
    settings.update({k: getattr(args, k) for k in PRESETS["tiny"] if getattr(args, k) is not None})
    settings["tokenizer"] = args.tokenizer
    out = args.output_dir
    if args.restart:
        _remove_run(out)
    if _same_run(out, settings) and os.path.isfile(os.path.join(out, "model.safetensors")):
        _print(f'{out} holds a trained CALM already (--restart to train a new one): `calm generate {out} "Hello"`')
        return None
    documents = load_documents(args.files)
    tokenizer_dir = os.path.join(out, "tokenizer")
    if args.tokenizer:
        tokenizer = prepare_tokenizer(args.tokenizer)
    elif os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        tokenizer = prepare_tokenizer(tokenizer_dir)
    else:
        tokenizer = train_tokenizer(documents["text"], settings["vocab_size"])
        tokenizer.save_pretrained(tokenizer_dir)
    K, block_size = settings["patch_size"], settings["block_size"]
    blocks = build_blocks(documents, tokenizer, K, block_size)
    if args.validation_file:
        blocks = [blocks, build_blocks(load_documents(args.validation_file), tokenizer, K, block_size)]
    elif len(blocks) >= 2:  # the last 5% of the blocks (at least one) are held out
        heldout = max(1, len(blocks) // 20)
        blocks = [blocks.select(range(len(blocks) - heldout)), blocks.select(range(len(blocks) - heldout, len(blocks)))]
    else:
        blocks = [blocks, blocks.select([])]
    for name, split in zip(("training", "held-out"), blocks, strict=True):
        if len(split) == 0:
            raise ValueError(
                f"The {name} text holds no block of {block_size} tokens: more text (at least two blocks without "
                "--validation_file), or a smaller --block_size."
            )
    _print(
        f"{len(blocks[0])} training blocks, {len(blocks[1])} held out, of {block_size} tokens; vocabulary {len(tokenizer)}"
    )

    autoencoder, autoencoder_metrics, autoencoder_log = _train_autoencoder(args, settings, tokenizer, blocks)
    model, metrics, log = _train_language_model(args, settings, tokenizer, blocks, autoencoder)
    _print(f"held-out BrierLM {metrics['eval_brierlm']:.2f} (Brier-1 {metrics['eval_brier1']:.4f})")
    _print(f'saved to {out}: `calm generate {out} "Your prompt"`, or AutoModelForCausalLM.from_pretrained({out!r})')
    return TrainRun(model, autoencoder, tokenizer, settings, blocks, metrics, autoencoder_metrics, log, autoencoder_log)


RUN_FILE = "calm_train.json"  # the settings of the run that made a folder: a later run must have the same
# What calm train writes into --output_dir (besides the saved model's files, which the save lists in RUN_FILE).
RUN_FOLDERS = ("checkpoints", "autoencoder", "tokenizer")


def _same_run(out: str, settings: dict) -> bool:
    """Records `settings` in a new run's folder; in the folder of an earlier run, an error unless they are the same (a
    resumed run with other sizes would mix two models). True when the folder holds an earlier run."""
    path = os.path.join(out, RUN_FILE)
    if not os.path.isfile(path):
        os.makedirs(out, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"settings": settings}, f, indent=2)
        return False
    with open(path, encoding="utf-8") as f:
        earlier = json.load(f)["settings"]
    changed = sorted(name for name in {*earlier, *settings} if earlier.get(name) != settings.get(name))
    if changed:
        differences = ", ".join(f"{name} {earlier.get(name)!r} -> {settings.get(name)!r}" for name in changed)
        raise ValueError(
            f"{out} holds a run with other settings ({differences}): rerun with the same options to resume it, pass "
            "--restart to train anew there, or another --output_dir."
        )
    return True


def _remove_run(out: str) -> None:
    """What an earlier calm train wrote into `out` (only a folder it made: one with its RUN_FILE); other files stay."""
    path = os.path.join(out, RUN_FILE)
    if not os.path.isdir(out):
        return
    if not os.path.isfile(path):
        raise ValueError(f"--restart: {out} was not made by calm train (no {RUN_FILE}); nothing is removed there.")
    import shutil

    with open(path, encoding="utf-8") as f:
        saved = json.load(f).get("saved", [])
    for name in RUN_FOLDERS:
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    for name in [*saved, RUN_FILE]:
        if os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


def training_arguments(settings, output_dir, max_steps, learning_rate, seed=0, **overrides):
    """The `TrainingArguments` of calm train's stages for `settings` (a preset's fields): the official optimiser
    (AdamW (0.9, 0.95), weight decay 0.1, clipping 1.0), a short warm-up, a checkpoint every quarter of the run, bf16
    on a GPU as the official runs; `overrides` replace any of them (examples/demo.py trains its Llama with them)."""
    from .trainer_calm import OfficialTrainingArguments

    values = {
        "output_dir": output_dir,
        "per_device_train_batch_size": settings["batch_size"],
        "per_device_eval_batch_size": settings["batch_size"],
        "max_steps": max_steps,
        "learning_rate": learning_rate,
        "warmup_steps": max(max_steps // 13, 1),
        "logging_steps": max(max_steps // 10, 1),
        "save_strategy": "steps",
        "save_steps": max(max_steps // 4, 1),
        "save_total_limit": 1,
        "report_to": "none",
        "use_cpu": not torch.cuda.is_available(),
        "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        "seed": seed,
        "dataloader_num_workers": 0,
    }
    return OfficialTrainingArguments(**{**values, **overrides})


def _resume_from(output_dir):
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None


def _train_autoencoder(args, settings, tokenizer, blocks):
    from transformers import default_data_collator, set_seed

    from .configuration_calm_autoencoder import CalmAutoencoderConfig
    from .modeling_calm_autoencoder import CalmAutoencoder
    from .trainer_calm_autoencoder import CalmAutoencoderTrainer

    final = os.path.join(args.output_dir, "autoencoder")
    if os.path.isfile(os.path.join(final, "model.safetensors")):
        _print(f"autoencoder: {final} (already trained)")
        return CalmAutoencoder.from_pretrained(final), {}, []
    set_seed(args.seed)
    config = CalmAutoencoderConfig(
        vocab_size=len(tokenizer),
        patch_size=settings["patch_size"],
        latent_size=settings["latent_size"],
        hidden_size=settings["ae_hidden_size"],
        intermediate_size=settings["ae_intermediate_size"],
        token_dropout=settings["token_dropout"],
        latent_dropout=settings["latent_dropout"],
        cast_embeddings_to_bf16_in_training=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    checkpoints = os.path.join(args.output_dir, "checkpoints", "autoencoder")
    training_args = training_arguments(
        settings, checkpoints, settings["ae_steps"], settings["ae_learning_rate"], args.seed, lr_scheduler_type="cosine"
    )
    trainer = CalmAutoencoderTrainer(
        model=CalmAutoencoder(config),
        args=training_args,
        train_dataset=blocks[0],
        eval_dataset=blocks[1],
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    _print(f"autoencoder: {trainer.model.num_parameters() / 1e6:.2f}M parameters, {settings['ae_steps']} steps")
    trainer.train(resume_from_checkpoint=_resume_from(checkpoints))
    metrics = trainer.evaluate()
    _print(f"autoencoder: held-out reconstruction accuracy {metrics['eval_reconstruction_accuracy']:.2%}")
    trainer.save_model(final)
    return trainer.model, metrics, trainer.state.log_history


def _train_language_model(args, settings, tokenizer, blocks, autoencoder):
    from transformers import LlamaConfig, default_data_collator, set_seed

    from .modeling_calm import CalmForCausalLM
    from .trainer_calm import CalmTrainer

    set_seed(args.seed)
    backbone = LlamaConfig(
        hidden_size=settings["hidden_size"],
        intermediate_size=settings["intermediate_size"],
        num_hidden_layers=settings["num_hidden_layers"],
        num_attention_heads=settings["num_attention_heads"],
        max_position_embeddings=settings["block_size"] // settings["patch_size"],  # positions count chunks
        rms_norm_eps=1e-6,
    )
    model = CalmForCausalLM.from_autoencoder(
        autoencoder,
        backbone_config=backbone,
        head_type=settings["head_type"],
        num_mlp_layers=settings["num_mlp_layers"],
    )
    checkpoints = os.path.join(args.output_dir, "checkpoints", "calm")
    training_args = training_arguments(
        settings,
        checkpoints,
        settings["lm_steps"],
        settings["lm_learning_rate"],
        args.seed,
        lr_scheduler_type=settings["lr_scheduler_type"],
        head_learning_rate=settings["lm_learning_rate"] * settings["head_learning_rate_scale"],
    )
    trainer = CalmTrainer(
        model=model,
        args=training_args,
        train_dataset=blocks[0],
        eval_dataset=blocks[1],
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _print(
        f"CALM: {trainable / 1e6:.2f}M trainable parameters, {settings['head_type']} head, {settings['lm_steps']} steps"
    )
    trainer.train(resume_from_checkpoint=_resume_from(checkpoints))
    metrics = trainer.evaluate()
    before = set(os.listdir(args.output_dir))
    trainer.save_model(args.output_dir)  # the model, its tokenizer (processing_class) and card
    path = os.path.join(args.output_dir, RUN_FILE)
    with open(path, encoding="utf-8") as f:
        run = json.load(f)
    run["saved"] = sorted(set(os.listdir(args.output_dir)) - before - {RUN_FILE})  # what --restart removes
    with open(path, "w", encoding="utf-8") as f:
        json.dump(run, f, indent=2)
    return trainer.model, metrics, trainer.state.log_history


def generate_text(args) -> None:
    """`calm generate`: print a continuation of every prompt."""
    from transformers import AutoTokenizer, set_seed

    model = _load_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    set_seed(args.seed)
    batch = tokenizer(args.prompt, return_tensors="pt", padding=True).to(model.device)
    options = {} if args.num_candidates is None else {"num_candidates": args.num_candidates}
    out = model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        **options,
    )
    for prompt, row in zip(args.prompt, out[:, batch["input_ids"].shape[1] :], strict=True):
        print(prompt + tokenizer.decode(row, skip_special_tokens=True))


def serve_model(args) -> None:
    """`calm serve`: transformers' OpenAI-compatible server for a CALM (serving.py; needs transformers[serving])."""
    from .serving import serve

    check_path(args.model, "model")
    serve(**{k: v for k, v in vars(args).items() if k != "command"})


def evaluate_model(args) -> None:
    """`calm evaluate`: BrierLM (and Brier-1..4) as JSON."""
    from transformers import AutoTokenizer

    from .brierlm import score_model
    from .data import load_documents

    model = _load_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts = list(load_documents(args.files)["text"])
    result = score_model(
        model, texts=texts, tokenizer=tokenizer, context_length=args.context_length, seed=args.seed,
        max_blocks=args.max_blocks,
    )  # fmt: skip
    print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, str))}, indent=2))


def check_path(path: str | None, what: str) -> None:
    """`path` (a folder, or a Hub id) for `what` (e.g. "--model"): a local-looking path that does not exist is an error
    that names it, instead of transformers' "Repo id must be in the form 'repo_name'" (a Hub id is `name` or
    `org/name`; anything with more parts, or starting with `.`, `/` or `~`, can only be local). The example scripts
    check their paths with it too."""
    if not path or os.path.exists(path):
        return
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or "\\" in path:
        raise FileNotFoundError(f"{what} {path!r}: no such folder (looked in {os.getcwd()}).")


def _load_model(path: str):
    """The model of `path` (a folder or a Hub id) in eval mode, on the GPU when there is one."""
    from transformers import AutoModelForCausalLM

    from .modeling_calm import CalmForCausalLM
    from .official_checkpoints import is_official_calm

    check_path(path, "model")
    model = (CalmForCausalLM if is_official_calm(path) else AutoModelForCausalLM).from_pretrained(path).eval()
    return model.to("cuda") if torch.cuda.is_available() else model


def _print(message: str) -> None:
    print(f"[calm] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
