"""Tests of `transformers_calm.sft` (supervised fine-tuning data: chunk-aligned prompts, completion-only labels,
packing, the collator, generation prompts), of examples/sft.py and of the GSM8K recipe's command. Tiny word-level
tokenizer and tiny models from `factories`; CPU, offline, seconds."""

import importlib
import json
import os
import shlex
import subprocess
import warnings

import datasets
import pytest
import torch
from factories import tiny_calm, word_tokenizer
from transformers import set_seed

from transformers_calm import CalmTrainer, CalmTrainingArguments
from transformers_calm.sft import (
    IGNORE_INDEX,
    CalmSFTDataCollator,
    align_example,
    encode_example,
    generate_completions,
    pack_sft_dataset,
    sft_generation_inputs,
    tokenize_sft_dataset,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 4
X = IGNORE_INDEX
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)
WORDS = "What is 1 + 2 ? 3 4 5 6 7 8 9 user assistant system : be brief hello world"


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = word_tokenizer([WORDS])
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def ids(tokenizer, text):
    return [tokenizer.convert_tokens_to_ids(word) for word in text.split()]


def chat(question, answer=None, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": question})
    return messages + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def model_for(tokenizer, seed=0, **head):
    specials = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    energy = head.get("head_type", "energy") == "energy"  # only the energy head's output layer starts at zero
    return tiny_calm(seed, autoencoder={"vocab_size": len(tokenizer), **specials}, random_head=energy, **head)


def target_chunks(labels):
    """The chunks CalmForCausalLM trains on (calm_loss.head_loss): chunks 1.. with no -100 label."""
    labels = torch.as_tensor(labels).reshape(1, -1)
    return (labels[:, K:] != X).unflatten(1, (-1, K)).all(-1)[0].nonzero().flatten().add(1).tolist()


# ------------------------------------------------------------------------------------------- labels and alignment


def test_prompt_completion_masks_exactly_the_prompt_chunks(tokenizer):
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    prompt, completion = encode_example({"prompt": "What is 1 + 2 ?", "completion": "3"}, tokenizer)
    assert prompt == ids(tokenizer, "<s> What is 1 + 2 ?") and completion == ids(tokenizer, "3")
    example = align_example(prompt, completion, K, pad, eos)
    # 7 prompt tokens + 1 pad = chunks 0-1; the answer, its EOS and 2 pads = chunk 2, the only target.
    assert example["input_ids"] == prompt + [pad] + completion + [eos, pad, pad]
    assert example["labels"] == [X] * 8 + completion + [eos, pad, pad]
    assert target_chunks(example["labels"]) == [2]

    # A prompt of whole chunks gets no pad; a completion that ends with EOS gets no second one; long answers span
    # several target chunks.
    example = align_example([1, 5, 6, 7], [8, 9, 10, 11, 12, eos], K, pad, eos)
    assert example["input_ids"] == [1, 5, 6, 7, 8, 9, 10, 11, 12, eos, pad, pad]
    assert example["labels"] == [X] * 4 + [8, 9, 10, 11, 12, eos, pad, pad]
    assert target_chunks(example["labels"]) == [1, 2]
    # train_on_prompt: the prompt's chunks are targets too (its first chunk is never one: nothing precedes it).
    example = align_example(prompt, completion, K, pad, eos, completion_only_loss=False)
    assert example["labels"] == example["input_ids"] and target_chunks(example["labels"]) == [1, 2]
    assert align_example(prompt, completion, K, pad, eos, max_length=8)["labels"] == [X] * 8


def test_messages_are_rendered_with_the_chat_template(tokenizer):
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    example = {"messages": chat("What is 1 + 2 ?", "3", system="be brief")}
    prompt, completion = encode_example(example, tokenizer)
    rendered = tokenizer.apply_chat_template(example["messages"][:2], add_generation_prompt=True, tokenize=False)
    assert prompt == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert prompt == ids(tokenizer, "<s> system : be brief user : What is 1 + 2 ? assistant :")
    assert completion == ids(tokenizer, "3")  # what the full conversation adds after the generation prompt
    aligned = align_example(prompt, completion, K, pad, eos)
    assert len(prompt) == 15 and aligned["labels"] == [X] * 16 + completion + [eos, pad, pad]
    assert target_chunks(aligned["labels"]) == [4]
    # TRL's conversational prompt-completion format gives the same sequence.
    same = {"prompt": example["messages"][:2], "completion": example["messages"][2:]}
    assert encode_example(same, tokenizer) == (prompt, completion)
    # Several turns: the last assistant turn is the completion, the earlier ones are prompt.
    turns = chat("hello", "world") + chat("What is 1 + 2 ?", "3")
    prompt, completion = encode_example({"messages": turns}, tokenizer)
    assert completion == ids(tokenizer, "3") and prompt[4:7] == ids(tokenizer, "assistant : world")


def test_dataset_tokenization_and_packing(tokenizer):
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    rows = [
        {"prompt": "What is 1 + 2 ?", "completion": "3"},  # 3 chunks
        {"prompt": "1 2", "completion": "hello world 3 4 5"},  # 1 prompt chunk + 2 answer chunks
        {"prompt": "What is 4 + 5 ?", "completion": "9"},  # 3 chunks: does not fit the first block
    ]
    tokenized = tokenize_sft_dataset(datasets.Dataset.from_list(rows), tokenizer, K)
    assert tokenized.column_names == ["input_ids", "labels"]
    assert [target_chunks(labels) for labels in tokenized["labels"]] == [[2], [1, 2], [2]]
    packed = pack_sft_dataset(tokenized, 6 * K, K, pad)
    assert len(packed) == 2
    first, second = packed[0], packed[1]
    assert first["input_ids"] == tokenized[0]["input_ids"] + tokenized[1]["input_ids"]
    # The second example's first chunk is not a target (the state before it belongs to the first example).
    assert first["labels"] == tokenized[0]["labels"] + [X] * 4 + ids(tokenizer, "hello world 3 4 5") + [eos, pad, pad]
    assert first["position_ids"] == [0, 1, 2, 0, 1, 2]
    assert second["input_ids"] == tokenized[2]["input_ids"] + [pad] * 12
    assert second["labels"] == tokenized[2]["labels"] + [X] * 12 and second["position_ids"] == [0, 1, 2, 0, 1, 2]
    assert target_chunks(first["labels"]) == [2, 4, 5] and target_chunks(second["labels"]) == [2]
    with pytest.raises(ValueError, match="does not fit a block"):
        pack_sft_dataset(tokenized, 2 * K, K, pad)
    # Truncation keeps whole chunks and drops the examples left without a target.
    truncated = tokenize_sft_dataset(datasets.Dataset.from_list(rows), tokenizer, K, max_length=2 * K)
    assert truncated["input_ids"] == [tokenized[1]["input_ids"][: 2 * K]]


def test_collator(tokenizer):
    collator = CalmSFTDataCollator(tokenizer.pad_token_id, K)
    batch = collator([{"input_ids": [1, 2, 3, 4], "labels": [X] * 4}, {"input_ids": list(range(8)), "labels": [5] * 8}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 0, 0, 0, 0], list(range(8))]
    assert batch["attention_mask"].tolist() == [[1] * 4 + [0] * 4, [1] * 8]
    assert batch["labels"].tolist() == [[X] * 8, [5] * 8]
    packed = collator([{"input_ids": [1] * 8, "labels": [1] * 8, "position_ids": [0, 0]}] * 2)
    assert set(packed) == {"input_ids", "labels", "position_ids", "use_cache"} and packed["use_cache"] is False
    assert packed["position_ids"].shape == (2, 2)
    with pytest.raises(ValueError, match="whole chunks"):
        collator([{"input_ids": [1, 2, 3]}])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_packed_examples_are_read_as_alone(tokenizer, mode):
    """Chunk positions restart and, without a cache (the collator's batches say so: in eval mode the model would
    build one), attention stays inside each example: a packed block's states are its examples' run one by one."""
    model = model_for(tokenizer).train(mode == "train")
    rows = [{"prompt": "What is 1 + 2 ?", "completion": "3"}, {"prompt": "1 2", "completion": "hello world 3 4 5"}]
    tokenized = tokenize_sft_dataset(datasets.Dataset.from_list(rows), tokenizer, K)
    batch = CalmSFTDataCollator(tokenizer.pad_token_id, K)(list(pack_sft_dataset(tokenized, 8 * K, K, 0)))
    with torch.no_grad():
        packed = model(**batch).last_hidden_state[0]
        alone = [model(input_ids=torch.tensor([row])).last_hidden_state[0] for row in tokenized["input_ids"]]
    torch.testing.assert_close(packed[:6], torch.cat(alone), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- generation


def test_generation_pads_the_prompt_as_training_does(tokenizer):
    examples = [{"messages": chat("What is 1 + 2 ?", "3")}, {"prompt": "1 2", "completion": "3"}]
    inputs = sft_generation_inputs([*examples, "What is 4 + 5 ?", chat("hello")], tokenizer, K)
    rows = inputs["input_ids"].tolist()
    for row, mask, example in zip(rows, inputs["attention_mask"].tolist(), examples, strict=False):
        aligned = tokenize_sft_dataset(datasets.Dataset.from_list([example]), tokenizer, K)[0]
        prompt_length = aligned["labels"].index(next(label for label in aligned["labels"] if label != X))
        real = [token for token, keep in zip(row, mask, strict=True) if keep]
        assert real == aligned["input_ids"][:prompt_length]  # the training prompt, its pads included
    width = inputs["input_ids"].shape[1]
    assert width == 12 and inputs["attention_mask"].tolist()[1] == [0] * 8 + [1] * 4  # left fill: whole chunks
    assert inputs["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 1], [0, 0, 1]]

    # A batch reads every prompt as it would alone: same state at the last prompt chunk.
    model = model_for(tokenizer)
    with torch.no_grad():
        batched = model(**inputs, use_cache=False).last_hidden_state[:, -1]
        for index, prompt in enumerate([*examples, "What is 4 + 5 ?", chat("hello")]):
            alone = sft_generation_inputs([prompt], tokenizer, K)
            state = model(**alone, use_cache=False).last_hidden_state[0, -1]
            torch.testing.assert_close(batched[index], state, atol=1e-5, rtol=1e-5)
    answers = generate_completions(model, tokenizer, examples, max_new_tokens=K, do_sample=False)
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)


# -------------------------------------------------------------------------------------------------------- errors


def test_clear_errors(tokenizer):
    with pytest.raises(ValueError, match="`messages` column .* or `prompt` and `completion`.*rename_columns"):
        tokenize_sft_dataset(datasets.Dataset.from_list([{"query": "a", "response": "b"}]), tokenizer, K)
    with pytest.raises(ValueError, match="no assistant turn"):
        encode_example({"messages": chat("hello")}, tokenizer)
    plain = word_tokenizer([WORDS])
    with pytest.raises(ValueError, match="no chat template.*tokenizer.chat_template.*prompt/completion"):
        encode_example({"messages": chat("hello", "world")}, plain)
    with pytest.raises(ValueError, match="no chat template"):
        sft_generation_inputs([chat("hello")], plain, K)
    odd = word_tokenizer([WORDS])
    odd.chat_template = (
        "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}user{% endif %}"
    )
    with pytest.raises(ValueError, match="not a prefix"):
        encode_example({"messages": chat("hello", "world")}, odd)
    with pytest.raises(ValueError, match="both be strings or both be lists"):
        encode_example({"prompt": "hello", "completion": chat("hello")}, tokenizer)
    no_pad = word_tokenizer([WORDS], pad=False)
    with pytest.raises(ValueError, match="no pad token"):
        tokenize_sft_dataset(datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}]), no_pad, K)
    with pytest.raises(ValueError, match="multiple of K"):
        align_example([1], [5], K, 0, 2, max_length=6)


