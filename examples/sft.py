#!/usr/bin/env python
"""Supervised fine-tuning (SFT) of a trained CALM on question/answer data, with a completion-only loss.

The data is conversational (`messages`) or prompt/completion (`transformers_calm.sft`): the prompt is padded with the
pad token to a multiple of K so that the answer starts a chunk, its chunks are masked out of the loss, and the answer
(EOS included) is what the model learns; `--packing` packs whole examples into blocks. Training is `CalmTrainer`,
in full or with peft LoRA adapters on the backbone (`--lora`). Before and after training, the held-out questions are
answered by `generate` (the prompt padded the same way) and scored by exact match (`--metric exact`, or
`last_number`: the last number of the answer, GSM8K-style).

    # Any data: a local JSON-lines file or a Hub dataset, columns renamed to prompt/completion when needed
    python examples/sft.py --model_name_or_path my-calm --dataset meta-math/MetaMathQA --prompt_field query \
        --completion_field response --prompt_template "Question: {prompt}\\nAnswer:" --eval_dataset openai/gsm8k \
        --eval_config main --eval_split test --eval_prompt_field question --eval_completion_field answer \
        --metric last_number --max_new_tokens 256 --output_dir my-calm-sft
    # The CPU demo: a small arithmetic task made here, its base CALM trained here first (`calm train`)
    python examples/sft.py --task arithmetic --output_dir outputs/sft-arithmetic [--lora]

`output_dir` receives the fine-tuned model (or the adapter with `--lora`) with its tokenizer, and `sft_results.json`
(exact match before and after, with the settings). Also callable in-process: `results = main([...])`.
"""

import json
import logging
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field

import datasets
import torch
from finetune_lora import ATTENTION_MODULES, MLP_MODULES, add_lora, count_parameters
from scripts import check_path, load_tokenizer, parse_script_args, setup_logging
from transformers import AutoModelForCausalLM, HfArgumentParser, set_seed

from transformers_calm import CalmForCausalLM, CalmTrainer, CalmTrainingArguments
from transformers_calm.official_checkpoints import is_official_calm
from transformers_calm.sft import (
    CalmSFTDataCollator,
    generate_completions,
    pack_sft_dataset,
    tokenize_sft_dataset,
)

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A trained CalmForCausalLM (folder or Hub id) with its tokenizer."}
    )
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer path, if not beside the model."})


@dataclass
class SFTDataArguments:
    task: str | None = field(
        default=None,
        metadata={
            "help": "Make a small task here instead of --dataset: `arithmetic` (What is a + b ?), with its base CALM "
            "trained here on the task's running text unless --model_name_or_path is given.",
            "choices": ["arithmetic"],
        },
    )
    dataset: str | None = field(default=None, metadata={"help": "A .json/.jsonl file, or a Hub dataset name."})
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    split: str = field(default="train")
    prompt_field: str | None = field(default=None, metadata={"help": "Column to use as `prompt` (e.g. query)."})
    completion_field: str | None = field(default=None, metadata={"help": "Column to use as `completion`."})
    prompt_template: str | None = field(
        default=None, metadata={"help": "Format of string prompts, with {prompt}: e.g. 'Question: {prompt}\\nAnswer:'."}
    )
    eval_dataset: str | None = field(default=None, metadata={"help": "Held-out questions (same formats)."})
    eval_config: str | None = field(default=None)
    eval_split: str = field(default="test")
    eval_prompt_field: str | None = field(default=None)
    eval_completion_field: str | None = field(default=None)
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    max_length: int = field(default=1024, metadata={"help": "Truncate examples to this many tokens (multiple of K)."})
    packing: bool = field(default=False, metadata={"help": "Pack whole examples into blocks of --max_length."})
    train_on_prompt: bool = field(default=False, metadata={"help": "Also train on the prompt's chunks."})
    metric: str = field(
        default="exact", metadata={"help": "exact, or last_number (GSM8K)", "choices": ["exact", "last_number"]}
    )
    max_new_tokens: int = field(default=16, metadata={"help": "Length of the generated answers."})
    num_candidates: int | None = field(
        default=None, metadata={"help": "N of do_sample=False (the most frequent of N head samples)."}
    )
    generation_batch_size: int = field(default=64)
    skip_eval_before: bool = field(default=False, metadata={"help": "Do not score the model before training."})


