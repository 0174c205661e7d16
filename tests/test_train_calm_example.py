"""Tests of examples/train_calm.py, examples/train_autoencoder.py and of the data recipes of `transformers_calm.data`: a
tiny word-level tokenizer is made here from a few documents of the bundled WikiText, the tiny autoencoder comes from
`factories`; CPU, offline. One test launches the CALM script on 2 processes with torchrun (gloo)."""

import importlib
import json
import os
import subprocess
import sys
import warnings

import datasets
import factories
import pytest
import torch
from common import AUTOENCODER_EVAL_KEYS, EVAL_KEYS
from factories import documents, word_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, TrainingArguments

from transformers_calm import CalmAutoencoder, CalmAutoencoderTrainer, CalmForCausalLM, CalmTrainer
from transformers_calm.data import build_blocks, documents_to_ids, load_documents

pytestmark = pytest.mark.filterwarnings("ignore:BrierLM is reported as 0")  # untrained models score <= 0

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "examples", "train_calm.py")
K = 4
BLOCK_SIZE = 32
SHAPE_ARGS = [
    "--hidden_size", "32", "--intermediate_size", "48", "--num_hidden_layers", "2", "--num_attention_heads", "4",
    "--num_key_value_heads", "2", "--num_mlp_layers", "2", "--noise_size", "8", "--num_samples", "4",
    "--num_targets", "8",
]  # fmt: skip