# ------------------------------------------------------------------------------------------------------ training


def test_sft_trains(tokenizer, tmp_path):
    """A few steps of CalmTrainer on aligned examples lower the loss of the answers' chunks."""
    rows = [{"prompt": f"What is {a} + {b} ?", "completion": str(a + b)} for a in (1, 2) for b in (2, 5, 6)]
    dataset = tokenize_sft_dataset(datasets.Dataset.from_list(rows), tokenizer, K)
    collator = CalmSFTDataCollator(tokenizer.pad_token_id, K)
    # The posterior means as targets (no sampling noise in them): the loss measures what the model learnt.
    model = model_for(tokenizer, head_type="flow", target_noise_scale=0.0)
    batch = collator(list(dataset))

    def loss():
        set_seed(0)
        with torch.no_grad():
            return model(**batch).loss.item()

    before = loss()
    args = CalmTrainingArguments(
        output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=6, learning_rate=3e-3,
        report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, logging_steps=10,
        dataloader_num_workers=0,
    )  # fmt: skip
    CalmTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator).train()
    after = loss()
    assert after < 0.5 * before, (before, after)  # measured: 1.22 -> 0.25


# -------------------------------------------------------------------------------------------- example and recipe


def load_example():
    return importlib.import_module("sft")  # examples/ is on sys.path (conftest)