@dataclass
class TaskArguments:
    task_seed: int = field(default=0, metadata={"help": "Seed of the task's questions and held-out split."})
    task_heldout: int = field(default=100, metadata={"help": "Held-out questions of the task."})
    task_format: str = field(
        default="messages",
        metadata={"help": "Examples as conversations or prompt/completion", "choices": ["messages", "prompt"]},
    )
    base_dir: str | None = field(
        default=None, metadata={"help": "Where the task's base CALM is trained (default output_dir/base); reused."}
    )
    base_args: str = field(
        default="--ae_steps 300 --lm_steps 1200 --hidden_size 128 --intermediate_size 384 --num_hidden_layers 2",
        metadata={"help": "Extra `calm train` options of the base CALM (preset tiny)."},
    )


@dataclass
class SFTLoraArguments:
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters on the backbone instead of everything."})
    lora_r: int = field(default=16)
    lora_alpha: float = field(default=32)
    lora_dropout: float = field(default=0.0)
    lora_mlp: bool = field(default=False, metadata={"help": "Also adapt the backbone's MLP."})
    lora_train_head: bool = field(default=True, metadata={"help": "Also train the generative head in full."})


@dataclass
class SFTTrainingArguments(CalmTrainingArguments):
    """`CalmTrainingArguments` with SFT defaults: the learning rate of full fine-tuning, a cosine decay, no decay of
    weights, no checkpoints."""

    learning_rate: float = field(default=2e-5)
    lr_scheduler_type: str = field(default="cosine")
    warmup_steps: float = field(default=0.03)  # below 1: a fraction of the steps (warmup_ratio is deprecated)
    adam_beta2: float = field(default=0.95)
    weight_decay: float = field(default=0.0)
    max_grad_norm: float = field(default=1.0)
    save_strategy: str = field(default="no")
    report_to: str = field(default="none")


# The arithmetic demo's training options (each applies unless given on the command line): sized for 2 CPU cores.
TASK_DEFAULTS = {
    "learning_rate": 1e-3,
    "head_learning_rate": 5e-3,
    "max_steps": 400,
    "per_device_train_batch_size": 32,
    "lr_scheduler_type": "constant_with_warmup",
    "logging_steps": 50,
    "max_new_tokens": 8,
}


def parse_args(argv=None):
    """`(model_args, data_args, task_args, lora_args, training_args)` of `argv` (a list; default `sys.argv`); with
    `--task`, `TASK_DEFAULTS` fill the options not given."""
    parser = HfArgumentParser((ModelArguments, SFTDataArguments, TaskArguments, SFTLoraArguments, SFTTrainingArguments))
    parsed = parse_script_args(parser, argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if parsed[1].task and not (len(argv) == 1 and argv[0].endswith(".json")):  # a JSON file sets every option
        given = {arg.split("=")[0][2:] for arg in argv if arg.startswith("--")}
        argv += [
            item for name, value in TASK_DEFAULTS.items() if name not in given for item in (f"--{name}", str(value))
        ]
        parsed = parser.parse_args_into_dataclasses(args=argv)
    return tuple(parsed)


# ------------------------------------------------------------------------------------------------ arithmetic task


def arithmetic_tokenizer():
    """A word-level tokenizer for the task (numbers 0..199 and its words) that prepends BOS, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "count", "by", "from", ":", "What", "is", "+", "?", "user", "assistant"]
    vocab = {word: index for index, word in enumerate(words + [str(n) for n in range(200)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant :{% endif %}"
    )
    return tokenizer


def arithmetic_task(seed=0, heldout=100, task_format="messages", max_a=50):
    """`(train, heldout, pretraining_texts)`: the questions "What is a + b ?" (a < max_a, 1 <= b <= 9), split by `seed`;
    and the base CALM's running text, "count by b from a : a a+b a+2b ...", where the sums appear but never a
    question (so the base model cannot answer one: before SFT its accuracy is about zero)."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(max_a) for b in range(1, 10)]
    rng.shuffle(pairs)

    def example(a, b):
        question, answer = f"What is {a} + {b} ?", str(a + b)
        if task_format == "messages":
            return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
        return {"prompt": question, "completion": answer}

    examples = [example(a, b) for a, b in pairs]
    texts = []
    for _ in range(20000):
        b, a, terms = rng.randint(1, 9), rng.randint(0, max_a + 10), rng.randint(3, 6)
        numbers = [a + i * b for i in range(terms) if a + i * b < 200]
        texts.append(f"count by {b} from {a} : " + " ".join(map(str, numbers)))
    return examples[heldout:], examples[:heldout], texts


def train_base_model(base_dir, texts, tokenizer, extra_args, seed):
    """The task's base CALM: `calm train` (autoencoder, then the language model) on its running text, in base_dir
    (skipped when done before)."""
    from transformers_calm.cli import train_command

    os.makedirs(base_dir, exist_ok=True)
    data = os.path.join(base_dir, "pretraining.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": text}) + "\n" for text in texts)
    tokenizer_dir = os.path.join(base_dir, "task-tokenizer")
    tokenizer.save_pretrained(tokenizer_dir)
    argv = [data, "--output_dir", base_dir, "--tokenizer", tokenizer_dir, "--seed", str(seed), *extra_args.split()]
    train_command(argv)
    return base_dir