def load_example(name="train_calm"):
    return importlib.import_module(name)  # examples/ is on sys.path (conftest)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Data files, and an autoencoder directory holding a tiny CalmAutoencoder and its tokenizer."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    train, validation = documents(4), documents(2, skip=10)
    for name, texts in (("train", train), ("validation", validation)):
        with open(tmp_path / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": text}) + "\n" for text in texts)
    tokenizer = word_tokenizer(train + validation)
    autoencoder = factories.tiny_autoencoder(
        seed=0,
        vocab_size=len(tokenizer),
        patch_size=K,
        latent_size=6,
        hidden_size=16,
        intermediate_size=24,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    autoencoder.save_pretrained(tmp_path / "autoencoder")
    tokenizer.save_pretrained(tmp_path / "autoencoder")
    return tmp_path


def script_args(workdir, output_dir, *extra):
    return [
        "--autoencoder", str(workdir / "autoencoder"),
        "--train_file", str(workdir / "train.jsonl"), "--validation_file", str(workdir / "validation.jsonl"),
        "--block_size", str(BLOCK_SIZE), *SHAPE_ARGS,
        "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "1", "--max_eval_samples", "3",
        "--max_steps", "3", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--use_cpu",
        "--seed", "0", "--disable_tqdm", "true", "--dataloader_num_workers", "0", "--output_dir", str(output_dir),
        *extra,
    ]  # fmt: skip


# -------------------------------------------------------------------------------------------------------- data


def test_packing_recipes(workdir):
    texts = documents(3)
    tokenizer = AutoTokenizer.from_pretrained(workdir / "autoencoder")
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    plain = tokenizer(texts)["input_ids"]
    assert all(ids[0] == bos and eos not in ids for ids in plain)

    aligned, lengths = documents_to_ids(texts, tokenizer, K, return_lengths=True)
    for ids, length, original in zip(aligned, lengths, plain, strict=True):
        assert len(ids) % K == 0 and ids[:length] == original + [eos] and set(ids[length:]) <= {pad}
    assert documents_to_ids(texts, tokenizer, K, packing="stream") == plain

    dataset = load_documents(str(workdir / "train.jsonl"))
    aligned_blocks = build_blocks(dataset, tokenizer, K, BLOCK_SIZE)
    stream_blocks = build_blocks(dataset, tokenizer, K, BLOCK_SIZE, packing="stream")
    aligned_stream = [t for ids in documents_to_ids(list(dataset["text"]), tokenizer, K) for t in ids]
    stream = [t for ids in tokenizer(list(dataset["text"]))["input_ids"] for t in ids]
    assert len(aligned_blocks) == len(aligned_stream) // BLOCK_SIZE
    assert len(stream_blocks) == len(stream) // BLOCK_SIZE
    for blocks, ids in ((aligned_blocks, aligned_stream), (stream_blocks, stream)):
        assert blocks["labels"] == blocks["input_ids"]
        assert [t for block in blocks["input_ids"] for t in block] == ids[: len(blocks) * BLOCK_SIZE]
    # Aligned: every document starts on a chunk boundary and its EOS ends it; stream: neither EOS nor pads.
    flat = torch.tensor(aligned_blocks["input_ids"]).flatten()
    assert ((flat == bos).nonzero().flatten() % K == 0).all() and (flat == eos).any()
    flat = torch.tensor(stream_blocks["input_ids"]).flatten()
    assert not ((flat == eos) | (flat == pad)).any()
    assert ((flat == bos).nonzero().flatten() % K != 0).any()  # documents start anywhere in a chunk

    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_blocks(dataset, tokenizer, K, BLOCK_SIZE + 2)
    with pytest.raises(ValueError, match="packing must be one of"):
        build_blocks(dataset, tokenizer, K, BLOCK_SIZE, packing="aligend")


# ------------------------------------------------------------------------------------------------------ script


def test_train_calm_end_to_end(workdir):
    example = load_example()
    output_dir = workdir / "calm"
    trainer, metrics = example.main(script_args(workdir, output_dir))
    assert isinstance(trainer, CalmTrainer) and trainer.state.global_step == 3
    assert EVAL_KEYS <= metrics.keys() and metrics["train_loss"] > 0
    # Official optimiser defaults.
    args = trainer.args
    official = (3e-4, 0.9, 0.95, 0.1, 1.0)
    assert (args.learning_rate, args.adam_beta1, args.adam_beta2, args.weight_decay, args.max_grad_norm) == official
    assert args.lr_scheduler_type == "constant"
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all("energy_fidelity" in entry for entry in logs)

    # Saved: a CALM that loads with the Auto class, with the autoencoder's weights and the tokenizer.
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    assert isinstance(model, CalmForCausalLM)
    assert model.config.hidden_size == 32 and model.config.max_chunks == BLOCK_SIZE // K
    saved_ae = CalmAutoencoder.from_pretrained(workdir / "autoencoder").state_dict()
    assert all(torch.equal(model.autoencoder.state_dict()[name], value) for name, value in saved_ae.items())
    trained = trainer.model.state_dict()
    assert all(torch.equal(value, trained[name]) for name, value in model.state_dict().items())
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert tokenizer.pad_token_id == 0 and len(tokenizer) == model.config.vocab_size
    assert json.loads((output_dir / "eval_results.json").read_text())["eval_brierlm"] == metrics["eval_brierlm"]

    # Continue from the saved model (shape arguments ignored), with the stream packing and a head learning rate of its
    # own (CalmTrainingArguments, through the script's arguments).
    more, _ = example.main(
        script_args(
            workdir,
            workdir / "calm-more",
            "--model_name_or_path",
            str(output_dir),
            "--packing",
            "stream",
            "--head_learning_rate",
            "3e-3",
        )
    )
    assert more.model.config.hidden_size == 32 and more.args.head_learning_rate == 3e-3
    head = {id(p) for p in more.model.generative_head.parameters()}
    assert {g["initial_lr"] for g in more.optimizer.param_groups if id(g["params"][0]) in head} == {3e-3}
    assert all(torch.equal(more.model.autoencoder.state_dict()[n], v) for n, v in saved_ae.items())


def test_train_calm_errors(workdir):
    example = load_example()
    with pytest.raises(ValueError, match="multiple of the autoencoder's patch_size K = 4"):
        example.main(script_args(workdir, workdir / "bad", "--block_size", "30"))

    no_pad = workdir / "no-pad-tokenizer"
    word_tokenizer(documents(4), pad=False).save_pretrained(no_pad)
    with pytest.raises(ValueError, match="has no pad token") as error:
        example.main(script_args(workdir, workdir / "bad", "--tokenizer", str(no_pad)))
    assert "add_special_tokens" in str(error.value)

    other_ae = workdir / "other-autoencoder"  # K = 2: not the autoencoder inside the model, which it would ignore
    factories.tiny_autoencoder(patch_size=2).save_pretrained(other_ae)
    model_dir = workdir / "tiny-calm"
    factories.tiny_calm().save_pretrained(model_dir)
    both = script_args(workdir, workdir / "bad", "--model_name_or_path", str(model_dir))
    both[both.index("--autoencoder") + 1] = str(other_ae)
    with pytest.raises(ValueError, match="not the autoencoder inside --model_name_or_path"):
        example.main(both)

    bare_ae = workdir / "bare-autoencoder"
    CalmAutoencoder.from_pretrained(workdir / "autoencoder").save_pretrained(bare_ae)  # no tokenizer beside it
    argv = script_args(workdir, workdir / "bad")
    argv[argv.index("--autoencoder") + 1] = str(bare_ae)
    with pytest.raises(ValueError, match="pass --tokenizer"):
        example.main(argv)


def test_train_autoencoder_end_to_end(workdir):
    """examples/train_autoencoder.py trains with the package's CalmAutoencoderTrainer and saves a loadable autoencoder
    with its tokenizer."""
    example = load_example("train_autoencoder")
    output_dir = workdir / "ae-out"
    # fmt: off
    trainer, metrics = example.main([
        "--tokenizer", str(workdir / "autoencoder"),
        "--train_file", str(workdir / "train.jsonl"), "--validation_file", str(workdir / "validation.jsonl"),
        "--block_size", str(BLOCK_SIZE), "--patch_size", str(K), "--latent_size", "6", "--hidden_size", "16",
        "--intermediate_size", "24", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
        "--max_eval_samples", "3", "--max_steps", "3", "--logging_steps", "1", "--save_strategy", "no",
        "--report_to", "none", "--use_cpu", "--seed", "0", "--disable_tqdm", "true", "--dataloader_num_workers", "0",
        "--output_dir", str(output_dir),
    ])
    # fmt: on
    assert type(trainer) is CalmAutoencoderTrainer and trainer.state.global_step == 3
    assert AUTOENCODER_EVAL_KEYS <= metrics.keys() and metrics["train_loss"] > 0
    args = trainer.args
    official = (3e-4, 0.9, 0.95, 0.1, 1.0)
    assert (args.learning_rate, args.adam_beta1, args.adam_beta2, args.weight_decay, args.max_grad_norm) == official
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    terms = {"reconstruction_loss", "kl_loss", "reconstruction_accuracy"}
    assert len(logs) == 3 and all(terms <= entry.keys() for entry in logs)
    model = CalmAutoencoder.from_pretrained(output_dir)
    assert model.config.hidden_size == 16 and model.config.pad_token_id == 0
    trained = trainer.model.state_dict()
    assert all(torch.equal(value, trained[name]) for name, value in model.state_dict().items())
    assert len(AutoTokenizer.from_pretrained(output_dir)) == model.config.vocab_size
    saved_metrics = json.loads((output_dir / "eval_results.json").read_text())
    assert saved_metrics["eval_chunk_accuracy"] == metrics["eval_chunk_accuracy"]


def test_scripts_train_on_streamed_data(workdir):
    """--streaming in both scripts: the training blocks are a datasets.IterableDataset of the pre-tokenised blocks, a
    checkpoint holds the stream's state, and the validation blocks are still built up front."""
    example = load_example()
    common = ["--per_device_train_batch_size", "1", "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2"]
    streamed, _ = example.main(script_args(workdir, workdir / "calm-streamed", *common, "--streaming"))
    assert isinstance(streamed.train_dataset, datasets.IterableDataset)
    assert isinstance(streamed.eval_dataset, datasets.Dataset)
    assert (workdir / "calm-streamed" / "checkpoint-2" / "stream_state_rank0.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(workdir / "autoencoder")
    blocks = build_blocks(load_documents(str(workdir / "train.jsonl")), tokenizer, K, BLOCK_SIZE)
    assert list(streamed.train_dataset) == blocks.to_list()

    autoencoder = load_example("train_autoencoder")
    # fmt: off
    trainer, _ = autoencoder.main([
        "--tokenizer", str(workdir / "autoencoder"), "--train_file", str(workdir / "train.jsonl"), "--streaming",
        "--block_size", str(BLOCK_SIZE), "--patch_size", str(K), "--latent_size", "6", "--hidden_size", "16",
        "--intermediate_size", "24", "--per_device_train_batch_size", "2", "--max_steps", "2", "--report_to", "none",
        "--use_cpu", "--seed", "0", "--disable_tqdm", "true", "--dataloader_num_workers", "0",
        "--output_dir", str(workdir / "ae-streamed"),
    ])
    # fmt: on
    assert isinstance(trainer.train_dataset, datasets.IterableDataset) and trainer.state.global_step == 2


@pytest.mark.slow  # torchrun, 2 processes
def test_train_calm_on_two_processes(workdir):
    """torchrun with 2 CPU processes (gloo): both ranks run, end with the same weights (those saved), and the
    distributed evaluation (3 blocks on 2 ranks: one repeated, then dropped) equals a one-process evaluation."""
    output_dir, checksums = workdir / "calm-ddp", workdir / "checksums"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(workdir / "datasets-cache-ddp"),
        "OMP_NUM_THREADS": "1",
        "TRANSFORMERS_CALM_WEIGHT_CHECKSUM_DIR": str(checksums),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT]
    result = subprocess.run(
        [*command, *script_args(workdir, output_dir)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads((checksums / f"weights_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in records] == [(0, 2), (1, 2)]
    assert all(r["distributed_type"] == "MULTI_CPU" for r in records)
    assert records[0]["sha256"] == records[1]["sha256"]

    example = load_example()
    model = CalmForCausalLM.from_pretrained(output_dir)
    assert example.weight_checksum(model) == records[0]["sha256"]
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["train_batch_size"] == 2

    # The same metrics from one process, on the same 3 validation blocks.
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    blocks = build_blocks(load_documents(str(workdir / "validation.jsonl")), tokenizer, K, BLOCK_SIZE).select(range(3))
    args = TrainingArguments(
        output_dir=str(workdir / "eval"), use_cpu=True, report_to="none", per_device_eval_batch_size=1, seed=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = CalmTrainer(model=model, args=args, eval_dataset=blocks).evaluate()
    distributed = json.loads((output_dir / "eval_results.json").read_text())
    for key in EVAL_KEYS:
        assert distributed[key] == pytest.approx(single[key], rel=1e-6, abs=1e-9), key


def test_paper_recipe_commands_are_valid(tmp_path):
    """examples/recipes/calm-m.sh (DRY_RUN): both stages' commands parse with the scripts' own arguments, read the
    official shards, and keep the official global batch of 256 blocks on 8 and on 1 GPU."""
    pile = tmp_path / "pile"
    pile.mkdir()
    for shard in range(30):
        (pile / f"{shard:02d}.jsonl.zst").touch()
    recipe = os.path.join(REPO_ROOT, "examples", "recipes", "calm-m.sh")
    for gpus in (8, 1):
        result = subprocess.run(
            ["bash", recipe, str(pile), str(tmp_path / "out"), str(gpus)],
            env={**os.environ, "DRY_RUN": "1"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        commands = [line[2:].split() for line in result.stdout.splitlines() if line.startswith("+ ")]
        assert len(commands) == 2
        for command, name, shards, block_size in (
            (commands[0], "train_autoencoder", ["00", "01"], 2048),
            (commands[1], "train_calm", [f"{s:02d}" for s in range(2, 30)], 8192),
        ):
            script = next(i for i, arg in enumerate(command) if arg.endswith(f"{name}.py"))
            assert command[command.index("--num_processes") + 1] == str(gpus)
            example = load_example(name)
            arguments = getattr(
                example, "CalmTrainingArguments" if name == "train_calm" else "AutoencoderTrainingArguments"
            )
            parser = HfArgumentParser((example.ModelArguments, example.DataArguments, arguments))
            # --use_cpu: this machine has no GPU, and TrainingArguments refuses bf16 on CPU without it.
            argv = [*command[script + 1 :], "--use_cpu"]
            _, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
            assert data_args.streaming and data_args.block_size == block_size
            assert [os.path.basename(f).split(".")[0] for f in data_args.train_file] == shards
            batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * gpus
            assert batch == 256 and training_args.bf16 and training_args.learning_rate == 3e-4


def test_scripts_name_a_missing_path_and_a_missing_tokenizer(workdir, tmp_path):
    """A README command run before its input exists: the scripts name the missing folder (not a Hub repo-id error),
    and a model folder without a tokenizer says to pass --tokenizer (not "install sentencepiece or tiktoken")."""
    scripts = load_example("scripts")
    with pytest.raises(FileNotFoundError, match="--tokenizer 'outputs/demo/tokenizer': no such folder"):
        load_example("train_autoencoder").main(
            ["--tokenizer", "outputs/demo/tokenizer", "--train_file", str(workdir / "train.jsonl"), "--output_dir",
             str(tmp_path / "ae"), "--use_cpu", "--report_to", "none"]
        )  # fmt: skip
    with pytest.raises(FileNotFoundError, match="--model './outputs/calm': no such folder"):
        load_example("evaluate_brierlm").main(["--model", "./outputs/calm"])
    scripts.check_path("org/name", "--model")  # may be a Hub id: left to transformers
    factories.tiny_calm().save_pretrained(tmp_path / "calm")
    with pytest.raises(ValueError, match="No tokenizer in .*: pass --tokenizer"):
        load_example("evaluate_brierlm").main(["--model", str(tmp_path / "calm")])