def test_arithmetic_task():
    example = load_example()
    train, heldout, texts = example.arithmetic_task(seed=0, heldout=20)
    assert len(train) == 450 - 20 and len(heldout) == 20 and example.arithmetic_task(seed=0, heldout=20)[1] == heldout
    questions = {e["messages"][0]["content"] for e in train}
    assert not questions & {e["messages"][0]["content"] for e in heldout}
    assert all(e["messages"][1]["content"] == str(sum(map(int, e["messages"][0]["content"][8:-2].split(" + "))))
               for e in heldout)  # fmt: skip
    assert not any("What" in text for text in texts)  # the base model never reads a question
    tokenizer = example.arithmetic_tokenizer()
    prompt, completion = encode_example(heldout[0], tokenizer)
    assert tokenizer.unk_token_id not in prompt + completion and len(completion) == 1
    assert example.final_number("so 3 + 4 = 7.\n#### 1,234") == "1234" and example.final_number("none") is None


def test_example_runs(tokenizer, tmp_path):
    """examples/sft.py on a saved tiny CALM and a JSON-lines file: trains, saves, scores before and after."""
    model = model_for(tokenizer, head_type="flow")
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    rows = [{"query": f"What is {a} + 1 ?", "response": str(a + 1)} for a in range(1, 9)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = load_example().main([
            "--model_name_or_path", str(tmp_path / "base"), "--dataset", str(tmp_path / "data.jsonl"),
            "--prompt_field", "query", "--completion_field", "response", "--eval_dataset", str(tmp_path / "data.jsonl"),
            "--eval_prompt_field", "query", "--eval_completion_field", "response", "--max_eval_samples", "3",
            "--packing", "--max_length", "32", "--max_steps", "2", "--per_device_train_batch_size", "2",
            "--max_new_tokens", "4", "--num_candidates", "8", "--lora", "--lora_r", "2", "--use_cpu",
            "--disable_tqdm", "true", "--output_dir", str(tmp_path / "out"),
        ])  # fmt: skip
    assert results["before"]["total"] == 3 and 0 <= results["after"]["exact_match"] <= 1
    assert results["train_examples"] == 8 and results["trainable_parameters"] < sum(
        p.numel() for p in model.parameters()
    )
    saved = json.loads((tmp_path / "out" / "sft_results.json").read_text())
    assert saved["after"] == results["after"] and (tmp_path / "out" / "adapter_config.json").exists()


def test_gsm8k_recipe_parses(tmp_path):
    recipe = os.path.join(REPO_ROOT, "examples", "recipes", "sft-gsm8k.sh")
    for lora in ("", "1"):
        out = subprocess.run(
            ["bash", recipe, "calm-m-hf", str(tmp_path / "out"), "8"],
            env={**os.environ, "DRY_RUN": "1", "LORA": lora}, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        command = shlex.split(out.strip().splitlines()[-1][2:])
        script = command.index(os.path.join(REPO_ROOT, "examples", "sft.py"))
        model_args, data_args, _, lora_args, training_args = load_example().parse_args(
            [*command[script + 1 :], "--use_cpu"]
        )  # bf16: a GPU
        assert model_args.model_name_or_path == "calm-m-hf" and data_args.dataset == "meta-math/MetaMathQA"
        assert data_args.eval_dataset == "openai/gsm8k" and data_args.metric == "last_number" and data_args.packing
        assert training_args.gradient_accumulation_steps == 4 and training_args.bf16 and lora_args.lora == bool(lora)
        assert data_args.prompt_template == "Question: {prompt}\\nAnswer:"