# ----------------------------------------------------------------------------------------------------------- data


def load_examples(name, config, split, prompt_field, completion_field, max_samples, prompt_template):
    """A dataset of SFT examples: a local JSON(-lines) file or a Hub dataset, columns renamed to prompt/completion."""
    if os.path.isfile(name):
        dataset = datasets.load_dataset("json", data_files=name, split="train")
    else:
        check_path(name, "--dataset")
        dataset = datasets.load_dataset(name, config, split=split)
    renames = {old: new for old, new in ((prompt_field, "prompt"), (completion_field, "completion")) if old}
    dataset = dataset.rename_columns(renames)
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    if prompt_template and "prompt" in dataset.column_names:
        template = prompt_template.replace("\\n", "\n")  # a shell's "\n" is a backslash and an n
        dataset = dataset.map(lambda e: {"prompt": template.format(prompt=e["prompt"])})
    return dataset


def reference_answer(example) -> str:
    """The answer of an SFT example: its completion, or the last assistant message."""
    if "messages" in example:
        return [m for m in example["messages"] if m["role"] == "assistant"][-1]["content"]
    completion = example["completion"]
    return completion if isinstance(completion, str) else completion[-1]["content"]


def final_number(text: str) -> str | None:
    """The last number of `text` (commas dropped; GSM8K's '#### 72' and MetaMathQA's 'The answer is: 72' give 72)."""
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text.split("####")[-1])
    if not numbers:
        return None
    number = numbers[-1].replace(",", "").rstrip(".")
    return number[:-2] if number.endswith(".0") else number


def exact_match(model, tokenizer, examples, data_args, seed) -> dict:
    """Exact-match accuracy of the model's answers to `examples` (a list of SFT examples), and a few samples."""
    set_seed(seed)  # do_sample=False is the most frequent of N head samples: seeded, it is reproducible
    options = {"max_new_tokens": data_args.max_new_tokens, "do_sample": False}
    if data_args.num_candidates:
        options["num_candidates"] = data_args.num_candidates
    answers = generate_completions(model, tokenizer, examples, batch_size=data_args.generation_batch_size, **options)
    references = [reference_answer(e) for e in examples]
    if data_args.metric == "last_number":
        hits = [
            final_number(a) is not None and final_number(a) == final_number(r)
            for a, r in zip(answers, references, strict=True)
        ]
    else:
        hits = [a.strip() == r.strip() for a, r in zip(answers, references, strict=True)]
    samples = [{"answer": a, "reference": r} for a, r in zip(answers[:5], references[:5], strict=True)]
    return {"exact_match": sum(hits) / len(hits), "correct": sum(hits), "total": len(hits), "samples": samples}


