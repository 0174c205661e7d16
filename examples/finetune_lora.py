#!/usr/bin/env python
"""Fine-tune a trained CALM language model with LoRA adapters (peft) on its Transformer backbone.

The base model (a `CalmForCausalLM` saved with `save_pretrained`, its tokenizer beside it) stays frozen: the backbone's
attention projections (and optionally its MLP) get low-rank adapters, the energy head is frozen unless
`--train_head`, and the autoencoder is never touched (adapters are placed by a pattern that only matches the
backbone's decoder layers: the autoencoder has `gate_proj`/`up_proj`/`down_proj` layers too). Training uses
`CalmTrainer` with the language-model data recipe of `transformers_calm.data`.

`output_dir` receives the adapter (`adapter_config.json`, `adapter_model.safetensors`) and the tokenizer; with
`--merge`, `output_dir/merged` (or `--merged_dir`) also receives a plain `CalmForCausalLM` with the adapters merged
into its weights, which loads with `AutoModelForCausalLM` and needs no peft. At the end, a continuation of `--prompt`
is sampled and printed.

    python examples/finetune_lora.py --model outputs/calm-tiny --train_file my_domain.jsonl \
        --validation_file data/wikitext_document_level-test.json --block_size 256 --lora_r 16 --lora_mlp \
        --max_steps 500 --per_device_train_batch_size 8 --output_dir outputs/calm-lora --merge

Load the adapter later (with `transformers_calm` imported, so that the Auto classes know CALM):

    base = AutoModelForCausalLM.from_pretrained("outputs/calm-tiny")
    model = PeftModel.from_pretrained(base, "outputs/calm-lora")
    model = AutoPeftModelForCausalLM.from_pretrained("outputs/calm-lora")  # the same: the base path is in the adapter

Also callable in-process: `trainer, metrics = main([...same arguments...])`.
"""

import logging
import os
import re
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, get_peft_model
from scripts import (  # examples/scripts.py: the script's directory is on sys.path
    ScriptDataArguments,
    check_path,
    load_tokenizer,
    parse_script_args,
    setup_logging,
    train_and_evaluate,
)
from transformers import AutoModelForCausalLM, HfArgumentParser, TrainingArguments, set_seed

from transformers_calm import CalmForCausalLM, CalmTrainer
from transformers_calm.data import PACKINGS