# ----------------------------------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    """Fine-tune and score; returns the results written to `output_dir/sft_results.json`."""
    model_args, data_args, task_args, lora_args, training_args = parse_args(argv)
    setup_logging(training_args, __name__)
    started = time.time()
    if data_args.task:
        # The task's models are tiny: more threads than one only add synchronisation (several times slower on a
        # busy 2-core machine).
        torch.set_num_threads(1)
        tokenizer = arithmetic_tokenizer()
        train_examples, eval_examples, texts = arithmetic_task(
            task_args.task_seed, task_args.task_heldout, task_args.task_format
        )
        train_dataset = datasets.Dataset.from_list(train_examples)
        path = model_args.model_name_or_path or train_base_model(
            task_args.base_dir or os.path.join(training_args.output_dir, "base"),
            texts,
            tokenizer,
            task_args.base_args,
            training_args.seed,
        )
    else:
        if not (model_args.model_name_or_path and data_args.dataset):
            raise ValueError("Pass --model_name_or_path and --dataset (or --task arithmetic for the demo).")
        path = model_args.model_name_or_path
        check_path(path, "--model_name_or_path")
        tokenizer = load_tokenizer(model_args.tokenizer or path)
        train_dataset = load_examples(
            data_args.dataset, data_args.dataset_config, data_args.split, data_args.prompt_field,
            data_args.completion_field, data_args.max_train_samples, data_args.prompt_template,
        )  # fmt: skip
        eval_examples = []
        if data_args.eval_dataset:
            eval_examples = list(
                load_examples(
                    data_args.eval_dataset,
                    data_args.eval_config,
                    data_args.eval_split,
                    data_args.eval_prompt_field,
                    data_args.eval_completion_field,
                    data_args.max_eval_samples,
                    data_args.prompt_template,
                )  # fmt: skip
            )
    base_time = time.time() - started
    # The official CALM-M as published (no model_type, which the Auto classes need) loads with CALM's class.
    model = (CalmForCausalLM if is_official_calm(path) else AutoModelForCausalLM).from_pretrained(path)
    if not isinstance(model, CalmForCausalLM):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a CalmForCausalLM.")
    model.to(training_args.device)
    K = model.config.patch_size

    results = {"model": path, "eval_examples": len(eval_examples), "train_examples": len(train_dataset)}
    # Scored on the main process only (the others go on to training and wait for it there).
    main_process = training_args.process_index == 0
    if eval_examples and main_process and not data_args.skip_eval_before:
        results["before"] = exact_match(model, tokenizer, eval_examples, data_args, training_args.seed)
        logger.info(f"exact match before SFT: {results['before']['exact_match']:.1%} of {len(eval_examples)}")

    max_length = min(data_args.max_length, model.config.max_tokens)
    train_dataset = tokenize_sft_dataset(
        train_dataset, tokenizer, K, max_length=max_length, completion_only_loss=not data_args.train_on_prompt
    )
    if data_args.packing:
        train_dataset = pack_sft_dataset(train_dataset, max_length, K, tokenizer.pad_token_id)
    set_seed(training_args.seed)
    if lora_args.lora:
        modules = ATTENTION_MODULES + (MLP_MODULES if lora_args.lora_mlp else [])
        model = add_lora(
            model, lora_args.lora_r, lora_args.lora_alpha, lora_args.lora_dropout, modules, lora_args.lora_train_head
        )
    trainable, total = count_parameters(model)
    logger.info(f"{trainable:,} trainable parameters of {total:,}; {len(train_dataset):,} training sequences")
    trainer = CalmTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=CalmSFTDataCollator(tokenizer.pad_token_id, K),
        processing_class=tokenizer,
    )
    train_started = time.time()
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    results["train_seconds"] = round(time.time() - train_started, 1)
    trainer.save_model()
    if eval_examples and main_process:
        results["after"] = exact_match(trainer.model, tokenizer, eval_examples, data_args, training_args.seed)
        logger.info(f"exact match after SFT: {results['after']['exact_match']:.1%} of {len(eval_examples)}")
    results.update(
        train_loss=train_result.training_loss,
        trainable_parameters=trainable,
        base_seconds=round(base_time, 1),
        total_seconds=round(time.time() - started, 1),
        settings={"data": asdict(data_args), "task": asdict(task_args), "lora": asdict(lora_args)},
    )
    if trainer.is_world_process_zero():
        with open(os.path.join(training_args.output_dir, "sft_results.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        for name in ("before", "after"):
            if name in results:
                print(f"exact match {name} SFT: {results[name]['exact_match']:.1%} ({results[name]['correct']}/"
                      f"{results[name]['total']})")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