logger = logging.getLogger(__name__)

ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP_MODULES = ["gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelArguments:
    model: str = field(metadata={"help": "Directory of a trained CalmForCausalLM and its tokenizer."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer path, if not beside the model."})
    dtype: str = field(
        default="float32",
        metadata={
            "help": "Dtype of the frozen base weights (LoRA weights stay float32). bfloat16 halves the base's "
            "memory; train with --bf16 then.",
            "choices": ["float32", "bfloat16", "float16"],
        },
    )


@dataclass
class LoraArguments:
    lora_r: int = field(default=16, metadata={"help": "Rank of the LoRA updates."})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA scaling numerator: updates are scaled by alpha / r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(ATTENTION_MODULES),
        metadata={
            "help": "Linear layers of the backbone's decoder layers that get adapters (attention: q_proj k_proj "
            "v_proj o_proj; MLP: gate_proj up_proj down_proj). Only the backbone is ever matched."
        },
    )
    lora_mlp: bool = field(default=False, metadata={"help": "Also adapt the backbone's MLP (gate/up/down_proj)."})
    train_head: bool = field(
        default=False,
        metadata={
            "help": "Also train the energy head, in full (peft modules_to_save: the trained head is saved with the "
            "adapter). Off by default: the head is CALM's output layer, the analogue of lm_head that LoRA recipes "
            "leave frozen; the adapted backbone already moves the hidden states that condition it, and the adapter "
            "stays small. Turn it on for a large shift of domain."
        },
    )
    merge: bool = field(
        default=False,
        metadata={"help": "Also save a merged model (adapters folded into the weights; loads without peft)."},
    )
    merged_dir: str | None = field(default=None, metadata={"help": "Where --merge saves; default output_dir/merged."})
    prompt: str = field(
        default="The", metadata={"help": "Prompt of the continuation printed at the end; empty to skip."}
    )
    max_new_tokens: int = field(default=32, metadata={"help": "Length of that continuation."})


@dataclass
class DataArguments(ScriptDataArguments):
    packing: str = field(
        default="aligned",
        metadata={
            "help": "How documents are packed into blocks (see transformers_calm.data): aligned (EOS + pad to a "
            "multiple of K, every document starts a chunk) or stream (the official CALM recipe). Use the packing "
            "the base model was trained with.",
            "choices": list(PACKINGS),
        },
    )


@dataclass
class LoraTrainingArguments(TrainingArguments):
    """`TrainingArguments` with defaults usual for LoRA: a larger learning rate than full fine-tuning, no decay."""

    learning_rate: float = field(default=2e-4)
    adam_beta2: float = field(default=0.95)
    weight_decay: float = field(default=0.0)
    max_grad_norm: float = field(default=1.0)


def lora_target_pattern(module_names):
    """A regex (peft full-matches it against module names) selecting the given layers of the backbone only."""
    names = "|".join(re.escape(name) for name in module_names)
    return rf"model\.backbone\.layers\.\d+\.(?:\w+\.)*(?:{names})"


def add_lora(model, r=16, alpha=32, dropout=0.05, target_modules=None, train_head=False):
    """Wrap a `CalmForCausalLM` with LoRA adapters on its backbone; returns a `PeftModelForCausalLM`.

    Args:
        model ([`CalmForCausalLM`]): the base model; its own weights are frozen by peft.
        r, alpha, dropout: LoRA rank, scaling numerator (updates scaled by alpha / r) and input dropout.
        target_modules (`list[str]`, *optional*): names of Linear layers of the backbone's decoder layers;
            default the attention projections. Unknown names raise.
        train_head (`bool`): also train (and save with the adapter) the full energy head.
    """
    target_modules = list(target_modules or ATTENTION_MODULES)
    layer = model.model.backbone.layers[0]
    available = {
        name.rsplit(".", 1)[-1] for name, module in layer.named_modules() if isinstance(module, torch.nn.Linear)
    }
    unknown = sorted(set(target_modules) - available)
    if unknown:
        raise ValueError(f"No layer {unknown} in the backbone's decoder layers; choose among {sorted(available)}.")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_target_pattern(target_modules),
        modules_to_save=["generative_head"] if train_head else None,
        task_type="CAUSAL_LM",  # PeftModelForCausalLM: its generate() reaches CalmForCausalLM.generate
    )
    return get_peft_model(model, config)


def count_parameters(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


@torch.no_grad()
def sample_continuation(model, tokenizer, prompt, max_new_tokens):
    """Sample a continuation of `prompt` (one chunk of K tokens per step); returns the decoded new text."""
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    was_training = model.training
    model.eval()
    sequences = model.generate(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=max_new_tokens
    )
    model.train(was_training)
    return tokenizer.decode(sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def main(argv=None):
    """Fine-tune with LoRA; returns `(trainer, metrics)`.

    `trainer.model` is the `PeftModel`; after `--merge`, its adapters are merged in place (the adapter on disk, saved
    before, is unchanged).
    """
    parser = HfArgumentParser((ModelArguments, LoraArguments, DataArguments, LoraTrainingArguments))
    model_args, lora_args, data_args, training_args = parse_script_args(parser, argv)

    setup_logging(training_args, __name__)
    set_seed(training_args.seed)

    # Importing transformers_calm registered CALM with the Auto classes.
    check_path(model_args.model, "--model")
    model = AutoModelForCausalLM.from_pretrained(model_args.model, dtype=getattr(torch, model_args.dtype))
    if not isinstance(model, CalmForCausalLM):
        raise ValueError(f"{model_args.model} holds a {type(model).__name__}, not a CalmForCausalLM.")
    tokenizer = load_tokenizer(model_args.tokenizer or model_args.model)
    patch_size = model.config.patch_size
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"The tokenizer has {len(tokenizer)} tokens, the model {model.config.vocab_size}.")
    if data_args.block_size % patch_size:
        raise ValueError(f"block_size ({data_args.block_size}) must be a multiple of patch_size ({patch_size}).")
    if data_args.block_size > model.config.max_tokens:
        raise ValueError(
            f"block_size ({data_args.block_size}) is longer than the model's context of {model.config.max_tokens} "
            f"tokens ({model.config.max_chunks} chunks of K = {patch_size}): pass --block_size "
            f"{model.config.max_tokens} or less."
        )

    train_dataset, eval_dataset = data_args.load_blocks(tokenizer, patch_size, training_args, packing=data_args.packing)

    target_modules = list(lora_args.lora_target_modules)
    if lora_args.lora_mlp:
        target_modules += [name for name in MLP_MODULES if name not in target_modules]
    model = add_lora(
        model,
        r=lora_args.lora_r,
        alpha=lora_args.lora_alpha,
        dropout=lora_args.lora_dropout,
        target_modules=target_modules,
        train_head=lora_args.train_head,
    )
    trainable, total = count_parameters(model)
    logger.info(
        f"LoRA r={lora_args.lora_r} on {target_modules}{' + energy head' if lora_args.train_head else ''}: "
        f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)"
    )

    trainer = CalmTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,  # saved beside the adapter
    )
    # Saves the adapter (and the trained head with --train_head) + tokenizer only: the model is a PeftModel.
    metrics = train_and_evaluate(trainer)

    if trainer.is_world_process_zero():
        model = trainer.model
        if lora_args.merge:
            merged_dir = lora_args.merged_dir or os.path.join(training_args.output_dir, "merged")
            model = model.merge_and_unload()  # in place: a plain CalmForCausalLM
            model.save_pretrained(merged_dir)
            tokenizer.save_pretrained(merged_dir)
            logger.info(f"Merged model saved to {merged_dir}")
        if lora_args.prompt:
            set_seed(training_args.seed)
            text = sample_continuation(model, tokenizer, lora_args.prompt, lora_args.max_new_tokens)
            print(f"Prompt: {lora_args.prompt!r}\nContinuation: {text!r}")
    return trainer, metrics


if __name__ == "__main__":
    main()
